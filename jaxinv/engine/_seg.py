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
recursion is the classifier's (:func:`jaxinv.engine._copa._down_step`): it needs only :math:`x_l` and
:math:`\partial\ell/\partial x_l`.
"""

from __future__ import annotations

import functools
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from ._block import levenberg_marquardt
from ._copa import CopaOptions, _bias_residual, _delta_of_logits, _down_jit, _fold_down, _report, _timed, _tols
from .._gradient import loss_fn
from .._model import Model, Structure
from .._maps import LayerSystem, norm, with_leaf
from .._result import Reconstruction


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


def head_seg(model: Model, structure: Structure, gleaves, mask, opts: CopaOptions, iters: int):
    """The head's input and :math:`\\partial\\ell/\\partial x_{L-1}` from its gradient and the mask (module doc)."""
    leaves = jax.tree_util.tree_leaves(model.params)
    st = structure.stages[-1]
    shared, idx = head_gradient_fn(structure, leaves, mask)
    target = tuple(gleaves[i] for i in idx)
    dtype = target[0].dtype
    tiny = jnp.finfo(dtype).tiny
    w = tuple(1.0 / jnp.maximum(norm(t), tiny) for t in target)
    rtol, atol = _tols(opts, dtype)

    def resid(x):
        return tuple(wi * (s - t) for wi, s, t in zip(w, shared(x), target))

    # lam starts at the scale of J^T J (its largest eigenvalue is ~1: both blocks are normalised)
    x, c, steps = levenberg_marquardt(resid, jnp.zeros(st.nodes.x_in.shape, dtype), rtol=rtol, atol=atol,
                                      max_steps=opts.max_steps, iters=iters, lam0=1e-2)
    delta = _delta_of_logits(st, "cross_entropy", st.nodes.x_out.shape[-1])(st.affine(x, leaves), mask)
    sys = LayerSystem.build(st, leaves, delta)
    g = shared(x)
    gres = norm(g[0] - target[0]) / jnp.maximum(norm(target[0]), tiny)
    bres = _bias_residual(st, leaves, gleaves, delta)
    status = jnp.where(jnp.isfinite(c) & (gres < 1e-2), 0, 3).astype(jnp.int32)
    rep = _report(st, False, jnp.full((), jnp.nan, dtype), gres, bres, 0, steps, status)
    return x, sys.forward_transpose(delta), rep


_head_seg_jit = eqx.filter_jit(head_seg)


def copa_seg(model: Model, structure: Structure, gleaves, mask, T, loss: str, opts: CopaOptions,
             gn_iters: int = 20) -> Reconstruction:
    """COPA for a segmentation model: :func:`head_seg`, then the classifier's recursion below the head.

    ``mask``: ``(*label_shape)`` for one target, ``(T, *label_shape)`` for ``T`` stacked single-image targets."""
    from ._copa import _gradient_distance

    if loss not in ("auto", "cross_entropy"):
        raise ValueError(f"loss={loss!r}: a segmentation model's gradient is inverted for the per-pixel "
                         "cross-entropy (loss='cross_entropy' or 'auto')")
    t_start = time.perf_counter()
    head = functools.partial(_head_seg_jit, model, structure)
    L = len(structure.stages)
    down = [functools.partial(_down_jit, model, structure, l) for l in range(L - 1)]
    if T is not None:
        head = eqx.filter_vmap(lambda g, m, o, it: _head_seg_jit(model, structure, g, m, o, it),
                               in_axes=(0, 0, None, None))
        down = [eqx.filter_vmap(lambda g, x, gx, o, l=l: _down_jit(model, structure, l, g, x, gx, o),
                                in_axes=(0, 0, 0, None)) for l in range(L - 1)]
    (x, gx, rep), sec = _timed(False, head, gleaves, mask, opts, gn_iters)
    B = T if T is not None else 1
    x, reports, layer_inputs = _fold_down(False, structure, down, gleaves, x, gx, opts, rep, sec, B)
    image = x.reshape((B,) + structure.input_shape)
    K = structure.stages[-1].nodes.x_out.shape[-1]
    labels = mask.reshape((B,) + tuple(structure.stages[-1].nodes.x_out.shape[1:-1]))
    dist = _gradient_distance(model, image, labels, gleaves, "cross_entropy", K, T)
    return Reconstruction(
        image=image, label=labels, layers=reports, attack="copa",
        loss_trace=jnp.zeros((B, 0), image.dtype), gradient_distance=dist,
        seconds=jnp.asarray(time.perf_counter() - t_start, jnp.float32), layer_inputs=layer_inputs,
    )

