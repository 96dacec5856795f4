r"""One layer's linear maps as the metric applies them: batched, compiled once per layer, float64 columns out.

The maps themselves come from the one builder below the engine: :meth:`jaxinv._maps.LayerSystem.build` for a layer
(:math:`A_l`, :math:`B_l(\cdot;\delta_l)`, exact: applied to unit vectors they return the matrix entries) and
:class:`jaxinv.engine.BlockSystem` for a block (its nonlinear map, linearised at the block's input). This module only
masks, transposes, batches and caches them for the rank certificates (:mod:`jaxinv._security._certificates`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._maps import LayerSystem
from .._model import Stage
from ..engine import BlockSystem

_CACHE_ATTR = "_jaxinv_security_cache"  # compiled maps kept on the model's own (identity-hashed) stage objects


def cache_of(obj) -> dict:
    """A per-object cache that lives and dies with ``obj`` (a stage or structure of a traced model)."""
    c = getattr(obj, _CACHE_ATTR, None)
    if c is None:
        c = {}
        setattr(obj, _CACHE_ATTR, c)
    return c


def _linear_maps(stage: Stage, leaves, delta, u, idx: tuple[int, ...], dtype) -> tuple[Callable, Callable]:
    r"""``(v -> A v, v -> B(v; delta))`` on flat ``v``, flat outputs: for a layer the exact linear maps of
    :meth:`LayerSystem.build <jaxinv._maps.LayerSystem.build>` (at ``u = 0``), for a block the tangents at ``u`` of
    :class:`BlockSystem <jaxinv.engine.BlockSystem>`'s forward and gradient maps (all its parameters)."""
    shape = tuple(stage.nodes.x_in.shape)
    if stage.nodes.kind != "block":
        system = LayerSystem.build(stage, leaves, delta)
        return (lambda v: system.forward(v.reshape(shape).astype(dtype)),
                lambda v: system.gradient(v.reshape(shape).astype(dtype)).reshape(-1))
    bs = BlockSystem(stage, leaves, delta.astype(dtype), idx)

    def flat_gradient(x):
        return jnp.concatenate([g.reshape(-1) for g in bs.gradient(x)])

    return (lambda v: jax.jvp(bs.forward, (u,), (v.reshape(shape).astype(dtype),))[1],
            lambda v: jax.jvp(flat_gradient, (u,), (v.reshape(shape).astype(dtype),))[1])


def _compiled(stage: Stage, idx: tuple[int, ...], dtype) -> dict[str, Callable]:
    """The three maps of :class:`LayerMaps`, each ``(leaves, (mask, delta, u), rows) -> rows``, vmapped and jitted."""
    n = math.prod(stage.nodes.x_in.shape)

    def masked_forward(leaves, second):
        mask, delta, u = second
        forward, _ = _linear_maps(stage, leaves, delta, u, idx, dtype)
        return lambda v: (forward(v) if mask is None else forward(v) * mask).reshape(-1)

    def fwd(leaves, second, v):
        return masked_forward(leaves, second)(v)

    def fwd_t(leaves, second, y):
        f = masked_forward(leaves, second)
        return jax.linear_transpose(f, jax.ShapeDtypeStruct((n,), dtype))(y.astype(dtype))[0]

    def grad(leaves, second, v):
        mask, delta, u = second
        return _linear_maps(stage, leaves, delta, u, idx, dtype)[1](v)

    raw = {"fwd": fwd, "fwd_t": fwd_t, "grad": grad}
    return {name: jax.jit(jax.vmap(f, in_axes=(None, None, 0))) for name, f in raw.items()}


class LayerMaps:
    r"""One layer's linear maps, batched and compiled once: :math:`v\mapsto A v` (masked to the rows in use),
    :math:`y\mapsto A^\top y` and :math:`v\mapsto B(v;\delta)`.

    For a layer (``u = 0``, its kernel) the layer's own convolution / matmul, so applied to a unit vector they
    return the matrix entries exactly; for a block (:mod:`jaxinv.engine._block`: its input ``u``, all its
    parameters) the linearisation of its nonlinear system, determined where it has full column rank. Inputs are
    given as rows of an array (cast to the model's dtype); :meth:`apply` returns float64 columns.

    Attributes:
        stage, leaves: the layer and the model's parameter leaves.
        shape, out_shape: the layer's input and output shapes (with the batch axis 1).
        n, m_total, p: unknowns, output units, gradient entries.
    """

    def __init__(self, stage: Stage, leaves, delta, mask, u=None):
        self.shape = tuple(stage.nodes.x_in.shape)
        self.out_shape = tuple(stage.nodes.z.shape)
        block = stage.nodes.kind == "block"
        idx = tuple(stage.nodes.leaves) if block else (stage.nodes.kernel_leaf,)
        self.dtype = jnp.result_type(leaves[idx[0]])
        u = jnp.zeros(self.shape, self.dtype) if u is None else jnp.asarray(u, self.dtype).reshape(self.shape)
        self.stage, self.leaves, self._second = stage, list(leaves), (mask, delta, u)
        cache = cache_of(stage)  # compiled once per layer of a model
        if "maps" not in cache:
            cache["maps"] = _compiled(stage, idx, self.dtype)
        self._fns = cache["maps"]
        self.n = math.prod(self.shape)
        self.m_total = math.prod(self.out_shape)
        self.p = int(sum(np.size(leaves[i]) for i in idx))
        self.chunk = int(min(512, 2 ** int(math.log2(max(1.0, 4e6 / max(self.n, self.m_total, self.p))))))

    @property
    def kernel(self):
        """The layer's kernel (its parameter leaf)."""
        return self.leaves[self.stage.nodes.kernel_leaf]

    def apply(self, which: str, vecs: Callable, k: int) -> np.ndarray:
        """Apply map ``which`` (``"fwd"``, ``"fwd_t"``, ``"grad"``) to ``k`` vectors; ``vecs(start, stop)``
        returns rows ``start..stop``."""
        f = self._fns[which]
        cols, size = [], self.chunk
        for s in range(0, k, size):
            blk = np.asarray(vecs(s, min(s + size, k)), np.dtype(self.dtype))
            pad = size - blk.shape[0]
            if pad:
                blk = np.concatenate([blk, np.zeros((pad,) + blk.shape[1:], blk.dtype)])
            out = np.asarray(f(self.leaves, self._second, jnp.asarray(blk)), np.float64)
            cols.append(out[: size - pad])
        if not cols:
            size_out = {"fwd": self.m_total, "fwd_t": self.n, "grad": self.p}[which]
            return np.zeros((size_out, 0))
        return np.concatenate(cols, 0).T

    def one(self, which: str, v: np.ndarray) -> np.ndarray:
        """Apply map ``which`` to one vector, through the batched map (the chunk bounds the padded work, and no
        second compilation is needed)."""
        return self.apply(which, lambda s, t: np.asarray(v).reshape(1, -1), 1)[:, 0]


def unit_vectors(idx: np.ndarray, n: int) -> Callable:
    """``vecs`` for :meth:`LayerMaps.apply`: the unit vectors ``e_i`` for ``i`` in ``idx``."""

    def vecs(s, t):
        e = np.zeros((t - s, n), np.float32)
        e[np.arange(t - s), idx[s:t]] = 1.0
        return e

    return vecs
