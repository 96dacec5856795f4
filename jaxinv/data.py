"""Real images, offline: the photos bundled with scikit-image, image folders, and tfds.

Every function here returns float32 images in ``[0, 1]``, shape ``(..., H, W, 3)``
(NHWC, RGB; :func:`load_tfds` can keep a dataset's grey channel), the range the :mod:`jaxinv.zoo` models take and :mod:`jaxinv.metrics`
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
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
import skimage.io
import skimage.transform
import skimage.util
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._checks import check_key, positive_int

__all__ = [
    "Task", "fit_images", "load_folder", "load_photo", "load_tfds", "photo_names", "photo_task", "sample_images",
    "segmentation_masks",
]

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


def _as_float_image(image: np.ndarray, where: str) -> np.ndarray:
    """Any 2-D / 3-D image array as float32 ``(H, W, C)`` with ``C`` in 1..4, values scaled by dtype."""
    image = skimage.util.img_as_float32(np.asarray(image))
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"{where}: expected a greyscale or RGB(A) image, shape (H, W[, C]); got {image.shape}."
        )
    return image


def _to_rgb(image: np.ndarray, where: str) -> np.ndarray:
    """Any 2-D / 3-D image array as float32 RGB in [0, 1] (alpha dropped, grey repeated)."""
    image = _as_float_image(image, where)
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
    size = positive_int(size, "size")
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
    n = positive_int(n, "n")
    size = positive_int(size, "size")
    check_key(key, required=True)
    names = photo_names()
    order_key, crop_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(order_key, np.arange(len(names), dtype=np.int32)))
    images = [_thumbnail(names[i], size) for i in order[:n]]
    for i in range(n - len(images)):
        # A fixed-shape draw per crop: one compiled kernel whatever n is.
        u = np.asarray(jax.random.uniform(jax.random.fold_in(crop_key, i), (4,), jnp.float32))
        images.append(_crop(names[min(int(u[0] * len(names)), len(names) - 1)], size, u[1:]))
    return jnp.asarray(np.stack(images))


def _crop(name: str, size: int, u: np.ndarray) -> np.ndarray:
    """The random square crop of photo ``name`` drawn by ``u`` (3 uniforms: side, top, left), resized to ``size``."""
    photo = _working(name, size)
    h, w = photo.shape[:2]
    side = max(1, round((_CROP_MIN + (_CROP_MAX - _CROP_MIN) * u[0]) * min(h, w)))
    top = min(int(u[1] * (h - side + 1)), h - side)
    left = min(int(u[2] * (w - side + 1)), w - side)
    return _resize(photo[top : top + side, left : left + side], size)


class Task(NamedTuple):
    """A labelled image-classification task (what :func:`jaxinv.zoo.train` trains on).

    Attributes:
        images: float32 ``(n, size, size, 3)`` in ``[0, 1]``.
        labels: int32 ``(n,)``, the index of each image's class in ``classes``.
        classes: the class names (for :func:`photo_task`: the photos the crops come from).
    """

    images: Float[Array, "n h w c"]
    labels: Int[Array, " n"]
    classes: tuple[str, ...]


def photo_task(n: int, *, size: int = 32, photos: tuple[str, ...] | None = None, key: PRNGKeyArray) -> Task:
    r"""A real labelled task, offline: ``n`` random crops of the bundled photos, each labelled by its photo.

    Each crop is a random square of side :math:`s\cdot\min(H, W)`, :math:`s \sim \mathcal{U}(0.3, 0.8)`, at a
    random position (as :func:`sample_images`), resized to ``size``; the labels are balanced (``n // k`` or one
    more per photo) and shuffled. Two tasks drawn with different keys are a training and a held-out set of the same
    classes; the photos not in ``photos`` are images the model never saw (what an audit should attack).

    Args:
        n: number of labelled images.
        size: height and width of each image.
        photos: the classes, names from :func:`photo_names` (at least 2, no repeats); default the first four.
        key: JAX PRNG key (the only source of randomness).

    Returns:
        A :class:`Task` ``(images, labels, classes)``.

    Raises:
        ValueError: bad ``n``/``size``, fewer than 2 photos, a repeated or unknown photo.
        TypeError: ``key`` is not a PRNG key.

    Example:
        >>> task = photo_task(64, size=16, key=jax.random.key(0))
        >>> task.images.shape, task.classes, [int((task.labels == k).sum()) for k in range(4)]
        ((64, 16, 16, 3), ('astronaut', 'chelsea', 'coffee', 'rocket'), [16, 16, 16, 16])
    """
    n = positive_int(n, "n", "photo_task")
    size = positive_int(size, "size", "photo_task")
    check_key(key, "photo_task", required=True)
    if isinstance(photos, str):
        raise TypeError(f"photo_task: photos must be a sequence of photo names, e.g. ('astronaut', 'chelsea'), got "
                        f"the string {photos!r}")
    classes = photo_names()[:4] if photos is None else tuple(photos)
    unknown = [p for p in classes if p not in _PHOTOS]
    if unknown:
        raise ValueError(f"photo_task: photos has unknown name(s) {unknown}; choose from {', '.join(_PHOTOS)}")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"photo_task: photos must name at least 2 distinct photos of photo_names(), got {classes!r}")
    label_key, crop_key = jax.random.split(key)
    labels = np.asarray(jax.random.permutation(label_key, np.arange(n, dtype=np.int32) % len(classes)), np.int32)
    draws = np.asarray(jax.random.uniform(crop_key, (n, 3), jnp.float32))  # the same draws with x64 on
    images = np.stack([_crop(classes[k], size, u) for k, u in zip(labels, draws)])
    return Task(jnp.asarray(images), jnp.asarray(labels), classes)


def fit_images(images: Float[Array, "n h w c"], input_shape: tuple[int, ...]) -> Float[Array, "n *input_shape"]:
    """Square ``[0, 1]`` images ``(n, s, s, 1 or 3)`` resized (bilinear) and converted to a model's input
    ``(H, W, C)`` with ``C`` 1 (channel mean) or 3 (grey repeated): one image set for models of different inputs.

    Raises:
        ValueError: ``input_shape`` is not an image shape ``(H, W, 1 or 3)``, or ``images`` is not ``(n, h, w, c)``.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise ValueError(f"input_shape must be an image shape (H, W, C) with C = 1 or 3, got {input_shape}")
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape (n, h, w, 1 or 3), got {tuple(x.shape)}")
    H, W, C = shape
    if x.shape[1:3] != (H, W):
        x = jnp.clip(jax.image.resize(x, (x.shape[0], H, W, x.shape[-1]), "linear"), 0.0, 1.0)
    if C == 1 and x.shape[-1] == 3:
        x = x.mean(-1, keepdims=True)
    elif C == 3 and x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return x


