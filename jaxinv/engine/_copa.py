r"""COPA / R-GAP: invert a shared gradient layer by layer, from the output down to the image.

The recursion (Chen & Campbell 2021, eqs. for the forward and gradient constraints; Zhu & Blaschko 2021):

1. **Head** (layer :math:`L`, dense with bias): :math:`g_{b_L} = \delta_L` and :math:`g_{W_L} = \delta_L
   x_{L-1}^\top`, so :math:`x_{L-1}` solves the gradient constraint alone in least squares
   (:math:`x_{L-1} = g_{W_L}^\top g_{b_L} / \|g_{b_L}\|^2` for a dense head; all rows are used, not the first
   non-zero one). Without a bias, :math:`g_{W_L}` is rank one: :math:`x_{L-1} = c\,v` with :math:`v` its right
   singular vector, and the scale :math:`c` is the root of the consistency equation
   :math:`c\,\ell'(c\,W v) = \sigma u` (R-GAP's scalar trick, for any loss and activation).
2. **Going down**, knowing :math:`x_l` and :math:`\partial\ell/\partial x_l = A_{l+1}^\top\delta_{l+1}`:
   :math:`z_l = s_l^{-1}(x_l)`, :math:`\delta_l = \partial\ell/\partial x_l \odot s_l'(z_l)`, and
   :math:`x_{l-1}` solves :math:`[A_l;\,B_l(\cdot;\delta_l)]\,x = [z_l - c_l;\, g_{W_l} - B_l(0;\delta_l)]`
   in least squares (:mod:`jaxinv._maps`).
3. The image is :math:`x_0`.

The recursion is a fold over the layers from the output down (layers differ in shape, so it is a Python
``reduce`` over jit-compiled steps rather than ``lax.scan``). ReLU is followed exactly where it is known:
active units (:math:`x_l > 0`) give forward rows, inactive ones give :math:`\delta_l = 0` and no row.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Int, PyTree

from ._block import BlockSystem, solve_block
from ._refine import Pullback, as_pullback, output_projection, pullback_layer
from .._labels import HeadNotInvertibleError, head_delta_direction, label_from_delta, rank_one, recover_labels
from .._gradient import label_shape, check_labels, loss_fn, validate_grads
from .._model import Model, Stage, Structure
from .._maps import LayerSystem, norm, with_leaf, operator_norm, solver_status
from .._result import LayerReport, Reconstruction


# ----------------------------------------------------------------------------------------------------- options
class CopaOptions(eqx.Module):
    """Solver options of the layer-wise attacks (static: a change recompiles).

    Attributes:
        rtol, atol: LSMR tolerances (default: 1e-8 in float32, 1e-13 in float64).
        max_steps: LSMR iteration cap per layer.
        forward_weight, gradient_weight: extra weights on the two blocks after norm balancing (0 drops a block:
            ``gradient_weight=0`` is the forward-only inversion, ``forward_weight=0`` the gradient-only one).
        loss: the client's loss (``auto``: logistic for one output, cross-entropy otherwise).
    """

    rtol: float | None = None
    atol: float | None = None
    max_steps: int = 2000
    forward_weight: float = 1.0
    gradient_weight: float = 1.0
    loss: str = "auto"


def _tols(opts: CopaOptions, dtype):
    # LSMR keeps reducing its residual estimates below the dtype's epsilon: 1e-8 in float32 gains 30-60 dB
    # over 1e-6 on deep determined models (cnn6: 32 -> 91 dB) for ~1.5x the iterations
    base = 1e-13 if jnp.dtype(dtype) == jnp.float64 else 1e-8
    return (opts.rtol if opts.rtol is not None else base, opts.atol if opts.atol is not None else base)


# -------------------------------------------------------------------------------------------------------- head
def _bias_map(stage: Stage, leaves):
    """Linear map ``b -> contribution of b to z`` of the layer's bias, and its input structure."""
    bl = stage.nodes.bias_leaf
    x0 = jnp.zeros(stage.nodes.x_in.shape, leaves[stage.nodes.kernel_leaf].dtype)
    return lambda b: stage.affine(x0, with_leaf(leaves, bl, b)) - stage.affine(
        x0, with_leaf(leaves, bl, jnp.zeros_like(leaves[bl]))
    )


def _delta_of_logits(stage: Stage, loss: str, n_out: int):
    """``z_L -> dl/dz_L`` for one example ``z_L`` of shape ``(1, ...)``: the loss through the head's activation
    (``y`` one label, or one mask for a segmentation model: :func:`jaxinv._gradient.loss_fn` reads both)."""
    lf = loss_fn(loss, n_out)

    def delta(z, y):
        return jax.grad(lambda zz: lf(stage.activation(zz), y[None]))(z)

    return delta


