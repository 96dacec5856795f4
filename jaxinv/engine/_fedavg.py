r"""A FedAvg update inverted layer-wise: the first-order reading corrected by simulating the client's steps.

The update after :math:`K` SGD steps with learning rate :math:`\eta`, passed as :math:`\bar g = -\Delta/(K\eta)`
(:func:`jaxinv.update_as_gradient`), is :math:`\nabla\ell(\theta_0) + O(K\eta)`. With the current reconstruction
:math:`\hat x_t`, :math:`\hat g_t = \bar g - (\bar g_\text{sim}(\hat x_t) - \nabla\ell(\theta_0; \hat x_t))` (the
client's steps simulated on :math:`\hat x_t`) and :math:`\hat x_{t+1} = \mathrm{COPA}(\hat g_t)`: the truth is a
fixed point (on cnn2_c1 with :math:`K=2, \eta=0.01`: 18 dB -> 116 dB in 8 iterations, slower as :math:`K\eta` grows).
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._client import Client
from .._fedavg import local_update, update_as_gradient
from .._gradient import client_gradient, validate_grads
from .._model import Model
from .._result import Reconstruction


def fedavg_fixed_point(solve: Callable[[PyTree, Array | None], Reconstruction], model: Model, grads: PyTree,
                       label, client: Client, iters: int) -> Reconstruction:
    r"""Iterate :math:`\hat x_{t+1} = \mathrm{solve}(\hat g_t)` (module docstring) at most ``iters`` times.

    Args:
        solve: the single-gradient attack ``(gradient, label) -> Reconstruction`` (copa with one local step).
        model: the model at the server's :math:`\theta_0`.
        grads: :math:`\bar g`, the update read as a gradient (one target, or ``T`` stacked).
        label: the given label(s), or ``None`` (recovered by the first solve, then kept).
        client: the client's setting (``local_steps`` :math:`K`, ``local_lr`` :math:`\eta`, ``loss``).
        iters: the cap on fixed-point iterations.

    Returns:
        The last reconstruction; ``loss_trace`` holds :math:`\|\bar g_\text{sim}(\hat x_t) - \bar g\| / \|\bar g\|`
        per iteration and target, ``gradient_distance`` its last value.
    """
    K, lr, loss = client.local_steps, client.local_lr, client.loss
    _, T = validate_grads(model, grads)

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

    def labels_of(rec):
        return rec.label if T is not None or rec.label.size > 1 else rec.label.reshape(1)

    rec = solve(grads, label)
    trace = []
    prev = rec.image
    for _ in range(iters):
        g_hat, d = step(rec.image, labels_of(rec))
        trace.append(d)
        rec = solve(g_hat, rec.label if (T is not None or rec.label.size > 1) else rec.label[0])
        change = float(jnp.max(jnp.abs(rec.image - prev)))
        prev = rec.image
        if change < 1e-6:
            break
    _, d = step(rec.image, labels_of(rec))
    trace.append(d)
    return eqx.tree_at(lambda r: (r.loss_trace, r.gradient_distance), rec,
                       (jnp.stack(trace, -1).reshape(-1, len(trace)), d.reshape(-1)))
