"""Audit an architecture: the security analysis, then real attacks on real images, scored against the truth.

:func:`audit` is the library side of ``jaxinv audit``. For every image :math:`x_i` the client's single-image
gradient :math:`g_i = \\nabla_\\theta \\ell(f_\\theta(x_i), y_i)` is computed; the ``T`` gradients are stacked on a
leading axis and every attack inverts all of them in one call (independent single-image targets). Each
reconstruction :math:`\\hat x_i` is scored against :math:`x_i` (PSNR and SSIM on ``[0, 1]`` images after clipping),
the recovered labels against :math:`y_i`; layer-wise attacks also give per-layer residuals (mean over images). The
:func:`jaxinv.security` report names the layer the verdict hinges on (:class:`LeakingLayer`).

The result (:class:`AuditResult`) renders as text (``.table()``), JSON (``.to_dict()``) and a self-contained HTML
report with PNGs (``.save(out_dir)``, see :mod:`jaxinv.report`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Int, PRNGKeyArray

from .._gradient import check_labels, client_gradient, num_labels
from .._model import Model
from .._result import STATUS_MESSAGES
from .._checks import check_key
from .._gradient import stacked_gradients
from .._security._security import SecurityReport, security
from ..attacks._registry import ATTACKS, attack, check_options

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
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    out: dict[str, dict[str, Any]] = {}
    for name in attacks:
        if name == "hybrid":
            out[name] = {"max_steps": (steps, -(-steps // 2), -(-steps // 10))}
        elif name in OPTIMISATION_ATTACKS:
            out[name] = {"max_steps": steps}
    return out


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _nanmean(a) -> float:
    a = np.asarray(a, np.float64).reshape(-1)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def _jsonable(v: Any) -> Any:
    """Options and metrics as JSON values: tuples as lists, non-finite floats as ``None``, others by ``repr``."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _finite_or_none(v)
    if v is None or isinstance(v, str):
        return v
    return repr(v)


# ============================================================================================== results
@dataclasses.dataclass(frozen=True)
class LayerResidual:
    """One layer's solve in a layer-wise attack, averaged over the audited images.

    Attributes:
        path: the layer's kernel path (input layer first in :attr:`AttackResult.layers`).
        forward_residual, gradient_residual, bias_residual: mean relative residuals of the forward, gradient and bias
            constraints at the solution (NaN where a layer has no such rows, e.g. the head's forward rows).
        steps: mean solver iterations; ``status``: the worst status code over the images (0 = ok).
    """

    path: str
    forward_residual: float
    gradient_residual: float
    bias_residual: float
    steps: float
    status: int

    @property
    def message(self) -> str:
        return STATUS_MESSAGES.get(self.status, f"unknown status {self.status}")

    def to_dict(self) -> dict:
        return _jsonable(dict(dataclasses.asdict(self), message=self.message))


@dataclasses.dataclass(frozen=True, eq=False)
class AttackResult:
    """One attack run on the single-image gradients of all audited images, scored against the truth.

    Attributes:
        name: the attack (:data:`jaxinv.ATTACKS`); ``options``: the options it ran with.
        images: reconstructions ``(N, *input_shape)`` as returned (not clipped); ``None`` if the attack failed.
        labels: recovered labels ``(N,)`` (``None`` if failed).
        psnr, ssim: per image, of the reconstruction clipped to ``[0, 1]`` against the truth (data range 1; SSIM is
            NaN for images smaller than its 11 x 11 window; PSNR is ``inf`` for an exact reconstruction).
        label_accuracy: fraction of recovered labels equal to the true ones (NaN when ``labels_given``).
        gradient_distance: per image, ``||g(x_hat) - g|| / ||g||``, the truth-free check of the attack.
        seconds: wall time of the call (all images, compilation included).
        layers: per-layer residuals (empty for attacks that do not work layer-wise).
        error: why the attack could not run on this model (e.g. a head it cannot invert); ``None`` when it ran.
        labels_given: True when the attack could not work without the true labels (it raised a ``ValueError``
            with ``label=None``, e.g. a head it cannot read) and ran again with them: the result is that of an
            attacker who knows the labels.
    """

    name: str
    options: dict
    images: np.ndarray | None
    labels: np.ndarray | None
    psnr: np.ndarray
    ssim: np.ndarray
    label_accuracy: float
    gradient_distance: np.ndarray
    seconds: float
    layers: tuple[LayerResidual, ...] = ()
    error: str | None = None
    labels_given: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def mean_psnr(self) -> float:
        """Mean PSNR in dB (``inf`` if some image was reconstructed exactly, NaN if the attack failed)."""
        return float(np.mean(self.psnr)) if self.psnr.size else float("nan")

    @property
    def mean_ssim(self) -> float:
        return _nanmean(self.ssim)

    def to_dict(self) -> dict:
        """JSON-friendly; non-finite numbers become ``None`` (a ``None`` PSNR with no error is an exact image)."""
        return _jsonable({
            "attack": self.name, "options": self.options, "error": self.error,
            "psnr": self.psnr, "ssim": self.ssim, "psnr_mean": self.mean_psnr, "ssim_mean": self.mean_ssim,
            "labels": self.labels, "label_accuracy": self.label_accuracy, "labels_given": self.labels_given,
            "gradient_distance": self.gradient_distance, "gradient_distance_mean": _nanmean(self.gradient_distance),
            "seconds": self.seconds, "layers": [r.to_dict() for r in self.layers],
        })


