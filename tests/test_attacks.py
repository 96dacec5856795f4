"""Tests of the attacks behind ``jaxinv.attack``: one conformance suite over every registered attack, the baselines'
reconstructions on a tiny sigmoid network, label recovery, batches, and the errors of bad input.

Everything runs on one tiny model (16x16x3 input, one sigmoid convolution, a 10-class dense head) so that each
attack compiles once per option set; the options below are shared by all tests (compiled functions are reused).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinv
from jaxinv import Client, data, metrics, zoo
from jaxinv.engine import loss_fn
from jaxinv.attacks import (
    ATTACKS,
    DLGOptions,
    IGOptions,
    attack,
    candidate_gradient,
    check_options,
    cosine_distance,
    dlg,
    idlg,
    ig,
    l2_distance,
    milestones,
    minimise,
    multistep_schedule,
    project_box,
    recover_labels,
    relative_distance,
    soft_cross_entropy,
    total_variation,
)

from helpers import tiny_cnn

SHAPE = (16, 16, 3)
LABEL = 3
RANDOM_INIT = ("dlg", "idlg", "ig")
CALLS: list[tuple[int, float]] = []


def _record(step, loss):
    CALLS.append((step, loss))


# Few steps: enough for the tiny network (DLG/iDLG converge in ~100 L-BFGS steps, IG in a few hundred).
OPTIONS = {
    "copa": {},
    "rgap": {},
    "dlg": dict(max_steps=150, log_every=10, callback=_record),
    "idlg": dict(max_steps=150, log_every=10, callback=_record),
    "ig": dict(max_steps=300, log_every=10, callback=_record),
    "hybrid": dict(max_steps=(200, 100, 50)),
}


@functools.cache
def tiny():
    """(model, image (1,16,16,3) in [0,1], grads of label 3)."""
    model = tiny_cnn([(12, 5, 2, 2)], ["sigmoid", "identity"], size=SHAPE[0], classes=10, conv_bias=True,
                     name="tiny_sigmoid")
    x = data.sample_images(1, size=16, key=jax.random.key(1))
    grads = jaxinv.client_gradient(model, x, jnp.array([LABEL]))
    return model, x, grads


@functools.cache
def run(name, seed=0):
    model, _, grads = tiny()
    return attack(name, model, grads, key=jax.random.key(seed), **OPTIONS[name])


def test_registry_names():
    assert set(ATTACKS) == {"copa", "rgap", "dlg", "idlg", "ig", "hybrid"}
    assert isinstance(ATTACKS, tuple)


# ------------------------------------------------------------------------------------------------ conformance
@pytest.mark.parametrize("name", ATTACKS)
def test_conformance(name):
    rec = run(name)
    assert isinstance(rec, jaxinv.Reconstruction)
    assert rec.attack == name
    assert rec.image.shape == (1,) + SHAPE
    assert rec.image.dtype == jnp.float32
    assert rec.label.shape == (1,) and jnp.issubdtype(rec.label.dtype, jnp.integer)
    assert int(rec.label[0]) == LABEL
    assert rec.gradient_distance.shape == (1,)
    assert np.all(np.isfinite(rec.gradient_distance))
    assert float(rec.gradient_distance[0]) < 0.05  # the answer reproduces the shared gradient
    assert rec.loss_trace.ndim == 2 and rec.loss_trace.shape[0] == 1
    assert np.isfinite(float(rec.seconds)) and float(rec.seconds) >= 0
    if name in RANDOM_INIT:
        assert rec.layers == ()
        assert rec.loss_trace.shape[1] == -(-OPTIONS[name]["max_steps"] // 10)
        assert np.isfinite(rec.loss_trace[0, 0])
    # deterministic under the same key
    model, _, grads = tiny()
    again = attack(name, model, grads, key=jax.random.key(0), **OPTIONS[name])
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(rec.image))
    if name in RANDOM_INIT:  # a different key starts elsewhere
        other = run(name, seed=1)
        assert not np.array_equal(np.asarray(other.image), np.asarray(rec.image))


@pytest.mark.parametrize("name", ATTACKS)
def test_conformance_under_jit(name):
    model, x, grads = tiny()
    f = jax.jit(lambda m, g, k: attack(name, m, g, key=k, **OPTIONS[name]))
    rec = f(model, grads, jax.random.key(0))
    assert rec.image.shape == (1,) + SHAPE and rec.attack == name
    assert int(rec.label[0]) == LABEL
    assert np.isnan(float(rec.seconds))  # no wall time inside jit
    assert np.all(np.isfinite(rec.gradient_distance))
    assert float(metrics.psnr(jnp.clip(rec.image[0], 0, 1), x[0])) > 20


@pytest.mark.parametrize("name", ["dlg", "idlg", "ig"])
def test_reconstructs_tiny_sigmoid_net(name):
    _, x, _ = tiny()
    rec = run(name)
    assert float(metrics.psnr(jnp.clip(rec.image[0], 0, 1), x[0])) > 20


def test_ig_matches_the_gradient_to_float32_precision():
    """With the defaults (no TV, lr for [0, 1] inputs, a cancellation-free cosine distance) IG fits the tiny net's
    gradient as closely as DLG does; the old ``1 - cos`` in float32 and a paper-sized TV stopped it at ~44 dB."""
    _, x, _ = tiny()
    rec = run("ig")
    assert float(metrics.psnr(jnp.clip(rec.image[0], 0, 1), x[0])) > 60


def test_ig_lenet_dlg_defaults():
    """The issue's target: IG at its defaults on DLG's untrained sigmoid LeNet and a bundled photo (was ~15-28 dB:
    the float32 ``1 - cos`` could not resolve distances below ~1e-7 and TV 1e-4 outweighed the data term)."""
    net, variables = zoo.build("lenet_dlg", key=jax.random.key(0))
    model = jaxinv.from_linen(net, variables, input_shape=zoo.input_shape("lenet_dlg"), name="lenet_dlg")
    x = data.sample_images(1, key=jax.random.key(0))
    grads = jaxinv.client_gradient(model, x, jnp.array([17]))
    rec = attack("ig", model, grads, label=17, key=jax.random.key(0))
    assert float(metrics.psnr(jnp.clip(rec.image[0], 0, 1), x[0])) > 35


def test_rgap_is_copa_engine():
    a, b = run("rgap"), run("copa")
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    assert len(a.layers) == 2


def test_callback_every_log_every():
    run("ig")
    jax.effects_barrier()
    assert CALLS, "callback never called"
    steps = [s for s, _ in CALLS]
    assert all(isinstance(s, int) and s % 10 == 0 for s in steps)
    assert all(np.isfinite(v) for _, v in CALLS)


# ----------------------------------------------------------------------------------------------------- labels
def test_recover_label():
    model, _, grads = tiny()
    assert int(jaxinv.recover_label(model, grads)) == LABEL
    np.testing.assert_array_equal(recover_labels(model, grads, 1), [LABEL])


@pytest.mark.parametrize("labels", [[7, 1, 5, 2], [4, 4, 0, 9]])
def test_recover_labels_batch(labels):
    model, _, _ = tiny()
    x = data.sample_images(4, size=16, key=jax.random.key(2))
    grads = jaxinv.client_gradient(model, x, jnp.array(labels))
    np.testing.assert_array_equal(recover_labels(model, grads, 4), sorted(labels))


def test_batch_attack_ig():
    """A batch gradient of B=2 images: image (2, ...), labels recovered, matched to the truths."""
    model, _, _ = tiny()
    x = data.sample_images(2, size=16, key=jax.random.key(3))
    grads = jaxinv.client_gradient(model, x, jnp.array([6, 2]))
    rec = attack("ig", model, grads, key=jax.random.key(0), batch_size=2, max_steps=400)
    assert rec.image.shape == (2,) + SHAPE
    np.testing.assert_array_equal(rec.label, [2, 6])
    assert rec.loss_trace.shape[0] == 1 and rec.gradient_distance.shape == (1,)
    _, scores = metrics.match(jnp.clip(rec.image, 0, 1), x)
    assert np.all(np.asarray(scores) > 20)


def test_stacked_targets():
    """T single-image gradients stacked on a leading axis: T independent reconstructions."""
    model, _, _ = tiny()
    x = data.sample_images(2, size=16, key=jax.random.key(4))
    gs = [jaxinv.client_gradient(model, x[i : i + 1], jnp.array([l])) for i, l in enumerate([1, 8])]
    grads = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *gs)
    rec = attack("idlg", model, grads, key=jax.random.key(0), max_steps=150)
    assert rec.image.shape == (2,) + SHAPE and rec.loss_trace.shape[0] == 2
    np.testing.assert_array_equal(rec.label, [1, 8])
    assert np.all(np.asarray(metrics.psnr(jnp.clip(rec.image, 0, 1), x)) > 20)


def test_any_differentiable_model():
    """Optimisation attacks need only apply_fn (here self-attention over the pixels, a product of two activations,
    which the layer-wise methods cannot place); label recovery needs the layers, so without them the error says to
    pass the label."""
    import flax.linen as nn

    class Attend(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.sigmoid(nn.Conv(8, (3, 3))(x))
            a = a.reshape(a.shape[0], -1, a.shape[-1])
            a = a + jax.nn.softmax(jnp.einsum("bic,bjc->bij", a, a), axis=-1) @ a
            return nn.Dense(10)(a.reshape(a.shape[0], -1))

    net = Attend()
    model = jaxinv.from_linen(net, net.init(jax.random.key(0), jnp.zeros((1,) + SHAPE)), input_shape=SHAPE,
                              strict=False)
    _, x, _ = tiny()
    grads = jaxinv.client_gradient(model, x, jnp.array([LABEL]))
    rec = attack("ig", model, grads, key=jax.random.key(0), label=LABEL, max_steps=300)
    assert float(metrics.psnr(rec.image[0], x[0])) > 15
    with pytest.raises(ValueError, match="pass label="):
        attack("ig", model, grads, key=jax.random.key(0), max_steps=300)


# ------------------------------------------------------------------------------------------------- objectives
def _leaves(seed):
    k = jax.random.split(jax.random.key(seed), 2)
    return [jax.random.normal(k[0], (3, 4)), jax.random.normal(k[1], (5,))]


def test_distances():
    g, h = _leaves(0), _leaves(1)
    assert float(cosine_distance(g, g)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distance([-a for a in g], g)) == pytest.approx(2.0, abs=1e-6)
    assert float(cosine_distance([3 * a for a in g], g)) == pytest.approx(0.0, abs=1e-6)
    flat = lambda t: np.concatenate([np.ravel(a) for a in t])  # noqa: E731
    cos = flat(g) @ flat(h) / np.linalg.norm(flat(g)) / np.linalg.norm(flat(h))
    assert float(cosine_distance(h, g)) == pytest.approx(1 - cos, rel=1e-5)
    assert float(l2_distance(h, g)) == pytest.approx(np.sum((flat(h) - flat(g)) ** 2), rel=1e-5)
    assert float(relative_distance(h, g)) == pytest.approx(
        np.linalg.norm(flat(h) - flat(g)) / np.linalg.norm(flat(g)), rel=1e-5)


def test_cosine_distance_resolves_tiny_distances():
    """Nearly parallel gradients (the regime of IG near a solution): the float64 reference, not float32 rounding
    noise (``1 - cos`` in float32 is off by ~6e-8); a zero gradient is at distance 1 with a finite gradient."""
    g = _leaves(0)
    for eps in (1e-3, 1e-4, 1e-5):
        h = [a + eps * b for a, b in zip(g, _leaves(1))]
        a64 = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in h])
        b64 = np.concatenate([np.ravel(np.asarray(b, np.float64)) for b in g])
        ref = 1 - a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64)
        assert float(cosine_distance(h, g)) == pytest.approx(ref, rel=1e-3)
    zero = [jnp.zeros_like(a) for a in g]
    assert float(cosine_distance(zero, g)) == 1.0
    dz = jax.grad(lambda z: cosine_distance(z, g))(zero)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in dz)


def _loop_steps(values, **kw):
    """Iterations ``minimise`` runs on a scripted objective sequence (the step returns ``values[i]``)."""
    vals = jnp.asarray(values, jnp.float32)

    def step(carry, i):
        return carry, vals[i], jnp.zeros(())

    return int(minimise(step, (), jnp.zeros(()), max_steps=len(values), log_every=1, **kw).steps)


def test_minimise_early_stop():
    flat = [1.0] * 100
    assert _loop_steps(flat, tol=1e-4, window=10) == 20  # the first window only sets the reference
    assert _loop_steps(flat, tol=1e-4, window=10, min_steps=55) == 60  # no stop before min_steps
    assert _loop_steps(flat, tol=0.0, window=10) == 100
    # a noisy objective that happens to repeat its value at every check, while its best keeps improving: no stop
    noisy = [1.0 if i % 10 == 9 else 1.0 / (1 + i) for i in range(100)]
    assert _loop_steps(noisy, tol=1e-4, window=10) == 100
    # an oscillation around a level: stops once its best stops improving
    osc = [1.0 / (1 + i) if i < 30 else (0.5 if i % 2 else 0.9) / 31 for i in range(100)]
    assert _loop_steps(osc, tol=1e-4, window=10) == 50
    # a steady descent never stops
    assert _loop_steps([1.0 / (1 + i) for i in range(100)], tol=1e-4, window=10) == 100


def test_minimise_stop_hook():
    def step(carry, i):
        return carry + 3, jnp.asarray(1.0 / (1 + i)), jnp.zeros(())

    res = minimise(step, jnp.zeros((), jnp.int32), jnp.zeros(()), max_steps=100, log_every=1, tol=0.0, window=10,
                   stop=lambda c: c >= 30)
    assert int(res.steps) == 10


def test_dlg_evaluation_budget():
    """``max_evaluations`` counts the line search's evaluations: far fewer iterations than ``max_steps``."""
    model, _, grads = tiny()
    rec = attack("dlg", model, grads, key=jax.random.key(0), max_steps=200, tol=0.0, log_every=1, max_evaluations=40)
    iterations = int(np.isfinite(np.asarray(rec.loss_trace[0])).sum())
    assert 5 <= iterations <= 40
    full = attack("dlg", model, grads, key=jax.random.key(0), max_steps=iterations, tol=0.0, log_every=1)
    np.testing.assert_allclose(rec.image, full.image, atol=1e-5)  # the same run, cut at the budget


