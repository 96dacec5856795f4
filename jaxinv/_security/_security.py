r"""How secure is an architecture? Ranks, deficiencies, the COPA and R-GAP indices, and a validated score.

For layer :math:`l` (input layer first) the unknown is its input :math:`x_{l-1}` (:math:`n_l` entries). The shared
gradient gives two linear constraints on it (:mod:`jaxinv._maps`): the **forward** rows
:math:`A_l x = z_l - c_l` (:math:`m_l` output units) and the **gradient** rows :math:`B_l(x;\delta_l) = g_{W_l}`
(:math:`p_l` kernel entries). The layer is *determined* when the stacked operator :math:`M_l = [A_l; B_l]` has full
column rank; its **deficiency** :math:`d_l = n_l - \operatorname{rank} M_l` counts the directions of
:math:`x_{l-1}` the gradient cannot see. Everything here is computed on the *balanced* operator
:math:`[A_l/\|A_l\|_2;\ B_l/\|B_l\|_2]`, the system :func:`jaxinv.copa` solves (row scaling never changes a rank).

**Rank tolerance.** A singular value of the balanced operator counts when it exceeds :data:`RANK_TOL`
(``1e-6``; the operator's largest singular value is between 1 and :math:`\sqrt2`). Ranks come from pivoted
Cholesky (LAPACK ``dpstrf``) of float64 Gram matrices of the *exact* float32 entries (a linear map applied to unit
vectors returns its matrix entries exactly). Forming a Gram matrix squares the condition number: its rounding noise
is about :math:`\sqrt{N\varepsilon_{64}}` in singular-value terms, so the threshold is raised to
:math:`\max(10^{-6}, 10\sqrt{N\varepsilon_{64}})` (:func:`_gram_tol`), and any pivot close to it (accepted
below ten times, rejected above a third of it) sends the decision to pivoted QR of the matrix itself at
``1e-6``. Every layer reports its smallest accepted and largest rejected pivot (``gap``): on the 51 architectures
of the benchmark, accepted ones are above :math:`4\cdot10^{-5}` (above :math:`10^{-3}` in every rank-deficient
layer) and rejected ones below :math:`5\cdot10^{-8}`.

**Structure instead of dense matrices** (the dense reference took minutes per layer):

* *convolution*: the gradient block is the same matrix for every input channel,
  :math:`B_l = I_{C_\text{in}} \otimes B_0` (:math:`B_0`: :math:`C_\text{out}k^2` rows over the pixels), checked on a
  random probe for every layer. Hence :math:`\ker B_l = \ker B_0 \otimes \mathbb R^{C_\text{in}}` and
  :math:`\ker M_l = \{ (Z\otimes I)\,y : A_l (Z\otimes I)\, y = 0 \}` with :math:`Z` an orthonormal basis of
  :math:`\ker B_0`; the rank problem shrinks to the :math:`m_l \times C_\text{in}\dim\ker B_0` matrix
  :math:`R = A_l(Z\otimes I)`, usually a fraction of the size (and empty when :math:`B_0` has full column rank).
* *dense layer*: :math:`B_l = \delta_l \otimes I` has full column rank whenever :math:`\delta_l\ne0` (all its
  singular values equal :math:`\|\delta_l\|`), a certificate without any matrix.
* the forward block alone: small side dense, otherwise a banded Cholesky of the (local, banded) Gram matrix of
  the convolution, and for very large images a tile certificate (:func:`_tile_certificate`).

Padding needs no rows: the operators act on the unpadded input. The COPA authors' convention (unknowns = padded
input, one identity row per pad entry) has the same deficiency, since the pad rows form an identity block on the pad
coordinates: :math:`\operatorname{rank}\begin{bmatrix}M_\text{in} & M_\text{pad}\\ 0 & I\end{bmatrix} =
\operatorname{rank} M_\text{in} + n_\text{pad}` (checked in the tests).

**Indices and score.** :func:`copa_index` is the COPA authors' index, :func:`rgap_analysis` R-GAP's counting with
virtual constraints, and :func:`predict_psnr` our score: the predicted PSNR of the layer-wise attack on a typical
image, from each layer's null-space energy, conditioning and activation inverse, validated against measured attacks
(``benchmarks/bench_security.py``). :func:`count_conv_rank` predicts a convolution's rank from its shape alone (it
matches every exact rank we computed) and drives the advice's what-if changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from scipy.linalg import lapack

from .._checks import check_key
from .._gradient import stacked_gradients
from .._model import Model, Stage, param_paths

#: Relative rank tolerance on the singular values of the balanced stacked operator.
RANK_TOL = 1e-6

_DENSE_SMALL = 2500  # forward Gram: dense pivoted Cholesky up to this side
_BANDED_FLOPS = 3e10  # banded Cholesky when n * bandwidth^2 is below this
_DENSE_MAX = 8000  # largest dense Gram we factorise (about 10 s on 2 cores)
_MATERIALISE_MAX = 6e7  # entries of a materialised block (float32)
_TILE_MIN = 20000  # unknowns above which the forward block is certified by tiles


# ============================================================================================== numerics
_BLAS: list | None = None


def _blas_handles() -> list:
    """``(get, set)`` thread-count functions of the OpenBLAS copies loaded by NumPy and SciPy (empty if none)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = []
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
        except OSError:  # pragma: no cover - not Linux
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:  # pragma: no cover
                continue
            for get, put in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                             ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                             ("openblas_get_num_threads", "openblas_set_num_threads")):
                if hasattr(lib, get) and hasattr(lib, put):
                    _BLAS.append((getattr(lib, get), getattr(lib, put)))
                    break
    return _BLAS


@contextlib.contextmanager
def _single_threaded_blas():
    """Run the (small, many) LAPACK calls of the analysis on one OpenBLAS thread: on a 2-core machine OpenBLAS's
    spinning threads cost far more than they gain here (a banded Cholesky: 0.02 s on one thread, up to 2 s on two).
    A no-op when the OpenBLAS thread controls cannot be found."""
    handles = _blas_handles()
    old = []
    for get, put in handles:
        try:
            old.append(int(get()))
            put(1)
        except Exception:  # pragma: no cover
            old.append(None)
    try:
        yield
    finally:
        for (get, put), o in zip(handles, old):
            if o is not None:
                put(o)


_CACHE_ATTR = "_jaxinv_security_cache"  # compiled maps kept on the model's own (identity-hashed) stage objects


def _cache_of(obj) -> dict:
    """A per-object cache that lives and dies with ``obj`` (a stage or structure of a traced model)."""
    c = getattr(obj, _CACHE_ATTR, None)
    if c is None:
        c = {}
        setattr(obj, _CACHE_ATTR, c)
    return c


class _Maps:
    r"""One layer's linear maps, batched and compiled once: :math:`v\mapsto A v` (masked to the rows in use),
    :math:`y\mapsto A^\top y` and :math:`v\mapsto B(v;\delta)`.

    :math:`A v` is the tangent of the layer's map at ``u`` (``jax.jvp``), :math:`B(v;\delta)` the tangent of the
    cotangent of its parameters (``jax.vjp``), flattened and concatenated: for a layer (``u = 0``, its kernel) the
    layer's own convolution / matmul, so applied to a unit vector they return the matrix entries exactly; for a block
    (:mod:`jaxinv.engine._block`: its input ``u``, all its parameters) the linearisation of its nonlinear system, determined
    where it has full column rank. Inputs are given as rows of a float32 array; :meth:`apply` returns float64 columns.
    """

    def __init__(self, stage: Stage, leaves, delta, mask, u=None):
        self.shape = tuple(stage.nodes.x_in.shape)
        self.out_shape = tuple(stage.nodes.z.shape)
        block = stage.nodes.kind == "block"
        idx = stage.nodes.leaves if block else (stage.nodes.kernel_leaf,)
        self.dtype = jnp.result_type(leaves[idx[0]])
        shape, dtype = self.shape, self.dtype
        u = jnp.zeros(shape, dtype) if u is None else jnp.asarray(u, dtype).reshape(shape)

        def fwd(leaves, second, v):
            mask, u = second
            t = jax.jvp(lambda x: stage.affine(x, leaves), (u,), (v.reshape(shape).astype(dtype),))[1]
            return (t if mask is None else t * mask).reshape(-1)

        def fwd_t(leaves, second, y):
            f = lambda v: fwd(leaves, second, v)  # noqa: E731
            return jax.linear_transpose(f, jax.ShapeDtypeStruct((math.prod(shape),), dtype))(y)[0]

        def grad(leaves, second, v):
            delta, u = second

            def b(x):  # B(x; delta) (+ B(0; delta) for a layer: its kernel gradient is affine in x)
                def aff(*ws):
                    lv = list(leaves)
                    for i, w in zip(idx, ws):
                        lv[i] = w
                    return stage.affine(x, lv)

                gs = jax.vjp(aff, *(leaves[i] for i in idx))[1](delta.astype(dtype))
                return jnp.concatenate([g_.reshape(-1) for g_ in gs])

            return jax.jvp(b, (u,), (v.reshape(shape).astype(dtype),))[1]  # its linear part

        self.stage, self._leaves, self._mask, self._delta = stage, list(leaves), (mask, u), (delta, u)
        cache = _cache_of(stage)  # compiled once per layer of a model
        if "maps" not in cache:
            raw = {"fwd": fwd, "fwd_t": fwd_t, "grad": grad}
            cache["maps"] = {name: jax.jit(jax.vmap(f, in_axes=(None, None, 0))) for name, f in raw.items()}
        self._fns = cache["maps"]
        self.n = math.prod(shape)
        self.m_total = math.prod(self.out_shape)
        self.p = int(sum(np.size(leaves[i]) for i in idx))
        self.chunk = int(min(512, 2 ** int(math.log2(max(1.0, 4e6 / max(self.n, self.m_total, self.p))))))

    def apply(self, which: str, vecs: Callable, k: int) -> np.ndarray:
        """Apply map ``which`` to ``k`` vectors; ``vecs(start, stop)`` returns rows ``start..stop``."""
        f = self._fns[which]
        second = self._delta if which == "grad" else self._mask
        cols, size = [], self.chunk
        for s in range(0, k, size):
            blk = np.asarray(vecs(s, min(s + size, k)), np.float32)
            pad = size - blk.shape[0]
            if pad:
                blk = np.concatenate([blk, np.zeros((pad,) + blk.shape[1:], blk.dtype)])
            out = np.asarray(f(self._leaves, second, jnp.asarray(blk)), np.float64)
            cols.append(out[: size - pad])
        if not cols:
            size_out = {"fwd": self.m_total, "fwd_t": self.n, "grad": self.p}[which]
            return np.zeros((size_out, 0))
        return np.concatenate(cols, 0).T

    def one(self, which: str, v: np.ndarray) -> np.ndarray:
        """Apply map ``which`` to one vector, through the batched map (the chunk bounds the padded work, and no
        second compilation is needed)."""
        return self.apply(which, lambda s, t: np.asarray(v, np.float32).reshape(1, -1), 1)[:, 0]


