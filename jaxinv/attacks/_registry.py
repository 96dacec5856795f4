"""One interface for every attack: ``attack(name, model, grads, *, label, input_shape, key, **options)``.

An attack is a function ``fn(model, grads, *, label, input_shape, key, ..., **legacy) -> Reconstruction``. Its
options, read from its signature with :mod:`inspect` (so an attack documents its options exactly once), are

* its **option objects**: keyword-only parameters annotated ``Cls | None`` with default ``None``, where ``Cls`` is a
  dataclass (an ``eqx.Module`` is one): e.g. ``client: Client | None``, ``options: IGOptions | None``,
  ``solver: Solver | None``. Each is an option itself, and so is each of its fields, as a flat keyword (the
  attack moves it onto the object: :func:`jaxinv._checks.merge_options`); a field name shared by two objects
  belongs to the first in the signature;
* its other keyword-only parameters (``refine``, ``batching``, ...), under their own names and under the earlier
  names of :data:`RENAMED`.

The annotations and defaults (of the parameters and of the dataclass fields) are the specification
:func:`check_options` checks user options against.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import numbers
import types
import typing
from typing import Any, Callable, NamedTuple

import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from .._model import Model
from .._result import Reconstruction
from ..engine import RENAMED, copa
from ._dlg import dlg, idlg
from ._hybrid import hybrid
from ._ig import ig
from ._rgap import rgap

__all__ = ["ATTACKS", "RENAMED", "attack", "check_options"]

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


class _Option(NamedTuple):
    hint: Any  # the resolved type hint
    written: str  # the hint as written, for messages
    default: Any


def _written(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # pragma: no cover - unresolvable annotations: accept any value
        return {}


def _option_class(hint: Any, default: Any) -> type | None:
    """``Cls`` when ``hint`` is ``Cls | None`` with ``Cls`` a dataclass and ``default`` is ``None``."""
    if default is not None or typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _fields(cls: type) -> dict[str, _Option]:
    """The init fields of a dataclass as options."""
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = _Option(hints.get(f.name, Any), _written(f.type), default)
    return out


@functools.cache
def _spec(fn: Callable) -> tuple[dict[str, _Option], dict[str, _Option]]:
    """``(flat options, option objects)`` of an attack, each ``{name: (hint, hint as written, default)}``."""
    hints = _hints(fn)
    flat: dict[str, _Option] = {}
    objects: dict[str, _Option] = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in _COMMON or p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        opt = _Option(hints.get(name, Any), _written(p.annotation), p.default)
        cls = _option_class(opt.hint, p.default)
        if cls is None:
            flat[name] = opt
            continue
        objects[name] = opt
        for field, fopt in _fields(cls).items():
            flat.setdefault(field, fopt)
    for old, new in RENAMED.items():
        if new in flat and old not in flat:
            flat[old] = flat[new]
    return flat, objects


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
    flat, objects = _spec(fn)
    if not flat and not objects:
        return f"attack {name!r} takes no options"
    text = f"attack {name!r} accepts: " + ", ".join(f"{k}: {o.written} = {o.default!r}" for k, o in flat.items())
    if objects:
        text += "; or as objects: " + ", ".join(f"{k}: {o.written}" for k, o in objects.items())
    return text


def check_options(name: str, options: dict[str, Any]) -> None:
    """Eager ``TypeError`` for an unknown option or an option of the wrong type, naming the accepted ones.

    The options are the attack's flat keywords and option objects (see the module docstring); their values are
    checked against the annotations only (the option objects check the values themselves when built).

    Raises:
        ValueError: unknown attack ``name``.
        TypeError: an unknown option, or one of the wrong type.

    Example:
        >>> check_options("ig", {"max_steps": 10, "restarts": 2})
        >>> check_options("ig", {"steps": 10})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: unknown option 'steps' for attack 'ig'; attack 'ig' accepts: loss: str = 'auto', ...
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; the registered attacks are: {', '.join(ATTACKS)}")
    fn = _REGISTRY[name]
    flat, objects = _spec(fn)
    for opt, value in options.items():
        spec = flat.get(opt, objects.get(opt))
        if spec is None:
            if opt in _COMMON:
                raise TypeError(f"{opt!r} is an argument of jaxinv.attack itself; pass it once")
            raise TypeError(f"unknown option {opt!r} for attack {name!r}; {_describe(name, fn)}")
        if not _matches(value, spec.hint):
            raise TypeError(
                f"option {opt!r} of attack {name!r} must be {spec.written}, got {type(value).__name__} {value!r}; "
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
        **options: the attack's options: its option objects (``client=jaxinv.Client(...)``,
            ``options=jaxinv.attacks.IGOptions(...)``, ``solver=...``) or their fields as flat keywords
            (``max_steps``, ``batch_size``, ``tv_weight``, ...); see each attack's docstring, or the message of the
            ``TypeError`` an unknown option raises.

    Returns:
        A :class:`jaxinv.Reconstruction` (``attack`` set to ``name``).

    Raises:
        ValueError: unknown ``name`` (the message lists :data:`ATTACKS`); a gradient that does not match the model;
            a missing key for a random-init attack.
        TypeError: an unknown option, or an option of the wrong type (the message lists the accepted options).

    Example:
        >>> grads = jaxinv.client_gradient(model, x, y)
        >>> rec = jaxinv.attack("ig", model, grads, key=jax.random.key(0), max_steps=200)
        >>> same = jaxinv.attack("ig", model, grads, key=jax.random.key(0),
        ...                      options=jaxinv.attacks.IGOptions(max_steps=200))
        >>> rec.image.shape == x.shape, bool((same.image == rec.image).all())
        (True, True)
    """
    check_options(name, options)
    return _REGISTRY[name](model, grads, label=label, input_shape=input_shape, key=key, **options)
