r"""What :func:`jaxinv.security` returns: one :class:`LayerSecurity` per layer, R-GAP's per-layer counts
(:class:`RGapLayer`), the :class:`Advice` and the whole :class:`SecurityReport` (plain frozen dataclasses).

Types only: every module of :mod:`jaxinv._security` that fills them in sits above this one.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class LayerSecurity:
    r"""The linear system of one layer, as the shared gradient poses it.

    All singular values are those of the *balanced* operator :math:`[A/\|A\|_2;\ B/\|B\|_2]` (the system
    :func:`jaxinv.copa` solves), so ``sigma_max`` is between 1 and :math:`\sqrt 2`.

    Attributes:
        index, path, kind, activation: the layer (input layer first), its kernel path, ``conv``/``dense`` and the
            activation after it.
        role: ``hidden`` or ``head`` (the last layer: solved from its gradient rows alone, since :math:`z_L` is
            unknown; it is not part of the COPA index).
        unknowns: :math:`n`, entries of the layer's input :math:`x_{l-1}` (unpadded).
        forward_rows: :math:`m`, forward rows used (output units; only the active units after a ReLU; 0 for the head).
        gradient_rows: :math:`p`, entries of the kernel gradient.
        padding_rows: pad entries of the input (the COPA authors' identity rows; unknowns + padding_rows is their
            padded unknown count).
        uncovered: input entries no convolution window reaches (no row sees them: always in the null space).
        rank, deficiency: numerical rank of the stacked operator and :math:`d = n - \mathrm{rank}`.
        sigma_min, sigma_max: smallest nonzero and largest singular value; ``sigma_kind`` says how exact
            ``sigma_min`` is: ``lower bound`` (certified: the gradient block alone, e.g. :math:`\delta\otimes I`),
            ``estimate`` (inverse iteration on a Cholesky factor; for a layer whose forward block alone has full rank,
            the forward block's value, which bounds the stacked one from below) or ``not computed`` (tile
            certificate).
        gap: (smallest accepted, largest rejected) singular value estimates at the rank decision (pivoted
            Cholesky pivots); a wide gap means the integer is robust.
        forward_rank, forward_deficiency, forward_sigma_min: the same for the forward block alone
            (``forward_sigma_min`` is :math:`1/\mathrm{cond}` of the forward block on its row space).
        lost_energy: expected fraction of :math:`\|x_{l-1}\|^2` in the null space of the stacked operator (what a
            minimum-norm least-squares solve cannot recover even from exact data), averaged over natural-image probes
            (random fields with a :math:`1/f` amplitude spectrum, see :func:`jaxinv._security.natural_probes`) pushed
            through the layers below.
        lost_energy_input: the same for the analysed input (the random draw, or the reconstruction when the
            gradient is given: 0 at the input layer by construction, since the attack's solution has no null part).
        inverse_gain: how much the inverse of the activation after this layer amplifies a relative error of its
            output into its pre-activation (1 for identity; large for saturated tanh or a leaky ReLU's small slope):
            :math:`g = \mathrm{rms}(x)\,\sqrt{\mathrm{mean}(1/s'(z)^2)}/\mathrm{rms}(z)` over the probes.
        method: how the rank was obtained; ``exact`` is False only for counting estimates on very large layers.
        seconds: wall time of this layer's analysis.
        noise_gain: with a ``defence`` (:func:`jaxinv.security`): the RMS change of this layer's reconstructed input per
            unit RMS change the defence makes to the gradient entries (NaN without a defence).
        precision_error: the median relative error of this layer's input as :func:`jaxinv.copa` reconstructs it
            from natural probes' gradients in the client's precision (:func:`jaxinv._security.precision_psnr`).
    """

    index: int
    path: str
    kind: str
    role: str
    activation: str
    unknowns: int
    forward_rows: int
    gradient_rows: int
    padding_rows: int
    uncovered: int
    rank: int
    deficiency: int
    sigma_min: float
    sigma_max: float
    sigma_kind: str
    gap: tuple[float, float]
    forward_rank: int
    forward_deficiency: int
    forward_sigma_min: float
    lost_energy: float
    lost_energy_input: float
    inverse_gain: float
    method: str
    exact: bool
    seconds: float
    noise_gain: float = float("nan")
    precision_error: float = float("nan")

    @property
    def rank_deficit(self) -> int:
        """COPA's :math:`\\mathrm{rank} - n \\le 0` (the same with or without the padding rows)."""
        return self.rank - self.unknowns

    @property
    def lost_fraction(self) -> float:
        """:attr:`lost_energy` in ``[0, 1]``, or ``deficiency / unknowns`` when it was not estimated."""
        if math.isfinite(self.lost_energy):
            return min(max(self.lost_energy, 0.0), 1.0)
        return self.deficiency / max(self.unknowns, 1)

    @property
    def determined(self) -> bool:
        return self.deficiency == 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gap"] = list(self.gap)
        d["rank_deficit"] = self.rank_deficit
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}



@dataclasses.dataclass(frozen=True)
class RGapLayer:
    """One layer of R-GAP's rank analysis by counting (see :func:`jaxinv._security.rgap_analysis`)."""

    path: str
    unknowns: int  # padded input entries
    gradient_constraints: int
    forward_constraints: int
    virtual_constraints: int  # surplus received from the neighbouring layer (see rgap_analysis)
    deficit: int  # unknowns not covered by constraints (>= 0)
    surplus: int  # constraints beyond the unknowns (passed down)



@dataclasses.dataclass(frozen=True)
class Advice:
    """One piece of advice: a layer, a change, and its predicted effect.

    ``predicted_copa_index`` / ``predicted_deficiency`` come from the counting rules
    (:func:`jaxinv._security.count_conv_rank`), which reproduce the exact ranks of every layer of the papers'
    architectures; ``None`` when not applicable.
    """

    layer: str
    change: str
    text: str
    predicted_deficiency: int | None = None
    predicted_copa_index: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SecurityReport:
    r"""How much of a client's input an architecture's gradient gives away (:func:`jaxinv.security`).

    Attributes:
        model: the model's name; ``input_shape``: one input without the batch axis.
        layers: per-layer systems (:class:`LayerSecurity`), input layer first.
        copa_index: the COPA authors' index (0: every layer determined; more negative: more secure).
        rgap_index: R-GAP's counting index with virtual constraints (:func:`jaxinv._security.rgap_analysis`,
            input-side reading), same sign convention; ``rgap_layers`` its per-layer counts.
        score: predicted PSNR (dB, images in ``[0, 1]``) of the best layer-wise attack on a typical image
            (:func:`jaxinv._security.predict_psnr`); higher means the model leaks more.
        verdict: ``LEAKS`` (score at least :data:`jaxinv._security.LEAK_DB` = 30 dB), ``PARTIAL`` (at least
            :data:`jaxinv._security.SAFE_DB` = 15 dB) or ``RESISTANT``, and one sentence.
        advice: which layer makes the input recoverable or protects it, and which changes move the model toward
            safety, with their predicted effect.
        delta_source: where the per-layer :math:`\delta_l` came from.
        label: the label used (-1 for a segmentation model, whose label is a mask); ``tolerance``:
            :data:`jaxinv._security.RANK_TOL`; ``seconds``: wall time.
        defence: the defence the score accounts for (its name), ``None`` for the gradient as shared; then
            ``score_undefended`` is the score without it and ``noise_mse`` the image error the defence adds
            (:func:`jaxinv._security.noise_propagation`), and each layer's ``noise_gain`` is filled in.
        precision: the dtype the gradient is shared in (its rounding is always counted); ``score_exact``: the score
            of the systems alone, at infinite precision (``score`` is at most it).
    """

    model: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerSecurity, ...]
    copa_index: int
    rgap_index: int
    rgap_layers: tuple[RGapLayer, ...]
    score: float
    verdict: str
    advice: tuple[Advice, ...]
    delta_source: str
    label: int
    tolerance: float
    seconds: float
    defence: str | None = None
    score_undefended: float = float("nan")
    noise_mse: float = float("nan")
    precision: str = ""
    score_exact: float = float("nan")

    @property
    def deficiencies(self) -> tuple[int, ...]:
        return tuple(r.deficiency for r in self.layers)

    @property
    def leaks(self) -> bool:
        return self.verdict.startswith("LEAKS")

    def table(self) -> str:
        """A plain-text per-layer table with the indices, the score, the verdict and the advice."""
        head = (f"{'layer':<22} {'kind':<5} {'n':>7} {'m':>7} {'p':>7} {'pad':>5} {'rank':>7} {'def':>6} "
                f"{'fwd def':>7} {'sigma_min':>9} {'lost':>6}  method")
        lines = [f"security of {self.model!r}, input {self.input_shape} (deltas: {self.delta_source})", head,
                 "-" * len(head)]
        for r in self.layers:
            smin = "n/a" if not math.isfinite(r.sigma_min) else f"{r.sigma_min:.1e}"
            lines.append(
                f"{r.path[:22]:<22} {r.kind:<5} {r.unknowns:>7} {r.forward_rows:>7} {r.gradient_rows:>7} "
                f"{r.padding_rows:>5} {r.rank:>7} {r.deficiency:>6} {r.forward_deficiency:>7} {smin:>9} "
                f"{r.lost_energy:>6.3f}  {r.method}{'' if r.exact else ' [estimate]'}"
            )
        lines.append("-" * len(head))
        lines.append(f"COPA index {self.copa_index}   R-GAP index {self.rgap_index}   "
                     f"score (predicted attack PSNR) {self.score:.1f} dB   rank tolerance {self.tolerance:g}")
        if self.precision:
            errs = ", ".join(f"{r.path} {r.precision_error:.1e}" for r in self.layers)
            lines.append(f"{self.precision} gradient: {self.score_exact:.1f} dB at infinite precision; relative error "
                         f"of each layer's reconstructed input: {errs}")
        if self.defence is not None:
            line = f"under {self.defence}: score {self.score_undefended:.1f} -> {self.score:.1f} dB"
            if math.isfinite(self.noise_mse):
                gains = ", ".join(f"{r.path} x{r.noise_gain:.3g}" for r in self.layers)
                line += f" (image MSE added {self.noise_mse:.2e}); noise gain per layer: {gains}"
            lines.append(line)
        lines.append(f"verdict: {self.verdict}")
        for a in self.advice:
            lines.append(f"  - {a.text}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly (NaN and infinities become ``None``)."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean({
            "model": self.model, "input_shape": list(self.input_shape), "copa_index": self.copa_index,
            "rgap_index": self.rgap_index, "score": self.score, "verdict": self.verdict,
            "advice": [a.to_dict() for a in self.advice], "delta_source": self.delta_source, "label": self.label,
            "tolerance": self.tolerance, "seconds": self.seconds, "defence": self.defence,
            "score_undefended": self.score_undefended, "noise_mse": self.noise_mse, "precision": self.precision,
            "score_exact": self.score_exact,
            "layers": [r.to_dict() for r in self.layers],
            "rgap_layers": [dataclasses.asdict(r) for r in self.rgap_layers],
        })


def blamed_layer(layers: tuple[LayerSecurity, ...]) -> LayerSecurity | None:
    """The rank-deficient layer below the head that loses the most of a typical input (ties: nearest the input),
    where a layer-wise attack loses the input; ``None`` when every layer below the head is determined."""
    defic = [r for r in layers[:-1] if r.deficiency > 0]
    return max(defic, key=lambda r: (r.lost_fraction, -r.index)) if defic else None
