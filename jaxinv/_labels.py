r"""What the head's gradient reveals: the output error :math:`\delta_L` and the label(s).

Used by the engine (its head step) and by the attacks alike (iDLG, label recovery for batches).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree

from ._checks import positive_int
from ._gradient import validate_grads
from ._maps import LayerSystem, with_leaf
from ._model import Model, Stage, Structure, UnsupportedModelError


class HeadNotInvertibleError(ValueError):
    """The network's head cannot be inverted in closed form (message says why and what to use)."""


def head_delta_direction(structure: Structure, gleaves) -> tuple[Array, bool]:
    r"""The head's :math:`\delta_L` from the shared gradient: exact from the bias gradient when the head has a
    bias (``exact=True``), else its direction up to sign and scale (left singular vector of :math:`g_{W_L}`)."""
    st = structure.stages[-1]
    z_shape = st.nodes.z.shape
    if st.nodes.bias_leaf >= 0:
        gb = gleaves[st.nodes.bias_leaf]
        if math.prod(gb.shape) != math.prod(z_shape):
            raise HeadNotInvertibleError(
                f"the head {st.layer.path!r} shares its bias over {math.prod(z_shape) // max(1, math.prod(gb.shape))} "
                "positions, so its bias gradient is a sum of per-position errors and does not give delta_L: invert "
                "this model with an optimisation attack (jaxinv.attack('ig', ...))"
            )
        return gb.reshape(z_shape), True
    u, _, _ = rank_one(st, gleaves)
    return u.reshape(z_shape), False


def rank_one(st: Stage, gleaves, leaves=None):
    r"""Write :math:`g_{W_L} = \sigma\, u\, v^\top` with :math:`u` over outputs and :math:`v` over inputs."""
    leaves = gleaves if leaves is None else leaves
    if st.layer.kind != "dense":
        raise HeadNotInvertibleError(
            f"the head {st.layer.path!r} is a convolution without bias: its gradient is not a rank-one outer "
            "product, so the head cannot be inverted in closed form; use jaxinv.attack('ig', ...)"
        )
    z_shape = st.nodes.z.shape
    k = st.nodes.kernel_leaf
    gW = gleaves[k]
    n_out = math.prod(z_shape)
    eye = jnp.eye(n_out, dtype=gW.dtype).reshape((n_out,) + tuple(z_shape))

    def row(e):  # B(x; e_j)^T gW = delta_j x for a dense layer
        sys = LayerSystem.build(st, leaves, e)
        return jax.linear_transpose(sys.gradient, sys.x_struct)(gW)[0].reshape(-1)

    R = jax.vmap(row)(eye)  # (n_out, n_in)
    U, S, Vt = jnp.linalg.svd(R, full_matrices=False)
    return U[:, 0], S[0], Vt[0].reshape(st.nodes.x_in.shape)