@dataclasses.dataclass(frozen=True)
class LeakingLayer:
    """The layer the security verdict hinges on.

    Attributes:
        path, index: the layer (index in :attr:`SecurityReport.layers`, input layer first).
        determined: True when every layer's system is determined; the layer is then the input layer, whose system
            gives the input away. False: the rank-deficient layer that loses the most of a typical input.
        text: one sentence for the report.
    """

    path: str
    index: int
    determined: bool
    text: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def leaking_layer(report: SecurityReport) -> LeakingLayer:
    """The layer that gives the input away or, if some layer is rank-deficient, the one that breaks the inversion.

    With deficient layers below the head, the one with the largest expected lost energy (ties: nearest the input)
    is where a layer-wise attack loses the input. With every layer determined, the input layer's system
    recovers the input; the sentence says so and names the worst-conditioned layer when it limits the precision.
    """
    layers = report.layers
    hidden = layers[:-1]

    def lost(r):
        return r.lost_energy if math.isfinite(r.lost_energy) else r.deficiency / max(r.unknowns, 1)

    defic = [r for r in hidden if r.deficiency > 0]
    if defic:
        w = max(defic, key=lambda r: (lost(r), -r.index))
        text = (f"{w.path} is where the layer-wise inversion breaks: {w.deficiency} of the {w.unknowns} directions "
                f"of its input are invisible to the gradient (rank {w.rank}); a typical input keeps "
                f"{100 * lost(w):.0f}% of its energy there"
                + ("; the layers below receive corrupted targets" if w.index > 0 else ""))
        return LeakingLayer(w.path, w.index, False, text)
    r0 = hidden[0] if hidden else layers[-1]
    text = (f"every layer's system is determined (no rank deficiency): {r0.path}, the input layer, gives the input "
            f"away (rank {r0.rank} for its {r0.unknowns} unknowns)")
    cond = [r for r in hidden if math.isfinite(r.sigma_min) and r.sigma_min > 0]
    if cond:
        w = min(cond, key=lambda r: r.sigma_min)
        if w.sigma_min < 1e-3:
            text += (f"; {w.path} is the worst-conditioned layer (sigma_min {w.sigma_min:.1e}), which limits the "
                     "precision")
    return LeakingLayer(r0.path, r0.index, True, text)


