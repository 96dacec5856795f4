import jax
import numpy as np
import pytest
from skimage import data, transform


@pytest.fixture
def x64():
    """Run a test in float64 (restores the previous setting)."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def photo(name="astronaut", size=16):
    """A real photo thumbnail in [0, 1], shape (1, size, size, 3), float32."""
    img = getattr(data, name)()
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return transform.resize(img, (size, size), anti_aliasing=True).astype(np.float32)[None]


def psnr(a, b):
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-30))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` first (stable order otherwise): with ``pytest -n 2`` the long ones start early and the
    short ones fill the gaps, instead of one worker finishing a notebook alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
