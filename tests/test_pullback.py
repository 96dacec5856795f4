"""COPA's pull-back refinement: constraints hold at the end, it helps on underdetermined layers, it is one compiled
loop, ReLU inequalities, and pullback=False is untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import photo, psnr, tiny_cnn

import jaxinv
from jaxinv.engine import (
    LayerSystem,
    Pullback,
    Solver,
    Term,
    adam_refine,
    compose,
    down_step,
    head_step,
    layer_system,
    pullback_layer,
    relu_inactive,
    solve_layer,
)

FAST = Pullback(steps=300)


@pytest.fixture(scope="module")
def under():
    """16x16, one stride-2 conv to 4 channels: 768 unknowns, 196 forward + 64 gradient rows (underdetermined)."""
    model = tiny_cnn([(4, 4, 2, 0)], ["tanh", "identity"])
    x = photo("astronaut")
    g = jaxinv.client_gradient(model, x, jnp.array([1]))
    return model, x, g


def test_pullback_improves_underdetermined_photo(under):
    model, x, g = under
    plain = jaxinv.copa(model, g, label=1)
    pb = jaxinv.copa(model, g, label=1, pullback=FAST)
    p0 = psnr(np.clip(plain.image, 0, 1), x)  # the box alone is free: compare with the clipped answer
    p1 = psnr(pb.image, x)
    assert p1 > p0 + 3, (p0, p1)
    r = pb.layers[0]
    assert 0 < int(r.refine_steps) <= 300
    assert float(r.lsq_residual) < 1e-3  # the least-squares start solved the (consistent) system
    assert float(r.gradient_residual) < 0.1 and float(r.forward_residual) < 0.1  # and it did not drift away
    assert plain.layers[0].refine_steps is None
    assert "refine_steps" in r.summary() and "refine_steps" not in plain.layers[0].summary()


def test_box_and_activation_image_hold_at_the_end():
    # two hidden layers: the middle one's output is a sigmoid, the first one's a tanh
    model = tiny_cnn([(3, 3, 2, 0), (2, 3, 1, 0)], ["tanh", "sigmoid", "identity"], seed=2)
    x = photo("chelsea")
    g = jaxinv.client_gradient(model, x, jnp.array([3]))
    rec = jaxinv.copa(model, g, label=3, pullback=Pullback(steps=200, box=(0.1, 0.9)))
    img = np.asarray(rec.image)
    assert img.min() >= 0.1 and img.max() <= 0.9
    # the layer below a refined one never had to clip its input into the activation's open image
    for r in rec.layers[:-1]:
        assert int(r.clipped) == 0
    # the refined hidden solution itself, through the engine's step
    st = model.structure()
    gl = jax.tree_util.tree_leaves(g)
    xh, gx, _, _ = head_step(model, st, gl, jnp.asarray(3), Solver(), "cross_entropy")
    x1, _, _ = down_step(model, st, 1, gl, xh, gx, Solver(), pullback=Pullback(steps=100))
    assert float(x1.min()) > -1.0 and float(x1.max()) < 1.0  # tanh's image (-1, 1), strictly


def test_determined_layer_keeps_its_exact_solution():
    """On a determined layer the priors must not blur the exact answer (the exactness correction)."""
    model = tiny_cnn([(6, 3, 1, 0)], ["relu", "identity"], seed=1)  # 768 unknowns, ~590 active + 162 gradient rows
    x = photo("rocket")
    g = jaxinv.client_gradient(model, x, jnp.array([0]))
    plain = jaxinv.copa(model, g, label=0)
    pb = jaxinv.copa(model, g, label=0, pullback=FAST)
    assert psnr(plain.image, x) > 40
    assert psnr(pb.image, x) > 40
    off = jaxinv.copa(model, g, label=0, pullback=Pullback(steps=300, correct=0.0))
    assert psnr(off.image, x) < psnr(pb.image, x)


def test_pullback_false_is_plain_copa(under):
    model, _, g = under
    a = jaxinv.copa(model, g, label=1)
    b = jaxinv.copa(model, g, label=1, pullback=False)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    assert all(r.refine_steps is None and r.lsq_residual is None for r in b.layers)


def test_inner_loop_is_one_compiled_loop(under):
    """The refinement is a lax.while_loop: its traced program does not grow with the number of steps."""
    model, x, g = under
    st = model.structure().stages[0]
    leaves = jax.tree_util.tree_leaves(model.params)
    z = st.affine(jnp.asarray(x), leaves)
    delta = jnp.ones_like(z) * 1e-2
    gW = jax.tree_util.tree_leaves(g)[st.nodes.kernel_leaf]

    def run(steps):
        def f(x0):
            sys = LayerSystem.build(st, leaves, delta)
            return pullback_layer(model.structure().stages, 0, leaves, sys, z, gW, None, x0, Pullback(steps=steps))[0]

        return jax.make_jaxpr(f)(jnp.zeros_like(jnp.asarray(x)))

    j10, j1000 = run(10), run(1000)
    assert "while" in str(j10)
    assert len(j10.jaxpr.eqns) == len(j1000.jaxpr.eqns)


def test_terms_compose_by_weighted_sum():
    a = Term(lambda v: jnp.sum(v["x"] ** 2), 2.0, "a")
    b = Term(lambda v: jnp.sum(jnp.abs(v["x"])), 0.5, "b")
    c = Term(lambda v: jnp.nan, 0.0, "dropped")
    v = {"x": jnp.array([1.0, -2.0])}
    assert float(compose(a, b, c)(v)) == pytest.approx(2 * 5 + 0.5 * 3)
    # projected Adam on a box-constrained quadratic: the solution is the projection of the minimiser
    res = adam_refine(compose(a), {"x": jnp.array([3.0, -3.0])}, project=lambda p: {"x": jnp.clip(p["x"], 1, 2)},
                      steps=500, lr=0.1, tol=0.0, window=50)
    np.testing.assert_allclose(res.params["x"], [1.0, 1.0], atol=1e-6)


def test_relu_inequality_rows():
    """Inactive ReLU units give A x + c <= 0: the hinge is zero at the truth, and the refinement enforces it."""
    model = tiny_cnn([(2, 3, 2, 0), (3, 3, 1, 0)], ["tanh", "relu", "identity"], seed=5)
    x = photo("coffee")
    leaves = jax.tree_util.tree_leaves(model.params)
    stages = model.structure().stages
    h0 = stages[0](jnp.asarray(x), leaves)  # the truth's input of layer 1
    z1 = stages[1].affine(h0, leaves)
    x1 = jax.nn.relu(z1)
    mask = (x1 > 0).astype(x1.dtype)
    assert 0 < float(mask.mean()) < 1
    g = jaxinv.client_gradient(model, x, jnp.array([2]))
    gl = jax.tree_util.tree_leaves(g)
    delta = jax.grad(lambda z: -jax.nn.log_softmax(
        model.apply_layers(jax.nn.relu(z), 2).reshape(-1))[2])(z1) * mask
    sys = LayerSystem.build(stages[1], leaves, delta)
    term = relu_inactive(sys, mask)
    assert float(term.penalty({"x": h0})) == 0.0
    assert float(term.penalty({"x": -h0})) > 0.0
    # end to end: from a start that violates them, the refinement enforces the inactive units' inequalities
    gW = gl[stages[1].nodes.kernel_leaf]
    x_lsq = solve_layer(sys, x1, gW, Solver(), mask=mask).x
    start = x_lsq + 0.2 * jax.random.normal(jax.random.PRNGKey(0), x_lsq.shape)
    viol = lambda v: float(jnp.sum(jnp.maximum(sys.forward(v) + sys.forward_offset, 0) * (1 - mask)))  # noqa: E731
    assert viol(start) > 0
    x_pb, rep = pullback_layer(stages, 1, leaves, sys, x1, gW, mask, start, Pullback(steps=300, inequality=10.0))
    assert viol(x_pb) < 0.2 * viol(start)
    sys_term = layer_system(sys, x1, gW, mask=mask)
    assert float(sys_term.penalty({"x": x_pb})) < 0.5 * float(sys_term.penalty({"x": start}))


def test_bad_pullback_argument(under):
    model, _, g = under
    with pytest.raises(TypeError, match="pullback"):
        jaxinv.copa(model, g, label=1, pullback="yes")
    with pytest.raises(ValueError, match="steps"):
        jaxinv.copa(model, g, label=1, pullback=Pullback(steps=0))
    with pytest.raises(ValueError, match="box"):
        jaxinv.copa(model, g, label=1, pullback=Pullback(box=(1.0, 0.0)))
