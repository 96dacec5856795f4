"""Audit an architecture: the security analysis, then real attacks on real images, scored against the truth.

:func:`audit` is the library side of ``jaxinv audit``. For every image :math:`x_i` the client's single-image
gradient :math:`g_i = \\nabla_\\theta \\ell(f_\\theta(x_i), y_i)` is computed (or, for a FedAvg client with
:math:`K` local steps, its update read as a gradient, :math:`-\\Delta_i/(K\\eta)`); the ``T`` gradients are stacked
on a leading axis and every attack inverts all of them in one call (independent single-image targets). Each
reconstruction :math:`\\hat x_i` is scored against :math:`x_i` (PSNR and SSIM on ``[0, 1]`` images after clipping),
the recovered labels against :math:`y_i`; layer-wise attacks also give per-layer residuals (mean over images). The
:func:`jaxinv.security` report names the layer the verdict hinges on (:class:`LeakingLayer`).

The result (:class:`AuditResult`) renders as text (``.table()``), JSON (``.to_dict()``) and a self-contained HTML
report with PNGs (``.save(out_dir)``, see :mod:`jaxinv.report`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Int, PRNGKeyArray

from .. import metrics
from .._checks import check_key, positive_int
from .._client import Client
from .._fedavg import shared_gradients
from .._gradient import check_labels, num_labels
from .._model import Model
from .._security import security
from ..attacks import ATTACKS, attack, check_options
from ._result import AttackResult, AuditResult, LayerResidual, leaking_layer, nanmean

#: Options :func:`audit` gives the optimisation attacks unless ``attack_options`` says otherwise: budgets that keep
#: an audit of a zoo model on a few images in minutes on a CPU (the attacks' own defaults are the papers' budgets).
AUDIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "ig": {"max_steps": 1000},
    "dlg": {"max_steps": 300},
    "idlg": {"max_steps": 300},
    "hybrid": {"max_steps": (500, 250, 100)},
}
#: Attacks with an iteration budget (``max_steps``) that :func:`step_options` caps.
OPTIMISATION_ATTACKS: tuple[str, ...] = ("dlg", "idlg", "ig", "hybrid")


def step_options(attacks: Sequence[str], steps: int) -> dict[str, dict[str, Any]]:
    """``attack_options`` giving every optimisation attack in ``attacks`` an iteration budget of ``steps``.

    ``dlg``, ``idlg`` and ``ig`` get ``max_steps=steps``; ``hybrid`` (per-layer budgets) gets
    ``(steps, ceil(steps / 2), ceil(steps / 10))``, the proportions of its defaults. Layer-wise attacks are untouched.

    Raises:
        ValueError: ``steps`` is not a positive integer.
    """
    positive_int(steps, "steps")
    out: dict[str, dict[str, Any]] = {}
    for name in attacks:
        if name == "hybrid":
            out[name] = {"max_steps": (steps, -(-steps // 2), -(-steps // 10))}
        elif name in OPTIMISATION_ATTACKS:
            out[name] = {"max_steps": steps}
    return out


# ============================================================================================== checks
def check_attacks(attacks: Any) -> tuple[str, ...]:
    """``attacks`` (one name or a sequence of names) as a tuple of distinct registered attack names.

    Raises:
        TypeError: not a name or a sequence of names.
        ValueError: empty, or an unknown attack (the message lists :data:`jaxinv.ATTACKS`).
    """
    if isinstance(attacks, str):
        attacks = (attacks,)
    try:
        names = tuple(dict.fromkeys(attacks))
    except TypeError:
        raise TypeError(f"attacks must be a sequence of attack names, got {type(attacks).__name__}") from None
    if not names:
        raise ValueError(f"attacks is empty; choose from {', '.join(ATTACKS)}")
    bad = [a for a in names if not isinstance(a, str) or a not in ATTACKS]
    if bad:
        raise ValueError(f"attacks: unknown attack {bad[0]!r}; the registered attacks are: {', '.join(ATTACKS)}")
    return names


def check_client(client: Client | None, where: str, *, batches: bool = False) -> Client:
    """The client's setting (default ``Client()``: one image, one local step, the ``auto`` loss).

    Args:
        client: a :class:`jaxinv.Client` or ``None``.
        where: the caller, for the messages.
        batches: whether the caller can attack batch gradients (``batch_size > 1``); an audit or a sweep scores
            each image's own gradient and cannot.

    Raises:
        TypeError: ``client`` is not a :class:`jaxinv.Client`.
        ValueError: ``batch_size > 1`` where ``batches`` is False.
    """
    if client is None:
        return Client()
    if not isinstance(client, Client):
        raise TypeError(f"{where}: client must be a jaxinv.Client(loss, batch_size, local_steps, local_lr), got "
                        f"{type(client).__name__}")
    if not batches and client.batch_size not in (None, 1):
        raise ValueError(f"{where}: client.batch_size={client.batch_size}, but {where} scores each image's own "
                         "single-image gradient: use batch_size=None (attack batch gradients with jaxinv.attack)")
    return client


def check_client_fits(model: Model, input_shape: tuple[int, ...], client: Client) -> None:
    """Eager ``ValueError`` when the client's setting does not fit the model (e.g. ``loss="cross_entropy"`` on a
    model with one output): :func:`shared_gradients` traced on one abstract image, nothing computed."""
    if client == Client():
        return
    x = jax.ShapeDtypeStruct((1, *input_shape), param_dtype(model))
    jax.eval_shape(lambda a, b: shared_gradients(model, a, b, client), x, jax.ShapeDtypeStruct((1,), jnp.int32))


def client_keywords(client: Client) -> dict[str, Any]:
    """The fields of ``client`` that differ from ``Client()``, as the flat keywords :func:`jaxinv.security` and the
    attacks take (``loss``, ``batch_size``, ``local_steps``, ``local_lr``): empty for the default client.

    Example:
        >>> client_keywords(Client(local_steps=2, local_lr=0.1))
        {'local_steps': 2, 'local_lr': 0.1}
    """
    out: dict[str, Any] = {}
    if client.loss != "auto":
        out["loss"] = client.loss
    if client.batch_size not in (None, 1):
        out["batch_size"] = client.batch_size
    if client.fedavg:
        out.update(local_steps=client.local_steps, local_lr=client.local_lr)
    return out


def merged_options(names: tuple[str, ...], attack_options: dict | None, client: Client | None = None, *,
                   defaults: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """``{attack: options}`` for ``names``: ``defaults`` (:data:`AUDIT_DEFAULTS`), then the client's setting
    (:func:`client_keywords`: what the attacker assumes about the client), then ``attack_options``, each checked by
    the registry.

    Raises:
        TypeError: ``attack_options`` is not ``{attack: {option: value}}``; an option unknown to its attack or of
            the wrong type (naming the attack and option).
        ValueError: options for an attack not in ``names``; an attack that cannot model the client (e.g. ``dlg``
            for a FedAvg client with ``local_steps > 1``).
    """
    defaults = AUDIT_DEFAULTS if defaults is None else defaults
    attack_options = {} if attack_options is None else attack_options
    if not isinstance(attack_options, dict) or not all(isinstance(v, dict) for v in attack_options.values()):
        raise TypeError("attack_options must be a dict {attack name: {option: value}}, e.g. "
                        "{'ig': {'max_steps': 200}}")
    extra = [k for k in attack_options if k not in names]
    if extra:
        raise ValueError(f"attack_options has options for {extra[0]!r}, which is not in attacks {names}")
    implied = client_keywords(client) if client is not None else {}
    for n in names:
        for k, v in implied.items():
            try:
                check_options(n, {k: v})
            except TypeError:
                raise ValueError(f"attack {n!r} cannot model this client ({client}): it takes no {k!r}; leave {n!r} "
                                 "out of attacks, or audit the default client") from None
    opts = {n: {**defaults.get(n, {}), **implied, **attack_options.get(n, {})} for n in names}
    for n in names:
        check_options(n, opts[n])
    return opts


def check_images(images: Any, input_shape: tuple[int, ...], *, name: str = "images") -> jax.Array:
    """``images`` as an array ``(N, *input_shape)`` of finite values in ``[0, 1]``, or a ``ValueError`` naming it."""
    try:
        x = jnp.asarray(images)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array of shape (N, *{input_shape}), got {type(images).__name__}") from None
    if x.ndim == len(input_shape):
        x = x[None]
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape) or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, {', '.join(map(str, input_shape))}) for this model's input "
                         f"{tuple(input_shape)}, got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point in [0, 1], got dtype {x.dtype}")
    xs = np.asarray(x)
    if not np.all(np.isfinite(xs)):
        raise ValueError(f"{name} has non-finite values (NaN/inf)")
    if xs.min() < -1e-6 or xs.max() > 1 + 1e-6:
        raise ValueError(f"{name} must be in [0, 1] (the range PSNR/SSIM and the attacks' box assume), got "
                         f"values in [{xs.min():.3g}, {xs.max():.3g}]; rescale, and normalise inside the model")
    return x


def param_dtype(model: Model) -> jnp.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none): the audit's dtype."""
    for leaf in jax.tree_util.tree_leaves(model.params):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            return jnp.result_type(leaf)
    return jnp.dtype(jnp.float32)


