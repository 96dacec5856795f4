r"""The common frame of the optimisation attacks (DLG, iDLG, IG): options in, a validated problem, one compiled run.

Each attack is a function ``one(model, gleaves, labels, key, spec) -> (image, label, trace, distance)`` that
reconstructs one target; :func:`run_attack` does the rest once for all of them:

1. :func:`attack_options`: the entry's option objects (:class:`jaxinv.Client` first, then the attack's own options
   class) with the earlier flat keywords moved onto them (:func:`jaxinv._checks.merge_options`), an unknown keyword
   a ``TypeError`` listing the options;
2. :func:`prepare`: the model, the PRNG key, the shared gradient and the labels checked eagerly (errors naming the
   argument and the fix), as a :class:`Problem`;
3. :func:`labels_for`: the given labels, or those the head's gradient reveals (:func:`jaxinv.recover_labels`);
4. one compiled call of ``one`` (``vmap`` over ``T`` stacked targets), timed, returned as a
   :class:`jaxinv.Reconstruction`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._checks import check_key, merge_options, no_more_keywords, positive_int
from .._client import Client
from .._gradient import check_labels, label_shape, resolve_loss, validate_grads
from .._labels import recover_labels
from .._model import Model
from .._result import Reconstruction
from ..engine import is_traced, timed

__all__ = [
    "Problem",
    "Spec",
    "attack_options",
    "check_loop",
    "describe_options",
    "labels_for",
    "number",
    "prepare",
    "require_key",
    "run_attack",
]

# ------------------------------------------------------------------------------------------------------ options


def describe_options(*classes: type) -> str:
    """``"client (Client: loss, batch_size, ...), options (IGOptions: max_steps, ...)"``: the option objects of an
    entry and their fields, for error messages."""
    parts = []
    for cls in classes:
        fields = ", ".join(f.name for f in dataclasses.fields(cls) if f.init)
        parts.append(f"{cls.__name__} ({fields})")
    return "; ".join(parts)


def attack_options(where: str, client: Client | None, options: Any, cls: type, legacy: dict[str, Any]):
    """The one place where an optimisation attack's flat keywords map onto its option objects.

    ``loss``, ``batch_size``, ``local_steps``, ``local_lr`` go to the :class:`jaxinv.Client`, the attack's own
    (``max_steps``, ``tol``, ...) to its options class ``cls``. ``legacy`` is consumed.

    Returns:
        ``(client, options)``.

    Raises:
        TypeError: a keyword that is no field of either (Python's message for an unexpected keyword, listing the
            options), an object of the wrong class, or a keyword also set on the given object.

    Example:
        >>> from jaxinv.attacks import IGOptions
        >>> attack_options("ig", None, None, IGOptions, {"max_steps": 5, "loss": "cross_entropy"})[1].max_steps
        5
    """
    client = merge_options(client, Client, legacy, where)
    options = merge_options(options, cls, legacy, where)
    no_more_keywords(legacy, where, "label, input_shape, client, options, key, and the fields of "
                     + describe_options(Client, cls))
    return client, options


def number(value: Any, name: str, where: str, *, positive: bool = False) -> float:
    """``value`` as a finite ``float >= 0`` (``> 0`` when ``positive``); a ``ValueError`` naming it otherwise."""
    kind = "a finite number > 0" if positive else "a finite number >= 0"
    try:
        if isinstance(value, (bool, np.bool_, str, bytes)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be {kind}, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{where}: {name} must be {kind}, got {value!r}")
    return v


def check_loop(options: Any, where: str) -> None:
    """Validate (and normalise in place, on a frozen dataclass) the fields of :func:`minimise`'s loop that every
    options class carries: ``max_steps``, ``tol``, ``window``, ``log_every``, ``callback``."""
    fixed = {name: positive_int(getattr(options, name), name, where) for name in ("max_steps", "window", "log_every")}
    fixed["tol"] = number(options.tol, "tol", where)
    if options.callback is not None and not callable(options.callback):
        raise TypeError(f"{where}: callback must be a function (step, loss) -> None, got {options.callback!r}")
    for name, value in fixed.items():
        object.__setattr__(options, name, value)


# ------------------------------------------------------------------------------------------------------ problem


class Problem(eqx.Module):
    """A validated attack problem (what every optimisation attack starts from).

    Attributes:
        gleaves: the shared gradient's leaves (with a leading target axis when ``stacked``).
        labels: given labels, ``(B,)`` per target (``(T, B)`` when stacked), or ``None``.
        input_shape: one input's shape.
        num_outputs: width of the model's output (1: logistic loss).
        batch_size: images per shared gradient.
        stacked: number of independent targets ``T`` stacked along a leading axis, or ``None``.
        key: the PRNG key (typed).
        traced: whether the call runs under an outer transformation (then ``seconds`` is NaN).
    """

    gleaves: list
    labels: Array | None
    key: Array
    input_shape: tuple[int, ...] = eqx.field(static=True)
    num_outputs: int = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    stacked: int | None = eqx.field(static=True)
    traced: bool = eqx.field(static=True)


def require_key(key: Any, attack: str):
    """Random-init attacks need an explicit PRNG key: an eager ``ValueError`` naming the fix when it is missing,
    :func:`jaxinv._checks.check_key`'s ``TypeError`` when it is not a key; the key (typed) otherwise."""
    if key is None:
        raise ValueError(
            f"attack {attack!r} starts from a random candidate and needs a PRNG key: pass key=jax.random.key(0) "
            "(the same key gives the same reconstruction)"
        )
    return check_key(key, attack, required=True)


