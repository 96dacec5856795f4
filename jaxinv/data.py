"""Real images, offline: the photos bundled with scikit-image, image folders, and tfds.

Every function here returns float32 images in ``[0, 1]``, shape ``(..., H, W, 3)``
(NHWC, RGB), the range the :mod:`jaxinv.zoo` models take and :mod:`jaxinv.metrics`
scores with ``data_range=1``. Non-square images are centre-cropped to a square,
then resized with anti-aliasing (:func:`skimage.transform.resize`).

The bundled photos (:func:`photo_names`) are the RGB photographs that ship inside
the scikit-image wheel and load with no network and no ``pooch``. Decoded photos
are cached for the life of the process.

Example:
    >>> import jax
    >>> from jaxinv import data
    >>> x = data.sample_images(8, key=jax.random.key(0))
    >>> x.shape, x.dtype
    ((8, 32, 32, 3), dtype('float32'))
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
import skimage.io
import skimage.transform
import skimage.util
from jaxtyping import Array, Float, Int, PRNGKeyArray

__all__ = ["load_folder", "load_photo", "load_tfds", "photo_names", "sample_images"]

# name -> how to get it from skimage.data (all files inside the scikit-image wheel).
_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": lambda: skimage.data.astronaut(),
    "chelsea": lambda: skimage.data.chelsea(),
    "coffee": lambda: skimage.data.coffee(),
    "rocket": lambda: skimage.data.rocket(),
    "hubble_deep_field": lambda: skimage.data.hubble_deep_field(),
    "immunohistochemistry": lambda: skimage.data.immunohistochemistry(),
    "retina": lambda: skimage.data.retina(),
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Random crops of sample_images: side = U(_CROP_MIN, _CROP_MAX) * the photo's short side.
_CROP_MIN, _CROP_MAX = 0.3, 0.8


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _check_int(value: Any, what: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _check_key(key: Any) -> None:
    ok = isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    )
    if not ok:
        raise TypeError(f"key must be a JAX PRNG key such as jax.random.key(0); got {key!r}.")


def _to_rgb(image: np.ndarray, where: str) -> np.ndarray:
    """Any 2-D / 3-D image array as float32 RGB in [0, 1] (alpha dropped, grey repeated)."""
    image = skimage.util.img_as_float32(np.asarray(image))
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"{where}: expected a greyscale or RGB(A) image, shape (H, W[, C]); got {image.shape}."
        )
    channels = image.shape[-1]
    if channels in (1, 2):  # grey, grey + alpha
        image = np.repeat(image[..., :1], 3, axis=-1)
    return np.clip(image[..., :3], 0.0, 1.0)


def _square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, resize to ``(size, size)`` with anti-aliasing."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return _resize(image[top : top + s, left : left + s], size)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] != (size, size):
        image = skimage.transform.resize(image, (size, size), anti_aliasing=True)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _check_name(name: Any) -> str:
    if name not in _PHOTOS:
        raise ValueError(f"Unknown photo {name!r}; choose one of: {', '.join(_PHOTOS)}.")
    return name


@functools.cache
def _photo(name: str) -> np.ndarray:
    """The decoded photo, float32 RGB in [0, 1], full resolution (cached, read-only)."""
    image = _to_rgb(_PHOTOS[name](), f"photo {name!r}")
    image.setflags(write=False)
    return image


@functools.cache
def _reduced(name: str, side: int) -> np.ndarray:
    """The photo block-averaged by the largest integer factor keeping its short side >= side.

    A cheap, alias-free first stage so that crops and thumbnails of big photos
    (retina is 1411 x 1411) resize fast; the final resize is anti-aliased.
    """
    image = _photo(name)
    factor = max(1, min(image.shape[:2]) // side)
    if factor > 1:
        image = skimage.transform.downscale_local_mean(image, (factor, factor, 1))
        image = image.astype(np.float32)
        image.setflags(write=False)
    return image


def _working(name: str, size: int) -> np.ndarray:
    return _reduced(name, 8 * size)


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def photo_names() -> tuple[str, ...]:
    """Names of the bundled RGB photos (all load offline from the scikit-image wheel)."""
    return tuple(_PHOTOS)


@functools.lru_cache(maxsize=64)
def _thumbnail(name: str, size: int) -> np.ndarray:
    image = _square_resize(_working(name, size), size)
    image.setflags(write=False)
    return image


def load_photo(name: str, *, size: int = 32) -> Float[Array, "size size 3"]:
    """One bundled photo, whole: centre-cropped to a square and resized.

    Args:
        name: one of :func:`photo_names` (e.g. ``'astronaut'``, ``'chelsea'``).
        size: output height and width in pixels.

    Returns:
        float32 array ``(size, size, 3)`` with values in ``[0, 1]``.

    Raises:
        ValueError: unknown name (the message lists the names) or bad size.
    """
    _check_name(name)
    size = _check_int(size, "size")
    return jnp.asarray(_thumbnail(name, size))


def sample_images(n: int, *, size: int = 32, key: PRNGKeyArray) -> Float[Array, "n size size 3"]:
    """A batch of real photos, deterministic under ``key``.

    The first ``min(n, len(photo_names()))`` images are the distinct whole-photo
    thumbnails (as :func:`load_photo`) in a key-dependent order; the rest are
    random square crops of random photos, with side
    :math:`s \\cdot \\min(H, W)`, :math:`s \\sim \\mathcal{U}(0.3, 0.8)`, at a
    uniformly random position, resized to ``size``. So any ``n >= 8`` gives at
    least 8 distinct real images.

    Args:
        n: number of images.
        size: height and width of each image.
        key: JAX PRNG key (the only source of randomness).

    Returns:
        float32 array ``(n, size, size, 3)`` with values in ``[0, 1]``.

    Raises:
        ValueError: ``n`` or ``size`` not a positive integer.
        TypeError: ``key`` is not a PRNG key.
    """
    n = _check_int(n, "n")
    size = _check_int(size, "size")
    _check_key(key)
    names = photo_names()
    order_key, crop_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(order_key, len(names)))
    images = [_thumbnail(names[i], size) for i in order[:n]]
    for i in range(n - len(images)):
        # A fixed-shape draw per crop: one compiled kernel whatever n is.
        u = np.asarray(jax.random.uniform(jax.random.fold_in(crop_key, i), (4,)))
        photo = _working(names[min(int(u[0] * len(names)), len(names) - 1)], size)
        h, w = photo.shape[:2]
        side = max(1, round((_CROP_MIN + (_CROP_MAX - _CROP_MIN) * u[1]) * min(h, w)))
        top = min(int(u[2] * (h - side + 1)), h - side)
        left = min(int(u[3] * (w - side + 1)), w - side)
        images.append(_resize(photo[top : top + side, left : left + side], size))
    return jnp.asarray(np.stack(images))


def load_folder(
    path: str | os.PathLike[str], *, size: int = 32, n: int | None = None
) -> Float[Array, "n size size 3"]:
    """Images from a folder (``.png``, ``.jpg``, ``.jpeg``), in sorted file-name order.

    Each image is converted to RGB (grey repeated, alpha dropped), scaled to
    ``[0, 1]`` from its integer range, centre-cropped to a square and resized.
    Sub-folders and other files are ignored.

    Args:
        path: the folder.
        size: output height and width.
        n: take the first ``n`` images; ``None`` takes all.

    Returns:
        float32 array ``(n, size, size, 3)`` in ``[0, 1]``.

    Raises:
        FileNotFoundError: the folder does not exist.
        NotADirectoryError: ``path`` is a file.
        ValueError: no images in the folder, fewer than ``n``, or bad ``size``/``n``.
    """
    size = _check_int(size, "size")
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(
            f"load_folder: folder {str(folder)!r} does not exist; pass a directory of "
            ".png/.jpg images."
        )
    if not folder.is_dir():
        raise NotADirectoryError(
            f"load_folder: {str(folder)!r} is a file, not a folder; pass its directory."
        )
    files = sorted(
        f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES
    )
    if not files:
        raise ValueError(
            f"load_folder: no .png/.jpg/.jpeg images in {str(folder)!r}; put images there or "
            "pass another folder."
        )
    if n is not None:
        n = _check_int(n, "n")
        if n > len(files):
            raise ValueError(
                f"load_folder: n={n} but {str(folder)!r} holds only {len(files)} images; "
                f"pass n <= {len(files)} or n=None."
            )
        files = files[:n]
    images = [_square_resize(_to_rgb(skimage.io.imread(f), str(f)), size) for f in files]
    return jnp.asarray(np.stack(images))


def load_tfds(
    name: str, split: str = "train", n: int = 16, *, size: int = 32
) -> tuple[Float[Array, "n size size 3"], Int[Array, " n"]]:
    """The first ``n`` examples of a TensorFlow Datasets image dataset.

    Needs the optional dependency: ``pip install 'jaxinv[tfds]'``. The dataset
    is downloaded by tfds on first use (into its usual data directory).

    Args:
        name: tfds name with ``(image, label)`` supervised keys, e.g.
            ``'cifar10'``, ``'cifar100'``, ``'mnist'``.
        split: split name (``'train'``, ``'test'``), or a slice such as
            ``'test[100:200]'`` from which the first ``n`` are taken.
        n: number of examples.
        size: output height and width (grey images are repeated to RGB).

    Returns:
        ``(images, labels)``: float32 ``(n, size, size, 3)`` in ``[0, 1]`` and
        int32 ``(n,)``.

    Raises:
        ImportError: ``tensorflow_datasets`` is not installed.
        ValueError: the split holds fewer than ``n`` examples, or bad ``n``/``size``.
    """
    n = _check_int(n, "n")
    size = _check_int(size, "size")
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "load_tfds needs tensorflow_datasets, an optional dependency of jaxinv: "
            "pip install 'jaxinv[tfds]'"
        ) from err
    tfds_split = split if "[" in split else f"{split}[:{n}]"
    dataset = tfds.load(name, split=tfds_split, as_supervised=True, shuffle_files=False)
    images, labels = [], []
    for image, label in tfds.as_numpy(dataset):
        images.append(_square_resize(_to_rgb(image, f"tfds {name!r}"), size))
        labels.append(int(label))
        if len(images) == n:
            break
    if len(images) < n:
        raise ValueError(
            f"load_tfds: split {tfds_split!r} of {name!r} holds only {len(images)} examples; "
            f"pass n <= {len(images)}."
        )
    return jnp.asarray(np.stack(images)), jnp.asarray(labels, dtype=jnp.int32)