def _head_scale(st: Stage, leaves, u, s, v, label, loss, n_out):
    r"""Solve :math:`c\,\delta(c) = \sigma u` for the scale :math:`c` of :math:`x_{L-1} = c v` (1-D search)."""
    sys = LayerSystem.build(st, leaves, jnp.zeros(st.nodes.z.shape, v.dtype))
    av, c0 = sys.forward(v), sys.forward_offset
    delta = _delta_of_logits(st, loss, n_out)
    target = s * u.reshape(av.shape)

    def misfit(c):
        d = delta(c * av + c0, label)
        r = c * d - target  # exact for the pair (u, v) the SVD returned: (-u, -v) flips c with it
        return jnp.sum(r * r)

    mags = jnp.logspace(-4, 5, 1801, dtype=v.dtype)
    grid = jnp.stack([mags, -mags])  # (2, N): each sign separately
    vals = jax.vmap(jax.vmap(misfit))(grid)
    # The consistency equation can have two roots (R-GAP's ambiguity: e.g. c(sigmoid(ca) - 1) = k has a small and a
    # large root). Every near-zero local minimum is a root; take the one with the smallest logit |c W v|: a large
    # logit means a confident prediction, whose gradient would be vanishing. Without roots, the best fit.
    left = jnp.concatenate([jnp.full((2, 1), jnp.inf, vals.dtype), vals[:, :-1]], axis=1)
    right = jnp.concatenate([vals[:, 1:], jnp.full((2, 1), jnp.inf, vals.dtype)], axis=1)
    tnorm = jnp.sum(target * target)
    roots = (vals <= left) & (vals <= right) & (vals < 1e-2 * tnorm)
    logit = jnp.abs(grid) * norm(av)
    flat = jnp.where(roots, logit, jnp.inf).reshape(-1)
    i = jnp.where(jnp.any(roots), jnp.argmin(flat), jnp.argmin(vals.reshape(-1)))
    c = grid.reshape(-1)[i]
    # refine in log-space around the best grid point (golden section)
    sign, lc = jnp.sign(c), jnp.log(jnp.abs(c))
    step = (jnp.log(mags[1]) - jnp.log(mags[0])).astype(v.dtype)
    lo, hi = lc - step, lc + step
    g = (math.sqrt(5) - 1) / 2

    def body(_, b):
        lo, hi = b
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        f1, f2 = misfit(sign * jnp.exp(m1)), misfit(sign * jnp.exp(m2))
        return jnp.where(f1 < f2, lo, m1), jnp.where(f1 < f2, m2, hi)

    lo, hi = jax.lax.fori_loop(0, 60, body, (lo, hi))
    c = sign * jnp.exp(0.5 * (lo + hi))
    return c * v, delta(c * av + c0, label)


# ------------------------------------------------------------------------------------------------ layer solve
def _solve_layer(sys: LayerSystem, z, gW, opts: CopaOptions, *, use_forward=True, mask=None):
    """Least-squares solve of one layer's stacked system; returns ``(x, residuals..., steps, status)``."""
    dtype = sys.x_struct.dtype
    rtol, atol = _tols(opts, dtype)
    fwd_target = (z - sys.forward_offset)
    if mask is not None:
        fwd_target = fwd_target * mask
    grd_target = gW - sys.gradient_offset
    fwd_fn = sys.forward if mask is None else (lambda x: sys.forward(x) * mask)
    nf = operator_norm(fwd_fn, sys.x_struct)
    ng = operator_norm(sys.gradient, sys.x_struct)
    safe = lambda n: jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)  # noqa: E731
    wf = safe(nf) * (opts.forward_weight if use_forward else 0.0)
    wg = safe(ng) * opts.gradient_weight
    op = sys.operator(wf, wg, mask)
    rhs = (wf * fwd_target, wg * grd_target)
    upcast = jax.config.jax_enable_x64 and dtype != jnp.float64
    if upcast:  # lineax's LSMR mixes Python-float scalars into lax.select: float32 data under x64 fails there
        f64 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), t)  # noqa: E731
        op = lx.FunctionLinearOperator(lambda x: f64(op.mv(x.astype(dtype))),
                                       jax.ShapeDtypeStruct(sys.x_struct.shape, jnp.float64))
        rhs = f64(rhs)
    sol = lx.linear_solve(op, rhs, lx.LSMR(rtol=rtol, atol=atol, max_steps=opts.max_steps), throw=False)
    x = sol.value.astype(dtype)
    fres = norm(fwd_fn(x) - fwd_target) / jnp.maximum(norm(fwd_target), jnp.finfo(dtype).tiny)
    gres = norm(sys.gradient(x) - grd_target) / jnp.maximum(norm(grd_target), jnp.finfo(dtype).tiny)
    if not use_forward:
        fres = jnp.full((), jnp.nan, dtype)
    status = solver_status(sol.result)
    finite = jnp.all(jnp.isfinite(x))
    status = jnp.where(finite, status, 4)
    x = jnp.where(finite, x, 0.0)
    steps = jnp.asarray(sol.stats.get("num_steps", -1), jnp.int32)
    return x, fres, gres, steps, status


