"""Tests of jaxinv.zoo: the papers' architectures and the generic CNN builder."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinv import zoo

ALL = zoo.names()
EXPECTED = {
    "cnn2_c0", "cnn2_c1", "cnn2_c2", "cnn2_c4", "cnn2_c5", "cnn2_c6", "cnn2_c11", "cnn2_c21",
    "cnn2_c41", "cnn3_c1", "cnn3_c2", "cnn3_c3", "cnn3_c4", "cnn3_c6", "cnn3_c7", "cnn3_c8",
    "cnn3_c9", "cnn3_c11", "cnn4_c1", "cnn4_c2", "cnn4_c3", "lenet", "lenet_dlg", "cnn6",
    "cnn6_d", "cnn6_head10", "fcn3",
}  # fmt: skip


@functools.cache
def built(name, seed=0):
    return zoo.build(name, key=jax.random.key(seed))


# A reference forward pass in NumPy (float64), written from the table only.
def _np_conv(x, w, stride, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :]
            out = out + patch @ w[i, j]
    return out


def _np_act(name):
    if name.startswith("leaky_relu"):
        slope = float(name.split(":")[1]) if ":" in name else 0.01
        return lambda v: np.where(v > 0, v, slope * v)
    return {
        "identity": lambda v: v,
        "tanh": np.tanh,
        "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
        "relu": lambda v: np.maximum(v, 0),
    }[name]


def _np_forward(info, params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(x, np.float64) - 0.5
    acts = iter(info.activations)
    convs = [c for c in info.layers if isinstance(c, zoo.ConvLayer)]
    denses = [d for d in info.layers if isinstance(d, zoo.DenseLayer)] + [info.head]
    for i, layer in enumerate(convs):
        h = _np_conv(h, p[f"Conv_{i}"]["kernel"], layer.stride, layer.padding)
        if layer.bias:
            h = h + p[f"Conv_{i}"]["bias"]
        h = _np_act(next(acts))(h)
    h = h.reshape(h.shape[0], -1)
    for i, layer in enumerate(denses):
        h = h @ p[f"Dense_{i}"]["kernel"]
        if layer.bias:
            h = h + p[f"Dense_{i}"]["bias"]
        h = _np_act(next(acts))(h)
    return h


def test_names():
    assert set(ALL) == EXPECTED
    assert len(ALL) == len(EXPECTED)


@pytest.mark.parametrize("name", ALL)
def test_builds_and_matches_table(name):
    module, variables = built(name)
    info = zoo.info(name)
    assert set(variables) == {"params"}
    params = variables["params"]
    x = jax.random.uniform(jax.random.key(1), (1, *zoo.input_shape(name)), jnp.float32)
    y = module.apply(variables, x)
    assert y.shape == (1, zoo.num_classes(name))
    assert y.dtype == jnp.float32
    assert np.all(np.isfinite(y))
    # The module computes exactly the table's network (shift, layers, activations, order).
    np.testing.assert_allclose(y, _np_forward(info, params, x), rtol=1e-4, atol=1e-5)

    convs = [c for c in info.layers if isinstance(c, zoo.ConvLayer)]
    denses = [d for d in info.layers if isinstance(d, zoo.DenseLayer)] + [info.head]
    assert len(info.activations) == len(convs) + len(denses)
    assert set(params) == {f"Conv_{i}" for i in range(len(convs))} | {
        f"Dense_{i}" for i in range(len(denses))
    }
    for i, c in enumerate(convs):
        layer = params[f"Conv_{i}"]
        assert layer["kernel"].shape == (c.kernel, c.kernel, c.in_channels, c.out_channels)
        assert ("bias" in layer) == c.bias
    for i, d in enumerate(denses):
        layer = params[f"Dense_{i}"]
        assert layer["kernel"].shape == (d.in_features, d.out_features)  # e.g. table's dense-in
        assert ("bias" in layer) == d.bias
    assert info.head.out_features == zoo.num_classes(name)


@pytest.mark.parametrize(
    "name, path, shape",
    [
        ("cnn6", ("Dense_0", "kernel"), (3200, 1)),
        ("cnn6_d", ("Conv_1", "kernel"), (3, 3, 12, 20)),
        ("cnn6_head10", ("Dense_0", "bias"), (10,)),
        ("cnn3_c1", ("Dense_0", "kernel"), (588, 10)),
        ("cnn2_c0", ("Dense_0", "kernel"), (225, 10)),
        ("cnn4_c2", ("Dense_0", "kernel"), (4608, 10)),
        ("lenet", ("Conv_2", "bias"), (12,)),
        ("lenet_dlg", ("Dense_0", "kernel"), (768, 100)),
        ("fcn3", ("Dense_0", "kernel"), (784, 1000)),
        ("fcn3", ("Dense_2", "kernel"), (100, 1)),
    ],
)
def test_spot_shapes(name, path, shape):
    params = built(name)[1]["params"]
    assert params[path[0]][path[1]].shape == shape


@pytest.mark.parametrize("name", ["cnn6", "cnn6_d", "fcn3", "cnn3_c1", "cnn4_c2"])
def test_biases_as_specified(name):
    params = built(name)[1]["params"]
    has_bias = {k: "bias" in v for k, v in params.items()}
    if name in ("cnn6", "cnn6_d", "fcn3"):  # R-GAP: no biases anywhere
        assert not any(has_bias.values())
    else:  # Chen & Campbell: conv without, dense head with
        assert has_bias == {k: k.startswith("Dense") for k in params}


def test_input_shapes_and_classes():
    for name in ALL:
        assert zoo.input_shape(name) == ((28, 28, 1) if name == "fcn3" else (32, 32, 3))
    assert zoo.num_classes("cnn6") == zoo.num_classes("fcn3") == 1
    assert zoo.num_classes("lenet_dlg") == 100
    assert zoo.num_classes("cnn3_c1") == zoo.num_classes("cnn6_head10") == 10


def test_activations_in_table():
    assert zoo.info("cnn2_c0").activations == ("tanh", "tanh")
    assert zoo.info("cnn3_c6").activations == ("leaky_relu", "leaky_relu", "tanh")
    assert zoo.info("cnn6").activations == ("leaky_relu:0.2",) * 6 + ("identity",)
    assert zoo.info("lenet").activations == ("leaky_relu",) * 3 + ("identity",)
    assert zoo.info("lenet_dlg").activations == ("sigmoid",) * 3 + ("identity",)


@pytest.mark.parametrize("name", ["cnn3_c1", "lenet", "cnn6_head10", "fcn3"])
def test_init_bounds(name):
    """PyTorch default: every kernel and bias entry ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    for layer in built(name)[1]["params"].values():
        kernel = np.asarray(layer["kernel"])
        fan_in = math.prod(kernel.shape[:-1])  # in_features, or kh * kw * in_channels
        bound = 1 / math.sqrt(fan_in)
        for leaf in layer.values():
            leaf = np.asarray(leaf)
            assert np.abs(leaf).max() <= bound * (1 + 1e-6)
            if leaf.size >= 200:  # uniform, not a narrower distribution
                assert np.abs(leaf).max() > 0.9 * bound
                assert abs(leaf.mean()) < 0.1 * bound
                assert abs(leaf.std() - bound / math.sqrt(3)) < 0.1 * bound


