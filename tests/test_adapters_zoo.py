"""Every zoo model through every adapter (linen, nnx, plain apply_fn): the same layers, the same function."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import zoo_model

import jaxinv
from jaxinv import zoo


class NNXNet(nnx.Module):
    """An nnx re-implementation of a zoo model from its spec (weights copied from the linen variables)."""

    def __init__(self, info, variables):
        p = variables["params"]
        self.acts = [zoo.activation(a) for a in info.activations]
        convs, dense = [], []
        for i, c in enumerate(info.layers):
            if isinstance(c, zoo.ConvLayer):
                m = nnx.Conv(c.in_channels, c.out_channels, (c.kernel, c.kernel), strides=c.stride,
                             padding=((c.padding, c.padding),) * 2, use_bias=c.bias, rngs=nnx.Rngs(0))
                m.kernel.value = p[f"Conv_{len(convs)}"]["kernel"]
                if c.bias:
                    m.bias.value = p[f"Conv_{len(convs)}"]["bias"]
                convs.append(m)
            else:
                dense.append(c)
        self.convs = nnx.List(convs) if hasattr(nnx, "List") else convs
        lin = []
        for j, d in enumerate(dense + [info.head]):
            m = nnx.Linear(d.in_features, d.out_features, use_bias=d.bias, rngs=nnx.Rngs(0))
            m.kernel.value = p[f"Dense_{j}"]["kernel"]
            if d.bias:
                m.bias.value = p[f"Dense_{j}"]["bias"]
            lin.append(m)
        self.dense = nnx.List(lin) if hasattr(nnx, "List") else lin

    def __call__(self, x):
        x = x - 0.5
        k = 0
        for c in self.convs:
            x = self.acts[k](c(x))
            k += 1
        x = x.reshape(x.shape[0], -1)
        for d in self.dense:
            x = self.acts[k](d(x))
            k += 1
        return x


# one model of each family through all three adapters (every zoo model is read through linen in test_zoo.py)
FAMILIES = ["cnn2_c0", "cnn3_c11", "cnn4_c2", "lenet", "cnn6", "fcn3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_adapter_reads_the_same_layers(name):
    module, variables = zoo.build(name, key=jax.random.PRNGKey(0))
    shape = zoo.input_shape(name)
    lin = jaxinv.from_linen(module, variables, input_shape=shape)
    fn = jaxinv.from_fn(lambda v, x: module.apply(v, x), variables, input_shape=shape)
    nx = jaxinv.from_nnx(NNXNet(zoo.info(name), variables), input_shape=shape)
    sig = [tuple(l.signature() for l in m.layers()) for m in (lin, fn, nx)]
    assert sig[0] == sig[1] == sig[2]
    info = zoo.info(name)
    assert len(lin.layers()) == len(info.layers) + 1
    assert [l.activation.split("(")[0] for l in lin.layers()] == [a.split(":")[0] for a in info.activations]
    x = jax.random.uniform(jax.random.PRNGKey(1), (2,) + shape)
    for m in (lin, fn, nx):
        np.testing.assert_allclose(m.apply_layers(x), lin(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", zoo.names())
def test_linen_reads_every_zoo_model(name):
    # from_linen checks its reading against module.apply on a random input before returning
    info = zoo.info(name)
    layers = zoo_model(name).layers()
    assert len(layers) == len(info.layers) + 1
    assert [l.activation.split("(")[0] for l in layers] == [a.split(":")[0] for a in info.activations]
    assert [l.bias for l in layers] == [c.bias for c in info.layers] + [info.head.bias]