def _bias_residual(stage: Stage, leaves, gleaves, delta):
    bl = stage.nodes.bias_leaf
    if bl < 0:
        return jnp.full((), jnp.nan, delta.dtype)
    bmap = _bias_map(stage, leaves)
    gb_hat = jax.linear_transpose(bmap, jax.ShapeDtypeStruct(leaves[bl].shape, leaves[bl].dtype))(delta)[0]
    gb = gleaves[bl]
    return norm(gb_hat - gb) / jnp.maximum(norm(gb), jnp.finfo(delta.dtype).tiny)


def _report(stage, use_forward, fres, gres, bres, clipped, steps, status, seconds=jnp.nan, refined=None):
    L = stage.layer
    extra = {} if refined is None else dict(refine_steps=refined.steps, refine_objective=refined.objective,
                                            lsq_residual=refined.lsq_residual)
    return LayerReport(
        path=L.path, kind=L.kind, unknowns=L.unknowns, forward_rows=L.forward_rows if use_forward else 0,
        gradient_rows=L.gradient_rows, forward_residual=fres, gradient_residual=gres, bias_residual=bres,
        clipped=jnp.asarray(clipped, jnp.int32), steps=steps, status=status,
        seconds=jnp.asarray(seconds, jnp.float32), **extra,
    )


def _correct(stages, l, sys: LayerSystem, x, x_lsq, z, gW, mask, opts: CopaOptions, box, below: float):
    r"""Restore a numerically determined layer's system after a refinement.

    :math:`x_c = x + d`, :math:`d` the minimum-norm least-squares solution of :math:`M d = r - M x`: the
    refinement's row-space part is replaced by the least-squares one, its null-space part kept
    (:math:`x_c - x_\text{lsq} = P_\text{null}(x - x_\text{lsq})`). When the refinement moved (almost) only in the
    row space, :math:`\rho = \|x_c - x_\text{lsq}\| / \|x - x_\text{lsq}\| <` ``below``, the system pins the answer
    down and the priors only traded exactness for smoothness: return :math:`x_c` (projected onto the box / the
    activation's image). Otherwise the layer is underdetermined and the refined ``x`` is kept (there the
    least-squares row-space part is where noise from the layers above is amplified, and the priors damp it).
    Returns ``(x, LSMR steps)``."""
    fwd = sys.forward(x) if mask is None else sys.forward(x) * mask
    d, _, _, more, _ = _solve_layer(sys, z - fwd, gW - sys.gradient(x), opts, mask=mask)
    xc = output_projection(stages, l, box, x.dtype)(x + d)
    rho = norm(x + d - x_lsq) / jnp.maximum(norm(x - x_lsq), jnp.finfo(x.dtype).tiny)
    return jnp.where(rho < below, xc, x), more


def _residuals(sys: LayerSystem, x, z, gW, mask):
    """Relative forward and gradient residuals of ``x`` (as :func:`_solve_layer` reports them)."""
    dtype = x.dtype
    tf = z - sys.forward_offset
    fwd = sys.forward
    if mask is not None:
        tf, fwd = tf * mask, (lambda v: sys.forward(v) * mask)
    tg = gW - sys.gradient_offset
    fres = norm(fwd(x) - tf) / jnp.maximum(norm(tf), jnp.finfo(dtype).tiny)
    gres = norm(sys.gradient(x) - tg) / jnp.maximum(norm(tg), jnp.finfo(dtype).tiny)
    return fres, gres


# -------------------------------------------------------------------------------------------------- the steps
def _head_step(model: Model, structure: Structure, gleaves, label, opts: CopaOptions):
    """Layer L: recover ``delta_L`` (and the label), solve for ``x_{L-1}``; return ``(x, dl/dx, label, report)``."""
    leaves = jax.tree_util.tree_leaves(model.params)
    st = structure.stages[-1]
    if st.nodes.kind == "block":
        raise HeadNotInvertibleError(
            f"the model's last stage {st.layer.path!r} is a block (branches joined at the output): its gradient does "
            "not give the output error in closed form; invert this model with jaxinv.attack('ig', ...)")
    n_out = math.prod(st.nodes.z.shape)
    k = st.nodes.kernel_leaf
    gW = gleaves[k]
    if st.nodes.bias_leaf >= 0:
        delta, _ = head_delta_direction(structure, gleaves)
        if label is None:
            label = label_from_delta(delta.reshape(-1), exact=True)
        sys = LayerSystem.build(st, leaves, delta)
        x, fres, gres, steps, status = _solve_layer(sys, jnp.zeros_like(sys.forward_offset), gW, opts, use_forward=False)
    else:
        u, s, v = rank_one(st, gleaves, leaves)
        if label is None:
            if n_out == 1:
                raise HeadNotInvertibleError(
                    f"the head {st.layer.path!r} has one output and no bias: the label cannot be read from the "
                    "gradient's sign; pass label= (0 or 1)"
                )
            label = label_from_delta(u, exact=False)
        loss = opts.loss
        x, delta = _head_scale(st, leaves, u, s, v, label, loss, n_out)
        sys = LayerSystem.build(st, leaves, delta)
        gres = norm(sys.gradient(x) - gW) / jnp.maximum(norm(gW), jnp.finfo(gW.dtype).tiny)
        fres = jnp.full((), jnp.nan, gW.dtype)
        steps, status = jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.int32)
        status = jnp.where(jnp.isfinite(gres) & (gres < 1e-2), status, 3)
    bres = _bias_residual(st, leaves, gleaves, delta)
    gx = sys.forward_transpose(delta)
    rep = _report(st, False, fres, gres, bres, 0, steps, status)
    return x, gx, jnp.asarray(label, jnp.int32), rep