def test_deterministic_under_key():
    a = built("cnn3_c1")[1]
    b = zoo.build("cnn3_c1", key=jax.random.key(0))[1]
    c = built("cnn3_c1", seed=1)[1]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["params"]["Conv_0"]["kernel"], c["params"]["Conv_0"]["kernel"])


def test_unknown_name_lists_names():
    with pytest.raises(ValueError, match="Unknown zoo model 'resnet18'") as err:
        zoo.build("resnet18", key=jax.random.key(0))
    for name in ALL:
        assert name in str(err.value)
    for fn in (zoo.info, zoo.input_shape, zoo.num_classes):
        with pytest.raises(ValueError, match="cnn3_c1"):
            fn("nope")


def test_info_is_frozen():
    info = zoo.info("cnn3_c1")
    assert info.name == "cnn3_c1" and "Chen" in info.source
    assert info.layers[1] == zoo.ConvLayer(6, 3, 4, 2, 0, bias=False)
    assert info.head == zoo.DenseLayer(588, 10, bias=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "x"


def test_build_other_input_shape_and_errors():
    module, variables = zoo.build("cnn2_c1", key=jax.random.key(0), input_shape=(16, 16, 3))
    assert variables["params"]["Dense_0"]["kernel"].shape == (14 * 14 * 6, 10)
    with pytest.raises(ValueError, match="input_shape"):
        zoo.build("cnn2_c1", key=jax.random.key(0), input_shape=(32, 32))
    with pytest.raises(ValueError, match="NHWC"):
        module.apply(variables, jnp.zeros((16, 16, 3)))


def test_make_cnn():
    net = zoo.make_cnn(
        [(4, 3, 1, 1), (2, 3, 2, 0)], ["relu", "leaky_relu:0.2", "identity"],
        num_classes=5, conv_bias=True, head_bias=False,
    )  # fmt: skip
    x = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3), jnp.float32)
    variables = net.init(jax.random.key(1), x)
    p = variables["params"]
    assert p["Conv_0"]["kernel"].shape == (3, 3, 3, 4) and p["Conv_0"]["bias"].shape == (4,)
    assert p["Conv_1"]["kernel"].shape == (3, 3, 4, 2)
    assert p["Dense_0"]["kernel"].shape == (3 * 3 * 2, 5) and "bias" not in p["Dense_0"]
    assert net.apply(variables, x).shape == (1, 5)
    # shift=0 adds no operation; shift=0.5 is the same as shifting the input.
    net0 = net.clone(shift=0.0)
    np.testing.assert_allclose(
        net.apply(variables, x), net0.apply(variables, x - 0.5), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(convs=[(4, 3, 1, 0)], activations=["tanh"]), "len\\(convs\\) \\+ 1 = 2"),
        (dict(convs=[(4, 3, 1, 0)], activations=["tanh", "swish"]), "unknown activation 'swish'"),
        (dict(convs=[(4, 3, 1)], activations=["tanh", "tanh"]), "convs\\[0\\]"),
        (dict(convs=[(4, 0, 1, 0)], activations=["tanh", "tanh"]), "kernel"),
        (dict(convs=[(4, 3, 1, -1)], activations=["tanh", "tanh"]), "padding"),
        (dict(convs=[], activations=["leaky_relu:x"]), "slope"),
    ],
)
def test_make_cnn_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zoo.make_cnn(**kwargs, num_classes=10)


