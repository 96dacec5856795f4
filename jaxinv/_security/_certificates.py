r"""One layer's rank certificate: the rank, deficiency, conditioning and lost energy of its stacked system.

Above the numerical floor (:mod:`._rank`), the layer's maps (:mod:`._layer_maps`) and a convolution's structure
(:mod:`._conv`); below the entry (:func:`jaxinv.security`), which calls :func:`analyse_layer` once per layer.

For layer :math:`l` (input layer first) the unknown is its input :math:`x_{l-1}` (:math:`n_l` entries). The shared
gradient gives two linear constraints on it (:mod:`jaxinv._maps`): the **forward** rows
:math:`A_l x = z_l - c_l` (:math:`m_l` output units) and the **gradient** rows :math:`B_l(x;\delta_l) = g_{W_l}`
(:math:`p_l` kernel entries). The layer is *determined* when the stacked operator :math:`M_l = [A_l; B_l]` has full
column rank; its **deficiency** :math:`d_l = n_l - \operatorname{rank} M_l` counts the directions of
:math:`x_{l-1}` the gradient cannot see. Everything here is computed on the *balanced* operator
:math:`[A_l/\|A_l\|_2;\ B_l/\|B_l\|_2]`, the system :func:`jaxinv.copa` solves (row scaling never changes a rank).

**Structure instead of dense matrices** (the dense reference took minutes per layer):

* *convolution*: :math:`B_l = I_{C_\text{in}} \otimes B_0` (:func:`jaxinv._security._conv.kron_gradient`), so
  :math:`\ker M_l = \{ (Z\otimes I)\,y : A_l (Z\otimes I)\, y = 0 \}` with :math:`Z` an orthonormal basis of
  :math:`\ker B_0`; the rank problem shrinks to the :math:`m_l \times C_\text{in}\dim\ker B_0` matrix
  :math:`R = A_l(Z\otimes I)`, usually a fraction of the size (and empty when :math:`B_0` has full column rank).
* *dense layer*: :math:`B_l = \delta_l \otimes I` has full column rank whenever :math:`\delta_l\ne0` (all its
  singular values equal :math:`\|\delta_l\|`), a certificate without any matrix.
* the forward block alone: small side dense, otherwise a banded Cholesky of the (local, banded) Gram matrix of
  the convolution, and for very large images a tile certificate
  (:func:`jaxinv._security._conv.tile_certificate`).

Beyond the sizes below only a counting estimate is given (``exact=False``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np
import scipy.sparse as sp

from ._conv import conv_axes, conv_geometry, kron_gradient, padding_entries, probe_forward, tile_certificate
from ._layer_maps import LayerMaps, unit_vectors
from ._pass import LayerData
from ._rank import (
    RANK_TOL,
    Block,
    banded_certificate,
    banded_from_sparse,
    block_from_rank,
    gram_rank,
    gram_tol,
    power_norm,
    rank_sigma_min,
    row_space_energy,
    safe_sqrt,
    spectral_norm,
)
from ._report import LayerSecurity

DENSE_SMALL = 2500  # forward Gram: dense pivoted Cholesky up to this side
BANDED_FLOPS = 3e10  # banded Cholesky when n * bandwidth^2 is below this
DENSE_MAX = 8000  # largest dense Gram we factorise (about 10 s on 2 cores)
MATERIALISE_MAX = 6e7  # entries of a materialised block (float32)
TILE_MIN = 20000  # unknowns above which the forward block is certified by tiles


@dataclasses.dataclass
class _Forward:
    """The forward block: its rank result, which inputs it reaches, its norm and (when small enough) its matrix."""

    block: Block
    covered: np.ndarray  # bool (n,)
    a_norm: float
    A: sp.csr_matrix | None  # (active rows, n), unscaled exact entries; None when not materialised


def _forward_block(maps: LayerMaps, active: np.ndarray, axes, layer, key: int) -> _Forward:
    r"""Rank of the forward block :math:`A/\|A\|` alone (rows: the ``active`` outputs; columns: all inputs)."""
    n, m = maps.n, int(active.sum())
    act_idx = np.flatnonzero(active)
    if m == 0:
        return _Forward(Block(0, 0.0, "exact", (0.0, 0.0), "no forward rows"), np.zeros(n, bool), 0.0, None)
    if n >= TILE_MIN or m * n > MATERIALISE_MAX:
        r = np.random.default_rng(key).standard_normal(maps.m_total) * active
        covered = maps.one("fwd_t", r) != 0
        a_norm = _mf_norm(maps)
        n_c = int(covered.sum())
        if axes is not None and m >= n_c:
            cert = tile_certificate(maps, covered, axes, layer, a_norm)
            if cert is not None:
                return _Forward(cert, covered, a_norm, None)
        blk = Block(min(m, n_c), math.nan, "estimate", (math.nan, math.nan), "counting estimate (too large)", False)
        return _Forward(blk, covered, a_norm, None)
    A = None
    geom = conv_geometry(maps, axes)
    if geom is not None and min(m, n) > 64:
        A = probe_forward(maps, geom, key)
        if A is not None:
            A = A[act_idx]
    if A is None and n <= m:
        A = sp.csr_matrix(maps.apply("fwd", unit_vectors(np.arange(n), n), n)[act_idx])
    elif A is None:
        A = sp.csr_matrix(maps.apply("fwd_t", unit_vectors(act_idx, maps.m_total), m).T)
    covered = np.asarray(abs(A).sum(axis=0)).reshape(-1) > 0
    a_norm = spectral_norm(A)
    n_c = int(covered.sum())
    side = min(m, n_c)
    S = A[:, np.flatnonzero(covered)] / a_norm
    if side <= DENSE_SMALL:
        Sd = S.toarray() if S.nnz > 0.02 * m * n_c or m * n_c <= 4e6 else S
        rk, _ = gram_rank(Sd)
        return _Forward(block_from_rank(rk, "dense Gram"), covered, a_norm, A)
    G = (S.T @ S if m >= n_c else S @ S.T).tocsr()
    u = banded_from_sparse(G)[1]
    if side * (u + 1) ** 2 <= BANDED_FLOPS:
        ok, lam = banded_certificate(G, (3 * gram_tol(side)) ** 2)
        if ok:
            blk = Block(side, safe_sqrt(lam), "estimate", (safe_sqrt(lam), 0.0), "banded Cholesky certificate")
            return _Forward(blk, covered, a_norm, A)
    if side <= DENSE_MAX:
        rk, _ = gram_rank(S, G=G.toarray())
        return _Forward(block_from_rank(rk, "dense Gram"), covered, a_norm, A)
    blk = Block(side, math.nan, "estimate", (math.nan, math.nan), "counting estimate (too large)", False)
    return _Forward(blk, covered, a_norm, A)


def _mf_norm(maps: LayerMaps, iters: int = 30) -> float:
    """Spectral norm of the forward block, matrix-free (for layers too large to materialise)."""
    return power_norm(lambda v: maps.one("fwd_t", maps.one("fwd", v)), maps.n, iters)


def _stacked_sigma_max(Aop: Callable, Bop: Callable, n: int, iters: int = 30) -> float:
    """Largest singular value of the balanced stacked operator (power iteration on its normal matrix)."""
    return power_norm(lambda v: Aop(v) + Bop(v), n, iters)


def _stacked_conv(maps: LayerMaps, fw: _Forward, axes, kshape, X: np.ndarray, key: int):
    r"""Rank, deficiency and lost energy of a convolution's stacked system through
    :math:`\ker B = \ker B_0\otimes\mathbb R^C`. Returns ``(block, lost_fraction, sigma_max)`` or ``None`` when the
    layer is not a plain convolution of its input (then the generic path is used)."""
    kb = kron_gradient(maps, axes, kshape, key)
    if kb is None:
        return None
    B0, idx = kb
    hw, C = idx.shape
    n = hw * C
    U, s, Vt = np.linalg.svd(B0, full_matrices=True)
    b_norm = float(s[0]) if s.size else 0.0
    if b_norm == 0.0:
        return None
    s = s / b_norm
    r0 = int(np.sum(s > RANK_TOL))
    Z = Vt[r0:].T  # (hw, z): orthonormal basis of ker B0
    z = Z.shape[1]
    q = z * C
    b_min = float(s[r0 - 1]) if r0 else 0.0
    energy = np.maximum(np.sum(X * X, axis=0), 1e-300)  # (P,)

    # sigma_max of [A/|A|; B/|B|] from the materialised forward block and B0
    G0 = (B0.T @ B0) / b_norm**2
    Bop = lambda v: (G0 @ v[idx]).reshape(-1)[np.argsort(idx.reshape(-1))]  # noqa: E731
    if fw.A is not None:
        A = fw.A
        Aop = lambda v: (A.T @ (A @ v)) / fw.a_norm**2  # noqa: E731
        smax = _stacked_sigma_max(Aop, Bop, n)
    else:
        smax = math.sqrt(2.0)

    if q == 0:  # B alone has full column rank: sigma_min(M) >= sigma_min(B0)
        blk = Block(n, b_min, "lower bound", (b_min, 0.0), "gradient block full rank (I (x) B0)")
        return blk, np.zeros(X.shape[1]), smax

    def lift(s_, t_):
        out = np.zeros((t_ - s_, n), np.float32)
        for r, k in enumerate(range(s_, t_)):
            j, t = divmod(k, z)
            out[r, idx[:, j]] = Z[:, t]
        return out

    if fw.A is not None:  # R = [A_1 Z, ..., A_C Z] from the sparse forward block (A_j: channel j's columns)
        R = np.concatenate([np.asarray(fw.A[:, idx[:, j]] @ Z) for j in range(C)], axis=1) / fw.a_norm
    else:
        R = maps.apply("fwd", lift, q) / fw.a_norm  # (m_total, q); inactive rows are zero
    R = R[np.any(R != 0, axis=1)]
    rk, side = gram_rank(R)
    d = q - rk.rank
    # coordinates of each x in ker B, ordered (channel, basis vector) like `lift`
    Y = np.einsum("hz,hcp->czp", Z, X[idx]).reshape(q, -1)
    lost = np.maximum(np.sum(Y * Y, axis=0) - row_space_energy(R, rk, side, Y), 0.0) / energy
    smin_r = rank_sigma_min(rk) if rk.rank else math.inf
    smin = min(b_min, smin_r) if r0 else smin_r
    blk = Block(n - d, smin, "estimate", (safe_sqrt(min(rk.last, b_min**2)), safe_sqrt(rk.rejected)),
                f"ker B0 reduction ({R.shape[0]}x{q}, {'pivoted QR' if rk.factor is None else 'Gram'} {rk.size})")
    return blk, lost, smax


def _stacked_generic(maps: LayerMaps, fw: _Forward, X: np.ndarray):
    """Generic path: materialise both blocks (small layers only) and take the Gram rank."""
    n = maps.n
    A = fw.A.toarray() if fw.A is not None else np.zeros((0, n))
    B = maps.apply("grad", unit_vectors(np.arange(n), n), n)
    b_norm = spectral_norm(B)
    M = np.vstack([A / (fw.a_norm or 1.0), B / (b_norm or 1.0)])
    M = M[np.any(M != 0, axis=1)]
    rk, side = gram_rank(M)
    energy = np.maximum(np.sum(X * X, axis=0), 1e-300)
    lost = np.maximum(np.sum(X * X, axis=0) - row_space_energy(M, rk, side, X), 0.0) / energy
    smin = rank_sigma_min(rk)
    blk = dataclasses.replace(block_from_rank(rk, "dense stacked Gram"), sigma_min=smin)
    return blk, lost, spectral_norm(M)


def _dense_gradient_is_outer(maps: LayerMaps, delta: np.ndarray, key: int) -> bool:
    r"""A dense layer's gradient block is :math:`\delta\otimes I` iff :math:`\|B x\| = \|\delta\|\|x\|` for all x
    (checked on two random probes)."""
    rng = np.random.default_rng(key)
    nd = float(np.linalg.norm(delta))
    for _ in range(2):
        x = rng.standard_normal(maps.n)
        g = maps.one("grad", x)
        if abs(np.linalg.norm(g) - nd * np.linalg.norm(x)) > 1e-4 * nd * np.linalg.norm(x):
            return False
    return True


def analyse_layer(ld: LayerData, leaves, key: int) -> LayerSecurity:
    """The system of one layer at the representative pass (see :class:`LayerSecurity`)."""
    t0 = time.perf_counter()
    st, L = ld.stage, ld.stage.layer
    head = ld.role == "head"
    relu = st.activation.name == "relu"
    mask = (ld.x_out > 0).astype(ld.z.dtype) if (relu and not head) else None
    block = st.nodes.kind == "block"
    if block and head:
        raise ValueError(f"the model's last stage {L.path!r} is a block (branches joined at the output): the "
                         "security metric needs a dense or convolution head")
    maps = LayerMaps(st, leaves, ld.delta, mask, ld.x_in if block else None)
    n, p = maps.n, maps.p
    active = np.ones(maps.m_total, bool) if mask is None else np.asarray(mask).reshape(-1) > 0
    axes = conv_axes(st, leaves) if L.kind == "conv" else None
    X = np.concatenate([np.asarray(ld.x_in, np.float64).reshape(1, -1),
                        np.asarray(ld.probes, np.float64).reshape(len(ld.probes), -1)], 0).T  # (n, 1 + P)
    energy = np.maximum(np.sum(X * X, axis=0), 1e-300)
    delta = np.asarray(ld.delta, np.float64).reshape(-1)
    has_delta = bool(np.any(delta != 0))

    fw = _forward_block(maps, active, axes, L, key)
    covered = fw.covered
    m = int(active.sum())
    lost = np.zeros(X.shape[1])
    if L.kind == "dense" and has_delta and _dense_gradient_is_outer(maps, delta, key):
        # B = delta (x) I: full column rank, every singular value of B/||B|| is 1 (certificate, no matrix)
        blk = Block(n, 1.0, "lower bound", (1.0, 0.0), "dense gradient delta x^T: full column rank")
        smax = 1.0 if head else math.sqrt(2.0)
    elif head:
        blk, smax = _head_block(maps, axes, L, key, has_delta), 1.0
        lost = lost if blk.rank == n else np.full(X.shape[1], (n - blk.rank) / n)
    elif fw.block.exact and fw.block.rank == int(covered.sum()):
        # the forward block alone sees every covered input: nothing but the uncovered inputs can be missing
        # sigma_min(M) >= sigma_min(A): the forward block's (estimated) value bounds the stacked one from below
        blk = dataclasses.replace(fw.block, sigma_kind="estimate" if fw.block.sigma_kind != "not computed" else
                                  "not computed",
                                  method="forward block full rank on covered inputs (" + fw.block.method + ")")
        lost = np.sum(X[~covered] ** 2, axis=0) / energy
        smax = math.sqrt(2.0) if has_delta else 1.0
    else:
        res = None
        if axes is not None and has_delta and n < TILE_MIN:
            res = _stacked_conv(maps, fw, axes, L.kernel_shape, X, key)
        if res is None and n <= DENSE_MAX and (m + p) * n <= MATERIALISE_MAX:
            res = _stacked_generic(maps, fw, X)
        if res is not None:
            blk, lost, smax = res
        else:  # counting only: an upper bound on the rank
            r = min(int(covered.sum()), fw.block.rank + (p if has_delta else 0))
            blk = Block(r, math.nan, "estimate", (math.nan, math.nan), "counting estimate (too large)", False)
            lost, smax = np.full(X.shape[1], (n - r) / n), math.sqrt(2.0)
    rank = int(blk.rank)
    return LayerSecurity(
        index=L.index, path=L.path, kind=L.kind, role=ld.role, activation=L.activation, unknowns=n,
        forward_rows=0 if head else m, gradient_rows=p, padding_rows=padding_entries(st, axes),
        uncovered=int(n - covered.sum()) if m else 0, rank=rank, deficiency=n - rank,
        sigma_min=float(blk.sigma_min) if rank else 0.0, sigma_max=float(smax), sigma_kind=blk.sigma_kind,
        gap=(float(blk.gap[0]), float(blk.gap[1])), forward_rank=int(fw.block.rank),
        forward_deficiency=n - int(fw.block.rank), forward_sigma_min=float(fw.block.sigma_min),
        lost_energy=float(np.mean(lost[1:])) if lost.size > 1 else float(lost[0]),
        lost_energy_input=float(lost[0]), inverse_gain=float(ld.gain), method=blk.method,
        exact=bool(blk.exact), seconds=time.perf_counter() - t0,
    )


def _head_block(maps: LayerMaps, axes, L, key, has_delta) -> Block:
    """The head's system: gradient rows alone (its pre-activation is what the attack does not know)."""
    n = maps.n
    if not has_delta:
        return Block(0, 0.0, "exact", (0.0, 0.0), "zero gradient at the head")
    if axes is not None:
        kb = kron_gradient(maps, axes, L.kernel_shape, key)
        if kb is not None:
            s = np.linalg.svd(kb[0], compute_uv=False)
            s = s / s[0]
            r0 = int(np.sum(s > RANK_TOL))
            return Block(r0 * kb[1].shape[1], float(s[r0 - 1]), "exact", (float(s[r0 - 1]), 0.0),
                         "head: gradient rows I (x) B0")
    if n <= DENSE_MAX and n * maps.p <= MATERIALISE_MAX:
        B = maps.apply("grad", unit_vectors(np.arange(n), n), n)
        rk, _ = gram_rank(B / (spectral_norm(B) or 1.0))
        return Block(rk.rank, safe_sqrt(rk.last), "estimate", (safe_sqrt(rk.last), safe_sqrt(rk.rejected)),
                     "head: dense Gram")
    return Block(n, math.nan, "estimate", (math.nan, math.nan), "head: counting estimate", False)
