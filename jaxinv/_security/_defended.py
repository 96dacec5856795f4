r"""The defended score: how a defence, the client's local steps or its batch change what the attack recovers.

Above the engine (:func:`jaxinv.copa` inverts the probes' gradients), the representative pass's
:func:`natural_probes` and the score's verdicts (:mod:`._score`); used by the entry (:func:`jaxinv.security`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import metrics
from .._client import Client
from .._fedavg import shared_gradients
from .._gradient import client_gradient, label_shape, num_labels, stacked_gradients
from .._maps import stage_inputs
from .._model import Model
from ..engine import copa
from ._pass import natural_probes
from ._report import LayerSecurity
from ._score import defended_verdict, precision_verdict


PRECISION_DB = 3.0
"""The verdict names the gradient's precision when it lowers the score by more than this (dB) and the score is
below ``INVISIBLE_DB``."""

PROBE_SPREAD_DB = 10.0
"""Where the probes' precision PSNRs spread over more than this (dB), some of them below ``INVISIBLE_DB``, their
median is taken over twice as many."""

INVISIBLE_DB = 50.0
"""Above this score (dB) the rounding's error is far below what an image shows (8-bit quantisation alone is 59 dB):
the verdict keeps the systems' reason."""


def noise_propagation(model: Model, defence: Callable | None, probes: np.ndarray, *, key, input_shape=None,
                      client: Client | None = None) -> tuple[np.ndarray, float]:
    r"""How a defence's change to the gradient propagates through the layer-wise inversion.

    For natural probe images :math:`p_j` with labels as the model would give them (:func:`model_labels`), the clean
    gradients :math:`g_j` and the shared ones :math:`\tilde g_j = D(g_j; k_j)` are inverted by :func:`jaxinv.copa`
    with the labels known. With the ``client``'s ``local_lr`` given the client shares weights (even after one step);
    with ``local_steps``
    :math:`K > 1` it shares a FedAvg update, read as the first-order gradient
    :func:`jaxinv.update_as_gradient` before the defence, and COPA corrects it by simulating the steps
    (``copa(..., local_steps=K)``). Layer :math:`l`'s **noise gain** is
    :math:`\mathrm{RMS}(\tilde x_{l-1} - \hat x_{l-1}) / \mathrm{RMS}(\tilde g - g)` (reconstructed layer inputs
    from the shared and the clean gradient, RMS over entries and probes): how much one unit of gradient perturbation
    moves that layer's answer, the product of the conditioning of every layer above it. The image error the
    defence adds is :math:`\mathrm{MSE}_D = \mathrm{mean}\,(\mathrm{clip}(\tilde x_0) - \mathrm{clip}(\hat x_0))^2`
    (images in ``[0, 1]``).

    Returns:
        ``(gains per layer, input layer first; MSE_D)``.
    """
    client = Client() if client is None else client
    loss, local_lr = client.loss, client.local_lr
    shape = model.resolve_input_shape(input_shape)
    x = jnp.asarray(probes, model.structure(shape).dtype)
    k_y, k_d = jax.random.split(key)
    y = model_labels(model, x, k_y)
    g = stacked_gradients(model, x, y)
    gd = shared_gradients(model, x, y, client) if local_lr is not None else g
    if defence is not None:
        gd = jax.vmap(defence)(gd, jax.random.split(k_d, x.shape[0]))
    rc = copa(model, g, label=y, input_shape=shape, client=Client(loss=loss))
    rn = copa(model, gd, label=y, input_shape=shape, client=client if client.fedavg else Client(loss=loss))
    diff = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
            for a, b in zip(jax.tree_util.tree_leaves(gd), jax.tree_util.tree_leaves(g))]
    g_rms = math.sqrt(sum(float(np.sum(d * d)) for d in diff) / max(sum(d.size for d in diff), 1))
    gains = np.array([float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))
                      / max(g_rms, 1e-300) for a, b in zip(rn.layer_inputs, rc.layer_inputs)])
    mse = float(np.mean((np.clip(np.asarray(rn.image, np.float64), 0, 1)
                         - np.clip(np.asarray(rc.image, np.float64), 0, 1)) ** 2))
    return gains, mse


