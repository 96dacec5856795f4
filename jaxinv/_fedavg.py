r"""FedAvg: the shared object is a weight update after ``K`` local SGD steps, not a gradient.

A FedAvg client starts from the server's :math:`\theta_0`, runs :math:`K` steps of SGD with learning rate
:math:`\eta` on its data, :math:`\theta_{k+1} = \theta_k - \eta\,\nabla_\theta \ell(f_{\theta_k}(x), y)`, and
shares :math:`\Delta = \theta_K - \theta_0` (McMahan et al. 2017). Two ways to attack it:

* **first order**: :math:`-\Delta / (K\eta) = \frac1K \sum_k \nabla\ell(\theta_k) = \nabla\ell(\theta_0) +
  O(K\eta)`: :func:`update_as_gradient` turns the update into a gradient at :math:`\theta_0` that every attack and
  the security metric accept (exact for :math:`K = 1`; the error grows with :math:`K\eta`);
* **simulating the steps**: ``jaxinv.attack("ig", ..., local_steps=K, local_lr=eta)`` matches the candidate's own
  simulated update, unrolled and differentiated through (Geiping et al. 2020, Sec. 5), given
  ``update_as_gradient(update, ...)`` as the shared object.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

from ._checks import positive_int
from ._client import Client
from ._gradient import check_labels, client_gradient, loss_fn
from ._model import Model


def check_steps_lr(steps, lr, where: str) -> tuple[int, float]:
    steps = positive_int(steps, "steps", where, what="the client's local SGD steps K")
    if lr is None:
        raise ValueError(f"{where}: the client's learning rate lr (local_lr) is required with {steps} local steps")
    try:
        lr = float(lr)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: lr must be a number, got {type(lr).__name__}") from None
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"{where}: lr must be positive and finite (the client's learning rate), got {lr!r}")
    return int(steps), lr


def local_update(
    model: Model,
    x: Float[Array, "B *shape"],
    y: Int[Array, " B"],
    *,
    steps: int,
    lr: float,
    loss: str = "auto",
) -> PyTree:
    r"""The update a FedAvg client shares: :math:`\Delta = \theta_K - \theta_0` after ``steps`` full-batch SGD steps
    on ``(x, y)`` with learning rate ``lr``, starting from ``model.params``.

    Example:
        >>> upd = jaxinv.local_update(model, x, y, steps=5, lr=0.01)
        >>> client = jaxinv.Client(local_steps=5, local_lr=0.01)  # COPA models the client's 5 steps
        >>> rec = jaxinv.copa(model, jaxinv.update_as_gradient(upd, steps=5, lr=0.01), client=client)
        >>> float(jaxinv.metrics.psnr(rec.image, x)[0]) > 60
        True
    """
    steps, lr = check_steps_lr(steps, lr, "local_update")
    x, y = jnp.asarray(x), jnp.asarray(y).reshape(-1)
    if x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x (shape {tuple(x.shape)}) must have a batch axis first matching y (shape {tuple(y.shape)})")
    n_out = int(np.prod(jax.eval_shape(model.apply_fn, model.params, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[1:]))
    y = check_labels(y, 2 if n_out == 1 else n_out, name="y")
    lf = loss_fn(loss, n_out)
    grad = jax.grad(lambda p: lf(model.apply_fn(p, x), y))

    def body(_, p):
        return jax.tree_util.tree_map(lambda a, g: a - lr * g, p, grad(p))

    theta = jax.lax.fori_loop(0, steps, body, model.params)
    return jax.tree_util.tree_map(lambda a, b: a - b, theta, model.params)


def update_as_gradient(update: PyTree, *, steps: int, lr: float) -> PyTree:
    r"""A FedAvg update as the first-order gradient at the server's weights: :math:`-\Delta / (K\eta)`.

    Exact for one local step; for :math:`K` steps it is the mean gradient along the client's trajectory.
    """
    steps, lr = check_steps_lr(steps, lr, "update_as_gradient")
    return jax.tree_util.tree_map(lambda d: -d / (steps * lr), update)


def shared_gradients(model: Model, images: Float[Array, "N *shape"], labels: Int[Array, " N"],
                     client: Client) -> PyTree:
    r"""What each image's client shares, stacked on a leading axis of every leaf: the single-image gradient
    :math:`\nabla_\theta \ell(f_\theta(x_i), y_i)` with the client's loss or, when the client's learning rate is
    given (it shares weights after ``local_steps`` :math:`K \ge 1` SGD steps), the update read as a gradient,
    :math:`-\Delta_i / (K\eta)` (:func:`update_as_gradient`; even one step carries the rounding of
    :math:`\theta_0 - \eta g`)."""

    def one(x, y):
        if client.local_lr is not None:
            steps, lr = client.local_steps, client.local_lr
            update = local_update(model, x[None], y[None], steps=steps, lr=lr, loss=client.loss)
            return update_as_gradient(update, steps=steps, lr=lr)
        return client_gradient(model, x[None], y[None], loss=client.loss)

    return jax.vmap(one)(jnp.asarray(images), jnp.asarray(labels))
