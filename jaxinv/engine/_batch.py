r"""Layer-wise inversion of a batch gradient (``B > 1`` images behind one shared gradient).

The client averages its loss over :math:`B` images, so every weight gradient is a sum over the batch:

* **Head** (dense, with bias, softmax cross-entropy over :math:`K` classes):
  :math:`G = g_{W_L} = \sum_i \delta_i x_i^\top` (:math:`\delta_i = (p_i - e_{y_i})/B`) is a sum of :math:`B` rank-one
  terms and :math:`g_b = \sum_i \delta_i`. **Condition**: :math:`K \ge B` and the :math:`\delta_i` linearly
  independent (generic when :math:`K \ge B`); then :math:`\operatorname{rank} G = B` and its row space is
  :math:`\operatorname{span}\{x_i\}`. With :math:`G = U S V^\top` (top :math:`B`), :math:`x_i = V c_i` and the
  :math:`B^2` unknowns :math:`C = [c_i]` solve the :math:`KB + K` equations
  :math:`\Delta(C)\,C^\top = U S`, :math:`\Delta(C)\mathbf 1 = g_b`, where
  :math:`\Delta(C)_{:,i} = \delta(z_i = W V c_i + b;\, y_i)` (Levenberg-Marquardt from the :math:`x = 0`
  prediction, a few random restarts). Labels: given, or their multiset from :func:`jaxinv.recover_labels` (the batch
  is a set: any order of the labels gives the same images, in some order).
* **Layers below**: each image's forward rows :math:`A_l x_i = z_{l,i} - c_l` stay separate, the gradient rows
  are shared: :math:`\sum_i B_l(x_i;\delta_{l,i}) = g_{W_l}`. The joint system over the :math:`B` inputs is solved
  in least squares (LSMR, matrix-free: the batch's forward pass and its summed kernel cotangent). Its unknowns grow
  :math:`B`-fold, its gradient rows do not: layers that needed their gradient rows (forward rows alone
  rank-deficient) lose them as :math:`B` grows, layers determined by their forward rows stay exact.

Images come back in no particular order; score them with :func:`jaxinv.metrics.match`.
"""

from __future__ import annotations

import math

import functools
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._gradient import gradient_distance
from .._labels import HeadNotInvertibleError, recover_labels
from .._maps import LayerSystem, norm, with_leaf
from .._model import Model, Stage, Structure
from .._result import Reconstruction
from ._fold import as_fold_step, fold_down, timed
from ._head import delta_of_logits
from ._layer import bias_residual, fit_status, layer_report, solve_layer, unactivate
from ._options import Solver


def batch_system(stage: Stage, leaves, deltas) -> LayerSystem:
    r"""The joint system of a layer over a batch: ``x`` of shape ``(B, *in_shape)``, forward :math:`x_i \mapsto A x_i`
    per image, gradient :math:`\sum_i B(x_i; \delta_i)` (``deltas`` ``(B, *z_shape)``)."""
    shape = (deltas.shape[0],) + tuple(stage.nodes.x_in.shape)
    dtype = leaves[stage.nodes.kernel_leaf].dtype
    k = stage.nodes.kernel_leaf
    x0 = jnp.zeros(shape, dtype)

    def f(x, lv=leaves):
        return jax.vmap(lambda xi: stage.affine(xi, lv))(x)

    def b(x):
        _, pull = jax.vjp(lambda w: f(x, with_leaf(leaves, k, w)), leaves[k])
        return pull(deltas.astype(dtype))[0]

    c, f_lin = jax.linearize(f, x0)
    h0, b_lin = jax.linearize(b, x0)
    return LayerSystem(jax.ShapeDtypeStruct(shape, dtype), f_lin, c, b_lin, h0)


