"""Modern building blocks: BatchNorm in inference form (a fixed affine map inside its layer), fixed linear
resampling, and the clear errors for the blocks the layer-wise methods cannot read (data-dependent normalisation,
max pooling, residual connections)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinv
from jaxinv import data, zoo
from jaxinv._operators import LayerSystem
from conftest import psnr


class Net(nn.Module):
    norm: str = "batch"
    pool: str = "none"

    @nn.compact
    def __call__(self, x):
        x = x - 0.5
        for c in (6, 9):
            x = nn.Conv(c, (3, 3), padding="VALID", use_bias=False)(x)
            if self.norm == "batch":
                x = nn.BatchNorm(use_running_average=True)(x)
            elif self.norm == "batch_train":
                x = nn.BatchNorm(use_running_average=False)(x)
            elif self.norm == "layer":
                x = nn.LayerNorm()(x)
            elif self.norm == "group":
                x = nn.GroupNorm(num_groups=3)(x)
            x = jnp.tanh(x)
            if self.pool == "max":
                x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _bn_model():
    m = Net("batch")
    v = dict(m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    # trained-looking statistics and affine parameters (init has mean 0, var 1, scale 1, bias 0)
    v["batch_stats"] = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.uniform(jax.random.key(3), a.shape),
                                              v["batch_stats"])
    v["params"] = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(4), a.shape),
                                         v["params"])
    return jaxinv.from_linen(m, v, input_shape=(16, 16, 3))


def test_batchnorm_inference_is_part_of_its_layer_and_the_image_is_recovered():
    model = _bn_model()
    layers = model.layers()
    assert [l.kind for l in layers] == ["conv", "conv", "dense"]
    assert layers[0].bias_path == "BatchNorm_0/bias"  # BatchNorm's beta is the layer's additive bias
    assert set(jax.tree_util.tree_structure(model.params).node_data()[1]) == {"params"}  # batch_stats held fixed
    x = data.load_photo("astronaut", size=16)[None]
    g = jaxinv.client_gradient(model, x, jnp.array([3]))
    rec = jaxinv.copa(model, g)
    assert psnr(rec.image, x) > 60.0
    assert all(float(r.gradient_residual) < 1e-4 for r in rec.layers)


def test_batchnorm_layer_operators_against_the_dense_matrices():
    model = _bn_model()
    st = model.structure().stages[1]
    leaves = jax.tree_util.tree_leaves(model.params)
    shape = st.nodes.x_in.shape
    n = int(np.prod(shape))
    delta = jax.random.normal(jax.random.key(5), st.nodes.z.shape)
    sys = LayerSystem.build(st, leaves, delta)
    A = jax.jacfwd(lambda v: st.affine(v.reshape(shape), leaves).reshape(-1))(jnp.zeros(n))
    k = st.nodes.kernel_leaf

    def grad_rows(v):  # the kernel's gradient at delta, as a function of the layer input
        def f(w):
            lv = list(leaves)
            lv[k] = w
            return st.affine(v.reshape(shape), lv)
        return jax.vjp(f, leaves[k])[1](delta)[0].reshape(-1)

    B = jax.jacfwd(grad_rows)(jnp.zeros(n))
    v = jax.random.normal(jax.random.key(6), shape)
    np.testing.assert_allclose(sys.forward(v).reshape(-1), A @ v.reshape(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sys.gradient(v).reshape(-1), B @ v.reshape(-1), rtol=1e-4, atol=1e-5)
    y = jax.random.normal(jax.random.key(7), st.nodes.z.shape)
    np.testing.assert_allclose(sys.forward_transpose(y).reshape(-1), A.T @ y.reshape(-1), rtol=1e-4, atol=1e-5)
    # the offset is the batch statistics' shift plus beta, the scale gamma / sqrt(var + eps)
    np.testing.assert_allclose(sys.forward_offset.reshape(-1), st.affine(jnp.zeros(shape), leaves).reshape(-1),
                               rtol=1e-6)


@pytest.mark.parametrize("norm,where", [("layer", "LayerNorm_0"), ("group", "GroupNorm_0"),
                                        ("batch_train", "BatchNorm_0")])
def test_data_dependent_normalisation_is_refused_naming_the_module(norm, where):
    m = Net(norm)
    v = m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(jaxinv.UnsupportedModelError, match=rf"(?s)at Net/{where}: normalisation by statistics of "
                                                           r"the data itself.*use_running_average=True"):
        jaxinv.from_linen(m, v, input_shape=(16, 16, 3))


def test_max_pooling_and_residual_blocks_are_refused_clearly():
    m = Net("none", pool="max")
    v = m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(jaxinv.UnsupportedModelError, match="max pooling"):
        jaxinv.from_linen(m, v, input_shape=(16, 16, 3))
    module, variables = zoo.build("resnet8", key=jax.random.key(0), input_shape=(16, 16, 3))
    with pytest.raises(jaxinv.UnsupportedModelError, match="residual connection"):
        jaxinv.from_linen(module, variables, input_shape=(16, 16, 3))
    model = jaxinv.from_linen(module, variables, input_shape=(16, 16, 3), strict=False)
    assert model(jnp.zeros((2, 16, 16, 3))).shape == (2, 10)


def test_resnet_norm_variants_build():
    for norm in ("batch", "group"):
        m = zoo.ResNet(norm=norm)
        v = m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
        model = jaxinv.from_linen(m, v, input_shape=(16, 16, 3), strict=False)
        assert model(jnp.zeros((1, 16, 16, 3))).shape == (1, 10)
