r"""DLG and iDLG: match the shared gradient in squared L2 distance with L-BFGS, from a random start.

**DLG** (Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019) optimises a dummy batch :math:`\hat x` and
dummy label logits :math:`\hat y` jointly:

.. math::

    \hat x^\star, \hat y^\star = \arg\min_{\hat x, \hat y}
        \big\| \nabla_\theta \ell\big(f_\theta(\hat x), \mathrm{softmax}(\hat y)\big) - g \big\|_2^2

(the norm over all parameter leaves), with :math:`\ell` the cross-entropy of the soft label against
:math:`\log\mathrm{softmax}(f_\theta(\hat x))`, mean over the batch; for a single-output model the soft binary
target is :math:`\sigma(\hat y)`. Both start from :math:`\mathcal N(0, 1)` (the paper's ``randn``) and are
optimised by L-BFGS (here ``optax.lbfgs`` with its zoom line search; the paper used PyTorch's L-BFGS with
``lr=1`` and no line search, 300 outer steps of up to 20 inner iterations).

**iDLG** (Zhao, Mopuri & Bilen, "iDLG: Improved Deep Leakage from Gradients", arXiv 2001.02610) reads the label
off the head's gradient first (:func:`jaxinv.recover_label`: with cross-entropy the head's bias gradient
:math:`\mathrm{softmax}(z) - e_y` is negative exactly at :math:`y`), then runs DLG on the data only. For batches
:func:`recover_labels` gives the label multiset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from .._checks import positive_int
from .._client import Client
from .._model import Model
from .._result import Reconstruction
from ._objectives import candidate_shared, hard_targets, l2_distance, minimise, random_image, relative_distance
from ._problem import Spec, attack_options, check_loop, run_attack

__all__ = ["DLGOptions", "dlg", "idlg"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DLGOptions:
    """Options of :func:`dlg` and :func:`idlg` (validated at construction; hashable: the compiled loop is keyed by
    them, a change recompiles).

    Attributes:
        max_steps: L-BFGS iterations (each one line search of one or more evaluations).
        memory_size: L-BFGS history (PyTorch's default, which DLG used, is 100).
        max_evaluations: optional budget of objective-and-gradient evaluations (line-search steps included):
            the run stops after the iteration that reaches it. For comparisons at equal cost with attacks that
            evaluate once per step (IG, hybrid).
        tol, window: stop when the objective's relative change over ``window`` steps is below ``tol``.
        log_every: objective logged (and ``callback(step, loss)`` called) every ``log_every`` steps.
        callback: optional host callback ``(step, loss) -> None`` (via ``jax.debug.callback``).

    Raises:
        ValueError: at construction, naming the field (a non-positive count, a negative or non-finite ``tol``).
        TypeError: a ``callback`` that is not callable.

    Example:
        >>> DLGOptions(max_steps=300).memory_size
        100
        >>> DLGOptions(max_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: DLGOptions: max_steps must be a positive integer, got 0
    """

    max_steps: int = 1000
    memory_size: int = 100
    max_evaluations: int | None = None
    tol: float = 1e-6
    window: int = 25
    log_every: int = 10
    callback: Callable[[int, float], Any] | None = None

    def __post_init__(self):
        check_loop(self, "DLGOptions")
        object.__setattr__(self, "memory_size", positive_int(self.memory_size, "memory_size", "DLGOptions"))
        if self.max_evaluations is not None:
            object.__setattr__(self, "max_evaluations",
                               positive_int(self.max_evaluations, "max_evaluations", "DLGOptions"))


def _dlg_one(model: Model, gleaves, labels, key, spec: Spec):
    """DLG (labels ``None``) or iDLG (labels ``(B,)``) on one target; returns ``(x, label, trace, distance)``."""
    o: DLGOptions = spec.options
    K = spec.num_outputs
    dtype = model.dtype
    kx, ky = jax.random.split(key)
    x0 = random_image(kx, (spec.batch_size,) + spec.input_shape, None, dtype)
    z0 = {"x": x0}
    if labels is None:
        z0["y"] = jax.random.normal(ky, (spec.batch_size, K), dtype)

    def targets(z):
        if labels is not None:
            return hard_targets(labels, K, dtype)
        return jax.nn.sigmoid(z["y"]) if K == 1 else jax.nn.softmax(z["y"], axis=-1)

    def shared(x, t):
        return candidate_shared(model.apply_fn, model.params, x, t, spec.client)

    def f(z):
        return l2_distance(shared(z["x"], targets(z)), gleaves)

    opt = optax.lbfgs(memory_size=o.memory_size)
    value_and_grad = optax.value_and_grad_from_state(f)

    def step(carry, i):
        z, state, evals = carry
        value, grad = value_and_grad(z, state=state)
        updates, state = opt.update(grad, state, z, value=value, grad=grad, value_fn=f)
        # value_and_grad_from_state reuses the line search's last evaluation (a fresh one on the first step only);
        # each line-search step is one evaluation of the objective and its gradient.
        evals = evals + (i == 0) + optax.tree_utils.tree_get(state, "num_linesearch_steps")
        return (optax.apply_updates(z, updates), state, evals), value, z

    stop = None if o.max_evaluations is None else (lambda c: c[2] >= o.max_evaluations)
    res = minimise(step, (z0, opt.init(z0), jnp.zeros((), jnp.int32)), z0, max_steps=o.max_steps,
                   log_every=o.log_every, tol=o.tol, window=o.window, callback=o.callback, stop=stop)
    z = res.params
    if labels is None:
        lab = (z["y"][:, 0] > 0).astype(jnp.int32) if K == 1 else jnp.argmax(z["y"], axis=-1).astype(jnp.int32)
    else:
        lab = labels.astype(jnp.int32)
    return z["x"], lab, res.trace, relative_distance(shared(z["x"], hard_targets(lab, K, dtype)), gleaves)


def dlg(model: Model, grads: PyTree, *, label: int | Int[Array, "..."] | None = None,
        input_shape: tuple[int, ...] | None = None, client: Client | None = None, options: DLGOptions | None = None,
        key: PRNGKeyArray | None = None, **legacy: Any) -> Reconstruction:
    r"""Deep Leakage from Gradients: L-BFGS on dummy data and a dummy soft label, squared L2 gradient distance.

    .. math:: \min_{\hat x, \hat y}\ \sum_{\text{leaves}}
        \big\|\nabla_\theta \ell(f_\theta(\hat x), \mathrm{softmax}(\hat y)) - g\big\|_2^2

    The whole optimisation is one compiled ``lax.while_loop`` of ``optax.lbfgs`` steps (zoom line search, the
    gradient reused from the line search's state: ``optax.value_and_grad_from_state``).

    Args:
        model: the model (any differentiable ``apply_fn``; layer structure not needed).
        grads: the shared gradient: one batch gradient, or ``T`` single-image gradients stacked on a leading axis.
        label: ``None`` (DLG proper: the label is optimised as a soft label and its argmax reported); given labels
            are held fixed (then this is iDLG with a known label).
        input_shape: one input's shape (default: the model's).
        client: the client's setting (:class:`jaxinv.Client`): ``loss`` (checked against the model),
            ``batch_size`` (images behind the gradient; default: from ``label``, else 1), and ``local_steps``,
            ``local_lr`` for a FedAvg update (the candidate's update is simulated, as :func:`jaxinv.attacks.ig`
            does).
        options: the optimiser's settings, a :class:`DLGOptions` (``max_steps``, ``memory_size``,
            ``max_evaluations``, ``tol``, ``window``, ``log_every``, ``callback``).
        key: PRNG key of the random start (required).
        **legacy: the fields of ``client`` and ``options`` as flat keywords (``max_steps=300``, ``loss=...``),
            as in earlier versions; an unknown keyword is a ``TypeError`` listing them.

    Returns:
        A :class:`jaxinv.Reconstruction`: ``image`` ``(B, *input_shape)`` (``(T, ...)`` for stacked targets),
        ``label`` ``(B,)``, ``loss_trace`` ``(1, ceil(max_steps/log_every))`` per shared gradient (NaN after an
        early stop), ``gradient_distance`` ``(1,)``: relative L2 distance of the gradient of (image, hard label)
        to the shared one.

    Example:
        >>> rec = jaxinv.attack("dlg", model, grads, key=jax.random.key(0))
        >>> rec = dlg(model, grads, options=DLGOptions(max_steps=300), key=jax.random.key(0))

    References:
        L. Zhu, Z. Liu, S. Han. Deep Leakage from Gradients. NeurIPS 2019.
    """
    client, options = attack_options("dlg", client, options, DLGOptions, legacy)
    return run_attack("dlg", _dlg_one, model, grads, label=label, input_shape=input_shape, key=key, client=client,
                      options=options, recover=False)


def idlg(model: Model, grads: PyTree, *, label: int | Int[Array, "..."] | None = None,
         input_shape: tuple[int, ...] | None = None, client: Client | None = None, options: DLGOptions | None = None,
         key: PRNGKeyArray | None = None, **legacy: Any) -> Reconstruction:
    r"""Improved DLG: the label from the head's gradient, then DLG on the data only.

    The label is :func:`jaxinv.recover_label` (one image: the negative entry of the head's bias gradient) or
    :func:`jaxinv.recover_labels` (``batch_size > 1``: the LLG count rule); a given ``label`` is used as is. Then

    .. math:: \min_{\hat x}\ \sum_{\text{leaves}} \big\|\nabla_\theta \ell(f_\theta(\hat x), y) - g\big\|_2^2

    by L-BFGS, exactly as :func:`dlg` (same arguments, same :class:`DLGOptions`). Label recovery needs the model's
    layer structure (a head that jaxinv can read); otherwise pass ``label``.

    References:
        B. Zhao, K. R. Mopuri, H. Bilen. iDLG: Improved Deep Leakage from Gradients. arXiv 2001.02610, 2020.
    """
    client, options = attack_options("idlg", client, options, DLGOptions, legacy)
    return run_attack("idlg", _dlg_one, model, grads, label=label, input_shape=input_shape, key=key, client=client,
                      options=options, recover=True)
