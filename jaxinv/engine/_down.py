r"""One step of the fold below the head: a layer's (or block's) input from its output and its output's gradient.

:math:`(x_l, \partial\ell/\partial x_l) \mapsto (x_{l-1}, \partial\ell/\partial x_{l-1})`: un-activate, solve the layer's
system (:func:`jaxinv.engine.solve_layer`) or the block's (:func:`jaxinv.engine.solve_block`), optionally refine by the
pull-back constraints, then :math:`\partial\ell/\partial x_{l-1} = A_l^\top \delta_l`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._maps import LayerSystem
from .._model import Model, Structure
from ._block import block_step
from ._layer import bias_residual, layer_report, residuals, solve_layer, unactivate
from ._options import Solver
from ._refine import Pullback, correct, pullback_layer


def down_step(model: Model, structure: Structure, l: int, gleaves: list[Array], x_l: Array, gx_l: Array,
              solver: Solver, pullback: Pullback | None = None):
    """Layer l (0-based, below the head): from ``x_l`` (its output) and ``dl/dx_l`` to ``x_{l-1}``.

    With ``pullback``, the least-squares solution is refined by the pull-back constraints
    (:func:`jaxinv.engine._refine.pullback_layer`; for a ReLU layer also its inequality rows on inactive units)."""
    leaves = jax.tree_util.tree_leaves(model.params)
    st = structure.stages[l]
    z, mask, delta, clipped = unactivate(st, x_l, gx_l)
    if st.nodes.kind == "block":
        return block_step(st, leaves, gleaves, z, delta, mask, clipped, solver, l > 0)
    sys = LayerSystem.build(st, leaves, delta)
    x, fres, gres, steps, status = solve_layer(sys, z, gleaves[st.nodes.kernel_leaf], solver, mask=mask)
    refined = None
    x_lsq = x
    if pullback is not None:
        gW = gleaves[st.nodes.kernel_leaf]
        x, refined = pullback_layer(structure.stages, l, leaves, sys, z, gW, mask, x, pullback)
        if pullback.correct > 0:
            x, more = correct(structure.stages, l, sys, x, x_lsq, z, gW, mask, solver, pullback.box,
                              pullback.correct)
            steps = steps + more
        fres, gres = residuals(sys, x, z, gW, mask)
    bres = bias_residual(st, leaves, gleaves, delta)
    gx = sys.forward_transpose(delta) if l > 0 else jnp.zeros_like(x)
    return x, gx, layer_report(st, True, fres, gres, bres, clipped, steps, status, refined=refined)


down_jit = eqx.filter_jit(down_step)
