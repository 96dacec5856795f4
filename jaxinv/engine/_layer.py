r"""The layer solve: one layer's input from its stacked linear system, the one home of the engine's per-layer work.

Knowing a layer's output :math:`x_l` and :math:`\partial\ell/\partial x_l` (from the layer above), the un-activate
step gives :math:`z_l = s_l^{-1}(x_l)` and :math:`\delta_l = \partial\ell/\partial x_l \odot s_l'(z_l)`
(:func:`unactivate`); then the layer's input :math:`x_{l-1}` solves, in least squares (Chen & Campbell 2021, the
forward and gradient constraints),

.. math:: \begin{bmatrix} w_f\,A_l \\ w_g\,B_l(\cdot;\delta_l) \end{bmatrix} x
    = \begin{bmatrix} w_f\,(z_l - c_l) \\ w_g\,(g_{W_l} - B_l(0;\delta_l)) \end{bmatrix}

(:func:`solve_layer`; the operators are :class:`jaxinv._maps.LayerSystem`'s, the weights the inverse operator
norms). A ReLU layer keeps only the rows of its active units (:math:`x_l > 0`), its inactive units give
:math:`\delta_l = 0`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float, Int

from .._maps import LayerSystem, norm, operator_norm, solver_status, with_leaf
from .._model import Stage
from .._result import LayerReport
from .._results import RESULTS
from ._options import Solver

NOT_INVERTIBLE = ("gelu", "silu")


class LayerSolution(NamedTuple):
    """What :func:`solve_layer` returns (a tuple: ``x, fres, gres, steps, status = solve_layer(...)``)."""

    x: Array
    forward_residual: Float[Array, ""]
    gradient_residual: Float[Array, ""]
    steps: Int[Array, ""]
    status: Int[Array, ""]


def relu_active(x: Array) -> Array:
    r"""A reconstructed ReLU output with its solver noise removed: entries at most
    :math:`64\,\varepsilon\,\max|x|` (:math:`\varepsilon` the dtype's epsilon) are set to 0.

    The active set of a ReLU layer is read from its reconstructed output (:math:`x > 0`: an equality row and
    :math:`s' = 1`; else no row and :math:`\delta = 0`). Inactive units come back from the layer above as solver
    noise around 0, and half of them would be read as active with :math:`z \approx 0`, a wrong equation (their
    true pre-activation is negative): on R-GAP's CNN6 with ReLU that alone left the determined layers' residuals
    at 0.2-0.6 instead of 1e-7. The threshold sits just above LSMR's noise (tolerance 1e-8 relative in float32);
    a larger one (:math:`\sqrt{\varepsilon}`) misreads small true activations as inactive, whose
    :math:`\delta = 0` then corrupts the gradient rows (tested: 126 -> 47 dB on a wide ReLU layer).

    Example:
        >>> relu_active(jnp.array([1.0, 1e-9, -1e-9])).tolist()
        [1.0, 0.0, 0.0]
    """
    tau = 64 * jnp.finfo(x.dtype).eps * jnp.max(jnp.abs(x))
    return jnp.where(x > tau, x, jnp.zeros_like(x))


def unactivate(stage: Stage, x_l: Array, gx_l: Array) -> tuple[Array, Array | None, Array, Array]:
    r"""The un-activate step: from a layer's output :math:`x_l` and :math:`\partial\ell/\partial x_l` to
    ``(z_l, mask, delta_l, clipped)``: :math:`z_l = s^{-1}(x_l)`, the active units of a ReLU (``None`` otherwise),
    :math:`\delta_l = \partial\ell/\partial x_l \odot s'(z_l)`, and the count of values outside the activation's
    image that were clipped before the inverse. Any leading batch axes are carried through."""
    act = stage.activation
    if act.name in NOT_INVERTIBLE:
        raise ValueError(
            f"the activation after layer {stage.layer.path!r} is {act}, which is not invertible on all of R; the "
            "layer-wise attacks support identity, tanh, sigmoid, leaky_relu, elu, softplus and relu. Use "
            "jaxinv.attack('ig', ...) for this model"
        )
    if act.name == "relu":
        x_l = relu_active(x_l)
    z, clipped = act.inverse(x_l)
    mask = (x_l > 0).astype(x_l.dtype) if act.name == "relu" else None
    return z, mask, gx_l * act.derivative(z, x_l), clipped


def residuals(sys: LayerSystem, x: Array, z: Array, gW: Array, mask: Array | None) -> tuple[Array, Array]:
    r"""Relative forward and gradient residuals of ``x``: :math:`\|m(Ax + c - z)\| / \|m(z - c)\|` and
    :math:`\|B(x;\delta) - g_W\| / \|g_W - B(0;\delta)\|`."""
    tiny = jnp.finfo(x.dtype).tiny
    tf = z - sys.forward_offset
    fwd = sys.forward(x)
    if mask is not None:
        tf, fwd = tf * mask, fwd * mask
    tg = gW - sys.gradient_offset
    fres = norm(fwd - tf) / jnp.maximum(norm(tf), tiny)
    gres = norm(sys.gradient(x) - tg) / jnp.maximum(norm(tg), tiny)
    return fres, gres


def solve_layer(sys: LayerSystem, z: Array, gW: Array, solver: Solver, *, use_forward: bool = True,
                mask: Array | None = None) -> LayerSolution:
    r"""Least-squares solve of one layer's stacked system (module docstring) by LSMR (``lineax``).

    Args:
        sys: the layer's maps at its :math:`\delta_l` (:meth:`jaxinv._maps.LayerSystem.build`).
        z: the forward targets :math:`z_l` (pre-activation).
        gW: the shared kernel gradient :math:`g_{W_l}`.
        solver: tolerances, iteration cap and block weights.
        use_forward: ``False`` drops the forward block (the head, whose :math:`z_L` is unknown).
        mask: a ReLU layer's active units (rows kept), or ``None``.

    Returns:
        A :class:`LayerSolution`; a non-finite solution is replaced by 0 with status ``RESULTS.nonfinite``.
    """
    dtype = sys.x_struct.dtype
    rtol, atol = solver.tolerances(dtype)
    fwd_target = z - sys.forward_offset
    if mask is not None:
        fwd_target = fwd_target * mask
    grd_target = gW - sys.gradient_offset
    fwd_fn = sys.forward if mask is None else (lambda x: sys.forward(x) * mask)
    nf = operator_norm(fwd_fn, sys.x_struct)
    ng = operator_norm(sys.gradient, sys.x_struct)
    safe = lambda n: jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)  # noqa: E731
    wf = safe(nf) * (solver.forward_weight if use_forward else 0.0)
    wg = safe(ng) * solver.gradient_weight
    op = sys.operator(wf, wg, mask)
    rhs = (wf * fwd_target, wg * grd_target)
    if jax.config.jax_enable_x64 and dtype != jnp.float64:
        # lineax's LSMR mixes Python-float scalars into lax.select: float32 data under x64 fails there
        f64 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), t)  # noqa: E731
        op = lx.FunctionLinearOperator(lambda x: f64(op.mv(x.astype(dtype))),
                                       jax.ShapeDtypeStruct(sys.x_struct.shape, jnp.float64))
        rhs = f64(rhs)
    sol = lx.linear_solve(op, rhs, lx.LSMR(rtol=rtol, atol=atol, max_steps=solver.max_steps), throw=False)
    x = sol.value.astype(dtype)
    fres, gres = residuals(sys, x, z, gW, mask)
    if not use_forward:
        fres = jnp.full((), jnp.nan, dtype)
    finite = jnp.all(jnp.isfinite(x))
    status = jnp.where(finite, solver_status(sol.result), int(RESULTS.nonfinite))
    steps = jnp.asarray(sol.stats.get("num_steps", -1), jnp.int32)
    return LayerSolution(jnp.where(finite, x, 0.0), fres, gres, steps, status)


def bias_residual(stage: Stage, leaves: list[Array], gleaves: list[Array], delta: Array) -> Float[Array, ""]:
    r"""Consistency of a recovered :math:`\delta_l` with the shared bias gradient:
    :math:`\|\partial_b \langle\delta_l, z_l\rangle - g_b\| / \|g_b\|` (NaN when the layer has no bias)."""
    bl = stage.nodes.bias_leaf
    if bl < 0:
        return jnp.full((), jnp.nan, delta.dtype)
    x0 = jnp.zeros(stage.nodes.x_in.shape, leaves[stage.nodes.kernel_leaf].dtype)
    zero = stage.affine(x0, with_leaf(leaves, bl, jnp.zeros_like(leaves[bl])))
    bmap = lambda b: stage.affine(x0, with_leaf(leaves, bl, b)) - zero  # noqa: E731  (b -> its share of z)
    gb_hat = jax.linear_transpose(bmap, jax.ShapeDtypeStruct(leaves[bl].shape, leaves[bl].dtype))(delta)[0]
    gb = gleaves[bl]
    return norm(gb_hat - gb) / jnp.maximum(norm(gb), jnp.finfo(delta.dtype).tiny)


def layer_report(stage: Stage, use_forward: bool, fres, gres, bres, clipped, steps, status, seconds=jnp.nan,
                 refined=None) -> LayerReport:
    """The :class:`jaxinv.LayerReport` of one layer's solve (``refined``: a pull-back's report, or ``None``)."""
    L = stage.layer
    extra = {} if refined is None else dict(refine_steps=refined.steps, refine_objective=refined.objective,
                                            lsq_residual=refined.lsq_residual)
    return LayerReport(
        path=L.path, kind=L.kind, unknowns=L.unknowns, forward_rows=L.forward_rows if use_forward else 0,
        gradient_rows=L.gradient_rows, forward_residual=fres, gradient_residual=gres, bias_residual=bres,
        clipped=jnp.asarray(clipped, jnp.int32), steps=steps, status=status,
        seconds=jnp.asarray(seconds, jnp.float32), **extra,
    )


def fit_status(residual: Array, finite: Array | bool = True, tol: float = 1e-2) -> Int[Array, ""]:
    """``RESULTS.successful`` when a nonlinear solve's relative ``residual`` is below ``tol``, else
    ``RESULTS.inconsistent``; ``RESULTS.nonfinite`` when the answer is not finite."""
    ok = jnp.isfinite(residual) & (residual < tol)
    code = jnp.where(ok, int(RESULTS.successful), int(RESULTS.inconsistent))
    return jnp.where(finite, code, int(RESULTS.nonfinite)).astype(jnp.int32)