@dataclasses.dataclass(frozen=True, eq=False)
class AuditResult:
    """What :func:`audit` found: the architecture's security report and the attacks' measured results.

    Attributes:
        model: the model's name; ``input_shape``: one input without the batch axis; ``dtype``: its parameters'.
        source: where the images came from (free text for the report).
        truth: the audited images ``(N, *input_shape)`` in ``[0, 1]``; ``labels``: their labels ``(N,)``.
        security: the :class:`jaxinv.SecurityReport`, or ``None`` when the layer-wise analysis does not apply
            (``security_error`` says why, e.g. an unsupported layer; the optimisation attacks still ran).
        leaking_layer: :func:`leaking_layer` of the report (``None`` without a report).
        attacks: one :class:`AttackResult` per attack, in the order asked.
        seconds: wall time of the audit.
    """

    model: str
    input_shape: tuple[int, ...]
    dtype: str
    source: str
    truth: np.ndarray
    labels: np.ndarray
    security: SecurityReport | None
    security_error: str | None
    leaking_layer: LeakingLayer | None
    attacks: tuple[AttackResult, ...]
    seconds: float

    def __getitem__(self, name: str) -> AttackResult:
        """The result of one attack by name."""
        for a in self.attacks:
            if a.name == name:
                return a
        raise KeyError(f"no attack {name!r} in this audit; it ran: {', '.join(a.name for a in self.attacks)}")

    @property
    def best_psnr(self) -> float:
        """The highest mean PSNR of any attack that ran (NaN if none ran): the measured leakage."""
        vals = [a.mean_psnr for a in self.attacks if a.ok and not math.isnan(a.mean_psnr)]
        return max(vals) if vals else float("nan")

    def to_dict(self) -> dict:
        """The audit as JSON values (``metrics.json``); non-finite numbers become ``None``."""
        from .. import __version__

        return _jsonable({
            "jaxinv_version": __version__, "model": self.model, "input_shape": list(self.input_shape),
            "dtype": self.dtype, "source": self.source, "n_images": int(self.truth.shape[0]),
            "labels": self.labels, "seconds": self.seconds, "best_psnr": self.best_psnr,
            "security": None if self.security is None else self.security.to_dict(),
            "security_error": self.security_error,
            "leaking_layer": None if self.leaking_layer is None else self.leaking_layer.to_dict(),
            "attacks": {a.name: a.to_dict() for a in self.attacks},
        })

    def table(self) -> str:
        """Plain text: the security table, the leaking layer and one line per attack."""
        lines = [f"audit of {self.model!r}: {self.truth.shape[0]} image(s) {self.input_shape} from {self.source or '?'}"
                 f", {self.dtype}", ""]
        if self.security is not None:
            lines += [self.security.table(), ""]
        else:
            lines += [f"security analysis not applicable: {self.security_error}", ""]
        if self.leaking_layer is not None:
            lines += [f"leaking layer: {self.leaking_layer.text}", ""]
        head = f"{'attack':<8} {'PSNR dB':>8} {'SSIM':>6} {'labels':>6} {'grad dist':>9} {'sec':>7}  notes"
        lines += [head, "-" * len(head)]
        for a in self.attacks:
            if not a.ok:
                lines.append(f"{a.name:<8} {'-':>8} {'-':>6} {'-':>6} {'-':>9} {a.seconds:>7.1f}  failed: {a.error}")
                continue
            note = "; ".join(f"{r.path}: {r.message}" for r in a.layers if r.status)
            lab = "given" if a.labels_given else f"{a.label_accuracy:.0%}"
            lines.append(f"{a.name:<8} {a.mean_psnr:>8.2f} {a.mean_ssim:>6.3f} {lab:>6} "
                         f"{_nanmean(a.gradient_distance):>9.2e} {a.seconds:>7.1f}  {note}")
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike[str]) -> dict[str, str]:
        """Write ``report.html`` (self-contained), ``metrics.json``, ``truth.png`` and ``recon_<attack>.png``.

        Each ``recon_<attack>.png`` has the true images in its first row and the reconstructions below, upscaled.

        Returns:
            ``{"html": path, "json": path, "<attack>": png path, "truth": png path}``.
        """
        from .. import report

        os.makedirs(out_dir, exist_ok=True)
        paths = {"html": os.path.join(out_dir, "report.html"), "json": os.path.join(out_dir, "metrics.json"),
                 "truth": os.path.join(out_dir, "truth.png")}
        with open(paths["truth"], "wb") as f:
            f.write(report.png_bytes(report.image_grid([self.truth])))
        for a in self.attacks:
            if a.images is None:
                continue
            paths[a.name] = os.path.join(out_dir, f"recon_{report.slug(a.name)}.png")
            with open(paths[a.name], "wb") as f:
                f.write(report.png_bytes(report.image_grid([self.truth, a.images])))
        with open(paths["json"], "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        with open(paths["html"], "w", encoding="utf-8") as f:
            f.write(report.render(self))
        return paths


# ============================================================================================== the audit
def _check_attacks(attacks: Any) -> tuple[str, ...]:
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


def merged_options(names: tuple[str, ...], attack_options: dict | None) -> dict[str, dict[str, Any]]:
    """``{attack: options}`` for ``names``: :data:`AUDIT_DEFAULTS` overridden by ``attack_options``, each checked by
    the registry (``TypeError``/``ValueError`` naming the attack and option)."""
    attack_options = {} if attack_options is None else attack_options
    if not isinstance(attack_options, dict) or not all(isinstance(v, dict) for v in attack_options.values()):
        raise TypeError("attack_options must be a dict {attack name: {option: value}}, e.g. "
                        "{'ig': {'max_steps': 200}}")
    extra = [k for k in attack_options if k not in names]
    if extra:
        raise ValueError(f"attack_options has options for {extra[0]!r}, which is not in attacks {names}")
    opts = {n: {**AUDIT_DEFAULTS.get(n, {}), **attack_options.get(n, {})} for n in names}
    for n in names:
        check_options(n, opts[n])
    return opts


def _metrics(rec_images: jax.Array, truth: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    from .. import metrics

    t = truth  # the model's dtype: float64 reconstructions keep their precision
    img = jnp.clip(rec_images, 0.0, 1.0).astype(t.dtype).reshape(t.shape)
    if img.ndim != 4:  # metrics work on (N, H, W, C) images
        return np.full(len(t), np.nan), np.full(len(t), np.nan)
    p = np.asarray(metrics.psnr(img, t), np.float64)
    s = (np.asarray(metrics.ssim(img, t), np.float64) if min(img.shape[1:3]) >= 11
         else np.full(len(t), np.nan))
    return p, s


def _layer_residuals(rec) -> tuple[LayerResidual, ...]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for r in rec.layers:
            out.append(LayerResidual(
                path=r.path, forward_residual=_nanmean(r.forward_residual),
                gradient_residual=_nanmean(r.gradient_residual), bias_residual=_nanmean(r.bias_residual),
                steps=_nanmean(r.steps), status=int(np.max(np.asarray(r.status)))))
    return tuple(out)


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
    p, s = _metrics(rec.image, truth)
    rec_labels = np.asarray(rec.label).reshape(-1)
    return AttackResult(
        name=name, options=options, images=np.asarray(rec.image, np.float32).reshape(truth.shape),
        labels=rec_labels, psnr=p, ssim=s,
        label_accuracy=float("nan") if given else float(np.mean(rec_labels == labels)),
        gradient_distance=np.asarray(rec.gradient_distance, np.float64).reshape(-1), seconds=seconds,
        layers=_layer_residuals(rec), labels_given=given)


def _param_dtype(model: Model):
    for leaf in jax.tree_util.tree_leaves(model.params):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            return jnp.result_type(leaf)
    return jnp.dtype(jnp.float32)


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


def audit(
    model: Model,
    images: Float[ArrayLike, "N *shape"],
    *,
    labels: Int[ArrayLike, " N"] | None = None,
    attacks: Sequence[str] = ("copa", "hybrid", "ig"),
    key: PRNGKeyArray,
    attack_options: dict[str, dict[str, Any]] | None = None,
    input_shape: tuple[int, ...] | None = None,
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
        progress: called as ``progress(i, total, stage)`` before stage ``i`` of ``total`` (``i == total``:
            ``"done"``); for a progress line.
        source: where the images came from, shown in the report.

    Returns:
        An :class:`AuditResult` (``.table()``, ``.to_dict()``, ``.save(out_dir)``).

    Raises:
        TypeError: ``model`` not a :class:`jaxinv.Model`, a bad ``key``, or an attack option unknown or of the wrong
            type (the message lists the accepted ones).
        ValueError: an unknown attack, options for an attack not in ``attacks``, ``images`` of the wrong shape or
            outside ``[0, 1]``, labels out of range.

    Example:
        >>> from jaxinv import data, zoo
        >>> module, variables = zoo.build("cnn3_c1", key=jax.random.key(0))
        >>> model = jaxinv.from_linen(module, variables, input_shape=(32, 32, 3))
        >>> x = data.sample_images(4, key=jax.random.key(1))
        >>> res = jaxinv.audit(model, x, attacks=("copa", "ig"), key=jax.random.key(2),
        ...                    attack_options={"ig": {"max_steps": 200}})
        >>> print(res.table())
        >>> res.save("report")  # report.html, metrics.json, PNGs
    """
    t0 = time.perf_counter()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a jaxinv.Model (from_linen / from_nnx / from_fn), got {type(model).__name__}")
    key = check_key(key, "audit", required=True)
    names = _check_attacks(attacks)
    opts = merged_options(names, attack_options)
    shape = model.resolve_input_shape(input_shape)
    dtype = _param_dtype(model)
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
        rep = security(model, input_shape=shape, key=k_sec)
    except ValueError as e:  # UnsupportedModelError and friends: the layer-wise analysis does not apply
        err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    step(1, f"gradients of {N} image(s)")
    grads = stacked_gradients(model, x, y)
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