def _units(idx: np.ndarray, n: int) -> Callable:
    """``vecs`` for :meth:`_Maps.apply`: the unit vectors ``e_i`` for ``i`` in ``idx``."""

    def vecs(s, t):
        e = np.zeros((t - s, n), np.float32)
        e[np.arange(t - s), idx[s:t]] = 1.0
        return e

    return vecs


@dataclasses.dataclass(frozen=True)
class _Rank:
    """Numerical rank of a matrix: from pivoted Cholesky (``dpstrf``) of its Gram matrix, or pivoted QR."""

    rank: int
    size: int
    perm: np.ndarray  # pivot order (0-based)
    factor: np.ndarray | None  # (size, rank): P^T G P = L L^T restricted to the first `rank` columns (Cholesky)
    last: float  # last accepted pivot (squared singular-value scale)
    rejected: float  # largest rejected pivot (squared scale; 0 when full rank)
    basis: np.ndarray | None = None  # orthonormal basis of the row space (pivoted-QR path)


def _pstrf(G: np.ndarray, lam_tol: float) -> _Rank:
    n = G.shape[0]
    if n == 0:
        return _Rank(0, 0, np.zeros(0, int), np.zeros((0, 0)), math.inf, 0.0)
    c, piv, r, info = lapack.dpstrf(np.asarray(G, np.float64, order="F"), tol=lam_tol, lower=1)
    if info < 0:  # pragma: no cover
        raise RuntimeError(f"dpstrf failed (info={info})")
    piv = np.asarray(piv) - 1
    L = np.tril(c)[:, :r]
    d = np.diag(c)[:r] ** 2
    rej = 0.0
    if r < n:
        rem = np.diag(G)[piv[r:]] - np.sum(L[r:] ** 2, axis=1)
        rej = float(max(rem.max(), 0.0))
    if r == 0:
        rej = float(max(np.diag(G).max(), 0.0))
    return _Rank(int(r), n, piv, L, float(d.min()) if r else 0.0, rej)


_QR_MAX = 3000  # largest side refined by pivoted QR when the Gram pivots leave the decision ambiguous


def _gram_tol(N: int, tol: float = RANK_TOL) -> float:
    r"""Effective singular-value threshold of the Gram path: the nominal tolerance, raised above the rounding
    noise of a float64 Gram matrix of side ``N`` (about :math:`\sqrt{N\varepsilon_{64}}` relative)."""
    return max(tol, 10.0 * math.sqrt(max(N, 1) * np.finfo(np.float64).eps))


def _gram_rank(R, tol: float = RANK_TOL, G: np.ndarray | None = None) -> tuple[_Rank, str]:
    """Rank of ``R`` (dense or sparse, balanced: largest singular value about 1).

    Pivoted Cholesky of the Gram matrix ``G`` of the smaller side (computed if not given) with threshold
    :func:`_gram_tol`. When a pivot lands in the ambiguous zone (accepted ones below ten times, or rejected ones
    above a third of the threshold), the decision is redone by pivoted QR of ``R`` itself at the nominal tolerance
    (no squaring of the condition number; sides up to :data:`_QR_MAX`).
    """
    rows, cols = R.shape
    N = min(rows, cols)
    side = "rows" if rows <= cols else "cols"
    if G is None:
        G = R @ R.T if side == "rows" else R.T @ R
        G = G.toarray() if sp.issparse(G) else G
    teff = _gram_tol(N, tol)
    rk = _pstrf(G, teff**2)
    acc, rej = _sqrt(rk.last), _sqrt(rk.rejected)
    clean = (rk.rank == 0 or acc >= 10 * teff) and rej <= teff / 3
    if clean or N > _QR_MAX or N == 0:
        return rk, side
    Rd = R.toarray() if sp.issparse(R) else np.asarray(R)
    Q, T, piv = sla.qr(Rd.T, mode="economic", pivoting=True)
    d = np.abs(np.diag(T))
    r = int(np.sum(d > tol))
    return _Rank(r, N, np.asarray(piv), None, float(d[r - 1] ** 2) if r else 0.0,
                 float(d[r] ** 2) if r < d.size else 0.0, Q[:, :r]), "basis"


def _smin(rk: _Rank) -> float:
    """Estimate of the smallest nonzero singular value behind a rank decision."""
    if rk.rank == 0:
        return 0.0
    if rk.factor is None:
        return _sqrt(rk.last)
    return _sigma_min_lower(rk.factor[: rk.rank, : rk.rank])


def _row_space_energy(R: np.ndarray, rk: _Rank, side: str, Y: np.ndarray) -> np.ndarray:
    r""":math:`\|P_{\mathrm{row}(R)}\, y\|^2` for the columns ``y`` of ``Y``, from the pivoted factor of ``R``'s
    Gram matrix."""
    if rk.rank == 0 or Y.size == 0:
        return np.zeros(Y.shape[1])
    if side == "basis":  # orthonormal basis of row(R) from pivoted QR
        w = rk.basis.T @ Y
        return np.sum(w * w, axis=0)
    L11 = rk.factor[: rk.rank, : rk.rank]
    if side == "rows":  # G = R R^T: the pivot rows R_I span row(R) and R_I R_I^T = L11 L11^T
        RI = R[rk.perm[: rk.rank]]
        w = sla.solve_triangular(L11, RI @ Y, lower=True)
        return np.sum(w * w, axis=0)
    # G = R^T R (cols): row(R) = row(U P^T) with U = L^T; project with U U^T = Lu Lu^T
    U = np.zeros((rk.rank, rk.size))
    U[:, rk.perm] = rk.factor.T
    Lu = np.linalg.cholesky(U @ U.T)
    w = sla.solve_triangular(Lu, U @ Y, lower=True)
    return np.sum(w * w, axis=0)


def _sigma_min_lower(L11: np.ndarray) -> float:
    """Smallest singular value of a triangular factor (a few steps of inverse iteration; an estimate)."""
    r = L11.shape[0]
    if r == 0:
        return 0.0
    v = np.cos(np.arange(r) * 1.618) + 1.0
    v /= np.linalg.norm(v)
    s = 0.0
    for _ in range(8):
        w = sla.solve_triangular(L11, v, lower=True)
        w = sla.solve_triangular(L11, w, lower=True, trans="T")
        nw = np.linalg.norm(w)
        if not np.isfinite(nw) or nw == 0:
            return 0.0
        s = 1.0 / math.sqrt(nw)
        v = w / nw
    return s


def _np_norm2(A, iters: int = 40) -> float:
    """Spectral norm of a dense or sparse matrix (exact below 300 columns, else power iteration)."""
    if A.shape[0] == 0 or A.shape[1] == 0:
        return 0.0
    if min(A.shape) <= 300 and not sp.issparse(A):
        return float(np.linalg.norm(np.asarray(A, np.float64), 2))
    v = np.cos(np.arange(A.shape[1]) * 1.618) + 1.0
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(iters):
        w = A.T @ (A @ v)
        lam = float(np.linalg.norm(w))
        if lam == 0.0:
            return 0.0
        v = w / lam
    return math.sqrt(lam)


def _mf_norm(maps: "_Maps", iters: int = 30) -> float:
    """Spectral norm of the forward block, matrix-free (for layers too large to materialise)."""
    v = np.cos(np.arange(maps.n) * 1.618) + 1.0
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(iters):
        w = maps.one("fwd_t", maps.one("fwd", v))
        lam = float(np.linalg.norm(w))
        if lam == 0.0:
            return 0.0
        v = w / lam
    return math.sqrt(lam)


# ============================================================================================ per layer
@dataclasses.dataclass(frozen=True)
class LayerSecurity:
    r"""The linear system of one layer, as the shared gradient poses it.

    All singular values are those of the *balanced* operator :math:`[A/\|A\|_2;\ B/\|B\|_2]` (the system
    :func:`jaxinv.copa` solves), so ``sigma_max`` is between 1 and :math:`\sqrt 2`.

    Attributes:
        index, path, kind, activation: the layer (input layer first), its kernel path, ``conv``/``dense`` and the
            activation after it.
        role: ``hidden`` or ``head`` (the last layer: solved from its gradient rows alone, since :math:`z_L` is
            unknown; it is not part of the COPA index).
        unknowns: :math:`n`, entries of the layer's input :math:`x_{l-1}` (unpadded).
        forward_rows: :math:`m`, forward rows used (output units; only the active units after a ReLU; 0 for the head).
        gradient_rows: :math:`p`, entries of the kernel gradient.
        padding_rows: pad entries of the input (the COPA authors' identity rows; unknowns + padding_rows is their
            padded unknown count).
        uncovered: input entries no convolution window reaches (no row sees them: always in the null space).
        rank, deficiency: numerical rank of the stacked operator and :math:`d = n - \mathrm{rank}`.
        sigma_min, sigma_max: smallest nonzero and largest singular value; ``sigma_kind`` says how exact
            ``sigma_min`` is: ``lower bound`` (certified: the gradient block alone, e.g. :math:`\delta\otimes I`),
            ``estimate`` (inverse iteration on a Cholesky factor; for a layer whose forward block alone has full rank,
            the forward block's value, which bounds the stacked one from below) or ``not computed`` (tile
            certificate).
        gap: (smallest accepted, largest rejected) singular value estimates at the rank decision (pivoted
            Cholesky pivots); a wide gap means the integer is robust.
        forward_rank, forward_deficiency, forward_sigma_min: the same for the forward block alone
            (``forward_sigma_min`` is :math:`1/\mathrm{cond}` of the forward block on its row space).
        lost_energy: expected fraction of :math:`\|x_{l-1}\|^2` in the null space of the stacked operator (what a
            minimum-norm least-squares solve cannot recover even from exact data), averaged over natural-image probes
            (random fields with a :math:`1/f` amplitude spectrum, see :func:`natural_probes`) pushed through the
            layers below.
        lost_energy_input: the same for the analysed input (the random draw, or the reconstruction when the
            gradient is given: 0 at the input layer by construction, since the attack's solution has no null part).
        inverse_gain: how much the inverse of the activation after this layer amplifies a relative error of its
            output into its pre-activation (1 for identity; large for saturated tanh or a leaky ReLU's small slope):
            :math:`g = \mathrm{rms}(x)\,\sqrt{\mathrm{mean}(1/s'(z)^2)}/\mathrm{rms}(z)` over the probes.
        method: how the rank was obtained; ``exact`` is False only for counting estimates on very large layers.
        seconds: wall time of this layer's analysis.
        noise_gain: with a ``defence`` (:func:`security`): the RMS change of this layer's reconstructed input per
            unit RMS change the defence makes to the gradient entries (NaN without a defence).
    """

    index: int
    path: str
    kind: str
    role: str
    activation: str
    unknowns: int
    forward_rows: int
    gradient_rows: int
    padding_rows: int
    uncovered: int
    rank: int
    deficiency: int
    sigma_min: float
    sigma_max: float
    sigma_kind: str
    gap: tuple[float, float]
    forward_rank: int
    forward_deficiency: int
    forward_sigma_min: float
    lost_energy: float
    lost_energy_input: float
    inverse_gain: float
    method: str
    exact: bool
    seconds: float
    noise_gain: float = float("nan")

    @property
    def rank_deficit(self) -> int:
        """COPA's :math:`\\mathrm{rank} - n \\le 0` (the same with or without the padding rows)."""
        return self.rank - self.unknowns

    @property
    def determined(self) -> bool:
        return self.deficiency == 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gap"] = list(self.gap)
        d["rank_deficit"] = self.rank_deficit
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclasses.dataclass
class _LayerData:
    """One layer of the representative pass: its stage, input, pre-activation gradient and row mask."""

    stage: Stage
    x_in: jax.Array  # (1, *in_shape)
    z: jax.Array
    delta: jax.Array
    x_out: jax.Array
    role: str
    probes: np.ndarray  # (P, *in_shape[1:]): this layer's inputs for the natural-image probes
    gain: float  # activation inverse gain at this layer's output (see LayerSecurity.inverse_gain)