def prepare(model: Model, grads: PyTree, *, label: Any, input_shape: tuple[int, ...] | None, key: Any,
            client: Client, attack: str) -> Problem:
    """Validate the common arguments of an optimisation attack (eager errors naming the argument and the fix)."""
    if not isinstance(model, Model):
        raise TypeError(
            f"model must be a jaxinv.Model (jaxinv.from_linen / from_nnx / from_fn), got {type(model).__name__}"
        )
    key = require_key(key, attack)
    shape = model.resolve_input_shape(input_shape)
    gleaves, T = validate_grads(model, grads)
    out = model.output_shape(shape)
    lshape = label_shape(out)
    if lshape:
        return _prepare_masks(model, gleaves, T, label, shape, out, lshape, key, client, attack)
    k = int(np.prod(out))
    resolve_loss(client.loss, k)  # raises on a loss that does not fit the model
    n_lab = 2 if k == 1 else k
    batch_size = client.batch_size
    if label is not None:
        label = check_labels(jnp.asarray(label), n_lab)
        if T is None:
            label = label.reshape(-1)
            if batch_size is None:
                batch_size = label.shape[0]
            if label.shape[0] != batch_size:
                raise ValueError(
                    f"{attack}: label has {label.shape[0]} entries but batch_size={batch_size}: pass one label per "
                    "image of the client's batch (shape (batch_size,)), or label=None to recover them"
                )
        else:
            if label.shape not in ((T,), (T, 1)):
                raise ValueError(
                    f"{attack}: grads stacks {T} targets (one image each), so label must have shape ({T},), got "
                    f"{tuple(label.shape)}"
                )
            label = label.reshape(T, 1)
    batch_size = 1 if batch_size is None else batch_size
    if T is not None and batch_size != 1:
        raise ValueError(
            f"{attack}: grads stacks {T} independent targets (a leading axis on every leaf); stacked targets are "
            f"single-image gradients, but batch_size={batch_size}. Pass one batch gradient (no extra axis) with "
            "batch_size=B, or T single-image gradients with batch_size=1"
        )
    return Problem(gleaves=gleaves, labels=label, key=key, input_shape=shape, num_outputs=k, batch_size=batch_size,
                   stacked=T, traced=is_traced(grads, label, model.params, key))


