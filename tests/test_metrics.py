"""Tests of jaxinv.metrics: MSE, PSNR, SSIM and batch matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinv import metrics


def images(seed, shape=(4, 32, 32, 3)):
    """Smooth random images in [0, 1] (blurred noise), so SSIM is meaningful."""
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    for axis in (-3, -2):
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    x = (x - x.min()) / (x.max() - x.min())
    return jnp.asarray(x, jnp.float32)


def noisy(x, sigma, seed=1):
    n = np.random.default_rng(seed).normal(size=x.shape)
    return jnp.asarray(np.clip(np.asarray(x) + sigma * n, 0.0, 1.0), jnp.float32)


def test_psnr_hand_formula():
    x = images(0)
    y = noisy(x, 0.05)
    mse = np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(metrics.psnr(x, y), 10 * np.log10(1 / mse), rtol=1e-5)
    np.testing.assert_allclose(metrics.mse(x, y), mse, rtol=1e-5)
    assert float(metrics.psnr(jnp.zeros((4, 4, 1)), jnp.full((4, 4, 1), 0.1))) == pytest.approx(
        20.0
    )


def test_psnr_identical():
    x = images(0)
    p = metrics.psnr(x, x)
    assert np.all(np.isinf(p) | (p > 100))
    assert float(metrics.mse(x, x).max()) == 0.0


def test_psnr_data_range():
    x, y = images(0), noisy(images(0), 0.1)
    np.testing.assert_allclose(
        metrics.psnr(255 * x, 255 * y, data_range=255.0), metrics.psnr(x, y), rtol=1e-5
    )
    np.testing.assert_allclose(
        metrics.psnr(x, y, data_range=2.0), metrics.psnr(x, y) + float(20 * np.log10(2)), rtol=1e-5
    )
    # the reference code's PSNR (R = 255 on [0, 1] images) is 48.13 dB higher
    np.testing.assert_allclose(
        metrics.psnr(x, y, data_range=255.0) - metrics.psnr(x, y), 48.1308, atol=1e-3
    )
    with pytest.raises(ValueError, match="data_range must be > 0"):
        metrics.psnr(x, y, data_range=0.0)


def test_integer_images():
    x, y = images(0), noisy(images(0), 0.1)
    xi, yi = (
        (np.asarray(x) * 255).round().astype(np.uint8),
        (np.asarray(y) * 255).round().astype(np.uint8),
    )
    np.testing.assert_allclose(metrics.psnr(xi, yi, data_range=255), metrics.psnr(x, y), atol=0.05)


def test_ssim():
    x = images(0)
    np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-5)
    noise = jnp.asarray(np.random.default_rng(0).random(x.shape), jnp.float32)
    assert float(metrics.ssim(x, noise).max()) < 0.5
    s_small, s_big = metrics.ssim(x, noisy(x, 0.02)), metrics.ssim(x, noisy(x, 0.2))
    assert np.all(s_small > s_big)
    np.testing.assert_allclose(
        metrics.ssim(255 * x, 255 * noisy(x, 0.1), data_range=255.0),
        metrics.ssim(x, noisy(x, 0.1)),
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="at least 11 x 11"):
        metrics.ssim(jnp.zeros((8, 8, 3)), jnp.zeros((8, 8, 3)))


@pytest.mark.parametrize("fn", [metrics.psnr, metrics.ssim, metrics.mse])
def test_shapes_jit_vmap(fn):
    x, y = images(0), noisy(images(0), 0.1)
    batch = fn(x, y)
    assert batch.shape == (4,)
    assert fn(x[0], y[0]).shape == ()
    np.testing.assert_allclose(jax.jit(fn)(x, y), batch, rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(fn)(x, y), batch, rtol=1e-5)
    np.testing.assert_allclose(fn(x[1], y[1]), batch[1], rtol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(jnp.zeros((32, 32, 3)), jnp.zeros((32, 32, 1)))
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        metrics.psnr(jnp.zeros((32, 32)), jnp.zeros((32, 32)))


@pytest.mark.parametrize("metric", ["psnr", "ssim", "mse"])
def test_match_recovers_permutation(metric):
    truth = images(0, (6, 32, 32, 3))
    recon_in_order = noisy(truth, 0.05)
    shuffle = np.array([3, 0, 5, 1, 4, 2])
    recon = recon_in_order[shuffle]
    perm, scores = metrics.match(recon, truth, metric=metric)
    np.testing.assert_array_equal(recon[perm], recon_in_order)
    np.testing.assert_array_equal(shuffle[perm], np.arange(6))
    fn = {"psnr": metrics.psnr, "ssim": metrics.ssim, "mse": metrics.mse}[metric]
    np.testing.assert_allclose(scores, fn(recon_in_order, truth), rtol=1e-5)


def test_match_exact_reconstructions_and_errors():
    truth = images(0, (5, 32, 32, 3))
    shuffle = np.array([4, 2, 0, 1, 3])
    perm, scores = metrics.match(truth[shuffle], truth)  # infinite PSNRs
    np.testing.assert_array_equal(shuffle[perm], np.arange(5))
    assert np.all(np.isinf(scores) | (scores > 100))
    with pytest.raises(ValueError, match="unknown metric 'lpips'"):
        metrics.match(truth, truth, metric="lpips")
    with pytest.raises(ValueError, match="batches"):
        metrics.match(truth[0], truth[0])
