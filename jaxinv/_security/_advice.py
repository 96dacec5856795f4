r"""The advice: which layer leaks or protects the input, and which change moves the model toward safety.

Above the counting rules (:mod:`._counting`, whose what-if predictions drive the suggested changes) and the
report's types; used by the entry.
"""

from __future__ import annotations

import math

from ._counting import copa_index, count_conv_rank
from ._report import Advice, LayerSecurity, blamed_layer


def _conv_specs(layers) -> list[dict | None]:
    """Shape-level description of the hidden layers for the counting rules (``None``: not a plain NHWC conv)."""
    specs = []
    for L in layers:
        if L.kind == "conv" and len(L.in_shape) == 3 and (L.groups or 1) == 1 and L.kernel_shape[2] == L.in_shape[2]:
            specs.append({"spatial": L.in_shape[:2], "c_in": L.in_shape[2], "c_out": L.kernel_shape[3],
                          "k": L.kernel_shape[:2], "s": L.strides, "pad": L.padding, "dil": L.dilation,
                          "chained_out": True})
        else:
            specs.append(None)
    for i in range(len(layers) - 1):  # does layer i feed layer i+1 directly (same shape)?
        if specs[i] is not None:
            specs[i]["chained_out"] = tuple(layers[i].out_shape) == tuple(layers[i + 1].in_shape)
    return specs


def _predict_index(specs: list[dict | None], base_def: list[int], change: int, new: dict) -> tuple[int, list[int]]:
    """COPA index and deficiencies of the model with ``specs[change]`` replaced by ``new`` (counting rules)."""
    specs = [dict(s) if s is not None else None for s in specs]
    specs[change] = dict(specs[change], **new)
    defs = list(base_def)
    for i in range(change, len(specs)):
        sp_ = specs[i]
        if sp_ is None or (i > change and not specs[i - 1] or (i > change and not specs[i - 1]["chained_out"])):
            break
        c = count_conv_rank(sp_["spatial"], sp_["c_in"], sp_["c_out"], sp_["k"], sp_["s"], sp_["pad"], sp_["dil"])
        defs[i] = c["deficiency"]
        if i + 1 < len(specs) and specs[i + 1] is not None and sp_["chained_out"]:
            specs[i + 1] = dict(specs[i + 1], spatial=c["out_spatial"], c_in=sp_["c_out"])
        elif i + 1 < len(specs) and sp_["chained_out"] is False:
            break
    L = len(specs) + 1  # + the head
    index = int(sum(round(-d * (L - i - 1) / (L - 1)) for i, d in enumerate(defs)))
    return index, defs


