r"""The structure of a convolution the certificates use instead of dense matrices.

Above the numerical floor (:mod:`jaxinv._security._rank`) and the layer's maps
(:mod:`jaxinv._security._layer_maps`); used by the layer's certificates (:mod:`jaxinv._security._certificates`).

* the layout of a plain convolution of the layer input (:func:`conv_axes`, :func:`conv_geometry`);
* its forward block as a sparse matrix from :math:`D_1 D_2 C_\text{in}` probes (:func:`probe_forward`), and for
  very large images a tile certificate of its full column rank (:func:`tile_certificate`);
* its gradient block, the same matrix for every input channel, :math:`B_l = I_{C_\text{in}} \otimes B_0`
  (:math:`B_0`: :math:`C_\text{out}k^2` rows over the pixels), checked on a random probe for every layer
  (:func:`kron_gradient`). Hence :math:`\ker B_l = \ker B_0 \otimes \mathbb R^{C_\text{in}}`.

Padding needs no rows: the operators act on the unpadded input. The COPA authors' convention (unknowns = padded
input, one identity row per pad entry, :func:`padding_entries`) has the same deficiency, since the pad rows form an
identity block on the pad coordinates: :math:`\operatorname{rank}\begin{bmatrix}M_\text{in} & M_\text{pad}\\ 0 & I
\end{bmatrix} = \operatorname{rank} M_\text{in} + n_\text{pad}` (checked in the tests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .._model import Stage
from ._layer_maps import LayerMaps, unit_vectors
from ._rank import Block, gram_tol, null_basis


def conv_axes(stage: Stage, leaves) -> tuple[int, tuple[int, ...], int] | None:
    """``(channel axis, spatial axes)`` of the layer input and the kernel's in-feature axis, when the convolution
    reads the layer input directly (up to element-wise shifts) with an unreshaped kernel and one group."""
    w = stage.nodes.bilinear
    if w.name != "conv_general_dilated":
        return None
    if w.params.get("feature_group_count", 1) != 1 or w.params.get("batch_group_count", 1) != 1:
        return None
    lhs = next(i for i in w.inputs if i.dep_input)
    rhs = next(i for i in w.inputs if not i.dep_input)
    if tuple(lhs.shape) != tuple(stage.nodes.x_in.shape):
        return None
    if tuple(np.shape(leaves[stage.nodes.kernel_leaf])) != tuple(rhs.shape):
        return None
    dn = w.params["dimension_numbers"]
    return int(dn.lhs_spec[1]), tuple(int(a) for a in dn.lhs_spec[2:]), int(dn.rhs_spec[1])


def conv_geometry(maps: LayerMaps, axes) -> dict | None:
    """Strides, padding, dilation and receptive-field extent per spatial axis of a plain convolution of the layer
    input, and the output layout (``None`` when the convolution dilates its input)."""
    if axes is None:
        return None
    prm = maps.stage.nodes.bilinear.params
    if any(int(v) != 1 for v in prm.get("lhs_dilation", (1,))):
        return None
    dn = prm["dimension_numbers"]
    kernel = maps.kernel
    ch, spatial, _ = axes
    ks = tuple(int(kernel.shape[a]) for a in dn.rhs_spec[2:])
    dil = tuple(int(v) for v in prm["rhs_dilation"])
    return {
        "spatial": spatial, "ch": ch, "N": tuple(int(maps.shape[a]) for a in spatial),
        "s": tuple(int(v) for v in prm["window_strides"]), "lo": tuple(int(lo) for lo, _ in prm["padding"]),
        "d": dil, "e": tuple((k - 1) * d + 1 for k, d in zip(ks, dil)),
        "out_spatial": tuple(int(a) for a in dn.out_spec[2:]), "out_ch": int(dn.out_spec[1]),
    }


def probe_forward(maps: LayerMaps, geom: dict, key: int) -> sp.csr_matrix | None:
    r"""The forward block of a convolution as a sparse matrix from :math:`D_1 D_2 C_\text{in}` probes instead of
    :math:`n` unit vectors: inputs spaced :math:`D_i` = receptive-field extent apart never share an output, so each
    probe's response splits exactly into the columns of its inputs. Checked against the layer on a random vector."""
    shape, n = maps.shape, maps.n
    N, D, sp_ax, ch = geom["N"], geom["e"], geom["spatial"], geom["ch"]
    C = shape[ch]
    if len(N) != 2 or min(D) < 1:
        return None
    out_shape = maps.out_shape
    h = tuple(out_shape[a] for a in geom["out_spatial"])
    idx = np.arange(n).reshape(shape).transpose((0,) + sp_ax + (ch,))[0]  # [u1, u2, c] -> flat input index
    oidx = np.arange(maps.m_total).reshape(out_shape).transpose((0,) + geom["out_spatial"] + (geom["out_ch"],))[0]
    probes = [(r1, r2, c) for r1 in range(D[0]) for r2 in range(D[1]) for c in range(C)]

    def vecs(a, b):
        out = np.zeros((b - a, n), np.float32)
        for j, (r1, r2, c) in enumerate(probes[a:b]):
            out[j, idx[r1 :: D[0], r2 :: D[1], c].reshape(-1)] = 1.0
        return out

    Y = maps.apply("fwd", vecs, len(probes))  # (m_total, probes)
    # per axis: which input of a probe class r reaches output o (or -1)
    star = []
    for i in range(2):
        o = np.arange(h[i])[:, None]
        r = np.arange(D[i])[None, :]
        start = geom["s"][i] * o - geom["lo"][i]
        u = start + np.mod(r - start, D[i])
        ok = (u < start + geom["e"][i]) & (u >= 0) & (u < N[i])
        star.append(np.where(ok, u, -1))  # (h_i, D_i)
    rows, cols, vals = [], [], []
    for j, (r1, r2, c) in enumerate(probes):
        u1, u2 = star[0][:, r1], star[1][:, r2]
        v1 = np.flatnonzero(u1 >= 0)
        v2 = np.flatnonzero(u2 >= 0)
        if v1.size == 0 or v2.size == 0:
            continue
        O1, O2 = np.meshgrid(v1, v2, indexing="ij")
        ri = oidx[O1, O2]  # (.., .., C_out)
        ci = idx[u1[O1], u2[O2], c]
        vv = Y[ri, j]
        nz = vv != 0
        rows.append(ri[nz])
        cols.append(np.broadcast_to(ci[..., None], ri.shape)[nz])
        vals.append(vv[nz])
    if not rows:
        return None
    A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(maps.m_total, n))
    x = np.random.default_rng(key).standard_normal(n)
    want = maps.one("fwd", x)
    if np.linalg.norm(A @ x - want) > 1e-5 * (np.linalg.norm(want) + 1e-30):
        return None
    return A


