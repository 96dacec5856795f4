"""FedAvg updates: the client's K local steps, the first-order gradient, and IG simulating the steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinv
from jaxinv import attacks as obj

from helpers import photo, psnr, zoo_model


@pytest.fixture(scope="module")
def setup():
    model = zoo_model("cnn2_c1")
    x = jnp.asarray(photo("chelsea", 32))
    return model, x, jnp.array([3])


def _leaves(t):
    return [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(t)]


def test_one_local_step_is_the_gradient(setup):
    model, x, y = setup
    g = jaxinv.client_gradient(model, x, y)
    upd = jaxinv.local_update(model, x, y, steps=1, lr=0.05)
    for a, b in zip(_leaves(jaxinv.update_as_gradient(upd, steps=1, lr=0.05)), _leaves(g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
    # K steps by hand
    p = model.params
    for _ in range(3):
        gp = jaxinv.client_gradient(model, x, y, params=p)
        p = jax.tree_util.tree_map(lambda a, b: a - 0.05 * b, p, gp)
    upd3 = jaxinv.local_update(model, x, y, steps=3, lr=0.05)
    for a, b, c in zip(_leaves(upd3), _leaves(p), _leaves(model.params)):
        np.testing.assert_allclose(a, b - c, rtol=1e-4, atol=1e-7)


def test_copa_on_the_first_order_gradient_degrades_with_k_lr(setup):
    model, x, y = setup
    out = []
    raw = jaxinv.engine.Solver(fallback=False)  # the answer itself, not the flat image a gross misfit falls back to
    for steps, lr in ((1, 0.1), (2, 1e-4), (5, 1e-3), (10, 1e-2)):  # K * lr: 0.1 (one step: exact), 2e-4, 5e-3, 0.1
        upd = jaxinv.local_update(model, x, y, steps=steps, lr=lr)
        rec = jaxinv.copa(model, jaxinv.update_as_gradient(upd, steps=steps, lr=lr), label=3, solver=raw)
        out.append(psnr(np.clip(np.asarray(rec.image), 0, 1), x))
    assert out[0] > 80 and out[1] > 40 and out[3] < 15, out
    assert out[0] > out[1] > out[2] > out[3], out
    # by default the last answer, whose gradient misses the shared one grossly, gives way to the flat image
    rec = jaxinv.copa(model, jaxinv.update_as_gradient(upd, steps=10, lr=1e-2), label=3)
    assert int(rec.layers[0].status) == int(jaxinv.RESULTS.fallback), rec.layers[0].message()
    assert float(np.ptp(np.asarray(rec.image)[..., 0])) == 0.0
    assert psnr(np.clip(np.asarray(rec.image), 0, 1), x) > out[3] + 3, out


def test_simulated_update_objective_is_zero_at_the_truth(setup):
    """The objective of ig(local_steps=K) vanishes at the true image; the single-step one does not."""
    model, x, y = setup
    K, lr = 10, 0.1
    shared = jax.tree_util.tree_leaves(jaxinv.update_as_gradient(jaxinv.local_update(model, x, y, steps=K, lr=lr),
                                                                 steps=K, lr=lr))
    t = obj.hard_targets(y, 10, jnp.float32)
    sim = obj.candidate_update_gradient(model.apply_fn, model.params, x, t, K, lr)
    one = obj.candidate_gradient(model.apply_fn, model.params, x, t)
    assert float(obj.cosine_distance(sim, shared)) < 1e-9
    assert float(obj.cosine_distance(one, shared)) > 1e3 * max(float(obj.cosine_distance(sim, shared)), 1e-12)
    rec = jaxinv.attack("ig", model, jaxinv.update_as_gradient(
        jaxinv.local_update(model, x, y, steps=K, lr=lr), steps=K, lr=lr), label=3, key=jax.random.key(0),
        max_steps=20, local_steps=K, local_lr=lr)
    assert rec.image.shape == x.shape and np.isfinite(float(rec.gradient_distance[0]))


def test_bad_arguments(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="steps"):
        jaxinv.local_update(model, x, y, steps=0, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        jaxinv.update_as_gradient(model.params, steps=2, lr=-1.0)
    with pytest.raises(ValueError, match="local_lr"):
        jaxinv.attack("ig", model, jaxinv.client_gradient(model, x, y), label=3, key=jax.random.key(0),
                      max_steps=5, local_steps=3)


def test_copa_corrects_the_first_order_reading_by_simulating_the_steps(setup):
    model, x, y = setup
    for steps, lr, floor in ((2, 0.01, 80), (5, 0.01, 60)):
        g = jaxinv.update_as_gradient(jaxinv.local_update(model, x, y, steps=steps, lr=lr), steps=steps, lr=lr)
        plain = psnr(np.clip(np.asarray(jaxinv.copa(model, g, label=3).image), 0, 1), x)
        rec = jaxinv.copa(model, g, label=3, local_steps=steps, local_lr=lr)
        fixed = psnr(np.clip(np.asarray(rec.image), 0, 1), x)
        assert plain < 30 and fixed > floor, (steps, plain, fixed)
        trace = np.asarray(rec.loss_trace)[0]
        assert trace[-1] < 1e-3 * trace[0]  # the simulated update of the answer matches the shared one
        assert float(rec.gradient_distance[0]) == pytest.approx(trace[-1])
    with pytest.raises(ValueError, match="lr"):
        jaxinv.copa(model, g, label=3, local_steps=2)


@pytest.mark.slow
def test_security_accounts_for_local_steps(setup):
    model, x, y = setup
    steps, lr = 2, 1e-2
    rep = jaxinv.security(model, key=jax.random.key(0), local_steps=steps, local_lr=lr, probes=2)
    assert rep.defence == f"fedavg(K={steps}, lr={lr:g})" and "under defence" in rep.verdict
    upd = jaxinv.local_update(model, x, y, steps=steps, lr=lr)
    rec = jaxinv.copa(model, jaxinv.update_as_gradient(upd, steps=steps, lr=lr), label=3, local_steps=steps,
                      local_lr=lr)
    measured = psnr(np.clip(np.asarray(rec.image), 0, 1), x)
    assert rep.score > 60 and measured > 60, (rep.score, measured)  # two small steps: still recovered
    with pytest.raises(ValueError, match="local_lr"):
        jaxinv.security(model, key=jax.random.key(0), local_steps=3)


@pytest.mark.slow
def test_weights_rounding_is_accounted_for_with_one_step():
    """Shared float32 weights: theta_0 - lr g keeps ~eps|theta| of the update, which CNN6's inversion amplifies."""
    model = zoo_model("cnn6_head10", seed=10)
    weights = jaxinv.security(model, key=jax.random.key(1), probes=2, local_steps=1, local_lr=0.01)
    assert weights.defence == "fedavg(K=1, lr=0.01)"
    # the gradient itself gives CNN6's input away (> 90 dB, benchmarks/out/copa.md); its weights after one step do not
    assert weights.score_undefended > 60 and weights.score < 30, (weights.score_undefended, weights.score)
    x = jnp.asarray(photo("coffee", 32))
    g = jaxinv.update_as_gradient(jaxinv.local_update(model, x, jnp.array([2]), steps=1, lr=0.01), steps=1, lr=0.01)
    assert psnr(np.clip(np.asarray(jaxinv.copa(model, g, label=2).image), 0, 1), x) < 30
