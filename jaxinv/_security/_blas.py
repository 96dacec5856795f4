"""OpenBLAS thread control for the metric's many small LAPACK calls (the floor of :mod:`jaxinv._security`: used by
the entry, :func:`jaxinv.security`, around the per-layer rank certificates)."""

from __future__ import annotations

import contextlib
import ctypes

_BLAS: list | None = None


def _blas_handles() -> list:
    """``(get, set)`` thread-count functions of the OpenBLAS copies loaded by NumPy and SciPy (empty if none)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = []
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
        except OSError:  # pragma: no cover - not Linux
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:  # pragma: no cover
                continue
            for get, put in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                             ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                             ("openblas_get_num_threads", "openblas_set_num_threads")):
                if hasattr(lib, get) and hasattr(lib, put):
                    _BLAS.append((getattr(lib, get), getattr(lib, put)))
                    break
    return _BLAS


@contextlib.contextmanager
def single_threaded_blas():
    """Run the (small, many) LAPACK calls of the analysis on one OpenBLAS thread: on a 2-core machine OpenBLAS's
    spinning threads cost far more than they gain here (a banded Cholesky: 0.02 s on one thread, up to 2 s on two).
    A no-op when the OpenBLAS thread controls cannot be found."""
    handles = _blas_handles()
    old = []
    for get, put in handles:
        try:
            old.append(int(get()))
            put(1)
        except Exception:  # pragma: no cover
            old.append(None)
    try:
        yield
    finally:
        for (get, put), o in zip(handles, old):
            if o is not None:
                put(o)