def model_labels(model: Model, x: jax.Array, key) -> jax.Array:
    r"""Labels for probe images as the model would give them: :math:`y_j \sim \mathrm{softmax}(f_\theta(x_j))`
    (one draw per probe), :math:`y_j \sim \mathrm{Bernoulli}(\sigma(f_\theta(x_j)))` for a single logistic output.

    The labels a client trains on are those its model is learning to predict. At initialisation the predictive
    distribution is close to uniform over the head (random labels); after training it avoids the classes the model
    never predicts. Random labels over a 10-way head trained on 4 classes put most probes on a dead class, whose
    gradient reconstructs worse (``benchmarks/bench_trained.py``, trained CNN6 after 300 steps, 8 float32 probes:
    median 23.0 dB with uniform labels, 33.7 dB with the model's; the held-out photos with trained-class labels:
    35.7 dB).

    Example:
        >>> y = model_labels(model, jnp.asarray(natural_probes(jax.random.key(0), (16, 16, 3), 3)), jax.random.key(1))
        >>> y.shape, bool(jnp.all((y >= 0) & (y < 10)))
        ((3,), True)
    """
    z = jnp.reshape(model(x), (x.shape[0], -1)).astype(jnp.float32)
    if z.shape[1] == 1:
        return jax.random.bernoulli(key, jax.nn.sigmoid(z[:, 0])).astype(jnp.int32)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def precision_psnr(model: Model, probes: np.ndarray, labels: jax.Array, *, input_shape=None,
                   client: Client | None = None, refine: bool = False) -> tuple[np.ndarray, np.ndarray]:
    r"""What the gradient's own precision leaves of the input: the engine's attack on natural probes.

    The probes' gradients (with ``labels``; the score draws them as the model would give them:
    :func:`model_labels`) are computed at the model's weights in its dtype, rounded to the
    client's ``dtype`` (:meth:`jaxinv.Client.rounded`) and inverted by :func:`jaxinv.copa` (with its noise-aware
    correction), labels known. Trained layers amplify the rounding (relative :math:`2^{-24}` in float32) by their
    conditioning; that is what a float32 client's gradient hides, and no rank count sees it.

    Per probe: the score takes their median (:func:`_precision`). ``refine=True`` inverts with the pull-back
    constraints (``copa(..., refine=True)``).

    Returns:
        ``(PSNR of each probe's box-clipped reconstruction, dB, shape (N,); the relative error of each layer's
        reconstructed input, input layer first, shape (L, N))``.
    """
    client = Client() if client is None else client
    shape = model.resolve_input_shape(input_shape)
    structure = model.structure(shape)
    x = jnp.asarray(probes, structure.dtype)
    y = jnp.asarray(labels)
    g = client.rounded(stacked_gradients(model, x, y))
    rec = copa(model, g, label=y, input_shape=shape, client=Client(loss=client.loss, dtype=client.dtype),
               refine=refine)
    leaves = jax.tree_util.tree_leaves(model.params)
    truth = jax.jit(jax.vmap(lambda xi: stage_inputs(structure.stages, leaves, xi)))(x)
    flat = lambda a: jnp.reshape(a, (x.shape[0], -1))  # noqa: E731
    errs = np.stack([np.asarray(jnp.linalg.norm(flat(r - t), axis=1) / jnp.maximum(jnp.linalg.norm(flat(t), axis=1),
                                                                                     jnp.finfo(t.dtype).tiny))
                     for r, t in zip(rec.layer_inputs, truth)])
    sq = (np.clip(np.asarray(rec.image, np.float64), 0, 1) - np.asarray(x, np.float64)) ** 2
    mse = np.mean(sq.reshape(sq.shape[0], -1), axis=1)
    return -10 * np.log10(np.maximum(mse, 1e-30)), errs