def head_batch(model: Model, structure: Structure, gleaves: list[Array], labels: Array, key, loss: str,
               restarts: int, iters: int):
    """The head's inputs ``(B, *x_in)`` and deltas ``(B, *z)`` from the summed outer products (module docstring)."""
    leaves = jax.tree_util.tree_leaves(model.params)
    st = structure.stages[-1]
    B = labels.shape[0]
    n_out = math.prod(st.nodes.z.shape)
    k, bl = st.nodes.kernel_leaf, st.nodes.bias_leaf
    gW, gb = gleaves[k], gleaves[bl].reshape(-1)
    dtype = gW.dtype
    x_shape = tuple(st.nodes.x_in.shape)

    def row(e):  # B(x; e_j)^T gW = sum_i delta_ij x_i: row j of G (outputs x inputs)
        sys = LayerSystem.build(st, leaves, e.reshape(st.nodes.z.shape))
        return jax.linear_transpose(sys.gradient, sys.x_struct)(gW)[0].reshape(-1)

    G = jax.vmap(row)(jnp.eye(n_out, dtype=dtype))  # (K, n)
    U, S, Vt = jnp.linalg.svd(G, full_matrices=False)
    US, V = U[:, :B] * S[:B], Vt[:B]  # (K, B), (B, n)
    sys0 = LayerSystem.build(st, leaves, jnp.zeros(st.nodes.z.shape, dtype))
    delta_of = delta_of_logits(st, loss, n_out)

    def deltas(C):  # C (B, B): x_i = V^T C[i]
        X = C @ V
        Z = jax.vmap(lambda x: sys0.forward(x.reshape(x_shape)) + sys0.forward_offset)(X)
        return jax.vmap(lambda z, y: delta_of(z, y).reshape(-1))(Z, labels) / B  # (B, K)

    def resid(C):
        D = deltas(C)
        return jnp.concatenate([(D.T @ C - US).reshape(-1), D.sum(0) - gb])

    scale = jnp.maximum(norm(jnp.concatenate([US.reshape(-1), gb])), jnp.finfo(dtype).tiny)

    def lm(C):
        def body(_, carry):
            C, lam, cost = carry
            r = resid(C)
            J = jax.jacfwd(resid)(C).reshape(r.shape[0], -1)
            JtJ = J.T @ J
            step = jnp.linalg.solve(JtJ + lam * (jnp.trace(JtJ) / JtJ.shape[0] + 1e-30) * jnp.eye(JtJ.shape[0],
                                                                                                      dtype=dtype),
                                    -J.T @ r)
            Cn = C + step.reshape(C.shape)
            cn = norm(resid(Cn))
            ok = jnp.isfinite(cn) & (cn < cost)
            return (jnp.where(ok, Cn, C), jnp.where(ok, lam * 0.3, lam * 10.0), jnp.where(ok, cn, cost))

        C, _, cost = jax.lax.fori_loop(0, iters, body, (C, jnp.asarray(1e-3, dtype), norm(resid(C))))
        return C, cost

    D0 = deltas(jnp.zeros((B, B), dtype))  # the prediction at x = 0
    C0 = jnp.linalg.lstsq(D0.T, US)[0]  # D0^T C0 = US in least squares: C0 (B, B)
    keys = jax.random.split(key, restarts)
    starts = jax.vmap(lambda kk: C0 + 0.1 * jnp.std(C0) * jax.random.normal(kk, C0.shape, dtype))(keys)
    starts = starts.at[0].set(C0)
    Cs, costs = jax.vmap(lm)(starts)
    best = jnp.argmin(jnp.where(jnp.isfinite(costs), costs, jnp.inf))
    C = Cs[best]
    X = (C @ V).reshape((B,) + x_shape)
    D = deltas(C).reshape((B,) + tuple(st.nodes.z.shape))
    gres = costs[best] / scale
    status = fit_status(gres)
    bsys = batch_system(st, leaves, D)
    bres = norm(D.sum(0).reshape(-1) - gb) / jnp.maximum(norm(gb), jnp.finfo(dtype).tiny)
    gx = bsys.forward_transpose(D)
    rep = layer_report(st, False, jnp.full((), jnp.nan, dtype), gres, bres, 0, jnp.asarray(iters, jnp.int32), status)
    return X, gx, rep


