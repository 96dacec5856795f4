r"""The entry of the security metric, :func:`security`: the representative pass, every layer's certificate, the
indices, the score (plain or under the client's setting and a defence), the verdict and the advice, in one report.

The top of :mod:`jaxinv._security` (above every other module of it); used by :mod:`jaxinv._audit`, the CLI and
Flower.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_key, merge_options, no_more_keywords, positive_int
from .._client import Client
from .._gradient import check_labels, label_shape, resolve_loss, validate_grads
from .._model import Model, param_paths
from ..data import segmentation_masks
from ..engine import copa
from ._advice import advise
from ._blas import single_threaded_blas
from ._certificates import analyse_layer
from ._counting import copa_index, rgap_analysis
from ._defended import under_client
from ._pass import natural_probes, representative_pass
from ._rank import RANK_TOL
from ._report import LayerSecurity, SecurityReport
from ._score import predict_psnr, verdict_of

__all__ = ["LayerSecurity", "SecurityReport", "security"]

_OPTIONS = ("input_shape, key, params, grads, label, probes, defence, client (a jaxinv.Client: loss, batch_size, "
            "local_steps, local_lr)")


def _check_finite(params) -> None:
    """Eager: no tracers (the metric is not traceable) and no NaN/inf in the parameters (named)."""
    for path, leaf in zip(param_paths(params), jax.tree_util.tree_leaves(params)):
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError("jaxinv.security runs eagerly (ranks are integers): call it outside jax.jit / vmap")
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise ValueError(
                f"params[{path!r}] has {int(np.sum(~np.isfinite(a)))} non-finite value(s) (NaN/inf): the ranks of "
                "a network with non-finite weights are meaningless; reload or re-initialise the parameters")


def _at_params(model: Model, params: Any) -> Model:
    """``model`` at ``params`` (same structure and shapes), or ``model`` itself for ``None``."""
    if params is None:
        return model
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(model.params) or any(
            np.shape(a) != np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                        jax.tree_util.tree_leaves(model.params))):
        raise ValueError("params must have the structure and shapes of model.params (the model's parameters)")
    return Model(model.apply_fn, params, name=model.name, input_shape=model.default_input_shape, strict=model.strict)


def _structure(model: Model, input_shape):
    """The model's traced structure at ``input_shape``, a shape that does not fit its parameters named."""
    try:
        return model.structure(input_shape)
    except ValueError:  # includes UnsupportedModelError
        raise
    except Exception as e:  # e.g. flax's shape errors when the input does not fit the parameters
        shape = input_shape if input_shape is not None else model.default_input_shape
        raise ValueError(
            f"input_shape={tuple(shape) if shape is not None else None} is inconsistent with model {model.name!r}: "
            f"tracing it failed with {type(e).__name__}: {str(e).splitlines()[0][:300]}. Pass the shape of one input "
            f"without the batch axis that the model's parameters were built for"
            + (f" (the model was built for {model.default_input_shape})" if model.default_input_shape else "")
        ) from None


def _client(client: Client | None, legacy: dict[str, Any]) -> Client:
    """The client's setting from ``client`` and the earlier flat keywords (the one place they are mapped)."""
    client = merge_options(client, Client, legacy, "security")
    no_more_keywords(legacy, "security", _OPTIONS)
    if (client.batch_size or 1) > 1 and client.local_steps > 1:
        raise ValueError("security: batch_size > 1 with local_steps > 1 is not supported yet; give one of them")
    return client


def _analysed_input(model: Model, structure, keys, *, grads, label, loss: str, n_lab: int, lshape: tuple):
    """``(x, y, source)``: the input and label the layers are analysed at (module doc of :func:`security`)."""
    k_x, k_y = keys
    shape = structure.input_shape
    if grads is not None:
        validate_grads(model, grads, allow_batch=False)
        rec = copa(model, grads, label=label, input_shape=shape, client=Client(loss=loss))
        x = rec.image.reshape((1,) + shape).astype(structure.dtype)
        y = rec.label[0] if lshape else rec.label.reshape(-1)[0]
        return x, y, "copa reconstruction from the given gradient"
    x = jax.random.uniform(k_x, (1,) + shape, structure.dtype)
    if lshape:  # segmentation: a mask with natural regions (a probe image's luminance levels)
        y = (check_labels(jnp.asarray(label), n_lab).reshape(lshape) if label is not None else
             segmentation_masks(natural_probes(k_y, lshape + (1,), 1), classes=min(4, n_lab))[0])
    else:
        y = (check_labels(jnp.asarray(label), n_lab).reshape(()) if label is not None
             else jax.random.randint(k_y, (), 0, n_lab))
    return x, y, "gradient of a uniform [0, 1] random input"