def test_ig_early_stop_waits_for_the_last_decay():
    """IG tests convergence only after its last learning-rate decay (7/8 of max_steps)."""
    model, _, grads = tiny()
    rec = attack("ig", model, grads, key=jax.random.key(0), max_steps=80, window=10, tol=10.0, log_every=1)
    assert milestones(80)[-1] == 70
    assert int(np.isfinite(np.asarray(rec.loss_trace[0])).sum()) == 70


def test_total_variation_and_box():
    assert float(total_variation(jnp.ones((2, 5, 5, 3)))) == 0.0
    x = jnp.zeros((1, 2, 2, 1)).at[0, 0, 0, 0].set(1.0)  # |dH| mean = 1/2, |dW| mean = 1/2
    assert float(total_variation(x)) == pytest.approx(1.0)
    assert float(total_variation(jnp.arange(6.0).reshape(2, 3))) == 0.0  # no spatial axes
    np.testing.assert_array_equal(project_box(jnp.array([-1.0, 0.5, 2.0]), (0.0, 1.0)), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(project_box(jnp.array([-1.0, 2.0]), None), [-1.0, 2.0])


def test_soft_targets_match_client_loss():
    model, x, grads = tiny()
    logits = model(x)
    onehot = jax.nn.one_hot(jnp.array([LABEL]), 10)
    assert float(soft_cross_entropy(logits, onehot)) == pytest.approx(
        float(loss_fn("cross_entropy", 10)(logits, jnp.array([LABEL]))), rel=1e-6)
    g_hat = candidate_gradient(model.apply_fn, model.params, x, onehot)
    assert float(relative_distance(g_hat, jax.tree_util.tree_leaves(grads))) < 1e-6
    z = jnp.array([[0.3], [-1.2]])
    assert float(soft_cross_entropy(z, jnp.array([[1.0], [0.0]]))) == pytest.approx(
        float(loss_fn("logistic", 1)(z, jnp.array([1, 0]))), rel=1e-6)


def test_multistep_schedule():
    assert milestones(800) == (300, 500, 700)
    s = multistep_schedule(0.1, 800)
    np.testing.assert_allclose([s(0), s(299), s(300), s(500), s(700), s(799)],
                               [0.1, 0.1, 0.01, 0.001, 0.0001, 0.0001], rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- errors
def test_unknown_attack_lists_names():
    model, _, grads = tiny()
    with pytest.raises(ValueError, match="copa, rgap, dlg, idlg, ig"):
        attack("dlgg", model, grads)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("ig", dict(max_steps=1.5), r"'max_steps'.*must be int.*accepts:.*tv_weight"),
        ("ig", dict(tv_weight="big"), r"'tv_weight'.*must be float"),
        ("ig", dict(box=(0.0,)), r"'box'.*tuple\[float, float\] \| None"),
        ("ig", dict(signed=1), r"'signed'.*must be bool"),
        ("dlg", dict(tv_weight=1e-4), r"unknown option 'tv_weight' for attack 'dlg'.*accepts:.*memory_size"),
        ("copa", dict(steps=2), r"unknown option 'steps' for attack 'copa'.*accepts:.*forward_weight"),
        ("copa", dict(max_steps="10"), r"'max_steps' of attack 'copa' must be int"),
    ],
)
def test_bad_options(name, options, match):
    model, _, grads = tiny()
    with pytest.raises(TypeError, match=match):
        attack(name, model, grads, key=jax.random.key(0), **options)


