r"""DLG and iDLG: match the shared gradient in squared L2 distance with L-BFGS, from a random start.

**DLG** (Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019) optimises a dummy batch :math:`\hat x` and
dummy label logits :math:`\hat y` jointly:

.. math::

    \hat x^\star, \hat y^\star = \arg\min_{\hat x, \hat y}
        \big\| \nabla_\theta \ell\big(f_\theta(\hat x), \mathrm{softmax}(\hat y)\big) - g \big\|_2^2

(the norm over all parameter leaves), with :math:`\ell` the cross-entropy of the soft label against
:math:`\log\mathrm{softmax}(f_\theta(\hat x))`, mean over the batch; for a single-output model the soft binary
target is :math:`\sigma(\hat y)`. Both start from :math:`\mathcal N(0, 1)` (the paper's ``randn``) and are
optimised by L-BFGS (here ``optax.lbfgs`` with its zoom line search; the paper used PyTorch's L-BFGS with
``lr=1`` and no line search, 300 outer steps of up to 20 inner iterations).

**iDLG** (Zhao, Mopuri & Bilen, "iDLG: Improved Deep Leakage from Gradients", arXiv 2001.02610) reads the label
off the head's gradient first (:func:`jaxinv.recover_label`: with cross-entropy the head's bias gradient
:math:`\mathrm{softmax}(z) - e_y` is negative exactly at :math:`y`), then runs DLG on the data only. For batches
:func:`recover_labels` gives the label multiset.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from .._gradient import validate_grads
from .._labels import recover_label, recover_labels
from .._model import Model, UnsupportedModelError
from .._maps import with_leaf
from .._result import Reconstruction
from . import _objectives as obj

# ------------------------------------------------------------------------------------------------------- labels


def _labels_for(model, grads, problem: obj.Problem, input_shape) -> Array:
    """Given labels, or the recovered ones: ``(B,)`` per target, ``(T, 1)`` for stacked targets."""
    if problem.labels is not None:
        return problem.labels
    if problem.stacked is not None:
        return jax.vmap(lambda g: recover_labels(model, g, 1, input_shape=input_shape))(grads)
    return recover_labels(model, grads, problem.batch_size, input_shape=input_shape)


# --------------------------------------------------------------------------------------------------------- DLG


class _DLGOptions(eqx.Module):
    batch_size: int = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    memory_size: int = eqx.field(static=True)
    tol: float = eqx.field(static=True)
    window: int = eqx.field(static=True)
    log_every: int = eqx.field(static=True)
    callback: Callable | None = eqx.field(static=True)
    max_evaluations: int | None = eqx.field(static=True, default=None)


def _dlg_one(model: Model, gleaves, labels, key, shape, K, o: _DLGOptions):
    """DLG (labels ``None``) or iDLG (labels ``(B,)``) on one target; returns ``(x, label, trace, distance)``."""
    dtype = model.dtype
    kx, ky = jax.random.split(key)
    x0 = obj.random_image(kx, (o.batch_size,) + shape, None, dtype)
    z0 = {"x": x0}
    if labels is None:
        z0["y"] = jax.random.normal(ky, (o.batch_size, K), dtype)

    def targets(z):
        if labels is not None:
            return obj.hard_targets(labels, K, dtype)
        return jax.nn.sigmoid(z["y"]) if K == 1 else jax.nn.softmax(z["y"], axis=-1)

    def f(z):
        return obj.l2_distance(obj.candidate_gradient(model.apply_fn, model.params, z["x"], targets(z)), gleaves)

    opt = optax.lbfgs(memory_size=o.memory_size)
    value_and_grad = optax.value_and_grad_from_state(f)

    def step(carry, i):
        z, state, evals = carry
        value, grad = value_and_grad(z, state=state)
        updates, state = opt.update(grad, state, z, value=value, grad=grad, value_fn=f)
        # value_and_grad_from_state reuses the line search's last evaluation (a fresh one on the first step only);
        # each line-search step is one evaluation of the objective and its gradient.
        evals = evals + (i == 0) + optax.tree_utils.tree_get(state, "num_linesearch_steps")
        return (optax.apply_updates(z, updates), state, evals), value, z

    stop = None if o.max_evaluations is None else (lambda c: c[2] >= o.max_evaluations)
    res = obj.minimise(step, (z0, opt.init(z0), jnp.zeros((), jnp.int32)), z0, max_steps=o.max_steps,
                       log_every=o.log_every, tol=o.tol, window=o.window, callback=o.callback, stop=stop)
    z = res.params
    if labels is None:
        lab = (z["y"][:, 0] > 0).astype(jnp.int32) if K == 1 else jnp.argmax(z["y"], axis=-1).astype(jnp.int32)
    else:
        lab = labels.astype(jnp.int32)
    g_hat = obj.candidate_gradient(model.apply_fn, model.params, z["x"], obj.hard_targets(lab, K, dtype))
    return z["x"], lab, res.trace, obj.relative_distance(g_hat, gleaves)


@eqx.filter_jit
def _dlg_run(model, gleaves, labels, key, shape, K, o, stacked):
    if stacked:
        keys = jax.random.split(key, gleaves[0].shape[0])
        x, lab, trace, dist = jax.vmap(lambda g, y, k: _dlg_one(model, g, y, k, shape, K, o),
                                       in_axes=(0, None if labels is None else 0, 0))(gleaves, labels, keys)
        return x.reshape((-1,) + shape), lab.reshape(-1), trace, dist
    x, lab, trace, dist = _dlg_one(model, gleaves, labels, key, shape, K, o)
    return x, lab, trace[None], dist[None]


def _dlg_attack(name, model, grads, label, input_shape, key, batch_size, loss, max_steps, memory_size, tol, window,
                log_every, callback, recover, max_evaluations):
    p = obj.prepare(model, grads, label=label, input_shape=input_shape, key=key, batch_size=batch_size, loss=loss,
                    attack=name)
    timer = obj.Timer(p.traced)
    o = _DLGOptions(batch_size=p.batch_size, max_steps=obj.check_int(max_steps, "max_steps", name),
                    memory_size=obj.check_int(memory_size, "memory_size", name), tol=float(tol),
                    window=obj.check_int(window, "window", name), log_every=obj.check_int(log_every, "log_every", name),
                    callback=callback,
                    max_evaluations=None if max_evaluations is None
                    else obj.check_int(max_evaluations, "max_evaluations", name))
    labels = _labels_for(model, grads, p, p.input_shape) if recover else p.labels
    x, lab, trace, dist = _dlg_run(model, p.gleaves, labels, key, p.input_shape, p.num_outputs, o,
                                   p.stacked is not None)
    return Reconstruction(image=x, label=lab, layers=(), attack=name, loss_trace=trace, gradient_distance=dist,
                          seconds=timer.seconds((x, trace)))


def dlg(
    model: Model,
    grads: PyTree,
    *,
    label: int | Int[Array, "..."] | None = None,
    input_shape: tuple[int, ...] | None = None,
    key: PRNGKeyArray | None = None,
    batch_size: int | None = None,
    loss: str = "auto",
    max_steps: int = 1000,
    memory_size: int = 100,
    tol: float = 1e-6,
    window: int = 25,
    log_every: int = 10,
    callback: Callable[[Array, Array], Any] | None = None,
    max_evaluations: int | None = None,
) -> Reconstruction:
    r"""Deep Leakage from Gradients: L-BFGS on dummy data and a dummy soft label, squared L2 gradient distance.

    .. math:: \min_{\hat x, \hat y}\ \sum_{\text{leaves}}
        \big\|\nabla_\theta \ell(f_\theta(\hat x), \mathrm{softmax}(\hat y)) - g\big\|_2^2

    The whole optimisation is one compiled ``lax.while_loop`` of ``optax.lbfgs`` steps (zoom line search, the
    gradient reused from the line search's state: ``optax.value_and_grad_from_state``).

    Args:
        model: the model (any differentiable ``apply_fn``; layer structure not needed).
        grads: the shared gradient: one batch gradient, or ``T`` single-image gradients stacked on a leading axis.
        label: ``None`` (DLG proper: the label is optimised as a soft label and its argmax reported); given labels
            are held fixed (then this is iDLG with a known label).
        input_shape: one input's shape (default: the model's).
        key: PRNG key of the random start (required).
        batch_size: images behind the gradient (default: from ``label``, else 1).
        loss: the client's loss (``auto``, ``cross_entropy``, ``logistic``); checked against the model.
        max_steps: L-BFGS iterations (each one line search of one or more evaluations).
        memory_size: L-BFGS history (PyTorch's default, which DLG used, is 100).
        tol, window: stop when the objective's relative change over ``window`` steps is below ``tol``.
        log_every: objective logged (and ``callback(step, loss)`` called) every ``log_every`` steps.
        callback: optional host callback ``(step, loss) -> None`` (via ``jax.debug.callback``).
        max_evaluations: optional budget of objective-and-gradient evaluations (line-search steps included):
            the run stops after the iteration that reaches it. For comparisons at equal cost with attacks that
            evaluate once per step (IG, hybrid).

    Returns:
        A :class:`jaxinv.Reconstruction`: ``image`` ``(B, *input_shape)`` (``(T, ...)`` for stacked targets),
        ``label`` ``(B,)``, ``loss_trace`` ``(1, ceil(max_steps/log_every))`` per shared gradient (NaN after an
        early stop), ``gradient_distance`` ``(1,)``: relative L2 distance of the gradient of (image, hard label)
        to the shared one.

    Example:
        >>> rec = jaxinv.attack("dlg", model, grads, key=jax.random.key(0))

    References:
        L. Zhu, Z. Liu, S. Han. Deep Leakage from Gradients. NeurIPS 2019.
    """
    return _dlg_attack("dlg", model, grads, label, input_shape, key, batch_size, loss, max_steps, memory_size, tol,
                       window, log_every, callback, recover=False, max_evaluations=max_evaluations)


def idlg(
    model: Model,
    grads: PyTree,
    *,
    label: int | Int[Array, "..."] | None = None,
    input_shape: tuple[int, ...] | None = None,
    key: PRNGKeyArray | None = None,
    batch_size: int | None = None,
    loss: str = "auto",
    max_steps: int = 1000,
    memory_size: int = 100,
    tol: float = 1e-6,
    window: int = 25,
    log_every: int = 10,
    callback: Callable[[Array, Array], Any] | None = None,
    max_evaluations: int | None = None,
) -> Reconstruction:
    r"""Improved DLG: the label from the head's gradient, then DLG on the data only.

    The label is :func:`jaxinv.recover_label` (one image: the negative entry of the head's bias gradient) or
    :func:`recover_labels` (``batch_size > 1``: the LLG count rule); a given ``label`` is used as is. Then

    .. math:: \min_{\hat x}\ \sum_{\text{leaves}} \big\|\nabla_\theta \ell(f_\theta(\hat x), y) - g\big\|_2^2

    by L-BFGS, exactly as :func:`dlg` (same options). Label recovery needs the model's layer structure (a head
    that jaxinv can read); otherwise pass ``label``.

    References:
        B. Zhao, K. R. Mopuri, H. Bilen. iDLG: Improved Deep Leakage from Gradients. arXiv 2001.02610, 2020.
    """
    return _dlg_attack("idlg", model, grads, label, input_shape, key, batch_size, loss, max_steps, memory_size, tol,
                       window, log_every, callback, recover=True, max_evaluations=max_evaluations)
