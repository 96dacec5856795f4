"""Batch gradients (B > 1 images behind one gradient): the head's separation, the joint layers, the metric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import zoo_model

import jaxinv
from jaxinv import data, metrics
from jaxinv.engine import LayerSystem, batch_system


def test_batch_system_against_dense_matrices():
    """The joint operator: block-diagonal forward rows, summed gradient rows (dense oracle on a tiny conv)."""
    model = zoo_model("cnn2_c1", (6, 6, 3))
    st = model.structure().stages[0]
    leaves = jax.tree_util.tree_leaves(model.params)
    B = 3
    deltas = jax.random.normal(jax.random.key(1), (B,) + tuple(st.nodes.z.shape))
    sys = batch_system(st, leaves, deltas)
    n = int(np.prod(st.nodes.x_in.shape))
    singles = [LayerSystem.build(st, leaves, deltas[i]) for i in range(B)]

    def dense(f, k):
        return np.stack([np.asarray(f(e.reshape(st.nodes.x_in.shape))).ravel() for e in np.eye(k, dtype=np.float32)], 1)

    A = dense(singles[0].forward, n)
    Bs = [dense(s.gradient, n) for s in singles]
    X = jax.random.normal(jax.random.key(2), (B,) + tuple(st.nodes.x_in.shape))
    xs = np.asarray(X).reshape(B, -1)
    np.testing.assert_allclose(np.asarray(sys.forward(X)).reshape(B, -1), xs @ A.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(sys.gradient(X)).ravel(), sum(Bs[i] @ xs[i] for i in range(B)),
                               rtol=1e-4, atol=1e-4)
    # transpose of the joint forward map: A^T y per image
    y = jax.random.normal(jax.random.key(3), (B,) + tuple(st.nodes.z.shape))
    np.testing.assert_allclose(np.asarray(sys.forward_transpose(y)).reshape(B, -1),
                               np.asarray(y).reshape(B, -1) @ A, rtol=1e-4, atol=1e-4)


def test_copa_separates_a_batch_at_a_wide_head():
    model = zoo_model("cnn2_c1")
    B = 4
    x = data.sample_images(B, key=jax.random.key(3))
    y = jnp.array([1, 5, 5, 8])  # a repeated label too
    g = jaxinv.client_gradient(model, x, y)
    rec = jaxinv.copa(model, g, label=y)
    assert rec.image.shape == x.shape and rec.ok
    perm, scores = metrics.match(jnp.clip(rec.image, 0, 1), x)
    assert np.min(np.asarray(scores)) > 60, scores
    assert float(rec.gradient_distance[0]) < 1e-3
    # labels unknown: their multiset is recovered from the head, the images as before
    rec2 = jaxinv.copa(model, g, batch_size=B)
    assert sorted(np.asarray(rec2.label).tolist()) == [1, 5, 5, 8]
    _, s2 = metrics.match(jnp.clip(rec2.image, 0, 1), x)
    assert np.min(np.asarray(s2)) > 60, s2


@pytest.mark.slow
def test_batch_errors_and_the_metric():
    model = zoo_model("cnn2_c1")
    x = data.sample_images(2, key=jax.random.key(3))
    g = jaxinv.client_gradient(model, x, jnp.array([1, 2]))
    with pytest.raises(ValueError, match="label has 2 entries but batch_size is 3"):
        jaxinv.copa(model, g, label=jnp.array([1, 2]), batch_size=3)
    with pytest.raises(jaxinv.HeadNotInvertibleError, match=r"10 output\(s\) for a batch of 12"):
        jaxinv.copa(model, g, batch_size=12)
    with pytest.raises(ValueError, match="pullback"):
        jaxinv.copa(model, g, label=jnp.array([1, 2]), pullback=True)
    rep = jaxinv.security(model, key=jax.random.key(0), batch_size=4, probes=1)
    assert rep.defence == "batch(B=4)" and rep.score > 60 and rep.score <= rep.score_undefended
    deep = zoo_model("cnn6_head10")
    r4 = jaxinv.security(deep, key=jax.random.key(0), batch_size=4, probes=1).score
    assert r4 < 25, r4  # CNN6's convolutions need their gradient rows, which a batch shares (B = 1: > 90 dB)