def relu_active(x):
    r"""A reconstructed ReLU output with its solver noise removed: entries at most
    :math:`64\,\varepsilon\,\max|x|` (:math:`\varepsilon` the dtype's epsilon) are set to 0.

    The active set of a ReLU layer is read from its reconstructed output (:math:`x > 0`: an equality row and
    :math:`s' = 1`; else no row and :math:`\delta = 0`). Inactive units come back from the layer above as solver
    noise around 0, and half of them would be read as active with :math:`z \approx 0`, a wrong equation (their
    true pre-activation is negative): on R-GAP's CNN6 with ReLU that alone left the determined layers' residuals
    at 0.2-0.6 instead of 1e-7. The threshold sits just above LSMR's noise (tolerance 1e-8 relative in float32);
    a larger one (:math:`\sqrt{\varepsilon}`) misreads small true activations as inactive, whose
    :math:`\delta = 0` then corrupts the gradient rows (tested: 126 -> 47 dB on a wide ReLU layer)."""
    tau = 64 * jnp.finfo(x.dtype).eps * jnp.max(jnp.abs(x))
    return jnp.where(x > tau, x, jnp.zeros_like(x))


def _down_step(model: Model, structure: Structure, l: int, gleaves, x_l, gx_l, opts: CopaOptions,
               pullback: Pullback | None = None):
    """Layer l (0-based, below the head): from ``x_l`` (its output) and ``dl/dx_l`` to ``x_{l-1}``.

    With ``pullback``, the least-squares solution is refined by the pull-back constraints
    (:func:`jaxinv.engine._refine.pullback_layer`; for a ReLU layer also its inequality rows on inactive units)."""
    leaves = jax.tree_util.tree_leaves(model.params)
    st = structure.stages[l]
    act = st.activation
    if act.name in ("gelu", "silu"):
        raise ValueError(
            f"the activation after layer {st.layer.path!r} is {act}, which is not invertible on all of R; the "
            "layer-wise attacks support identity, tanh, sigmoid, leaky_relu, elu, softplus and relu. Use "
            "jaxinv.attack('ig', ...) for this model"
        )
    if act.name == "relu":
        x_l = relu_active(x_l)
    z, clipped = act.inverse(x_l)
    mask = (x_l > 0).astype(x_l.dtype) if act.name == "relu" else None
    delta = gx_l * act.derivative(z, x_l)
    if st.nodes.kind == "block":
        return _block_solve(st, leaves, gleaves, z, delta, mask, clipped, opts, l > 0)
    sys = LayerSystem.build(st, leaves, delta)
    x, fres, gres, steps, status = _solve_layer(sys, z, gleaves[st.nodes.kernel_leaf], opts, mask=mask)
    refined = None
    x_lsq = x
    if pullback is not None:
        gW = gleaves[st.nodes.kernel_leaf]
        x, refined = pullback_layer(structure.stages, l, leaves, sys, z, gW, mask, x, pullback)
        if pullback.correct > 0:
            x, more = _correct(structure.stages, l, sys, x, x_lsq, z, gW, mask, opts, pullback.box, pullback.correct)
            steps = steps + more
        fres, gres = _residuals(sys, x, z, gW, mask)
    bres = _bias_residual(st, leaves, gleaves, delta)
    gx = sys.forward_transpose(delta) if l > 0 else jnp.zeros_like(x)
    return x, gx, _report(st, True, fres, gres, bres, clipped, steps, status, refined=refined)


def _block_solve(st: Stage, leaves, gleaves, z, delta, mask, clipped, opts: CopaOptions, carry_down: bool):
    """A block below the head (:mod:`jaxinv.engine._block`): its input from its output and its parameters' gradient,
    jointly (:func:`jaxinv.engine._block.solve_block`); returns ``(u, dl/du, report)`` like a layer's step."""
    bs = BlockSystem(st, leaves, delta, st.nodes.leaves)
    g = tuple(gleaves[i] for i in st.nodes.leaves)
    rtol, atol = _tols(opts, z.dtype)
    u, steps = solve_block(bs, z, g, mask, rtol=rtol, atol=atol, max_steps=opts.max_steps)
    fres, gres = bs.residual_fn(z, g, mask)[1](u)
    finite = jnp.all(jnp.isfinite(u))
    status = jnp.where(~finite, 4, jnp.where(jnp.maximum(fres, gres) < 1e-2, 0, 3)).astype(jnp.int32)
    u = jnp.where(finite, u, 0.0)
    gu = bs.input_cotangent(u) if carry_down else jnp.zeros_like(u)
    return u, gu, _report(st, True, fres, gres, jnp.full((), jnp.nan, z.dtype), clipped, steps, status)