def _conv_axes(stage: Stage, leaves) -> tuple[int, tuple[int, ...], int] | None:
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


@dataclasses.dataclass(frozen=True)
class _Block:
    """Rank result of one (balanced) block or stacked system."""

    rank: int
    sigma_min: float
    sigma_kind: str
    gap: tuple[float, float]
    method: str
    exact: bool = True


def _sqrt(v: float) -> float:
    return math.sqrt(max(v, 0.0)) if math.isfinite(v) else v


def _banded_from_sparse(G: sp.spmatrix) -> tuple[np.ndarray, int]:
    """Upper banded storage of a symmetric sparse matrix (``scipy.linalg.cholesky_banded`` layout)."""
    G = sp.triu(G, format="coo")
    u = int((G.col - G.row).max()) if G.nnz else 0
    ab = np.zeros((u + 1, G.shape[0]))
    ab[u + G.row - G.col, G.col] = G.data
    return ab, u


def _banded_certificate(G: sp.spmatrix, lam_tol: float) -> tuple[bool, float]:
    """Full rank of a sparse banded PSD Gram matrix by banded Cholesky; also its smallest eigenvalue (inverse
    iteration with the factor). Returns ``(positive definite beyond lam_tol, lambda_min estimate)``."""
    ab, _ = _banded_from_sparse(G)
    try:
        cb = sla.cholesky_banded(ab, lower=False, check_finite=False)
    except np.linalg.LinAlgError:
        return False, 0.0
    n = G.shape[0]
    v = np.cos(np.arange(n) * 1.618) + 1.0
    v /= np.linalg.norm(v)
    lam = math.inf
    for _ in range(25):
        w = sla.cho_solve_banded((cb, False), v, check_finite=False)
        nw = np.linalg.norm(w)
        lam_new = 1.0 / nw
        v = w / nw
        if abs(lam_new - lam) <= 1e-3 * lam_new:
            lam = lam_new
            break
        lam = lam_new
    # inverse iteration converges to lambda_min from above: confirm with the Rayleigh quotient residual
    return bool(lam > lam_tol), float(lam)


def _conv_geometry(maps: "_Maps", axes) -> dict | None:
    """Strides, padding, dilation and receptive-field extent per spatial axis of a plain convolution of the layer
    input, and the output layout (``None`` when the convolution dilates its input)."""
    if axes is None:
        return None
    prm = maps.stage.nodes.bilinear.params
    if any(int(v) != 1 for v in prm.get("lhs_dilation", (1,))):
        return None
    dn = prm["dimension_numbers"]
    kernel = maps._leaves[maps.stage.nodes.kernel_leaf]
    ch, spatial, _ = axes
    ks = tuple(int(kernel.shape[a]) for a in dn.rhs_spec[2:])
    dil = tuple(int(v) for v in prm["rhs_dilation"])
    return {
        "spatial": spatial, "ch": ch, "N": tuple(int(maps.shape[a]) for a in spatial),
        "s": tuple(int(v) for v in prm["window_strides"]), "lo": tuple(int(lo) for lo, _ in prm["padding"]),
        "d": dil, "e": tuple((k - 1) * d + 1 for k, d in zip(ks, dil)),
        "out_spatial": tuple(int(a) for a in dn.out_spec[2:]), "out_ch": int(dn.out_spec[1]),
    }


def _probe_forward(maps: "_Maps", geom: dict, key: int) -> sp.csr_matrix | None:
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
    C_out = out_shape[geom["out_ch"]]
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
        o1, o2 = np.nonzero(u1[:, None] >= 0)[0], None
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
        del o1, o2
    if not rows:
        return None
    A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(maps.m_total, n))
    x = np.random.default_rng(key).standard_normal(n)
    want = maps.one("fwd", x)
    if np.linalg.norm(A @ x - want) > 1e-5 * (np.linalg.norm(want) + 1e-30):
        return None
    return A


@dataclasses.dataclass
class _Forward:
    """The forward block: its rank result, which inputs it reaches, its norm and (when small enough) its matrix."""

    block: _Block
    covered: np.ndarray  # bool (n,)
    a_norm: float
    A: sp.csr_matrix | None  # (active rows, n), unscaled exact entries; None when not materialised


def _forward_block(maps: _Maps, active: np.ndarray, axes, layer, key: int) -> _Forward:
    r"""Rank of the forward block :math:`A/\|A\|` alone (rows: the ``active`` outputs; columns: all inputs)."""
    n, m = maps.n, int(active.sum())
    act_idx = np.flatnonzero(active)
    if m == 0:
        return _Forward(_Block(0, 0.0, "exact", (0.0, 0.0), "no forward rows"), np.zeros(n, bool), 0.0, None)
    if n >= _TILE_MIN or m * n > _MATERIALISE_MAX:
        r = np.random.default_rng(key).standard_normal(maps.m_total) * active
        covered = maps.one("fwd_t", r) != 0
        a_norm = _mf_norm(maps)
        n_c = int(covered.sum())
        if axes is not None and m >= n_c:
            cert = _tile_certificate(maps, covered, axes, layer, a_norm)
            if cert is not None:
                return _Forward(cert, covered, a_norm, None)
        blk = _Block(min(m, n_c), math.nan, "estimate", (math.nan, math.nan), "counting estimate (too large)", False)
        return _Forward(blk, covered, a_norm, None)
    A = None
    geom = _conv_geometry(maps, axes)
    if geom is not None and min(m, n) > 64:
        A = _probe_forward(maps, geom, key)
        if A is not None:
            A = A[act_idx]
    if A is None and n <= m:
        A = sp.csr_matrix(maps.apply("fwd", _units(np.arange(n), n), n)[act_idx])
    elif A is None:
        A = sp.csr_matrix(maps.apply("fwd_t", _units(act_idx, maps.m_total), m).T)
    covered = np.asarray(abs(A).sum(axis=0)).reshape(-1) > 0
    a_norm = _np_norm2(A)
    n_c = int(covered.sum())
    side = min(m, n_c)
    S = A[:, np.flatnonzero(covered)] / a_norm
    if side <= _DENSE_SMALL:
        Sd = S.toarray() if S.nnz > 0.02 * m * n_c or m * n_c <= 4e6 else S
        rk, _ = _gram_rank(Sd)
        return _Forward(_fwd_block_from(rk, "dense Gram"), covered, a_norm, A)
    G = (S.T @ S if m >= n_c else S @ S.T).tocsr()
    u = _banded_from_sparse(G)[1]
    if side * (u + 1) ** 2 <= _BANDED_FLOPS:
        ok, lam = _banded_certificate(G, (3 * _gram_tol(side)) ** 2)
        if ok:
            blk = _Block(side, _sqrt(lam), "estimate", (_sqrt(lam), 0.0), "banded Cholesky certificate")
            return _Forward(blk, covered, a_norm, A)
    if side <= _DENSE_MAX:
        rk, _ = _gram_rank(S, G=G.toarray())
        return _Forward(_fwd_block_from(rk, "dense Gram"), covered, a_norm, A)
    blk = _Block(side, math.nan, "estimate", (math.nan, math.nan), "counting estimate (too large)", False)
    return _Forward(blk, covered, a_norm, A)


def _fwd_block_from(rk: _Rank, what: str) -> _Block:
    how = "pivoted QR" if rk.factor is None else "pivoted Cholesky"
    return _Block(rk.rank, _smin(rk), "estimate", (_sqrt(rk.last), _sqrt(rk.rejected)), f"{what}, {how}")


def _null_basis(G: np.ndarray, lam_tol: float) -> np.ndarray:
    """Orthonormal basis of the numerical null space of a PSD Gram matrix (pivoted Cholesky, then QR)."""
    rk = _pstrf(G, lam_tol)
    n, r = G.shape[0], rk.rank
    if r == n:
        return np.zeros((n, 0))
    L11, L21 = rk.factor[:r], rk.factor[r:]
    # P^T G P = [L11; L21][L11; L21]^T, so the null space is P [-L11^{-T} L21^T; I]
    top = -sla.solve_triangular(L11, L21.T, lower=True, trans="T") if r else np.zeros((0, n - r))
    N = np.zeros((n, n - r))
    N[rk.perm[:r]] = top
    N[rk.perm[r:]] = np.eye(n - r)
    return np.linalg.qr(N)[0]


def _tile_certificate(maps: _Maps, covered: np.ndarray, axes, layer, a_norm: float) -> _Block | None:
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
    kernel = maps._leaves[maps.stage.nodes.kernel_leaf]
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
                Nb = _null_basis(G, _gram_tol(G.shape[0]) ** 2)
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
            return _Block(int(covered.sum()), math.nan, "not computed", (math.nan, 0.0),
                          f"tile certificate ({len(cache)} tile classes of {T} inputs)")
    return None