def down_batch(model: Model, structure: Structure, l: int, gleaves: list[Array], X: Array, GX: Array,
               solver: Solver):
    """Layer l below the head, jointly for the batch: ``(B, *x_out)`` outputs and their gradients -> inputs."""
    leaves = jax.tree_util.tree_leaves(model.params)
    st = structure.stages[l]
    Z, mask, D, clipped = unactivate(st, X, GX)
    sys = batch_system(st, leaves, D)
    x, fres, gres, steps, status = solve_layer(sys, Z, gleaves[st.nodes.kernel_leaf], solver, mask=mask)
    bres = bias_residual(st, leaves, gleaves, D.sum(0))
    gx = sys.forward_transpose(D) if l > 0 else jnp.zeros_like(x)
    return x, gx, layer_report(st, True, fres, gres, bres, clipped, steps, status)


head_batch_jit = eqx.filter_jit(head_batch)
down_batch_jit = eqx.filter_jit(down_batch)


def check_batch_head(structure: Structure, B: int, loss: str) -> None:
    """Eager errors for a batch the head cannot separate (module docstring's condition)."""
    st = structure.stages[-1]
    n_out = math.prod(st.nodes.z.shape)
    if st.layer.kind != "dense" or st.nodes.bias_leaf < 0:
        raise HeadNotInvertibleError(
            f"a batch gradient is separated at a dense head with a bias; the head {st.layer.path!r} is "
            f"{'a ' + st.layer.kind if st.layer.kind != 'dense' else 'dense without a bias'}: use "
            "jaxinv.attack('ig', ..., batch_size=B)")
    if loss != "cross_entropy" or n_out < B:
        raise HeadNotInvertibleError(
            f"the head {st.layer.path!r} has {n_out} output(s) for a batch of {B}: its gradient is a sum of {B} "
            f"rank-one terms and separates them only when the head is at least as wide as the batch (K >= B, "
            "softmax cross-entropy); use jaxinv.attack('ig', ..., batch_size=B) for this batch")


def copa_batch(model: Model, structure: Structure, gleaves: list[Array], label, batch_size: int | None, loss: str,
               key, solver: Solver) -> Reconstruction:
    """COPA on one gradient of a batch of ``B`` images (module docstring): the head separates the batch, the fold
    solves every layer below jointly. ``label``: the ``(B,)`` labels or ``None`` (their multiset is recovered)."""
    B = int(label.size) if label is not None else int(batch_size)
    check_batch_head(structure, B, loss)
    if label is None:
        label = recover_labels(model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(model.params),
                                                                   gleaves), B, input_shape=structure.input_shape)
    label = jnp.asarray(label, jnp.int32).reshape(-1)
    key = jax.random.key(0) if key is None else key
    t_start = time.perf_counter()
    (X, GX, rep), sec = timed(False, head_batch_jit, model, structure, gleaves, label, key, loss, 4, 100)
    down = [as_fold_step(functools.partial(down_batch_jit, model, structure, l, solver=solver))
            for l in range(len(structure.stages) - 1)]
    fold = fold_down(structure, down, gleaves, (X, GX), rep, sec, B)
    image = fold.x.reshape((B,) + structure.input_shape)
    n_out = math.prod(structure.stages[-1].nodes.x_out.shape)
    dist = gradient_distance(model, image, label, gleaves, loss, n_out)
    return Reconstruction(
        image=image, label=label, layers=fold.reports, attack="copa",
        loss_trace=jnp.zeros((1, 0), image.dtype), gradient_distance=dist.reshape(1),
        seconds=jnp.asarray(time.perf_counter() - t_start, jnp.float32), layer_inputs=fold.layer_inputs)