_head_jit = eqx.filter_jit(_head_step)
_down_jit = eqx.filter_jit(_down_step)


def _map_targets(fn, in_axes, *args, pullback=None):
    """``fn(*args)`` for every target: arguments with ``in_axes`` 0 are sliced along their leading axis and the
    results stacked, by ``lax.map`` (a compiled loop, one target at a time)."""
    if pullback is not None:
        args = args + (pullback,)
    batched = tuple(a for a, ax in zip(args, in_axes) if ax == 0)

    def one(b):
        it = iter(b)
        return fn(*(next(it) if ax == 0 else a for a, ax in zip(args, in_axes)))

    return jax.lax.map(one, batched)


_map_jit = eqx.filter_jit(_map_targets)


def _timed(traced: bool, fn, *args):
    """``(fn(*args), wall seconds)``; NaN seconds under a trace (nothing to wait for)."""
    t0 = time.perf_counter()
    out = fn(*args)
    if traced:
        return out, jnp.nan
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def _fold_down(traced: bool, structure: Structure, down, gleaves, x, gx, opts, head_rep, head_seconds, B: int):
    """The recursion below the head: a fold over the layers from the output down to the image.

    ``down[l]`` maps ``(gleaves, x_l, dl/dx_l, opts)`` to ``(x_{l-1}, dl/dx_{l-1}, report)``; ``x``, ``gx`` come from
    the head. Returns the image-layer input ``x_0``, the reports (input layer first, each with its wall seconds) and
    every layer's reconstructed input shaped ``(B, *in_shape)``."""
    def stamped(rep, sec):
        return eqx.tree_at(lambda r: r.seconds, rep, jnp.full(rep.seconds.shape, sec, jnp.float32))

    reports, inputs = [stamped(head_rep, head_seconds)], [x]

    def fold(carry, l):  # one layer down
        x, gx = carry
        (x, gx, rep), sec = _timed(traced, down[l], gleaves, x, gx, opts)
        reports.append(stamped(rep, sec))
        inputs.append(x)
        return x, gx

    x, _ = functools.reduce(fold, reversed(range(len(structure.stages) - 1)), (x, gx))
    layer_inputs = tuple(v.reshape((B,) + tuple(st.nodes.x_in.shape[1:]))
                         for v, st in zip(reversed(inputs), structure.stages))
    return x, tuple(reversed(reports)), layer_inputs


def _batching_mode(batching: str) -> str:
    if batching not in ("auto", "vmap", "map"):
        raise ValueError(f"batching must be 'auto', 'vmap' or 'map', got {batching!r}")
    if batching == "auto":
        return "vmap"
    return batching


# -------------------------------------------------------------------------------------------------- the entry
def _is_traced(*trees) -> bool:
    return any(isinstance(l, jax.core.Tracer) for t in trees for l in jax.tree_util.tree_leaves(t))