def _kron_gradient(maps: _Maps, axes, kshape, key: int):
    r"""The per-channel gradient matrix :math:`B_0` of a convolution, with a probe check of
    :math:`B = I_{C}\otimes B_0`. Returns ``(B0 (rows, pixels), pixel index table (pixels, C))`` or ``None``."""
    ch, spatial, kin = axes
    shape = maps.shape
    n = maps.n
    C = shape[ch]
    idx = np.arange(n).reshape(shape).transpose((0,) + spatial + (ch,)).reshape(-1, C)  # [pixel, channel]
    hw = idx.shape[0]
    G = maps.apply("grad", _units(idx[:, 0], n), hw)  # (p, hw): flattened kernels
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


def _stacked_sigma_max(Aop: Callable, Bop: Callable, n: int, iters: int = 30) -> float:
    """Largest singular value of the balanced stacked operator (power iteration on its normal matrix)."""
    v = np.cos(np.arange(n) * 1.618) + 1.0
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(iters):
        w = Aop(v) + Bop(v)
        lam = float(np.linalg.norm(w))
        if lam == 0.0:
            return 0.0
        v = w / lam
    return math.sqrt(lam)


def _stacked_conv(maps: _Maps, fw: _Forward, axes, kshape, X: np.ndarray, key: int):
    r"""Rank, deficiency and lost energy of a convolution's stacked system through
    :math:`\ker B = \ker B_0\otimes\mathbb R^C`. Returns ``(block, lost_fraction, sigma_max)`` or ``None`` when the
    layer is not a plain convolution of its input (then the generic path is used)."""
    kb = _kron_gradient(maps, axes, kshape, key)
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
        blk = _Block(n, b_min, "lower bound", (b_min, 0.0), "gradient block full rank (I (x) B0)")
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
    rk, side = _gram_rank(R)
    d = q - rk.rank
    # coordinates of each x in ker B, ordered (channel, basis vector) like `lift`
    Y = np.einsum("hz,hcp->czp", Z, X[idx]).reshape(q, -1)
    lost = np.maximum(np.sum(Y * Y, axis=0) - _row_space_energy(R, rk, side, Y), 0.0) / energy
    smin_r = _smin(rk) if rk.rank else math.inf
    smin = min(b_min, smin_r) if r0 else smin_r
    blk = _Block(n - d, smin, "estimate", (_sqrt(min(rk.last, b_min**2)), _sqrt(rk.rejected)),
                 f"ker B0 reduction ({R.shape[0]}x{q}, {'pivoted QR' if rk.factor is None else 'Gram'} {rk.size})")
    return blk, lost, smax


def _stacked_generic(maps: _Maps, fw: _Forward, X: np.ndarray):
    """Generic path: materialise both blocks (small layers only) and take the Gram rank."""
    n = maps.n
    A = fw.A.toarray() if fw.A is not None else np.zeros((0, n))
    B = maps.apply("grad", _units(np.arange(n), n), n)
    b_norm = _np_norm2(B)
    M = np.vstack([A / (fw.a_norm or 1.0), B / (b_norm or 1.0)])
    M = M[np.any(M != 0, axis=1)]
    rk, side = _gram_rank(M)
    energy = np.maximum(np.sum(X * X, axis=0), 1e-300)
    lost = np.maximum(np.sum(X * X, axis=0) - _row_space_energy(M, rk, side, X), 0.0) / energy
    smin = _smin(rk)
    blk = dataclasses.replace(_fwd_block_from(rk, "dense stacked Gram"), sigma_min=smin)
    return blk, lost, _np_norm2(M)


def _padding_entries(stage: Stage, axes) -> int:
    L = stage.layer
    if L.kind != "conv" or not L.padding or axes is None:
        return 0
    shape = stage.nodes.x_in.shape
    ch, spatial, _ = axes
    padded = math.prod(shape[a] + max(lo, 0) + max(hi, 0) for a, (lo, hi) in zip(spatial, L.padding))
    return (padded - math.prod(shape[a] for a in spatial)) * shape[ch]


def _dense_gradient_is_outer(maps: _Maps, delta: np.ndarray, key: int) -> bool:
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


def _analyse_layer(ld: _LayerData, leaves, key: int) -> LayerSecurity:
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
    maps = _Maps(st, leaves, ld.delta, mask, ld.x_in if block else None)
    n, p = maps.n, maps.p
    active = np.ones(maps.m_total, bool) if mask is None else np.asarray(mask).reshape(-1) > 0
    axes = _conv_axes(st, leaves) if L.kind == "conv" else None
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
        blk = _Block(n, 1.0, "lower bound", (1.0, 0.0), "dense gradient delta x^T: full column rank")
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
        if axes is not None and has_delta and n < _TILE_MIN:
            res = _stacked_conv(maps, fw, axes, L.kernel_shape, X, key)
        if res is None and n <= _DENSE_MAX and (m + p) * n <= _MATERIALISE_MAX:
            res = _stacked_generic(maps, fw, X)
        if res is not None:
            blk, lost, smax = res
        else:  # counting only: an upper bound on the rank
            r = min(int(covered.sum()), fw.block.rank + (p if has_delta else 0))
            blk = _Block(r, math.nan, "estimate", (math.nan, math.nan), "counting estimate (too large)", False)
            lost, smax = np.full(X.shape[1], (n - r) / n), math.sqrt(2.0)
    rank = int(blk.rank)
    return LayerSecurity(
        index=L.index, path=L.path, kind=L.kind, role=ld.role, activation=L.activation, unknowns=n,
        forward_rows=0 if head else m, gradient_rows=p, padding_rows=_padding_entries(st, axes),
        uncovered=int(n - covered.sum()) if m else 0, rank=rank, deficiency=n - rank,
        sigma_min=float(blk.sigma_min) if rank else 0.0, sigma_max=float(smax), sigma_kind=blk.sigma_kind,
        gap=(float(blk.gap[0]), float(blk.gap[1])), forward_rank=int(fw.block.rank),
        forward_deficiency=n - int(fw.block.rank), forward_sigma_min=float(fw.block.sigma_min),
        lost_energy=float(np.mean(lost[1:])) if lost.size > 1 else float(lost[0]),
        lost_energy_input=float(lost[0]), inverse_gain=float(ld.gain), method=blk.method,
        exact=bool(blk.exact), seconds=time.perf_counter() - t0,
    )


def _head_block(maps: _Maps, axes, L, key, has_delta) -> _Block:
    """The head's system: gradient rows alone (its pre-activation is what the attack does not know)."""
    n = maps.n
    if not has_delta:
        return _Block(0, 0.0, "exact", (0.0, 0.0), "zero gradient at the head")
    if axes is not None:
        kb = _kron_gradient(maps, axes, L.kernel_shape, key)
        if kb is not None:
            s = np.linalg.svd(kb[0], compute_uv=False)
            s = s / s[0]
            r0 = int(np.sum(s > RANK_TOL))
            return _Block(r0 * kb[1].shape[1], float(s[r0 - 1]), "exact", (float(s[r0 - 1]), 0.0),
                          "head: gradient rows I (x) B0")
    if n <= _DENSE_MAX and n * maps.p <= _MATERIALISE_MAX:
        B = maps.apply("grad", _units(np.arange(n), n), n)
        rk, _ = _gram_rank(B / (_np_norm2(B) or 1.0))
        return _Block(rk.rank, _sqrt(rk.last), "estimate", (_sqrt(rk.last), _sqrt(rk.rejected)), "head: dense Gram")
    return _Block(n, math.nan, "estimate", (math.nan, math.nan), "head: counting estimate", False)


