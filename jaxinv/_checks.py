"""Small validators shared by every floor: positive integers, PRNG keys, finite parameters, and the one place where
an entry point's keyword arguments are folded into its option objects.

Each raises an eager ``ValueError``/``TypeError`` that names the argument, where it was passed and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def positive_int(value: Any, name: str, where: str = "", *, minimum: int = 1, what: str = "") -> int:
    """``value`` as an ``int >= minimum``; a ``ValueError`` naming ``name`` (and ``where``) otherwise.

    Example:
        >>> positive_int(3, "steps")
        3
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum
    if not ok:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        prefix = f"{where}: " if where else ""
        detail = f" ({what})" if what else ""
        raise ValueError(f"{prefix}{name} must be {kind}{detail}, got {value!r}")
    return int(value)


def check_key(key: Any, who: str = "", *, required: bool = False):
    """``key`` as a typed JAX PRNG key (``jax.random.key(s)``; a raw ``jax.random.PRNGKey(s)`` is wrapped), or
    ``None`` when it is ``None`` and not ``required``; a ``TypeError`` naming ``who`` otherwise."""
    prefix = f"{who}: " if who else ""
    if key is None and not required:
        return None
    ok = isinstance(key, jax.Array) and (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == np.uint32 and key.shape == (2,)))
    if not ok:
        raise TypeError(f"{prefix}key must be a JAX PRNG key such as jax.random.key(0); got {key!r}")
    return key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def merge_options(obj: T | None, cls: type[T], keywords: dict[str, Any], where: str) -> T:
    """The option object ``obj`` (default ``cls()``) with the entries of ``keywords`` that are fields of ``cls``
    moved onto it (they are removed from ``keywords``). This is how the flat keywords of the earlier API map onto
    the option objects: ``copa(model, grads, max_steps=50)`` is ``copa(model, grads, solver=Solver(max_steps=50))``.

    Raises:
        TypeError: ``obj`` is not a ``cls``, or a keyword is also set on a given ``obj`` with another value.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass(frozen=True)
        ... class Opt:
        ...     steps: int = 1
        >>> kw = {"steps": 5, "other": 1}
        >>> merge_options(None, Opt, kw, "f"), kw
        (Opt(steps=5), {'other': 1})
    """
    if obj is not None and not isinstance(obj, cls):
        raise TypeError(f"{where}: expected a {cls.__name__} (or None), got {type(obj).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    moved = {k: keywords.pop(k) for k in list(keywords) if k in names}
    if not moved:
        return obj if obj is not None else cls()
    if obj is None:
        return cls(**moved)
    clash = [k for k, v in moved.items() if getattr(obj, k) != v and getattr(obj, k) != getattr(cls(), k)]
    if clash:
        raise TypeError(f"{where}: {', '.join(clash)} given both as keyword and on the {cls.__name__}: pass one")
    return dataclasses.replace(obj, **moved)


def no_more_keywords(keywords: dict[str, Any], where: str, allowed: str) -> None:
    """Raise the ``TypeError`` Python would for the keywords left after :func:`merge_options`."""
    if keywords:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(sorted(keywords))}; "
                        f"its options are {allowed}")
