r"""Segmentation models: invert a gradient of the per-pixel cross-entropy, layer by layer.

A segmentation (dense-prediction) network outputs logits :math:`Z \in \mathbb R^{H\times W\times K}` and is trained
with the mean per-pixel cross-entropy against a mask :math:`Y \in \{0..K-1\}^{H\times W}`. Its head is typically a
1x1 convolution with bias at some resolution :math:`h\times w` (``P = hw`` positions, ``C`` input channels),
followed by a fixed linear upsampling :math:`U` to :math:`H\times W` (FCN-32s/16s; :math:`U = I` when the head
is at full resolution). jaxinv reads ``U`` as part of the head's operator: :math:`z = U(W x + b)`.

**What the head's gradient reveals.** With :math:`\Delta = U^\top(\mathrm{softmax}(z) - \mathrm{onehot}(Y))/HW`
(``P x K``, one row per head position),

.. math:: g_W = \Delta^\top X \;(K\times C), \qquad g_b = \Delta^\top \mathbf 1,

a sum of :math:`P` outer products, not one: unlike a classifier's head, :math:`g_b` does not give
:math:`\Delta` and the row space of :math:`g_W` is only a :math:`\min(P, K)`-dimensional subspace of the
positions' features. But :math:`\Delta` is a known function of :math:`X` once the mask is known, so
:math:`X` solves the nonlinear system :math:`F(X) = (g_W, g_b)` of :math:`K(C+1)` equations in :math:`PC`
unknowns. Its Jacobian at the truth is :math:`B(\cdot;\Delta)` (rank :math:`\min(P,K)\,C`) plus the
:math:`\Delta`-sensitivity term, so the head is **determined when** :math:`P \le K` (e.g. 21 classes and a 4x4
score map); with :math:`P > K` at least :math:`(P - K)C - K` directions of the head's input are invisible and
the optimisation attacks take over. :func:`head_seg` solves :math:`F(X) = g` by Gauss-Newton (each step one
matrix-free LSMR solve of the linearised system, backtracking on the residual) from :math:`X = 0`, whose first
step already uses :math:`\Delta(0) = U^\top(\mathrm{softmax}(b) - \mathrm{onehot}(Y))/HW`: the mask term
dominates :math:`\Delta` in an untrained or early network, so the iteration starts near the answer.

The mask must be known (an auditor knows it; an attacker with the annotation policy can often guess it: the
labels of a segmentation gradient are not read from its sign the way a classifier's are). Below the head the
recursion is the classifier's (:func:`jaxinv.engine.down_step`): it needs only :math:`x_l` and
:math:`\partial\ell/\partial x_l`.
"""

from __future__ import annotations

import functools
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._client import Client
from .._gradient import check_labels, label_shape, loss_fn, target_distances
from .._maps import LayerSystem, norm, with_leaf
from .._model import Model, Structure
from .._result import Reconstruction
from ._block import levenberg_marquardt
from ._down import down_jit
from ._fold import as_fold_step, fold_down, timed
from ._head import delta_of_logits
from ._layer import bias_residual, fit_status, layer_report
from ._options import Solver


def head_gradient_fn(structure: Structure, leaves, mask):
    r"""``x -> (g_W, g_b)``: the head's kernel (and bias) gradient a head input ``x`` would produce with ``mask``."""
    st = structure.stages[-1]
    idx = (st.nodes.kernel_leaf,) + ((st.nodes.bias_leaf,) if st.nodes.bias_leaf >= 0 else ())
    K = st.nodes.x_out.shape[-1]
    lf = loss_fn("cross_entropy", K)

    def shared(x):
        def loss_of(*ws):
            lv = list(leaves)
            for i, w in zip(idx, ws):
                lv = with_leaf(lv, i, w)
            return lf(st.activation(st.affine(x, lv)), mask[None])

        return jax.grad(loss_of, argnums=tuple(range(len(idx))))(*(leaves[i] for i in idx))

    return shared, idx


