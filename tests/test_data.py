"""Tests of jaxinv.data: bundled photos, folders, the tfds import error."""

import builtins
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.io

from jaxinv import data

PHOTOS = data.photo_names()


def neighbour_correlation(images):
    """Mean correlation of horizontally and vertically adjacent pixels, per image."""
    out = []
    for im in np.asarray(images, np.float64):
        h = np.corrcoef(im[:, :-1].ravel(), im[:, 1:].ravel())[0, 1]
        v = np.corrcoef(im[:-1].ravel(), im[1:].ravel())[0, 1]
        out.append((h + v) / 2)
    return np.array(out)


def test_photo_names():
    assert len(PHOTOS) >= 8
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(PHOTOS)


@pytest.mark.parametrize("name", PHOTOS)
def test_load_photo(name):
    x = data.load_photo(name)
    assert isinstance(x, jax.Array)
    assert x.shape == (32, 32, 3) and x.dtype == jnp.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x.std()) > 0.02  # not blank


def test_load_photo_size_and_errors():
    assert data.load_photo("chelsea", size=20).shape == (20, 20, 3)
    with pytest.raises(ValueError, match="astronaut"):  # lists the names
        data.load_photo("lena")
    with pytest.raises(ValueError, match="size"):
        data.load_photo("chelsea", size=0)


def test_sample_images_real_content():
    x = data.sample_images(16, key=jax.random.key(0))
    assert x.shape == (16, 32, 32, 3) and x.dtype == jnp.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert neighbour_correlation(x).mean() > 0.8  # photos, not noise (noise gives ~0)


def test_sample_images_deterministic_and_key_dependent():
    a = data.sample_images(12, key=jax.random.key(3))
    b = data.sample_images(12, key=jax.random.key(3))
    c = data.sample_images(12, key=jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[8:], c[8:])  # crops differ too
    # legacy uint32 keys work as well
    np.testing.assert_array_equal(
        data.sample_images(3, key=jax.random.PRNGKey(0)),
        data.sample_images(3, key=jax.random.PRNGKey(0)),
    )


def test_sample_images_first_are_distinct_whole_photos():
    x = np.asarray(data.sample_images(len(PHOTOS) + 4, key=jax.random.key(1)))
    thumbs = {name: np.asarray(data.load_photo(name)) for name in PHOTOS}
    first = x[: len(PHOTOS)]
    matched = [n for im in first for n, t in thumbs.items() if np.array_equal(im, t)]
    assert sorted(matched) == sorted(PHOTOS)  # each photo exactly once
    flat = x.reshape(len(x), -1)
    dist = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert (dist[~np.eye(len(x), dtype=bool)] > 1e-3).all()  # all distinct, crops included
    order2 = np.asarray(data.sample_images(len(PHOTOS), key=jax.random.key(2)))
    assert not np.array_equal(first, order2)  # key-dependent order


def test_sample_images_small_n_and_size():
    assert data.sample_images(1, size=16, key=jax.random.key(0)).shape == (1, 16, 16, 3)


def test_sample_images_errors():
    with pytest.raises(ValueError, match="n must be"):
        data.sample_images(0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="jax.random.key"):
        data.sample_images(4, key=0)


def _write_pngs(folder, names):
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        shape = (40, 24 + 8 * i, 3) if i != 1 else (30, 30)  # non-square, one greyscale
        skimage.io.imsave(
            folder / name, rng.integers(0, 256, shape, dtype=np.uint8), check_contrast=False
        )


def test_load_folder(tmp_path):
    _write_pngs(tmp_path, ["b.png", "a.png", "c.PNG"])
    (tmp_path / "notes.txt").write_text("not an image")
    x = data.load_folder(tmp_path, size=16)
    assert x.shape == (3, 16, 16, 3) and x.dtype == jnp.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # sorted by name: a.png (the greyscale one) comes first
    a = np.asarray(x[0])
    np.testing.assert_allclose(a[..., 0], a[..., 1])
    y = data.load_folder(str(tmp_path), size=30, n=1)
    assert y.shape == (1, 30, 30, 3)
    gray = skimage.io.imread(tmp_path / "a.png") / 255.0
    np.testing.assert_allclose(y[0, ..., 0], gray, atol=1e-6)  # already 30 x 30: no resize


def test_load_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_folder(missing)
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg images in .*" + tmp_path.name):
        data.load_folder(tmp_path)
    _write_pngs(tmp_path, ["a.png"])
    with pytest.raises(NotADirectoryError, match="a.png"):
        data.load_folder(tmp_path / "a.png")
    with pytest.raises(ValueError, match="holds only 1 images"):
        data.load_folder(tmp_path, n=2)


def test_load_tfds_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install 'jaxinv\[tfds\]'"):
        data.load_tfds("cifar10")


def test_load_tfds_missing_dependency_via_import(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("tensorflow_datasets"):
            raise ModuleNotFoundError("No module named 'tensorflow_datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tensorflow_datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="tensorflow_datasets") as err:
        data.load_tfds("mnist", n=2)
    assert isinstance(err.value.__cause__, ModuleNotFoundError)
