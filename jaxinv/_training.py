r"""Checkpoints of a model trained on a labelled task: what federated clients really hold (not the initialisation).

Training is plain mini-batch Adam on the client's loss (:func:`jaxinv._gradient.loss_fn`: softmax cross-entropy, or
the logistic loss for one output), batches drawn with replacement by the key:

.. math:: \theta_{t+1} = \mathrm{Adam}\big(\theta_t,\ \nabla_\theta \tfrac1B\textstyle\sum_{i\in I_t}
    \ell(f_\theta(x_i), y_i)\big), \qquad I_t \sim \mathcal{U}\{0..n-1\}^B .

The checkpoints are :class:`jaxinv.Model` objects (the same adapter, parameters replaced), so each one is audited,
attacked or scored as it is: ``jaxinv.security(ckpt.model, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._checks import check_key, positive_int
from ._gradient import check_labels, loss_fn, resolve_loss
from ._model import Model


class Checkpoint(NamedTuple):
    """One checkpoint of :func:`train`.

    Attributes:
        step: Adam steps taken.
        model: the :class:`jaxinv.Model` with the parameters after ``step`` steps.
        loss: the mean training loss over the whole task at this checkpoint.
        accuracy: the training accuracy at this checkpoint (:func:`accuracy`).
    """

    step: int
    model: Model
    loss: float
    accuracy: float


def accuracy(model: Model, images: Float[Array, "n ..."], labels: Int[Array, " n"]) -> float:
    """The fraction of ``images`` whose predicted class is ``labels`` (one output: the logit's sign)."""
    logits = jax.jit(model.apply_fn)(model.params, images)
    logits = logits.reshape(logits.shape[0], -1)
    pred = (logits[:, 0] > 0).astype(jnp.int32) if logits.shape[1] == 1 else jnp.argmax(logits, -1)
    return float(jnp.mean(pred == labels))


def train(model: Model, task: Any, *, steps: Sequence[int] = (0, 100, 300, 1000), lr: float = 1e-3,
          batch_size: int = 32, loss: str = "auto", key: PRNGKeyArray) -> tuple[Checkpoint, ...]:
    r"""Train ``model`` on ``task`` with Adam and return its checkpoints (module docstring).

    Args:
        model: a :class:`jaxinv.Model` (:func:`jaxinv.from_linen`, ``from_nnx``, ``from_fn``); its parameters are
            the start (step 0). Other state (BatchNorm statistics) is held fixed, as the attacks read it.
        task: ``(images, labels, ...)``, e.g. :func:`jaxinv.data.photo_task` or a :func:`jaxinv.data.load_tfds`
            pair; images ``(n, *input_shape)``, integer labels ``(n,)`` below the model's outputs (0/1 for one).
        steps: the step counts to return checkpoints at (sorted, distinct, ``>= 0``).
        lr: Adam's learning rate.
        batch_size: images per step (drawn with replacement).
        loss: ``"auto"``, ``"cross_entropy"`` or ``"logistic"`` (:class:`jaxinv.Client`'s).
        key: JAX PRNG key drawing the batches (step :math:`t`'s from ``fold_in(key, t)``): the same key gives the
            same checkpoints, whichever other steps are asked for.

    Returns:
        One :class:`Checkpoint` per entry of ``steps``.

    Raises:
        ValueError: bad ``steps``, ``lr``, ``batch_size``, or labels out of the model's range (names the fix).

    Example:
        >>> task = jaxinv.data.photo_task(64, size=16, key=jax.random.key(0))
        >>> ckpts = jaxinv.zoo.train(model, task, steps=(0, 20), key=jax.random.key(1))
        >>> [c.step for c in ckpts], ckpts[1].loss < ckpts[0].loss
        ([0, 20], True)
    """
    key = check_key(key, "train", required=True)
    batch_size = positive_int(batch_size, "batch_size", "train")
    steps = tuple(int(s) for s in steps)
    if not steps or any(s < 0 for s in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"train: steps must be distinct increasing integers >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise ValueError(f"train: lr must be a positive number, got {lr!r}")
    images, labels = jnp.asarray(task[0]), jnp.asarray(task[1])
    if images.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise ValueError(f"train: the task needs images (n, ...) and labels (n,), got {images.shape} and "
                         f"{labels.shape}")
    dtype = jax.tree_util.tree_leaves(model.params)[0].dtype
    images = images.astype(dtype)
    n_out = model.num_outputs
    resolve_loss(loss, n_out)
    labels = check_labels(labels, 2 if n_out == 1 else n_out, name="the task's labels")
    lf = loss_fn(loss, n_out)
    opt = optax.adam(lr)

    def objective(params, x, y):
        return lf(model.apply_fn(params, x), y)

    @eqx.filter_jit
    def run(params, state, start, n):
        def body(i, carry):
            params, state = carry
            idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, images.shape[0], jnp.int32)
            g = jax.grad(objective)(params, images[idx], labels[idx])
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state

        return jax.lax.fori_loop(start, start + n, body, (params, state))

    whole = jax.jit(objective)
    params, state, done, out = model.params, opt.init(model.params), 0, []
    for s in steps:
        params, state = run(params, state, done, s - done)
        done = s
        ckpt = eqx.tree_at(lambda m: m.params, model, params)
        out.append(Checkpoint(s, ckpt, float(whole(params, images, labels)), accuracy(ckpt, images, labels)))
    return tuple(out)