def batch_psnr(model: Model, batch_size: int, *, key, input_shape=None, client: Client | None = None,
               defence: Callable | None = None) -> float:
    r"""PSNR (dB) of :func:`jaxinv.copa` on one gradient of ``batch_size`` natural probes (:func:`natural_probes`,
    random labels without repeats where the head allows, ``defence`` applied), the reconstructions matched to the
    probes (:func:`jaxinv.metrics.match`); the mean over the batch of the matched MSE, in dB."""
    shape = model.resolve_input_shape(input_shape)
    k_p, k_y, k_d, k_c = jax.random.split(key, 4)
    x = jnp.asarray(natural_probes(k_p, shape, batch_size), model.structure(shape).dtype)
    K = num_labels(model, shape)
    y = jax.random.permutation(k_y, max(K, batch_size))[:batch_size] % K
    loss = "auto" if client is None else client.loss
    g = client_gradient(model, x, y, loss=loss)
    if defence is not None:
        g = defence(g, k_d)
    rec = copa(model, g, label=y, input_shape=shape, client=Client(loss=loss), key=k_c)
    img = jnp.clip(rec.image, 0, 1)
    perm, _ = metrics.match(img, x, metric="mse")
    mse = float(jnp.mean((img[jnp.asarray(perm)] - x) ** 2))
    return float(-10 * np.log10(max(mse, 1e-30)))


def under_client(model: Model, layers: tuple[LayerSecurity, ...], score: float, *, client: Client,
                 defence: Callable | None, probes: np.ndarray, key, input_shape: tuple[int, ...]
                 ) -> tuple[tuple[LayerSecurity, ...], dict]:
    r"""The score of :func:`jaxinv.security` under the client's setting and ``defence``.

    * ``client.batch_size`` :math:`B > 1`: the PSNR of the batch attack on :math:`B` probes (:func:`batch_psnr`,
      key ``fold_in(key, 2)``), capped by the single-image ``score``;
    * shared weights (``client.local_lr`` given: :math:`K` local steps, even one) or a ``defence``: the image error
      the change to the gradient adds (:func:`noise_propagation` of ``probes``, key ``fold_in(key, 1)``),
      :math:`-10\log_{10}(10^{-s/10} + \mathrm{MSE}_D)`; every layer gets its ``noise_gain``.

    * always (classification models): the gradient's own precision (``client.dtype``, default the model's):
      the score is at most the PSNR of the engine on the probes' rounded gradients (:func:`precision_psnr`, key
      ``fold_in(key, 3)``), every layer gets its ``precision_error``; the other settings start from that score.

    Returns:
        ``(layers, fields)``: the layers (with their precision errors and noise gains) and the
        :class:`jaxinv.SecurityReport` fields that change (``score``, ``verdict``, ``precision``, ``score_exact``,
        ``defence``, ``score_undefended``, ``noise_mse``).
    """
    exact = score
    precision, fields = _precision(model, layers, score, client, probes, key, input_shape)
    if precision is not None:
        layers, score = precision
    batch_size = client.batch_size or 1
    if batch_size > 1:
        name = " -> ".join([f"batch(B={batch_size})"] + ([getattr(defence, "name", "defence")] if defence else []))
        try:
            batch = batch_psnr(model, batch_size, key=jax.random.fold_in(key, 2), input_shape=input_shape,
                               client=client, defence=defence)
        except ValueError as e:
            raise ValueError(f"security(batch_size={batch_size}) runs the batch layer-wise attack on probes, which "
                             f"cannot run on {model.name!r}: {str(e).splitlines()[0]}") from None
        shared = min(batch, score)
        return layers, fields | dict(score=shared, verdict=defended_verdict(shared, name, score), defence=name,
                                     score_undefended=score)
    if defence is None and client.local_lr is None:
        if precision is not None:
            fields["score"] = score
            if score < min(exact - PRECISION_DB, INVISIBLE_DB):
                fields["verdict"] = precision_verdict(layers, score, exact, fields["precision"])
        return layers, fields
    names = ([f"fedavg(K={client.local_steps}, lr={float(client.local_lr):g})"] if client.local_lr is not None
             else []) + ([getattr(defence, "name", getattr(defence, "__name__", "defence"))] if defence is not None
                         else [])
    name = " -> ".join(names)
    try:
        gains, mse = noise_propagation(model, defence, probes, key=jax.random.fold_in(key, 1), input_shape=input_shape,
                                       client=client)
    except ValueError as e:
        raise ValueError(f"security(defence=...) measures the defence through the layer-wise inversion, which "
                         f"cannot run on {model.name!r}: {str(e).splitlines()[0]}") from None
    layers = tuple(dataclasses.replace(r, noise_gain=float(gn)) for r, gn in zip(layers, gains))
    shared = float(-10 * np.log10(10 ** (-score / 10) + mse))
    return layers, fields | dict(score=shared, verdict=defended_verdict(shared, name, score), defence=name,
                                 score_undefended=score, noise_mse=mse)


