"""Each layer's forward and gradient maps against dense matrices built independently (numpy loops)."""

import itertools

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import jaxinv
from jaxinv.engine import LayerSystem, operator_norm

DN = ("NHWC", "HWIO", "NHWC")


def np_conv(x, w, stride, pad, dil, groups):
    """Direct-loop convolution (cross-correlation) of x (H, W, C) with w (kh, kw, C/groups, O)."""
    (pt, pb), (pl, pr) = pad
    xp = np.pad(x, ((pt, pb), (pl, pr), (0, 0)))
    kh, kw, cg, O = w.shape
    H = (xp.shape[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    W = (xp.shape[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    og = O // groups
    out = np.zeros((H, W, O))
    for i, j, o in itertools.product(range(H), range(W), range(O)):
        g = o // og
        for a, b, c in itertools.product(range(kh), range(kw), range(cg)):
            out[i, j, o] += xp[i * stride[0] + a * dil[0], j * stride[1] + b * dil[1], g * cg + c] * w[a, b, c, o]
    return out


def np_conv_weight_grad(x, delta, wshape, stride, pad, dil, groups):
    """d/dW <delta, conv(x, W)> by direct loops."""
    (pt, pb), (pl, pr) = pad
    xp = np.pad(x, ((pt, pb), (pl, pr), (0, 0)))
    kh, kw, cg, O = wshape
    og = O // groups
    g_w = np.zeros(wshape)
    H, W, _ = delta.shape
    for i, j, o in itertools.product(range(H), range(W), range(O)):
        g = o // og
        for a, b, c in itertools.product(range(kh), range(kw), range(cg)):
            g_w[a, b, c, o] += xp[i * stride[0] + a * dil[0], j * stride[1] + b * dil[1], g * cg + c] * delta[i, j, o]
    return g_w


def matrix(fn, n_in):
    cols = [np.asarray(fn(e), np.float64).ravel() for e in np.eye(n_in)]
    return np.stack(cols, 1)


CONV_CASES = [
    # (H, W, C, O, k, stride, pad, dil, groups)
    (5, 5, 2, 3, 3, (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
    (6, 5, 2, 2, 3, (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    (6, 6, 2, 4, 2, (2, 1), ((0, 1), (1, 0)), (1, 1), 2),  # asymmetric padding, groups
    (7, 7, 1, 2, 3, (1, 1), ((2, 2), (2, 2)), (2, 2), 1),  # dilation
]


def conv_model(case, bias, key):
    H, W, C, O, k, stride, pad, dil, groups = case
    kw_, kb, kd = jax.random.split(key, 3)
    p = {"w": jax.random.normal(kw_, (k, k, C // groups, O)), "d": jax.random.normal(kd, (1, 4))}
    if bias:
        p["b"] = jax.random.normal(kb, (O,))

    def f(p, x):
        z = jax.lax.conv_general_dilated(x - 0.5, p["w"], stride, pad, rhs_dilation=dil,
                                         feature_group_count=groups, dimension_numbers=DN)
        if bias:
            z = z + p["b"]
        z = jnp.tanh(z)
        s = z.reshape(z.shape[0], -1)
        return s[:, :1] @ p["d"]

    return jaxinv.from_fn(f, p, input_shape=(H, W, C)), p


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_conv_operators_match_dense(case, bias, x64):
    H, W, C, O, k, stride, pad, dil, groups = case
    model, p = conv_model(case, bias, jax.random.PRNGKey(0))
    st = model.structure().stages[0]
    leaves = jax.tree_util.tree_leaves(model.params)
    z_shape = st.nodes.z.shape
    delta = jax.random.normal(jax.random.PRNGKey(3), z_shape)
    sys = LayerSystem.build(st, leaves, delta)
    n = H * W * C
    w = np.asarray(p["w"], np.float64)
    A_ref = matrix(lambda e: np_conv(e.reshape(H, W, C), w, stride, pad, dil, groups), n)
    B_ref = matrix(lambda e: np_conv_weight_grad(e.reshape(H, W, C), np.asarray(delta[0], np.float64),
                                                 w.shape, stride, pad, dil, groups), n)
    unflat = lambda e: jnp.asarray(e.reshape((1, H, W, C)))  # noqa: E731
    A = matrix(lambda e: sys.forward(unflat(e)), n)
    B = matrix(lambda e: sys.gradient(unflat(e)), n)
    np.testing.assert_allclose(A, A_ref, atol=1e-10)
    np.testing.assert_allclose(B, B_ref, atol=1e-10)
    # offsets: c = f(0) holds the input shift and the bias; B(0) the shift's share of the weight gradient
    ones = np.full((H, W, C), -0.5)
    c_ref = np_conv(ones, w, stride, pad, dil, groups) + (np.asarray(p["b"]) if bias else 0)
    np.testing.assert_allclose(np.asarray(sys.forward_offset[0]), c_ref, atol=1e-10)
    # transposes (what LSMR uses) against the dense transposes
    y = np.random.default_rng(0).normal(size=A.shape[0])
    At = jax.linear_transpose(sys.forward, sys.x_struct)(jnp.asarray(y.reshape(z_shape)))[0]
    np.testing.assert_allclose(np.asarray(At).ravel(), A.T @ y, atol=1e-10)
    np.testing.assert_allclose(np.asarray(sys.forward_transpose(jnp.asarray(y.reshape(z_shape)))).ravel(), A.T @ y,
                               atol=1e-10)
    gy = np.random.default_rng(1).normal(size=B.shape[0])
    Bt = jax.linear_transpose(sys.gradient, sys.x_struct)(jnp.asarray(gy.reshape(w.shape)))[0]
    np.testing.assert_allclose(np.asarray(Bt).ravel(), B.T @ gy, atol=1e-10)
    # the stacked lineax operator
    op = sys.operator(0.5, 2.0)
    M = np.asarray(lx.materialise(op).as_matrix())
    np.testing.assert_allclose(M, np.concatenate([0.5 * A, 2.0 * B]), atol=1e-10)
    # operator norm estimate
    nrm = float(operator_norm(sys.forward, sys.x_struct, iters=60))
    assert abs(nrm - np.linalg.norm(A, 2)) / np.linalg.norm(A, 2) < 1e-2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dense_operators_match_dense(dtype, x64):
    key = jax.random.PRNGKey(0)
    p = {"w": jax.random.normal(key, (12, 5), dtype), "b": jnp.ones(5, dtype), "v": jnp.ones((5, 2), dtype)}

    def f(p, x):
        return jax.nn.sigmoid(x.reshape(x.shape[0], -1) @ p["w"] + p["b"]) @ p["v"]

    m = jaxinv.from_fn(f, p, input_shape=(2, 2, 3))
    st = m.structure().stages[0]
    leaves = jax.tree_util.tree_leaves(m.params)
    delta = jax.random.normal(jax.random.PRNGKey(1), (1, 5), dtype)
    sys = LayerSystem.build(st, leaves, delta)
    A = matrix(lambda e: sys.forward(jnp.asarray(e.reshape(1, 2, 2, 3), dtype)), 12)
    B = matrix(lambda e: sys.gradient(jnp.asarray(e.reshape(1, 2, 2, 3), dtype)), 12)
    tol = 1e-6 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(A, np.asarray(p["w"], np.float64).T, atol=tol)
    # gW = x delta^T: column block j of B is delta_j * I
    B_ref = np.kron(np.eye(12), np.asarray(delta, np.float64).reshape(5, 1))
    np.testing.assert_allclose(B, B_ref, atol=tol)
    assert sys.forward_offset.dtype == dtype


def test_activation_inverse_and_derivative():
    z = jnp.linspace(-4, 4, 101)
    for act in [jaxinv.Activation(n, a) for n, a in
                [("tanh", None), ("sigmoid", None), ("leaky_relu", 0.2), ("elu", 1.0), ("softplus", None),
                 ("identity", None)]]:
        zz, clipped = act.inverse(act(z))
        assert int(clipped) == 0
        np.testing.assert_allclose(zz, z, atol=2e-3 if act.name in ("tanh", "sigmoid") else 1e-4)
        d_ref = jax.vmap(jax.grad(act))(z)
        np.testing.assert_allclose(act.derivative(z), d_ref, rtol=1e-5, atol=1e-6)
    # values outside the image are clipped and counted, never silently
    zz, clipped = jaxinv.Activation("tanh")(jnp.array([0.0])) , None
    z2, c2 = jaxinv.Activation("tanh").inverse(jnp.array([0.5, 1.0, -1.2, 3.0]))
    assert int(c2) == 3 and bool(jnp.all(jnp.isfinite(z2)))