# ============================================================================================== one attack
def image_scores(images: Float[ArrayLike, "N *shape"], truth: Float[ArrayLike, "N *shape"]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR and SSIM of ``images`` clipped to ``[0, 1]`` against ``truth`` (data range 1), in the
    truth's dtype; SSIM is NaN for images smaller than its 11 x 11 window, both are NaN for non-image inputs."""
    t = jnp.asarray(truth)  # the model's dtype: float64 reconstructions keep their precision
    img = jnp.clip(jnp.asarray(images), 0.0, 1.0).astype(t.dtype).reshape(t.shape)
    if img.ndim != 4:  # metrics work on (N, H, W, C) images
        return np.full(len(t), np.nan), np.full(len(t), np.nan)
    p = np.asarray(metrics.psnr(img, t), np.float64)
    s = (np.asarray(metrics.ssim(img, t), np.float64) if min(img.shape[1:3]) >= 11
         else np.full(len(t), np.nan))
    return p, s


def layer_residuals(rec: Any) -> tuple[LayerResidual, ...]:
    """A :class:`jaxinv.Reconstruction`'s per-layer reports averaged over its targets (worst status)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for r in rec.layers:
            out.append(LayerResidual(
                path=r.path, forward_residual=nanmean(r.forward_residual),
                gradient_residual=nanmean(r.gradient_residual), bias_residual=nanmean(r.bias_residual),
                steps=nanmean(r.steps), status=int(np.max(np.asarray(r.status)))))
    return tuple(out)


def error_text(e: Exception) -> str:
    """``"ErrorType: first line of the message"``: how a failure that does not stop an audit is recorded."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run_attack(
    model: Model,
    grads: Any,
    truth: Float[ArrayLike, "N *shape"],
    labels: Int[ArrayLike, " N"],
    name: str,
    *,
    key: PRNGKeyArray,
    options: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> AttackResult:
    """Run one attack on stacked single-image gradients and score it against the truth.

    Args:
        model: the model; ``grads``: ``N`` single-image gradients stacked on a leading axis (every leaf).
        truth: the true images ``(N, *input_shape)``; ``labels``: the true labels ``(N,)``.
        name: an attack of :data:`jaxinv.ATTACKS`; ``options``: its options (checked by the registry).
        key: PRNG key of the attack's random start.

    The attack recovers the labels itself (``label=None``). If that raises a ``ValueError`` (e.g. it cannot read
    the head), it runs again with the true labels (``labels_given``).

    Returns:
        An :class:`AttackResult`; an attack that cannot handle the model even with the labels (a ``ValueError``
        such as :class:`jaxinv.UnsupportedModelError`) is recorded in ``error``.

    Raises:
        TypeError: an unknown option or one of the wrong type (before anything runs).
    """
    options = dict(options or {})
    check_options(name, options)
    truth = jnp.asarray(truth)
    labels = np.asarray(labels)
    n = truth.shape[0]
    t0 = time.perf_counter()
    given = False
    try:
        try:
            rec = attack(name, model, grads, label=None, input_shape=input_shape, key=key, **options)
        except ValueError:  # e.g. the labels cannot be read from this model's head: an attacker who knows them
            given = True
            rec = attack(name, model, grads, label=jnp.asarray(labels), input_shape=input_shape, key=key, **options)
        jax.block_until_ready(rec.image)
    except ValueError as e:
        nan = np.full(n, np.nan)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return AttackResult(name, options, None, None, nan, nan, float("nan"), nan, time.perf_counter() - t0,
                            (), f"{type(e).__name__}: {msg}")
    seconds = time.perf_counter() - t0
    p, s = image_scores(rec.image, truth)
    rec_labels = np.asarray(rec.label).reshape(-1)
    return AttackResult(
        name=name, options=options, images=np.asarray(rec.image, np.float32).reshape(truth.shape),
        labels=rec_labels, psnr=p, ssim=s,
        label_accuracy=float("nan") if given else float(np.mean(rec_labels == labels)),
        gradient_distance=np.asarray(rec.gradient_distance, np.float64).reshape(-1), seconds=seconds,
        layers=layer_residuals(rec), labels_given=given)


# ============================================================================================== the audit
def audit(
    model: Model,
    images: Float[ArrayLike, "N *shape"],
    *,
    labels: Int[ArrayLike, " N"] | None = None,
    attacks: Sequence[str] = ("copa", "hybrid", "ig"),
    key: PRNGKeyArray,
    attack_options: dict[str, dict[str, Any]] | None = None,
    input_shape: tuple[int, ...] | None = None,
    client: Client | None = None,
    progress: Callable[[int, int, str], Any] | None = None,
    source: str = "",
) -> AuditResult:
    """Audit a model: its security report, and every attack run on the single-image gradients of real images.

    Steps: (1) :func:`jaxinv.security` on the architecture; (2) the gradient :math:`g_i` each image would produce
    as a client's shared update; (3) each attack in ``attacks`` on all :math:`g_i` at once (stacked targets),
    labels recovered by the attack; (4) PSNR/SSIM of each reconstruction (clipped to ``[0, 1]``) against its image,
    label accuracy, the gradient distance, wall time and per-layer residuals (mean over images).

    Args:
        model: a :class:`jaxinv.Model`.
        images: real images ``(N, *input_shape)`` in ``[0, 1]`` (:mod:`jaxinv.data`).
        labels: their labels ``(N,)`` (default: uniformly random from ``key``).
        attacks: names from :data:`jaxinv.ATTACKS`, run in this order.
        key: a JAX PRNG key (security probes, random labels, the attacks' random starts).
        attack_options: ``{attack: {option: value}}`` over :data:`AUDIT_DEFAULTS` (e.g.
            ``{"ig": {"max_steps": 200}}``; :func:`step_options` caps every optimisation attack at once).
        input_shape: one input without the batch axis (default: the model's).
        client: the client's setting (:class:`jaxinv.Client`; default one image, one local step, ``auto`` loss):
            its loss and FedAvg steps make each image's shared object, and the security analysis and the attacks
            assume it (``attack_options`` override the attacks' assumption); ``batch_size`` must stay ``None``.
        progress: called as ``progress(i, total, stage)`` before stage ``i`` of ``total`` (``i == total``:
            ``"done"``); for a progress line.
        source: where the images came from, shown in the report.

    Returns:
        An :class:`AuditResult` (``.table()``, ``.to_dict()``, ``.save(out_dir)``).

    Raises:
        TypeError: ``model`` not a :class:`jaxinv.Model`, a bad ``key`` or ``client``, or an attack option unknown
            or of the wrong type (the message lists the accepted ones).
        ValueError: an unknown attack, options for an attack not in ``attacks``, ``images`` of the wrong shape or
            outside ``[0, 1]``, labels out of range, an attack that cannot model ``client``.

    Example:
        >>> from jaxinv import data, zoo
        >>> module, variables = zoo.build("cnn2_c1", key=jax.random.key(0), input_shape=(16, 16, 3))
        >>> model = jaxinv.from_linen(module, variables, input_shape=(16, 16, 3), name="cnn2_c1")
        >>> x = data.sample_images(2, size=16, key=jax.random.key(1))
        >>> res = jaxinv.audit(model, x, attacks=("copa", "rgap"), key=jax.random.key(2),
        ...                    attack_options={"rgap": {"max_steps": 500}})
        >>> res.security.verdict.split(":")[0], bool(res["copa"].psnr.min() > 60)
        ('LEAKS', True)
        >>> print(res.table())  # doctest: +ELLIPSIS
        audit of 'cnn2_c1': 2 image(s) (16, 16, 3) from ?, float32
        ...
        attack    PSNR dB   SSIM labels grad dist     sec  notes
        ...
        copa ...
        rgap ...
        >>> sorted(res.save("report"))  # report/: report.html, metrics.json, PNGs
        ['copa', 'html', 'json', 'rgap', 'truth']
    """
    t0 = time.perf_counter()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a jaxinv.Model (from_linen / from_nnx / from_fn), got {type(model).__name__}")
    key = check_key(key, "audit", required=True)
    client = check_client(client, "audit")
    names = check_attacks(attacks)
    opts = merged_options(names, attack_options, client)
    shape = model.resolve_input_shape(input_shape)
    check_client_fits(model, shape, client)
    dtype = param_dtype(model)
    x = check_images(images, shape).astype(dtype)
    N = x.shape[0]
    k_sec, k_lab, k_att = jax.random.split(key, 3)
    K = num_labels(model, shape)
    if labels is None:
        y = jax.random.randint(k_lab, (N,), 0, K)
    else:
        y = check_labels(jnp.asarray(labels), K, name="labels").reshape(-1)
        if y.shape[0] != N:
            raise ValueError(f"labels must have one entry per image ({N}), got shape {tuple(jnp.shape(labels))}")
    y = y.astype(jnp.int32)
    total = 2 + len(names)

    def step(i, stage):
        if progress is not None:
            progress(i, total, stage)

    step(0, "security analysis")
    rep, err = None, None
    try:
        rep = security(model, input_shape=shape, key=k_sec, **client_keywords(client))
    except ValueError as e:  # UnsupportedModelError and friends: the layer-wise analysis does not apply
        err = error_text(e)
    step(1, f"gradients of {N} image(s)")
    grads = shared_gradients(model, x, y, client)
    results = []
    for i, n in enumerate(names):
        step(2 + i, f"attack {n} on {N} image(s)")
        results.append(run_attack(model, grads, x, y, n, key=jax.random.fold_in(k_att, ATTACKS.index(n)),
                                  options=opts[n], input_shape=shape))
    step(total, "done")
    return AuditResult(
        model=model.name, input_shape=tuple(shape), dtype=str(jnp.dtype(dtype)), source=source,
        truth=np.asarray(x, np.float32), labels=np.asarray(y), security=rep, security_error=err,
        leaking_layer=None if rep is None else leaking_layer(rep), attacks=tuple(results),
        seconds=time.perf_counter() - t0)
