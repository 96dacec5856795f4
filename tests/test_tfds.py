"""jaxinv.data.load_tfds through tensorflow_datasets' real readers, offline.

* A tiny dataset is prepared in a temporary ``data_dir`` by a real tfds builder (array_record files, no
  TensorFlow needed) and read back by name, as a user reads a dataset prepared earlier: exact pixels, labels,
  order, slicing, ``download=False``.
* ``tfds.testing.mock_data`` stands in for CIFAR-10 and MNIST (their real metadata, fake examples, no network).
* With TensorFlow installed, the same dataset prepared as tfrecord files goes through ``tfds.load``.

tensorflow_datasets is in the ``test`` extra; TensorFlow is not (see README), so the tfrecord test skips without it.
"""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinv import data

tfds = pytest.importorskip("tensorflow_datasets")

H, W = 8, 8  # stored image size; tests read at size=8 (no resize) to compare pixels exactly
N_TRAIN, N_TEST, N_CLASSES = 7, 3, 3


def pixels(i: int, channels: int = 3) -> np.ndarray:
    """The stored uint8 image of example i < 24 (pixel (0, 0, 0) is 11 * i, so it names the example)."""
    y, x, c = np.meshgrid(np.arange(H), np.arange(W), np.arange(channels), indexing="ij")
    return ((11 * i + 7 * y + 3 * x + 50 * c) % 256).astype(np.uint8)


def index_of(image: np.ndarray) -> int:
    """Which example an image in [0, 1] is, from its first pixel."""
    return int(round(float(image[0, 0, 0]) * 255)) // 11


def make_builder(name: str, channels: int):
    class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(H, W, channels), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=N_CLASSES),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, N_TRAIN), "test": self._generate_examples(20, N_TEST)}

        def _generate_examples(self, start, count):
            for i in range(start, start + count):
                yield i, {"image": pixels(i, channels), "label": i % N_CLASSES}

    Tiny.name = name
    return Tiny


def prepare(data_dir, name="jaxinv_tiny", channels=3, file_format="array_record"):
    builder = make_builder(name, channels)(data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("tfds"))


def check_examples(x, y, expected_count):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == (expected_count, H, W, 3) and x.dtype == np.float32 and y.dtype == np.int32
    ids = [index_of(im) for im in x]
    assert len(set(ids)) == expected_count  # distinct stored examples
    for im, label, i in zip(x, y, ids):
        np.testing.assert_allclose(im, pixels(i) / 255.0, atol=1e-6)  # exact pixels, scaled to [0, 1]
        assert label == i % N_CLASSES  # each image with its own label
    return ids


def test_prepared_dataset_is_read_offline(tiny_dir):
    x, y = data.load_tfds("jaxinv_tiny", "train", 5, size=H, data_dir=tiny_dir, download=False)
    ids = check_examples(x, y, 5)
    assert set(ids) <= set(range(N_TRAIN))
    x_all, y_all = data.load_tfds("jaxinv_tiny", "train", N_TRAIN, size=H, data_dir=str(tiny_dir), download=False)
    assert sorted(check_examples(x_all, y_all, N_TRAIN)) == list(range(N_TRAIN))
    # the first n are the first n of the stored order, call after call
    np.testing.assert_array_equal(x_all[:5], x)
    np.testing.assert_array_equal(y_all[:5], y)
    # a split expression: its first n
    x_mid, _ = data.load_tfds("jaxinv_tiny", "train[2:6]", 3, size=H, data_dir=tiny_dir, download=False)
    np.testing.assert_array_equal(x_mid, x_all[2:5])
    x_test, y_test = data.load_tfds("jaxinv_tiny", "test", N_TEST, size=H, data_dir=tiny_dir, download=False)
    assert sorted(check_examples(x_test, y_test, N_TEST)) == list(range(20, 20 + N_TEST))


def test_resize_and_range(tiny_dir):
    x, y = data.load_tfds("jaxinv_tiny", "train", 2, size=5, data_dir=tiny_dir, download=False)
    assert x.shape == (2, 5, 5, 3) and x.dtype == jnp.float32 and y.shape == (2,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    full, _ = data.load_tfds("jaxinv_tiny", "train", 2, size=H, data_dir=tiny_dir, download=False)
    np.testing.assert_allclose(x.mean(axis=(1, 2)), full.mean(axis=(1, 2)), atol=0.02)  # same content, smaller


def test_grey_dataset_rgb_or_native(tmp_path):
    prepare(tmp_path, name="jaxinv_tiny_grey", channels=1)
    x, _ = data.load_tfds("jaxinv_tiny_grey", "train", 3, size=H, data_dir=tmp_path, download=False)
    assert x.shape == (3, H, W, 3)
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey repeated
    g, _ = data.load_tfds("jaxinv_tiny_grey", "train", 3, size=H, data_dir=tmp_path, download=False, rgb=False)
    assert g.shape == (3, H, W, 1)
    np.testing.assert_array_equal(g[..., 0], x[..., 0])


def test_errors(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"holds only 7 examples; pass n <= 7"):
        data.load_tfds("jaxinv_tiny", "train", 8, size=H, data_dir=tiny_dir, download=False)
    with pytest.raises(FileNotFoundError, match="not prepared .*download=False"):
        data.load_tfds("mnist", "test", 2, data_dir=tmp_path, download=False)
    with pytest.raises(ValueError, match="n must be"):
        data.load_tfds("jaxinv_tiny", "train", 0, data_dir=tiny_dir, download=False)


@pytest.mark.parametrize("name, channels", [("cifar10", 3), ("mnist", 1)])
def test_mock_data_named_datasets(name, channels):
    with tfds.testing.mock_data(num_examples=12):
        x, y = data.load_tfds(name, "test", 6, size=16)
        x2, y2 = data.load_tfds(name, "test", 6, size=16)
        native, _ = data.load_tfds(name, "test", 6, size=16, rgb=False)
    assert x.shape == (6, 16, 16, 3) and x.dtype == jnp.float32
    assert y.shape == (6,) and y.dtype == jnp.int32 and 0 <= int(y.min()) and int(y.max()) < 10
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05  # not blank
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert native.shape == (6, 16, 16, channels)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow not installed")
def test_tfrecord_dataset_through_tfds_load(tmp_path):
    prepare(tmp_path, name="jaxinv_tiny_tfrecord", file_format="tfrecord")
    x, y = data.load_tfds("jaxinv_tiny_tfrecord", "train", N_TRAIN, size=H, data_dir=tmp_path, download=False)
    assert sorted(check_examples(x, y, N_TRAIN)) == list(range(N_TRAIN))
    x3, _ = data.load_tfds("jaxinv_tiny_tfrecord", "train", 3, size=H, data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(x3, x[:3])


def test_tfrecord_dataset_without_tensorflow(tmp_path, monkeypatch):
    """A tfrecord-only dataset and no TensorFlow: an ImportError that says what to install."""
    prepared = tmp_path / "jaxinv_tiny_fake" / "1.0.0"
    prepare(tmp_path, name="jaxinv_tiny_fake", file_format="array_record")
    # Relabel the prepared files as tfrecord: only the declared format matters for the choice of reader.
    info = prepared / "dataset_info.json"
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    for f in prepared.glob("*.array_record-*"):
        f.rename(f.with_name(f.name.replace(".array_record-", ".tfrecord-")))
    monkeypatch.setattr(data, "_tensorflow_installed", lambda: False)
    with pytest.raises(ImportError, match="tfrecord files, which only TensorFlow reads; pip install tensorflow-cpu"):
        data.load_tfds("jaxinv_tiny_fake", "train", 2, data_dir=tmp_path, download=False)