def test_grads_mismatch():
    model, _, grads = tiny()
    bad = jax.tree_util.tree_map(lambda a: a, grads)
    bad["params"]["Dense_0"]["kernel"] = bad["params"]["Dense_0"]["kernel"][:-1]
    for name in ATTACKS:
        with pytest.raises(ValueError, match="Dense_0/kernel"):
            attack(name, model, bad, key=jax.random.key(0), **OPTIONS[name])
    missing = {"params": {"Conv_0": grads["params"]["Conv_0"]}}
    with pytest.raises(ValueError, match="structure"):
        attack("ig", model, missing, key=jax.random.key(0))


@pytest.mark.parametrize("name", RANDOM_INIT)
def test_random_init_needs_key(name):
    model, _, grads = tiny()
    with pytest.raises(ValueError, match="needs a PRNG key"):
        attack(name, model, grads)


def test_label_batch_mismatch():
    model, _, grads = tiny()
    with pytest.raises(ValueError, match="batch_size"):
        attack("ig", model, grads, key=jax.random.key(0), label=jnp.array([1, 2]), batch_size=3)
    with pytest.raises(ValueError, match="out of range"):
        attack("ig", model, grads, key=jax.random.key(0), label=10)


# --------------------------------------------------------------------------------------------- option objects
@pytest.mark.parametrize(
    "cls, kwargs, error, match",
    [
        (DLGOptions, dict(max_steps=0), ValueError, "DLGOptions: max_steps must be a positive integer"),
        (DLGOptions, dict(memory_size=2.5), ValueError, "DLGOptions: memory_size"),
        (DLGOptions, dict(max_evaluations=0), ValueError, "DLGOptions: max_evaluations"),
        (DLGOptions, dict(tol=-1e-3), ValueError, r"DLGOptions: tol must be a finite number >= 0"),
        (DLGOptions, dict(callback=3), TypeError, "DLGOptions: callback must be a function"),
        (IGOptions, dict(lr=0.0), ValueError, r"IGOptions: lr must be a finite number > 0"),
        (IGOptions, dict(tv_weight=float("nan")), ValueError, "IGOptions: tv_weight"),
        (IGOptions, dict(box=(1.0, 0.0)), ValueError, r"IGOptions: box=\(lo, hi\) needs lo < hi"),
        (IGOptions, dict(box="01"), TypeError, "IGOptions: box must be a pair"),
        (IGOptions, dict(box=(0.0,)), TypeError, "IGOptions: box must be a pair"),
        (IGOptions, dict(signed=1), TypeError, "IGOptions: signed must be True or False"),
        (IGOptions, dict(restarts=0), ValueError, "IGOptions: restarts"),
        (IGOptions, dict(window=-1), ValueError, "IGOptions: window"),
    ],
)
def test_option_objects_validate_at_construction(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_option_objects_are_static_values():
    """Frozen, keyword-only, normalised (numpy scalars become Python numbers) and hashable: the compiled loop is
    keyed by them, so equal options reuse it."""
    a = IGOptions(max_steps=np.int64(30), lr=np.float32(0.05), box=[0, 1])
    b = IGOptions(max_steps=30, lr=float(np.float32(0.05)), box=(0.0, 1.0))
    assert a == b and hash(a) == hash(b)
    assert type(a.max_steps) is int and type(a.lr) is float and a.box == (0.0, 1.0)
    with pytest.raises(TypeError):
        IGOptions(30)  # keyword-only
    with pytest.raises(AttributeError):
        a.max_steps = 3  # frozen
    assert hash(DLGOptions(callback=_record)) == hash(DLGOptions(callback=_record))


@pytest.mark.parametrize(
    "fn, cls, flat",
    [
        (dlg, DLGOptions, dict(max_steps=12, memory_size=7, tol=0.0, log_every=2)),
        (idlg, DLGOptions, dict(max_steps=12, max_evaluations=9, window=5)),
        (ig, IGOptions, dict(max_steps=20, lr=0.05, tv_weight=1e-6, restarts=2, signed=False, log_every=3)),
    ],
)
def test_legacy_keywords_equal_option_objects(fn, cls, flat):
    """``fn(max_steps=..., loss=..., batch_size=...)`` is ``fn(client=Client(...), options=cls(...))``: bit for bit."""
    model, _, grads = tiny()
    key = jax.random.key(3)
    setting = dict(loss="cross_entropy", batch_size=1)
    old = fn(model, grads, key=key, **setting, **flat)
    new = fn(model, grads, key=key, client=Client(**setting), options=cls(**flat))
    mixed = attack(fn.__name__, model, grads, key=key, options=cls(**flat), **setting)
    for rec in (new, mixed):
        for field in ("image", "label", "loss_trace", "gradient_distance"):
            np.testing.assert_array_equal(np.asarray(getattr(rec, field)), np.asarray(getattr(old, field)))
        assert rec.attack == fn.__name__


def test_unknown_or_clashing_keyword():
    model, _, grads = tiny()
    key = jax.random.key(0)
    with pytest.raises(TypeError, match=r"ig\(\) got unexpected keyword argument\(s\) steps; its options are .*"
                                        r"Client \(loss, batch_size, local_steps, local_lr, dtype\).*IGOptions \(max_steps"):
        ig(model, grads, key=key, steps=5)
    with pytest.raises(TypeError, match=r"dlg\(\) got unexpected keyword argument\(s\) tv_weight"):
        dlg(model, grads, key=key, tv_weight=1e-4)
    with pytest.raises(TypeError, match="max_steps given both as keyword and on the IGOptions"):
        ig(model, grads, key=key, options=IGOptions(max_steps=10), max_steps=20)
    with pytest.raises(TypeError, match="expected a IGOptions"):
        ig(model, grads, key=key, options=DLGOptions())
    with pytest.raises(ValueError, match="Client: local_lr"):
        ig(model, grads, key=key, local_steps=3)


def test_registry_reads_option_objects():
    """The registry's options are the Client's and the options class's fields plus the objects themselves."""
    check_options("ig", {"max_steps": 10, "loss": "auto", "local_steps": 2, "local_lr": 0.1})
    check_options("ig", {"options": IGOptions(max_steps=10), "client": Client()})
    check_options("dlg", {"options": DLGOptions(), "max_evaluations": None})
    check_options("copa", {"pullback": True, "max_steps": 10})  # an earlier name (jaxinv.attacks.RENAMED)
    with pytest.raises(TypeError, match=r"option 'options' of attack 'ig' must be IGOptions \| None"):
        check_options("ig", {"options": DLGOptions()})
    with pytest.raises(TypeError, match=r"'local_lr' of attack 'dlg' must be float \| None.*or as objects: client"):
        check_options("dlg", {"local_lr": "big"})
    with pytest.raises(TypeError, match="'key' is an argument of jaxinv.attack itself"):
        check_options("ig", {"key": 0})
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        check_options("nope", {})


def test_dlg_simulates_a_fedavg_client():
    """With a FedAvg Client (K > 1) DLG matches the candidate's simulated update, as IG does."""
    model, x, _ = tiny()
    K, lr = 3, 0.1
    upd = jaxinv.update_as_gradient(jaxinv.local_update(model, x, jnp.array([LABEL]), steps=K, lr=lr), steps=K, lr=lr)
    rec = idlg(model, upd, key=jax.random.key(0), label=LABEL, client=Client(local_steps=K, local_lr=lr),
               options=DLGOptions(max_steps=60))
    plain = idlg(model, upd, key=jax.random.key(0), label=LABEL, max_steps=60)
    assert rec.image.shape == x.shape and np.isfinite(float(rec.gradient_distance[0]))
    assert not np.array_equal(np.asarray(rec.image), np.asarray(plain.image))
