r"""Blocks: residual blocks, skip connections, max pooling and normalisation, inverted as a whole.

A *block* stage (:mod:`jaxinv._trace`) is the sub-network between two points every path of the model goes
through: a residual block :math:`v = u + F(u)` (or :math:`v = Pu + F(u)` with a projection shortcut), a U-Net
skip joined by a concatenation :math:`v = [u;\, D(E(u))]`; or a layer followed by max pooling,
:math:`v = \mathrm{maxpool}(\sigma(Wu + b))` (which unit of each window passes is the argmax of values that are
themselves unknown) or by a normalisation by the data's statistics (GroupNorm, LayerNorm, BatchNorm in training
form). Its map :math:`f(u; \theta)` is nonlinear in its input :math:`u` (the ReLUs inside
:math:`F`, the pooling's argmax), so the layer-wise recursion cannot take one linear solve per
weight; instead the block's two constraints are solved jointly for :math:`u`, the same pair as a layer's:

.. math::

    r(u) = \begin{bmatrix} w_f\, m \odot \big(f(u;\theta) - z\big) \\
                           w_g\, \big(\nabla_\theta \langle \delta, f(u;\theta)\rangle - g_\theta\big)\end{bmatrix}
         = 0,

with :math:`z` the block's output before the activation after it (known from the layer above on its active
units :math:`m`), :math:`\delta = \partial\ell/\partial z` and :math:`g_\theta` the shared gradient of *every*
parameter inside the block (all its kernels, biases, scales): the forward rows are the block's output, the
gradient rows its weights' gradients. For a single layer this is exactly COPA's linear system; for a block it is
solved by Levenberg-Marquardt (:func:`levenberg_marquardt`: each step one matrix-free LSMR solve of the damped
linearisation, built with ``jax.linearize``), by continuation from smoothed kinks (:func:`solve_block`). Then
:math:`\partial\ell/\partial u = J_u f^\top \delta` (``jax.vjp``) carries the recursion down.

**What is determined.** The Jacobian of :math:`r` at the truth plays the role of a layer's stacked operator: the
block is determined when it has full column rank (:func:`jaxinv.security` reports its numerical rank). A residual
block with an identity shortcut has a square forward block :math:`I + J_F` (invertible unless :math:`J_F` has an
eigenvalue :math:`-1`), so without an activation after the sum it is determined by its forward rows alone; a ReLU
after the sum removes the rows of inactive outputs, which the weights' gradient rows must replace. Max pooling
keeps one row per window (the argmax's): a layer with :math:`C` output channels pooled by 2x2 gives
:math:`C\,HW/4` forward rows for its :math:`C_\mathrm{in} HW` unknowns, so it needs :math:`C > 4 C_\mathrm{in}`
(less what its kernel gradient adds) to be determined.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array

from .._maps import norm, with_leaf
from .._model import Stage
from ._layer import fit_status, layer_report
from ._options import Solver


LAM_STALL = 1e8
"""Levenberg-Marquardt stops once its damping exceeds this multiple of its start (stalled)."""


def levenberg_marquardt(resid: Callable, x0, *, rtol: float, atol: float, max_steps: int, iters: int, lam0=1e-2,
                        project: Callable | None = None, factors: tuple[float, float] = (0.1, 10.0)):
    r"""Minimise :math:`\|r(x)\|^2` by Levenberg-Marquardt, matrix-free.

    Each iteration solves :math:`\min_d \|J d + r\|^2 + \lambda\|d\|^2` by LSMR on :math:`[J;\ \sqrt\lambda I]`
    (:math:`J` from ``jax.linearize``, its transpose by ``jax.linear_transpose`` inside lineax), takes
    :math:`x' = \Pi(x + d)` (``project``: e.g. the input box; identity by default), accepts it when the residual
    decreases (then :math:`\lambda \leftarrow f_\downarrow\lambda`), else rejects it and
    :math:`\lambda \leftarrow f_\uparrow\lambda` (``factors``). ``lam0`` should be on the scale of
    :math:`J^\top J` (residual blocks normalised to 1 give :math:`\|J\| \approx 1`). Stops after ``iters``
    iterations, or once :math:`\lambda > 10^{8}\lambda_0` (:data:`LAM_STALL`: the steps have shrunk by that
    factor below Gauss-Newton's, so the iteration has stalled, e.g. on a kink of the residual).

    Returns:
        ``(x, |r(x)|, total LSMR steps)``.
    """
    dtype = x0.dtype
    x_struct = jax.ShapeDtypeStruct(x0.shape, dtype)

    def cost(x):
        return norm(resid(x))

    def go(carry):
        i, _, _, lam, _ = carry
        return (i < iters) & (lam < lam_stall)

    def body(carry):
        i, x, c, lam, steps = carry
        r, lin = jax.linearize(resid, x)
        sq = jnp.sqrt(lam)
        op = lx.FunctionLinearOperator(lambda d: (lin(d), sq * d), x_struct)
        rhs = (jax.tree_util.tree_map(jnp.negative, r), jnp.zeros(x_struct.shape, dtype))
        sol = lx.linear_solve(op, rhs, lx.LSMR(rtol=rtol, atol=atol, max_steps=max_steps), throw=False)
        xn = x + sol.value if project is None else project(x + sol.value)
        cn = cost(xn)
        ok = jnp.isfinite(cn) & (cn < c)
        return (i + 1, jnp.where(ok, xn, x), jnp.where(ok, cn, c),
                jnp.where(ok, lam * factors[0], lam * factors[1]),
                steps + jnp.asarray(sol.stats.get("num_steps", 0), jnp.int32))

    lam_stall = jnp.asarray(LAM_STALL * lam0, dtype)
    init = (jnp.zeros((), jnp.int32), x0, cost(x0), jnp.asarray(lam0, dtype), jnp.zeros((), jnp.int32))
    _, x, c, _, steps = jax.lax.while_loop(go, body, init)
    return x, c, steps


class BlockSystem:
    r"""One block's nonlinear system (module doc): :math:`u \mapsto f(u;\theta)` and
    :math:`u \mapsto \nabla_\theta\langle\delta, f(u;\theta)\rangle`, with the targets and block weights.

    Built inside a traced function; ``leaves`` the model's parameter leaves, ``idx`` the block's.
    """

    def __init__(self, stage, leaves, delta, idx: tuple[int, ...]):
        self.stage, self.leaves, self.delta, self.idx = stage, list(leaves), delta, idx
        self.x_struct = jax.ShapeDtypeStruct(stage.nodes.x_in.shape, delta.dtype)

    def _with(self, ws):
        lv = self.leaves
        for i, w in zip(self.idx, ws):
            lv = with_leaf(lv, i, w)
        return lv

    def forward(self, u, smooth=None):
        """:math:`f(u;\\theta)`: the block's output before its activation (kinks smoothed at ``smooth``)."""
        return self.stage.affine(u, self.leaves, smooth)

    def gradient(self, u, smooth=None):
        r""":math:`\nabla_\theta\langle\delta, f(u;\theta)\rangle`, one array per parameter of the block."""
        _, pull = jax.vjp(lambda *ws: self.stage.affine(u, self._with(ws), smooth),
                          *(self.leaves[i] for i in self.idx))
        return pull(self.delta.astype(self.x_struct.dtype))

    def input_cotangent(self, u):
        r""":math:`\partial\ell/\partial u = J_u f(u)^\top \delta`."""
        return jax.vjp(self.forward, u)[1](self.delta)[0]

    def residual_fn(self, z, g, mask, gradient_weight=1.0, smooth=None):
        r"""``u -> r(u)`` (module doc) with both parts scaled to unit relative size (the gradient part further by
        ``gradient_weight``), and ``u ->`` the two relative residuals."""
        dtype = self.x_struct.dtype
        tiny = jnp.finfo(dtype).tiny
        m = jnp.ones_like(z) if mask is None else mask
        wf = 1.0 / jnp.maximum(norm(z * m), tiny)
        wg = 1.0 / jnp.maximum(norm(g), tiny)
        w = wg * gradient_weight

        def parts(u):
            f = self.forward(u, smooth)
            fwd = (f - z) * m
            if mask is not None:  # a ReLU's inactive outputs: the pre-activation is not positive there (hinge)
                fwd = fwd + (1.0 - m) * jnp.maximum(f, 0.0)
            return fwd, tuple(a - b for a, b in zip(self.gradient(u, smooth), g))

        def resid(u):
            f, gr = parts(u)
            return wf * f, tuple(w * a for a in gr)

        def relative(u):
            f, gr = parts(u)
            return norm(f) * wf, norm(gr) * wg

        return resid, relative


# (temperature relative to the output's RMS or None for the exact map, gradient-row weight, LM iterations, lambda_0)
PHASES = ((0.3, 1.0, 10, 1e-2), (0.1, 0.1, 10, 1e-2), (0.03, 0.1, 10, 1e-2), (None, 0.1, 10, 1e-3),
          (None, 1.0, 10, 1e-4))


def solve_block(bs: BlockSystem, z, g, mask, *, rtol: float, atol: float, max_steps: int, phases=PHASES):
    r"""The block's input from its output ``z`` (rows ``mask``) and its parameters' gradient ``g``, from ``u = 0``.

    **Kinks.** The forward rows are continuous in :math:`u`, but the gradient rows of a weight before a ReLU (or a
    max pooling) are not: :math:`\nabla_{W_1} = \sum_j \delta_{1,j}\,\mathrm{patch}_j(u)` with
    :math:`\delta_{1,j} = [a_j(u) > 0]\,(W_2^\top\delta)_j`, which jumps by a whole term when a unit crosses its
    kink (or another unit of a pooling window becomes its argmax). Started far from the answer, Levenberg-Marquardt
    on the exact map stalls at such jumps. So the solve follows a continuation:

    1. the block's kinks smoothed at temperature :math:`t` (:func:`jaxinv._trace.evaluate`: softplus for ReLU,
       log-sum-exp for max pooling), :math:`t` from 0.3 to 0.03 of the output's RMS, the first phase with all rows,
       then with the gradient rows at weight 0.1 (the forward rows lead);
    2. the exact map, gradient rows at 0.1, then at full weight.

    Measured (16x16 photo, input error from ``u = 0``): a residual block with 8 channels and no ReLU after its sum
    is solved either way (1e-6); on the hard cases, where the forward rows leave a part of ``u`` to the gradient
    rows, continuation halves the error (16-channel ``relu(u + F(u))``: 0.46 without, 0.22 with; 16-channel conv,
    ReLU, 2x2 max pooling: 18.2 dB without, 21.5 dB with) but does not reach the answer: those blocks are
    determined at the truth (:func:`jaxinv.security`) yet the solve from ``u = 0`` ends in a local minimum, which
    its residuals and status report.

    Returns:
        ``(u, total LSMR steps)``.
    """
    u = jnp.zeros(bs.x_struct.shape, z.dtype)
    steps = jnp.zeros((), jnp.int32)
    m = jnp.ones_like(z) if mask is None else mask
    scale = jnp.sqrt(jnp.sum((z * m) ** 2) / jnp.maximum(jnp.sum(m), 1.0))
    for t, weight, n, lam0 in phases:
        smooth = None if t is None else jnp.maximum(t * scale, jnp.finfo(z.dtype).tiny)
        resid, _ = bs.residual_fn(z, g, mask, gradient_weight=weight, smooth=smooth)
        u, _, more = levenberg_marquardt(resid, u, rtol=rtol, atol=atol, max_steps=max_steps, iters=n, lam0=lam0)
        steps = steps + more
    return u, steps


def block_step(st: Stage, leaves: list[Array], gleaves: list[Array], z: Array, delta: Array, mask, clipped,
               solver: Solver, carry_down: bool):
    """A block below the head (:mod:`jaxinv.engine._block`): its input from its output and its parameters' gradient,
    jointly (:func:`jaxinv.engine._block.solve_block`); returns ``(u, dl/du, report)`` like a layer's step."""
    bs = BlockSystem(st, leaves, delta, st.nodes.leaves)
    g = tuple(gleaves[i] for i in st.nodes.leaves)
    rtol, atol = solver.tolerances(z.dtype)
    u, steps = solve_block(bs, z, g, mask, rtol=rtol, atol=atol, max_steps=solver.max_steps)
    fres, gres = bs.residual_fn(z, g, mask)[1](u)
    finite = jnp.all(jnp.isfinite(u))
    status = fit_status(jnp.maximum(fres, gres), finite)
    u = jnp.where(finite, u, 0.0)
    gu = bs.input_cotangent(u) if carry_down else jnp.zeros_like(u)
    return u, gu, layer_report(st, True, fres, gres, jnp.full((), jnp.nan, z.dtype), clipped, steps, status)
