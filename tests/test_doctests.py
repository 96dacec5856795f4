"""The docstrings' ``Example:`` sections run as doctests, one test per docstring, in a shared namespace.

Every module of the package is searched (``doctest.DocTestFinder``); each example runs in its module's globals plus
:func:`namespace` (what the examples assume: ``jaxinv``, ``jax``, ``jnp``, ``np``, a tiny ``model`` that COPA inverts
exactly, real photos ``images`` / ``x`` with labels ``labels`` / ``y``, and ``grads``, the gradient of ``x``),
inside a temporary working directory (examples that save files write there). An example either shows the value of
an expression or asserts a property of it (``>>> float(psnr) > 60`` then ``True``); one that cannot run fast uses
the tiny model, or says so with ``# doctest: +SKIP``.
"""

import copy
import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import zoo_model

import jaxinv

#: Modules whose examples are not fixed yet (their owners are finishing them): collected, reported as skipped.
#: Empty this tuple to run them (a prefix covers a package's modules).
PENDING: tuple[str, ...] = ()

#: Modules that need an optional dependency: skipped when it is not installed.
NEEDS = {"jaxinv.flower": "flwr"}

#: Modules not searched: importing ``jaxinv.__main__`` runs the CLI.
NOT_SEARCHED = ("jaxinv.__main__",)

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    names = ["jaxinv"] + [m.name for m in pkgutil.walk_packages(jaxinv.__path__, "jaxinv.")]
    return sorted(n for n in names if n not in NOT_SEARCHED)


def _cases() -> list:
    """One ``pytest.param`` per docstring with examples (a module that cannot be imported: one skipped param)."""
    finder = doctest.DocTestFinder()
    cases = []
    for name in _module_names():
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            if name not in NEEDS:
                raise
            cases.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=f"{name} needs {NEEDS[name]}: {e}")))
            continue
        pending = name.startswith(PENDING)
        for test in sorted((t for t in finder.find(module) if t.examples), key=lambda t: t.name):
            marks = [pytest.mark.skip(reason=f"{name}: examples pending (test_doctests.PENDING)")] if pending else []
            cases.append(pytest.param(test, id=test.name, marks=marks))
    return cases


@pytest.fixture(scope="module")
def namespace() -> dict:
    """What the examples assume besides their module's globals (built once for all of them).

    ``model``: zoo ``cnn2_c1`` at 16x16 (a 6-channel 3x3 conv and a dense head of 10: every layer determined, so
    COPA inverts it exactly); ``images``: 4 bundled photos ``(4, 16, 16, 3)`` in ``[0, 1]``, ``labels`` theirs
    (``[3, 1, 7, 1]``); ``x``, ``y``: the first image and label (a batch of one); ``grads``: the client's gradient
    of ``(x, y)``.
    """
    model = zoo_model("cnn2_c1", (16, 16, 3))
    images = jaxinv.data.sample_images(4, size=16, key=jax.random.key(1))
    labels = jnp.array([3, 1, 7, 1])
    x, y = images[:1], labels[:1]
    grads = jaxinv.client_gradient(model, x, y)
    return {"jax": jax, "jnp": jnp, "np": np, "jaxinv": jaxinv, "model": model, "images": images,
            "labels": labels, "x": x, "y": y, "grads": grads}


@pytest.mark.parametrize("test", _cases())
def test_docstring_examples(test, namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    test = copy.copy(test)
    test.globs = {**test.globs, **namespace}
    report = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=report.append, clear_globs=False)
    assert result.failed == 0, "\n".join(report)


def test_every_module_is_searched():
    """A module added to the package is searched (the list is read from the package, not written down)."""
    names = _module_names()
    assert {"jaxinv", "jaxinv.engine._copa", "jaxinv.zoo", "jaxinv._audit._audit"} <= set(names)
    assert not set(names) & set(NOT_SEARCHED)
