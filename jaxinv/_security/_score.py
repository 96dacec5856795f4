r"""The score (predicted PSNR of the layer-wise attack on a typical image) and the verdict it gives.

Above the report's types (:mod:`._report`); used by the defended score (:mod:`._defended`) and the entry.
"""

from __future__ import annotations

import math

from ._report import LayerSecurity


#: Constants of :func:`predict_psnr`: ``floor`` and ``beta`` (float32 solve floor), ``head`` (closed-form head
#: error), ``gain_cap`` and ``a`` were fitted (least absolute error in dB) on the 27 architectures of the zoo only,
#: against :func:`jaxinv.copa` (LSMR tolerance 1e-8 in float32); ``gamma`` and ``clip`` are fixed. Validation on 24
#: held-out variants (channels, strides, kernels, depth, activations, biases, head widths; 4 real photos each):
#: Spearman 0.93 with the measured PSNR (COPA index 0.86, R-GAP index 0.75); ``benchmarks/bench_security.py``.
SCORE_CONSTANTS = {"floor": 1.6e-7, "beta": 0.44, "head": 6.3e-8, "gain_cap": 22.0, "a": 0.20, "gamma": 0.3,
                   "clip": 1.5}


def predict_psnr(layers: tuple[LayerSecurity, ...], image_energy: float = 0.25, constants: dict | None = None) -> float:
    r"""Predicted PSNR (dB, images in ``[0, 1]``) of the layer-wise attack on a typical image.

    An error-propagation model from the head down, in relative error energies. The head's input is recovered in
    closed form (relative error :math:`\epsilon_h`, fitted: :math:`6\cdot10^{-8}`) up to the energy its gradient rows
    cannot see (:math:`e = f_L + (1 - f_L)\epsilon_h^2`; e.g. a global average pool before the head leaves only
    the channel means). Going down through layer
    :math:`l`:

    .. math::
        u_l = e_l\,\min(g_l, g_\text{cap})^2, \qquad
        T_l = \min\!\Big(c,\ \epsilon_0^2\,\sigma_{\min,l}^{-2\beta} + \min(u_l,\ a\,u_l^{\gamma})\Big), \qquad
        e_{l-1} = f_l + (1 - f_l)\,T_l,

    where :math:`e_l` is the relative error energy of the reconstructed output :math:`x_l` of layer :math:`l`,
    :math:`g_l` the activation inverse's gain (:attr:`LayerSecurity.inverse_gain`: errors of :math:`x_l` become
    errors of the targets :math:`z_l`; capped because a saturated inverse clips), :math:`\sigma_{\min,l}` the
    smallest singular value of the balanced system (a float32 least-squares solve leaves a floor that grows with
    ill-conditioning, sub-linearly since few directions are weak), :math:`u_l^\gamma` the sub-linear transfer of
    *large* target errors (a corrupted upper layer yields a degraded but correlated image, not noise; artanh and
    clipping), :math:`c` the error of a clipped random image, and :math:`f_l` the energy a minimum-norm solve
    cannot see (:attr:`LayerSecurity.lost_energy`). The prediction is
    :math:`-10\log_{10}(e_{-1}\,\overline{x^2})` with :math:`\overline{x^2}` the images' mean square.
    """
    c = dict(SCORE_CONSTANTS, **(constants or {}))
    h = layers[-1]
    f = h.lost_fraction
    e2 = f + (1.0 - f) * c["head"] ** 2  # a head that sees only part of its input (e.g. after global pooling)
    for i in reversed(range(len(layers) - 1)):
        r = layers[i]
        s = r.sigma_min if (math.isfinite(r.sigma_min) and r.sigma_min > 0) else 1.0
        u = e2 * min(r.inverse_gain, c["gain_cap"]) ** 2
        T = min(c["clip"], c["floor"] ** 2 * s ** (-2.0 * c["beta"]) + min(u, c["a"] * u ** c["gamma"]))
        f = r.lost_fraction
        e2 = f + (1.0 - f) * T
    return float(-10.0 * math.log10(max(e2 * image_energy, 1e-13)))


LEAK_DB = 30.0  # predicted PSNR at and above which the input counts as recoverable
SAFE_DB = 15.0  # below this, no faithful reconstruction is expected from the layer-wise attacks


def verdict_of(layers: tuple[LayerSecurity, ...], score: float) -> str:
    """``LEAKS`` / ``PARTIAL`` / ``RESISTANT`` (by :data:`LEAK_DB`, :data:`SAFE_DB`) and one sentence why."""
    defic = [r for r in layers if r.deficiency > 0]
    if score >= LEAK_DB and not defic:
        return ("LEAKS: the input is fully recoverable from the gradient (every layer's system is determined; "
                f"predicted reconstruction {score:.0f} dB)")
    if score >= LEAK_DB:
        return (f"LEAKS: the input is recoverable from the gradient (predicted reconstruction {score:.0f} dB), "
                f"although {len(defic)} layer(s) are rank-deficient: what they lose costs the attack little")
    if score >= SAFE_DB:
        gain = max((r.inverse_gain for r in layers[:-1]), default=1.0)
        why = (f"{len(defic)} layer(s) are rank-deficient" if defic else
               "every layer is determined, but ill-conditioned systems"
               + (f" and error-amplifying activation inverses (up to {gain:.0f}x)" if gain > 10 else "")
               + " let float32 errors grow on the way down")
        return f"PARTIAL: a recognisable but inexact reconstruction is expected ({score:.0f} dB): {why}"
    head = layers[-1]
    seen = ("the head's input" if head.deficiency == 0 else
            f"{head.rank} of the {head.unknowns} directions of the head's input")
    return (f"RESISTANT: the layer-wise attacks are not expected to reconstruct the input ({score:.0f} dB); "
            f"the gradient still reveals the label and {seen}")



def precision_verdict(layers: tuple[LayerSecurity, ...], score: float, exact: float, dtype: str) -> str:
    """The verdict when the gradient's precision, not the systems' ranks, limits the attack: the category of
    ``score`` and the highest layer whose reconstructed input is more than 10 % off (``precision_error``)."""
    lost = [r for r in layers[:-1] if r.precision_error > 0.1]
    where = (f"hides the input from {lost[-1].path} down (its input {lost[-1].precision_error:.0%} off)" if lost
             else "blurs the input")
    why = (f"the {dtype} gradient's rounding, amplified by ill-conditioned layers, {where}: predicted {score:.0f} dB "
           f"({exact:.0f} dB at infinite precision)")
    if score >= LEAK_DB:
        return f"LEAKS: the input is recoverable from the gradient, though {why}"
    if score >= SAFE_DB:
        return f"PARTIAL: a recognisable but inexact reconstruction is expected: {why}"
    return f"RESISTANT: the layer-wise attacks are not expected to reconstruct the input: {why}"


def defended_verdict(score: float, name: str, clean: float) -> str:
    """The verdict under defence ``name`` (its score ``score``; ``clean`` without it)."""
    tail = f"under defence {name} (predicted {score:.0f} dB, {clean:.0f} dB without it)"
    if score >= LEAK_DB:
        return f"LEAKS: the input is still recoverable from the gradient {tail}"
    if score >= SAFE_DB:
        return f"PARTIAL: a recognisable but inexact reconstruction is expected {tail}"
    return (f"RESISTANT: the layer-wise attacks are not expected to reconstruct the input {tail}; "
            "the gradient may still reveal the label")
