r"""COPA / R-GAP: invert a shared gradient layer by layer, from the output down to the image.

The recursion (Chen & Campbell 2021, eqs. for the forward and gradient constraints; Zhu & Blaschko 2021):

1. **Head** (layer :math:`L`, :mod:`jaxinv.engine._head`): :math:`\delta_L` and :math:`x_{L-1}` from its gradient.
2. **Going down** (:mod:`jaxinv.engine._down`), knowing :math:`x_l` and :math:`\partial\ell/\partial x_l =
   A_{l+1}^\top\delta_{l+1}`: :math:`z_l = s_l^{-1}(x_l)`, :math:`\delta_l = \partial\ell/\partial x_l \odot
   s_l'(z_l)`, and :math:`x_{l-1}` solves :math:`[A_l;\,B_l(\cdot;\delta_l)]\,x = [z_l - c_l;\, g_{W_l} -
   B_l(0;\delta_l)]` in least squares (:func:`jaxinv.engine.solve_layer`).
3. The image is :math:`x_0`.

The recursion is the fold of :mod:`jaxinv.engine._fold`. ReLU is followed exactly where it is known: active units
(:math:`x_l > 0`) give forward rows, inactive ones give :math:`\delta_l = 0` and no row. Batches behind one gradient
(:mod:`jaxinv.engine._batch`), segmentation models (:mod:`jaxinv.engine._seg`) and FedAvg updates
(:mod:`jaxinv.engine._fedavg`) run on the same steps.
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

from .._client import Client
from .._gradient import check_labels, label_shape, resolve_loss, validate_grads
from .._model import Model
from .._result import Reconstruction
from .._sharding import split_attack
from ._batch import copa_batch
from ._down import down_jit, down_step
from ._fedavg import fedavg_fixed_point
from ._fold import as_fold_step, fold_down, is_traced, map_jit, timed
from ._head import head_jit, head_step
from ._joint import finish, gradient_eps
from ._options import Solver, batching_mode, layerwise_options
from ._refine import Pullback, as_pullback
from ._seg import copa_seg


def copa(model: Model, grads: PyTree, *, label: int | Int[Array, "..."] | None = None,
         input_shape: tuple[int, ...] | None = None, client: Client | None = None, solver: Solver | None = None,
         refine: bool | Pullback = False, batching: str = "auto", key: Any = None, **legacy: Any) -> Reconstruction:
    r"""Reconstruct the input from a single-image gradient, layer by layer (COPA / R-GAP least squares).

    Args:
        model: the model the client trained (:func:`jaxinv.from_linen` / ``from_nnx`` / ``from_fn``).
        grads: the shared gradient, a pytree shaped like ``model.params`` — or with one extra leading axis ``T``
            on every leaf for ``T`` independent targets (each one image), solved in one ``vmap``.
        label: the image's label (int, or shape ``(T,)`` for stacked targets); ``None`` recovers it from the
            head's gradient (iDLG rule) and reports it in ``.label``.
        input_shape: shape of one input without the batch axis (default: the model's).
        client: the client's setting (:class:`jaxinv.Client`: ``loss``, used by bias-free heads and for the
            reported gradient distance; ``batch_size``; ``local_steps``, ``local_lr`` for FedAvg updates, below).
        solver: the layer solve's options (:class:`jaxinv.engine.Solver`: ``max_steps``, ``rtol``, ``atol``,
            ``forward_weight``, ``gradient_weight``, ``fedavg_iters``).
        refine: refine every layer's least-squares solution below the head with the pull-back constraints
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
        **legacy: the earlier flat keywords (``loss``, ``batch_size``, ``local_steps``, ``local_lr``, ``max_steps``,
            ``rtol``, ``atol``, ``forward_weight``, ``gradient_weight``, ``fedavg_iters``, ``pullback``) still work:
            they are moved onto ``client``, ``solver`` and ``refine`` (:func:`layerwise_options`).
        key: the random restarts of a batch's head separation (default ``jax.random.key(0)``); single images are
            deterministic.

    Returns:
        A :class:`Reconstruction`: ``.image`` of shape ``(T or 1, *input_shape)``, ``.label``, per-layer
        ``.layers`` (input layer first) with residuals, clipping counts, solver steps and status.

    The client's batch and FedAvg settings:

        Client.batch_size: ``B > 1`` images behind one (unstacked) gradient, when ``label`` is ``None`` (their labels are
            then recovered as a multiset, :func:`jaxinv.recover_labels`); a ``label`` of shape ``(B,)`` with an
            unstacked gradient means the same. The head separates the batch when it is a dense layer with a bias
            and at least ``B`` outputs; the layers below are solved jointly (:mod:`jaxinv.engine._batch`). Images come
            back in no particular order (:func:`jaxinv.metrics.match`).
        Client.local_steps, local_lr, Solver.fedavg_iters: the shared object is a FedAvg update after ``local_steps``
            :math:`K > 1` SGD steps with learning rate ``local_lr`` :math:`\eta`, passed as
            :func:`jaxinv.update_as_gradient` :math:`\bar g = -\Delta/(K\eta)`. The first-order reading
            :math:`\bar g \approx \nabla\ell(\theta_0)` is corrected by a fixed point: with the current
            reconstruction :math:`\hat x_t`, :math:`\hat g_{t} = \bar g - (\bar g_\text{sim}(\hat x_t) -
            \nabla\ell(\theta_0; \hat x_t))` (the client's steps simulated on :math:`\hat x_t`) and
            :math:`\hat x_{t+1} = \mathrm{COPA}(\hat g_t)`, at most ``fedavg_iters`` times (the truth is a fixed
            point; on cnn2_c1 with :math:`K=2, \eta=0.01` 18 dB -> 116 dB in 8 iterations, slower as
            :math:`K\eta` grows). ``loss_trace`` holds :math:`\|\bar g_\text{sim}(\hat x_t) - \bar g\| /
            \|\bar g\|` per iteration.

    Example:
        >>> grads = jaxinv.client_gradient(model, x, y)
        >>> rec = jaxinv.copa(model, grads, solver=jaxinv.engine.Solver(max_steps=4000))
        >>> float(jaxinv.metrics.psnr(rec.image, x)[0]) > 60
        True
    """
    client, solver, refine = layerwise_options("copa", client, solver, refine, legacy)
    split = split_attack(lambda g, lab: copa(model, g, label=lab, input_shape=input_shape, client=client,
                                             solver=solver, refine=refine, batching=batching, key=key), grads, label)
    if split is not None:  # targets split over devices (jaxinv.shard_targets): each device solves its own
        return split
    if client.fedavg:
        one_step = dataclasses.replace(client, local_steps=1, local_lr=None)

        def solve(g, lab):
            return copa(model, g, label=lab, input_shape=input_shape, client=one_step, solver=solver, refine=refine,
                        batching=batching, key=key)

        return fedavg_fixed_point(solve, model, grads, label, client, solver.fedavg_iters)
    structure = model.structure(input_shape)
    grads_dtype = jax.tree_util.tree_leaves(grads)[0].dtype
    gleaves, T = validate_grads(model, grads)
    out_shape = structure.stages[-1].nodes.x_out.shape
    if label_shape(out_shape[1:]):
        return copa_seg(model, structure, gleaves, T, label, client, refine, solver)
    n_out = math.prod(out_shape)
    loss = resolve_loss(client.loss, n_out)
    if label is not None:
        label = check_labels(jnp.asarray(label), 2 if n_out == 1 else n_out)
        if client.batch_size is not None and T is None and label.size != client.batch_size:
            raise ValueError(f"label has {label.size} entries but batch_size is {client.batch_size}")
    if T is None and ((label is not None and label.size > 1) or (client.batch_size or 1) > 1):
        blocks = structure.blocks
        if blocks:
            raise ValueError(f"batch gradients are not supported on models with blocks ({', '.join(blocks)}) yet: "
                             "use jaxinv.attack('ig', ..., batch_size=B)")
        if refine is not False:
            raise ValueError("pullback is not supported for batch gradients yet: use pullback=False")
        return copa_batch(model, structure, gleaves, label, client.batch_size, loss, key, solver)
    if label is not None:
        if T is not None and label.shape != (T,):
            raise ValueError(f"label must have shape ({T},) for {T} stacked targets, got {tuple(label.shape)}")
        if T is None:
            label = label.reshape(())
    pb = as_pullback(refine)
    if pb is not None and pb.box != solver.box:
        solver = dataclasses.replace(solver, box=pb.box)  # the refinement's input box is the image's
    blocks = structure.blocks
    if pb is not None and blocks:
        raise ValueError(f"pullback is not supported on models with blocks ({', '.join(blocks)}): a block is solved "
                         "jointly by Levenberg-Marquardt, not by a linear system to refine; use pullback=False")
    traced = is_traced(grads, label, model.params)
    t_start = time.perf_counter()
    n_below = len(structure.stages) - 1
    head = functools.partial(head_jit, model, structure, solver=solver, loss=loss)
    down = [functools.partial(down_jit, model, structure, l, solver=solver, pullback=pb) for l in range(n_below)]
    if T is not None:
        if batching_mode(batching) == "vmap":
            head = eqx.filter_vmap(head, in_axes=(0, 0 if label is not None else None))
            down = [eqx.filter_vmap(d, in_axes=(0, 0, 0)) for d in down]
        else:
            head = functools.partial(map_jit, head_step, (None, None, 0, 0 if label is not None else None), model,
                                     structure, solver=solver, loss=loss)
            down = [functools.partial(map_jit, down_step, (None, None, None, 0, 0, 0), model, structure, l,
                                      solver=solver, pullback=pb) for l in range(n_below)]
    (x, gx, lab, rep), sec = timed(traced, head, gleaves, label)
    B = T if T is not None else 1
    fold = fold_down(structure, [as_fold_step(d) for d in down], gleaves, (x, gx), rep, sec, B, traced=traced)
    labels = lab.reshape(-1)
    image, reports, inputs, dist = finish(
        model, structure, gleaves, fold.x.reshape((B,) + structure.input_shape), labels, fold.reports,
        fold.layer_inputs, loss, solver, gradient_eps(grads_dtype, client.dtype, structure.dtype), T is not None,
        traced)
    total = jnp.nan if traced else time.perf_counter() - t_start
    return Reconstruction(
        image=image, label=labels, layers=reports, attack="copa",
        loss_trace=jnp.zeros((labels.shape[0], 0), image.dtype), gradient_distance=dist,
        seconds=jnp.asarray(total, jnp.float32), layer_inputs=inputs,
    )