def test_make_cnn_type_errors():
    with pytest.raises(TypeError, match="sequence of strings"):
        zoo.make_cnn([], "tanh", num_classes=10)
    with pytest.raises(TypeError, match="activations\\[1\\]"):
        zoo.make_cnn([(4, 3, 1, 0)], ["tanh", None], num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        zoo.make_cnn([], ["tanh"], num_classes=0)


def test_activation_strings():
    x = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(zoo.activation("leaky_relu")(x), [-0.02, 0.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(zoo.activation("leaky_relu:0.2")(x), [-0.4, 0.0, 3.0], rtol=1e-6)
    sigmoid = 1 / (1 + np.exp(-np.array(x)))
    np.testing.assert_allclose(zoo.activation("sigmoid")(x), sigmoid, rtol=1e-6)
    for name in ("tanh", "identity", "relu", "elu", "softplus"):
        assert zoo.activation(name)(x).shape == (3,)


def test_build_float64():
    if hasattr(jax, "enable_x64"):  # jax >= 0.6
        enable_x64 = jax.enable_x64
    else:
        from jax.experimental import enable_x64
    with enable_x64(True):
        module, v64 = zoo.build("cnn2_c1", key=jax.random.key(0), dtype=jnp.float64)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(v64))
        v32 = built("cnn2_c1")[1]
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.float64(b)), v64, v32)
        assert module.apply(v64, jnp.zeros((1, 32, 32, 3), jnp.float64)).dtype == jnp.float64
    with pytest.raises(ValueError, match="floating dtype"):
        zoo.build("cnn2_c1", key=jax.random.key(0), dtype=jnp.int32)


def test_zoonet_activation_count():
    net = zoo.ZooNet(convs=((2, 3, 1, 0),), activations=("tanh",), num_classes=3)
    with pytest.raises(ValueError, match="one activation per layer"):
        net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
