"""Segmentation models: mask labels, the per-pixel loss, the head of a dense-prediction network, and the zoo's
FCN / U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import init_model, psnr, zoo_model

import jaxinv
from jaxinv import data, zoo
from jaxinv.engine import LayerSystem


@pytest.fixture(scope="module")
def fcn():
    return zoo_model("fcn_seg", (32, 32, 3))


def test_fcn_head_is_inverted_from_the_mask_and_the_image_recovered(fcn):
    x = jnp.stack([data.load_photo(n, size=32) for n in ("coffee", "chelsea")])
    masks = data.segmentation_masks(x, classes=4, num_classes=21)
    assert masks.shape == (2, 32, 32) and all(len(np.unique(m)) == 4 for m in np.asarray(masks))
    for i in range(2):
        g = jaxinv.client_gradient(fcn, x[i:i + 1], masks[i:i + 1])
        rec = jaxinv.copa(fcn, g, label=masks[i])
        assert rec.image.shape == (1, 32, 32, 3) and rec.label.shape == (1, 32, 32)
        assert psnr(rec.image, x[i:i + 1]) > 30.0, [float(r.gradient_residual) for r in rec.layers]
        head = rec.layers[-1]
        assert int(head.status) == 0 and float(head.gradient_residual) < 1e-4
        assert float(rec.gradient_distance[0]) < 1e-3


def test_per_pixel_loss_matches_optax_and_the_gradient_is_its_mean(fcn):
    x = data.load_photo("astronaut", size=32)[None]
    m = data.segmentation_masks(x, classes=3)
    logits = fcn(x)
    assert logits.shape == (1, 32, 32, 21)
    lf = jaxinv.engine.loss_fn("cross_entropy", 21)
    want = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, m))
    np.testing.assert_allclose(lf(logits, m), want, rtol=1e-6)
    # two images: the batch gradient is the mean of the per-image gradients (mean over batch and pixels)
    x2 = jnp.concatenate([x, x[:, ::-1]])
    m2 = jnp.concatenate([m, m[:, ::-1]])
    g2 = jaxinv.client_gradient(fcn, x2, m2)
    ga, gb = (jaxinv.client_gradient(fcn, x2[i:i + 1], m2[i:i + 1]) for i in range(2))
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (g2, ga, gb))):
        np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-4, atol=1e-7)


def test_mask_errors_name_the_argument_and_the_shape(fcn):
    x = data.load_photo("astronaut", size=32)[None]
    with pytest.raises(ValueError, match=r"y of shape \(B, 32, 32\).*one class per pixel"):
        jaxinv.client_gradient(fcn, x, jnp.array([3]))
    with pytest.raises(ValueError, match="out of range"):
        jaxinv.client_gradient(fcn, x, jnp.full((1, 32, 32), 21))
    g = jaxinv.client_gradient(fcn, x, jnp.zeros((1, 32, 32), jnp.int32))
    with pytest.raises(ValueError, match=r"segmentation model.*pass label= the client's mask of shape \(32, 32\)"):
        jaxinv.copa(fcn, g)
    with pytest.raises(ValueError, match=r"label \(the mask\) must have shape \(32, 32\)"):
        jaxinv.copa(fcn, g, label=jnp.zeros((16, 16), jnp.int32))
    with pytest.raises(ValueError, match="segmentation model"):
        jaxinv.attack("ig", fcn, g, key=jax.random.key(0))


def test_upsampling_head_operator_against_the_dense_matrix():
    """The head's operator includes the bilinear upsampling: mv and transpose equal the dense Jacobian's."""
    model = init_model(zoo.FCNSeg(channels=(4,), num_classes=3), (8, 8, 3), seed=1)
    st = model.structure().stages[-1]
    assert st.layer.out_shape == (8, 8, 3) and st.layer.in_shape == (4, 4, 4)
    leaves = jax.tree_util.tree_leaves(model.params)
    delta = jax.random.normal(jax.random.key(2), st.nodes.z.shape)
    sys = LayerSystem.build(st, leaves, delta)
    n = int(np.prod(st.nodes.x_in.shape))
    A = jax.jacfwd(lambda v: st.affine(v.reshape(st.nodes.x_in.shape), leaves).reshape(-1))(jnp.zeros(n))
    v = jax.random.normal(jax.random.key(3), st.nodes.x_in.shape)
    np.testing.assert_allclose(sys.forward(v).reshape(-1), A @ v.reshape(-1), rtol=1e-5, atol=1e-6)
    y = jax.random.normal(jax.random.key(4), st.nodes.z.shape)
    np.testing.assert_allclose(sys.forward_transpose(y).reshape(-1), A.T @ y.reshape(-1), rtol=1e-5, atol=1e-6)


def test_unet_skip_connection_is_one_block_and_ig_attacks_it():
    model = zoo_model("unet_seg", (16, 16, 3))
    # encoder conv, then the skip: [u; up(conv(down(u)))] joined by a concatenation, then decoder and head
    assert [l.kind for l in model.layers()] == ["conv", "block", "conv", "conv"]
    assert model.layers()[1].out_shape == (16, 16, 48)
    x = data.load_photo("coffee", size=16)[None]
    m = data.segmentation_masks(x, classes=4)
    g = jaxinv.client_gradient(model, x, m)
    rec = jaxinv.attack("ig", model, g, label=m, key=jax.random.key(0), max_steps=150, restarts=1)
    assert rec.image.shape == (1, 16, 16, 3) and rec.label.shape == (1, 16, 16)
    # IG's random start (restarts=1: the first of one split key), uniform in the box [0, 1]
    start = jax.random.uniform(jax.random.split(jax.random.key(0), 1)[0], (1, 16, 16, 3), jnp.float32, 0.0, 1.0)
    assert psnr(rec.image, x) > psnr(start, x) + 3.0


def test_security_of_a_segmentation_model():
    model = init_model(zoo.FCNSeg(channels=(8, 16), num_classes=5), (16, 16, 3))
    rep = jaxinv.security(model, key=jax.random.key(0), probes=2)
    assert rep.label == -1 and rep.layers[-1].role == "head" and len(rep.layers) == 3
    assert np.isfinite(rep.score)
    # the head sees 4x4 = 16 positions of 16 channels with 5 classes: the delta-known gradient rows have rank <= 5 * 16
    assert rep.layers[-1].rank <= 5 * 16 < rep.layers[-1].unknowns
