r"""Pull-back constraints: what a layer's solution must also satisfy, as small composable penalty terms.

COPA solves layer :math:`l` for its input :math:`x = x_{l-1}` in least squares (:mod:`jaxinv.engine._copa`). When that
system is underdetermined, the least-squares (minimum-norm) answer is one point of an affine set, and most of it
is not a possible input. The **pull-back** (Chen & Campbell 2021) says which points are: :math:`x_{l-1}` is itself
the output of layer :math:`l-1`,

.. math:: x_{l-1} = s_{l-1}(z), \qquad z - c_{l-1} \in \operatorname{range}(A_{l-1}),

so :math:`x` lies in the activation's image (tanh :math:`(-1, 1)`, sigmoid :math:`(0, 1)`, ReLU/softplus
:math:`\ge 0`, ELU :math:`> -\alpha`), and :math:`s^{-1}(x) - c` lies in the range of the preceding linear map. For
the input layer the pull-back is the image prior: the pixel box and (optionally) total variation.

None of this is linear, so the refinement is an optimisation started at the least-squares solution:

.. math::

    \min_{z,\,u}\ \underbrace{w_\text{sys}\,\frac{\|W(M\,s(z) - r)\|^2}{\|W r\|^2}}_{\text{the layer's system}}
    + \underbrace{w_\text{range}\,\frac{\|A_{l-1}u + c_{l-1} - z\|^2}{\|z_0\|^2}}_{\text{range of } A_{l-1}}
    + \underbrace{w_\text{ineq}\,\frac{\|W (1-m)\odot\max(0, A_l s(z) + c_l)\|^2}{\|W r\|^2}}_{\text{ReLU: inactive units}}
    + \underbrace{w_\text{tv}\,\mathrm{TV}(\cdot)}_{\text{image prior}}

with :math:`W` the block balancing of :func:`jaxinv.copa` (forward and gradient blocks scaled by the inverse of
their operator norms) and :math:`m` the active units of a ReLU layer. The distance of :math:`z - c` to the range of
:math:`A_{l-1}` is computed matrix-free through an **auxiliary variable** :math:`u` (the input of layer
:math:`l-1`) optimised jointly: :math:`\min_u \|A_{l-1}u + c - z\|^2 = \|(I - P)(z - c)\|^2` with :math:`P` the
projection onto the range. The image of the activation is exact by construction: the optimiser moves
:math:`z` and :math:`x = s(z)` (ReLU: :math:`x` projected onto :math:`x \ge 0`); the pixel box is a projection.

**Lookahead.** The auxiliary :math:`u` is an estimate of :math:`x_{l-2}`; it gets the constraints of its own layer
(the activation image of layer :math:`l-2`, or, when :math:`u` is the image, the pixel box and total variation).
This is what makes the pull-back useful on the papers' networks: the image prior then shapes the layer above the
input, where the deficiency is (cnn3_c1, cnn4_c1).

**Exactness.** On a layer whose system is determined the priors could only trade the exact answer for smoothness;
the refinement is followed by one more LSMR solve that restores the system in its row space, kept when the
refinement had moved almost only in the row space (``Pullback.correct``). **ReLU** layers add their inequality
rows :math:`A_l x + c_l \le 0` on inactive units (hinge), and a refined ReLU output gets exact zeros where the
auxiliary input's pre-activation is not positive (the next layer reads its active set from :math:`x > 0`).

The building blocks are small and optax-like: a :class:`Term` is a pure penalty function of the decoded variables
with a weight, :func:`compose` sums terms, and :func:`adam_refine` runs projected Adam on the sum in one compiled
``lax.while_loop`` (with convergence stopping). :func:`pullback_layer` assembles them for one layer of
:func:`jaxinv.copa`; :mod:`jaxinv.attacks._hybrid` reuses :func:`adam_refine` and :func:`layer_system`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optax
from jaxtyping import Array, PyTree

from .._activations import Activation
from .._maps import LayerSystem, norm, operator_norm
from .._priors import box_projection
from .._priors import total_variation as image_tv
from ._layer import solve_layer
from ._options import Solver

__all__ = [
    "Pullback",
    "Term",
    "activation_box",
    "adam_refine",
    "box_projection",
    "compose",
    "layer_system",
    "pullback_layer",
    "range_penalty",
    "relu_inactive",
    "total_variation",
]


# ------------------------------------------------------------------------------------------------------ options
class Pullback(eqx.Module):
    r"""Weights and optimiser settings of the pull-back refinement (``jaxinv.copa(..., pullback=Pullback(...))``).

    Every weight multiplies a dimensionless term (see the module docstring), so the defaults carry over between
    architectures. ``pullback=True`` means ``Pullback()``.

    Attributes:
        system: :math:`w_\text{sys}`, the layer's own stacked system, relative residual squared (keeps the
            refinement from drifting away from what the gradient says).
        range: :math:`w_\text{range}`, squared distance of :math:`z - c_{l-1}` to the range of :math:`A_{l-1}`
            relative to :math:`\|z_0\|^2` (through the auxiliary input :math:`u`).
        inequality: :math:`w_\text{ineq}`, the ReLU inequalities :math:`A_l x + c_l \le 0` on inactive units
            (hinge squared, relative like the system term), for ReLU layers.
        tv: :math:`w_\text{tv}`, total variation (mean absolute neighbour difference, as in Geiping et al.) of the
            image: of :math:`x` on the input layer and of the auxiliary :math:`u` on the layer above it.
            0 disables it.
        box: the model's input range ``(lo, hi)`` (``(0, 1)`` for :mod:`jaxinv.zoo` models); ``None``: no box.
        lookahead: give the auxiliary :math:`u` the constraints of its own layer (box and TV for the image,
            the activation's image for a hidden layer). ``False``: :math:`u` is free (pure range distance).
        steps: maximum Adam iterations per layer.
        lr: Adam's learning rate, relative to the RMS of each variable at the start; cosine-decayed to 0.
        tol, window: stop when the objective's relative change over ``window`` steps is below ``tol``.
        margin: the starting point is moved this far (relative to the image's width) inside a bounded activation
            image before inverting it (at the boundary the activation is flat and the optimiser would not move).
        correct: threshold of the exactness correction on numerically determined layers. After the refinement,
            :math:`x_c = \Pi(x + d)` with :math:`d` the minimum-norm least-squares solution of
            :math:`M d = r - M x` (one more LSMR solve; :math:`\Pi` the box / activation image) replaces the
            row-space part of :math:`x` by the least-squares one. It is used when the refinement moved almost only
            in the row space, :math:`\|P_\text{null}(x - x_\text{lsq})\| < \text{correct}\,\|x -
            x_\text{lsq}\|`: the layer is determined, and the priors could only trade an exact answer for
            smoothness (measured: a determined ReLU layer drops from 112 to 28 dB without it). On an
            underdetermined layer (null-space fraction 0.4-0.8 on the papers' networks) the refined ``x`` is kept.
            0 disables the correction.
    """

    system: float = 1.0
    range: float = 1.0
    inequality: float = 1.0
    tv: float = 0.1
    box: tuple[float, float] | None = (0.0, 1.0)
    lookahead: bool = True
    steps: int = 2000
    lr: float = 0.1
    tol: float = 1e-6
    window: int = 100
    margin: float = 1e-2
    correct: float = 0.1


def as_pullback(pullback: Any) -> Pullback | None:
    """``False``/``None`` -> ``None``, ``True`` -> ``Pullback()``, a :class:`Pullback` as is (eager type check)."""
    if pullback is None or pullback is False:
        return None
    if pullback is True:
        return Pullback()
    if isinstance(pullback, Pullback):
        if not (isinstance(pullback.steps, int) and pullback.steps >= 1):
            raise ValueError(f"Pullback.steps must be an integer >= 1, got {pullback.steps!r}")
        if pullback.box is not None and not float(pullback.box[0]) < float(pullback.box[1]):
            raise ValueError(f"Pullback.box=(lo, hi) needs lo < hi, got {pullback.box!r}")
        for name in ("system", "range", "inequality", "tv", "lr", "correct"):
            v = getattr(pullback, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"Pullback.{name} must be a finite number >= 0, got {v!r}")
        return pullback
    raise TypeError(
        f"pullback must be True, False or a jaxinv.Pullback(...) with the weights, got {type(pullback).__name__}"
    )


# ------------------------------------------------------------------------------------------------------ the terms
class Term(NamedTuple):
    r"""One piece of a refinement objective: ``weight * penalty(v)``.

    ``penalty`` is a pure function of the decoded variables ``v`` (a dict such as ``{"x": ..., "z": ..., "u": ...}``),
    non-negative and zero when the constraint holds. Terms compose by a sum (:func:`compose`).
    """

    penalty: Callable[[dict], Array]
    weight: float = 1.0
    name: str = "term"


def compose(*terms: Term) -> Callable[[dict], Array]:
    r"""The objective :math:`\sum_i w_i\, p_i(v)` of some terms (terms with weight 0 are dropped)."""
    live = [t for t in terms if t.weight != 0]

    def objective(v):
        out = 0.0
        for t in live:
            out = out + t.weight * t.penalty(v)
        return out

    return objective


def _tiny(dtype):
    return jnp.finfo(dtype).tiny


def balance_weights(sys: LayerSystem, mask=None):
    r"""COPA's block balancing :math:`(1/\|A\|_2,\ 1/\|B\|_2)` of one layer's system (as :func:`_solve_layer`)."""
    fwd = sys.forward if mask is None else (lambda x: sys.forward(x) * mask)
    nf = operator_norm(fwd, sys.x_struct)
    ng = operator_norm(sys.gradient, sys.x_struct)
    safe = lambda n: jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)  # noqa: E731
    return safe(nf), safe(ng)


def layer_system(sys: LayerSystem, z, gW, *, mask=None, weights=None, on: str = "x", name="system") -> Term:
    r"""The layer's stacked system as a penalty on its input ``v[on]``:

    .. math:: p(x) = \frac{\|w_f\, m\odot(A x - (z - c))\|^2 + \|w_g (B x - (g_W - B_0))\|^2}
                          {\|w_f\, m\odot(z - c)\|^2 + \|w_g (g_W - B_0)\|^2}

    (``weights = (w_f, w_g)``: COPA's block balancing, computed when not given; ``mask`` the ReLU active units).
    """
    wf, wg = balance_weights(sys, mask) if weights is None else weights
    m = 1.0 if mask is None else mask
    tf = (z - sys.forward_offset) * m
    tg = gW - sys.gradient_offset
    scale = jnp.maximum(jnp.sum((wf * tf) ** 2) + jnp.sum((wg * tg) ** 2), _tiny(tg.dtype))

    def penalty(v):
        x = v[on]
        rf = wf * (sys.forward(x) * m - tf)
        rg = wg * (sys.gradient(x) - tg)
        return (jnp.sum(rf * rf) + jnp.sum(rg * rg)) / scale

    return Term(penalty, 1.0, name)


def relu_inactive(sys: LayerSystem, mask, *, wf=1.0, scale=1.0, weight=1.0, on: str = "x") -> Term:
    r"""ReLU's inequality rows: an inactive unit (:math:`x_l = 0`) has :math:`z_l = A_l x + c_l \le 0`.

    .. math:: p(x) = \|w_f\,(1 - m)\odot\max(0,\ A_l x + c_l)\|^2 / \text{scale}

    (``wf``, ``scale``: the system term's forward weight and normaliser, so both terms are comparable).
    """
    off = 1.0 - mask

    def penalty(v):
        h = jnp.maximum(sys.forward(v[on]) + sys.forward_offset, 0.0) * off * wf
        return jnp.sum(h * h) / scale

    return Term(penalty, weight, "relu_inactive")


def range_penalty(forward: Callable, offset, act: Activation, scale, *, weight=1.0) -> Term:
    r"""Distance of :math:`x` to the outputs of the layer below, through its input ``v["u"]``.

    Invertible activation (``v["z"]`` the pre-activation): :math:`\|A u + c - z\|^2 / \text{scale}`.
    ReLU (``v["x"]``): active units must match, inactive ones need a non-positive pre-activation:
    :math:`r = [x > 0]\,(A u + c - x) + [x = 0]\max(0, A u + c)`, :math:`\|r\|^2/\text{scale}`.
    """
    if act.name == "relu":
        def penalty(v):
            p = forward(v["u"]) + offset
            x = v["x"]
            r = jnp.where(x > 0, p - x, jnp.maximum(p, 0.0))
            return jnp.sum(r * r) / scale
    else:
        def penalty(v):
            r = forward(v["u"]) + offset - v["z"]
            return jnp.sum(r * r) / scale

    return Term(penalty, weight, "range")


def total_variation(on: str, *, weight=1.0) -> Term:
    r"""Total variation of an image ``v[on]`` (NHWC): :math:`\sum_{a\in\{H, W\}} \operatorname{mean}|\Delta_a x|`
    (the attacks' :func:`jaxinv.attacks.total_variation`, Geiping et al.'s prior)."""
    return Term(lambda v: image_tv(v[on]), weight, "tv")


def activation_box(act: Activation, dtype) -> tuple[float, float] | None:
    r"""The closed interval strictly inside the activation's image that :meth:`Activation.inverse` accepts without
    clipping (``None`` when the image is all of :math:`\mathbb R`)."""
    lo, hi = act.image
    if not (math.isfinite(lo) or math.isfinite(hi)):
        return None
    eps = 16 * float(jnp.finfo(dtype).eps)
    lo_c = lo + eps * max(1.0, abs(lo)) if math.isfinite(lo) else -math.inf
    hi_c = hi - eps * max(1.0, abs(hi)) if math.isfinite(hi) else math.inf
    if act.name == "softplus":
        lo_c = float(jnp.finfo(dtype).tiny) * 1e7
    if act.name == "relu":
        lo_c = 0.0  # ReLU's image is closed
    return lo_c, hi_c


def output_projection(stages: tuple, l: int, box, dtype) -> Callable[[Array], Array]:
    """Projection of layer ``l``'s input onto where it must lie: the pixel ``box`` for the input layer, the closed
    interior of the activation's image of layer ``l - 1`` otherwise."""
    if l == 0:
        return box_projection(None if box is None else (float(box[0]), float(box[1])))
    return box_projection(activation_box(stages[l - 1].activation, dtype))


# -------------------------------------------------------------------------------------------------- the optimiser
class RefineResult(NamedTuple):
    """What :func:`adam_refine` returns: the best iterate, its objective, the trace and the iterations run."""

    params: PyTree
    value: Array
    trace: Array
    steps: Array


def adam_refine(
    objective: Callable[[PyTree], Array],
    params0: PyTree,
    *,
    project: Callable[[PyTree], PyTree] = lambda p: p,
    steps: int,
    lr: float,
    tol: float,
    window: int,
    atol: float = 1e-10,
    log_every: int = 10,
    scales: PyTree | None = None,
) -> RefineResult:
    r"""Projected Adam on ``objective`` from ``params0``, one compiled ``lax.while_loop``.

    Each step: :math:`p \leftarrow \Pi(p - \eta_i\, s \odot \mathrm{adam}(\nabla f(p)))` with :math:`\Pi` =
    ``project``, :math:`s` = ``scales`` (per leaf: the variable's natural size, so ``lr`` is relative) and
    :math:`\eta_i` cosine-decayed from ``lr`` to 0 over ``steps``. The loop keeps the best evaluated iterate and
    stops after ``steps`` iterations, or when the objective is not finite, or when it has converged: every
    ``window`` steps, :math:`|f_i - f_{i-\text{window}}| \le \text{tol}\,|f_{i-\text{window}}| + \text{atol}`
    (the absolute part stops layers whose start is already exact, where the objective is ~0).
    The objective is logged every ``log_every`` steps (``trace``, NaN after a stop).
    """
    if scales is None:
        scales = jax.tree_util.tree_map(lambda a: jnp.ones((), a.dtype), params0)
    steps = max(int(steps), 1)
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
    vg = jax.value_and_grad(objective)
    p0 = project(params0)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(p0))
    n_log = -(-steps // log_every)

    def cond(c):
        return (c[0] < steps) & ~c[-1]

    def body(c):
        i, p, state, best, best_val, trace, ref, _ = c
        val, g = vg(p)
        val = val.astype(dtype)
        upd, state = opt.update(g, state, p)
        upd = jax.tree_util.tree_map(lambda a, s: a * s, upd, scales)
        finite = jnp.isfinite(val)
        better = finite & (val < best_val)
        best = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), p, best)
        best_val = jnp.where(better, val, best_val)
        slot = i // log_every
        trace = trace.at[slot].set(jnp.where(i % log_every == 0, val, trace[slot]))
        check = (i + 1) % window == 0
        converged = check & jnp.isfinite(ref) & (jnp.abs(val - ref) <= tol * jnp.abs(ref) + atol)
        ref = jnp.where(check, val, ref)
        p = project(optax.apply_updates(p, upd))
        return i + 1, p, state, best, best_val, trace, ref, converged | ~finite

    inf = jnp.asarray(jnp.inf, dtype)
    c0 = (jnp.asarray(0, jnp.int32), p0, opt.init(p0), p0, inf, jnp.full((n_log,), jnp.nan, dtype), inf,
          jnp.asarray(False))
    i, _, _, best, best_val, trace, _, _ = jax.lax.while_loop(cond, body, c0)
    return RefineResult(best, best_val, trace, i)


def rms_scale(a) -> Array:
    """Root mean square of ``a`` (the step scale of a variable), floored at a small fraction of 1."""
    return jnp.maximum(jnp.sqrt(jnp.mean(a * a)), 1e-3).astype(a.dtype)


# --------------------------------------------------------------------------------------------- one layer of COPA
class PullbackReport(NamedTuple):
    """Diagnostics of one layer's refinement (into :class:`jaxinv.LayerReport`)."""

    steps: Array
    objective: Array
    lsq_residual: Array


def _lsq_input(forward: Callable, x_struct, target, mask=None, max_steps: int = 200):
    r"""Minimum-norm least-squares :math:`u` with :math:`m\odot A u \approx m\odot t` (few LSMR steps, scaled)."""
    fwd = forward if mask is None else (lambda u: forward(u) * mask)
    n = operator_norm(fwd, x_struct)
    n = jnp.where(n > 0, n, 1.0)
    t = target if mask is None else target * mask
    op = lx.FunctionLinearOperator(lambda u: fwd(u) / n, x_struct)
    dtype = x_struct.dtype
    upcast = jax.config.jax_enable_x64 and dtype != jnp.float64
    if upcast:  # lineax's LSMR mixes Python floats into lax.select: float32 data under x64 fails (as in _copa)
        op = lx.FunctionLinearOperator(lambda u: (fwd(u.astype(dtype)) / n).astype(jnp.float64),
                                       jax.ShapeDtypeStruct(x_struct.shape, jnp.float64))
        t = t.astype(jnp.float64)
    tol = 1e-4
    sol = lx.linear_solve(op, t / n, lx.LSMR(rtol=tol, atol=tol, max_steps=max_steps), throw=False)
    u = sol.value.astype(dtype)
    return jnp.where(jnp.isfinite(u), u, 0.0)


def pullback_layer(
    stages: tuple,
    l: int,
    leaves,
    sys: LayerSystem,
    z_l,
    gW,
    mask,
    x_lsq,
    pb: Pullback,
) -> tuple[Array, PullbackReport]:
    r"""Refine layer ``l``'s least-squares solution ``x_lsq`` (its input :math:`x_{l-1}`) with the pull-back.

    Args:
        stages: the model's stages (:attr:`jaxinv._model.Structure.stages`).
        l: the layer (0 = input layer).
        leaves: the model's parameter leaves.
        sys: the layer's system (built at its :math:`\delta_l`).
        z_l: its pre-activation (forward targets; 0 on inactive ReLU units).
        gW: the shared kernel gradient of the layer.
        mask: active units of a ReLU layer (``None`` otherwise).
        x_lsq: the least-squares solution.
        pb: the weights.

    Returns:
        ``(x, report)``: the refined input (inside the activation's image / the box) and the diagnostics.
    """
    dtype = x_lsq.dtype
    st = stages[l]
    weights = balance_weights(sys, mask)
    sys_term = layer_system(sys, z_l, gW, mask=mask, weights=weights, name="system")
    sys_term = sys_term._replace(weight=pb.system)
    m = 1.0 if mask is None else mask
    tf = (z_l - sys.forward_offset) * m
    tg = gW - sys.gradient_offset
    scale = jnp.maximum(jnp.sum((weights[0] * tf) ** 2) + jnp.sum((weights[1] * tg) ** 2), _tiny(dtype))
    terms = [sys_term]
    if st.activation.name == "relu" and mask is not None:
        terms.append(relu_inactive(sys, mask, weight=pb.inequality, wf=weights[0], scale=scale))
    lsq_res = jnp.sqrt(sys_term.penalty({"x": x_lsq}))

    if l == 0:  # the input layer: pixel box and total variation
        box = None if pb.box is None else (float(pb.box[0]), float(pb.box[1]))
        proj = box_projection(box)
        if pb.tv > 0 and x_lsq.ndim >= 4:
            terms.append(total_variation("x", weight=pb.tv))
        params0 = {"x": proj(x_lsq)}
        project = lambda p: {"x": proj(p["x"])}  # noqa: E731
        decode = lambda p: p  # noqa: E731
        scales = {"x": rms_scale(params0["x"]) if box is None else jnp.asarray((box[1] - box[0]) / 2, dtype)}
    else:
        below = stages[l - 1]
        act = below.activation
        abox = activation_box(act, dtype)
        x_proj = box_projection(abox)
        u_struct = jax.ShapeDtypeStruct(below.nodes.x_in.shape, dtype)
        c_b, A_b = jax.linearize(lambda u: below.affine(u, leaves), jnp.zeros(u_struct.shape, dtype))
        # the start: x_lsq moved inside the activation's image, and the u whose layer output is closest to it
        if act.name == "relu":
            x0 = x_proj(x_lsq)
            target, bmask = x0 - c_b, (x0 > 0).astype(dtype)
        else:
            lo, hi = act.image
            width = (hi - lo) if math.isfinite(hi - lo) else 1.0
            lo_m = lo + pb.margin * width if math.isfinite(lo) else -math.inf
            hi_m = hi - pb.margin * width if math.isfinite(hi) else math.inf
            x0 = box_projection((lo_m, hi_m))(x_lsq)
            z0, _ = act.inverse(x0)
            target, bmask = z0 - c_b, None
        u0 = _lsq_input(A_b, u_struct, target, bmask)
        # the auxiliary u: its own layer's constraints (lookahead)
        if l - 1 == 0:
            ubox = None if pb.box is None else (float(pb.box[0]), float(pb.box[1]))
            if pb.lookahead and pb.tv > 0 and u0.ndim >= 4:
                terms.append(total_variation("u", weight=pb.tv))
        else:
            ubox = activation_box(stages[l - 2].activation, dtype)
        u_proj = box_projection(ubox if pb.lookahead else None)
        if act.name == "relu":
            params0 = {"x": x0, "u": u_proj(u0)}
            project = lambda p: {"x": x_proj(p["x"]), "u": u_proj(p["u"])}  # noqa: E731
            decode = lambda p: p  # noqa: E731
            rscale = jnp.maximum(jnp.sum(x0 * x0), _tiny(dtype))
        else:
            params0 = {"z": z0, "u": u_proj(u0)}
            project = lambda p: {"z": p["z"], "u": u_proj(p["u"])}  # noqa: E731
            decode = lambda p: {"x": act(p["z"]), "z": p["z"], "u": p["u"]}  # noqa: E731
            rscale = jnp.maximum(jnp.sum(z0 * z0), _tiny(dtype))
        terms.append(range_penalty(A_b, c_b, act, rscale, weight=pb.range))
        scales = jax.tree_util.tree_map(rms_scale, params0)

    objective = compose(*terms)
    res = adam_refine(lambda p: objective(decode(p)), params0, project=project, steps=pb.steps, lr=pb.lr,
                      tol=pb.tol, window=pb.window, scales=scales)
    x = decode(res.params)["x"]
    if l > 0 and stages[l - 1].activation.name == "relu":
        # a ReLU output has exact zeros: units whose pre-activation from the auxiliary input is <= 0 are inactive
        # (the next layer reads its active set from x > 0)
        x = jnp.where(A_b(res.params["u"]) + c_b > 0, x, 0.0)
    if l > 0:
        x = box_projection(activation_box(stages[l - 1].activation, dtype))(x)
    ok = jnp.all(jnp.isfinite(x))
    x = jnp.where(ok, x, x_lsq)
    return x, PullbackReport(res.steps.astype(jnp.int32), res.value.astype(dtype), lsq_res.astype(dtype))


def correct(stages: tuple, l: int, sys: LayerSystem, x: Array, x_lsq: Array, z: Array, gW: Array, mask, solver: Solver,
            box, below: float) -> tuple[Array, Array]:
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
    d, _, _, more, _ = solve_layer(sys, z - fwd, gW - sys.gradient(x), solver, mask=mask)
    xc = output_projection(stages, l, box, x.dtype)(x + d)
    rho = norm(x + d - x_lsq) / jnp.maximum(norm(x - x_lsq), jnp.finfo(x.dtype).tiny)
    return jnp.where(rho < below, xc, x), more