def advise(layers: tuple[LayerSecurity, ...], traced, score: float) -> tuple[Advice, ...]:
    """Which layer makes the input recoverable or protects it, the worst-conditioned layer, error-amplifying
    activations, and the changes the counting rules predict to make the model more deficient (at most three
    layers), for the layers of ``traced`` (a :class:`jaxinv._model.Structure`)."""
    out: list[Advice] = []
    hidden = layers[:-1]
    head = layers[-1]
    defic = [r for r in hidden if r.deficiency > 0]
    worst = blamed_layer(layers)
    if defic:
        for r in defic:
            out.append(Advice(r.path, "none", (
                f"{r.path} protects the input: {r.deficiency} of the {r.unknowns} directions of its input are "
                "invisible "
                f"to the gradient (rank {r.rank}); a typical input keeps {100 * r.lost_energy:.0f}% of its energy there"
                + (" -- the largest loss" if r is worst and len(defic) > 1 else "")
                + ("; layers below only receive corrupted targets" if r.index > 0 else "")), r.deficiency, None))
    elif hidden:
        r0 = hidden[0]
        how = ("its forward rows alone" if r0.forward_deficiency == 0 else
               f"its gradient rows (the {r0.forward_rows} forward rows alone miss {r0.forward_deficiency} directions)")
        out.append(Advice(r0.path, "none", f"{r0.path} makes the input recoverable: {how} determine all "
                                           f"{r0.unknowns} input values", 0, None))
    if hidden:
        cond = [r for r in hidden if math.isfinite(r.sigma_min) and r.sigma_min > 0]
        if cond:
            w = min(cond, key=lambda r: r.sigma_min)
            if w.sigma_min < 1e-3:
                out.append(Advice(w.path, "none", (
                    f"{w.path} is the worst-conditioned layer (sigma_min {w.sigma_min:.1e}): errors from the layers "
                    "above are amplified there, which limits the attack's precision")))
    gains = [r for r in hidden if r.inverse_gain > 10]
    if gains:
        which = ", ".join(f"{r.activation} after {r.path} ({r.inverse_gain:.0f}x)" for r in gains)
        out.append(Advice(gains[0].path, "activation", (
            f"inverting the activations amplifies reconstruction errors: {which}; errors from any deficient or "
            "ill-conditioned layer above then grow on the way down (this helps privacy; an activation closer to "
            "the identity, e.g. a leaky ReLU with a larger slope, helps the attacker)")))
    # what-ifs by the counting rules
    specs = _conv_specs(traced.layers[:-1])
    base = [r.deficiency for r in hidden]
    base_index = copa_index(layers)
    cands = []
    for i, sp_ in enumerate(specs):
        if sp_ is None:
            continue
        trials = []
        for c_out in sorted({max(1, sp_["c_out"] // 2), max(1, sp_["c_out"] // 4), max(1, sp_["c_out"] - 1)}):
            if c_out < sp_["c_out"]:
                trials.append((f"out_channels {sp_['c_out']} -> {c_out}", {"c_out": c_out}))
        trials.append((f"stride {sp_['s']} -> {tuple(s + 1 for s in sp_['s'])}", {"s": tuple(s + 1 for s in sp_["s"])}))
        if any(lo or hi for lo, hi in sp_["pad"]):
            trials.append(("padding -> 0", {"pad": tuple((0, 0) for _ in sp_["pad"])}))
        trials.append((f"kernel {sp_['k']} -> {tuple(k + 1 for k in sp_['k'])}", {"k": tuple(k + 1 for k in sp_["k"])}))
        for name, new in trials:
            try:
                idx, defs = _predict_index(specs, base, i, new)
            except Exception:  # a change that makes the shapes invalid
                continue
            if any(d < 0 for d in defs):
                continue
            cands.append((idx, i, name, defs))
    cands.sort(key=lambda c: (c[0], c[1]))
    shown, used = 0, set()
    for idx, i, name, defs in cands:  # the most effective change per layer, at most three layers
        if idx >= base_index or shown >= 3 or i in used:
            continue
        used.add(i)
        r = hidden[i]
        out.append(Advice(r.path, name, (
            f"toward safety: {r.path} {name} -> predicted deficiency {defs[i]} of its input "
            f"(now {r.deficiency}), COPA index {idx} (now {base_index}) [counting rules]"), defs[i], idx))
        shown += 1
    if not shown and base_index < 0:
        out.append(Advice("", "none", "no single change to channels, stride, padding or kernel makes the model more "
                                      "deficient by the counting rules"))
    if head.deficiency > 0:
        out.append(Advice(head.path, "head", (
            f"{head.path} protects the input at the head: its gradient rows see only {head.rank} of the "
            f"{head.unknowns} directions of its input (e.g. a global average pool before it keeps only the channel "
            f"means); a typical input keeps {100 * head.lost_energy:.0f}% of its energy there, so the layers below "
            "start from a partial answer")))
    elif head.kind == "dense":
        has_bias = bool(traced.layers[-1].bias)
        out.append(Advice(head.path, "head", (
            "the head's width and bias do not change the ranks: its gradient delta x^T determines its input whenever "
            "delta != 0" + (" (its bias gradient also gives delta_L, hence the label, exactly)" if has_bias else
                            " (without a bias the attack fixes the scale by R-GAP's scalar equation)"))))
    return tuple(out)
