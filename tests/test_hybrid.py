"""The hybrid attack: improves on COPA on an underdetermined model, deterministic, compiled loops, reports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import photo, psnr, tiny_cnn

import jaxinv
from jaxinv.attacks import HybridOptions, hybrid, hybrid_down, suffix_gradient, suffix_leaves

STEPS = (300, 100, 50)


@pytest.fixture(scope="module")
def case():
    """16x16, stride-2 conv to 4 channels (768 unknowns, 196 + 64 rows: underdetermined) with a real photo."""
    model = tiny_cnn([(4, 4, 2, 0)], ["tanh", "identity"], classes=5)
    x = photo("astronaut")
    g = jaxinv.client_gradient(model, x, jnp.array([1]))
    return model, x, g


@pytest.fixture(scope="module")
def run(case):
    model, _, g = case
    return hybrid(model, g, label=1, max_steps=STEPS, key=jax.random.PRNGKey(0))


def test_hybrid_improves_over_copa(case, run):
    model, x, g = case
    plain = jaxinv.copa(model, g, label=1)
    p0, p1 = psnr(np.clip(plain.image, 0, 1), x), psnr(run.image, x)
    assert p1 > p0 + 3, (p0, p1)
    img = np.asarray(run.image)
    assert img.min() >= 0 and img.max() <= 1  # projected onto the box


def test_reports_and_trace(run):
    assert run.attack == "hybrid" and run.image.shape == (1, 16, 16, 3) and int(run.label[0]) == 1
    r0, head = run.layers
    assert 0 < int(r0.refine_steps) <= STEPS[0] and head.refine_steps is None
    assert float(r0.lsq_residual) < 1e-3
    assert run.loss_trace.shape == (1, -(-STEPS[0] // 10))
    tr = np.asarray(run.loss_trace[0])
    tr = tr[np.isfinite(tr)]
    assert tr[-1] < tr[0]  # the objective went down
    assert np.isfinite(float(run.gradient_distance[0]))


def test_deterministic_under_key(case, run):
    model, _, g = case
    again = hybrid(model, g, label=1, max_steps=STEPS, key=jax.random.PRNGKey(0))
    other = hybrid(model, g, label=1, max_steps=STEPS, key=jax.random.PRNGKey(7))
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(run.image))
    np.testing.assert_array_equal(np.asarray(other.image), np.asarray(run.image))  # the key is unused


def test_matching_targets_are_the_shared_gradient(case):
    """At the true input the suffix gradient equals the shared gradient (no access to the input is needed)."""
    model, x, g = case
    st = model.structure()
    leaves = jax.tree_util.tree_leaves(model.params)
    gh = suffix_gradient(st, leaves, 0, jnp.asarray(x), jnp.asarray(1), jaxinv.engine.loss_fn("cross_entropy", 5))
    gl = jax.tree_util.tree_leaves(g)
    idx = suffix_leaves(st, 0)
    assert len(idx) == len(gl) == 3  # conv kernel, head kernel, head bias
    for a, i in zip(gh, idx):
        np.testing.assert_allclose(a, gl[i], rtol=1e-4, atol=1e-7)


def test_inner_loop_is_compiled(case):
    """Each layer's matching is one lax.while_loop: the traced program does not grow with max_steps."""
    model, _, g = case
    st = model.structure()
    gl = jax.tree_util.tree_leaves(g)
    xh, gx, lab, _ = jaxinv.engine.head_step(model, st, gl, jnp.asarray(1), jaxinv.engine.Solver(), "cross_entropy")

    def jaxpr(n):
        ho = HybridOptions(max_steps=(n, n, n), lr=0.02, log_every=n)
        solver = jaxinv.engine.Solver()
        return jax.make_jaxpr(lambda a, b: hybrid_down(model, st, 0, gl, a, b, jnp.asarray(False), lab, solver, ho,
                                                       "cross_entropy", None)[0][0])(xh, gx)

    a, b = jaxpr(10), jaxpr(1000)
    assert "while" in str(a) and len(a.jaxpr.eqns) == len(b.jaxpr.eqns)


def test_stacked_targets(case):
    model, x, g = case
    x2 = photo("chelsea")
    g2 = jaxinv.client_gradient(model, x2, jnp.array([3]))
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), g, g2)
    rec = hybrid(model, stacked, label=jnp.array([1, 3]), max_steps=(60, 10, 10))
    one = hybrid(model, g2, label=3, max_steps=(60, 10, 10))
    assert rec.image.shape == (2, 16, 16, 3) and rec.loss_trace.shape[0] == 2
    # the same computation batched (float reassociation in batched convolutions, amplified by the Adam steps)
    np.testing.assert_allclose(rec.image[1], one.image[0], atol=3e-2)
    assert abs(psnr(rec.image[1:], x2) - psnr(one.image, x2)) < 0.2


def test_bad_options(case):
    model, _, g = case
    with pytest.raises(ValueError, match="max_steps"):
        hybrid(model, g, label=1, max_steps=(10, 0, 1))
    with pytest.raises(ValueError, match="tv_weight"):
        hybrid(model, g, label=1, tv_weight=-1.0)
    with pytest.raises(ValueError, match="box"):
        hybrid(model, g, label=1, box=(1.0, 0.0))
