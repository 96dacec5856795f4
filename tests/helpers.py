"""Shared test helpers: the tiny models, the real photos and the PSNR the test files use.

Tests import them with ``from helpers import ...``: pytest puts ``tests/`` (the folder of the rootdir's
``conftest.py``, no ``__init__.py``) on ``sys.path``, with or without ``-n``. Every factory is deterministic: the same
arguments give the same architecture and the same weights (``jax.random.key(seed)``, which draws the same numbers
as ``jax.random.PRNGKey(seed)``), so the numbers the tests assert do not depend on which file builds the model.

Factories, from the most common:

* :func:`tiny_cnn`: a :func:`jaxinv.zoo.make_cnn` network (convs, flatten, dense head), initialised and read;
* :func:`zoo_model`: a named :mod:`jaxinv.zoo` model (``zoo.build`` + ``from_linen``);
* :func:`init_model`: any linen module, initialised on a zero batch and read;
* :func:`plain_cnn`: the same kind of network written in plain JAX (``apply_fn(params, x)``, :func:`jaxinv.from_fn`);
* :func:`photo` (a real photo thumbnail), :func:`psnr` (float64 PSNR on ``[0, 1]``), :func:`stack_trees`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from skimage import data, transform

import jaxinv
from jaxinv import zoo

from jaxinv import AUDIT_DEFAULTS, LayerMaps, leaking_layer
from jaxinv.cli import Progress, load_target, step_options

__all__ = [
    "AUDIT_DEFAULTS",
    "DN",
    "LayerMaps",
    "Progress",
    "init_model",
    "leaking_layer",
    "load_target",
    "photo",
    "plain_cnn",
    "psnr",
    "stack_trees",
    "step_options",
    "tiny_cnn",
    "zoo_model",
]

DN = ("NHWC", "HWIO", "NHWC")  # the convolutions' dimension numbers (images NHWC, kernels HWIO)


# ---------------------------------------------------------------------------------------------------- models
def init_model(module, input_shape: tuple[int, ...], *, seed: int = 0, **from_linen_kwargs: Any) -> jaxinv.Model:
    """A linen module initialised with ``jax.random.key(seed)`` on a zero batch of one, read by ``from_linen``.

    Args:
        module: an unbound ``flax.linen.Module``.
        input_shape: one image's shape, e.g. ``(16, 16, 3)``.
        seed: the initialisation key's seed.
        **from_linen_kwargs: ``name``, ``strict``, ... for :func:`jaxinv.from_linen`.
    """
    variables = module.init(jax.random.key(seed), jnp.zeros((1, *input_shape)))
    return jaxinv.from_linen(module, variables, input_shape=tuple(input_shape), **from_linen_kwargs)


def tiny_cnn(
    convs: Sequence[tuple[int, int, int, int]],
    acts: Sequence[str],
    *,
    size: int = 16,
    channels: int = 3,
    classes: int = 5,
    seed: int = 0,
    name: str | None = None,
    **make_cnn_kwargs: Any,
) -> jaxinv.Model:
    """A :func:`jaxinv.zoo.make_cnn` network on ``(size, size, channels)`` images, PyTorch-default init.

    Args:
        convs: one ``(out_channels, kernel, stride, padding)`` per convolution.
        acts: ``len(convs) + 1`` activation names (the last one on the logits), e.g. ``["tanh", "identity"]``.
        size, channels: the input image's side and channels.
        classes: the head's width.
        seed: the initialisation key's seed.
        name: the model's name (default: from_linen's).
        **make_cnn_kwargs: ``conv_bias``, ``head_bias``, ``shift``.

    Example: ``tiny_cnn([(4, 4, 2, 0)], ["tanh", "identity"])``: 16x16x3 -> stride-2 conv to 4 channels (768
    unknowns, 196 forward + 64 gradient rows: underdetermined) -> dense head of 5.
    """
    net = zoo.make_cnn(convs, acts, num_classes=classes, **make_cnn_kwargs)
    return init_model(net, (size, size, channels), seed=seed, name=name)


def zoo_model(name: str, input_shape: tuple[int, int, int] | None = None, *, seed: int = 0,
              **from_linen_kwargs: Any) -> jaxinv.Model:
    """The :mod:`jaxinv.zoo` model ``name`` built with ``jax.random.key(seed)``, read, and named ``name``.

    Args:
        name: one of ``zoo.names()`` or ``zoo.modern_names()``.
        input_shape: the image shape to build for (default: the zoo's, ``zoo.input_shape(name)``).
        seed: the initialisation key's seed.
        **from_linen_kwargs: ``strict``, ... for :func:`jaxinv.from_linen`.
    """
    shape = tuple(input_shape) if input_shape is not None else zoo.input_shape(name)
    module, variables = zoo.build(name, key=jax.random.key(seed), input_shape=input_shape)
    return jaxinv.from_linen(module, variables, input_shape=shape, **{"name": name, **from_linen_kwargs})


def plain_cnn(
    convs: Sequence[tuple[int, int, int, int]],
    acts: Sequence[Callable[[jax.Array], jax.Array]],
    *,
    classes: int = 5,
    head_bias: bool = True,
    dtype: Any = jnp.float32,
    seed: int = 0,
    size: int = 16,
) -> jaxinv.Model:
    """A plain-JAX CNN read by :func:`jaxinv.from_fn`: no biases on the convolutions, a dense head.

    ``apply_fn(p, x) = acts[-1](flatten(acts[L-1](conv(... acts[0](conv(x - 0.5, p["conv0"])) ...))) @ p["head"]
    [+ p["head_b"]])`` on ``(size, size, 3)`` images; weights uniform in ``+-1/sqrt(fan_in)`` (PyTorch's default)
    drawn in ``dtype`` from ``jax.random.split(jax.random.key(seed), 16)``.

    Args:
        convs: one ``(out_channels, kernel, stride, padding)`` per convolution (``params["conv{i}"]``, HWIO).
        acts: ``len(convs) + 1`` callables: one after each convolution, the last one on the logits.
        classes: the head's width (``params["head"]``, ``params["head_b"]``).
        head_bias: give the head a bias.
        dtype: the parameters' dtype.
        seed: the key's seed.
        size: the input image's side.
    """
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    p, c, h = {}, 3, size
    for i, (o, k, s, pad) in enumerate(convs):
        bound = 1 / np.sqrt(c * k * k)
        p[f"conv{i}"] = jax.random.uniform(next(keys), (k, k, c, o), dtype, -bound, bound)
        c, h = o, (h + 2 * pad - k) // s + 1
    n = c * h * h
    p["head"] = jax.random.uniform(next(keys), (n, classes), dtype, -1 / np.sqrt(n), 1 / np.sqrt(n))
    if head_bias:
        p["head_b"] = jax.random.uniform(next(keys), (classes,), dtype, -1 / np.sqrt(n), 1 / np.sqrt(n))

    def apply_fn(p, x):
        x = x - 0.5
        for i, (o, k, s, pad) in enumerate(convs):
            x = acts[i](jax.lax.conv_general_dilated(x, p[f"conv{i}"], (s, s), ((pad, pad), (pad, pad)),
                                                     dimension_numbers=DN))
        x = x.reshape(x.shape[0], -1) @ p["head"]
        if head_bias:
            x = x + p["head_b"]
        return acts[-1](x)

    return jaxinv.from_fn(apply_fn, p, input_shape=(size, size, 3))


# ------------------------------------------------------------------------------------------------ data, scores
def photo(name: str = "astronaut", size: int = 16) -> np.ndarray:
    """A real photo (``skimage.data.<name>``): centre square, resized with anti-aliasing; ``(1, size, size, 3)``
    float32 in ``[0, 1]``."""
    img = getattr(data, name)()
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return transform.resize(img, (size, size), anti_aliasing=True).astype(np.float32)[None]


def psnr(a, b) -> float:
    """PSNR in dB of ``a`` against ``b`` on ``[0, 1]``, over all entries, computed in float64 (no clipping)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-30))


def stack_trees(trees: Sequence[Any]) -> Any:
    """One pytree whose leaves stack the given trees' leaves on a new leading axis (stacked targets)."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)
