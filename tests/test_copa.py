"""COPA: exact reconstruction on determined layers, minimum-norm least squares on deficient ones, jit and vmap."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import DN, photo, plain_cnn, psnr, stack_trees

import jaxinv
from jaxinv.engine import LayerSystem, relu_active

ident = lambda z: z  # noqa: E731
leaky = lambda z: jax.nn.leaky_relu(z, 0.2)  # noqa: E731
DETERMINED = [(6, 3, 1, 0)]  # 3 -> 6 channels, stride 1: forward rows 6*14*14 > 768 unknowns


def test_determined_float32_reconstructs_photo():
    model = plain_cnn(DETERMINED, [jnp.tanh, ident])
    x = photo("astronaut")
    g = jaxinv.client_gradient(model, x, jnp.array([2]))
    rec = jaxinv.copa(model, g, label=2)
    assert rec.image.shape == x.shape and rec.image.dtype == jnp.float32
    assert psnr(rec.image, x) > 30
    assert rec.ok and len(rec.layers) == 2
    assert rec.layers[0].path == "conv0" and rec.layers[1].path == "head"
    assert float(rec.gradient_distance[0]) < 1e-2
    assert float(rec.seconds) > 0 and all(float(r.seconds) >= 0 for r in rec.layers)


def test_determined_float64_is_exact(x64):
    model = plain_cnn([(6, 3, 1, 0), (8, 3, 1, 1)], [jnp.tanh, leaky, ident], dtype=jnp.float64)
    x = photo("chelsea").astype(np.float64)
    g = jaxinv.client_gradient(model, x, jnp.array([4]))
    rec = jaxinv.copa(model, g)
    assert rec.image.dtype == jnp.float64
    assert psnr(rec.image, x) > 60
    assert int(rec.label[0]) == 4  # recovered from the head's bias gradient (iDLG rule)
    for r in rec.layers:
        assert float(r.gradient_residual) < 1e-6


def test_label_recovered_and_reported():
    model = plain_cnn(DETERMINED, [jnp.tanh, ident])
    x = photo("coffee")
    for y in (0, 3):
        g = jaxinv.client_gradient(model, x, jnp.array([y]))
        assert int(jaxinv.copa(model, g).label[0]) == y
        assert int(jaxinv.recover_label(model, g)) == y


def test_bias_free_logistic_head_rgap_trick():
    # R-GAP's setting: no biases, leaky ReLU 0.2, one output with the logistic loss
    model = plain_cnn(DETERMINED, [leaky, ident], classes=1, head_bias=False)
    x = photo("rocket")
    g = jaxinv.client_gradient(model, x, jnp.array([1]))
    rec = jaxinv.copa(model, g, label=1)
    assert psnr(rec.image, x) > 30
    with pytest.raises(jaxinv.HeadNotInvertibleError, match="label"):
        jaxinv.copa(model, g)


def test_bias_free_multiclass_head():
    model = plain_cnn(DETERMINED, [jnp.tanh, ident], classes=6, head_bias=False)
    x = photo("astronaut")
    g = jaxinv.client_gradient(model, x, jnp.array([5]))
    rec = jaxinv.copa(model, g)
    assert int(rec.label[0]) == 5
    assert psnr(rec.image, x) > 30


def test_underdetermined_layer_gives_min_norm_solution(x64):
    # stride-2 conv to one channel: 768 unknowns, 49 forward rows, 27 gradient rows
    model = plain_cnn([(1, 3, 2, 0)], [jnp.tanh, ident], dtype=jnp.float64)
    x = photo("astronaut").astype(np.float64)
    g = jaxinv.client_gradient(model, x, jnp.array([1]))
    rec = jaxinv.copa(model, g, label=1, max_steps=5000, box=None)  # the raw least-squares answer
    r0 = rec.layers[0]
    assert r0.unknowns == 768 and r0.forward_rows == 49 and r0.gradient_rows == 27
    # the dense oracle: numpy's minimum-norm least squares on the same (norm-balanced) stacked system
    st = model.structure().stages[0]
    leaves = jax.tree_util.tree_leaves(model.params)
    gl = jax.tree_util.tree_leaves(g)
    # delta_0 and z_0 are exact here (the head is exact), so rebuild them from the truth
    z_true = st.affine(jnp.asarray(x), leaves)
    _, pull = jax.vjp(lambda z: model.apply_layers(jnp.tanh(z).reshape(1, -1).reshape(1, 7, 7, 1), 1), z_true)
    sys = LayerSystem.build(st, leaves, jax.grad(
        lambda z: jax.nn.log_softmax(model.apply_layers(jnp.tanh(z), 1))[0, 1] * -1)(z_true))
    A = np.asarray(lx.materialise(sys.operator(1.0, 0.0)).as_matrix())[:49]
    B = np.asarray(lx.materialise(sys.operator(0.0, 1.0)).as_matrix())[49:]
    nf, ng = np.linalg.norm(A, 2), np.linalg.norm(B, 2)
    M = np.concatenate([A / nf, B / ng])
    rhs = np.concatenate([(np.asarray(z_true - sys.forward_offset)).ravel() / nf,
                          np.asarray(gl[0] - sys.gradient_offset).ravel() / ng])
    x_ref = np.linalg.lstsq(M, rhs, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(rec.image).ravel(), x_ref, atol=1e-6)
    assert np.linalg.matrix_rank(M) < 768  # deficient: the minimum-norm answer is not the image
    assert psnr(rec.image, x) < 30


def test_stacked_targets_equal_python_loop():
    model = plain_cnn(DETERMINED, [jnp.tanh, ident])
    xs = np.concatenate([photo(n) for n in ("astronaut", "chelsea", "coffee")])
    ys = jnp.array([0, 3, 1])
    gs = [jaxinv.client_gradient(model, xs[i:i + 1], ys[i:i + 1]) for i in range(3)]
    stacked = stack_trees(gs)
    rec = jaxinv.copa(model, stacked, label=ys)
    assert rec.image.shape == (3, 16, 16, 3) and rec.label.shape == (3,)
    assert rec.layers[0].steps.shape == (3,)
    for i in range(3):
        one = jaxinv.copa(model, gs[i], label=int(ys[i]))
        np.testing.assert_allclose(rec.image[i], one.image[0], atol=1e-4)
    # both batching modes (lax.map: one target after another; vmap: one batched solve), label recovered too
    for mode in ("map", "vmap"):
        other = jaxinv.copa(model, stacked, batching=mode)
        np.testing.assert_allclose(other.image, rec.image, atol=1e-4)
        np.testing.assert_array_equal(other.label, ys)
    with pytest.raises(ValueError, match="batching must be"):
        jaxinv.copa(model, stacked, label=ys, batching="pmap")
    # vmap of copa over targets equals the stacked call
    vm = jax.vmap(lambda g, y: jaxinv.copa(model, g, label=y).image[0])(stacked, ys)
    np.testing.assert_allclose(vm, rec.image, atol=1e-4)


def test_jit_equals_eager():
    model = plain_cnn(DETERMINED, [jnp.tanh, ident])
    x = photo("chelsea")
    g = jaxinv.client_gradient(model, x, jnp.array([2]))
    eager = jaxinv.copa(model, g, label=2)
    jitted = jax.jit(lambda g: jaxinv.copa(model, g, label=2))(g)
    np.testing.assert_allclose(jitted.image, eager.image, atol=1e-5)
    assert np.isnan(float(jitted.seconds))


def test_relu_network_uses_active_units():
    model = plain_cnn([(8, 3, 1, 1)], [jax.nn.relu, ident], seed=3)
    x = photo("astronaut")
    g = jaxinv.client_gradient(model, x, jnp.array([0]))
    rec = jaxinv.copa(model, g, label=0)
    # inactive units give no forward row, but 8 channels at stride 1 leave enough active ones here
    assert psnr(rec.image, x) > 25


@pytest.mark.slow
def test_two_relu_layers_read_the_active_set_above_noise():
    """Two wide ReLU layers, each determined on its active rows: the lower layer's active set is read from the
    upper layer's reconstruction, whose inactive units come back as solver noise around 0 (read as active, they
    would be wrong equations)."""
    model = plain_cnn([(12, 3, 1, 1), (16, 3, 1, 1)], [jax.nn.relu, jax.nn.relu, ident], seed=4)
    x = photo("chelsea")
    g = jaxinv.client_gradient(model, x, jnp.array([1]))
    rec = jaxinv.copa(model, g, label=1)
    assert psnr(rec.image, x) > 40
    assert all(float(r.forward_residual) < 1e-4 for r in rec.layers[:-1])


def test_relu_active_zeroes_only_noise():
    x = jnp.array([2.0, 1e-3, 3e-9, -4e-9, 0.0, -1.0], jnp.float32)
    np.testing.assert_allclose(relu_active(x), [2.0, 1e-3, 0.0, 0.0, 0.0, 0.0], rtol=1e-6, atol=0)


def test_clipping_is_counted():
    model = plain_cnn(DETERMINED, [jnp.tanh, ident])
    x = photo("astronaut")
    g = jaxinv.client_gradient(model, x, jnp.array([2]))
    # a corrupted head gradient puts the recovered tanh outputs outside (-1, 1)
    g2 = jax.tree_util.tree_map(lambda a: a, g)
    g2["head"] = g["head"] * 50.0
    rec = jaxinv.copa(model, g2, label=2)
    assert int(rec.layers[0].clipped) > 0


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_grads_structure_names_path():
    model = plain_cnn(DETERMINED, [jnp.tanh, ident])
    g = jaxinv.client_gradient(model, photo(), jnp.array([1]))
    bad = dict(g)
    bad.pop("head_b")
    with pytest.raises(ValueError, match="head_b"):
        jaxinv.copa(model, bad)
    bad = dict(g)
    bad["conv0"] = g["conv0"][..., :3]
    with pytest.raises(ValueError, match="conv0"):
        jaxinv.copa(model, bad)


def test_nonfinite_grads_rejected():
    model = plain_cnn(DETERMINED, [jnp.tanh, ident])
    g = jaxinv.client_gradient(model, photo(), jnp.array([1]))
    g = dict(g)
    g["conv0"] = g["conv0"].at[0, 0, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="conv0.*non-finite"):
        jaxinv.copa(model, g)


def test_label_out_of_range():
    model = plain_cnn(DETERMINED, [jnp.tanh, ident])
    g = jaxinv.client_gradient(model, photo(), jnp.array([1]))
    with pytest.raises(ValueError, match="out of range"):
        jaxinv.copa(model, g, label=7)
    with pytest.raises(ValueError, match="out of range"):
        jaxinv.client_gradient(model, photo(), jnp.array([5]))


def test_input_shape_inconsistent():
    model = plain_cnn(DETERMINED, [jnp.tanh, ident])
    g = jaxinv.client_gradient(model, photo(), jnp.array([1]))
    with pytest.raises(ValueError, match="input_shape"):
        jaxinv.copa(model, g, input_shape=(20, 20, 3))


def test_head_with_shared_bias_not_invertible():
    p = {"w": jnp.ones((3, 3, 3, 4)) * 0.1, "b": jnp.zeros(4)}

    def f(p, x):  # a conv head (per-pixel logits): its bias gradient sums over positions
        z = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "VALID", dimension_numbers=DN) + p["b"]
        return z.reshape(z.shape[0], -1)

    m = jaxinv.from_fn(f, p, input_shape=(6, 6, 3))
    g = jaxinv.client_gradient(m, jnp.ones((1, 6, 6, 3)) * 0.3, jnp.array([1]))
    with pytest.raises(jaxinv.HeadNotInvertibleError, match="attack\\('ig'"):
        jaxinv.copa(m, g)


def test_non_invertible_activation_named():
    model = plain_cnn(DETERMINED, [jax.nn.gelu, ident])
    g = jaxinv.client_gradient(model, photo(), jnp.array([1]))
    with pytest.raises(ValueError, match="conv0.*gelu"):
        jaxinv.copa(model, g, label=1)


def test_no_recompilation_when_only_the_data_changes():
    """A second reconstruction with new images and labels (same shapes) compiles nothing: every layer's solve is
    cached by its shapes and the model's structure (counted with jax.monitoring's compile events)."""
    model = plain_cnn(DETERMINED, [jnp.tanh, ident])
    compiles = []

    def listener(name, secs, **kw):
        if "backend_compile" in name:
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        def run(names, ys):
            xs = np.concatenate([photo(n) for n in names])
            gs = [jaxinv.client_gradient(model, xs[i:i + 1], jnp.array(ys[i:i + 1])) for i in range(len(ys))]
            stacked = stack_trees(gs)
            n0 = len(compiles)
            rec = jaxinv.copa(model, stacked, label=jnp.array(ys))
            jax.block_until_ready(rec.image)
            return len(compiles) - n0, rec, xs

        first, _, _ = run(("astronaut", "chelsea"), [0, 3])
        again, rec, xs = run(("coffee", "rocket"), [1, 2])
        assert first > 0 and again == 0
        assert min(psnr(rec.image[i:i + 1], xs[i:i + 1]) for i in range(2)) > 30
    finally:
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
        if unregister is None:  # older jax
            from jax._src import monitoring
            unregister = monitoring._unregister_event_duration_listener_by_callback
        unregister(listener)