def copa(
    model: Model,
    grads: PyTree,
    *,
    label: int | Int[Array, "..."] | None = None,
    input_shape: tuple[int, ...] | None = None,
    loss: str = "auto",
    max_steps: int = 2000,
    rtol: float | None = None,
    atol: float | None = None,
    forward_weight: float = 1.0,
    gradient_weight: float = 1.0,
    pullback: bool | Pullback = False,
    batching: str = "auto",
    batch_size: int | None = None,
    local_steps: int = 1,
    local_lr: float | None = None,
    fedavg_iters: int = 30,
    key: Any = None,
) -> Reconstruction:
    r"""Reconstruct the input from a single-image gradient, layer by layer (COPA / R-GAP least squares).

    Args:
        model: the model the client trained (:func:`jaxinv.from_linen` / ``from_nnx`` / ``from_fn``).
        grads: the shared gradient, a pytree shaped like ``model.params`` — or with one extra leading axis ``T``
            on every leaf for ``T`` independent targets (each one image), solved in one ``vmap``.
        label: the image's label (int, or shape ``(T,)`` for stacked targets); ``None`` recovers it from the
            head's gradient (iDLG rule) and reports it in ``.label``.
        input_shape: shape of one input without the batch axis (default: the model's).
        loss: the client's loss (``auto``, ``cross_entropy``, ``logistic``); only used by bias-free heads and
            for the reported gradient distance.
        max_steps, rtol, atol: LSMR options per layer (tolerances default to 1e-8 in float32, 1e-13 in float64).
        forward_weight, gradient_weight: weights of the two constraint blocks after norm balancing.
        pullback: refine every layer's least-squares solution below the head with the pull-back constraints
            (Chen & Campbell 2021): the solution must be an output of the layer below (inside its activation's
            image, pre-activation in the range of its linear map), the image must lie in the pixel box and have
            small total variation; ReLU layers add their inequality rows. ``True`` uses the default weights;
            pass :class:`jaxinv.Pullback` (``system``, ``range``, ``inequality``, ``tv``, ``box``, ``steps``,
            ``lr``, ...) to change them. Each layer's refinement is one compiled Adam loop started at the
            least-squares solution (:mod:`jaxinv.engine._refine`); its steps, objective and the least-squares
            residual before it are in the layer's report. ``False`` (default): plain least squares.
        batching: how stacked targets are solved: ``"vmap"`` (one batched solve per layer; what accelerators
            and sharded targets want, see :func:`jaxinv.shard_targets`) or ``"map"`` (``lax.map``: one target after
            another inside one compiled loop, each with its own number of LSMR iterations; on CPU 1.4-1.8x faster
            per target, because vmapped convolutions by a batched kernel become grouped convolutions; on R-GAP's
            CNN6 one of 8 photos came out at 63 dB instead of 95, not yet explained: it is not the gradient's
            rounding, since relative perturbations of 1e-7 change CNN6's results by less than 0.5 dB).
            ``"auto"`` (default) is ``vmap``.
        batch_size: ``B > 1`` images behind one (unstacked) gradient, when ``label`` is ``None`` (their labels are
            then recovered as a multiset, :func:`jaxinv.recover_labels`); a ``label`` of shape ``(B,)`` with an
            unstacked gradient means the same. The head separates the batch when it is a dense layer with a bias
            and at least ``B`` outputs; the layers below are solved jointly (:mod:`jaxinv.engine._batch`). Images come
            back in no particular order (:func:`jaxinv.metrics.match`).
        local_steps, local_lr, fedavg_iters: the shared object is a FedAvg update after ``local_steps``
            :math:`K > 1` SGD steps with learning rate ``local_lr`` :math:`\eta`, passed as
            :func:`jaxinv.update_as_gradient` :math:`\bar g = -\Delta/(K\eta)`. The first-order reading
            :math:`\bar g \approx \nabla\ell(\theta_0)` is corrected by a fixed point: with the current
            reconstruction :math:`\hat x_t`, :math:`\hat g_{t} = \bar g - (\bar g_\text{sim}(\hat x_t) -
            \nabla\ell(\theta_0; \hat x_t))` (the client's steps simulated on :math:`\hat x_t`) and
            :math:`\hat x_{t+1} = \mathrm{COPA}(\hat g_t)`, at most ``fedavg_iters`` times (the truth is a fixed
            point; on cnn2_c1 with :math:`K=2, \eta=0.01` 18 dB -> 116 dB in 8 iterations, slower as
            :math:`K\eta` grows). ``loss_trace`` holds :math:`\|\bar g_\text{sim}(\hat x_t) - \bar g\| /
            \|\bar g\|` per iteration.
        key: the random restarts of a batch's head separation (default ``jax.random.key(0)``); single images are
            deterministic.

    Returns:
        A :class:`Reconstruction`: ``.image`` of shape ``(T or 1, *input_shape)``, ``.label``, per-layer
        ``.layers`` (input layer first) with residuals, clipping counts, solver steps and status.

    Example:
        >>> grads = jaxinv.client_gradient(model, x, y)
        >>> rec = jaxinv.copa(model, grads, input_shape=(32, 32, 3))
        >>> jaxinv.psnr(rec.image, x)
    """
    if local_steps != 1:
        return _copa_fedavg(model, grads, label=label, input_shape=input_shape, loss=loss, max_steps=max_steps,
                            rtol=rtol, atol=atol, forward_weight=forward_weight, gradient_weight=gradient_weight,
                            pullback=pullback, batching=batching, batch_size=batch_size, local_steps=local_steps,
                            local_lr=local_lr, fedavg_iters=fedavg_iters, key=key)
    structure = model.structure(input_shape)
    gleaves, T = validate_grads(model, grads)
    lshape = label_shape(structure.stages[-1].nodes.x_out.shape[1:])
    if lshape:
        return _copa_segmentation(model, structure, gleaves, T, label, lshape, loss, pullback, batch_size,
                                  CopaOptions(rtol=rtol, atol=atol, max_steps=max_steps, forward_weight=forward_weight,
                                              gradient_weight=gradient_weight, loss="cross_entropy"))
    n_out = math.prod(structure.stages[-1].nodes.x_out.shape)
    n_lab = 2 if n_out == 1 else n_out
    loss = loss if loss != "auto" else ("logistic" if n_out == 1 else "cross_entropy")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if label is not None:
        label = check_labels(jnp.asarray(label), n_lab)
        if batch_size is not None and T is None and label.size != batch_size:
            raise ValueError(f"label has {label.size} entries but batch_size is {batch_size}")
    if T is None and ((label is not None and label.size > 1) or (batch_size or 1) > 1):
        blocks = structure.blocks
        if blocks:
            raise ValueError(f"batch gradients are not supported on models with blocks ({', '.join(blocks)}) yet: "
                             "use jaxinv.attack('ig', ..., batch_size=B)")
        if pullback is not False:
            raise ValueError("pullback is not supported for batch gradients yet: use pullback=False")
        return _copa_batch(model, structure, gleaves, label, batch_size, loss, n_out, key,
                           CopaOptions(rtol=rtol, atol=atol, max_steps=max_steps, forward_weight=forward_weight,
                                       gradient_weight=gradient_weight, loss=loss))
    del key
    if label is not None:
        if T is not None and label.shape != (T,):
            raise ValueError(f"label must have shape ({T},) for {T} stacked targets, got {tuple(label.shape)}")
        if T is None:
            label = label.reshape(())
    opts = CopaOptions(rtol=rtol, atol=atol, max_steps=max_steps, forward_weight=forward_weight,
                       gradient_weight=gradient_weight, loss=loss)
    pb = as_pullback(pullback)
    blocks = structure.blocks
    if pb is not None and blocks:
        raise ValueError(f"pullback is not supported on models with blocks ({', '.join(blocks)}): a block is solved "
                         "jointly by Levenberg-Marquardt, not by a linear system to refine; use pullback=False")
    traced = _is_traced(grads, label, model.params)
    t_start = time.perf_counter()

    timed = functools.partial(_timed, traced)

    head = functools.partial(_head_jit, model, structure)
    if pb is None:
        down = [functools.partial(_down_jit, model, structure, l) for l in range(len(structure.stages) - 1)]
    else:
        down = [functools.partial(_down_jit, model, structure, l, pullback=pb)
                for l in range(len(structure.stages) - 1)]
    if T is not None:
        mode = _batching_mode(batching)
        if mode == "vmap":
            head = eqx.filter_vmap(head, in_axes=(0, 0 if label is not None else None, None))
            down = [eqx.filter_vmap(d, in_axes=(0, 0, 0, None)) for d in down]
        else:
            head = functools.partial(_map_jit, _head_step, (None, None, 0, 0 if label is not None else None, None),
                                     model, structure)
            down = [functools.partial(_map_jit, _down_step, (None, None, None, 0, 0, 0, None, None), model, structure,
                                      l, pullback=pb) for l in range(len(structure.stages) - 1)]

    (x, gx, lab, rep), sec = timed(head, gleaves, label, opts)
    B = T if T is not None else 1
    x, reports, layer_inputs = _fold_down(traced, structure, down, gleaves, x, gx, opts, rep, sec, B)
    image = x.reshape((B,) + structure.input_shape)
    labels = lab.reshape(-1)
    dist = _gradient_distance(model, image, labels, gleaves, loss, n_out, T)
    total = jnp.nan if traced else time.perf_counter() - t_start
    return Reconstruction(
        image=image, label=labels, layers=reports, attack="copa",
        loss_trace=jnp.zeros((labels.shape[0], 0), image.dtype), gradient_distance=dist,
        seconds=jnp.asarray(total, jnp.float32), layer_inputs=layer_inputs,
    )


