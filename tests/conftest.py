"""Fixtures and collection order. Shared factories and helpers (tiny models, photos, PSNR) live in helpers.py."""

import jax
import pytest

@pytest.fixture
def x64():
    """Run a test in float64 (restores the previous setting)."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)

def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` first (stable order otherwise): with ``pytest -n 2`` the long ones start early and the
    short ones fill the gaps, instead of one worker finishing a notebook alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
