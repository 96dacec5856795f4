r"""Spreading independent targets over devices: a 1-D :class:`jax.sharding.Mesh` along the targets axis.

Stacked targets (``T`` single-image gradients on a leading axis, see :func:`jaxinv.copa`) are independent, so they
shard perfectly: put the leading axis of every gradient leaf and of the labels on a mesh axis and each device
solves its own targets at the same time (:func:`per_device`: one thread per device, no communication between
the devices). The results equal the single-device ones up to floating-point rounding. (Left to XLA's SPMD partitioner
instead, the vmapped gradient of a convolution's kernel came out wrong on every device but the first, jax 0.12 on
CPU: the layer solve then lost 20-30 dB and reported residuals of 1.)

Example:
    >>> stacked = jax.vmap(lambda a, b: jaxinv.client_gradient(model, a[None], b[None]))(images[:2], labels[:2])
    >>> stacked, targets = jaxinv.shard_targets((stacked, labels[:2]))   # 2 targets over all local devices
    >>> rec = jaxinv.copa(model, stacked, label=targets)                 # rec.image is sharded the same way
    >>> rec.image.shape, rec.image.sharding.device_set == set(jax.local_devices())
    ((2, 16, 16, 3), True)
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
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


def split_mesh(tree: PyTree) -> Mesh | None:
    """The mesh whose ``"targets"`` axis (of more than one device) splits the leading axis of ``tree``'s arrays, as
    :func:`shard_targets` placed them; ``None`` when no leaf is split so (one device, or tracers)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = leaf.sharding if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) else None
        if (isinstance(sharding, NamedSharding) and TARGETS in sharding.mesh.axis_names
                and sharding.mesh.shape[TARGETS] > 1 and len(sharding.spec) and sharding.spec[0] == TARGETS):
            return sharding.mesh
    return None


def per_device(fn: Callable, mesh: Mesh, *args: PyTree) -> PyTree:
    """``fn(*args)`` with each device of ``mesh``'s targets axis running ``fn`` on its own slice of the targets
    (committed to it, one thread per device): every array leaf of ``args`` is split along its leading axis, and
    the results' leaves with a leading targets axis are put back together as one array split the same way (a
    scalar leaf comes from the first device). ``fn`` must treat the targets independently (:func:`jaxinv.copa` on
    stacked targets)."""
    devices = list(mesh.devices.flat)
    n = len(devices)
    T = jax.tree_util.tree_leaves(args)[0].shape[0]
    k = T // n

    def run(i: int) -> PyTree:
        part = jax.tree_util.tree_map(lambda a: jax.device_put(a[i * k:(i + 1) * k], devices[i]), args)
        return fn(*part)
    with ThreadPoolExecutor(n) as pool:  # JAX releases the GIL while a device computes: the devices run at once
        outs = list(pool.map(run, range(n)))
    sharding = NamedSharding(mesh, PartitionSpec(TARGETS))

    def join(*leaves):
        first = leaves[0]
        if not isinstance(first, jax.Array) or first.ndim == 0 or first.shape[0] != k:
            return first
        shape = (T,) + first.shape[1:]
        return jax.make_array_from_single_device_arrays(shape, sharding, [jax.device_put(l, d) for l, d in
                                                                          zip(leaves, devices)])
    return jax.tree_util.tree_map(join, *outs)


def split_attack(attack: Callable[[PyTree, Any], Any], grads: PyTree, label: Any) -> Any:
    """``attack(grads, label)`` (a layer-wise attack on stacked targets, returning a :class:`jaxinv.Reconstruction`)
    run by :func:`per_device` when ``grads``/``label`` are split over devices (:func:`split_mesh`), with its
    ``seconds`` the wall time of all devices; ``None`` when they are not (the caller solves them in one ``vmap``)."""
    mesh = split_mesh((grads, label))
    if mesh is None:
        return None
    start = time.perf_counter()
    rec = (per_device(attack, mesh, grads, jnp.asarray(label)) if label is not None else
           per_device(lambda g: attack(g, None), mesh, grads))
    jax.block_until_ready(rec.image)
    return eqx.tree_at(lambda r: r.seconds, rec, jnp.asarray(time.perf_counter() - start, jnp.float32))
