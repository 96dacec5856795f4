r"""Image priors shared by the attacks and the engine's refinement: total variation and the input box.

Floor: a leaf (``jax`` only), below the engine (:mod:`jaxinv.engine`, its pull-back refinement) and the attacks
(:mod:`jaxinv.attacks`), which both import the one implementation from here.

* :func:`total_variation`: :math:`\mathrm{TV}(x) = \sum_{a} \operatorname{mean}|x_{i+1_a} - x_i|` over the
  spatial axes (Geiping et al. 2020);
* :func:`project_box` / :func:`box_projection`: the Euclidean projection onto :math:`[lo, hi]^n` (clipping), either
  end possibly infinite, ``None`` no constraint;
* :func:`check_box`: the eager validation of a ``box=(lo, hi)`` argument.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable

import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["box_projection", "check_box", "project_box", "total_variation"]


def total_variation(x: Float[Array, "B *shape"]) -> Float[Array, ""]:
    r"""Anisotropic total variation, mean absolute difference of neighbours along each spatial axis:

    .. math:: \mathrm{TV}(x) = \sum_{a \in \text{spatial}} \operatorname{mean} |x_{\cdot, i+1_a} - x_{\cdot, i}|

    For NHWC images the spatial axes are H and W (Geiping et al.: ``mean|dx| + mean|dy|``). Inputs without spatial
    axes (``(B, D)``, dense models) have no neighbours: TV is 0.

    Args:
        x: a batch, batch axis first and channels last.

    Returns:
        The scalar TV.

    Example:
        >>> float(total_variation(jnp.zeros((1, 2, 2, 1)).at[0, 0, 0, 0].set(1.0)))
        1.0
    """
    total = jnp.zeros((), x.dtype)
    for axis in range(1, x.ndim - 1):
        if x.shape[axis] > 1:
            total = total + jnp.mean(jnp.abs(jnp.diff(x, axis=axis)))
    return total


def project_box(x: Array, box: tuple[float, float] | None) -> Array:
    r"""Euclidean projection onto the box :math:`[lo, hi]^n` (clipping); an infinite end is no bound there and
    ``None`` is no constraint.

    Example:
        >>> project_box(jnp.array([-1.0, 0.5, 2.0]), (0.0, 1.0)).tolist()
        [0.0, 0.5, 1.0]
        >>> project_box(jnp.array([-1.0, 2.0]), (0.0, math.inf)).tolist()
        [0.0, 2.0]
    """
    if box is None:
        return x
    lo, hi = box
    return jnp.clip(x, _bound(lo), _bound(hi))


def _bound(b: Any) -> Any:
    """One end of a box for ``jnp.clip``: ``None`` (no bound) when it is an infinite number."""
    return None if isinstance(b, numbers.Real) and not math.isfinite(b) else b


def box_projection(box: tuple[float, float] | None) -> Callable[[Array], Array]:
    """:func:`project_box` onto ``box`` as a function of ``x`` alone (for the refinement's projected steps)."""
    return functools.partial(project_box, box=box)


def check_box(box: Any, where: str) -> tuple[float, float] | None:
    """``box`` as a pair of floats ``(lo, hi)`` with ``lo < hi`` (either end may be infinite), or ``None``.

    Raises:
        TypeError: ``box`` is not a pair of numbers.
        ValueError: ``lo >= hi`` or a NaN end.

    Example:
        >>> check_box([0, 1], "ig")
        (0.0, 1.0)
        >>> check_box((1.0, 0.0), "ig")
        Traceback (most recent call last):
        ...
        ValueError: ig: box=(lo, hi) needs lo < hi, got (1.0, 0.0)
    """
    if box is None:
        return None
    try:
        if isinstance(box, (str, bytes)) or any(isinstance(b, (str, bytes)) for b in box):
            raise TypeError
        lo, hi = (float(b) for b in box)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: box must be a pair (lo, hi) of floats or None, got {box!r}") from None
    if not lo < hi:
        raise ValueError(f"{where}: box=(lo, hi) needs lo < hi, got {box!r}")
    return (lo, hi)