def security(
    model: Model,
    *,
    input_shape: tuple[int, ...] | None = None,
    key: Any,
    params: Any = None,
    grads: Any = None,
    label: int | None = None,
    probes: int = 4,
    defence: Callable | None = None,
    client: Client | None = None,
    **legacy: Any,
) -> SecurityReport:
    r"""How secure is an architecture against layer-wise gradient inversion? Ranks, indices, score and advice.

    For every weight layer :math:`l` the shared gradient poses a linear system for the layer's input
    :math:`x_{l-1}`: forward rows :math:`A_l x = z_l - c_l` and gradient rows :math:`B_l(x;\delta_l) = g_{W_l}`
    (:mod:`jaxinv._maps`). The report gives each system's numerical rank, deficiency and conditioning (also for
    the forward rows alone), the COPA authors' index, R-GAP's counting index, and a score: the predicted PSNR of the
    layer-wise attack on a typical image (:func:`jaxinv._security.predict_psnr`), with a verdict and advice.

    **Which** :math:`\delta_l`. The gradient rows depend on :math:`\delta_l = \partial\ell/\partial z_l`.

    * Without ``grads``: the real per-layer :math:`\delta_l` of the gradient of a **random input** drawn from ``key``
      (uniform in ``[0, 1]``, the range of jaxinv's image models) with a random label (or ``label``), at the
      model's current weights (or ``params``). Ranks are generic: any input and weights in general position give the
      same integers (checked: random inits and images reproduce the COPA authors' values).
    * With ``grads`` (one client's shared gradient): the :math:`\delta_l` of that gradient as the attack recovers
      them, i.e. from a forward/backward pass on the :func:`jaxinv.copa` reconstruction with the recovered label.

    The expected lost energy (and so the score) is measured on synthetic natural-image probes
    (:func:`jaxinv._security.natural_probes`) rather than on the analysed input. The score is then capped by what
    the engine reaches on the probes' gradients rounded to the client's precision (the median probe's PSNR,
    :func:`jaxinv._security.precision_psnr`; the probes labelled as the model would label them); on a
    rank-deficient chain without blocks, where the attacks choose what the systems lose (the image nearest the flat
    one, the pull-back constraints), it is what COPA, with and without the pull-back, reaches on them: it predicts
    the best layer-wise attack.

    **How** (:mod:`jaxinv._security._certificates`): float64 pivoted Cholesky on Gram matrices of exact float32
    entries, with relative tolerance :data:`jaxinv._security.RANK_TOL` on the balanced operator; convolutions use the
    structure :math:`B = I\otimes B_0` of their gradient rows, dense layers the certificate "δ ≠ 0", large layers a
    banded Cholesky or tile certificate; a counting estimate (``exact=False``) only beyond those.

    Args:
        model: a :class:`jaxinv.Model` (``from_linen`` / ``from_nnx`` / ``from_fn``).
        input_shape: one input without the batch axis (default: the model's).
        key: a JAX PRNG key (random input, label and probes); the report is a deterministic function of it.
        params: analyse at these parameters instead of ``model.params`` (same structure).
        grads: one client's shared gradient (pytree like the parameters), to analyse at its :math:`\delta_l`.
        label: the label (default: random without ``grads``, recovered from ``grads`` otherwise); for a segmentation
            model a mask ``(H, W)`` (default: a natural random mask with 4 classes).
        probes: number of natural-image probes for the expected lost energy (and the defence's propagation).
        defence: a :mod:`jaxinv.defences` transformation (or any ``(grads, key) -> grads``) the client applies before
            sharing. The score then predicts the attack under it: the image error of the undefended score plus the
            error the defence adds, measured by inverting the probes' defended and clean gradients
            (:func:`jaxinv._security.noise_propagation`); every layer reports its ``noise_gain``.
        client: the client's setting (:class:`jaxinv.Client`; default ``Client()``: one image, a plain gradient):
            ``loss`` (``auto``: logistic for one output, cross-entropy otherwise); ``local_steps``, ``local_lr``:
            the client shares its weights after ``local_steps`` SGD steps with learning rate ``local_lr`` (FedAvg;
            the update is read as :func:`jaxinv.update_as_gradient`, then ``defence``), and the score accounts for
            the steps and for the rounding of the weights (even one step: in float32 the update
            :math:`\theta_0 - \eta g` keeps about :math:`\varepsilon|\theta|` of absolute precision, which alone
            takes COPA on R-GAP's CNN6 from 93 to 11 dB at :math:`\eta = 0.01`); ``batch_size`` :math:`B`: the
            score is then the PSNR of the batch layer-wise attack (:mod:`jaxinv.engine._batch`) on ``B`` natural
            probes sharing one gradient (after ``defence``), matched to them (:func:`jaxinv._security.batch_psnr`);
            the ranks stay those of single images. ``batch_size > 1`` with ``local_steps > 1`` is not supported yet.
        **legacy: the earlier flat keywords ``loss``, ``local_steps``, ``local_lr``, ``batch_size`` (moved onto
            ``client``: ``security(model, key=k, local_steps=5, local_lr=0.01)`` is
            ``security(model, key=k, client=Client(local_steps=5, local_lr=0.01))``).

    Returns:
        A :class:`SecurityReport` (``.layers``, ``.copa_index``, ``.rgap_index``, ``.score``, ``.verdict``,
        ``.advice``, ``.table()``, ``.to_dict()``).

    Raises:
        UnsupportedModelError: the model has operations the layer-wise methods cannot place.
        ValueError: ``input_shape`` inconsistent with the model, non-finite parameters (the message names the
            parameter), a ``params``/``grads`` pytree that does not match the model, a batch of gradients, an invalid
            client setting (:class:`jaxinv.Client` names the field), ``probes`` not a positive integer.
        TypeError: ``key`` is not a PRNG key, ``defence`` is not callable, an unknown keyword.

    Example:
        >>> module, variables = jaxinv.zoo.build("cnn3_c1", key=jax.random.key(0))
        >>> model = jaxinv.from_linen(module, variables, input_shape=(32, 32, 3))
        >>> rep = jaxinv.security(model, key=jax.random.key(1))
        >>> rep.copa_index, rep.verdict.split(":")[0]
        (-2266, 'PARTIAL')
        >>> print(rep.table().splitlines()[0])
        security of 'ZooNet', input (32, 32, 3) (deltas: gradient of a uniform [0, 1] random input)
        >>> rep = jaxinv.security(model, key=jax.random.key(1), client=jaxinv.Client(batch_size=4))  # doctest: +SKIP

    References:
        Chen & Campbell, arXiv 2111.10178 (COPA, the index); Zhu & Blaschko, ICLR 2021 (R-GAP, rank analysis).
    """
    t0 = time.perf_counter()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a jaxinv.Model (from_linen / from_nnx / from_fn), got {type(model).__name__}")
    key = check_key(key, "security", required=True)
    client = _client(client, legacy)
    probes = positive_int(probes, "probes", "security", what="natural-image probes")
    if defence is not None and not callable(defence):
        raise TypeError(f"defence must be a jaxinv.defences transformation (grads, key) -> grads, got "
                        f"{type(defence).__name__}")
    model = _at_params(model, params)
    _check_finite(model.params)
    structure = _structure(model, input_shape)
    shape = structure.input_shape
    leaves = jax.tree_util.tree_leaves(model.params)
    out_shape = structure.stages[-1].nodes.x_out.shape[1:]
    lshape = label_shape(out_shape)
    n_out = out_shape[-1] if lshape else math.prod(out_shape)
    loss = resolve_loss(client.loss, n_out)
    client = dataclasses.replace(client, loss=loss)
    k_x, k_y, k_p, k_a = jax.random.split(key, 4)
    x, y, source = _analysed_input(model, structure, (k_x, k_y), grads=grads, label=label, loss=loss,
                                   n_lab=2 if n_out == 1 else n_out, lshape=lshape)
    probe_imgs = natural_probes(k_p, shape, probes)
    lds = representative_pass(model, structure, leaves, x, jnp.asarray(y, jnp.int32), loss, probe_imgs)
    seed = int(jax.random.randint(k_a, (), 0, 2**31 - 1))
    with single_threaded_blas():
        layers = tuple(analyse_layer(ld, leaves, seed) for ld in lds)
    ci = copa_index(layers)
    ri, rl = rgap_analysis(layers)
    score = predict_psnr(layers, float(np.mean(probe_imgs.astype(np.float64) ** 2)))
    layers, shared = under_client(model, layers, score, client=client, defence=defence, probes=probe_imgs, key=k_p,
                                  input_shape=shape)
    fields = {"score": score} | shared
    fields.setdefault("verdict", verdict_of(layers, fields["score"]))
    return SecurityReport(
        model=model.name, input_shape=tuple(shape), layers=layers, copa_index=ci, rgap_index=ri, rgap_layers=rl,
        advice=advise(layers, structure, fields["score"]), delta_source=source, label=-1 if lshape else int(y),
        tolerance=RANK_TOL, seconds=time.perf_counter() - t0, **fields,
    )
