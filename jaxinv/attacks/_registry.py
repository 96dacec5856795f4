"""One interface for every attack: ``attack(name, model, grads, *, label, input_shape, key, **options)``.

An attack is a function ``fn(model, grads, *, label, input_shape, key, **options) -> Reconstruction``. Its options
are its other keyword-only parameters; their annotations and defaults (read with :mod:`inspect`) are the
specification the registry checks user options against, so an attack documents its options exactly once.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import numbers
import types
import typing
from typing import Any, Callable

import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from ..engine._copa import copa
from .._model import Model
from .._result import Reconstruction
from ._dlg import dlg, idlg
from ._hybrid import hybrid
from ._ig import ig
from ._rgap import rgap

_REGISTRY: dict[str, Callable[..., Reconstruction]] = {
    "copa": copa,
    "rgap": rgap,
    "dlg": dlg,
    "idlg": idlg,
    "ig": ig,
    "hybrid": hybrid,
}
ATTACKS: tuple[str, ...] = tuple(_REGISTRY)
"""Names of the registered attacks, for :func:`attack`."""

_COMMON = ("model", "grads", "label", "input_shape", "key")


@functools.cache
def _options(fn: Callable) -> dict[str, tuple[Any, str, Any]]:
    """``{option: (type hint, hint as written, default)}`` of an attack (its keyword-only non-common params)."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # pragma: no cover - unresolvable annotations: accept any value
        hints = {}
    out = {}
    for name, p in sig.parameters.items():
        if name in _COMMON or p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        written = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        out[name] = (hints.get(name, Any), written, p.default)
    return out


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits a (simple) type hint; unknown typing constructs accept anything."""
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is collections.abc.Callable or origin is collections.abc.Callable:
        return callable(value)
    if isinstance(hint, type):
        try:
            return isinstance(value, hint)
        except TypeError:  # pragma: no cover
            return True
    return True


def _describe(name: str, fn: Callable) -> str:
    opts = _options(fn)
    if not opts:
        return f"attack {name!r} takes no options"
    return f"attack {name!r} accepts: " + ", ".join(f"{k}: {w} = {d!r}" for k, (_, w, d) in opts.items())


def check_options(name: str, options: dict[str, Any]) -> None:
    """Eager ``TypeError`` for an unknown option or an option of the wrong type, naming the accepted ones."""
    fn = _REGISTRY[name]
    spec = _options(fn)
    for opt, value in options.items():
        if opt not in spec:
            if opt in _COMMON:
                raise TypeError(f"{opt!r} is an argument of jaxinv.attack itself; pass it once")
            raise TypeError(f"unknown option {opt!r} for attack {name!r}; {_describe(name, fn)}")
        hint, written, _ = spec[opt]
        if not _matches(value, hint):
            raise TypeError(
                f"option {opt!r} of attack {name!r} must be {written}, got {type(value).__name__} {value!r}; "
                f"{_describe(name, fn)}"
            )


def attack(
    name: str,
    model: Model,
    grads: PyTree,
    *,
    label: int | Int[Array, "..."] | None = None,
    input_shape: tuple[int, ...] | None = None,
    key: PRNGKeyArray | None = None,
    **options: Any,
) -> Reconstruction:
    """Run a registered gradient-inversion attack.

    Args:
        name: one of :data:`ATTACKS`: ``copa`` (layer-wise, Chen & Campbell), ``rgap`` (layer-wise, Zhu & Blaschko),
            ``dlg`` (Zhu et al.), ``idlg`` (Zhao et al.), ``ig`` (Geiping et al.).
        model: the model the client trained (:func:`jaxinv.from_linen` / ``from_nnx`` / ``from_fn``).
        grads: the shared gradient, a pytree shaped like ``model.params`` (or ``T`` of them stacked on a leading
            axis: independent single-image targets).
        label: the labels if known (int, or ``(B,)`` for a batch); ``None`` recovers or optimises them.
        input_shape: one input's shape without the batch axis (default: the model's).
        key: PRNG key, required by the attacks that start from a random candidate (``dlg``, ``idlg``, ``ig``).
        **options: the attack's own options (``max_steps``, ``batch_size``, ``tv_weight``, ...); see each attack's
            docstring, or the message of the ``TypeError`` an unknown option raises.

    Returns:
        A :class:`jaxinv.Reconstruction` (``attack`` set to ``name``).

    Raises:
        ValueError: unknown ``name`` (the message lists :data:`ATTACKS`); a gradient that does not match the model;
            a missing key for a random-init attack.
        TypeError: an unknown option, or an option of the wrong type (the message lists the accepted options).

    Example:
        >>> grads = jaxinv.client_gradient(model, x, y)
        >>> rec = jaxinv.attack("ig", model, grads, key=jax.random.key(0), max_steps=1000)
        >>> jaxinv.metrics.psnr(rec.image, x)
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; the registered attacks are: {', '.join(ATTACKS)}")
    check_options(name, options)
    return _REGISTRY[name](model, grads, label=label, input_shape=input_shape, key=key, **options)
