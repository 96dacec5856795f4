r"""Counting rules: a convolution's rank from its shape alone, R-GAP's counting index and the COPA authors' index.

Above the report's types (:mod:`._report`); used by the advice's what-if changes (:mod:`._advice`) and the entry.
:func:`count_conv_rank` matches every exact rank the certificates computed on the papers' architectures.
"""

from __future__ import annotations

import math

import numpy as np

from ._report import LayerSecurity, RGapLayer


def _axis_counts(N: int, lo: int, hi: int, k: int, s: int, d: int = 1):
    """Per spatial axis: output size, covered input positions, and per stride phase r (taps, covered pixels)."""
    Hp = N + lo + hi
    e = (k - 1) * d + 1
    n_out = (Hp - e) // s + 1 if Hp >= e else 0
    cov = np.zeros(N, bool)
    for o in range(max(n_out, 0)):
        for a in range(k):
            u = s * o + d * a - lo
            if 0 <= u < N:
                cov[u] = True
    phases = []
    for r in range(s):
        taps = sum(1 for a in range(k) if (d * a - lo) % s == r)
        pix = int(np.sum(cov[r::s]))
        phases.append((taps, pix))
    return n_out, int(cov.sum()), phases


def count_conv_rank(spatial: tuple[int, ...], c_in: int, c_out: int, kernel: tuple[int, ...], stride: tuple[int, ...],
                    padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...] | None = None) -> dict:
    r"""Counting prediction of a convolution's stacked rank (generic weights and :math:`\delta`).

    * covered inputs :math:`n_c` (windows never reach the others);
    * forward rank :math:`\min(m, n_c)`;
    * gradient rank :math:`C_\text{in}\,\mathrm{rank}\,B_0` with :math:`B_0` block-diagonal over stride phases:
      phase :math:`r` has :math:`C_\text{out}\cdot\#\text{taps}_r` rows on :math:`\#\text{pixels}_r` columns;
    * the two row spaces share :math:`C_\text{out}^2` rows,
      :math:`\langle\delta_c, A_{c'}x\rangle = \langle W_{c'}, B_c(x)\rangle` for every pair of output channels.

    So :math:`\mathrm{rank} \le \min(n_c,\ \mathrm{rank}A + \mathrm{rank}B - C_\text{out}^2)` (the intersection
    term capped by the smaller block). On every layer of the papers' architectures this bound is the exact rank.
    """
    dilation = dilation or (1,) * len(spatial)
    outs, covs, phase_lists = [], [], []
    for N, k, s, (lo, hi), d in zip(spatial, kernel, stride, padding, dilation):
        o, c, ph = _axis_counts(N, lo, hi, k, s, d)
        outs.append(o)
        covs.append(c)
        phase_lists.append(ph)
    m = c_out * math.prod(outs)
    n = c_in * math.prod(spatial)
    n_c = c_in * math.prod(covs)
    rank_b0 = 0
    for combo in np.ndindex(*[len(p) for p in phase_lists]):
        taps = math.prod(phase_lists[a][r][0] for a, r in enumerate(combo))
        pix = math.prod(phase_lists[a][r][1] for a, r in enumerate(combo))
        rank_b0 += min(c_out * taps, pix)
    rank_a = min(m, n_c)
    rank_b = c_in * rank_b0
    shared = min(c_out * c_out, rank_a, rank_b)
    rank = min(n_c, rank_a + rank_b - shared)
    return {"unknowns": n, "covered": n_c, "forward_rows": m, "gradient_rows": c_in * c_out * math.prod(kernel),
            "forward_rank": rank_a, "gradient_rank": rank_b, "rank": rank, "deficiency": n - rank,
            "out_spatial": tuple(outs)}



def rgap_analysis(layers: tuple[LayerSecurity, ...], virtual: str = "input_side") -> tuple[int, tuple[RGapLayer, ...]]:
    r"""R-GAP's rank analysis (Zhu & Blaschko 2021, section "rank analysis"), by counting.

    For every layer the unknowns are the *padded* input (R-GAP solves for it and peels the padding afterwards); the
    constraints are the gradient constraints (one per kernel weight for a convolution; :math:`n` for a dense layer,
    whose gradient :math:`\delta x^\top` has rank :math:`n` in :math:`x`) plus the forward ("weight") constraints,
    one per output unit (none at the head, whose output is unknown). A layer's surplus of constraints over unknowns
    (including what it received) is passed to the next layer as *virtual constraints*; its deficit is
    :math:`\max(0, \text{unknowns} - \text{constraints} - \text{virtual})`, and the index is minus the sum of the
    deficits (0: every layer determined by counting; more negative: harder to attack), the COPA sign convention.

    ``virtual`` says which way the surplus flows. We could not read the paper's text here, so this is our reading:
    ``"input_side"`` (default) passes a layer's surplus to the layer after it, away from the input, with the
    network drawn input on top as in R-GAP's figures. It is the reading that reproduces the paper's own example:
    CNN6 determined, CNN6-d rank-deficient (its second convolution has 3780 constraints for 4332 padded unknowns).
    ``"output_side"`` passes surplus from the head toward the input (then CNN6-d counts as determined, since its
    third convolution has a surplus of 6976); ``"none"`` uses no virtual constraints. ``benchmarks/bench_security.py``
    reports all three against measured attacks.
    """
    if virtual not in ("input_side", "output_side", "none"):
        raise ValueError(f"virtual must be 'input_side', 'output_side' or 'none', got {virtual!r}")
    order = range(len(layers)) if virtual != "output_side" else reversed(range(len(layers)))
    rows: dict[int, RGapLayer] = {}
    surplus, total = 0, 0
    for i in order:
        r = layers[i]
        U = r.unknowns + r.padding_rows
        g = r.unknowns if r.kind == "dense" else r.gradient_rows
        f = 0 if r.role == "head" else r.forward_rows
        v = surplus if virtual != "none" else 0
        have = g + f + v
        deficit = max(0, U - have)
        surplus = max(0, have - U)
        total += deficit
        rows[i] = RGapLayer(r.path, U, g, f, v, deficit, surplus)
    return -total, tuple(rows[i] for i in range(len(layers)))


def copa_index(layers: tuple[LayerSecurity, ...]) -> int:
    r"""The COPA authors' index: :math:`\sum_{i=0}^{L-2}\mathrm{round}\big(\mathrm{rank\_deficit}_i\,
    \frac{L-i-1}{L-1}\big)` over the layers below the head (input first), with :math:`L` the number of weight layers
    including the head and :math:`\mathrm{rank\_deficit}_i = \mathrm{rank}_i - n_i \le 0`. Python's ``round``
    (half to even), as the authors' code."""
    L = len(layers)
    if L < 2:
        return 0
    return int(sum(round(r.rank_deficit * (L - i - 1) / (L - 1)) for i, r in enumerate(layers[: L - 1])))
