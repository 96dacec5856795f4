"""Image quality of reconstructions: MSE, PSNR, SSIM, and matching a batch to its truths.

Conventions:

* Images are ``(H, W, C)`` or batches ``(B, H, W, C)`` with values in
  ``[0, data_range]``; jaxinv's images (:mod:`jaxinv.data`, inputs of
  :mod:`jaxinv.zoo`) live in ``[0, 1]``, so ``data_range=1`` (the default).
* A metric of a batch is one value per image: shape ``(B,)``, or ``()`` for one image.
* PSNR is the standard one, :math:`10 \\log_{10}(R^2 / \\mathrm{MSE})`. The
  reference code of Chen & Campbell computes :math:`20 \\log_{10}(255) - 10
  \\log_{10}(\\mathrm{MSE})` on images in ``[0, 1]``, which is
  :math:`20 \\log_{10} 255 \\approx 48.13` dB *higher* than the standard PSNR;
  subtract 48.13 dB from its figures to compare.
* :func:`mse`, :func:`psnr` and :func:`ssim` are pure ``jnp`` (through
  ``dm_pix``): they work under ``jax.jit`` and ``jax.vmap``. :func:`match` uses
  SciPy and runs eagerly.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jaxtyping import Array, ArrayLike, Float, Int

__all__ = ["match", "mse", "psnr", "ssim"]


def _pair(a: ArrayLike, b: ArrayLike, fn: str) -> tuple[Array, Array]:
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{fn}: a and b must have the same shape; got {a.shape} and {b.shape}.")
    if a.ndim not in (3, 4):
        raise ValueError(
            f"{fn}: expected images (H, W, C) or batches (B, H, W, C); got shape {a.shape}. "
            "Add a channel axis to greyscale images with x[..., None]."
        )
    dtype = jnp.result_type(a, b)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return a.astype(dtype), b.astype(dtype)


def _check_range(data_range: Any, fn: str) -> None:
    # Only a concrete number can be checked eagerly; a traced one passes through.
    if isinstance(data_range, numbers.Real) and not data_range > 0:
        raise ValueError(
            f"{fn}: data_range must be > 0 (1.0 for images in [0, 1], 255 for [0, 255]); "
            f"got {data_range!r}."
        )


# Compiled kernels (one compilation per shape instead of one per eager op);
# the argument checks stay outside so they raise eagerly.
@jax.jit
def _mse(a: Array, b: Array) -> Array:
    return dm_pix.mse(a, b)


@jax.jit
def _psnr(a: Array, b: Array, data_range: Any) -> Array:
    # dm_pix.psnr assumes R = 1: -10 log10(MSE); add 10 log10(R^2).
    return dm_pix.psnr(a, b) + 20.0 * jnp.log10(jnp.asarray(data_range, a.dtype))


def _gaussian_blur(z: Array, size: int = 11, sigma: float = 1.5) -> Array:
    """Separable 'valid' Gaussian blur over H and W in z's own dtype.

    The same filter as dm_pix.ssim's default, but kept in the images' dtype, so
    that float32 images stay float32 under ``jax_enable_x64`` and strict promotion.
    """
    offsets = np.arange(size) - size // 2
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).astype(z.dtype)
    h, w = z.shape[-3], z.shape[-2]
    z = sum(weights[k] * z[..., k : k + h - size + 1, :, :] for k in range(size))
    z = sum(weights[k] * z[..., k : k + w - size + 1, :] for k in range(size))
    return z


@jax.jit
def _ssim(a: Array, b: Array, data_range: Any) -> Array:
    return dm_pix.ssim(a, b, max_val=data_range, filter_fn=_gaussian_blur)


def mse(a: Float[ArrayLike, "*B H W C"], b: Float[ArrayLike, "*B H W C"]) -> Float[Array, "*B"]:
    """Mean squared error per image.

    .. math:: \\mathrm{MSE}(a, b) = \\frac{1}{HWC} \\sum_{h,w,c} (a_{hwc} - b_{hwc})^2

    Args:
        a: image ``(H, W, C)`` or batch ``(B, H, W, C)``.
        b: same shape as ``a``.

    Returns:
        ``()`` for one image, ``(B,)`` for a batch.
    """
    a, b = _pair(a, b, "mse")
    return _mse(a, b)


def psnr(
    a: Float[ArrayLike, "*B H W C"],
    b: Float[ArrayLike, "*B H W C"],
    *,
    data_range: float = 1.0,
) -> Float[Array, "*B"]:
    """Peak signal-to-noise ratio in dB, per image (the standard definition).

    .. math:: \\mathrm{PSNR}(a, b) = 10 \\log_{10} \\frac{R^2}{\\mathrm{MSE}(a, b)}

    with :math:`R` = ``data_range`` (1 for images in ``[0, 1]``). Identical
    images give ``inf``. The reference COPA code reports values 48.13 dB higher
    (it uses :math:`R = 255` on ``[0, 1]`` images); see the module docstring.

    Args:
        a: image ``(H, W, C)`` or batch ``(B, H, W, C)``, values in ``[0, R]``.
        b: same shape as ``a``.
        data_range: :math:`R`, the peak-to-peak range of valid pixel values.

    Returns:
        ``()`` for one image, ``(B,)`` for a batch.

    Example:
        >>> import jax.numpy as jnp
        >>> float(psnr(jnp.zeros((4, 4, 1)), jnp.full((4, 4, 1), 0.1)))  # doctest: +ELLIPSIS
        20.0...
    """
    _check_range(data_range, "psnr")
    a, b = _pair(a, b, "psnr")
    return _psnr(a, b, data_range)


def ssim(
    a: Float[ArrayLike, "*B H W C"],
    b: Float[ArrayLike, "*B H W C"],
    *,
    data_range: float = 1.0,
) -> Float[Array, "*B"]:
    """Structural similarity (Wang et al. 2004), per image, averaged over channels.

    .. math::

        \\mathrm{SSIM}(a, b) = \\operatorname{mean}
        \\frac{(2\\mu_a\\mu_b + c_1)(2\\sigma_{ab} + c_2)}
        {(\\mu_a^2 + \\mu_b^2 + c_1)(\\sigma_a^2 + \\sigma_b^2 + c_2)},
        \\quad c_1 = (0.01 R)^2,\\ c_2 = (0.03 R)^2

    with local statistics from an 11 x 11 Gaussian window (sigma 1.5), as
    ``dm_pix.ssim`` / ``tf.image.ssim``. 1 for identical images.

    Args:
        a: image ``(H, W, C)`` or batch ``(B, H, W, C)``, values in ``[0, R]``;
            H and W at least 11.
        b: same shape as ``a``.
        data_range: :math:`R` (1 for images in ``[0, 1]``).

    Returns:
        ``()`` for one image, ``(B,)`` for a batch.
    """
    _check_range(data_range, "ssim")
    a, b = _pair(a, b, "ssim")
    if min(a.shape[-3:-1]) < 11:
        raise ValueError(
            f"ssim: images must be at least 11 x 11 (the Gaussian window); got {a.shape[-3:-1]}."
        )
    return _ssim(a, b, data_range)


# metric name -> (kernel of one pair, True if larger is better)
_METRICS = {
    "psnr": (_psnr, True),
    "ssim": (_ssim, True),
    "mse": (lambda a, b, data_range: _mse(a, b), False),
}


@functools.partial(jax.jit, static_argnums=0)
def _table(fn: Any, recon: Array, truth: Array, data_range: Any) -> Array:
    one = lambda r, t: fn(r, t, data_range)  # noqa: E731
    return jax.vmap(lambda r: jax.vmap(lambda t: one(r, t))(truth))(recon)


def match(
    recon: Float[ArrayLike, "B H W C"],
    truth: Float[ArrayLike, "B H W C"],
    *,
    metric: str = "psnr",
    data_range: float = 1.0,
) -> tuple[Int[np.ndarray, " B"], Float[Array, " B"]]:
    """Assign B reconstructions to B true images, best total score (batch attacks).

    A batch attack returns its images in no particular order. ``match`` scores
    every (reconstruction, truth) pair and solves the assignment problem

    .. math:: \\pi^\\star = \\arg\\max_{\\pi} \\sum_j \\mathrm{score}(\\hat x_{\\pi(j)}, x_j)

    with :func:`scipy.optimize.linear_sum_assignment` (minimised for ``'mse'``).
    Infinite PSNRs (exact reconstructions) count as a very large finite score.

    Args:
        recon: reconstructions ``(B, H, W, C)``.
        truth: true images ``(B, H, W, C)``.
        metric: ``'psnr'`` (default), ``'ssim'`` or ``'mse'``.
        data_range: peak-to-peak pixel range (1 for ``[0, 1]`` images).

    Returns:
        ``(perm, scores)``: ``perm`` int array ``(B,)`` such that
        ``recon[perm][j]`` is matched to ``truth[j]``, and ``scores`` ``(B,)``,
        the metric of each matched pair, ``metric(recon[perm], truth)``.

    Raises:
        ValueError: shapes differ or are not batches, or an unknown metric.

    Example:
        >>> recon = images[::-1]  # a batch attack's answer, in another order
        >>> perm, scores = match(recon, images)
        >>> perm.tolist(), bool(np.all(np.isinf(scores)))
        ([3, 2, 1, 0], True)
        >>> aligned = recon[perm]  # aligned[j] is matched to images[j]
    """
    if metric not in _METRICS:
        raise ValueError(f"match: unknown metric {metric!r}; choose one of {', '.join(_METRICS)}.")
    recon, truth = _pair(recon, truth, "match")
    if recon.ndim != 4:
        raise ValueError(
            f"match: expects batches (B, H, W, C); got shape {recon.shape}. Use x[None] for one."
        )
    _check_range(data_range, "match")
    fn, larger_is_better = _METRICS[metric]
    table = _table(fn, recon, truth, data_range)  # table[i, j] = score(recon[i], truth[j])
    cost = np.asarray(table, dtype=np.float64)
    big = 1e6
    cost = np.nan_to_num(cost, nan=-big if larger_is_better else big, posinf=big, neginf=-big)
    rows, cols = scipy.optimize.linear_sum_assignment(cost, maximize=larger_is_better)
    perm = np.empty(len(cols), dtype=np.int64)
    perm[cols] = rows  # truth j <- recon perm[j]
    scores = table[perm, np.arange(len(perm))]  # score(recon[perm[j]], truth[j])
    return perm, scores