def segmentation_masks(images: Float[Array, "n h w c"], *, classes: int = 4, sigma: float = 1.0,
                       num_classes: int | None = None) -> Int[Array, "n h w"]:
    """Segmentation masks derived from the images themselves, for segmentation benchmarks on bundled photos.

    Each image's luminance (Rec. 601 weights; the channel itself for grey images) is smoothed by a Gaussian of
    ``sigma`` pixels (``skimage.filters.gaussian``) and cut at its own quantiles into ``classes`` levels, so every
    image has every class, in contiguous regions that follow the photo's shapes (a figure against its
    background, bright sky against dark ground). Deterministic.

    Args:
        images: ``(n, h, w, c)`` images in ``[0, 1]``.
        classes: number of classes present per image (levels), at least 2.
        sigma: smoothing in pixels before the cut (0: none).
        num_classes: the model's class count; must be ``>= classes`` (masks use classes ``0 .. classes - 1``).

    Returns:
        ``(n, h, w)`` int32 masks with values in ``[0, classes)``.
    """
    from skimage.filters import gaussian

    classes = positive_int(classes, "classes", minimum=2)
    if num_classes is not None and classes > int(num_classes):
        raise ValueError(f"classes={classes} exceeds the model's num_classes={num_classes}: masks would hold labels "
                         f"out of range; pass classes <= {num_classes}")
    imgs = np.asarray(images, np.float64)
    if imgs.ndim != 4:
        raise ValueError(f"images must have shape (n, h, w, c), got {imgs.shape}; add a batch axis with images[None]")
    weights = np.array([0.299, 0.587, 0.114]) if imgs.shape[-1] == 3 else np.full(imgs.shape[-1], 1 / imgs.shape[-1])
    out = np.empty(imgs.shape[:3], np.int32)
    for i, img in enumerate(imgs):
        lum = img @ weights
        if sigma > 0:
            lum = gaussian(lum, sigma=float(sigma))
        cuts = np.quantile(lum, np.arange(1, classes) / classes)
        out[i] = np.searchsorted(cuts, lum.reshape(-1), side="right").reshape(lum.shape)
    return jnp.asarray(np.clip(out, 0, classes - 1))


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
    size = positive_int(size, "size")
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
        n = positive_int(n, "n")
        if n > len(files):
            raise ValueError(
                f"load_folder: n={n} but {str(folder)!r} holds only {len(files)} images; "
                f"pass n <= {len(files)} or n=None."
            )
        files = files[:n]
    images = [_square_resize(_to_rgb(skimage.io.imread(f), str(f)), size) for f in files]
    return jnp.asarray(np.stack(images))