def head_seg(model: Model, structure: Structure, gleaves: list[Array], mask: Array, solver: Solver, iters: int):
    """The head's input and :math:`\\partial\\ell/\\partial x_{L-1}` from its gradient and the mask (module doc)."""
    leaves = jax.tree_util.tree_leaves(model.params)
    st = structure.stages[-1]
    shared, idx = head_gradient_fn(structure, leaves, mask)
    target = tuple(gleaves[i] for i in idx)
    dtype = target[0].dtype
    tiny = jnp.finfo(dtype).tiny
    w = tuple(1.0 / jnp.maximum(norm(t), tiny) for t in target)
    rtol, atol = solver.tolerances(dtype)

    def resid(x):
        return tuple(wi * (s - t) for wi, s, t in zip(w, shared(x), target))

    # lam starts at the scale of J^T J (its largest eigenvalue is ~1: both blocks are normalised)
    x, c, steps = levenberg_marquardt(resid, jnp.zeros(st.nodes.x_in.shape, dtype), rtol=rtol, atol=atol,
                                      max_steps=solver.max_steps, iters=iters, lam0=1e-2)
    delta = delta_of_logits(st, "cross_entropy", st.nodes.x_out.shape[-1])(st.affine(x, leaves), mask)
    sys = LayerSystem.build(st, leaves, delta)
    g = shared(x)
    gres = norm(g[0] - target[0]) / jnp.maximum(norm(target[0]), tiny)
    bres = bias_residual(st, leaves, gleaves, delta)
    status = fit_status(jnp.where(jnp.isfinite(c), gres, jnp.nan))
    rep = layer_report(st, False, jnp.full((), jnp.nan, dtype), gres, bres, 0, steps, status)
    return x, sys.forward_transpose(delta), rep


head_seg_jit = eqx.filter_jit(head_seg)


def copa_seg(model: Model, structure: Structure, gleaves: list[Array], T: int | None, label, client: Client,
             refine, solver: Solver, gn_iters: int = 20) -> Reconstruction:
    """COPA for a segmentation model: :func:`head_seg`, then the classifier's recursion below the head.

    ``label`` is the mask: ``(*label_shape)`` for one target, ``(T, *label_shape)`` for ``T`` stacked single-image
    targets (eager errors name the shape expected)."""
    if client.loss not in ("auto", "cross_entropy"):
        raise ValueError(f"loss={client.loss!r}: a segmentation model's gradient is inverted for the per-pixel "
                         "cross-entropy (loss='cross_entropy' or 'auto')")
    lshape = label_shape(structure.stages[-1].nodes.x_out.shape[1:])
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
    if (client.batch_size or 1) > 1:
        raise ValueError("batch_size > 1 is not supported for segmentation gradients by copa: use "
                         "jaxinv.attack('ig', ..., batch_size=B) with masks of shape (B, H, W)")
    if refine is not False:
        raise ValueError("pullback is not supported for segmentation gradients yet: use pullback=False")
    mask = label
    t_start = time.perf_counter()
    head = functools.partial(head_seg_jit, model, structure)
    L = len(structure.stages)
    down = [functools.partial(down_jit, model, structure, l, solver=solver) for l in range(L - 1)]
    if T is not None:
        head = eqx.filter_vmap(head, in_axes=(0, 0, None, None))
        down = [eqx.filter_vmap(d, in_axes=(0, 0, 0)) for d in down]
    (x, gx, rep), sec = timed(False, head, gleaves, mask, solver, gn_iters)
    B = T if T is not None else 1
    fold = fold_down(structure, [as_fold_step(d) for d in down], gleaves, (x, gx), rep, sec, B)
    image = fold.x.reshape((B,) + structure.input_shape)
    labels = mask.reshape((B,) + tuple(structure.stages[-1].nodes.x_out.shape[1:-1]))
    dist = target_distances(model, image, labels, gleaves, "cross_entropy", K, T is not None)
    return Reconstruction(
        image=image, label=labels, layers=fold.reports, attack="copa",
        loss_trace=jnp.zeros((B, 0), image.dtype), gradient_distance=dist,
        seconds=jnp.asarray(time.perf_counter() - t_start, jnp.float32), layer_inputs=fold.layer_inputs,
    )
