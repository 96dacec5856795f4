"""Tests of the real labelled task (jaxinv.data.photo_task) and of training checkpoints (jaxinv.zoo.train)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_cnn

import jaxinv
from jaxinv import data, zoo

SIZE = 16
CONVS = [(4, 4, 2, 0)]  # 16x16x3 -> 7x7x4 -> dense head: a model that trains in milliseconds
ACTS = ["tanh", "identity"]


@functools.cache
def task(n=64, seed=0, photos=None):
    return data.photo_task(n, size=SIZE, photos=photos, key=jax.random.key(seed))


@functools.cache
def model(classes=4):
    return tiny_cnn(CONVS, ACTS, classes=classes, size=SIZE)


def leaves(m):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(m.params)]


def assert_same_params(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------ photo_task
def test_photo_task_shape_dtype_range_and_classes():
    t = task()
    assert isinstance(t, data.Task)
    assert t.images.shape == (64, SIZE, SIZE, 3) and t.images.dtype == jnp.float32
    assert t.labels.shape == (64,) and t.labels.dtype == jnp.int32
    assert 0.0 <= float(t.images.min()) and float(t.images.max()) <= 1.0
    assert t.classes == data.photo_names()[:4] == ("astronaut", "chelsea", "coffee", "rocket")
    assert float(t.images.std(axis=(1, 2, 3)).min()) > 0.01  # photo crops, not blank
    images, labels, classes = t  # unpacks like a (images, labels, classes) tuple
    assert classes is t.classes


def test_photo_task_deterministic_under_its_key():
    a = data.photo_task(24, size=SIZE, key=jax.random.key(3))
    b = data.photo_task(24, size=SIZE, key=jax.random.key(3))
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.classes == b.classes
    c = data.photo_task(24, size=SIZE, key=jax.random.key(4))
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.labels, c.labels)
    # a raw uint32 key is accepted and draws the same task as the typed key of the same seed
    d = data.photo_task(24, size=SIZE, key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(a.images, d.images)


def test_photo_task_labels_balanced_and_shuffled():
    for n, k in ((64, 4), (18, 4), (7, 3)):
        photos = None if k == 4 else ("retina", "chelsea", "motorcycle")
        t = data.photo_task(n, size=8, photos=photos, key=jax.random.key(n))
        counts = np.bincount(np.asarray(t.labels), minlength=k)
        assert counts.sum() == n and len(counts) == k
        assert set(counts.tolist()) <= {n // k, n // k + 1}
    labels = np.asarray(task().labels)
    assert not np.array_equal(labels, np.sort(labels))  # shuffled, not in blocks


def test_photo_task_chosen_photos():
    t = data.photo_task(10, size=SIZE, photos=("motorcycle", "retina"), key=jax.random.key(0))
    assert t.classes == ("motorcycle", "retina")
    assert set(np.asarray(t.labels).tolist()) == {0, 1}
    # the label is the photo the crop comes from: retina is mostly dark red, motorcycle is not
    red = np.asarray(t.images[..., 0].mean((1, 2)) - t.images[..., 1:].mean((1, 2, 3)))
    labels = np.asarray(t.labels)
    assert red[labels == 1].min() > red[labels == 0].max()


def test_photo_task_crops_differ_from_the_whole_photos():
    t = task()
    thumbs = {name: np.asarray(data.load_photo(name, size=SIZE)) for name in t.classes}
    for im, y in zip(np.asarray(t.images), np.asarray(t.labels)):
        assert not np.array_equal(im, thumbs[t.classes[y]])
    flat = np.asarray(t.images).reshape(64, -1)
    dist = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert (dist[~np.eye(64, dtype=bool)] > 1e-4).all()  # all distinct


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(n=0), ValueError, "photo_task: n must be a positive integer"),
    (dict(n=-3), ValueError, "n must be"),
    (dict(n=2.0), ValueError, "n must be"),
    (dict(n=True), ValueError, "n must be"),
    (dict(size=0), ValueError, "photo_task: size must be"),
    (dict(photos=("astronaut",)), ValueError, "photos must name at least 2"),
    (dict(photos=()), ValueError, "photos must name at least 2"),
    (dict(photos=("astronaut", "chelsea", "astronaut")), ValueError, "photos must name at least 2 distinct"),
    (dict(photos=("astronaut", "lena")), ValueError, r"photo_task: photos has unknown name\(s\) \['lena'\].*astronaut"),
    (dict(photos="astronaut"), TypeError, "photo_task: photos must be a sequence of photo names"),
    (dict(key=None), TypeError, "photo_task: key must be a JAX PRNG key"),
    (dict(key=0), TypeError, "key must be"),
])
def test_photo_task_bad_input(kwargs, exc, match):
    args = dict(n=8, size=SIZE, key=jax.random.key(0)) | kwargs
    with pytest.raises(exc, match=match):
        data.photo_task(**args)


def test_photo_task_needs_a_key():
    with pytest.raises(TypeError, match="key"):
        data.photo_task(8, size=SIZE)  # noqa


# ------------------------------------------------------------------------------------------------------ train
@functools.cache
def trained(steps=(0, 20), seed=1, classes=4):
    t = task()
    labels = t.labels if classes > 1 else t.labels % 2
    return zoo.train(model(classes), (t.images, labels), steps=steps, key=jax.random.key(seed))


def test_train_checkpoints():
    ckpts = trained()
    assert [c.step for c in ckpts] == [0, 20]
    assert all(isinstance(c, zoo.Checkpoint) for c in ckpts)
    for c in ckpts:
        assert isinstance(c.model, jaxinv.Model) and c.model.name == model().name
        assert np.isfinite(c.loss) and 0.0 <= c.accuracy <= 1.0
        t = task()
        assert c.accuracy == zoo.accuracy(c.model, t.images, t.labels)
        assert jax.tree_util.tree_structure(c.model.params) == jax.tree_util.tree_structure(model().params)
    assert ckpts[1].loss < ckpts[0].loss  # training lowers the training loss
    assert not np.array_equal(leaves(ckpts[0].model)[0], leaves(ckpts[1].model)[0])


def test_step_zero_is_the_initial_model():
    m = model()
    before = leaves(m)
    ckpts = trained()
    assert_same_params(ckpts[0].model, m)
    for a, b in zip(before, leaves(m)):  # training does not touch the model it was given
        np.testing.assert_array_equal(a, b)
    # the step-0 loss is the task's mean cross-entropy at the initial parameters
    t = task()
    logits = m.apply_fn(m.params, t.images)
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t.labels[:, None], axis=1))
    np.testing.assert_allclose(ckpts[0].loss, float(ce), rtol=1e-5)


def test_train_reproducible_under_its_key():
    a, b = trained(), trained.__wrapped__()  # the second is a fresh run with the same key
    for x, y in zip(a, b):
        assert x.step == y.step and x.loss == y.loss and x.accuracy == y.accuracy
        assert_same_params(x.model, y.model)
    c = trained(seed=2)
    assert not np.array_equal(leaves(a[1].model)[0], leaves(c[1].model)[0])
    assert_same_params(a[0].model, c[0].model)  # step 0 does not depend on the key


def test_checkpoint_does_not_depend_on_the_other_steps():
    both = trained((0, 20))
    alone = trained((20,))
    three = trained((0, 7, 20))
    assert [c.step for c in alone] == [20] and [c.step for c in three] == [0, 7, 20]
    assert_same_params(both[1].model, alone[0].model)
    assert_same_params(both[1].model, three[2].model)
    assert both[1].loss == alone[0].loss == three[2].loss


def test_train_loss_keeps_decreasing():
    ckpts = trained((0, 10, 60))
    losses = [c.loss for c in ckpts]
    assert losses[2] < losses[1] < losses[0]
    assert ckpts[2].accuracy > 0.4  # 4 balanced classes: chance is 0.25


def test_train_one_output_logistic():
    ckpts = trained(classes=1)
    assert ckpts[0].model.num_outputs == 1
    assert ckpts[1].loss < ckpts[0].loss
    t = task()
    assert ckpts[1].accuracy == zoo.accuracy(ckpts[1].model, t.images, t.labels % 2)
    with pytest.raises(ValueError, match="out of range"):  # a one-output model takes labels 0/1
        zoo.train(model(1), t, steps=(1,), key=jax.random.key(0))


@pytest.mark.parametrize("shift", [4, -1])
def test_train_labels_out_of_range(shift):
    t = task()
    labels = t.labels.at[3].set(shift)
    with pytest.raises(ValueError, match=r"labels.*out of range.*\[0, 4\)"):
        zoo.train(model(), (t.images, labels), steps=(1,), key=jax.random.key(0))
    with pytest.raises(ValueError, match="out of range"):  # 4 photos, a 3-class model
        zoo.train(model(3), t, steps=(1,), key=jax.random.key(0))


def test_train_float_labels_and_mismatched_task():
    t = task()
    with pytest.raises(TypeError, match="integer"):
        zoo.train(model(), (t.images, t.labels.astype(jnp.float32)), steps=(1,), key=jax.random.key(0))
    with pytest.raises(ValueError, match="images.*labels"):
        zoo.train(model(), (t.images, t.labels[:10]), steps=(1,), key=jax.random.key(0))


@pytest.mark.parametrize("steps", [(), (20, 10), (10, 10), (-1, 5), (-1,)])
def test_train_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be distinct increasing integers >= 0"):
        zoo.train(model(), task(), steps=steps, key=jax.random.key(0))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lr=0.0), ValueError, "lr must be a positive number"),
    (dict(lr=-1e-3), ValueError, "lr must be"),
    (dict(lr=float("nan")), ValueError, "lr must be"),
    (dict(batch_size=0), ValueError, "train: batch_size must be a positive integer"),
    (dict(loss="mse"), ValueError, "loss='mse'"),
    (dict(loss="logistic"), ValueError, "logistic"),
    (dict(key=None), TypeError, "train: key must be a JAX PRNG key"),
])
def test_train_bad_arguments(kwargs, exc, match):
    args = dict(steps=(1,), key=jax.random.key(0)) | kwargs
    with pytest.raises(exc, match=match):
        zoo.train(model(), task(), **args)


def test_train_needs_a_key():
    with pytest.raises(TypeError, match="key"):
        zoo.train(model(), task(), steps=(1,))  # noqa


def test_train_float64(x64):
    module, v32 = zoo.build("cnn2_c2", key=jax.random.key(0), input_shape=(SIZE, SIZE, 3))
    v64 = jax.tree.map(lambda a: a.astype(jnp.float64), v32)
    m64 = jaxinv.from_linen(module, v64, input_shape=(SIZE, SIZE, 3))
    m32 = jaxinv.from_linen(module, v32, input_shape=(SIZE, SIZE, 3))
    t = task()  # float32 images: train casts them to the model's dtype
    c64 = zoo.train(m64, t, steps=(0, 15), key=jax.random.key(1))
    c32 = zoo.train(m32, t, steps=(0, 15), key=jax.random.key(1))
    assert all(a.dtype == jnp.float64 for c in c64 for a in leaves(c.model))
    assert all(a.dtype == jnp.float32 for c in c32 for a in leaves(c.model))
    assert c64[1].loss < c64[0].loss
    np.testing.assert_allclose(c64[0].loss, c32[0].loss, rtol=1e-5)
    np.testing.assert_allclose(c64[1].loss, c32[1].loss, rtol=1e-3)
    for a, b in zip(leaves(c64[1].model), leaves(c32[1].model)):  # same batches, same steps, rounding apart
        np.testing.assert_allclose(a, b, atol=1e-4)
    again = zoo.train(m64, t, steps=(15,), key=jax.random.key(1))
    assert_same_params(again[0].model, c64[1].model)


def test_trained_checkpoint_is_attackable():
    """A checkpoint is a Model like any other: its gradient is inverted by copa and scored by security."""
    ckpt = trained()[1]
    x = data.load_photo("retina", size=SIZE)[None]
    g = jaxinv.client_gradient(ckpt.model, x, jnp.array([0]))
    rec = jaxinv.copa(ckpt.model, g, label=0)
    assert rec.image.shape == x.shape and bool(jnp.all(jnp.isfinite(rec.image)))


def test_same_key_same_task_and_checkpoints_with_x64_on(x64):
    jax.config.update("jax_enable_x64", False)
    t32 = data.photo_task(16, size=8, key=jax.random.key(0))
    c32 = zoo.train(model(), task(), steps=(5,), key=jax.random.key(1))[0]
    jax.config.update("jax_enable_x64", True)  # the fixture restores the previous setting
    t64 = data.photo_task(16, size=8, key=jax.random.key(0))
    c64 = zoo.train(model(), task(), steps=(5,), key=jax.random.key(1))[0]
    np.testing.assert_array_equal(t32.labels, t64.labels)
    np.testing.assert_array_equal(t32.images, t64.images)
    # the same batches (int32 draws); Adam's scalars may round differently with x64 on: equal to float32 precision
    for x, y in zip(leaves(c32.model), leaves(c64.model)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
