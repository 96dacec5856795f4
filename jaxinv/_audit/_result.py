"""What an audit returns: per-layer residuals, one result per attack, the leaking layer and the whole audit, each
as text (``table``), JSON values (``to_dict``) and, for the audit, files (``save``, see :mod:`jaxinv.report`)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from .._results import STATUS_MESSAGES
from .._security import SecurityReport, blamed_layer
from .._version import __version__
from ._report import save


def nanmean(a: Any) -> float:
    """The mean of the non-NaN entries of ``a`` (NaN when there are none)."""
    a = np.asarray(a, np.float64).reshape(-1)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def jsonable(v: Any) -> Any:
    """Options and metrics as JSON values: tuples as lists, non-finite floats as ``None``, others by ``repr``.

    Example:
        >>> jsonable({"a": (1, float("inf")), 2: np.float32(0.5)})
        {'a': [1, None], '2': 0.5}
    """
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, str):
        return v
    return repr(v)


@dataclasses.dataclass(frozen=True)
class LayerResidual:
    """One layer's solve in a layer-wise attack, averaged over the audited images.

    Attributes:
        path: the layer's kernel path (input layer first in :attr:`AttackResult.layers`).
        forward_residual, gradient_residual, bias_residual: mean relative residuals of the forward, gradient and bias
            constraints at the solution (NaN where a layer has no such rows, e.g. the head's forward rows).
        steps: mean solver iterations; ``status``: the worst status code over the images (0 = ok,
            :class:`jaxinv.RESULTS`).
    """

    path: str
    forward_residual: float
    gradient_residual: float
    bias_residual: float
    steps: float
    status: int

    @property
    def message(self) -> str:
        """What :attr:`status` means and what to do about it."""
        return STATUS_MESSAGES.get(self.status, f"unknown status {self.status}")

    def to_dict(self) -> dict:
        return jsonable(dict(dataclasses.asdict(self), message=self.message))


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
        return nanmean(self.ssim)

    def to_dict(self) -> dict:
        """JSON-friendly; non-finite numbers become ``None`` (a ``None`` PSNR with no error is an exact image)."""
        return jsonable({
            "attack": self.name, "options": self.options, "error": self.error,
            "psnr": self.psnr, "ssim": self.ssim, "psnr_mean": self.mean_psnr, "ssim_mean": self.mean_ssim,
            "labels": self.labels, "label_accuracy": self.label_accuracy, "labels_given": self.labels_given,
            "gradient_distance": self.gradient_distance, "gradient_distance_mean": nanmean(self.gradient_distance),
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
    w = blamed_layer(layers)
    if w is not None:
        text = (f"{w.path} is where the layer-wise inversion breaks: {w.deficiency} of the {w.unknowns} directions "
                f"of its input are invisible to the gradient (rank {w.rank}); a typical input keeps "
                f"{100 * w.lost_fraction:.0f}% of its energy there"
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
    """What :func:`jaxinv.audit` found: the architecture's security report and the attacks' measured results.

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
        return jsonable({
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
                         f"{nanmean(a.gradient_distance):>9.2e} {a.seconds:>7.1f}  {note}")
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike[str]) -> dict[str, str]:
        """Write ``report.html`` (self-contained), ``metrics.json``, ``truth.png`` and ``recon_<attack>.png``
        (:func:`jaxinv.report.save`).

        Each ``recon_<attack>.png`` has the true images in its first row and the reconstructions below, upscaled.

        Returns:
            ``{"html": path, "json": path, "<attack>": png path, "truth": png path}``.
        """
        return save(self, out_dir)
