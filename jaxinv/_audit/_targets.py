"""Resolve the MODEL argument of the command line: a zoo name or ``package.module:factory``.

The factory contract (also in ``jaxinv audit --help`` and the README):

* ``package.module:factory`` names an importable callable (the current directory is importable from the CLI);
* it is called with no arguments, or with ``key=jax.random.key(seed)`` if it has a parameter named ``key``;
* it returns one of

  - a :class:`jaxinv.Model` (``from_linen`` / ``from_nnx`` / ``from_fn``; give it an ``input_shape``),
  - ``(module, variables)``: a Flax linen module and its variables (``{"params": ...}``); ``--input-shape`` is then
    required,
  - ``(module, variables, input_shape)``: the same with the shape of one input without the batch axis.

The model takes NHWC images with pixel values in ``[0, 1]`` (normalise inside the model, as the zoo's
``x - 0.5`` does).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping

import jax

from .. import zoo
from .._model import Model, from_linen

FACTORY_CONTRACT = (
    "a factory returns a jaxinv.Model, (linen module, variables) or (linen module, variables, input_shape)")


def _shape(value, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in value)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{what} must be a tuple of positive ints such as (32, 32, 3), got {value!r}")
    return shape


def load_target(target: str, input_shape: tuple[int, ...] | None = None, seed: int = 0) -> tuple[Model, tuple[int, ...]]:
    """A zoo name or ``package.module:factory`` -> ``(Model, input_shape)``.

    Args:
        target: a name of :func:`jaxinv.zoo.names` (built with PyTorch-default init from ``seed``), or
            ``package.module:factory`` following the factory contract of this module's docstring.
        input_shape: one input without the batch axis; overrides the zoo's or the factory's shape.
        seed: PRNG seed of the zoo initialisation and of the factory's ``key``.

    Returns:
        ``(model, input_shape)``.

    Raises:
        ValueError: unknown zoo name, a module that does not import, a missing or non-callable factory, a factory
            that raises or returns something else, or no input shape; every message names ``target``.
    """
    if not isinstance(target, str) or not target:
        raise ValueError(f"MODEL must be a zoo name or package.module:factory, got {target!r}")
    if ":" not in target:
        if target not in zoo.names():
            raise ValueError(f"unknown model {target!r}: give a zoo name ({', '.join(zoo.names())}) or "
                             "package.module:factory")
        shape = _shape(input_shape, "input_shape") if input_shape else zoo.input_shape(target)
        try:
            module, variables = zoo.build(target, key=jax.random.key(seed), input_shape=shape)
        except ValueError as e:
            raise ValueError(f"model {target!r} cannot be built for input shape {shape}: {e}") from None
        return from_linen(module, variables, input_shape=shape, name=target), shape

    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"MODEL {target!r} must be package.module:factory (both parts non-empty)")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or any error raised while importing the user's module
        raise ValueError(f"cannot import {mod_name!r} (from MODEL {target!r}): {type(e).__name__}: {e}") from None
    factory = getattr(module, fn_name, None)
    if factory is None:
        raise ValueError(f"module {mod_name!r} has no attribute {fn_name!r} (from MODEL {target!r})")
    if not callable(factory):
        raise ValueError(f"{target} is a {type(factory).__name__}, not a callable factory; {FACTORY_CONTRACT}")
    kwargs = {}
    try:
        if "key" in inspect.signature(factory).parameters:
            kwargs["key"] = jax.random.key(seed)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        pass
    try:
        built = factory(**kwargs)
    except Exception as e:
        raise ValueError(f"factory {target} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         ) from None
    if isinstance(built, Model):
        shape = _shape(input_shape, "--input-shape") if input_shape else built.default_input_shape
        if shape is None:
            raise ValueError(f"{target} returned a jaxinv.Model without an input shape: build it with "
                             "input_shape=(H, W, C) or pass --input-shape")
        return built, tuple(shape)
    if not (isinstance(built, tuple) and len(built) in (2, 3)):
        raise ValueError(f"{target} returned {type(built).__name__}; {FACTORY_CONTRACT}")
    if input_shape:
        shape = _shape(input_shape, "--input-shape")
    elif len(built) == 3:
        shape = _shape(built[2], f"the input_shape {target} returned")
    else:
        raise ValueError(f"--input-shape is needed for {target}, which returned (module, variables) without a "
                         "shape (e.g. --input-shape 32,32,3)")
    module, variables = built[0], built[1]
    if not hasattr(module, "apply") or not isinstance(variables, Mapping):
        raise ValueError(f"{target} returned ({type(module).__name__}, {type(variables).__name__}); "
                         f"{FACTORY_CONTRACT}")
    try:
        return from_linen(module, variables, input_shape=shape, name=target), shape
    except ValueError:  # UnsupportedModelError and shape errors already say what to do
        raise
    except Exception as e:
        raise ValueError(f"{target}: reading the model for input shape {shape} failed with {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