def label_from_delta(d: Array, *, exact: bool) -> Int[Array, ""]:
    r"""The label an output error ``d`` points to: its negative entry (``exact``: ``d`` itself, from the bias
    gradient), or the entry whose sign differs from the others (``d`` known up to sign); for one logistic output,
    the sign of :math:`\sigma(z) - y`."""
    if d.size == 1:
        return jnp.where(d[0] < 0, 1, 0).astype(jnp.int32)
    if exact:
        return jnp.argmin(d).astype(jnp.int32)
    neg = jnp.sum(d < 0)
    return jnp.where(neg <= d.size // 2, jnp.argmin(d), jnp.argmax(d)).astype(jnp.int32)


def recover_label(model: Model, grads: PyTree, *, input_shape=None) -> Int[Array, ""]:
    r"""The label a single-image gradient reveals (iDLG).

    With cross-entropy, :math:`\partial\ell/\partial z_L = \mathrm{softmax}(z_L) - e_y` has exactly one negative
    entry, at the label. The head's bias gradient equals it; without a bias, the head's kernel gradient
    :math:`\delta_L x_{L-1}^\top` is rank one and its left singular vector has the same sign pattern up to a
    global sign: the label is the entry whose sign differs from the others. For a single logistic output the
    sign of :math:`\sigma(z) - y` gives the label.
    """
    structure = model.structure(input_shape)
    leaves, _ = validate_grads(model, grads, allow_batch=False)
    d, exact = head_delta_direction(structure, leaves)
    return label_from_delta(d.reshape(-1), exact=exact)


def head_signal(model: Model, grads: PyTree, input_shape) -> tuple[Array, bool]:
    """The per-class signal of the head: its bias gradient (exact), or its kernel gradient's row sums."""
    try:
        structure = model.structure(input_shape)
    except UnsupportedModelError as e:
        raise ValueError(
            f"recovering the label needs the layers of model {model.name!r} (the head's gradient), which jaxinv "
            f"cannot read: pass label= to the attack. Reason:\n{e}"
        ) from None
    gleaves, _ = validate_grads(model, grads, allow_batch=False)
    st = structure.stages[-1]
    if st.nodes.kind == "block":
        raise ValueError(f"the last stage {st.layer.path!r} of model {model.name!r} is a block (branches joined at "
                         "the logits): its gradient does not give the output error; pass label= to the attack")
    if st.nodes.bias_leaf >= 0:
        d, _ = head_delta_direction(structure, gleaves)
        return d.reshape(-1), True
    # No bias: sum_j gW[j, c] = <gW, B(1; e_c)> = (1/B) sum_k (p_kc - y_kc) * sum_j h_kj, sign-faithful when the
    # head's inputs h are non-negative (ReLU, sigmoid features).
    leaves = jax.tree_util.tree_leaves(model.params)
    k = st.nodes.kernel_leaf
    ones = jnp.ones(st.nodes.x_in.shape, leaves[k].dtype)
    n_out = st.layer.forward_rows
    eye = jnp.eye(n_out, dtype=leaves[k].dtype).reshape((n_out,) + tuple(st.nodes.z.shape))

    def row(e):
        _, pull = jax.vjp(lambda w: st.affine(ones, with_leaf(leaves, k, w)), leaves[k])
        return jnp.vdot(pull(e)[0], gleaves[k])

    return jax.vmap(row)(eye), False


def recover_labels(
    model: Model, grads: PyTree, batch_size: int, *, input_shape: tuple[int, ...] | None = None
) -> Int[Array, " B"]:
    r"""The labels of a batch gradient, from the head's gradient (count rule of LLG, Wainakh et al. 2022).

    With softmax cross-entropy averaged over a batch of :math:`B` examples, the head's bias gradient is

    .. math:: g_{b,c} = \frac1B \sum_{k=1}^B (p_{kc} - y_{kc}) = P_c - \frac{n_c}{B},
        \qquad P_c = \frac1B\sum_k p_{kc} \ge 0,

    with :math:`n_c` the number of examples of class :math:`c`. Hence (Yin et al. 2021; Wainakh et al. 2022):

    1. **presence**: a class with :math:`g_{b,c} < 0` is in the batch (it needs :math:`P_c < n_c / B`, true unless
       the model already predicts that class with high confidence);
    2. **count**: the mean *impact* :math:`\hat m` = mean of the non-negative entries estimates :math:`P_c`
       (absent classes have :math:`g_{b,c} = P_c`), so :math:`\hat n_c = B(\hat m - g_{b,c})`;
    3. **allocation**: every present class gets one label (most negative first, at most :math:`B`), the remaining
       :math:`B - \#\text{present}` go one by one to the class with the largest residual
       :math:`\hat n_c - \text{count}_c`.

    Assumptions: softmax cross-entropy with a mean over the batch (as :func:`jaxinv.client_gradient`); a head with
    a bias (without one, the row sums of the head's kernel gradient are used, which also needs non-negative head
    inputs, e.g. ReLU/sigmoid features); predicted probabilities of a class that vary little across the batch
    (untrained or early models, where label leakage is strongest). Counts are exact when
    :math:`p_{kc} \approx P_c`; the presence rule is more robust than the counts. For ``batch_size=1`` this is the
    iDLG rule (:func:`jaxinv.recover_label`).

    Args:
        model: the model.
        grads: one batch gradient (pytree shaped like ``model.params``).
        batch_size: :math:`B`, the number of images behind the gradient.
        input_shape: one input's shape (default: the model's).

    Returns:
        ``(B,)`` int32 labels in ascending order (a batch gradient does not reveal which image has which label).

    Raises:
        ValueError: a single-output model with ``batch_size > 1`` (the count of positives needs the unknown mean
            prediction: pass ``label=``) or without a head bias (no sign to read), or a head whose bias is shared
            over positions.

    Example:
        >>> grads = jaxinv.client_gradient(model, images[:4], jnp.array([3, 1, 7, 1]))
        >>> jaxinv.recover_labels(model, grads, 4).tolist()
        [1, 1, 3, 7]
    """
    batch_size = positive_int(batch_size, "batch_size", "recover_labels")
    d, exact = head_signal(model, grads, input_shape)
    K = d.shape[0]
    if K == 1 and not exact:
        raise ValueError(
            "recover_labels: the head has one output and no bias, so the sign of its gradient does not give the "
            "label (the kernel gradient's sign depends on the unknown head input); pass label= (0 or 1)"
        )
    if batch_size == 1:
        return recover_label(model, grads, input_shape=input_shape).reshape(1)
    if K == 1:
        raise ValueError(
            "recover_labels: a single-output (logistic) model's gradient gives the number of positives only "
            "relative to its unknown mean prediction; pass the labels (label=...) for batches"
        )
    B = batch_size
    neg = d < 0
    nonneg = ~neg
    m_hat = jnp.sum(jnp.where(nonneg, d, 0.0)) / jnp.maximum(jnp.sum(nonneg), 1)
    scale = jnp.maximum(jnp.max(jnp.abs(d)), jnp.finfo(d.dtype).tiny)
    est = B * (m_hat - d)

    def body(i, carry):
        counts, labels = carry
        first = neg & (counts == 0)
        prio = jnp.where(first, 1e6 - d / scale, est - counts)
        c = jnp.argmax(prio)
        return counts.at[c].add(1), labels.at[i].set(c)

    _, labels = jax.lax.fori_loop(0, B, body, (jnp.zeros((K,), jnp.int32), jnp.zeros((B,), jnp.int32)))
    return jnp.sort(labels).astype(jnp.int32)
