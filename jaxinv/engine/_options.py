r"""``Solver``: the per-layer least-squares solver's options, validated once (the one place for tolerances)."""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp

from .._checks import merge_options, no_more_keywords, positive_int
from .._client import Client
from .._priors import check_box

BATCHING = ("auto", "vmap", "map")


class Solver(eqx.Module):
    r"""Options of the layer solve shared by every layer-wise attack (static: a change recompiles).

    Each layer's input :math:`x` solves :math:`\min_x \|w_f(A x - (z - c))\|^2 + \|w_g(B(x;\delta) - g_W)\|^2` by
    LSMR, the two blocks scaled by the inverse of their operator norms (then by ``forward_weight`` and
    ``gradient_weight``).

    Attributes:
        rtol, atol: LSMR tolerances (default: 1e-8 in float32, 1e-13 in float64).
        max_steps: LSMR iteration cap per layer.
        forward_weight, gradient_weight: extra weights on the two blocks after norm balancing (0 drops a block:
            ``gradient_weight=0`` is the forward-only inversion, ``forward_weight=0`` the gradient-only one).
        fedavg_iters: fixed-point iterations when the shared object is a multi-step FedAvg update
            (:class:`jaxinv.Client` with ``local_steps > 1``).
        correct: run the noise-aware joint correction of the bottom layers where their least-squares answer does
            not match its data (:mod:`jaxinv.engine._joint`): trained layers amplify the gradient's own rounding;
            and, below a layer with fewer rows than unknowns, the joint solve for the image nearest the flat one;
            ``False``: the raw least-squares answer.
        fallback: with ``correct``, also return the flat image of the answer's mean colour (status ``fallback``)
            where the whole gradient is grossly off and not clearly closer than that flat image's, under a
            consistent head (:func:`jaxinv.engine.finish`); ``False``: the answer as it is.
        correct_depth: how many bottom layers (image layer first) the correction solves jointly for the image.
        correct_iters: Levenberg-Marquardt iterations of the correction, per start.
        box: the model's input range ``(lo, hi)`` (``(0, 1)`` for :mod:`jaxinv.zoo` models): the reconstruction
            is projected onto it (which only moves it toward any input inside), the correction projects onto it
            and its flat image is the fallback; ``None``: unbounded (the raw least-squares image).

    Example:
        >>> Solver(max_steps=500).tolerances(jnp.float32)
        (1e-08, 1e-08)
    """

    rtol: float | None = None
    atol: float | None = None
    max_steps: int = 2000
    forward_weight: float = 1.0
    gradient_weight: float = 1.0
    fedavg_iters: int = 30
    correct: bool = True
    fallback: bool = True
    correct_depth: int = 2
    correct_iters: int = 30
    box: tuple[float, float] | None = eqx.field(default=(0.0, 1.0), converter=lambda b: check_box(b, "Solver"))

    def __check_init__(self):
        positive_int(self.correct_depth, "correct_depth", "Solver", what="bottom layers solved jointly")
        positive_int(self.correct_iters, "correct_iters", "Solver", what="Levenberg-Marquardt iterations")
        for name in ("correct", "fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Solver: {name} must be True or False, got {getattr(self, name)!r}")

        positive_int(self.max_steps, "max_steps", "Solver", what="LSMR iterations per layer")
        positive_int(self.fedavg_iters, "fedavg_iters", "Solver", what="FedAvg fixed-point iterations")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"Solver: {name} must be a positive number or None (the dtype's default), got {v!r}")
        for name in ("forward_weight", "gradient_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"Solver: {name} must be a finite number >= 0, got {v!r}")

    def tolerances(self, dtype) -> tuple[float, float]:
        """``(rtol, atol)`` for data of ``dtype``.

        LSMR keeps reducing its residual estimates below the dtype's epsilon: 1e-8 in float32 gains 30-60 dB over
        1e-6 on deep determined models (cnn6: 32 -> 91 dB) for ~1.5x the iterations."""
        base = 1e-13 if jnp.dtype(dtype) == jnp.float64 else 1e-8
        return (self.rtol if self.rtol is not None else base, self.atol if self.atol is not None else base)


CopaOptions = Solver  # the earlier name


def batching_mode(batching: str) -> str:
    """``"vmap"`` or ``"map"`` from the user's ``batching`` (``"auto"`` is ``"vmap"``)."""
    if batching not in BATCHING:
        raise ValueError(f"batching must be 'auto', 'vmap' or 'map', got {batching!r}")
    return "vmap" if batching == "auto" else batching


RENAMED: dict[str, str] = {"pullback": "refine"}
"""Earlier names of the layer-wise attacks' parameters, ``{old: new}`` (the attack registry reads it too)."""


def renamed_refine(where: str, refine: Any, legacy: dict[str, Any]) -> Any:
    """``refine``, or the value of its earlier name ``pullback`` when that was given instead (consumed)."""
    if "pullback" not in legacy:
        return refine
    value = legacy.pop("pullback")
    if refine is not False and refine is not value:
        raise TypeError(f"{where}: pullback (the earlier name) and refine given together: pass refine only")
    return value


def layerwise_options(where: str, client: Client | None, solver: Solver | None, refine: Any,
                      legacy: dict[str, Any]) -> tuple[Client, Solver, Any]:
    """The one place where the layer-wise attacks' earlier flat keywords map onto their option objects.

    ``loss``, ``batch_size``, ``local_steps``, ``local_lr`` go to the :class:`jaxinv.Client`; ``max_steps``,
    ``rtol``, ``atol``, ``forward_weight``, ``gradient_weight``, ``fedavg_iters`` to the :class:`Solver`;
    ``pullback`` is ``refine``. Anything else is a ``TypeError`` naming it. ``legacy`` is consumed.

    Example:
        >>> c, s, r = layerwise_options("copa", None, None, False, {"max_steps": 50, "loss": "logistic"})
        >>> (c.loss, s.max_steps, r)
        ('logistic', 50, False)
    """
    refine = renamed_refine(where, refine, legacy)
    client = merge_options(client, Client, legacy, where)
    solver = merge_options(solver, Solver, legacy, where)
    no_more_keywords(legacy, where, "label, input_shape, client (jaxinv.Client), solver (jaxinv.engine.Solver), "
                     "refine, batching, key")
    return client, solver, refine
