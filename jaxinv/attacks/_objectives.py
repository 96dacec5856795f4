r"""The objectives of the optimisation attacks: a candidate's gradient, gradient distances, the loop.

Notation: :math:`\theta` the model's parameters, :math:`g = \nabla_\theta \frac1B\sum_i \ell(f_\theta(x_i), y_i)`
the shared gradient (a pytree), :math:`\hat x` a candidate batch, :math:`\hat t` its (soft) targets and
:math:`\hat g = g(\hat x, \hat t)` the gradient the candidate produces. Every function of the first part is small,
pure, and works on one target under ``jit`` / ``vmap``; :func:`minimise` is the one compiled loop all optimisation
attacks run. The priors (:func:`total_variation`, :func:`project_box`) live in :mod:`jaxinv._priors`, shared with
the engine's refinement, and are re-exported here; the relative distance is :mod:`jaxinv._gradient`'s.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PyTree

from .._client import Client
from .._gradient import relative_distance
from .._priors import project_box, total_variation

__all__ = [
    "LoopResult",
    "candidate_gradient",
    "candidate_shared",
    "candidate_update_gradient",
    "cosine_distance",
    "hard_targets",
    "l2_distance",
    "minimise",
    "project_box",
    "random_image",
    "relative_distance",
    "soft_cross_entropy",
    "total_variation",
]

# ------------------------------------------------------------------------------------------------ the objectives


def soft_cross_entropy(logits: Float[Array, "B ..."], target: Float[Array, "B K"]) -> Float[Array, ""]:
    r"""The client's loss with soft targets, mean over the batch.

    For :math:`K > 1` outputs (softmax cross-entropy), with :math:`t_i` a probability vector:

    .. math:: \ell = -\frac1B \sum_i \sum_k t_{ik} \log \mathrm{softmax}(z_i)_k

    For one output (binary logistic loss), with :math:`t_i \in [0, 1]`:

    .. math:: \ell = \frac1B \sum_i -t_i \log\sigma(z_i) - (1 - t_i)\log(1 - \sigma(z_i))

    One-hot (resp. 0/1) targets give exactly the hard-label loss the client used
    (:func:`jaxinv.client_gradient`'s loss), so the same function serves known and unknown labels.

    Args:
        logits: model outputs, batch axis first (reshaped to ``(B, K)``, or to ``target``'s shape).
        target: ``(B, K)`` probabilities, or ``(B, 1)`` values in ``[0, 1]`` for one output; ``(B, H, W, K)``
            per-pixel probabilities for a segmentation model (mean over the batch and the pixels).

    Returns:
        The scalar loss.
    """
    if target.ndim > 2:  # segmentation: (B, H, W, K) targets, per-pixel cross-entropy, mean over batch and pixels
        z = logits.reshape(target.shape)
        return jnp.mean(-jnp.sum(target.astype(z.dtype) * jax.nn.log_softmax(z, axis=-1), axis=-1))
    z = logits.reshape(logits.shape[0], -1)
    t = target.reshape(z.shape).astype(z.dtype)
    if z.shape[-1] == 1:
        return jnp.mean(optax.sigmoid_binary_cross_entropy(z, t))
    return jnp.mean(-jnp.sum(t * jax.nn.log_softmax(z, axis=-1), axis=-1))


def hard_targets(labels: Int[Array, " B"], num_outputs: int, dtype=jnp.float32) -> Float[Array, "B K"]:
    """Integer labels as the targets of :func:`soft_cross_entropy`: one-hot rows, or 0/1 for one output."""
    if num_outputs == 1:
        return labels.reshape(-1, 1).astype(dtype)
    return jax.nn.one_hot(labels, num_outputs, dtype=dtype)


def candidate_gradient(
    apply_fn: Callable, params: PyTree, x: Float[Array, "B *shape"], target: Float[Array, "B K"]
) -> list[Array]:
    r"""The gradient a candidate batch would share: :math:`\hat g = \nabla_\theta\, \ell(f_\theta(\hat x), \hat t)`.

    Differentiable in ``x`` and ``target`` (the attacks differentiate through it: second order).

    Args:
        apply_fn: the model's ``apply_fn(params, x)``.
        params: the parameters (the point the client differentiated at).
        x: candidate inputs, batch axis first.
        target: soft targets (:func:`soft_cross_entropy`).

    Returns:
        The gradient's leaves, in ``jax.tree_util`` order of ``params``.
    """
    g = jax.grad(lambda p: soft_cross_entropy(apply_fn(p, x), target))(params)
    return jax.tree_util.tree_leaves(g)


def candidate_update_gradient(
    apply_fn: Callable, params: PyTree, x: Float[Array, "B *shape"], target: Float[Array, "B K"], steps: int,
    lr: float,
) -> list[Array]:
    r"""What a candidate batch would share as a FedAvg client, as a gradient: :math:`(\theta_0 - \theta_K)/(K\eta)`
    after ``steps`` :math:`= K` full-batch SGD steps with learning rate :math:`\eta` on ``(x, target)``
    (:func:`jaxinv.update_as_gradient` of the simulated update). Differentiable in ``x`` through the unrolled steps;
    ``steps=1`` is :func:`candidate_gradient`."""
    grad = jax.grad(lambda p: soft_cross_entropy(apply_fn(p, x), target))

    def body(_, p):
        return jax.tree_util.tree_map(lambda a, g: a - lr * g, p, grad(p))

    theta = jax.lax.fori_loop(0, steps, body, params)
    return jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: (a - b) / (steps * lr), params, theta))


def candidate_shared(
    apply_fn: Callable, params: PyTree, x: Float[Array, "B *shape"], target: Float[Array, "B K"], client: Client
) -> list[Array]:
    """What a candidate batch would share as ``client``, as a gradient: its gradient
    (:func:`candidate_gradient`), or for a FedAvg client (``client.local_steps > 1``) its simulated update
    (:func:`candidate_update_gradient`, Geiping et al. 2020, Sec. 5)."""
    if client.fedavg:
        return candidate_update_gradient(apply_fn, params, x, target, client.local_steps, client.local_lr)
    return candidate_gradient(apply_fn, params, x, target)


def _dot(a: list[Array], b: list[Array]) -> Array:
    return sum(jnp.vdot(u, v) for u, v in zip(a, b))


def l2_distance(g_hat: list[Array], g: list[Array]) -> Float[Array, ""]:
    r"""DLG's gradient distance, the squared L2 norm over all leaves (Zhu et al. 2019, eq. 4):

    .. math:: D(\hat g, g) = \sum_{\text{leaves}} \|\hat g - g\|_2^2
    """
    return sum(jnp.sum((u - v) ** 2) for u, v in zip(g_hat, g))


def cosine_distance(g_hat: list[Array], g: list[Array]) -> Float[Array, ""]:
    r"""Geiping et al.'s gradient distance, one minus the cosine similarity of the concatenated leaves:

    .. math:: D(\hat g, g) = 1 - \frac{\langle \hat g, g\rangle}{\|\hat g\|\,\|g\|}
        = \tfrac12 \Big\| \frac{\hat g}{\|\hat g\|} - \frac{g}{\|g\|} \Big\|_2^2

    (all leaves at once, as ``inversefed``'s ``sim`` cost with all indices). In ``[0, 2]``; scale-invariant, so it
    matches the gradient's direction, not its magnitude. A zero gradient counts as orthogonal (distance 1).

    Computed as the second form, from the difference of the unit vectors: the first form subtracts two numbers
    near 1, so in float32 it cannot resolve distances below ~1e-7 (its rounding error is ~6e-8), and its gradient
    suffers the same cancellation. On small untrained nets the whole useful range lies below that: on the sigmoid
    LeNet of DLG (``jaxinv.zoo`` ``lenet_dlg``) a random image is at distance ~3e-6 and the true image plus noise of
    std 0.03 (~30 dB) at ~2e-8, because the head's gradient, which barely depends on the input, dominates the
    concatenated vector.
    """
    dtype = jnp.result_type(*g)
    tiny = jnp.finfo(dtype).tiny
    sq_hat, sq = _dot(g_hat, g_hat), _dot(g, g)
    ok = (sq_hat > tiny) & (sq > tiny)
    s_hat = jax.lax.rsqrt(jnp.where(ok, sq_hat, 1.0))  # double where: finite values and gradients at zero too
    s = jax.lax.rsqrt(jnp.where(ok, sq, 1.0))
    d = 0.5 * sum(jnp.sum((u * s_hat - v * s) ** 2) for u, v in zip(g_hat, g))
    return jnp.where(ok, d, jnp.ones((), d.dtype))


def random_image(key, shape: tuple[int, ...], box: tuple[float, float] | None, dtype) -> Array:
    """A random starting candidate: uniform in the box, or standard normal when there is none (DLG's ``randn``)."""
    if box is None:
        return jax.random.normal(key, shape, dtype)
    return jax.random.uniform(key, shape, dtype, minval=box[0], maxval=box[1])


# -------------------------------------------------------------------------------------------------------- the loop


class LoopResult(NamedTuple):
    """What :func:`minimise` returns (one run).

    Attributes:
        params: the best evaluated iterate (lowest finite objective).
        value: its objective.
        trace: the objective every ``log_every`` steps, ``(ceil(max_steps / log_every),)``; NaN after an early stop.
        steps: iterations run.
    """

    params: PyTree
    value: Array
    trace: Array
    steps: Array


def minimise(
    step: Callable[[Any, Array], tuple[Any, Array, PyTree]],
    init: Any,
    params0: PyTree,
    *,
    max_steps: int,
    log_every: int,
    tol: float,
    window: int,
    min_steps: int = 0,
    callback: Callable | None = None,
    stop: Callable[[Any], Array] | None = None,
) -> LoopResult:
    r"""The optimisation loop of every attack: one ``lax.while_loop``, stopped early on convergence.

    ``step(carry, i) -> (carry, value, params)`` does one iteration and returns the objective ``value`` at the
    iterate ``params`` it evaluated (before its update). The loop keeps the best evaluated iterate, logs the
    objective every ``log_every`` steps (and calls ``callback(step, value)`` there through
    ``jax.debug.callback``), and stops when

    * ``max_steps`` iterations have run, or
    * the objective has converged: every ``window`` steps, once at least ``min_steps`` steps have run, the
      relative improvement of the best objective so far over the last ``window`` steps,
      :math:`(f^\star_{i-\text{window}} - f^\star_i) / |f^\star_{i-\text{window}}|` with
      :math:`f^\star_i = \min_{j \le i} f_j`, is below ``tol`` (``tol=0`` disables it), or
    * the objective is not finite (a diverged step; the best finite iterate is returned), or
    * ``stop(carry)`` is true after a step (e.g. a budget of function evaluations is spent).

    The test uses the best value so far, not the current one, because the current one of a stochastic-looking
    optimiser (IG's signed Adam oscillates at a fixed learning rate) can return to an earlier value by chance;
    for a monotone optimiser (L-BFGS with a line search) the two coincide. ``min_steps`` keeps the test off while
    a schedule has work left (IG: until its last learning-rate decay, so that a plateau at a large learning rate
    does not end the run before the decays that refine it).

    Args:
        step: one iteration.
        init: the initial carry.
        stop: optional predicate of the carry that ends the loop (checked after each step).
        params0: the initial iterate (shape template of the best iterate).
        max_steps, log_every, tol, window, min_steps, callback: see above.

    Returns:
        A :class:`LoopResult`.
    """
    n_log = -(-max_steps // log_every)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params0))
    inf = jnp.asarray(jnp.inf, dtype)

    def cond(s):
        i, _, _, _, _, _, done = s
        return (i < max_steps) & ~done

    def body(s):
        i, carry, best, best_val, trace, ref, _ = s
        carry, val, x = step(carry, i)
        val = val.astype(dtype)
        finite = jnp.isfinite(val)
        better = finite & (val < best_val)
        best = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), x, best)
        best_val = jnp.where(better, val, best_val)
        logged = i % log_every == 0
        slot = i // log_every
        trace = trace.at[slot].set(jnp.where(logged, val, trace[slot]))
        if callback is not None:
            # Under vmap (restarts, stacked targets) the cond becomes a select and runs every step: filter on host.
            def host(step_, value):
                if int(step_) % log_every == 0:
                    callback(int(step_), float(value))

            jax.lax.cond(logged, lambda: jax.debug.callback(host, i, val), lambda: None)
        check = (i + 1) % window == 0
        rel = (ref - best_val) / jnp.maximum(jnp.abs(ref), jnp.finfo(dtype).tiny)  # NaN while ref is inf: no stop
        converged = check & (i + 1 >= min_steps) & (tol > 0) & (rel < tol)
        ref = jnp.where(check, best_val, ref)
        halt = converged | ~finite
        if stop is not None:
            halt = halt | stop(carry)
        return i + 1, carry, best, best_val, trace, ref, halt

    s0 = (jnp.asarray(0, jnp.int32), init, params0, inf, jnp.full((n_log,), jnp.nan, dtype), inf,
          jnp.asarray(False))
    i, _, best, best_val, trace, _, _ = jax.lax.while_loop(cond, body, s0)
    return LoopResult(best, best_val, trace, i)
