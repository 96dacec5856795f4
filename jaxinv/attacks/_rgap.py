r"""R-GAP (Zhu & Blaschko, "R-GAP: Recursive Gradient Attack on Privacy", ICLR 2021) on the COPA engine.

R-GAP inverts the gradient layer by layer from the output down. For layer :math:`l`, knowing :math:`x_l` and
:math:`\partial\ell/\partial x_l`, it stacks

* the **forward constraint** :math:`W_l x_{l-1} = z_l = s_l^{-1}(x_l)` and
* the **gradient constraint** :math:`\delta_l\, x_{l-1}^\top = g_{W_l}` (for convolutions, the correlation of
  :math:`x_{l-1}` with :math:`\delta_l`), :math:`\delta_l = \partial\ell/\partial x_l \odot s_l'(z_l)`,

and solves them for :math:`x_{l-1}` in least squares (the minimum-norm solution of ``lstsq``). The head has no bias
in R-GAP's networks: with one logistic output :math:`u = w^\top x_{L-1}`, :math:`g_W = \ell'(u)\, x_{L-1}` and
:math:`w^\top g_W = u\,\ell'(u)`, a scalar equation for :math:`u` given the label; then
:math:`x_{L-1} = g_W / \ell'(u)` (the "head trick").

This is exactly the recursion of :func:`jaxinv.copa` (which also implements R-GAP's scalar head trick for bias-free
heads), so :func:`rgap` is a thin call of it with R-GAP's naming and defaults. Documented differences from the
published code:

* R-GAP's networks (CNN6, CNN6-d, FCN3 in :mod:`jaxinv.zoo`) have no biases and leaky-ReLU(0.2) activations
  (invertible). Here any supported network is accepted (biases, tanh, sigmoid, ...; ReLU via its active set).
* R-GAP forms each layer's stacked matrix and calls a dense min-norm ``lstsq``. The engine solves the same system
  matrix-free with LSMR started at zero, which converges to the same minimum-norm least-squares solution (up to
  ``rtol``/``atol``), without forming the matrix.
* R-GAP stacks the raw rows; the engine scales the forward and gradient blocks by the inverse of their operator
  norms (a change of row weights: the same solution when the system is consistent, a better-balanced one when it
  is not). Block weights are R-GAP's equal ones (``forward_weight = gradient_weight = 1``).
* R-GAP assumes the label is known; here ``label=None`` reads it from the head's gradient when that is possible
  (not for a single-output head without bias: pass ``label``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtyping import Array, Int, PyTree

from .._client import Client
from .._model import Model
from .._result import Reconstruction
from ..engine import Solver, copa, layerwise_options


def rgap(model: Model, grads: PyTree, *, label: int | Int[Array, "..."] | None = None,
         input_shape: tuple[int, ...] | None = None, client: Client | None = None, solver: Solver | None = None,
         key: Any = None, **legacy: Any) -> Reconstruction:
    r"""R-GAP: the recursive least-squares inversion of a single-image gradient (no random start, no key needed).

    R-GAP is COPA's fold with both constraint blocks at equal weight and no pull-back: the same engine, with the
    solver's ``forward_weight`` and ``gradient_weight`` set to 1.

    Args:
        model: the model (its layers must be readable: :meth:`jaxinv.Model.layers`).
        grads: one image's gradient, or ``T`` of them stacked on a leading axis.
        label: the label (R-GAP's assumption); ``None`` recovers it from the head when the head allows it.
        input_shape: one input's shape (default: the model's).
        client: the client's setting (:class:`jaxinv.Client`; ``loss``: ``auto`` is logistic for one output,
            cross-entropy otherwise).
        solver: the per-layer least-squares solver's options (:class:`jaxinv.engine.Solver`: ``max_steps``,
            ``rtol``, ``atol``); its block weights are set to 1.
        key: unused (the method is deterministic); accepted for the common interface.
        **legacy: the earlier flat keywords (``loss``, ``max_steps``, ``rtol``, ``atol``) still work.

    Returns:
        A :class:`jaxinv.Reconstruction` with ``attack="rgap"`` and per-layer reports (input layer first).

    Example:
        >>> rec = jaxinv.attack("rgap", model, grads, label=1)

    References:
        J. Zhu, M. Blaschko. R-GAP: Recursive Gradient Attack on Privacy. ICLR 2021.
    """
    client, solver, _ = layerwise_options("rgap", client, solver, False, legacy)
    solver = dataclasses.replace(solver, forward_weight=1.0, gradient_weight=1.0)
    rec = copa(model, grads, label=label, input_shape=input_shape, client=client, solver=solver, key=key)
    return dataclasses.replace(rec, attack="rgap")
