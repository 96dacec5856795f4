r"""Inverting Gradients (Geiping, Bauermeister, Dröge & Moeller, NeurIPS 2020): cosine distance + TV, signed Adam.

.. math::

    \hat x^\star = \arg\min_{\hat x \in [lo, hi]^n}\
        1 - \frac{\langle \nabla_\theta \ell(f_\theta(\hat x), y),\, g\rangle}
                 {\|\nabla_\theta \ell(f_\theta(\hat x), y)\|\,\|g\|}
        \;+\; \alpha_{TV}\, \mathrm{TV}(\hat x)

The paper's recipe, as its code (``inversefed``) runs it:

* the gradient of the objective is replaced by its **sign** before Adam ("signed gradients"), Adam with learning
  rate 0.1;
* the learning rate is divided by 10 at 3/8, 5/8 and 7/8 of the iterations (``MultiStepLR``);
* after every step the candidate is **projected** onto the input box (the valid image range);
* several **restarts** from different random starts, keeping the one with the smallest gradient distance;
* labels known, or recovered from the head's gradient (iDLG).

**Adapting it to this library.** Two of the paper's numbers depend on conventions, not on the method:

* *Learning rate.* ``inversefed`` optimises the CIFAR-*normalised* image :math:`(x - \mu)/\sigma` with
  :math:`\sigma \approx 0.25`, and a signed-Adam step moves every pixel by up to ``lr``. The zoo models take
  images in ``[0, 1]`` (they subtract 0.5 inside), so the same pixel step is :math:`0.1\,\sigma \approx 0.025`:
  our default ``lr=0.025`` (:class:`IGOptions`). (``lr=0.1`` on ``[0, 1]`` images takes 4x the paper's steps: a
  few dB worse.)
* *TV weight.* :math:`\alpha_{TV}` only means something relative to the cosine distance, whose scale depends on
  the network. ``inversefed``'s command-line default is ``--tv 1e-4`` (its notebooks set it per experiment, and
  its attack on weight updates uses 0); on ReLU nets, where a random image is at distance of order 1 (~0.9 on
  the zoo's ``cnn3_c1``), that is a mild prior. On small untrained sigmoid nets the concatenated gradient is
  dominated by the head's, which barely depends on the input: on ``lenet_dlg`` a random image is at distance
  ~3e-6 and the true image plus noise of std 0.03 at ~2e-8, so ``1e-4 * TV`` (~2e-5 at the true image) outweighs
  the data term by orders of magnitude and the attack returns a smoothed image (~20 dB); even ``1e-8`` costs
  ~8 dB there. The gradient of such a net determines the image (DLG recovers it without a prior), so our default
  is ``tv_weight=0``. Set it for ill-posed cases (deep or trained nets, batches, rank-deficient layers) at a
  small fraction of the distance the attack reaches; ``loss_trace[:, 0]``, the objective at the random start,
  shows the scale.

The paper ran 24,000 iterations (``inversefed``'s command line: 4,000). Our default is ``max_steps=2000``, enough
for tiny networks (raise it for deep ones). The learning-rate milestones are fractions of ``max_steps``; the early
stop (the best objective improving by less than ``tol`` relatively over ``window`` steps) is only tested after the
last milestone, so a plateau at a large learning rate never ends a run before the decays that refine it.

Numerics: the cosine distance is evaluated as :math:`\tfrac12\|\hat g/\|\hat g\| - g/\|g\|\|^2`
(:func:`jaxinv.attacks.cosine_distance`), not as ``1 - cos``, which in float32 cannot resolve distances below
~1e-7, i.e. nothing closer than ~20 dB on ``lenet_dlg`` (there, with ``1 - cos`` and no TV, the objective
reaches rounding noise, 0 or -1e-7, within ~100 steps and the attack stalls at ~19 dB).

On ``lenet_dlg`` and 8 bundled photos (``benchmarks/bench_attacks.py``) the defaults give 43 dB mean PSNR
(37-49) in 2000 steps; the paper's numbers taken literally on ``[0, 1]`` inputs (``lr=0.1, tv_weight=1e-4``)
give 21 dB, ``lr=0.1`` alone 40 dB.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from .._checks import positive_int
from .._client import Client
from .._model import Model
from .._priors import check_box, project_box, total_variation
from .._result import Reconstruction
from ._objectives import candidate_shared, cosine_distance, hard_targets, minimise, random_image, relative_distance
from ._problem import Spec, attack_options, check_loop, number, run_attack

__all__ = ["IGOptions", "ig", "milestones", "multistep_schedule"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class IGOptions:
    r"""Options of :func:`ig` (validated at construction; hashable: the compiled loop is keyed by them, a change
    recompiles).

    Attributes:
        max_steps: Adam iterations (the paper: 24,000).
        lr: Adam's initial learning rate, in units of the input, divided by 10 at 3/8, 5/8 and 7/8 of ``max_steps``.
            The default 0.025 is the paper's 0.1 on CIFAR-normalised inputs (std ~0.25) carried over to ``[0, 1]``
            inputs; scale it with the input range for other boxes (see the module docstring).
        tv_weight: :math:`\alpha_{TV}`, to be weighed against the cosine distance, whose scale depends on the
            network (``inversefed``'s default 1e-4 is a mild prior on ReLU nets, where a random start is at
            distance ~1). Default 0: on small untrained nets the gradient alone determines the image, the distance
            is tiny (~3e-6 at a random start on ``lenet_dlg``) and any paper-sized TV term dominates it (see the
            module docstring).
        box: the model's valid input range ``(lo, hi)``: random starts are uniform in it and every step is projected
            onto it (``(0, 1)`` for :mod:`jaxinv.zoo` models); ``None``: unconstrained, ``N(0, 1)`` starts.
        restarts: independent random starts; the one with the smallest cosine distance wins.
        signed: apply Adam to the sign of the gradient (the paper's choice).
        log_every: objective logged (and ``callback(step, loss)`` called) every ``log_every`` steps.
        callback: optional host callback ``(step, loss) -> None`` (via ``jax.debug.callback``; called per restart).
        tol, window: stop when the best objective so far improved by less than ``tol`` (relatively) over the last
            ``window`` steps, tested only after the last learning-rate decay (``tol=0``: always run ``max_steps``).

    Raises:
        ValueError: at construction, naming the field (a non-positive count or learning rate, a negative weight,
            ``lo >= hi``).
        TypeError: a ``box`` that is not a pair of numbers, a ``signed`` that is not a bool, a ``callback`` that is
            not callable.

    Example:
        >>> IGOptions(max_steps=1000, restarts=4).lr
        0.025
        >>> IGOptions(box=(1.0, 0.0))
        Traceback (most recent call last):
        ...
        ValueError: IGOptions: box=(lo, hi) needs lo < hi, got (1.0, 0.0)
    """

    max_steps: int = 2000
    lr: float = 0.025
    tv_weight: float = 0.0
    box: tuple[float, float] | None = (0.0, 1.0)
    restarts: int = 1
    signed: bool = True
    log_every: int = 10
    callback: Callable[[int, float], Any] | None = None
    tol: float = 1e-4
    window: int = 100

    def __post_init__(self):
        where = "IGOptions"
        check_loop(self, where)
        if not isinstance(self.signed, (bool, np.bool_)):
            raise TypeError(f"{where}: signed must be True or False, got {self.signed!r}")
        fixed = dict(lr=number(self.lr, "lr", where, positive=True),
                     tv_weight=number(self.tv_weight, "tv_weight", where), box=check_box(self.box, where),
                     restarts=positive_int(self.restarts, "restarts", where), signed=bool(self.signed))
        for name, value in fixed.items():
            object.__setattr__(self, name, value)


def milestones(max_steps: int) -> tuple[int, int, int]:
    r"""The steps at which :func:`multistep_schedule` divides the learning rate by 10:
    :math:`\lfloor 3N/8\rfloor, \lfloor 5N/8\rfloor, \lfloor 7N/8\rfloor` (at least 1) of :math:`N` = ``max_steps``."""
    return tuple(max(1, int(max_steps * frac)) for frac in (3 / 8, 5 / 8, 7 / 8))


def multistep_schedule(lr: float, max_steps: int) -> optax.Schedule:
    r"""Geiping et al.'s ``MultiStepLR``: :math:`\eta_i = \eta\, 0.1^{\#\{m \le i\}}`, milestones
    :math:`m \in \{\lfloor 3N/8\rfloor, \lfloor 5N/8\rfloor, \lfloor 7N/8\rfloor\}` of :math:`N` = ``max_steps``."""
    bounds: dict[int, float] = {}
    for m in milestones(max_steps):
        bounds[m] = bounds.get(m, 1.0) * 0.1
    return optax.piecewise_constant_schedule(lr, bounds)


def _ig_one(model: Model, gleaves, labels, key, spec: Spec):
    """One target: ``restarts`` runs (vmapped, one loop), the best by cosine distance."""
    o: IGOptions = spec.options
    dtype = model.dtype
    target = hard_targets(labels, spec.num_outputs, dtype)

    def shared(x):  # what the candidate would share: its gradient, or its simulated FedAvg update as a gradient
        return candidate_shared(model.apply_fn, model.params, x, target, spec.client)

    def grad_dist(x):
        return cosine_distance(shared(x), gleaves)

    def f(x):
        return grad_dist(x) + o.tv_weight * total_variation(x)

    opt = optax.adam(multistep_schedule(o.lr, o.max_steps))

    def step(carry, i):
        x, state = carry
        value, g = jax.value_and_grad(f)(x)
        if o.signed:
            g = jnp.sign(g)
        updates, state = opt.update(g, state, x)
        return (project_box(optax.apply_updates(x, updates), o.box), state), value, x

    def run(k):
        x0 = random_image(k, (spec.batch_size,) + spec.input_shape, o.box, dtype)
        res = minimise(step, (x0, opt.init(x0)), x0, max_steps=o.max_steps, log_every=o.log_every, tol=o.tol,
                       window=o.window, min_steps=milestones(o.max_steps)[-1], callback=o.callback)
        return res.params, res.trace, grad_dist(res.params)

    xs, traces, dists = jax.vmap(run)(jax.random.split(key, o.restarts))
    best = jnp.argmin(jnp.where(jnp.isfinite(dists), dists, jnp.inf))
    x = xs[best]
    return x, labels.astype(jnp.int32), traces[best], relative_distance(shared(x), gleaves)


def ig(model: Model, grads: PyTree, *, label: int | Int[Array, "..."] | None = None,
       input_shape: tuple[int, ...] | None = None, client: Client | None = None, options: IGOptions | None = None,
       key: PRNGKeyArray | None = None, **legacy: Any) -> Reconstruction:
    r"""Inverting Gradients: cosine gradient distance + total variation, signed Adam, box projection, restarts.

    .. math:: \min_{\hat x\in[lo,hi]^n}\ 1 - \cos\big(\nabla_\theta\ell(f_\theta(\hat x), y),\ g\big)
        + \alpha_{TV}\,\mathrm{TV}(\hat x)

    All restarts run side by side (``vmap``) in one compiled ``lax.while_loop``.

    Args:
        model: the model (any differentiable ``apply_fn``; the layer structure is needed only to recover labels).
        grads: the shared gradient: one batch gradient, or ``T`` single-image gradients stacked on a leading axis.
        label: the labels (int or ``(B,)``); ``None`` recovers them from the head's gradient
            (:func:`jaxinv.recover_label`, or :func:`jaxinv.recover_labels` for ``batch_size > 1``).
        input_shape: one input's shape (default: the model's).
        client: the client's setting (:class:`jaxinv.Client`): ``loss`` (checked against the model),
            ``batch_size`` (images behind the gradient; default: from ``label``, else 1), and ``local_steps``
            :math:`K > 1`, ``local_lr`` :math:`\eta` when the shared object is a FedAvg update, passed as
            :func:`jaxinv.update_as_gradient` (:math:`-\Delta / (K\eta)`): the candidate's update is simulated
            (the :math:`K` steps unrolled and differentiated through) instead of its gradient (Geiping et al. 2020,
            Sec. 5).
        options: the optimiser's settings, an :class:`IGOptions` (``max_steps``, ``lr``, ``tv_weight``, ``box``,
            ``restarts``, ``signed``, ``tol``, ``window``, ``log_every``, ``callback``).
        key: PRNG key of the random starts (required).
        **legacy: the fields of ``client`` and ``options`` as flat keywords (``max_steps=1000``,
            ``local_steps=5``, ...), as in earlier versions; an unknown keyword is a ``TypeError`` listing them.

    Returns:
        A :class:`jaxinv.Reconstruction`: ``image`` ``(B, *input_shape)``, ``label`` ``(B,)``, ``loss_trace``
        ``(1, ceil(max_steps/log_every))`` of the best restart (NaN after an early stop), ``gradient_distance``
        ``(1,)`` (relative L2 distance, not the cosine one).

    Example:
        >>> rec = jaxinv.attack("ig", model, grads, key=jax.random.key(0), restarts=4)
        >>> rec = ig(model, grads, options=IGOptions(restarts=4), key=jax.random.key(0))

    References:
        J. Geiping, H. Bauermeister, H. Dröge, M. Moeller. Inverting Gradients - How easy is it to break privacy in
        federated learning? NeurIPS 2020.
    """
    client, options = attack_options("ig", client, options, IGOptions, legacy)
    return run_attack("ig", _ig_one, model, grads, label=label, input_shape=input_shape, key=key, client=client,
                      options=options, recover=True)
