r"""The head (layer :math:`L`): what its gradient gives, the output error :math:`\delta_L` and its input.

:math:`g_{b_L} = \delta_L` and :math:`g_{W_L} = \delta_L x_{L-1}^\top`, so :math:`x_{L-1}` solves the gradient
constraint alone in least squares (all rows are used, not the first non-zero one). Without a bias,
:math:`g_{W_L}` is rank one: :math:`x_{L-1} = c\,v` with :math:`v` its right singular vector, and the scale
:math:`c` is the root of the consistency equation :math:`c\,\ell'(c\,W v) = \sigma u` (R-GAP's scalar trick, for
any loss and activation).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._gradient import loss_fn
from .._labels import HeadNotInvertibleError, head_delta_direction, label_from_delta, rank_one
from .._maps import LayerSystem, norm
from .._model import Model, Stage, Structure
from ._layer import bias_residual, fit_status, layer_report, solve_layer
from ._options import Solver


def delta_of_logits(stage: Stage, loss: str, n_out: int):
    """``z_L -> dl/dz_L`` for one example ``z_L`` of shape ``(1, ...)``: the loss through the head's activation
    (``y`` one label, or one mask for a segmentation model: :func:`jaxinv._gradient.loss_fn` reads both)."""
    lf = loss_fn(loss, n_out)

    def delta(z, y):
        return jax.grad(lambda zz: lf(stage.activation(zz), y[None]))(z)

    return delta


def head_scale(st: Stage, leaves, u, s, v, label, loss, n_out):
    r"""Solve :math:`c\,\delta(c) = \sigma u` for the scale :math:`c` of :math:`x_{L-1} = c v` (1-D search)."""
    sys = LayerSystem.build(st, leaves, jnp.zeros(st.nodes.z.shape, v.dtype))
    av, c0 = sys.forward(v), sys.forward_offset
    delta = delta_of_logits(st, loss, n_out)
    target = s * u.reshape(av.shape)

    def misfit(c):
        d = delta(c * av + c0, label)
        r = c * d - target  # exact for the pair (u, v) the SVD returned: (-u, -v) flips c with it
        return jnp.sum(r * r)

    mags = jnp.logspace(-4, 5, 1801, dtype=v.dtype)
    grid = jnp.stack([mags, -mags])  # (2, N): each sign separately
    vals = jax.vmap(jax.vmap(misfit))(grid)
    # The consistency equation can have two roots (R-GAP's ambiguity: e.g. c(sigmoid(ca) - 1) = k has a small and a
    # large root). Every near-zero local minimum is a root; take the one with the smallest logit |c W v|: a large
    # logit means a confident prediction, whose gradient would be vanishing. Without roots, the best fit.
    left = jnp.concatenate([jnp.full((2, 1), jnp.inf, vals.dtype), vals[:, :-1]], axis=1)
    right = jnp.concatenate([vals[:, 1:], jnp.full((2, 1), jnp.inf, vals.dtype)], axis=1)
    tnorm = jnp.sum(target * target)
    roots = (vals <= left) & (vals <= right) & (vals < 1e-2 * tnorm)
    logit = jnp.abs(grid) * norm(av)
    flat = jnp.where(roots, logit, jnp.inf).reshape(-1)
    i = jnp.where(jnp.any(roots), jnp.argmin(flat), jnp.argmin(vals.reshape(-1)))
    c = grid.reshape(-1)[i]
    # refine in log-space around the best grid point (golden section)
    sign, lc = jnp.sign(c), jnp.log(jnp.abs(c))
    step = (jnp.log(mags[1]) - jnp.log(mags[0])).astype(v.dtype)
    lo, hi = lc - step, lc + step
    g = (math.sqrt(5) - 1) / 2

    def body(_, b):
        lo, hi = b
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        f1, f2 = misfit(sign * jnp.exp(m1)), misfit(sign * jnp.exp(m2))
        return jnp.where(f1 < f2, lo, m1), jnp.where(f1 < f2, m2, hi)

    lo, hi = jax.lax.fori_loop(0, 60, body, (lo, hi))
    c = sign * jnp.exp(0.5 * (lo + hi))
    return c * v, delta(c * av + c0, label)


def head_step(model: Model, structure: Structure, gleaves: list[Array], label, solver: Solver, loss: str):
    r"""Layer :math:`L`: recover :math:`\delta_L` (and the label), solve for :math:`x_{L-1}`.

    With a bias, :math:`\delta_L = g_{b_L}` and :math:`x_{L-1}` solves the gradient rows alone; without one,
    :math:`g_{W_L} = \sigma u v^\top`, :math:`x_{L-1} = c\,v` with :math:`c` the root of R-GAP's scalar equation.
    ``loss`` is the client's resolved loss. Returns ``(x_{L-1}, dl/dx_{L-1}, label, report)``."""
    leaves = jax.tree_util.tree_leaves(model.params)
    st = structure.stages[-1]
    if st.nodes.kind == "block":
        raise HeadNotInvertibleError(
            f"the model's last stage {st.layer.path!r} is a block (branches joined at the output): its gradient does "
            "not give the output error in closed form; invert this model with jaxinv.attack('ig', ...)")
    n_out = math.prod(st.nodes.z.shape)
    k = st.nodes.kernel_leaf
    gW = gleaves[k]
    if st.nodes.bias_leaf >= 0:
        delta, _ = head_delta_direction(structure, gleaves)
        if label is None:
            label = label_from_delta(delta.reshape(-1), exact=True)
        sys = LayerSystem.build(st, leaves, delta)
        x, fres, gres, steps, status = solve_layer(sys, jnp.zeros_like(sys.forward_offset), gW, solver, use_forward=False)
    else:
        u, s, v = rank_one(st, gleaves, leaves)
        if label is None:
            if n_out == 1:
                raise HeadNotInvertibleError(
                    f"the head {st.layer.path!r} has one output and no bias: the label cannot be read from the "
                    "gradient's sign; pass label= (0 or 1)"
                )
            label = label_from_delta(u, exact=False)
        x, delta = head_scale(st, leaves, u, s, v, label, loss, n_out)
        sys = LayerSystem.build(st, leaves, delta)
        gres = norm(sys.gradient(x) - gW) / jnp.maximum(norm(gW), jnp.finfo(gW.dtype).tiny)
        fres = jnp.full((), jnp.nan, gW.dtype)
        steps, status = jnp.asarray(0, jnp.int32), fit_status(gres)
    bres = bias_residual(st, leaves, gleaves, delta)
    gx = sys.forward_transpose(delta)
    rep = layer_report(st, False, fres, gres, bres, 0, steps, status)
    return x, gx, jnp.asarray(label, jnp.int32), rep


head_jit = eqx.filter_jit(head_step)
