"""jaxinv.defences: each transformation against its definition, jit/vmap, the accountant, and COPA under defence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import photo, psnr, zoo_model

import jaxinv
from jaxinv import defences as D


def _grads(key=0, n=20000):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"a": jax.random.normal(k1, (n,)), "b": {"w": 3.0 * jax.random.normal(k2, (40, 50))}}


def test_gaussian_and_laplacian_noise_statistics():
    g = _grads()
    key = jax.random.key(1)
    for d, std in ((D.gaussian(0.05), 0.05), (D.laplacian(0.05), 0.05 * np.sqrt(2))):
        out = d(g, key)
        diff = np.asarray(out["a"] - g["a"])
        assert abs(diff.std() / std - 1) < 0.03 and abs(diff.mean()) < 3 * std / np.sqrt(diff.size)
        # deterministic under the key, different under another
        np.testing.assert_array_equal(np.asarray(d(g, key)["a"]), np.asarray(out["a"]))
        assert not np.allclose(np.asarray(d(g, jax.random.key(2))["a"]), np.asarray(out["a"]))
    # relative: sigma in units of the gradient's RMS entry
    rms = float(jnp.sqrt((jnp.sum(g["a"] ** 2) + jnp.sum(g["b"]["w"] ** 2)) / (g["a"].size + g["b"]["w"].size)))
    diff = np.asarray(D.gaussian(0.1, relative=True)(g, key)["a"] - g["a"])
    assert abs(diff.std() / (0.1 * rms) - 1) < 0.03
    assert D.gaussian(0.0)(g, key)["a"] is not None
    np.testing.assert_array_equal(np.asarray(D.gaussian(0.0)(g, key)["a"]), np.asarray(g["a"]))
    with pytest.raises(ValueError, match="PRNG key"):
        D.gaussian(0.1)(g)


def test_clip_and_dp_sgd():
    g = _grads()
    norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(g))))
    c = D.clip(norm / 10)(g, None)
    assert float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(c)))) == pytest.approx(norm / 10, 1e-5)
    np.testing.assert_allclose(np.asarray(c["a"]), np.asarray(g["a"]) / 10, rtol=1e-5)
    same = D.clip(norm * 2)(g, None)
    np.testing.assert_array_equal(np.asarray(same["a"]), np.asarray(g["a"]))
    # dp_sgd = clip then N(0, (zC)^2)
    C, z = norm / 10, 0.5
    out = D.dp_sgd(C, z)(g, jax.random.key(3))
    diff = np.asarray(out["a"]) - np.asarray(c["a"])
    assert abs(diff.std() / (z * C) - 1) < 0.03
    np.testing.assert_allclose(np.asarray(D.dp_sgd(C, 0.0)(g, jax.random.key(3))["a"]), np.asarray(c["a"]), rtol=1e-6)


def test_dp_epsilon_against_the_published_mnist_figure():
    pytest.importorskip("dp_accounting")
    # TF Privacy's MNIST tutorial: N = 60000, batch 256, z = 1.1, 60 epochs, delta = 1e-5 -> epsilon about 3
    steps = int(60 * 60000 / 256)
    eps = D.dp_epsilon(1.1, steps=steps, sampling_rate=256 / 60000, delta=1e-5)
    assert 2.5 < eps < 3.1, eps
    assert D.dp_epsilon(2.0, steps=steps, sampling_rate=256 / 60000, delta=1e-5) < eps  # more noise, less epsilon
    assert D.dp_epsilon(1.1, steps=2 * steps, sampling_rate=256 / 60000, delta=1e-5) > eps
    with pytest.raises(ValueError, match="sampling_rate"):
        D.dp_epsilon(1.1, steps=10, sampling_rate=2.0, delta=1e-5)
    with pytest.raises(ValueError, match="steps"):
        D.dp_epsilon(1.1, steps=0, sampling_rate=0.1, delta=1e-5)


def test_prune_keeps_the_largest_entries():
    g = _grads()
    out = D.prune(0.9)(g, None)
    for a, b in ((g["a"], out["a"]), (g["b"]["w"], out["b"]["w"])):
        a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
        kept = b != 0
        assert kept.mean() == pytest.approx(0.1, abs=1e-3)
        np.testing.assert_array_equal(b[kept], a[kept])
        assert np.abs(a[kept]).min() >= np.abs(a[~kept]).max()
    np.testing.assert_array_equal(np.asarray(D.prune(0.0)(g, None)["a"]), np.asarray(g["a"]))
    with pytest.raises(ValueError, match="rate"):
        D.prune(1.0)


def test_quantize_sign_and_cast():
    g = _grads()
    for bits in (2, 4, 8):
        q = np.asarray(D.quantize(bits)(g, None)["a"])
        m = float(jnp.max(jnp.abs(g["a"])))
        step = m / (2 ** (bits - 1) - 1)
        assert len(np.unique(q)) <= 2 ** bits - 1
        assert np.max(np.abs(q - np.asarray(g["a"]))) <= step / 2 + 1e-6
    # stochastic rounding is unbiased
    a = np.asarray(g["a"])
    samples = np.stack([np.asarray(D.quantize(2, stochastic=True)(g, jax.random.key(i))["a"]) for i in range(64)])
    step = float(np.abs(a).max())
    assert abs((samples - a).mean()) < 0.01 * step  # no bias
    one = np.abs(samples[0] - a).mean()
    assert np.abs(samples.mean(0) - a).mean() < one / 4  # errors average out (1/8 expected for 64 draws)
    s = np.asarray(D.sign()(g, None)["b"]["w"])
    assert len(np.unique(np.abs(s))) == 1 and np.all(np.sign(s) == np.sign(np.asarray(g["b"]["w"])))
    c = np.asarray(D.cast("bfloat16")(g, None)["a"])
    rel = np.abs(c - np.asarray(g["a"])) / np.abs(np.asarray(g["a"]))
    assert 0 < rel.max() <= 2.0**-8 and c.dtype == np.float32
    with pytest.raises(ValueError, match="bits"):
        D.quantize(1)
    with pytest.raises(TypeError, match="dtype"):
        D.cast("int8")


def test_chain_jit_vmap():
    g = _grads(n=1000)
    d = D.chain(D.prune(0.5), D.gaussian(1e-3))
    out = jax.jit(d)(g, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(out["a"]), np.asarray(d(g, jax.random.key(0))["a"]), rtol=1e-6, atol=1e-7)
    assert d.name == "prune(rate=0.5) -> gaussian(sigma=0.001, relative=False)"
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x, 3 * x]), g)
    outs = jax.vmap(d)(stacked, jax.random.split(jax.random.key(0), 3))
    assert outs["a"].shape == (3, 1000)
    zeros = (np.asarray(outs["a"]) == 0).mean(1)  # pruning then noise: nothing is exactly zero any more
    assert np.all(zeros == 0)
    with pytest.raises(TypeError, match="argument 1"):
        D.chain(D.prune(0.5), 3)


def test_copa_psnr_falls_with_the_noise_level():
    model = zoo_model("cnn2_c1")
    x = jnp.asarray(photo("chelsea", 32))
    g = jaxinv.client_gradient(model, x, jnp.array([3]))
    out = []
    for sigma in (0.0, 1e-3, 1e-2, 1e-1):
        rec = jaxinv.copa(model, D.gaussian(sigma, relative=True)(g, jax.random.key(0)), label=3)
        out.append(psnr(np.clip(np.asarray(rec.image), 0, 1), x))
    assert out[0] > 80 and all(a > b for a, b in zip(out, out[1:])), out


@pytest.mark.slow
def test_security_under_a_defence_predicts_the_attack():
    """The score under a defence tracks COPA's measured PSNR on real photos (predicted from synthetic probes)."""
    model = zoo_model("cnn2_c1")
    x = jnp.concatenate([jnp.asarray(photo(n, 32)) for n in ("chelsea", "coffee")])
    y = jnp.array([3, 7])
    g = jax.vmap(lambda a, b: jaxinv.client_gradient(model, a[None], b[None]))(x, y)
    clean = jaxinv.security(model, key=jax.random.key(0))
    assert all(np.isnan(r.noise_gain) for r in clean.layers) and clean.defence is None
    preds, meas = [], []
    for sigma in (1e-2, 1.0):
        d = D.gaussian(sigma, relative=True)
        rep = jaxinv.security(model, key=jax.random.key(0), defence=d)
        assert rep.defence == d.name and rep.score_undefended == pytest.approx(clean.score)
        assert rep.score < clean.score and rep.noise_mse > 0
        assert all(np.isfinite(r.noise_gain) and r.noise_gain > 0 for r in rep.layers)
        assert "under defence" in rep.verdict and f"under {d.name}: score" in rep.table()
        rec = jaxinv.copa(model, jax.vmap(d)(g, jax.random.split(jax.random.key(1), 2)), label=y)
        meas.append(np.mean([psnr(np.clip(np.asarray(rec.image[i]), 0, 1), x[i]) for i in range(2)]))
        preds.append(rep.score)
        assert abs(rep.score - meas[-1]) < 5, (rep.score, meas[-1])
    assert meas[0] > meas[1] + 10 and preds[0] > preds[1] + 10
    assert jaxinv.security(model, key=jax.random.key(0), defence=D.gaussian(1.0, relative=True)).verdict.startswith(
        "PARTIAL")
    with pytest.raises(TypeError, match="defence"):
        jaxinv.security(model, key=jax.random.key(0), defence=3)
