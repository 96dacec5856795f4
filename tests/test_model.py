"""Model adapters: layers are read from the user's own function, the same whichever adapter built the model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import init_model

import jaxinv


class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x - 0.5
        x = nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)(x)
        x = nn.leaky_relu(x, 0.2)
        x = nn.Conv(5, (3, 3), padding="SAME", feature_group_count=1, kernel_dilation=2)(x)
        x = jnp.tanh(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(7)(x)


class NNX(nnx.Module):
    def __init__(self, rngs):
        self.c0 = nnx.Conv(3, 4, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.c1 = nnx.Conv(4, 5, (3, 3), padding="SAME", kernel_dilation=2, rngs=rngs)
        self.d = nnx.Linear(5 * 4 * 4, 7, rngs=rngs)

    def __call__(self, x):
        x = x - 0.5
        x = jax.nn.leaky_relu(self.c0(x), 0.2)
        x = jnp.tanh(self.c1(x))
        return self.d(x.reshape(x.shape[0], -1))


def plain_params(key):
    k = jax.random.split(key, 3)
    return {
        "w0": jax.random.normal(k[0], (3, 3, 3, 4)) * 0.3,
        "w1": jax.random.normal(k[1], (3, 3, 4, 5)) * 0.3,
        "b1": jnp.zeros(5),
        "w2": jax.random.normal(k[2], (80, 7)) * 0.1,
        "b2": jnp.zeros(7),
    }


def plain_apply(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    x = x - 0.5
    x = jax.lax.conv_general_dilated(x, p["w0"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
    x = jnp.where(x >= 0, x, 0.2 * x)
    x = jax.lax.conv_general_dilated(x, p["w1"], (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=dn)
    x = jnp.tanh(x + p["b1"])
    return x.reshape(x.shape[0], -1) @ p["w2"] + p["b2"]


SHAPE = (8, 8, 3)


def all_models():
    lin = init_model(Linen(), SHAPE)
    nx = jaxinv.from_nnx(NNX(nnx.Rngs(0)), input_shape=SHAPE)
    fn = jaxinv.from_fn(plain_apply, plain_params(jax.random.PRNGKey(1)), input_shape=SHAPE)
    return lin, nx, fn


def test_layers_read_from_linen():
    lin, _, _ = all_models()
    layers = lin.layers()
    assert [l.kind for l in layers] == ["conv", "conv", "dense"]
    assert [l.activation for l in layers] == ["leaky_relu(0.2)", "tanh", "identity"]
    assert [l.bias for l in layers] == [False, True, True]
    assert layers[0].strides == (2, 2) and layers[0].padding == ((1, 1), (1, 1))
    assert layers[1].dilation == (2, 2) and layers[1].groups == 1
    assert layers[0].in_shape == SHAPE and layers[0].out_shape == (4, 4, 4)
    assert layers[2].in_shape == (4, 4, 5) and layers[2].out_shape == (7,)
    assert layers[0].path == "Conv_0/kernel" and layers[1].bias_path == "Conv_1/bias"


def test_adapters_agree():
    sigs = [tuple(l.signature() for l in m.layers()) for m in all_models()]
    assert sigs[0] == sigs[1] == sigs[2]


@pytest.mark.parametrize("i", [0, 1, 2])
def test_apply_layers_equals_model(i):
    m = all_models()[i]
    x = jax.random.uniform(jax.random.PRNGKey(2), (3,) + SHAPE)
    np.testing.assert_allclose(m.apply_layers(x), m(x), rtol=1e-5, atol=1e-5)


def test_suffix_application():
    m = all_models()[0]
    x = jax.random.uniform(jax.random.PRNGKey(2), (2,) + SHAPE)
    st = m.structure()
    leaves = jax.tree_util.tree_leaves(m.params)
    h = jax.vmap(lambda xi: st.stages[0](xi[None], leaves)[0])(x)
    np.testing.assert_allclose(m.apply_layers(h, start=1), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "act, expect",
    [
        (jax.nn.sigmoid, "sigmoid"),
        (lambda z: jax.nn.leaky_relu(z, 0.01), "leaky_relu(0.01)"),
        (jax.nn.elu, "elu(1)"),
        (jax.nn.softplus, "softplus"),
        (jax.nn.relu, "relu"),
        (lambda z: (jnp.exp(2 * z) - 1) / (jnp.exp(2 * z) + 1), "tanh"),
        (jax.nn.gelu, "gelu(1)"),
    ],
)
def test_activation_identified_numerically(act, expect):
    p = {"w": jnp.ones((12, 4)) * 0.1, "v": jnp.ones((4, 3)) * 0.1}
    m = jaxinv.from_fn(lambda p, x: act(x.reshape(x.shape[0], -1) @ p["w"]) @ p["v"], p, input_shape=(2, 2, 3))
    assert m.layers()[0].activation == expect


def test_unsupported_ops_listed_with_paths():
    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3))(x)
            a = x.reshape(x.shape[0], -1, x.shape[-1])
            x = (jnp.einsum("bic,bjc->bij", a, a) @ a).reshape(x.shape)  # a product of two activations
            x = nn.LayerNorm()(x)
            x = nn.tanh(x)
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    b = Bad()
    v = b.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
    with pytest.raises(jaxinv.UnsupportedModelError) as e:
        jaxinv.from_linen(b, v, input_shape=SHAPE)
    msg = str(e.value)
    assert "attention" in msg and "at Bad/bic,bjc->bij" in msg and "strict=False" in msg
    # usable by optimisation attacks when not strict
    m = jaxinv.from_linen(b, v, input_shape=SHAPE, strict=False)
    assert m(jnp.zeros((2,) + SHAPE)).shape == (2, 3)


def test_residual_connection_is_a_block_and_a_weightless_branch_is_reported():
    p = {"w": jnp.ones((12, 12)) * 0.1, "v": jnp.ones((12, 3)) * 0.1}

    def f(p, x):
        h = x.reshape(x.shape[0], -1)
        return (jnp.tanh(h @ p["w"]) + h) @ p["v"]

    model = jaxinv.from_fn(f, p, input_shape=(2, 2, 3))
    assert [(l.kind, l.in_shape) for l in model.layers()] == [("block", (2, 2, 3)), ("dense", (12,))]

    def g(p, x):  # x + tanh(x) has no weight between fork and join: not a block, and not element-wise either
        h = x.reshape(x.shape[0], -1)
        return (jnp.tanh(h).reshape(x.shape).transpose(0, 2, 1, 3).reshape(h.shape) + h) @ p["v"]

    with pytest.raises(jaxinv.UnsupportedModelError, match="no weight layer between where they fork and join"):
        jaxinv.from_fn(g, p, input_shape=(2, 2, 3))


def test_learned_activation_parameter_rejected():
    p = {"w": jnp.ones((12, 4)) * 0.1, "a": jnp.array(0.1), "v": jnp.ones((4, 3))}

    def f(p, x):
        z = x.reshape(x.shape[0], -1) @ p["w"]
        return jnp.where(z > 0, z, p["a"] * z) @ p["v"]

    with pytest.raises(jaxinv.UnsupportedModelError, match="learned"):
        jaxinv.from_fn(f, p, input_shape=(2, 2, 3))


def test_input_shape_mismatch_is_clear():
    p = {"w": jnp.ones((12, 4))}
    with pytest.raises(ValueError, match="input_shape"):
        jaxinv.from_fn(lambda p, x: x.reshape(x.shape[0], -1) @ p["w"], p, input_shape=(3, 3, 3))


def test_missing_input_shape_is_clear():
    m = jaxinv.from_fn(plain_apply, plain_params(jax.random.PRNGKey(1)))
    with pytest.raises(ValueError, match="input_shape"):
        m.layers()
    assert len(m.layers(SHAPE)) == 3


def test_wrong_module_types():
    with pytest.raises(TypeError, match="linen"):
        jaxinv.from_linen(NNX(nnx.Rngs(0)), {})
    with pytest.raises(TypeError, match="nnx"):
        jaxinv.from_nnx(Linen())
    with pytest.raises(TypeError, match="callable"):
        jaxinv.from_fn(3, {"w": jnp.ones(2)})


def test_transpose_and_average_pool_are_part_of_the_layer():
    p = {"w": jax.random.normal(jax.random.PRNGKey(0), (3, 3, 3, 4)) * 0.3, "v": jnp.ones((36, 5)) * 0.1}

    def f(p, x):
        z = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        z = nn.avg_pool(jnp.tanh(z), (2, 2), (2, 2))
        z = jnp.transpose(z, (0, 3, 1, 2))  # PyTorch-style flatten order
        return z.reshape(z.shape[0], -1) @ p["v"]

    m = jaxinv.from_fn(f, p, input_shape=(6, 6, 3))
    L = m.layers()
    assert [l.activation for l in L] == ["tanh", "identity"]
    assert L[1].in_shape == (6, 6, 4)  # the unknown is the activation output, pooling belongs to layer 1
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 6, 6, 3))
    np.testing.assert_allclose(m.apply_layers(x), m(x), rtol=1e-5, atol=1e-6)
