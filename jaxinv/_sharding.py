r"""Spreading independent targets over devices: a 1-D :class:`jax.sharding.Mesh` along the targets axis.

Stacked targets (``T`` single-image gradients on a leading axis, see :func:`jaxinv.copa`) are independent, so they
shard perfectly: put the leading axis of every gradient leaf and of the labels on a mesh axis and every layer's
batched solve runs on all devices at once (XLA's SPMD partitioner keeps the targets axis split through the
solver's loops; the per-iteration convergence test is the only cross-device reduction). The results equal the
single-device ones up to floating-point rounding.

Example:
    >>> stacked = jax.vmap(lambda a, b: jaxinv.client_gradient(model, a[None], b[None]))(images[:2], labels[:2])
    >>> stacked, targets = jaxinv.shard_targets((stacked, labels[:2]))   # 2 targets over all local devices
    >>> rec = jaxinv.copa(model, stacked, label=targets)                 # rec.image is sharded the same way
    >>> rec.image.shape, rec.image.sharding.device_set == set(jax.local_devices())
    ((2, 16, 16, 3), True)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

#: The mesh axis name used for independent targets.
TARGETS = "targets"


def target_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh named ``"targets"`` over ``devices`` (default: every local device)."""
    devs = list(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("target_mesh: devices is empty")
    return Mesh(np.array(devs), (TARGETS,))


def shard_targets(tree: PyTree, mesh: Mesh | None = None) -> PyTree:
    """Place every array leaf of ``tree`` with its leading (targets) axis split over ``mesh``.

    Args:
        tree: stacked gradients and/or labels: every array leaf has the targets axis ``T`` first.
        mesh: a mesh with an axis named ``"targets"`` (default: :func:`target_mesh` over all local devices).

    Returns:
        The same tree, leaves placed with ``NamedSharding(mesh, PartitionSpec("targets"))``.

    Raises:
        ValueError: a leaf has no leading axis, the leaves disagree on ``T``, or ``T`` is not a multiple of the
            number of devices on the targets axis (pad the batch or pass a smaller mesh).
    """
    mesh = target_mesh() if mesh is None else mesh
    if TARGETS not in mesh.axis_names:
        raise ValueError(f"shard_targets: mesh has axes {mesh.axis_names}; it needs an axis named {TARGETS!r}")
    n = mesh.shape[TARGETS]
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    sizes = set()
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"shard_targets: leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs the "
                             "targets axis first")
        sizes.add(shape[0])
    if len(sizes) > 1:
        raise ValueError(f"shard_targets: the leaves' leading axes differ ({sorted(sizes)}); stack the same T "
                         "targets on every leaf")
    T = sizes.pop() if sizes else 0
    if T % n:
        raise ValueError(f"shard_targets: {T} targets do not split over {n} devices; use a multiple of {n} targets "
                         f"or a mesh of a divisor of {T} devices (jaxinv.target_mesh(jax.devices()[:k]))")
    sharding = NamedSharding(mesh, PartitionSpec(TARGETS))
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)