# ================================================================================== representative pass
def natural_probes(key, input_shape: tuple[int, ...], n: int = 4) -> np.ndarray:
    r"""``n`` synthetic natural-looking images in ``[0, 1]``: Gaussian random fields with a :math:`1/f` amplitude
    spectrum (the second-order statistics of photographs), a shared luminance field plus weaker per-channel colour
    fields, scaled to mean 0.45 and standard deviation 0.22 and clipped. Inputs that are not ``(H, W, C)`` images
    get uniform noise. Used to measure how much of a *typical image's* energy a layer's null space holds."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                           else key).astype(np.uint64).tolist())
    if len(input_shape) != 3:
        return rng.uniform(0, 1, (n,) + tuple(input_shape)).astype(np.float32)
    H, W, C = input_shape
    fy = np.fft.fftfreq(H)[:, None]
    fx = np.fft.fftfreq(W)[None, :]
    amp = 1.0 / np.maximum(np.sqrt(fy**2 + fx**2), 1.0 / max(H, W))
    amp[0, 0] = 0.0

    def field():
        z = rng.standard_normal((H, W)) + 1j * rng.standard_normal((H, W))
        f = np.real(np.fft.ifft2(z * amp))
        return (f - f.mean()) / (f.std() + 1e-12)

    out = np.empty((n, H, W, C), np.float32)
    for i in range(n):
        lum = field()
        for c in range(C):
            img = lum + (0.3 * field() if C > 1 else 0.0)
            img = (img - img.mean()) / (img.std() + 1e-12)
            out[i, :, :, c] = np.clip(0.45 + 0.22 * img, 0.0, 1.0)
    return out


def _inverse_gain(act, z: np.ndarray, x: np.ndarray) -> float:
    r""":math:`\mathrm{rms}(x)\sqrt{\mathrm{mean}(1/s'(z)^2)}/\mathrm{rms}(z)` over the units the inverse uses."""
    d = np.asarray(act.derivative(jnp.asarray(z), jnp.asarray(x)), np.float64)
    use = d > 0 if act.name == "relu" else np.ones_like(d, bool)
    if not np.any(use):
        return 1.0
    d, z, x = d[use], z[use], x[use]
    rz = math.sqrt(float(np.mean(z * z))) or 1.0
    return float(math.sqrt(float(np.mean(x * x))) * math.sqrt(float(np.mean(1.0 / np.maximum(d, 1e-30) ** 2))) / rz)


def _representative_pass(model: Model, structure, leaves, x: jax.Array, label: jax.Array, loss: str,
                         probes: np.ndarray) -> list[_LayerData]:
    r"""Forward and backward pass at one input (every layer's input, pre-activation and :math:`\delta_l`), and
    forward passes of the probe images (every layer's input, and the activations' inverse gains)."""
    from .._gradient import loss_fn

    stages = structure.stages
    n_out = math.prod(stages[-1].nodes.x_out.shape)
    lf = loss_fn(loss, n_out)
    cache = _cache_of(structure)
    if ("pass", loss) not in cache:
        cache[("pass", loss)] = jax.jit(_make_pass(stages, lf))
    run = cache[("pass", loss)]
    xs, zs, deltas, (pins, pzs) = run(list(leaves), x, label, jnp.asarray(probes, x.dtype))
    last = len(stages) - 1
    out = []
    for i, s in enumerate(stages):
        z = np.asarray(pzs[i], np.float64)
        xo = np.asarray(s.activation(pzs[i]), np.float64)
        gain = _inverse_gain(s.activation, z, xo) if i < last else 1.0
        out.append(_LayerData(s, xs[i], zs[i], deltas[i], xs[i + 1], "head" if i == last else "hidden",
                              np.asarray(pins[i]), gain))
    return out


def _make_pass(stages, lf):
    def run(leaves, x, label, probes):
        xs, zs, h = [], [], x
        for s in stages:
            xs.append(h)
            z = s.affine(h, leaves)
            zs.append(z)
            h = s.activation(z)
        xs.append(h)

        def objective(eps):
            h = x
            for s, e in zip(stages, eps):
                h = s.activation(s.affine(h, leaves) + e)
            return lf(h, label.reshape((1,) + label.shape))  # a label, or a mask (segmentation)

        def probe(p):
            ins, pre, h = [], [], p[None]
            for s in stages:
                ins.append(h[0])
                z = s.affine(h, leaves)
                pre.append(z[0])
                h = s.activation(z)
            return ins, pre

        return xs, zs, jax.grad(objective)([jnp.zeros_like(z) for z in zs]), jax.vmap(probe)(probes)

    return run


# ====================================================================================== counting rules
def _axis_counts(N: int, lo: int, hi: int, k: int, s: int, d: int = 1):
    """Per spatial axis: output size, covered input positions, and per stride phase r (taps, covered pixels)."""
    Hp = N + lo + hi
    e = (k - 1) * d + 1
    n_out = (Hp - e) // s + 1 if Hp >= e else 0
    cov = np.zeros(N, bool)
    for o in range(max(n_out, 0)):
        for a in range(k):
            u = s * o + d * a - lo
            if 0 <= u < N:
                cov[u] = True
    phases = []
    for r in range(s):
        taps = sum(1 for a in range(k) if (d * a - lo) % s == r)
        pix = int(np.sum(cov[r::s]))
        phases.append((taps, pix))
    return n_out, int(cov.sum()), phases


def count_conv_rank(spatial: tuple[int, ...], c_in: int, c_out: int, kernel: tuple[int, ...], stride: tuple[int, ...],
                    padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...] | None = None) -> dict:
    r"""Counting prediction of a convolution's stacked rank (generic weights and :math:`\delta`).

    * covered inputs :math:`n_c` (windows never reach the others);
    * forward rank :math:`\min(m, n_c)`;
    * gradient rank :math:`C_\text{in}\,\mathrm{rank}\,B_0` with :math:`B_0` block-diagonal over stride phases:
      phase :math:`r` has :math:`C_\text{out}\cdot\#\text{taps}_r` rows on :math:`\#\text{pixels}_r` columns;
    * the two row spaces share :math:`C_\text{out}^2` rows,
      :math:`\langle\delta_c, A_{c'}x\rangle = \langle W_{c'}, B_c(x)\rangle` for every pair of output channels.

    So :math:`\mathrm{rank} \le \min(n_c,\ \mathrm{rank}A + \mathrm{rank}B - C_\text{out}^2)` (the intersection
    term capped by the smaller block). On every layer of the papers' architectures this bound is the exact rank.
    """
    dilation = dilation or (1,) * len(spatial)
    outs, covs, phase_lists = [], [], []
    for N, k, s, (lo, hi), d in zip(spatial, kernel, stride, padding, dilation):
        o, c, ph = _axis_counts(N, lo, hi, k, s, d)
        outs.append(o)
        covs.append(c)
        phase_lists.append(ph)
    m = c_out * math.prod(outs)
    n = c_in * math.prod(spatial)
    n_c = c_in * math.prod(covs)
    rank_b0 = 0
    for combo in np.ndindex(*[len(p) for p in phase_lists]):
        taps = math.prod(phase_lists[a][r][0] for a, r in enumerate(combo))
        pix = math.prod(phase_lists[a][r][1] for a, r in enumerate(combo))
        rank_b0 += min(c_out * taps, pix)
    rank_a = min(m, n_c)
    rank_b = c_in * rank_b0
    shared = min(c_out * c_out, rank_a, rank_b)
    rank = min(n_c, rank_a + rank_b - shared)
    return {"unknowns": n, "covered": n_c, "forward_rows": m, "gradient_rows": c_in * c_out * math.prod(kernel),
            "forward_rank": rank_a, "gradient_rank": rank_b, "rank": rank, "deficiency": n - rank,
            "out_spatial": tuple(outs)}


# ========================================================================================== the report
@dataclasses.dataclass(frozen=True)
class RGapLayer:
    """One layer of R-GAP's rank analysis by counting (see :func:`rgap_analysis`)."""

    path: str
    unknowns: int  # padded input entries
    gradient_constraints: int
    forward_constraints: int
    virtual_constraints: int  # surplus received from the neighbouring layer (see rgap_analysis)
    deficit: int  # unknowns not covered by constraints (>= 0)
    surplus: int  # constraints beyond the unknowns (passed down)


def rgap_analysis(layers: tuple[LayerSecurity, ...], virtual: str = "input_side") -> tuple[int, tuple[RGapLayer, ...]]:
    r"""R-GAP's rank analysis (Zhu & Blaschko 2021, section "rank analysis"), by counting.

    For every layer the unknowns are the *padded* input (R-GAP solves for it and peels the padding afterwards); the
    constraints are the gradient constraints (one per kernel weight for a convolution; :math:`n` for a dense layer,
    whose gradient :math:`\delta x^\top` has rank :math:`n` in :math:`x`) plus the forward ("weight") constraints,
    one per output unit (none at the head, whose output is unknown). A layer's surplus of constraints over unknowns
    (including what it received) is passed to the next layer as *virtual constraints*; its deficit is
    :math:`\max(0, \text{unknowns} - \text{constraints} - \text{virtual})`, and the index is minus the sum of the
    deficits (0: every layer determined by counting; more negative: harder to attack), the COPA sign convention.

    ``virtual`` says which way the surplus flows. We could not read the paper's text here, so this is our reading:
    ``"input_side"`` (default) passes a layer's surplus to the layer after it, away from the input, with the
    network drawn input on top as in R-GAP's figures. It is the reading that reproduces the paper's own example:
    CNN6 determined, CNN6-d rank-deficient (its second convolution has 3780 constraints for 4332 padded unknowns).
    ``"output_side"`` passes surplus from the head toward the input (then CNN6-d counts as determined, since its
    third convolution has a surplus of 6976); ``"none"`` uses no virtual constraints. ``benchmarks/bench_security.py``
    reports all three against measured attacks.
    """
    if virtual not in ("input_side", "output_side", "none"):
        raise ValueError(f"virtual must be 'input_side', 'output_side' or 'none', got {virtual!r}")
    order = range(len(layers)) if virtual != "output_side" else reversed(range(len(layers)))
    rows: dict[int, RGapLayer] = {}
    surplus, total = 0, 0
    for i in order:
        r = layers[i]
        U = r.unknowns + r.padding_rows
        g = r.unknowns if r.kind == "dense" else r.gradient_rows
        f = 0 if r.role == "head" else r.forward_rows
        v = surplus if virtual != "none" else 0
        have = g + f + v
        deficit = max(0, U - have)
        surplus = max(0, have - U)
        total += deficit
        rows[i] = RGapLayer(r.path, U, g, f, v, deficit, surplus)
    return -total, tuple(rows[i] for i in range(len(layers)))


def copa_index(layers: tuple[LayerSecurity, ...]) -> int:
    r"""The COPA authors' index: :math:`\sum_{i=0}^{L-2}\mathrm{round}\big(\mathrm{rank\_deficit}_i\,
    \frac{L-i-1}{L-1}\big)` over the layers below the head (input first), with :math:`L` the number of weight layers
    including the head and :math:`\mathrm{rank\_deficit}_i = \mathrm{rank}_i - n_i \le 0`. Python's ``round``
    (half to even), as the authors' code."""
    L = len(layers)
    if L < 2:
        return 0
    return int(sum(round(r.rank_deficit * (L - i - 1) / (L - 1)) for i, r in enumerate(layers[: L - 1])))


@dataclasses.dataclass(frozen=True)
class Advice:
    """One piece of advice: a layer, a change, and its predicted effect.

    ``predicted_copa_index`` / ``predicted_deficiency`` come from the counting rules (:func:`count_conv_rank`),
    which reproduce the exact ranks of every layer of the papers' architectures; ``None`` when not applicable.
    """

    layer: str
    change: str
    text: str
    predicted_deficiency: int | None = None
    predicted_copa_index: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SecurityReport:
    r"""How much of a client's input an architecture's gradient gives away (:func:`security`).

    Attributes:
        model: the model's name; ``input_shape``: one input without the batch axis.
        layers: per-layer systems (:class:`LayerSecurity`), input layer first.
        copa_index: the COPA authors' index (0: every layer determined; more negative: more secure).
        rgap_index: R-GAP's counting index with virtual constraints (:func:`rgap_analysis`, input-side reading),
            same sign convention; ``rgap_layers`` its per-layer counts.
        score: predicted PSNR (dB, images in ``[0, 1]``) of the best layer-wise attack on a typical image
            (:func:`predict_psnr`); higher means the model leaks more.
        verdict: ``LEAKS`` (score at least :data:`LEAK_DB` = 30 dB), ``PARTIAL`` (at least :data:`SAFE_DB` = 15 dB)
            or ``RESISTANT``, and one sentence.
        advice: which layer makes the input recoverable or protects it, and which changes move the model toward
            safety, with their predicted effect.
        delta_source: where the per-layer :math:`\delta_l` came from.
        label: the label used (-1 for a segmentation model, whose label is a mask); ``tolerance``: :data:`RANK_TOL`; ``seconds``: wall time.
        defence: the defence the score accounts for (its name), ``None`` for the gradient as shared; then
            ``score_undefended`` is the score without it and ``noise_mse`` the image error the defence adds
            (:func:`noise_propagation`), and each layer's ``noise_gain`` is filled in.
    """

    model: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerSecurity, ...]
    copa_index: int
    rgap_index: int
    rgap_layers: tuple[RGapLayer, ...]
    score: float
    verdict: str
    advice: tuple[Advice, ...]
    delta_source: str
    label: int
    tolerance: float
    seconds: float
    defence: str | None = None
    score_undefended: float = float("nan")
    noise_mse: float = float("nan")

    @property
    def deficiencies(self) -> tuple[int, ...]:
        return tuple(r.deficiency for r in self.layers)

    @property
    def leaks(self) -> bool:
        return self.verdict.startswith("LEAKS")

    def table(self) -> str:
        """A plain-text per-layer table with the indices, the score, the verdict and the advice."""
        head = (f"{'layer':<22} {'kind':<5} {'n':>7} {'m':>7} {'p':>7} {'pad':>5} {'rank':>7} {'def':>6} "
                f"{'fwd def':>7} {'sigma_min':>9} {'lost':>6}  method")
        lines = [f"security of {self.model!r}, input {self.input_shape} (deltas: {self.delta_source})", head,
                 "-" * len(head)]
        for r in self.layers:
            smin = "n/a" if not math.isfinite(r.sigma_min) else f"{r.sigma_min:.1e}"
            lines.append(
                f"{r.path[:22]:<22} {r.kind:<5} {r.unknowns:>7} {r.forward_rows:>7} {r.gradient_rows:>7} "
                f"{r.padding_rows:>5} {r.rank:>7} {r.deficiency:>6} {r.forward_deficiency:>7} {smin:>9} "
                f"{r.lost_energy:>6.3f}  {r.method}{'' if r.exact else ' [estimate]'}"
            )
        lines.append("-" * len(head))
        lines.append(f"COPA index {self.copa_index}   R-GAP index {self.rgap_index}   "
                     f"score (predicted attack PSNR) {self.score:.1f} dB   rank tolerance {self.tolerance:g}")
        if self.defence is not None:
            line = f"under {self.defence}: score {self.score_undefended:.1f} -> {self.score:.1f} dB"
            if math.isfinite(self.noise_mse):
                gains = ", ".join(f"{r.path} x{r.noise_gain:.3g}" for r in self.layers)
                line += f" (image MSE added {self.noise_mse:.2e}); noise gain per layer: {gains}"
            lines.append(line)
        lines.append(f"verdict: {self.verdict}")
        for a in self.advice:
            lines.append(f"  - {a.text}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly (NaN and infinities become ``None``)."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean({
            "model": self.model, "input_shape": list(self.input_shape), "copa_index": self.copa_index,
            "rgap_index": self.rgap_index, "score": self.score, "verdict": self.verdict,
            "advice": [a.to_dict() for a in self.advice], "delta_source": self.delta_source, "label": self.label,
            "tolerance": self.tolerance, "seconds": self.seconds, "defence": self.defence,
            "score_undefended": self.score_undefended, "noise_mse": self.noise_mse,
            "layers": [r.to_dict() for r in self.layers],
            "rgap_layers": [dataclasses.asdict(r) for r in self.rgap_layers],
        })


# ============================================================================================ the score
#: Constants of :func:`predict_psnr`: ``floor`` and ``beta`` (float32 solve floor), ``head`` (closed-form head
#: error), ``gain_cap`` and ``a`` were fitted (least absolute error in dB) on the 27 architectures of the zoo only,
#: against :func:`jaxinv.copa` (LSMR tolerance 1e-8 in float32); ``gamma`` and ``clip`` are fixed. Validation on 24
#: held-out variants (channels, strides, kernels, depth, activations, biases, head widths; 4 real photos each):
#: Spearman 0.93 with the measured PSNR (COPA index 0.86, R-GAP index 0.75); ``benchmarks/bench_security.py``.
SCORE_CONSTANTS = {"floor": 1.6e-7, "beta": 0.44, "head": 6.3e-8, "gain_cap": 22.0, "a": 0.20, "gamma": 0.3,
                   "clip": 1.5}


def predict_psnr(layers: tuple[LayerSecurity, ...], image_energy: float = 0.25, constants: dict | None = None) -> float:
    r"""Predicted PSNR (dB, images in ``[0, 1]``) of the layer-wise attack on a typical image.

    An error-propagation model from the head down, in relative error energies. The head's input is recovered in
    closed form (relative error :math:`\epsilon_h`, fitted: :math:`6\cdot10^{-8}`) up to the energy its gradient rows
    cannot see (:math:`e = f_L + (1 - f_L)\epsilon_h^2`; e.g. a global average pool before the head leaves only
    the channel means). Going down through layer
    :math:`l`:

    .. math::
        u_l = e_l\,\min(g_l, g_\text{cap})^2, \qquad
        T_l = \min\!\Big(c,\ \epsilon_0^2\,\sigma_{\min,l}^{-2\beta} + \min(u_l,\ a\,u_l^{\gamma})\Big), \qquad
        e_{l-1} = f_l + (1 - f_l)\,T_l,

    where :math:`e_l` is the relative error energy of the reconstructed output :math:`x_l` of layer :math:`l`,
    :math:`g_l` the activation inverse's gain (:attr:`LayerSecurity.inverse_gain`: errors of :math:`x_l` become
    errors of the targets :math:`z_l`; capped because a saturated inverse clips), :math:`\sigma_{\min,l}` the
    smallest singular value of the balanced system (a float32 least-squares solve leaves a floor that grows with
    ill-conditioning, sub-linearly since few directions are weak), :math:`u_l^\gamma` the sub-linear transfer of
    *large* target errors (a corrupted upper layer yields a degraded but correlated image, not noise; artanh and
    clipping), :math:`c` the error of a clipped random image, and :math:`f_l` the energy a minimum-norm solve
    cannot see (:attr:`LayerSecurity.lost_energy`). The prediction is
    :math:`-10\log_{10}(e_{-1}\,\overline{x^2})` with :math:`\overline{x^2}` the images' mean square.
    """
    c = dict(SCORE_CONSTANTS, **(constants or {}))
    h = layers[-1]
    f = min(max(h.lost_energy, 0.0), 1.0) if math.isfinite(h.lost_energy) else h.deficiency / h.unknowns
    e2 = f + (1.0 - f) * c["head"] ** 2  # a head that sees only part of its input (e.g. after global pooling)
    for i in reversed(range(len(layers) - 1)):
        r = layers[i]
        s = r.sigma_min if (math.isfinite(r.sigma_min) and r.sigma_min > 0) else 1.0
        u = e2 * min(r.inverse_gain, c["gain_cap"]) ** 2
        T = min(c["clip"], c["floor"] ** 2 * s ** (-2.0 * c["beta"]) + min(u, c["a"] * u ** c["gamma"]))
        f = min(max(r.lost_energy, 0.0), 1.0) if math.isfinite(r.lost_energy) else r.deficiency / r.unknowns
        e2 = f + (1.0 - f) * T
    return float(-10.0 * math.log10(max(e2 * image_energy, 1e-13)))


LEAK_DB = 30.0  # predicted PSNR at and above which the input counts as recoverable
SAFE_DB = 15.0  # below this, no faithful reconstruction is expected from the layer-wise attacks


def _verdict(layers, score: float) -> str:
    defic = [r for r in layers if r.deficiency > 0]
    if score >= LEAK_DB:
        return ("LEAKS: the input is fully recoverable from the gradient (every layer's system is determined; "
                f"predicted reconstruction {score:.0f} dB)")
    if score >= SAFE_DB:
        gain = max((r.inverse_gain for r in layers[:-1]), default=1.0)
        why = (f"{len(defic)} layer(s) are rank-deficient" if defic else
               "every layer is determined, but ill-conditioned systems"
               + (f" and error-amplifying activation inverses (up to {gain:.0f}x)" if gain > 10 else "")
               + " let float32 errors grow on the way down")
        return f"PARTIAL: a recognisable but inexact reconstruction is expected ({score:.0f} dB): {why}"
    head = layers[-1]
    seen = ("the head's input" if head.deficiency == 0 else
            f"{head.rank} of the {head.unknowns} directions of the head's input")
    return (f"RESISTANT: the layer-wise attacks are not expected to reconstruct the input ({score:.0f} dB); "
            f"the gradient still reveals the label and {seen}")


# ============================================================================================ the advice
def _conv_specs(layers) -> list[dict | None]:
    """Shape-level description of the hidden layers for the counting rules (``None``: not a plain NHWC conv)."""
    specs = []
    for L in layers:
        if L.kind == "conv" and len(L.in_shape) == 3 and (L.groups or 1) == 1 and L.kernel_shape[2] == L.in_shape[2]:
            specs.append({"spatial": L.in_shape[:2], "c_in": L.in_shape[2], "c_out": L.kernel_shape[3],
                          "k": L.kernel_shape[:2], "s": L.strides, "pad": L.padding, "dil": L.dilation,
                          "chained_out": True})
        else:
            specs.append(None)
    for i in range(len(layers) - 1):  # does layer i feed layer i+1 directly (same shape)?
        if specs[i] is not None:
            specs[i]["chained_out"] = tuple(layers[i].out_shape) == tuple(layers[i + 1].in_shape)
    return specs


def _predict_index(specs: list[dict | None], base_def: list[int], change: int, new: dict) -> tuple[int, list[int]]:
    """COPA index and deficiencies of the model with ``specs[change]`` replaced by ``new`` (counting rules)."""
    specs = [dict(s) if s is not None else None for s in specs]
    specs[change] = dict(specs[change], **new)
    defs = list(base_def)
    for i in range(change, len(specs)):
        sp_ = specs[i]
        if sp_ is None or (i > change and not specs[i - 1] or (i > change and not specs[i - 1]["chained_out"])):
            break
        c = count_conv_rank(sp_["spatial"], sp_["c_in"], sp_["c_out"], sp_["k"], sp_["s"], sp_["pad"], sp_["dil"])
        defs[i] = c["deficiency"]
        if i + 1 < len(specs) and specs[i + 1] is not None and sp_["chained_out"]:
            specs[i + 1] = dict(specs[i + 1], spatial=c["out_spatial"], c_in=sp_["c_out"])
        elif i + 1 < len(specs) and sp_["chained_out"] is False:
            break
    L = len(specs) + 1  # + the head
    index = int(sum(round(-d * (L - i - 1) / (L - 1)) for i, d in enumerate(defs)))
    return index, defs


def _advice(layers: tuple[LayerSecurity, ...], traced, score: float) -> tuple[Advice, ...]:
    out: list[Advice] = []
    hidden = layers[:-1]
    head = layers[-1]
    defic = [r for r in hidden if r.deficiency > 0]
    if defic:
        worst = max(defic, key=lambda r: (r.lost_energy, -r.index))
        for r in defic:
            out.append(Advice(r.path, "none", (
                f"{r.path} protects the input: {r.deficiency} of the {r.unknowns} directions of its input are "
                "invisible "
                f"to the gradient (rank {r.rank}); a typical input keeps {100 * r.lost_energy:.0f}% of its energy there"
                + (" -- the largest loss" if r is worst and len(defic) > 1 else "")
                + ("; layers below only receive corrupted targets" if r.index > 0 else "")), r.deficiency, None))
    elif hidden:
        r0 = hidden[0]
        how = ("its forward rows alone" if r0.forward_deficiency == 0 else
               f"its gradient rows (the {r0.forward_rows} forward rows alone miss {r0.forward_deficiency} directions)")
        out.append(Advice(r0.path, "none", f"{r0.path} makes the input recoverable: {how} determine all "
                                           f"{r0.unknowns} input values", 0, None))
    if hidden:
        cond = [r for r in hidden if math.isfinite(r.sigma_min) and r.sigma_min > 0]
        if cond:
            w = min(cond, key=lambda r: r.sigma_min)
            if w.sigma_min < 1e-3:
                out.append(Advice(w.path, "none", (
                    f"{w.path} is the worst-conditioned layer (sigma_min {w.sigma_min:.1e}): errors from the layers "
                    "above are amplified there, which limits the attack's precision")))
    gains = [r for r in hidden if r.inverse_gain > 10]
    if gains:
        which = ", ".join(f"{r.activation} after {r.path} ({r.inverse_gain:.0f}x)" for r in gains)
        out.append(Advice(gains[0].path, "activation", (
            f"inverting the activations amplifies reconstruction errors: {which}; errors from any deficient or "
            "ill-conditioned layer above then grow on the way down (this helps privacy; an activation closer to "
            "the identity, e.g. a leaky ReLU with a larger slope, helps the attacker)")))
    # what-ifs by the counting rules
    specs = _conv_specs(traced.layers[:-1])
    base = [r.deficiency for r in hidden]
    base_index = copa_index(layers)
    cands = []
    for i, sp_ in enumerate(specs):
        if sp_ is None:
            continue
        trials = []
        for c_out in sorted({max(1, sp_["c_out"] // 2), max(1, sp_["c_out"] // 4), max(1, sp_["c_out"] - 1)}):
            if c_out < sp_["c_out"]:
                trials.append((f"out_channels {sp_['c_out']} -> {c_out}", {"c_out": c_out}))
        trials.append((f"stride {sp_['s']} -> {tuple(s + 1 for s in sp_['s'])}", {"s": tuple(s + 1 for s in sp_["s"])}))
        if any(lo or hi for lo, hi in sp_["pad"]):
            trials.append(("padding -> 0", {"pad": tuple((0, 0) for _ in sp_["pad"])}))
        trials.append((f"kernel {sp_['k']} -> {tuple(k + 1 for k in sp_['k'])}", {"k": tuple(k + 1 for k in sp_["k"])}))
        for name, new in trials:
            try:
                idx, defs = _predict_index(specs, base, i, new)
            except Exception:  # a change that makes the shapes invalid
                continue
            if any(d < 0 for d in defs):
                continue
            cands.append((idx, i, name, defs))
    cands.sort(key=lambda c: (c[0], c[1]))
    shown, used = 0, set()
    for idx, i, name, defs in cands:  # the most effective change per layer, at most three layers
        if idx >= base_index or shown >= 3 or i in used:
            continue
        used.add(i)
        r = hidden[i]
        out.append(Advice(r.path, name, (
            f"toward safety: {r.path} {name} -> predicted deficiency {defs[i]} of its input "
            f"(now {r.deficiency}), COPA index {idx} (now {base_index}) [counting rules]"), defs[i], idx))
        shown += 1
    if not shown and base_index < 0:
        out.append(Advice("", "none", "no single change to channels, stride, padding or kernel makes the model more "
                                      "deficient by the counting rules"))
    if head.deficiency > 0:
        out.append(Advice(head.path, "head", (
            f"{head.path} protects the input at the head: its gradient rows see only {head.rank} of the "
            f"{head.unknowns} directions of its input (e.g. a global average pool before it keeps only the channel "
            f"means); a typical input keeps {100 * head.lost_energy:.0f}% of its energy there, so the layers below "
            "start from a partial answer")))
    elif head.kind == "dense":
        has_bias = bool(traced.layers[-1].bias)
        out.append(Advice(head.path, "head", (
            "the head's width and bias do not change the ranks: its gradient delta x^T determines its input whenever "
            "delta != 0" + (" (its bias gradient also gives delta_L, hence the label, exactly)" if has_bias else
                            " (without a bias the attack fixes the scale by R-GAP's scalar equation)"))))
    return tuple(out)


# ========================================================================================== entry point
def _check_finite(params):
    for path, leaf in zip(param_paths(params), jax.tree_util.tree_leaves(params)):
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError("jaxinv.security runs eagerly (ranks are integers): call it outside jax.jit / vmap")
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise ValueError(
                f"params[{path!r}] has {int(np.sum(~np.isfinite(a)))} non-finite value(s) (NaN/inf): the ranks of "
                "a network with non-finite weights are meaningless; reload or re-initialise the parameters")


def security(
    model: Model,
    *,
    input_shape: tuple[int, ...] | None = None,
    key: Any,
    params: Any = None,
    grads: Any = None,
    label: int | None = None,
    loss: str = "auto",
    probes: int = 4,
    defence: Callable | None = None,
    local_steps: int = 1,
    local_lr: float | None = None,
    batch_size: int = 1,
) -> SecurityReport:
    r"""How secure is an architecture against layer-wise gradient inversion? Ranks, indices, score and advice.

    For every weight layer :math:`l` the shared gradient poses a linear system for the layer's input
    :math:`x_{l-1}`: forward rows :math:`A_l x = z_l - c_l` and gradient rows :math:`B_l(x;\delta_l) = g_{W_l}`
    (:mod:`jaxinv._maps`). The report gives each system's numerical rank, deficiency and conditioning (also for
    the forward rows alone), the COPA authors' index, R-GAP's counting index, and a score: the predicted PSNR of the
    layer-wise attack on a typical image (:func:`predict_psnr`), with a verdict and advice.

    **Which** :math:`\delta_l`. The gradient rows depend on :math:`\delta_l = \partial\ell/\partial z_l`.

    * Without ``grads``: the real per-layer :math:`\delta_l` of the gradient of a **random input** drawn from ``key``
      (uniform in ``[0, 1]``, the range of jaxinv's image models) with a random label (or ``label``), at the
      model's current weights (or ``params``). Ranks are generic: any input and weights in general position give the
      same integers (checked: random inits and images reproduce the COPA authors' values).
    * With ``grads`` (one client's shared gradient): the :math:`\delta_l` of that gradient as the attack recovers
      them, i.e. from a forward/backward pass on the :func:`jaxinv.copa` reconstruction with the recovered label.

    The expected lost energy (and so the score) is measured on synthetic natural-image probes
    (:func:`natural_probes`) rather than on the analysed input.

    **How** (see the module docstring): float64 pivoted Cholesky on Gram matrices of exact float32 entries, with
    relative tolerance :data:`RANK_TOL` on the balanced operator; convolutions use the structure
    :math:`B = I\otimes B_0` of their gradient rows, dense layers the certificate "δ ≠ 0", large layers a banded
    Cholesky or tile certificate; a counting estimate (``exact=False``) only beyond those.

    Args:
        model: a :class:`jaxinv.Model` (``from_linen`` / ``from_nnx`` / ``from_fn``).
        input_shape: one input without the batch axis (default: the model's).
        key: a JAX PRNG key (random input, label and probes); the report is a deterministic function of it.
        params: analyse at these parameters instead of ``model.params`` (same structure).
        grads: one client's shared gradient (pytree like the parameters), to analyse at its :math:`\delta_l`.
        label: the label (default: random without ``grads``, recovered from ``grads`` otherwise); for a segmentation model a mask ``(H, W)`` (default: a natural random mask with 4 classes).
        loss: the client's loss (``auto``: logistic for one output, cross-entropy otherwise).
        probes: number of natural-image probes for the expected lost energy (and the defence's propagation).
        defence: a :mod:`jaxinv.defences` transformation (or any ``(grads, key) -> grads``) the client applies before
            sharing. The score then predicts the attack under it: the image error of the undefended score plus the
            error the defence adds, measured by inverting the probes' defended and clean gradients
            (:func:`noise_propagation`); every layer reports its ``noise_gain``.
        local_steps, local_lr: the client shares its weights after ``local_steps`` SGD steps with learning rate
            ``local_lr`` (FedAvg; the update is read as :func:`jaxinv.update_as_gradient`, then ``defence``); the
            score accounts for the steps, and for the rounding of the weights (even one step: in float32 the update
            :math:`\theta_0 - \eta g` keeps about :math:`\varepsilon|\theta|` of absolute precision, which alone
            takes COPA on R-GAP's CNN6 from 93 to 11 dB at :math:`\eta = 0.01`).
        batch_size: the client's batch :math:`B`: the score is then the PSNR of the batch layer-wise attack
            (:mod:`jaxinv.engine._batch`) on ``B`` natural probes sharing one gradient (after ``defence``), matched to
            them (:func:`batch_psnr`); the ranks stay those of single images.

    Returns:
        A :class:`SecurityReport` (``.layers``, ``.copa_index``, ``.rgap_index``, ``.score``, ``.verdict``,
        ``.advice``, ``.table()``, ``.to_dict()``).

    Raises:
        UnsupportedModelError: the model has operations the layer-wise methods cannot place.
        ValueError: ``input_shape`` inconsistent with the model, non-finite parameters (the message names the
            parameter), a ``params``/``grads`` pytree that does not match the model, a batch of gradients.
        TypeError: ``key`` is not a PRNG key.

    Example:
        >>> module, variables = jaxinv.zoo.build("cnn3_c1", key=jax.random.key(0))
        >>> model = jaxinv.from_linen(module, variables, input_shape=(32, 32, 3))
        >>> rep = jaxinv.security(model, key=jax.random.key(1))
        >>> rep.copa_index, rep.verdict.split(":")[0]
        (-2266, 'RESISTANT')
        >>> print(rep.table())

    References:
        Chen & Campbell, arXiv 2111.10178 (COPA, the index); Zhu & Blaschko, ICLR 2021 (R-GAP, rank analysis).
    """
    from ..engine._copa import copa as _copa
    from .._gradient import label_shape, resolve_loss, check_labels, validate_grads

    t0 = time.perf_counter()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a jaxinv.Model (from_linen / from_nnx / from_fn), got {type(model).__name__}")
    key = check_key(key, "security", required=True)
    if params is not None:
        if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(model.params) or any(
                np.shape(a) != np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                            jax.tree_util.tree_leaves(model.params))):
            raise ValueError("params must have the structure and shapes of model.params (the model's parameters)")
        model = Model(model.apply_fn, params, name=model.name, input_shape=model.default_input_shape,
                      strict=model.strict)
    _check_finite(model.params)
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    try:
        structure = model.structure(input_shape)
    except ValueError:  # includes UnsupportedModelError
        raise
    except Exception as e:  # e.g. flax's shape errors when the input does not fit the parameters
        shape = input_shape if input_shape is not None else model.default_input_shape
        raise ValueError(
            f"input_shape={tuple(shape) if shape is not None else None} is inconsistent with model {model.name!r}: "
            f"tracing it failed with {type(e).__name__}: {str(e).splitlines()[0][:300]}. Pass the shape of one input "
            f"without the batch axis that the model's parameters were built for"
            + (f" (the model was built for {model.default_input_shape})" if model.default_input_shape else "")
        ) from None
    shape = structure.input_shape
    leaves = jax.tree_util.tree_leaves(model.params)
    out_shape = structure.stages[-1].nodes.x_out.shape[1:]
    lshape = label_shape(out_shape)
    n_out = out_shape[-1] if lshape else math.prod(out_shape)
    n_lab = 2 if n_out == 1 else n_out
    loss = resolve_loss(loss, n_out)
    k_x, k_y, k_p, k_a = jax.random.split(key, 4)
    if grads is None:
        x = jax.random.uniform(k_x, (1,) + shape, structure.dtype)
        if lshape:  # segmentation: a mask with natural regions (a probe image's luminance levels)
            from ..data import segmentation_masks

            y = (check_labels(jnp.asarray(label), n_lab).reshape(lshape) if label is not None else
                 segmentation_masks(natural_probes(k_y, lshape + (1,), 1), classes=min(4, n_lab))[0])
        else:
            y = (check_labels(jnp.asarray(label), n_lab).reshape(()) if label is not None
                 else jax.random.randint(k_y, (), 0, n_lab))
        source = "gradient of a uniform [0, 1] random input"
    else:
        validate_grads(model, grads, allow_batch=False)
        rec = _copa(model, grads, label=label, input_shape=shape, loss=loss)
        x = rec.image.reshape((1,) + shape).astype(structure.dtype)
        y = rec.label[0] if lshape else rec.label.reshape(-1)[0]
        source = "copa reconstruction from the given gradient"
    probe_imgs = natural_probes(k_p, shape, probes)
    lds = _representative_pass(model, structure, leaves, x, jnp.asarray(y, jnp.int32), loss, probe_imgs)
    seed = int(jax.random.randint(k_a, (), 0, 2**31 - 1))
    with _single_threaded_blas():
        layers = tuple(_analyse_layer(ld, leaves, seed) for ld in lds)
    ci = copa_index(layers)
    ri, rl = rgap_analysis(layers)
    score = predict_psnr(layers, float(np.mean(probe_imgs.astype(np.float64) ** 2)))
    verdict = _verdict(layers, score)
    extra = {}
    if defence is not None and not callable(defence):
        raise TypeError(f"defence must be a jaxinv.defences transformation (grads, key) -> grads, got "
                        f"{type(defence).__name__}")
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(f"local_steps must be a positive integer (FedAvg local SGD steps), got {local_steps!r}")
    if local_lr is not None and not float(local_lr) > 0:
        raise ValueError(f"local_lr must be positive (the clients' learning rate), got {local_lr!r}")
    if local_steps > 1 and local_lr is None:
        raise ValueError(f"local_steps={local_steps} needs the client's learning rate local_lr > 0, got {local_lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > 1:
        if local_steps > 1:
            raise ValueError("security: batch_size > 1 with local_steps > 1 is not supported yet; give one of them")
        clean = score
        name = " -> ".join([f"batch(B={batch_size})"] + ([getattr(defence, "name", "defence")] if defence else []))
        try:
            score = batch_psnr(model, batch_size, key=jax.random.fold_in(k_p, 2), input_shape=shape, loss=loss,
                               defence=defence)
        except ValueError as e:
            raise ValueError(f"security(batch_size={batch_size}) runs the batch layer-wise attack on probes, which "
                             f"cannot run on {model.name!r}: {str(e).splitlines()[0]}") from None
        score = min(score, clean)
        verdict = _verdict_defended(score, name, clean)
        extra = dict(defence=name, score_undefended=clean)
    elif defence is not None or local_lr is not None:
        names = ([f"fedavg(K={local_steps}, lr={float(local_lr):g})"] if local_lr is not None else []) + (
            [getattr(defence, "name", getattr(defence, "__name__", "defence"))] if defence is not None else [])
        name = " -> ".join(names)
        try:
            gains, mse = noise_propagation(model, defence, probe_imgs, key=jax.random.fold_in(k_p, 1),
                                           input_shape=shape, loss=loss, local_steps=local_steps, local_lr=local_lr)
        except ValueError as e:
            raise ValueError(f"security(defence=...) measures the defence through the layer-wise inversion, which "
                             f"cannot run on {model.name!r}: {str(e).splitlines()[0]}") from None
        layers = tuple(dataclasses.replace(r, noise_gain=float(gn)) for r, gn in zip(layers, gains))
        clean = score
        score = float(-10 * np.log10(10 ** (-clean / 10) + mse))
        verdict = _verdict_defended(score, name, clean)
        extra = dict(defence=name, score_undefended=clean, noise_mse=mse)
    return SecurityReport(
        model=model.name, input_shape=tuple(shape), layers=layers, copa_index=ci, rgap_index=ri, rgap_layers=rl,
        score=score, verdict=verdict, advice=_advice(layers, structure, score),
        delta_source=source, label=-1 if lshape else int(y), tolerance=RANK_TOL, seconds=time.perf_counter() - t0, **extra,
    )


# ========================================================================================== defences
def noise_propagation(model: Model, defence: Callable | None, probes: np.ndarray, *, key, input_shape=None,
                      loss: str = "auto", local_steps: int = 1, local_lr: float | None = None
                      ) -> tuple[np.ndarray, float]:
    r"""How a defence's change to the gradient propagates through the layer-wise inversion.

    For natural probe images :math:`p_j` with random labels, the clean gradients :math:`g_j` and the shared ones
    :math:`\tilde g_j = D(g_j; k_j)` are inverted by :func:`jaxinv.copa` with the labels known. With
    ``local_steps`` :math:`K > 1` the client shares a FedAvg update, read as the first-order gradient
    :func:`jaxinv.update_as_gradient` before the defence, and COPA corrects it by simulating the steps
    (``copa(..., local_steps=K)``). Layer :math:`l`'s **noise gain** is
    :math:`\mathrm{RMS}(\tilde x_{l-1} - \hat x_{l-1}) / \mathrm{RMS}(\tilde g - g)` (reconstructed layer inputs
    from the shared and the clean gradient, RMS over entries and probes): how much one unit of gradient perturbation
    moves that layer's answer, the product of the conditioning of every layer above it. The image error the
    defence adds is :math:`\mathrm{MSE}_D = \mathrm{mean}\,(\mathrm{clip}(\tilde x_0) - \mathrm{clip}(\hat x_0))^2`
    (images in ``[0, 1]``).

    Returns:
        ``(gains per layer, input layer first; MSE_D)``.
    """
    from ..engine._copa import copa as _copa
    from .._fedavg import local_update, update_as_gradient
    from .._gradient import num_labels

    shape = model.resolve_input_shape(input_shape)
    x = jnp.asarray(probes, model.structure(shape).dtype)
    k_y, k_d = jax.random.split(key)
    y = jax.random.randint(k_y, (x.shape[0],), 0, num_labels(model, shape))
    g = stacked_gradients(model, x, y)
    gd = g
    if local_lr is not None:  # weights shared: even one step carries the float rounding of theta_0 - lr g
        gd = jax.vmap(lambda xi, yi: update_as_gradient(local_update(model, xi[None], yi[None], steps=local_steps,
                                                                     lr=local_lr, loss=loss),
                                                        steps=local_steps, lr=local_lr))(x, y)
    if defence is not None:
        gd = jax.vmap(defence)(gd, jax.random.split(k_d, x.shape[0]))
    rc = _copa(model, g, label=y, input_shape=shape, loss=loss)
    rn = _copa(model, gd, label=y, input_shape=shape, loss=loss,
               **({"local_steps": local_steps, "local_lr": local_lr} if local_steps > 1 else {}))
    diff = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
            for a, b in zip(jax.tree_util.tree_leaves(gd), jax.tree_util.tree_leaves(g))]
    g_rms = math.sqrt(sum(float(np.sum(d * d)) for d in diff) / max(sum(d.size for d in diff), 1))
    gains = np.array([float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))
                      / max(g_rms, 1e-300) for a, b in zip(rn.layer_inputs, rc.layer_inputs)])
    mse = float(np.mean((np.clip(np.asarray(rn.image, np.float64), 0, 1)
                         - np.clip(np.asarray(rc.image, np.float64), 0, 1)) ** 2))
    return gains, mse


def batch_psnr(model: Model, batch_size: int, *, key, input_shape=None, loss: str = "auto",
               defence: Callable | None = None) -> float:
    r"""PSNR (dB) of :func:`jaxinv.copa` on one gradient of ``batch_size`` natural probes (:func:`natural_probes`,
    random labels without repeats where the head allows, ``defence`` applied), the reconstructions matched to the
    probes (:func:`jaxinv.metrics.match`); the mean over the batch of the matched MSE, in dB."""
    from .. import metrics
    from ..engine._copa import copa as _copa
    from .._gradient import client_gradient, num_labels

    shape = model.resolve_input_shape(input_shape)
    k_p, k_y, k_d, k_c = jax.random.split(key, 4)
    x = jnp.asarray(natural_probes(k_p, shape, batch_size), model.structure(shape).dtype)
    K = num_labels(model, shape)
    y = jax.random.permutation(k_y, max(K, batch_size))[:batch_size] % K
    g = client_gradient(model, x, y, loss=loss)
    if defence is not None:
        g = defence(g, k_d)
    rec = _copa(model, g, label=y, input_shape=shape, loss=loss, key=k_c)
    img = jnp.clip(rec.image, 0, 1)
    perm, _ = metrics.match(img, x, metric="mse")
    mse = float(jnp.mean((img[jnp.asarray(perm)] - x) ** 2))
    return float(-10 * np.log10(max(mse, 1e-30)))


def _verdict_defended(score: float, name: str, clean: float) -> str:
    tail = f"under defence {name} (predicted {score:.0f} dB, {clean:.0f} dB without it)"
    if score >= LEAK_DB:
        return f"LEAKS: the input is still recoverable from the gradient {tail}"
    if score >= SAFE_DB:
        return f"PARTIAL: a recognisable but inexact reconstruction is expected {tail}"
    return (f"RESISTANT: the layer-wise attacks are not expected to reconstruct the input {tail}; "
            "the gradient may still reveal the label")