def _copa_segmentation(model, structure, gleaves, T, label, lshape, loss, pullback, batch_size, opts):
    """Argument checks for a segmentation model's gradient, then :func:`jaxinv.engine._seg.copa_seg`."""
    from ._seg import copa_seg

    K = structure.stages[-1].nodes.x_out.shape[-1]
    want = (T,) + lshape if T is not None else lshape
    if label is None:
        raise ValueError(
            f"model {model.name!r} is a segmentation model (logits {structure.stages[-1].nodes.x_out.shape[1:]} per "
            f"image): pass label= the client's mask of shape {want} (class indices per pixel). A segmentation "
            "gradient sums the error over pixels, so its mask is not read off the head's sign as a classifier's label is")
    label = check_labels(jnp.asarray(label), K, name="label")
    if label.shape == (1,) + lshape and T is None:
        label = label[0]
    if tuple(label.shape) != want:
        raise ValueError(f"label (the mask) must have shape {want} for model {model.name!r}, got {tuple(label.shape)}"
                         + (f" ({T} stacked targets: one mask each)" if T is not None else ""))
    if (batch_size or 1) > 1:
        raise ValueError("batch_size > 1 is not supported for segmentation gradients by copa: use "
                         "jaxinv.attack('ig', ..., batch_size=B) with masks of shape (B, H, W)")
    if pullback is not False:
        raise ValueError("pullback is not supported for segmentation gradients yet: use pullback=False")
    return copa_seg(model, structure, gleaves, label, T, loss, opts)


