r"""The fold from the output down, shared by every layer-wise attack (copa, rgap, hybrid, batch, segmentation).

The recursion runs over the layers from the head to the image; layers differ in shape, so it is a Python ``reduce``
over jit-compiled steps (each attack passes its own step) rather than ``lax.scan``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._model import Structure
from .._result import LayerReport


def is_traced(*trees) -> bool:
    """Whether any leaf of ``trees`` is a tracer (the attack runs under an outer ``jit``/``vmap``)."""
    return any(isinstance(l, jax.core.Tracer) for t in trees for l in jax.tree_util.tree_leaves(t))


def map_targets(fn: Callable, in_axes: tuple, *args, **static):
    """``fn(*args, **static)`` for every target: arguments with ``in_axes`` 0 are sliced along their leading axis and
    the results stacked, by ``lax.map`` (a compiled loop, one target at a time)."""
    batched = tuple(a for a, ax in zip(args, in_axes) if ax == 0)

    def one(b):
        it = iter(b)
        return fn(*(next(it) if ax == 0 else a for a, ax in zip(args, in_axes)), **static)

    return jax.lax.map(one, batched)


map_jit = eqx.filter_jit(map_targets)


def timed(traced: bool, fn, *args):
    """``(fn(*args), wall seconds)``; NaN seconds under a trace (nothing to wait for)."""
    t0 = time.perf_counter()
    out = fn(*args)
    if traced:
        return out, jnp.nan
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


class Fold(NamedTuple):
    """What :func:`fold_down` returns."""

    x: Array
    """The image layer's input :math:`x_0` (the reconstruction, flat per target)."""
    reports: tuple[LayerReport, ...]
    """Per-layer reports, input layer first, each stamped with its wall seconds."""
    layer_inputs: tuple[Array, ...]
    """Every layer's reconstructed input shaped ``(B, *in_shape)``, input layer first."""
    aux: tuple[Any, ...]
    """What each step returned besides its carry and report (e.g. the hybrid's loss traces), top layer first."""


def stamp_seconds(rep: LayerReport, seconds) -> LayerReport:
    """``rep`` with its ``seconds`` set (broadcast over stacked targets)."""
    return eqx.tree_at(lambda r: r.seconds, rep, jnp.full(rep.seconds.shape, seconds, jnp.float32))


def as_fold_step(step: Callable) -> Callable:
    """A step ``(gleaves, x_l, dl/dx_l) -> (x_{l-1}, dl/dx_{l-1}, report)`` in the fold's form
    ``(gleaves, *carry) -> (carry, report, aux)`` (no aux)."""

    def run(gleaves, x, gx):
        x, gx, rep = step(gleaves, x, gx)
        return (x, gx), rep, None

    return run


def fold_down(structure: Structure, down: Sequence[Callable], gleaves, carry: tuple, head_rep: LayerReport,
              head_seconds, B: int, *, traced: bool = False) -> Fold:
    r"""The recursion below the head: a fold over the layers from the output down to the image.

    ``down[l]`` maps ``(gleaves, *carry_l)`` to ``(carry_{l-1}, report, aux)``, where ``carry[0]`` is the layer's
    output :math:`x_l` (then its input :math:`x_{l-1}`) and the rest is whatever the attack carries down
    (:math:`\partial\ell/\partial x_l`; the hybrid adds whether every layer above was exact); ``carry`` comes from
    the head. Each step is timed (NaN seconds when ``traced``)."""
    reports, inputs, aux = [stamp_seconds(head_rep, head_seconds)], [carry[0]], []
    for l in reversed(range(len(structure.stages) - 1)):
        (carry, rep, a), sec = timed(traced, down[l], gleaves, *carry)
        reports.append(stamp_seconds(rep, sec))
        inputs.append(carry[0])
        aux.append(a)
    layer_inputs = tuple(v.reshape((B,) + tuple(st.nodes.x_in.shape[1:]))
                         for v, st in zip(reversed(inputs), structure.stages))
    return Fold(carry[0], tuple(reversed(reports)), layer_inputs, tuple(aux))
