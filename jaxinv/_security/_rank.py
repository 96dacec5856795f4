r"""Numerical rank of a (balanced) matrix, and the rank results the certificates return.

The numerical floor of :mod:`jaxinv._security`: NumPy/SciPy only, below the layer's certificates
(:mod:`jaxinv._security._certificates`).

**Rank tolerance.** A singular value of the balanced operator counts when it exceeds :data:`RANK_TOL`
(``1e-6``; the operator's largest singular value is between 1 and :math:`\sqrt2`). Ranks come from pivoted
Cholesky (LAPACK ``dpstrf``, :func:`pstrf`) of float64 Gram matrices of the *exact* float32 entries (a linear map
applied to unit vectors returns its matrix entries exactly). Forming a Gram matrix squares the condition number:
its rounding noise is about :math:`\sqrt{N\varepsilon_{64}}` in singular-value terms, so the threshold is raised to
:math:`\max(10^{-6}, 10\sqrt{N\varepsilon_{64}})` (:func:`gram_tol`), and any pivot close to it (accepted below
ten times, rejected above a third of it) sends the decision to pivoted QR of the matrix itself at ``1e-6``
(:func:`gram_rank`). Every layer reports its smallest accepted and largest rejected pivot (``gap``): on the 51
architectures of the benchmark, accepted ones are above :math:`4\cdot10^{-5}` (above :math:`10^{-3}` in every
rank-deficient layer) and rejected ones below :math:`5\cdot10^{-8}`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from scipy.linalg import lapack

#: Relative rank tolerance on the singular values of the balanced stacked operator.
RANK_TOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Rank:
    """Numerical rank of a matrix: from pivoted Cholesky (``dpstrf``) of its Gram matrix, or pivoted QR."""

    rank: int
    size: int
    perm: np.ndarray  # pivot order (0-based)
    factor: np.ndarray | None  # (size, rank): P^T G P = L L^T restricted to the first `rank` columns (Cholesky)
    last: float  # last accepted pivot (squared singular-value scale)
    rejected: float  # largest rejected pivot (squared scale; 0 when full rank)
    basis: np.ndarray | None = None  # orthonormal basis of the row space (pivoted-QR path)


def pstrf(G: np.ndarray, lam_tol: float) -> Rank:
    """Pivoted Cholesky (LAPACK ``dpstrf``) of a PSD matrix, stopping at pivots below ``lam_tol``."""
    n = G.shape[0]
    if n == 0:
        return Rank(0, 0, np.zeros(0, int), np.zeros((0, 0)), math.inf, 0.0)
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
    return Rank(int(r), n, piv, L, float(d.min()) if r else 0.0, rej)


_QR_MAX = 3000  # largest side refined by pivoted QR when the Gram pivots leave the decision ambiguous


def gram_tol(N: int, tol: float = RANK_TOL) -> float:
    r"""Effective singular-value threshold of the Gram path: the nominal tolerance, raised above the rounding
    noise of a float64 Gram matrix of side ``N`` (about :math:`\sqrt{N\varepsilon_{64}}` relative)."""
    return max(tol, 10.0 * math.sqrt(max(N, 1) * np.finfo(np.float64).eps))


def gram_rank(R, tol: float = RANK_TOL, G: np.ndarray | None = None) -> tuple[Rank, str]:
    """Rank of ``R`` (dense or sparse, balanced: largest singular value about 1).

    Pivoted Cholesky of the Gram matrix ``G`` of the smaller side (computed if not given) with threshold
    :func:`gram_tol`. When a pivot lands in the ambiguous zone (accepted ones below ten times, or rejected ones
    above a third of the threshold), the decision is redone by pivoted QR of ``R`` itself at the nominal tolerance
    (no squaring of the condition number; sides up to :data:`_QR_MAX`).
    """
    rows, cols = R.shape
    N = min(rows, cols)
    side = "rows" if rows <= cols else "cols"
    if G is None:
        G = R @ R.T if side == "rows" else R.T @ R
        G = G.toarray() if sp.issparse(G) else G
    teff = gram_tol(N, tol)
    rk = pstrf(G, teff**2)
    acc, rej = safe_sqrt(rk.last), safe_sqrt(rk.rejected)
    clean = (rk.rank == 0 or acc >= 10 * teff) and rej <= teff / 3
    if clean or N > _QR_MAX or N == 0:
        return rk, side
    Rd = R.toarray() if sp.issparse(R) else np.asarray(R)
    Q, T, piv = sla.qr(Rd.T, mode="economic", pivoting=True)
    d = np.abs(np.diag(T))
    r = int(np.sum(d > tol))
    return Rank(r, N, np.asarray(piv), None, float(d[r - 1] ** 2) if r else 0.0,
                float(d[r] ** 2) if r < d.size else 0.0, Q[:, :r]), "basis"


def rank_sigma_min(rk: Rank) -> float:
    """Estimate of the smallest nonzero singular value behind a rank decision."""
    if rk.rank == 0:
        return 0.0
    if rk.factor is None:
        return safe_sqrt(rk.last)
    return _sigma_min_lower(rk.factor[: rk.rank, : rk.rank])


def row_space_energy(R: np.ndarray, rk: Rank, side: str, Y: np.ndarray) -> np.ndarray:
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


def power_norm(normal: Callable, n: int, iters: int) -> float:
    r"""Largest singular value of a linear map :math:`M` from its normal map :math:`v \mapsto M^\top M v` on
    :math:`\mathbb R^n`: ``iters`` steps of power iteration from a fixed start (0 for the zero map)."""
    v = np.cos(np.arange(n) * 1.618) + 1.0
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(iters):
        w = normal(v)
        lam = float(np.linalg.norm(w))
        if lam == 0.0:
            return 0.0
        v = w / lam
    return math.sqrt(lam)


def spectral_norm(A, iters: int = 40) -> float:
    """Spectral norm of a dense or sparse matrix (exact below 300 columns, else power iteration)."""
    if A.shape[0] == 0 or A.shape[1] == 0:
        return 0.0
    if min(A.shape) <= 300 and not sp.issparse(A):
        return float(np.linalg.norm(np.asarray(A, np.float64), 2))
    return power_norm(lambda v: A.T @ (A @ v), A.shape[1], iters)


@dataclasses.dataclass(frozen=True)
class Block:
    """Rank result of one (balanced) block or stacked system."""

    rank: int
    sigma_min: float
    sigma_kind: str
    gap: tuple[float, float]
    method: str
    exact: bool = True


def safe_sqrt(v: float) -> float:
    r""":math:`\sqrt{\max(v, 0)}`, non-finite values passed through."""
    return math.sqrt(max(v, 0.0)) if math.isfinite(v) else v


def banded_from_sparse(G: sp.spmatrix) -> tuple[np.ndarray, int]:
    """Upper banded storage of a symmetric sparse matrix (``scipy.linalg.cholesky_banded`` layout)."""
    G = sp.triu(G, format="coo")
    u = int((G.col - G.row).max()) if G.nnz else 0
    ab = np.zeros((u + 1, G.shape[0]))
    ab[u + G.row - G.col, G.col] = G.data
    return ab, u


def banded_certificate(G: sp.spmatrix, lam_tol: float) -> tuple[bool, float]:
    """Full rank of a sparse banded PSD Gram matrix by banded Cholesky; also its smallest eigenvalue (inverse
    iteration with the factor). Returns ``(positive definite beyond lam_tol, lambda_min estimate)``."""
    ab, _ = banded_from_sparse(G)
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


def block_from_rank(rk: Rank, what: str) -> Block:
    """The :class:`Block` of a rank decision (``what``: the matrix it was taken on)."""
    how = "pivoted QR" if rk.factor is None else "pivoted Cholesky"
    return Block(rk.rank, rank_sigma_min(rk), "estimate", (safe_sqrt(rk.last), safe_sqrt(rk.rejected)),
                 f"{what}, {how}")


def null_basis(G: np.ndarray, lam_tol: float) -> np.ndarray:
    """Orthonormal basis of the numerical null space of a PSD Gram matrix (pivoted Cholesky, then QR)."""
    rk = pstrf(G, lam_tol)
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
