r"""The hybrid attack (Chen & Campbell, BMVC 2022): layer-wise least squares corrected by gradient matching.

Chen & Campbell, "Analysing Training-Data Leakage from Gradients through Linear Systems and Gradient Matching"
(BMVC 2022, arXiv 2210.13231). From the output down, for every layer :math:`l` below the head:

1. **least squares**: solve the layer's stacked system :math:`U x = V` (forward rows :math:`A_l x = z_l - c_l`,
   gradient rows :math:`B_l(x;\delta_l) = g_{W_l}`) for :math:`x = x_{l-1}`, exactly as :func:`jaxinv.copa`
   (optionally followed by COPA's pull-back refinement, ``pullback=True``);
2. **gradient matching**: starting there, minimise with Adam

   .. math::

       f(x) = 1 - \cos\big(\nabla_{\theta_{l..L}}\,\ell(f_{l..L}(x), y),\ g_{l..L}\big)
              + a\,\mathrm{TV}(x)\,[l = 0] + c\,\frac{\|W(Ux - V)\|^2}{\|W V\|^2}

   where :math:`f_{l..L}` is the network from layer :math:`l` up, :math:`\theta_{l..L}` the kernels and biases of
   those layers and :math:`g_{l..L}` their part of the **shared** gradient (cosine over all those leaves at once),
   TV only on the image, and :math:`W` COPA's block balancing (so the system term is the relative residual
   squared). Each step is projected onto the box (image) or the closed interior of the activation's image
   (hidden layers);
3. go down with the corrected :math:`x_{l-1}`.

Differences from the reference code (documented, deliberate):

* **Only the shared gradient is used.** The reference code computes the target gradients of the matching step
  from the true input; here they are the parts of the shared gradient (an audit must not see the input).
* **Iterations.** The paper runs 10,000 Adam steps on the image layer, 8,000 on the layer above it and 1,000 on
  every other layer. Our defaults are ``max_steps=(2000, 1000, 200)`` with early stopping (change of the
  objective below ``tol`` (relative) + ``1e-10`` (absolute) over ``window`` steps) and a cosine-decayed learning
  rate; a layer whose start already matches (objective ~0) stops after one window.
* A layer that is determined, below layers that are all determined, keeps its least-squares solution (exact for
  a noise-free gradient) without matching (``correct``): the TV prior and the cosine (which weighs the layers by
  their gradients' norms) would otherwise trade exactness for smoothness, which costs tens of dB there. Below an
  underdetermined layer the matching runs even on a determined layer: its data (the layer above's answer) are
  only one of many consistent ones, and the image prior is what chooses among them.
* The head is not refined: its solution is closed-form (exact with a bias, R-GAP's scalar trick without).
* Adam's step is relative to each variable's size (the box half-width on the image, the RMS of the start on
  hidden layers), so one learning rate serves all layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree

from .._checks import merge_options, no_more_keywords, positive_int
from .._client import Client
from .._gradient import check_labels, loss_fn, resolve_loss, validate_grads
from .._maps import LayerSystem, norm
from .._model import Model, Structure
from .._priors import box_projection, check_box
from .._result import Reconstruction
from .._sharding import split_attack
from ..engine import (
    Pullback,
    RefineResult,
    Solver,
    activation_box,
    adam_refine,
    as_pullback,
    balance_weights,
    down_step,
    finish,
    fold_down,
    gradient_eps,
    head_jit,
    is_traced,
    layer_system,
    renamed_refine,
    residuals,
    rms_scale,
    solve_layer,
    timed,
    unactivate,
)
from . import _objectives as obj


def _steps_triple(max_steps) -> tuple[int, int, int]:
    if isinstance(max_steps, int) and not isinstance(max_steps, bool):
        max_steps = (max_steps,) * 3
    try:
        out = tuple(int(s) for s in max_steps)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or any(s < 1 for s in out) or any(isinstance(s, bool) for s in max_steps):
        raise ValueError(
            "hybrid: max_steps must be an int >= 1 or a triple (image layer, layer above it, every other layer) "
            f"of ints >= 1, e.g. (2000, 1000, 200); got {max_steps!r}"
        )
    return out


def _box(box) -> tuple[float, float] | None:
    return check_box(box, "hybrid")


class HybridOptions(eqx.Module):
    """Options of :func:`hybrid` (validated at construction; static: a change recompiles). See :func:`hybrid`.

    Example:
        >>> HybridOptions(max_steps=100).max_steps
        (100, 100, 100)
    """

    max_steps: tuple[int, int, int] | int = eqx.field(static=True, default=(2000, 1000, 200), converter=_steps_triple)
    lr: float = eqx.field(static=True, default=0.1)
    tv_weight: float = eqx.field(static=True, default=0.1)
    system_weight: float = eqx.field(static=True, default=1.0)
    box: tuple[float, float] | None = eqx.field(static=True, default=(0.0, 1.0), converter=_box)
    correct: float = eqx.field(static=True, default=0.1)
    tol: float = eqx.field(static=True, default=1e-6)
    window: int = eqx.field(static=True, default=100)
    log_every: int = eqx.field(static=True, default=10)
    lsq_max_steps: int = eqx.field(static=True, default=2000)

    def __check_init__(self):
        for name in ("lr", "tv_weight", "system_weight", "correct"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise ValueError(f"hybrid: {name} must be a finite number >= 0, got {v!r}")
        for name in ("window", "log_every", "lsq_max_steps"):
            positive_int(getattr(self, name), name, "hybrid")


def suffix_leaves(structure: Structure, l: int) -> list[int]:
    """Parameter leaves (kernels and biases) of layers ``l..L``."""
    idx = []
    for st in structure.stages[l:]:
        idx.append(st.nodes.kernel_leaf)
        if st.nodes.bias_leaf >= 0:
            idx.append(st.nodes.bias_leaf)
    return idx


def suffix_gradient(structure: Structure, leaves, l: int, x, label, lf) -> list[Array]:
    r"""The gradient :math:`\nabla_{\theta_{l..L}}\,\ell(f_{l..L}(x), y)` that a candidate input ``x`` of layer
    ``l`` produces on the kernels and biases of layers ``l..L`` (differentiable in ``x``)."""
    idx = suffix_leaves(structure, l)
    stages = structure.stages[l:]

    def loss(sel):
        lv = list(leaves)
        for i, v in zip(idx, sel):
            lv[i] = v
        h = x
        for s in stages:
            h = s(h, lv)
        return lf(h.reshape(1, -1), label.reshape(1))

    return jax.grad(loss)([leaves[i] for i in idx])


def null_fraction(sys: LayerSystem, mask, solver: Solver):
    r"""How underdetermined a layer's system is: :math:`\|P_\text{null} v\| / \|v\|` for a fixed probe :math:`v`
    (one LSMR solve of :math:`M x = M v`, whose minimum-norm solution is :math:`P_\text{row} v`). About
    :math:`\sqrt{d/n}` for deficiency :math:`d` of :math:`n` unknowns; ~0 (the solver's tolerance) when the layer is
    determined. Returns ``(fraction, LSMR steps)``."""
    n = math.prod(sys.x_struct.shape)
    dtype = sys.x_struct.dtype
    v = (jnp.cos(jnp.arange(n, dtype=dtype) * 2.399) + 0.5 * jnp.sin(jnp.arange(n, dtype=dtype) * 0.618))
    v = v.reshape(sys.x_struct.shape)
    p, _, _, steps, _ = solve_layer(sys, sys.forward(v) + sys.forward_offset, sys.gradient(v) + sys.gradient_offset,
                                    solver, mask=mask)
    return norm(v - p) / norm(v), steps


def hybrid_down(model: Model, structure: Structure, l: int, gleaves: list[Array], x_l: Array, gx_l: Array,
                exact_above: Array, label: Array, solver: Solver, ho: HybridOptions, loss: str, pb: Pullback | None):
    """Layer ``l``: least squares (and pull-back), then gradient matching; one step of the fold
    (:func:`jaxinv.engine.fold_down`), its carry ``(x, dl/dx, exact, label)``.

    Returns ``((x, dl/dx, exact, label), report, trace)``: ``exact`` says that this layer and every layer above it
    are determined (then the least-squares answer is exact and returned without matching)."""
    leaves = jax.tree_util.tree_leaves(model.params)
    st = structure.stages[l]
    x0, gx, rep = down_step(model, structure, l, gleaves, x_l, gx_l, solver, pullback=pb)
    # the layer's system again (the same arrays as inside down_step), for the c * ||Ux - V||^2 term
    z, mask, delta, _ = unactivate(st, x_l, gx_l)
    sys = LayerSystem.build(st, leaves, delta)
    gW = gleaves[st.nodes.kernel_leaf]
    sys_term = layer_system(sys, z, gW, mask=mask, weights=balance_weights(sys, mask))
    n_out = math.prod(structure.stages[-1].nodes.x_out.shape)
    lf = loss_fn(loss, n_out)
    target = [gleaves[i] for i in suffix_leaves(structure, l)]
    image_layer = l == 0
    tv = obj.total_variation

    def objective(p):
        x = p["x"]
        f = obj.cosine_distance(suffix_gradient(structure, leaves, l, x, label, lf), target)
        f = f + ho.system_weight * sys_term.penalty({"x": x})
        if image_layer and ho.tv_weight > 0 and x.ndim >= 4:
            f = f + ho.tv_weight * tv(x)
        return f

    if image_layer:
        box = ho.box
        scale = rms_scale(x0) if box is None else jnp.asarray((box[1] - box[0]) / 2, x0.dtype)
        steps = ho.max_steps[0]
    else:
        box = activation_box(structure.stages[l - 1].activation, x0.dtype)
        scale = rms_scale(x0)
        steps = ho.max_steps[1] if l == 1 else ho.max_steps[2]
    proj = box_projection(box)
    lsmr_more = jnp.zeros((), jnp.int32)
    if ho.correct > 0:
        frac, lsmr_more = null_fraction(sys, mask, solver)
        exact = exact_above & (frac < ho.correct)
        x_exact = x0 if pb is None else solve_layer(sys, z, gW, solver, mask=mask).x
    else:
        exact, x_exact = jnp.asarray(False), x0

    def match(_):
        return adam_refine(objective, {"x": x0}, project=lambda p: {"x": proj(p["x"])}, steps=steps, lr=ho.lr,
                           tol=ho.tol, window=ho.window, log_every=ho.log_every, scales={"x": scale})

    def keep(_):
        n_log = -(-steps // ho.log_every)
        return RefineResult({"x": proj(x_exact)}, jnp.zeros((), x0.dtype), jnp.full((n_log,), jnp.nan, x0.dtype),
                            jnp.zeros((), jnp.int32))

    res = jax.lax.cond(exact, keep, match, None)
    x = res.params["x"]
    ok = jnp.all(jnp.isfinite(x))
    x = jnp.where(ok, x, proj(x0))
    fres, gres = residuals(sys, x, z, gW, mask)
    lsq = rep.lsq_residual if rep.lsq_residual is not None else jnp.sqrt(sys_term.penalty({"x": x0}))
    rep = eqx.tree_at(lambda r: (r.forward_residual, r.gradient_residual), rep, (fres, gres))
    steps_run = res.steps + (0 if rep.refine_steps is None else rep.refine_steps)
    rep = dataclasses.replace(rep, steps=rep.steps + lsmr_more, refine_steps=jnp.asarray(steps_run, jnp.int32),
                              refine_objective=res.value.astype(x.dtype), lsq_residual=lsq.astype(x.dtype))
    return (x, gx, exact, label), rep, res.trace


hybrid_jit = eqx.filter_jit(hybrid_down)

LEGACY_SOLVER = "lsq_max_steps"


def hybrid(model: Model, grads: PyTree, *, label: int | Int[Array, "..."] | None = None,
           input_shape: tuple[int, ...] | None = None, client: Client | None = None,
           options: HybridOptions | None = None, refine: bool | Pullback = False, key: Any = None,
           **legacy: Any) -> Reconstruction:
    r"""Hybrid attack: COPA's layer-wise least squares, each layer corrected by gradient matching (BMVC 2022).

    For every layer below the head, from the output down: the least-squares solution of the layer's system
    (:func:`jaxinv.copa`), then Adam on

    .. math:: 1 - \cos(g_{l..L}(x), g_{l..L}) + a\,\mathrm{TV}(x)\,[\text{image}] + c\,\|W(Ux - V)\|^2/\|WV\|^2

    projected onto the box (image) or the activation's image (hidden layers); then copa's last stage
    (:func:`jaxinv.engine.finish`: the noise-aware correction of the bottom layers where they do not match their
    data, and the flat image where the whole gradient does not support the answer). See the module docstring for the
    differences from the reference code (shared gradient only; fewer iterations with early stopping).

    Args:
        model: the model (its layers must be readable, as for :func:`jaxinv.copa`).
        grads: one image's gradient, or ``T`` of them stacked on a leading axis (solved in one ``vmap``).
        label: the label (int, or ``(T,)``); ``None`` recovers it from the head's gradient.
        input_shape: one input's shape (default: the model's).
        key: unused (the method is deterministic: the start is the least-squares solution); accepted for the
            common attack interface.
        client: the client's setting (:class:`jaxinv.Client`; ``loss``: ``auto``, ``cross_entropy``, ``logistic``).
        options: the attack's options (:class:`HybridOptions`), below.
        refine: start each layer's matching from COPA's pull-back refinement instead of the plain least-squares
            solution (``True`` or a :class:`jaxinv.Pullback`); its steps add to the layer's ``refine_steps``.
        **legacy: the earlier flat keywords (``loss``, ``pullback`` and every :class:`HybridOptions` field) still
            work: they are moved onto ``client``, ``refine`` and ``options``.

    The options (:class:`HybridOptions`):

        max_steps: Adam iterations ``(image layer, the layer above it, every other layer)``, or one int for all;
            the paper: ``(10000, 8000, 1000)``. Early stopping usually ends upper layers much sooner.
        lr: Adam's learning rate relative to the variable's size (box half-width / RMS of the start),
            cosine-decayed to 0 over each layer's ``max_steps``.
        tv_weight: :math:`a`, weight of the image's total variation (mean absolute neighbour difference).
        system_weight: :math:`c`, weight of the layer's relative system residual squared.
        box: the model's input range (``(0, 1)`` for :mod:`jaxinv.zoo`); ``None``: no box.
        correct: a layer counts as determined when a probe vector's null-space fraction is below ``correct``
            (:func:`null_fraction`, one LSMR solve). When a layer and every layer above it are determined, the
            least-squares answer is exact (noise-free gradient) and is kept without matching: TV and the cosine
            could only blur it (tens of dB on a determined network). Not in the paper; ``0`` is the paper's
            method (always match).
        tol, window: early stop when the objective's relative change over ``window`` steps is below ``tol``.
        log_every: the objective is logged every ``log_every`` steps into ``loss_trace``.
        lsq_max_steps: LSMR iteration cap of the least-squares solves.

    Returns:
        A :class:`jaxinv.Reconstruction` (``attack="hybrid"``): per-layer reports (input layer first) with the
        least-squares residual before the correction (``lsq_residual``), the residuals after it, and
        ``refine_steps`` (Adam iterations run: one gradient evaluation each); ``loss_trace`` is the objective of
        every refined layer, top layer first, concatenated (``ceil(max_steps_l / log_every)`` entries per layer,
        NaN after an early stop).

    Example:
        >>> rec = jaxinv.attack("hybrid", model, grads, max_steps=(200, 100, 50))
        >>> int(rec.layers[0].refine_steps) <= 200, rec.attack
        (True, 'hybrid')

    References:
        C. Chen, N. D. F. Campbell. Analysing Training-Data Leakage from Gradients through Linear Systems and
        Gradient Matching. BMVC 2022 (arXiv 2210.13231).
    """
    del key
    refine = renamed_refine("hybrid", refine, legacy)
    client = merge_options(client, Client, legacy, "hybrid")
    ho = merge_options(options, HybridOptions, legacy, "hybrid")
    no_more_keywords(legacy, "hybrid", "label, input_shape, client (jaxinv.Client), options "
                     "(jaxinv.attacks.HybridOptions), refine, key")
    split = split_attack(lambda g, lab: hybrid(model, g, label=lab, input_shape=input_shape, client=client,
                                               options=ho, refine=refine), grads, label)
    if split is not None:  # targets split over devices (jaxinv.shard_targets): each device solves its own
        return split
    if client.fedavg or (client.batch_size or 1) > 1:
        raise ValueError(
            "hybrid inverts one image's gradient: a FedAvg update (local_steps > 1) or a batch (batch_size > 1) is not "
            "modelled by it; use jaxinv.copa (both) or jaxinv.attack('ig', ...) for these clients")
    if not isinstance(model, Model):
        raise TypeError(
            f"model must be a jaxinv.Model (jaxinv.from_linen / from_nnx / from_fn), got {type(model).__name__}"
        )
    pb = as_pullback(refine)
    structure = model.structure(input_shape)
    blocks = structure.blocks
    if blocks:
        raise ValueError(
            f"hybrid: model {model.name!r} has blocks ({', '.join(blocks)}), which jaxinv solves jointly by "
            "Levenberg-Marquardt (jaxinv.copa) rather than by a linear system to match against; use jaxinv.copa, or "
            "jaxinv.attack('ig', ...) for an optimisation attack")
    gleaves, T = validate_grads(model, grads)
    n_out = math.prod(structure.stages[-1].nodes.x_out.shape)
    n_lab = 2 if n_out == 1 else n_out
    loss = resolve_loss(client.loss, n_out)
    if label is not None:
        label = check_labels(jnp.asarray(label), n_lab)
        if T is None and label.size != 1:
            raise ValueError(
                f"hybrid: label has shape {tuple(label.shape)} but grads is one target's gradient: pass one label, "
                "or stack T gradients on a new leading axis with label of shape (T,)"
            )
        if T is not None and label.shape != (T,):
            raise ValueError(f"hybrid: label must have shape ({T},) for {T} stacked targets, got {tuple(label.shape)}")
        if T is None:
            label = label.reshape(())
    solver = Solver(max_steps=ho.lsq_max_steps, box=ho.box)
    traced = is_traced(grads, label, model.params)
    t_start = time.perf_counter()
    head = functools.partial(head_jit, model, structure, solver=solver, loss=loss)
    down = [functools.partial(hybrid_jit, model, structure, l, solver=solver, ho=ho, loss=loss, pb=pb)
            for l in range(len(structure.stages) - 1)]
    if T is not None:
        head = eqx.filter_vmap(head, in_axes=(0, 0 if label is not None else None))
        down = [eqx.filter_vmap(d, in_axes=(0, 0, 0, 0, 0)) for d in down]
    (x, gx, lab, rep), sec = timed(traced, head, gleaves, label)
    exact = jnp.ones((T,) if T is not None else (), bool)  # the head's solution is exact
    B = T if T is not None else 1
    fold = fold_down(structure, down, gleaves, (x, gx, exact, lab), rep, sec, B, traced=traced)
    labels = lab.reshape(-1)
    grads_dtype = jax.tree_util.tree_leaves(grads)[0].dtype
    image, reports, inputs, dist = finish(
        model, structure, gleaves, fold.x.reshape((B,) + structure.input_shape), labels, fold.reports,
        fold.layer_inputs, loss, solver, gradient_eps(grads_dtype, client.dtype, structure.dtype), T is not None,
        traced)
    traces = [t if T is not None else t[None] for t in fold.aux]
    trace = jnp.concatenate(traces, axis=1) if traces else jnp.zeros((B, 0), image.dtype)
    total = jnp.nan if traced else time.perf_counter() - t_start
    return Reconstruction(
        image=image, label=labels, layers=reports, attack="hybrid", loss_trace=trace,
        gradient_distance=dist, seconds=jnp.asarray(total, jnp.float32), layer_inputs=inputs,
    )
