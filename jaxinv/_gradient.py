r"""The gradient a client shares, its validation, and the label it reveals.

A client with images ``x`` (batch ``B``) and labels ``y`` shares
:math:`g = \nabla_\theta \frac1B\sum_i \ell(f_\theta(x_i), y_i)`, a pytree shaped like the parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from ._model import Model, param_paths

LOSSES = ("cross_entropy", "logistic", "auto")


def resolve_loss(loss: str, num_outputs: int) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
    if loss == "auto":
        return "logistic" if num_outputs == 1 else "cross_entropy"
    if loss == "cross_entropy" and num_outputs == 1:
        raise ValueError(
            "loss='cross_entropy' on a model with one output gives a zero gradient (softmax of one logit is 1): "
            "use loss='logistic' (binary cross-entropy on the single logit, labels 0/1)"
        )
    if loss == "logistic" and num_outputs != 1:
        raise ValueError(f"loss='logistic' needs a model with one output, this one has {num_outputs}")
    return loss


def loss_fn(loss: str, num_outputs: int) -> Callable[[Array, Array], Array]:
    r"""Per-batch mean loss ``(logits, labels) -> scalar``.

    ``cross_entropy``: softmax cross-entropy with integer labels in ``[0, K)``: logits ``(B, K)`` and labels
    ``(B,)`` for classification; for segmentation (dense prediction) logits ``(B, H, W, K)`` and a mask label
    ``(B, H, W)`` (any number of spatial axes), the loss being the mean over the batch *and* the pixels,
    :math:`\frac{1}{BHW}\sum_{i,p} -\log\mathrm{softmax}(z_{ip})_{y_{ip}}`. ``logistic``: binary cross-entropy on
    a single logit with labels in ``{0, 1}`` (R-GAP's setting). ``auto`` picks ``logistic`` for one output,
    ``cross_entropy`` otherwise.
    """
    kind = resolve_loss(loss, num_outputs)

    def ce(logits, y):
        logits = logits.reshape((logits.shape[0], -1) if y.ndim <= 1 else tuple(y.shape) + (-1,))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def logistic(logits, y):
        logits = logits.reshape(logits.shape[0])
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y.astype(logits.dtype)))

    return ce if kind == "cross_entropy" else logistic


def label_shape(out_shape) -> tuple[int, ...]:
    """Shape of one example's label from the model's output shape per example: ``()`` for a classifier, the
    spatial shape ``(H, W)`` for a segmentation model (logits ``(H, W, K)``: one class per pixel, a mask)."""
    out = tuple(int(s) for s in out_shape)
    return out[:-1] if len(out) >= 2 and int(np.prod(out[:-1])) > 1 else ()


def num_labels(model: Model, input_shape=None) -> int:
    """Number of valid label values: classes for cross-entropy (per pixel for segmentation), 2 for a single
    logistic output."""
    out = model.output_shape(input_shape)
    k = int(out[-1]) if label_shape(out) else int(np.prod(out))
    return 2 if k == 1 else k


def check_labels(y, n: int, *, name: str = "label"):
    """Labels must be integers in ``[0, n)``: eager error when concrete, ``eqx.error_if`` under ``jit``."""
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer class indices, got dtype {y.dtype}")
    try:
        vals = np.asarray(y)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return eqx.error_if(y, (y < 0) | (y >= n), f"{name} out of range [0, {n})")
    if vals.size and (vals.min() < 0 or vals.max() >= n):
        bad = vals[(vals < 0) | (vals >= n)].ravel()
        shown = vals.tolist() if vals.size <= 8 else f"[{bad.size} of {vals.size} out of range, e.g. {bad[:4].tolist()}]"
        raise ValueError(f"{name}={shown} is out of range: the model has {n} classes, labels are in [0, {n})")
    return y


def client_gradient(
    model: Model,
    x: Float[Array, "B *shape"],
    y: Int[Array, "B *mask"],
    *,
    loss: str = "auto",
    params: PyTree | None = None,
) -> PyTree:
    r"""The gradient one client shares: :math:`\nabla_\theta \frac1B \sum_i \ell(f_\theta(x_i), y_i)`.

    Args:
        model: the model (its parameters are the point of differentiation unless ``params`` is given).
        x: the client's images, batch axis first, in the model's input format.
        y: integer labels, shape ``(B,)``; for a segmentation model (logits ``(B, H, W, K)``) mask labels
            ``(B, H, W)``, one class per pixel (per-pixel cross-entropy, mean over batch and pixels).
        loss: ``cross_entropy``, ``logistic`` (single output) or ``auto``.
        params: parameters to differentiate at (default ``model.params``).

    Returns:
        A pytree shaped like the parameters.

    Example:
        >>> grads = jaxinv.client_gradient(model, images[:1], jnp.array([3]))
        >>> jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(model.params)
        True
    """
    params = model.params if params is None else params
    lf, x, y = client_loss(model, x, y, loss, params)
    return jax.grad(lambda p: lf(model.apply_fn(p, x), y))(params)


def client_loss(model: Model, x: Array, y: Array, loss: str, params: PyTree) -> tuple[Callable, Array, Array]:
    """:func:`client_gradient`'s checks of ``x`` and ``y``: returns the loss of the logits and the labels, and
    ``x`` and ``y`` as arrays (``y`` with its batch axis)."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    out = tuple(jax.eval_shape(model.apply_fn, params, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[1:]) \
        if x.ndim >= 2 else ()
    lshape = label_shape(out)
    if y.ndim == len(lshape):
        y = y[None]
    if x.ndim < 2 or x.shape[0] != y.shape[0] or tuple(y.shape[1:]) != lshape:
        want = f"(B, {', '.join(map(str, lshape))})" if lshape else "(B,)"
        raise ValueError(
            f"x (shape {tuple(x.shape)}) must have a batch axis first matching y (shape {tuple(y.shape)}), y of "
            f"shape {want}" + (f": model {model.name!r} predicts {out} per image, one class per pixel, so y is a "
                               "mask of class indices per image" if lshape else "; for one image use x[None] and y "
                               "of shape (1,)")
        )
    n_out = int(out[-1]) if lshape else int(np.prod(out))
    y = check_labels(y, 2 if n_out == 1 else n_out, name="y")
    return loss_fn(loss, n_out), x, y


def validate_grads(model: Model, grads: PyTree, *, allow_batch: bool = True) -> tuple[list[Array], int | None]:
    """Check a gradient pytree against the model's parameters.

    Returns the flat leaves and the number of stacked targets (``None`` when the leaves have exactly the
    parameters' shapes, ``T`` when every leaf has one extra leading axis of size ``T``: independent targets).
    Raises an error naming the first path that does not match; non-finite values raise when the gradient is
    concrete (under ``jit`` they surface as a non-finite reconstruction with a failed status). Leaves in another
    floating dtype (a bfloat16 or float16 gradient) are cast, exactly, to their parameter's dtype.
    """
    ptree = jax.tree_util.tree_structure(model.params)
    try:
        gtree = jax.tree_util.tree_structure(grads)
    except Exception:  # pragma: no cover
        raise TypeError("grads must be a pytree of arrays shaped like the model's params") from None
    paths = param_paths(model.params)
    if gtree != ptree:
        gpaths = param_paths(grads) if jax.tree_util.tree_leaves(grads) else []
        missing = [p for p in paths if p not in gpaths]
        extra = [p for p in gpaths if p not in paths]
        raise ValueError(
            "grads does not have the structure of the model's params: "
            + (f"missing {missing[:3]} " if missing else "")
            + (f"unexpected {extra[:3]} " if extra else "")
            + "(pass the gradient of exactly the params the Model was built with, e.g. jaxinv.client_gradient)"
        )
    gl = jax.tree_util.tree_leaves(grads)
    pl = jax.tree_util.tree_leaves(model.params)
    batch = None  # None: not decided yet; 0: one target; T: T stacked targets
    for path, g, p in zip(paths, gl, pl):
        gs, ps = tuple(np.shape(g)), tuple(np.shape(p))
        if gs == ps and batch in (None, 0):
            batch = 0
        elif allow_batch and len(gs) == len(ps) + 1 and gs[1:] == ps and batch in (None, gs[0]):
            batch = gs[0]
        else:
            raise ValueError(
                f"grads[{path!r}] has shape {gs} but the parameter has shape {ps}"
                + (" (stacked targets need one extra leading axis of the same size on every leaf)"
                   if allow_batch and batch else "")
            )
    for path, g in zip(paths, gl):
        if isinstance(g, jax.core.Tracer):
            continue
        a = np.asarray(g)
        if not np.all(np.isfinite(a)):
            raise ValueError(
                f"grads[{path!r}] has {int(np.sum(~np.isfinite(a)))} non-finite value(s) (NaN/inf): the client's "
                "gradient overflowed or was corrupted; recompute it (float32 overflow? lower the learning rate)"
            )
    out = []
    for path, g, p in zip(paths, gl, pl):
        g = jnp.asarray(g)
        if not jnp.issubdtype(g.dtype, jnp.floating):
            raise TypeError(f"grads[{path!r}] has dtype {g.dtype}; a gradient is floating point (float32, bfloat16, "
                            "float16 or float64)")
        out.append(g.astype(jnp.asarray(p).dtype))  # a lower-precision gradient (bfloat16) is read exactly
    return out, (batch or None)


def per_target(loss: Callable[[PyTree, Array, Array], Array], params: PyTree, images: Array,
               labels: Array) -> PyTree:
    r"""The gradients :math:`\nabla_\theta \ell(\theta; x_t, y_t)` of ``T`` targets, stacked on a leading axis
    of every leaf: the gradient of :math:`\sum_t \ell(\theta_t; x_t, y_t)` with respect to ``T`` copies
    :math:`\theta_t` of the parameters. (The same numbers as ``vmap(grad)``; but XLA's partitioner gets the
    vmapped gradient of a convolution's kernel wrong when the targets are sharded over devices: 0.1-0.2 off on
    every target beyond the first device, jax 0.12 on CPU. The copies' form partitions correctly.)

    Example:
        >>> g = per_target(lambda p, x, y: jnp.sum(p * x) * y, jnp.ones(2), jnp.eye(2), jnp.array([1.0, 2.0]))
        >>> g.tolist()
        [[1.0, 0.0], [0.0, 2.0]]
    """
    T = images.shape[0]
    copies = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (T,) + jnp.shape(a)), params)
    return jax.grad(lambda ps: jnp.sum(jax.vmap(loss)(ps, images, labels)))(copies)