def tile_certificate(maps: LayerMaps, covered: np.ndarray, axes, layer, a_norm: float) -> Block | None:
    r"""Certify that a large convolution's forward block has full column rank on the inputs it covers, from small
    tiles (exact logic, small numerical factorisations).

    A tile is a window of the padded input aligned with the output lattice. The forward rows whose receptive field
    lies inside the tile involve only the tile's unknowns, so any :math:`x` with :math:`Ax = 0` restricted to the
    tile lies in the null space :math:`N_R` of that local matrix; input coordinates on which every vector of
    :math:`N_R` vanishes (zero rows of an orthonormal basis) are therefore zero. If the union of these
    *determined* coordinates over all tiles contains every covered input, :math:`\ker A` holds only the uncovered
    inputs. All tiles share one local matrix up to which of their coordinates are padding, so only a handful of
    tile classes (interior, edges, corners) are factorised. Returns ``None`` when the layer is not a plain
    convolution of its input or the certificate is inconclusive.
    """
    w = maps.stage.nodes.bilinear
    prm = w.params
    if any(int(v) != 1 for v in prm.get("lhs_dilation", (1,))):
        return None
    ch, spatial, kin = axes
    kernel = maps.kernel
    dn = prm["dimension_numbers"]
    strides = tuple(int(v) for v in prm["window_strides"])
    dil = tuple(int(v) for v in prm["rhs_dilation"])
    pads = tuple((int(lo), int(hi)) for lo, hi in prm["padding"])
    ks = tuple(int(kernel.shape[a]) for a in dn.rhs_spec[2:])
    ext = tuple((k - 1) * d + 1 for k, d in zip(ks, dil))
    N = tuple(int(maps.shape[a]) for a in spatial)
    Hp = tuple(n_ + lo + hi for n_, (lo, hi) in zip(N, pads))
    nout = tuple((h - e) // s_ + 1 for h, e, s_ in zip(Hp, ext, strides))
    if any(lo < 0 or hi < 0 for lo, hi in pads) or any(o < 1 for o in nout):
        return None

    def replica(x, pad):
        return jax.lax.conv_general_dilated(x, kernel, strides, pad, rhs_dilation=dil, dimension_numbers=dn)

    # the replica must be the layer's linear part (no scaling before the convolution)
    x = np.random.default_rng(0).standard_normal(maps.n)
    want = maps.one("fwd", x)
    got = np.asarray(replica(jnp.asarray(x.reshape(maps.shape), kernel.dtype), pads), np.float64).reshape(-1)
    if want.shape != got.shape or np.linalg.norm(want - got) > 1e-4 * (np.linalg.norm(want) + 1e-30):
        return None

    C = int(maps.shape[ch])
    for extra in (3, 6):
        n_in = tuple(min(-(-e // s_) + extra, o) for e, s_, o in zip(ext, strides, nout))
        T = tuple(s_ * (k - 1) + e for s_, k, e in zip(strides, n_in, ext))
        pshape = list(maps.shape)
        for a, t in zip(spatial, T):
            pshape[a] = t
        pshape = tuple(pshape)
        npatch = math.prod(pshape)
        f = jax.jit(jax.vmap(lambda v: replica(v.reshape(pshape), "VALID").reshape(-1)))
        cols = []
        for s0 in range(0, npatch, 256):
            e_ = np.zeros((min(256, npatch - s0), npatch), np.float32)
            e_[np.arange(e_.shape[0]), np.arange(s0, s0 + e_.shape[0])] = 1.0
            cols.append(np.asarray(f(jnp.asarray(e_, kernel.dtype)), np.float64))
        Ap = np.concatenate(cols, 0).T / a_norm  # (tile rows, patch coordinates)
        coord = np.arange(npatch).reshape(pshape).transpose((0,) + spatial + (ch,)).reshape(T + (C,))

        # tile starts (in outputs) per axis: every output offset; classes by which coordinates are interior
        starts = [np.arange(0, o - k + 1) for o, k in zip(nout, n_in)]
        det = np.zeros(N + (C,), bool)
        cache: dict = {}
        for o0 in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(spatial)):
            t0 = [s_ * o for s_, o in zip(strides, o0)]
            masks = [((np.arange(t) + a0 - lo >= 0) & (np.arange(t) + a0 - lo < n_)) for t, a0, (lo, _), n_ in
                     zip(T, t0, pads, N)]
            keyc = tuple(m_.tobytes() for m_ in masks)
            if keyc not in cache:
                inside = np.ix_(*masks)
                sel = coord[inside].reshape(-1)
                G = Ap[:, sel].T @ Ap[:, sel]
                Nb = null_basis(G, gram_tol(G.shape[0]) ** 2)
                good = np.linalg.norm(Nb, axis=1) < 1e-6 if Nb.shape[1] else np.ones(len(sel), bool)
                local = np.zeros(T + (C,), bool)
                local[inside] = good.reshape(tuple(int(m_.sum()) for m_ in masks) + (C,))
                cache[keyc] = local
            local = cache[keyc]
            gsl = tuple(slice(max(a0 - lo, 0), min(a0 - lo + t, n_)) for a0, (lo, _), t, n_ in zip(t0, pads, T, N))
            lsl = tuple(slice(g.start - (a0 - lo), g.stop - (a0 - lo)) for g, a0, (lo, _) in zip(gsl, t0, pads))
            det[gsl] |= local[lsl]
        # back to the layer's own coordinate order
        det_flat = np.zeros(maps.n, bool)
        order = np.arange(maps.n).reshape(maps.shape).transpose((0,) + spatial + (ch,)).reshape(N + (C,))
        det_flat[order.reshape(-1)] = det.reshape(-1)
        if np.all(det_flat[covered]):
            return Block(int(covered.sum()), math.nan, "not computed", (math.nan, 0.0),
                         f"tile certificate ({len(cache)} tile classes of {T} inputs)")
    return None


def kron_gradient(maps: LayerMaps, axes, kshape, key: int):
    r"""The per-channel gradient matrix :math:`B_0` of a convolution, with a probe check of
    :math:`B = I_{C}\otimes B_0`. Returns ``(B0 (rows, pixels), pixel index table (pixels, C))`` or ``None``."""
    ch, spatial, kin = axes
    shape = maps.shape
    n = maps.n
    C = shape[ch]
    idx = np.arange(n).reshape(shape).transpose((0,) + spatial + (ch,)).reshape(-1, C)  # [pixel, channel]
    hw = idx.shape[0]
    G = maps.apply("grad", unit_vectors(idx[:, 0], n), hw)  # (p, hw): flattened kernels
    sel = np.moveaxis(np.arange(math.prod(kshape)).reshape(kshape), kin, 0).reshape(C, -1)  # [in-feature, rest]
    B0 = G[sel[0]]
    # probe: every channel's slice of B(x) equals B0 x_j (so nothing leaks across channels)
    x = np.random.default_rng(key).standard_normal(n)
    g = maps.one("grad", x)
    want = B0 @ x[idx]  # (rows, C)
    got = g[sel].T
    if np.linalg.norm(got - want) > 1e-4 * (np.linalg.norm(got) + np.linalg.norm(want) + 1e-30):
        return None
    return B0, idx


def padding_entries(stage: Stage, axes) -> int:
    """Pad entries of a convolution's input (the COPA authors' identity rows; 0 for other layers)."""
    L = stage.layer
    if L.kind != "conv" or not L.padding or axes is None:
        return 0
    shape = stage.nodes.x_in.shape
    ch, spatial, _ = axes
    padded = math.prod(shape[a] + max(lo, 0) + max(hi, 0) for a, (lo, hi) in zip(spatial, L.padding))
    return (padded - math.prod(shape[a] for a in spatial)) * shape[ch]