def _copa_fedavg(model, grads, *, local_steps, local_lr, fedavg_iters, **kw) -> Reconstruction:
    """COPA on a FedAvg update read as a gradient, corrected by simulating the client's steps (see :func:`copa`)."""
    from .._fedavg import _check_steps_lr, local_update, update_as_gradient
    from .._gradient import client_gradient

    K, lr = _check_steps_lr(local_steps, local_lr, "copa")
    if isinstance(fedavg_iters, bool) or not isinstance(fedavg_iters, int) or fedavg_iters < 1:
        raise ValueError(f"fedavg_iters must be a positive integer, got {fedavg_iters!r}")
    _, T = validate_grads(model, grads)
    loss = kw.get("loss", "auto")

    def correction(x, y):  # what the K steps add to the first-order reading, for one target's images
        sim = update_as_gradient(local_update(model, x, y, steps=K, lr=lr, loss=loss), steps=K, lr=lr)
        g0 = client_gradient(model, x, y, loss=loss)
        return jax.tree_util.tree_map(lambda a, b: a - b, sim, g0), sim

    @jax.jit
    def step(image, labels):
        x = jnp.clip(image, 0.0, 1.0)
        if T is None:
            corr, sim = correction(x, labels)
        else:
            corr, sim = jax.vmap(lambda xi, yi: correction(xi[None], yi[None]))(x, labels)
        g_hat = jax.tree_util.tree_map(lambda o, c: o - c, grads, corr)
        axes = tuple(range(1, 1 + (T is not None)))

        def dist(a, b):  # relative distance of the simulated update to the shared one, per target
            num = sum(jnp.sum((u - v) ** 2, axis=tuple(range(len(axes), u.ndim)))
                      for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
            den = sum(jnp.sum(v**2, axis=tuple(range(len(axes), v.ndim))) for v in jax.tree_util.tree_leaves(b))
            return jnp.sqrt(num / jnp.maximum(den, 1e-30)).reshape(-1)

        return g_hat, dist(sim, grads)

    rec = copa(model, grads, **kw)
    trace = []
    prev = rec.image
    for _ in range(fedavg_iters):
        g_hat, d = step(rec.image, rec.label if T is not None or rec.label.size > 1 else rec.label.reshape(1))
        trace.append(d)
        kw_t = dict(kw, label=rec.label if (T is not None or rec.label.size > 1) else rec.label[0])
        rec = copa(model, g_hat, **kw_t)
        change = float(jnp.max(jnp.abs(rec.image - prev)))
        prev = rec.image
        if change < 1e-6:
            break
    _, d = step(rec.image, rec.label if T is not None or rec.label.size > 1 else rec.label.reshape(1))
    trace.append(d)
    return eqx.tree_at(lambda r: (r.loss_trace, r.gradient_distance), rec,
                       (jnp.stack(trace, -1).reshape(-1, len(trace)), d.reshape(-1)))


def _copa_batch(model, structure, gleaves, label, batch_size, loss, n_out, key, opts) -> Reconstruction:
    """COPA on one gradient of a batch of ``B`` images (:mod:`jaxinv.engine._batch`)."""
    from ._batch import _down_batch_jit, _head_batch_jit, check_batch_head

    B = int(label.size) if label is not None else int(batch_size)
    check_batch_head(structure, B, loss)
    if label is None:
        label = recover_labels(model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(model.params),
                                                                   gleaves), B, input_shape=structure.input_shape)
    label = jnp.asarray(label, jnp.int32).reshape(-1)
    key = jax.random.key(0) if key is None else key
    t_start = time.perf_counter()
    (X, GX, rep), sec = _timed(False, _head_batch_jit, model, structure, gleaves, label, key, opts, 4, 100)
    down = [functools.partial(_down_batch_jit, model, structure, l) for l in range(len(structure.stages) - 1)]
    X, reports, layer_inputs = _fold_down(False, structure, down, gleaves, X, GX, opts, rep, sec, B)
    image = X.reshape((B,) + structure.input_shape)
    lf = loss_fn(loss, n_out)
    g_hat = jax.tree_util.tree_leaves(jax.grad(lambda p: lf(model.apply_fn(p, image), label))(model.params))
    num = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(g_hat, gleaves)))
    den = jnp.sqrt(sum(jnp.sum(b**2) for b in gleaves))
    return Reconstruction(
        image=image, label=label, layers=reports, attack="copa",
        loss_trace=jnp.zeros((1, 0), image.dtype), gradient_distance=(num / jnp.maximum(den, 1e-30)).reshape(1),
        seconds=jnp.asarray(time.perf_counter() - t_start, jnp.float32), layer_inputs=layer_inputs)


def gradient_distance(model: Model, image, label, gleaves, loss: str, n_out: int) -> Array:
    r"""Relative distance :math:`\|g(\hat x) - g\| / \|g\|` for one target (image ``(1, ...)``)."""
    lf = loss_fn(loss, n_out)
    label = label.reshape((1,) + label.shape)  # one label, or one mask (segmentation)
    g_hat = jax.tree_util.tree_leaves(jax.grad(lambda p: lf(model.apply_fn(p, image), label))(model.params))
    num = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(g_hat, gleaves)))
    den = jnp.sqrt(sum(jnp.sum(b**2) for b in gleaves))
    return num / jnp.maximum(den, jnp.finfo(image.dtype).tiny)


@eqx.filter_jit
def _gd_batched(model, image, label, gleaves, loss, n_out, stacked):
    if stacked:
        return jax.vmap(lambda i, y, g: gradient_distance(model, i[None], y, g, loss, n_out))(image, label, gleaves)
    return gradient_distance(model, image, label, gleaves, loss, n_out)[None]


def _gradient_distance(model, image, labels, gleaves, loss, n_out, T):
    return _gd_batched(model, image, labels if T is not None else labels[0], gleaves, loss, n_out, T is not None)