def _precision(model: Model, layers: tuple[LayerSecurity, ...], score: float, client: Client, probes, key,
               input_shape) -> tuple[tuple[tuple[LayerSecurity, ...], float] | None, dict]:
    r"""The score of the best layer-wise attack under the gradient's precision; ``None`` for a segmentation model
    (not analysed yet).

    COPA's: :math:`\min(s, p)`, the systems' ``score`` :math:`s` capped by the engine's PSNR on the probes' rounded
    gradients :math:`p` (:func:`precision_psnr`, key ``fold_in(key, 3)``): the PSNR of a typical image, the median
    over the probes. How far a trained network amplifies the rounding depends on the image and its label (a trained
    CNN6, 8 float32 probes: 13 to 38 dB), so where the probes' PSNRs spread over more than ``PROBE_SPREAD_DB`` and
    one of them shows a visible error (below ``INVISIBLE_DB``), as many probes again are drawn (key ``fold_in(key,
    4)``) and the median is taken over all of them. Where a layer below the head is rank-deficient and the chain has
    no blocks, the attacks choose the lost directions, and recover more than the minimum-norm solve the systems'
    score models: COPA by solving the bottom layers jointly for the image nearest the flat one
    (:mod:`jaxinv.engine._joint`; CNN4-c1 after 300 Adam steps, 4 photos: 9.1 -> 20.5 dB), with the pull-back
    constraints by the layer below, the pixel box and smoothness (R-GAP's CNN3-c1 after training: 18-19 dB by the
    minimum-norm solve, 24-26 dB with the pull-back). Both are measured on the same probes, and the score is
    :math:`\max(p, p_{pb})`: the systems' score no longer bounds them.

    Returns:
        ``((layers with their precision_error, score), fields)``.
    """
    structure = model.structure(input_shape)
    dtype = client.dtype or str(jnp.dtype(structure.dtype))
    if label_shape(structure.stages[-1].nodes.x_out.shape[1:]):
        return None, {}
    k = jax.random.fold_in(key, 3)
    x = np.asarray(probes)
    y = model_labels(model, jnp.asarray(x, structure.dtype), k)
    psnrs, errs = precision_psnr(model, x, y, input_shape=input_shape, client=client)
    if np.ptp(psnrs) > PROBE_SPREAD_DB and np.min(psnrs) < INVISIBLE_DB:  # a visible error: a typical one
        more = natural_probes(jax.random.fold_in(key, 4), input_shape, len(x))
        y_more = model_labels(model, jnp.asarray(more, structure.dtype), jax.random.fold_in(k, 1))
        p_more, e_more = precision_psnr(model, more, y_more, input_shape=input_shape, client=client)
        x, y = np.concatenate([x, more]), jnp.concatenate([y, y_more])
        psnrs, errs = np.concatenate([psnrs, p_more]), np.concatenate([errs, e_more], axis=1)
    p = float(np.median(psnrs))
    best = min(score, p)
    if any(r.deficiency > 0 for r in layers[:-1]) and not structure.blocks:
        pb = precision_psnr(model, x, y, input_shape=input_shape, client=client, refine=True)[0]
        best = max(p, float(np.median(pb)))
    errs = np.median(errs, axis=1)
    layers = tuple(dataclasses.replace(r, precision_error=float(e)) for r, e in zip(layers, errs))
    return (layers, best), dict(precision=dtype, score_exact=score)