def _native_channels(image: np.ndarray, where: str) -> np.ndarray:
    """Any 2-D / 3-D image array as float32 in [0, 1], keeping grey (1 channel) or RGB (alpha dropped)."""
    image = _as_float_image(image, where)
    keep = 1 if image.shape[-1] in (1, 2) else 3
    return np.clip(image[..., :keep], 0.0, 1.0)


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def load_tfds(
    name: str,
    split: str = "train",
    n: int = 16,
    *,
    size: int = 32,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    rgb: bool = True,
) -> tuple[Float[Array, "n size size C"], Int[Array, " n"]]:
    """The first ``n`` examples of a TensorFlow Datasets image dataset, with their labels.

    Needs the optional dependency ``pip install 'jaxinv[tfds]'``. The examples are
    the first ``n`` of the split in its stored order (no shuffling), so the result is
    a deterministic function of the arguments and of the prepared files.

    Two readers, chosen by how the dataset is stored:

    * datasets prepared as ``array_record`` (or ``parquet``) files are read with
      :func:`tfds.data_source`, which needs no TensorFlow;
    * datasets prepared as ``tfrecord`` files (tfds' default, e.g. a plain
      ``tfds.load('cifar10')``) are read with :func:`tfds.load`, which needs
      TensorFlow (``pip install tensorflow-cpu``). Without TensorFlow, a dataset
      that is not prepared yet is prepared as ``array_record`` (when its builder
      can run without TensorFlow).

    Offline use: prepare the dataset once (``tfds build cifar10`` or a first call
    with network access), then pass the same ``data_dir`` with
    ``download=False``; nothing is fetched and a missing dataset is an error.

    Args:
        name: tfds name with ``(image, label)`` supervised keys, e.g.
            ``'cifar10'``, ``'cifar100'``, ``'mnist'`` (``'cifar10:3.0.2'`` pins a version).
        split: split name (``'train'``, ``'test'``), or a tfds split expression such
            as ``'test[100:200]'`` from which the first ``n`` are taken.
        n: number of examples.
        size: output height and width (centre-cropped to a square, then resized
            with anti-aliasing).
        data_dir: where tfds keeps prepared datasets (tfds' default, usually
            ``~/tensorflow_datasets``, when ``None``).
        download: let tfds download and prepare the dataset if it is not in
            ``data_dir``; ``False`` never touches the network.
        rgb: repeat grey images to 3 channels (the zoo's CIFAR models take RGB);
            ``False`` keeps the dataset's channels (1 for MNIST).

    Returns:
        ``(images, labels)``: float32 ``(n, size, size, C)`` in ``[0, 1]`` (``C`` is 3,
        or the dataset's channels when ``rgb=False``) and int32 ``(n,)``.

    Raises:
        ImportError: ``tensorflow_datasets`` is not installed, or the dataset is
            stored as ``tfrecord`` files and TensorFlow is not installed.
        FileNotFoundError: ``download=False`` and the dataset is not prepared in ``data_dir``.
        ValueError: the dataset has no ``(image, label)`` supervised keys, the split
            holds fewer than ``n`` examples, or bad ``n``/``size``.

    Example:
        >>> x, y = data.load_tfds("cifar10", "test", 8)  # doctest: +SKIP
        >>> x.shape, y.shape  # doctest: +SKIP
        ((8, 32, 32, 3), (8,))
    """
    n = positive_int(n, "n")
    size = positive_int(size, "size")
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "load_tfds needs tensorflow_datasets, an optional dependency of jaxinv: "
            "pip install 'jaxinv[tfds]'"
        ) from err
    data_dir = None if data_dir is None else os.fspath(data_dir)
    # A plain split name is sliced so that tfds reads only the first n examples.
    tfds_split = f"{split}[:{n}]" if re.fullmatch(r"\w+", split) else split
    builder = tfds.builder(name, data_dir=data_dir)
    where = f"tfds {name!r}" + ("" if data_dir is None else f" in {data_dir!r}")
    if not download and not builder.is_prepared():
        raise FileNotFoundError(
            f"load_tfds: {where} is not prepared (looked in {str(builder.data_dir)!r}) and "
            "download=False; prepare it once with network access (`tfds build "
            f"{name}` or load_tfds(..., download=True)) or pass the data_dir that holds it."
        )
    image_key, label_key = _supervised_keys(builder.info, where)
    known = _split_size(builder, split) if tfds_split != split else None
    if known is not None and known < n:
        raise ValueError(
            f"load_tfds: split {split!r} of {where} holds only {known} examples; pass n <= {known}."
        )
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    random_access = str(file_format) in ("array_record", "parquet")
    if not random_access and not _tensorflow_installed() and builder.is_prepared():
        raise ImportError(
            f"load_tfds: {where} is stored as {file_format} files, which only TensorFlow "
            "reads; pip install tensorflow-cpu, or prepare the dataset with "
            "file_format='array_record' (read without TensorFlow)."
        )
    if random_access or not _tensorflow_installed():
        source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=download)
        records = (source[i] for i in range(min(n, len(source))))
        examples = ((record[image_key], record[label_key]) for record in records)
    else:
        dataset = tfds.load(
            name,
            split=tfds_split,
            data_dir=data_dir,
            download=download,
            as_supervised=True,
            shuffle_files=False,
            read_config=tfds.ReadConfig(interleave_cycle_length=1),
        )
        examples = tfds.as_numpy(dataset)
    convert = _to_rgb if rgb else _native_channels
    images, labels = [], []
    for image, label in examples:
        images.append(_square_resize(convert(image, where), size))
        labels.append(int(label))
        if len(images) == n:
            break
    if len(images) < n:
        raise ValueError(
            f"load_tfds: split {tfds_split!r} of {where} holds only {len(images)} examples; "
            f"pass n <= {len(images)}."
        )
    return jnp.asarray(np.stack(images)), jnp.asarray(labels, dtype=jnp.int32)


def _split_size(builder: Any, split: str) -> int | None:
    """Examples in a named split of a prepared dataset; ``None`` when tfds does not know yet."""
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _supervised_keys(info: Any, where: str) -> tuple[str, str]:
    keys = info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        raise ValueError(
            f"load_tfds: {where} has no (image, label) supervised keys (it has {keys!r}); "
            "use an image classification dataset such as 'cifar10' or 'mnist'."
        )
    return keys