def stacked_gradients(model: Model, images: jax.Array, labels: jax.Array) -> Any:
    """The ``N`` single-image gradients of ``images`` with ``labels``, stacked on a leading axis of every leaf."""
    lf, images, labels = client_loss(model, images, labels, "auto", model.params)
    return per_target(lambda p, xi, yi: lf(model.apply_fn(p, xi[None]), yi[None]), model.params, images, labels)


def relative_distance(g_hat: list[Array], g: list[Array]) -> Float[Array, ""]:
    r"""The truth-free check every attack reports: :math:`\|\hat g - g\|_2 / \|g\|_2` over all leaves.

    Example:
        >>> float(relative_distance([jnp.ones(3)], [2 * jnp.ones(3)]))
        0.5
    """
    tiny = jnp.finfo(jnp.result_type(*g)).tiny
    num = sum(jnp.sum((u - v) ** 2) for u, v in zip(g_hat, g))
    den = sum(jnp.sum(v * v) for v in g)
    return jnp.sqrt(num) / jnp.maximum(jnp.sqrt(den), tiny)


def gradient_distance(model: Model, images: Array, labels: Array, gleaves: list[Array], loss: str,
                      n_out: int) -> Float[Array, ""]:
    r""":func:`relative_distance` between the gradient that ``images`` (``(B, *input_shape)``, all behind one
    gradient) with ``labels`` (``(B,)``, or masks ``(B, H, W)``) produce and the shared one, ``gleaves``."""
    lf = loss_fn(loss, n_out)
    g_hat = jax.tree_util.tree_leaves(jax.grad(lambda p: lf(model.apply_fn(p, images), labels))(model.params))
    return relative_distance(g_hat, gleaves)


@eqx.filter_jit
def target_distances(model: Model, images: Array, labels: Array, gleaves: list[Array], loss: str, n_out: int,
                     stacked: bool) -> Float[Array, " T"]:
    """:func:`gradient_distance` per target: ``T`` stacked single-image targets (``images`` ``(T, *shape)``,
    ``labels`` ``(T, ...)``, every leaf of ``gleaves`` with a leading ``T``), or one target (a ``(1,)`` result)."""
    if stacked:
        lf = loss_fn(loss, n_out)
        g_hat = jax.tree_util.tree_leaves(
            per_target(lambda p, i, y: lf(model.apply_fn(p, i[None]), y[None]), model.params, images, labels))
        return jax.vmap(relative_distance)(g_hat, gleaves)
    return gradient_distance(model, images, labels, gleaves, loss, n_out)[None]