def _prepare_masks(model, gleaves, T, label, shape, out, lshape, key, client, attack) -> Problem:
    """:func:`prepare` for a segmentation model: labels are masks ``(B, H, W)`` (``(T, 1, H, W)`` stacked)."""
    K = int(out[-1])
    if client.loss not in ("auto", "cross_entropy"):
        raise ValueError(f"{attack}: a segmentation model is trained with the per-pixel cross-entropy; "
                         f"loss={client.loss!r}")
    if label is None:
        raise ValueError(f"{attack}: model {model.name!r} is a segmentation model (logits {tuple(out)} per image): "
                         f"pass label= the client's mask(s), shape {lshape} or (B, {', '.join(map(str, lshape))})")
    label = check_labels(jnp.asarray(label), K)
    if T is None:
        if label.shape == lshape:
            label = label[None]
        if tuple(label.shape[1:]) != lshape:
            raise ValueError(f"{attack}: label (the masks) must have shape (B, {', '.join(map(str, lshape))}), got "
                             f"{tuple(label.shape)}")
        batch_size = label.shape[0] if client.batch_size is None else client.batch_size
        if label.shape[0] != batch_size:
            raise ValueError(f"{attack}: {label.shape[0]} masks but batch_size={batch_size}")
    else:
        if tuple(label.shape) not in ((T,) + lshape, (T, 1) + lshape):
            raise ValueError(f"{attack}: grads stacks {T} targets, so label must have shape {(T,) + lshape}, got "
                             f"{tuple(label.shape)}")
        label = label.reshape((T, 1) + lshape)
        batch_size = 1
    return Problem(gleaves=gleaves, labels=label, key=key, input_shape=shape, num_outputs=K, batch_size=batch_size,
                   stacked=T, traced=is_traced(gleaves, label, model.params, key))


def labels_for(model: Model, grads: PyTree, problem: Problem) -> Array:
    """Given labels, or the recovered ones (:func:`jaxinv.recover_labels`): ``(B,)`` per target, ``(T, 1)`` for
    stacked targets."""
    if problem.labels is not None:
        return problem.labels
    if problem.stacked is not None:
        return jax.vmap(lambda g: recover_labels(model, g, 1, input_shape=problem.input_shape))(grads)
    return recover_labels(model, grads, problem.batch_size, input_shape=problem.input_shape)


# ---------------------------------------------------------------------------------------------------------- run


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static part of one target's run (hashable: the compiled run is keyed by it).

    Attributes:
        input_shape: one input's shape.
        num_outputs: width of the model's output ``K``.
        batch_size: images behind one shared gradient ``B``.
        client: the client's setting.
        options: the attack's options object.
    """

    input_shape: tuple[int, ...]
    num_outputs: int
    batch_size: int
    client: Client
    options: Any


OneTarget = Callable[[Model, list, Any, Any, Spec], tuple[Array, Array, Array, Array]]


@eqx.filter_jit
def _solve(one: OneTarget, model: Model, gleaves, labels, key, spec: Spec, stacked: bool):
    """``one`` on the target, or on each of ``T`` stacked targets (``vmap``, a key each)."""
    if stacked:
        keys = jax.random.split(key, gleaves[0].shape[0])
        x, lab, trace, dist = jax.vmap(lambda g, y, k: one(model, g, y, k, spec),
                                       in_axes=(0, None if labels is None else 0, 0))(gleaves, labels, keys)
        return x.reshape((-1,) + spec.input_shape), lab.reshape(-1), trace, dist
    x, lab, trace, dist = one(model, gleaves, labels, key, spec)
    return x, lab, trace[None], dist[None]


def run_attack(name: str, one: OneTarget, model: Model, grads: PyTree, *, label: Any, input_shape: Any, key: Any,
               client: Client, options: Any, recover: bool) -> Reconstruction:
    """Validate, recover the labels (``recover``; otherwise only given labels are used) and run ``one`` in one
    compiled call; the :class:`jaxinv.Reconstruction` named ``name``."""
    p = prepare(model, grads, label=label, input_shape=input_shape, key=key, client=client, attack=name)
    spec = Spec(p.input_shape, p.num_outputs, p.batch_size, client, options)

    def run():
        labels = labels_for(model, grads, p) if recover else p.labels
        return _solve(one, model, p.gleaves, labels, p.key, spec, p.stacked is not None)

    (x, lab, trace, dist), seconds = timed(p.traced, run)
    return Reconstruction(image=x, label=lab, layers=(), attack=name, loss_trace=trace, gradient_distance=dist,
                          seconds=jnp.asarray(seconds, jnp.float32))
