"""Results: what an attack returns, with the diagnostics that make a wrong answer visible.

Every attack (layer-wise or optimisation) returns one :class:`Reconstruction`. It is an equinox module, so a
pytree: it passes through `jax.jit` and `jax.vmap` (array fields gain the batch axis; names, shapes and counts are
static). Per-layer diagnostics are :class:`LayerReport` entries, from the input layer up to the head.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._results import RESULTS, STATUS_MESSAGES



class LayerReport(eqx.Module):
    """Diagnostics of one layer's inversion (layer-wise attacks) or of one layer's system.

    Attributes:
        path: the layer's path in the model's parameters (e.g. ``Conv_0/kernel``).
        kind: ``dense`` or ``conv``.
        unknowns: size of the layer's input ``x_{l-1}`` (per example).
        forward_rows: rows of the forward constraint ``A_l x = z_l - b_l`` (output units).
        gradient_rows: rows of the gradient constraint ``B_l(x, delta_l) = gW_l`` (weights).
        forward_residual: ``||A_l x - (z_l - b_l)|| / ||z_l - b_l||`` at the solution.
        gradient_residual: ``||B_l(x, delta_l) - gW_l|| / ||gW_l||`` at the solution.
        bias_residual: ``||sum delta_l - gb_l|| / ||gb_l||``: consistency of the recovered ``delta_l`` with the
            shared bias gradient (NaN when the layer has no bias).
        clipped: number of values of ``x_l`` that lay outside the activation's image and were clipped before
            the inverse (e.g. ``|x| >= 1`` before ``artanh``). Non-zero means the layer above was inexact.
        steps: solver iterations.
        status: ``RESULTS.successful`` (0) if the solve succeeded, else another :class:`jaxinv.RESULTS` code.
        seconds: wall time of this layer (NaN when called under an outer `jit`/`vmap`).
        refine_steps: optimiser iterations of the refinement after the least-squares solve (COPA's pull-back,
            the hybrid's gradient matching); ``None`` when the layer was not refined.
        refine_objective: the refinement's final objective (``None`` when not refined).
        lsq_residual: relative residual of the balanced stacked system at the least-squares solution, before the
            refinement (``forward_residual`` / ``gradient_residual`` are those of the final answer); ``None``
            when not refined.
    """

    path: str = eqx.field(static=True)
    kind: str = eqx.field(static=True)
    unknowns: int = eqx.field(static=True)
    forward_rows: int = eqx.field(static=True)
    gradient_rows: int = eqx.field(static=True)
    forward_residual: Float[Array, ""]
    gradient_residual: Float[Array, ""]
    bias_residual: Float[Array, ""]
    clipped: Int[Array, ""]
    steps: Int[Array, ""]
    status: Int[Array, ""]
    seconds: Float[Array, ""]
    refine_steps: Int[Array, ""] | None = None
    refine_objective: Float[Array, ""] | None = None
    lsq_residual: Float[Array, ""] | None = None

    @property
    def message(self) -> str:
        """Human-readable status (for a single, non-batched report)."""
        code = int(self.status)
        return RESULTS(code).message if code in STATUS_MESSAGES else f"unknown status {code}"

    def summary(self) -> dict:
        """A JSON-friendly dict of this report (for one target: arrays must be scalars)."""

        def f(v):
            v = float(v)
            return None if math.isnan(v) else v

        out = {
            "path": self.path,
            "kind": self.kind,
            "unknowns": self.unknowns,
            "forward_rows": self.forward_rows,
            "gradient_rows": self.gradient_rows,
            "forward_residual": f(self.forward_residual),
            "gradient_residual": f(self.gradient_residual),
            "bias_residual": f(self.bias_residual),
            "clipped": int(self.clipped),
            "steps": int(self.steps),
            "status": int(self.status),
            "message": self.message,
            "seconds": f(self.seconds),
        }
        if self.refine_steps is not None:
            out["refine_steps"] = int(self.refine_steps)
            out["refine_objective"] = f(self.refine_objective)
            out["lsq_residual"] = f(self.lsq_residual)
        return out


class Reconstruction(eqx.Module):
    """What an attack recovered from a shared gradient.

    Attributes:
        image: reconstructed inputs, shape ``(B, *input_shape)`` like the model's input.
        label: the labels used (given, or recovered from the head's gradient), shape ``(B,)``.
        layers: per-layer diagnostics, input layer first (empty for attacks that do not work layer-wise).
        attack: the attack's name.
        loss_trace: for optimisation attacks, the objective every ``log_every`` steps, shape ``(B, T)``
            (``(B, 0)`` for layer-wise attacks).
        gradient_distance: relative distance ``||g(x_hat) - g|| / ||g||`` between the gradient the
            reconstruction produces and the shared one, one entry per shared gradient (``(T,)`` for ``T``
            stacked targets): a truth-free check of the answer.
        seconds: wall time of the whole attack (NaN under an outer `jit`/`vmap`).
        layer_inputs: for layer-wise attacks, every layer's reconstructed input ``(B, *its input shape)``, input
            layer first (the first is ``image``): compare them with a forward pass of the truth to see where a
            reconstruction goes wrong. Empty for optimisation attacks.
    """

    image: Float[Array, "B *shape"]
    label: Int[Array, " B"]
    layers: tuple[LayerReport, ...]
    attack: str = eqx.field(static=True)
    loss_trace: Float[Array, "B T"]
    gradient_distance: Float[Array, " B"]
    seconds: Float[Array, ""]
    layer_inputs: tuple[Array, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every layer's solve reported success."""
        return all(bool(jnp.all(r.status == 0)) for r in self.layers)

    def table(self) -> str:
        """A plain-text per-layer table (for a single target)."""
        head = f"{'layer':<28} {'unknowns':>8} {'fwd rows':>8} {'grad rows':>9} {'fwd res':>9} {'grad res':>9} {'clip':>5} {'steps':>6}  status"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            s = r.summary()
            lines.append(
                f"{r.path:<28} {r.unknowns:>8} {r.forward_rows:>8} {r.gradient_rows:>9} "
                f"{s['forward_residual'] or float('nan'):>9.2e} {s['gradient_residual'] or float('nan'):>9.2e} "
                f"{s['clipped']:>5} {s['steps']:>6}  {s['message']}"
            )
        return "\n".join(lines)
