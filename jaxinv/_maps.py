r"""One layer's linear system, matrix-free.

For layer :math:`l` with unknown input :math:`x = x_{l-1}` (shape ``(1, *in_shape)``), known pre-activation
:math:`z_l` and known :math:`\delta_l = \partial\ell/\partial z_l`:

* **forward constraint** :math:`A_l x = z_l - c_l`, where :math:`c_l = f_l(0)` is the layer's value at zero input
  (bias, input shift) and :math:`A_l` its linear part — ``jax.linearize`` of the user's own layer function;
* **gradient constraint** :math:`B_l(x;\delta_l) = g_{W_l} - B_l(0;\delta_l)`, where
  :math:`B_l(x;\delta) = \nabla_W \langle \delta, f_l(x; W)\rangle` is the weight gradient, linear in :math:`x`
  (dense: :math:`\delta x^\top`, conv: the correlation of :math:`x` with :math:`\delta`), again from ``jax.vjp``.

Both maps are applied by automatic differentiation of the layer (one convolution or matmul each); their
transposes come from ``jax.linear_transpose``. No matrix is ever formed. The two blocks are scaled by the inverse
of their operator norms (estimated by power iteration) so that neither dominates by units alone, and solved
together in least squares by LSMR (lineax): the minimum-norm solution when the system is underdetermined.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import lineax as lx

from ._model import Stage
from ._results import RESULTS


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def norm(a):
    return jnp.sqrt(jnp.maximum(_vdot(a, a), 0.0))


def with_leaf(leaves, k, value):
    out = list(leaves)
    out[k] = value
    return out


@dataclasses.dataclass(frozen=True)
class LayerSystem:
    r"""The linear system of one layer (a plain container built inside a traced function).

    Attributes:
        x_struct: shape/dtype of the unknown ``x`` (``(1, *in_shape)``).
        forward: :math:`x \mapsto A_l x` (linear), output shaped like :math:`z_l`.
        forward_offset: :math:`c_l = f_l(0)`.
        gradient: :math:`x \mapsto B_l(x; \delta_l)` (linear), output shaped like the kernel.
        gradient_offset: :math:`B_l(0; \delta_l)`.
    """

    x_struct: jax.ShapeDtypeStruct
    forward: Callable
    forward_offset: jax.Array
    gradient: Callable
    gradient_offset: jax.Array

    @classmethod
    def build(cls, stage: Stage, leaves, delta) -> "LayerSystem":
        """Build layer ``stage``'s maps at parameters ``leaves`` and pre-activation gradient ``delta``."""
        shape = stage.nodes.x_in.shape
        dtype = leaves[stage.nodes.kernel_leaf].dtype
        x0 = jnp.zeros(shape, dtype)
        k = stage.nodes.kernel_leaf

        def f(x):
            return stage.affine(x, leaves)

        def b(x):
            _, pull = jax.vjp(lambda w: stage.affine(x, with_leaf(leaves, k, w)), leaves[k])
            return pull(delta.astype(dtype))[0]

        c, f_lin = jax.linearize(f, x0)
        h0, b_lin = jax.linearize(b, x0)
        return cls(jax.ShapeDtypeStruct(shape, dtype), f_lin, c, b_lin, h0)

    def forward_transpose(self, y):
        r""":math:`A_l^\top y` (e.g. :math:`\partial\ell/\partial x_{l-1} = A_l^\top \delta_l`)."""
        return jax.linear_transpose(self.forward, self.x_struct)(y)[0]

    def operator(self, wf, wg, mask=None) -> lx.FunctionLinearOperator:
        r"""The stacked operator :math:`x \mapsto (w_f\, m \odot A_l x,\; w_g\, B_l x)`."""

        def mv(x):
            fx = self.forward(x)
            if mask is not None:
                fx = fx * mask
            return (wf * fx, wg * self.gradient(x))

        return lx.FunctionLinearOperator(mv, self.x_struct)


def operator_norm(fn: Callable, x_struct, iters: int = 12):
    r"""Estimate :math:`\|F\|_2` of a linear map by power iteration on :math:`F^\top F` (deterministic start)."""
    ft = jax.linear_transpose(fn, x_struct)
    n = 1
    for s in x_struct.shape:
        n *= s
    v = jnp.cos(jnp.arange(n, dtype=x_struct.dtype) * 1.618).reshape(x_struct.shape) + 1.0
    v = v / norm(v)

    def body(_, carry):
        v, _ = carry
        w = ft(fn(v))[0]
        nw = norm(w)
        return (w / jnp.where(nw > 0, nw, 1.0), nw)

    v, lam = jax.lax.fori_loop(0, iters, body, (v, jnp.zeros((), x_struct.dtype)))
    return jnp.sqrt(lam)


def solver_status(result) -> jax.Array:
    """lineax's result as a :class:`jaxinv.RESULTS` code (an int32 array: it lives under ``jit`` and ``vmap``)."""
    R = lx.RESULTS
    code = jnp.where(result == R.max_steps_reached, int(RESULTS.max_steps_reached),
                     jnp.where(result == R.nonfinite_input, int(RESULTS.nonfinite), int(RESULTS.breakdown)))
    return jnp.where(result == R.successful, int(RESULTS.successful), code).astype(jnp.int32)


def stage_inputs(stages: Sequence[Stage], leaves: list[jax.Array], x: jax.Array) -> list[jax.Array]:
    r"""Each stage's input :math:`x_{l-1}` for one example ``x`` (no batch axis), input layer first: the forward
    pass alone (:func:`layer_pass` adds the pre-activations and deltas)."""
    ins, h = [], x[None]
    for s in stages:
        ins.append(h[0])
        h = s(h, leaves)
    return ins


def layer_pass(stages: Sequence[Stage], leaves: list[jax.Array], x: jax.Array, label: jax.Array,
               lf: Callable[[jax.Array, jax.Array], jax.Array]):
    r"""One example's pass through the layers: every layer's input :math:`x_{l-1}` (and the output, last),
    pre-activation :math:`z_l`, and :math:`\delta_l = \partial\ell/\partial z_l` of the loss ``lf`` at ``label``
    (one class index, or one mask): the point at which the layers' maps are built (the truth, for a benchmark;
    natural probes, for the metric).

    Returns:
        ``(xs, zs, deltas)``: ``len(stages) + 1`` inputs/outputs, ``len(stages)`` pre-activations and deltas.
    """
    xs, zs, h = [], [], x
    for s in stages:
        xs.append(h)
        zs.append(s.affine(h, leaves))
        h = s.activation(zs[-1])
    xs.append(h)

    def objective(eps):
        h = x
        for s, e in zip(stages, eps):
            h = s.activation(s.affine(h, leaves) + e)
        return lf(h, label.reshape((1,) + label.shape))

    return xs, zs, jax.grad(objective)([jnp.zeros_like(z) for z in zs])
