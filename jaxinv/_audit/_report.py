"""The HTML page and the PNG grids of an audit (the code behind :mod:`jaxinv.report`, where the element ids are
listed), numpy only.

The page reads the audit as data: any object with the fields of :class:`jaxinv.AuditResult` renders, so this module
sits below the result type (:meth:`jaxinv.AuditResult.save` calls :func:`save`). Images are inlined as base64 PNG
data URIs (:func:`png_bytes`), the residual plot is inline SVG (:func:`residual_plot`), the style inline CSS; every
text taken from the model or the results is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import ArrayLike, Float, UInt8

from .._version import __version__

#: Badge colour of each verdict (the word before the colon of :attr:`jaxinv.SecurityReport.verdict`).
BADGE_COLOURS: dict[str, str] = {"LEAKS": "#c62828", "PARTIAL": "#e65100", "RESISTANT": "#2e7d32", "N/A": "#616161"}
#: Background of the leaking layer's row in the per-layer table.
HIGHLIGHT = "#ffd54f"
#: Line colours of the attacks in the residual plot.
PALETTE = ("#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f")


def _e(value: Any) -> str:
    """Escape any value for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def slug(name: str) -> str:
    """``name`` reduced to ``[a-z0-9_-]`` for element ids and file names."""
    return re.sub(r"[^a-z0-9_-]+", "-", str(name).lower()).strip("-") or "x"


# ============================================================================================== images
def _to_uint8_rgb(image: Any) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype != np.uint8:
        a = (np.clip(np.nan_to_num(np.asarray(a, np.float64), nan=0.0), 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def png_bytes(image: Float[ArrayLike, "H W C"] | UInt8[ArrayLike, "H W C"]) -> bytes:
    """Encode one image as an 8-bit RGB PNG (zlib only).

    Args:
        image: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped); uint8, or floats in
            ``[0, 1]`` (clipped, NaN as 0).
    """
    a = _to_uint8_rgb(image)
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))  # filter type 0 on every row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _data_uri(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def image_grid(rows: Sequence[Float[ArrayLike, "N H W C"]], scale: int = 4, pad: int = 2) -> UInt8[np.ndarray, "h w 3"]:
    """Rows of images (each ``(N, H, W, C)`` in ``[0, 1]``, C 1 or 3) as one white-separated uint8 RGB picture.

    Args:
        rows: e.g. ``[truth, reconstruction]``; rows may hold different numbers of images.
        scale: nearest-neighbour upscaling factor (small images stay readable).
        pad: white pixels between images and rows.
    """
    tiles = []
    for row in rows:
        row = np.clip(np.nan_to_num(np.asarray(row, np.float64)), 0, 1)
        if row.shape[-1] == 1:
            row = np.repeat(row, 3, axis=-1)
        row = np.repeat(np.repeat(row, scale, axis=1), scale, axis=2)
        n, h, w, _ = row.shape
        line = np.ones((h, n * (w + pad) - pad, 3))
        for i in range(n):
            line[:, i * (w + pad):i * (w + pad) + w] = row[i]
        tiles.append(line)
    width = max(t.shape[1] for t in tiles)
    out = np.ones((sum(t.shape[0] + pad for t in tiles) - pad, width, 3))
    y = 0
    for t in tiles:
        out[y:y + t.shape[0], :t.shape[1]] = t
        y += t.shape[0] + pad
    return (out * 255).round().astype(np.uint8)


def write_grid(path: str | os.PathLike[str], rows: Sequence[Float[ArrayLike, "N H W C"]]) -> str:
    """Write :func:`image_grid` of ``rows`` as a PNG file at ``path``; returns ``path``."""
    with open(path, "wb") as f:
        f.write(png_bytes(image_grid(rows)))
    return os.fspath(path)


# ============================================================================================== plot
def _fmt(v: float, spec: str = ".2e", none: str = "–") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return format(v, spec)


def residual_plot(result: Any, width: int = 680, height: int = 320) -> str:
    """Inline SVG: per-layer relative residuals of each layer-wise attack (log scale), or ``""`` if none ran.

    Solid lines with dots: gradient residual ``||B x - gW|| / ||gW||``; dashed lines with squares: forward residual
    ``||A x - (z - b)|| / ||z - b||`` (the head has no forward rows). Layers on the x axis, input layer first.
    """
    series = []  # (attack, kind, [(layer index, value)])
    paths: list[str] = []
    for a in result.attacks:
        if not a.ok or not a.layers:
            continue
        if len(a.layers) > len(paths):
            paths = [r.path for r in a.layers]
        for kind in ("gradient_residual", "forward_residual"):
            pts = [(i, getattr(r, kind)) for i, r in enumerate(a.layers)]
            pts = [(i, max(v, 1e-16)) for i, v in pts if v is not None and math.isfinite(v)]
            if pts:
                series.append((a.name, kind, pts))
    if not series:
        return ""
    vals = [v for _, _, pts in series for _, v in pts]
    lo = math.floor(math.log10(min(vals)))
    hi = math.ceil(math.log10(max(vals)))
    if hi <= lo:
        hi = lo + 1
    left, right, top, bottom = 64, 170, 16, 64
    pw, ph = width - left - right, height - top - bottom
    L = len(paths)

    def X(i: float) -> float:
        return left + (pw * (i + 0.5) / L)

    def Y(v: float) -> float:
        return top + ph * (hi - math.log10(v)) / (hi - lo)

    out = [f'<svg id="residuals-plot" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="per-layer residuals, log scale">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>']
    step = max(1, math.ceil((hi - lo) / 8))
    for e in range(lo, hi + 1, step):
        y = Y(10.0 ** e)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e0e0e0"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">1e{e}</text>')
    for i, p in enumerate(paths):
        x = X(i)
        short = p if len(p) <= 16 else p[:15] + "…"
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">{_e(short)}'
                   f'<title>{_e(p)}</title></text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 12}" text-anchor="middle" font-size="12">'
               'layer (input layer first)</text>')
    out.append(f'<text x="14" y="{top + ph / 2:.1f}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 14 {top + ph / 2:.1f})">relative residual</text>')
    names = [a.name for a in result.attacks if a.ok and a.layers]
    for name, kind, pts in series:
        colour = PALETTE[names.index(name) % len(PALETTE)]
        dash = ' stroke-dasharray="5 4"' if kind == "forward_residual" else ""
        label = f"{name} {kind.split('_')[0]}"
        if len(pts) > 1:
            d = " ".join(f"{X(i):.1f},{Y(v):.1f}" for i, v in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for i, v in pts:
            tip = f"<title>{_e(label)} {_e(paths[i])}: {v:.2e}</title>"
            if kind == "forward_residual":
                out.append(f'<rect x="{X(i) - 4:.1f}" y="{Y(v) - 4:.1f}" width="8" height="8" fill="white" '
                           f'stroke="{colour}" stroke-width="2">{tip}</rect>')
            else:
                out.append(f'<circle cx="{X(i):.1f}" cy="{Y(v):.1f}" r="4" fill="{colour}">{tip}</circle>')
    for k, (name, kind, _) in enumerate(series):
        colour = PALETTE[names.index(name) % len(PALETTE)]
        y = top + 10 + 18 * k
        dash = ' stroke-dasharray="5 4"' if kind == "forward_residual" else ""
        out.append(f'<line x1="{left + pw + 12}" y1="{y}" x2="{left + pw + 40}" y2="{y}" stroke="{colour}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<text x="{left + pw + 46}" y="{y + 4}" font-size="11">{_e(name)} '
                   f'{"gradient" if kind == "gradient_residual" else "forward"}</text>')
    out.append("</svg>")
    return "\n".join(out)


# ============================================================================================== page
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #212121; background: #ffffff; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; } h3 { font-size: 15px; }
.meta { color: #616161; font-size: 13px; margin: 0; }
#verdict { display: flex; align-items: center; gap: 16px; margin-top: 20px; }
.badge { display: inline-block; color: #ffffff; font-weight: 700; font-size: 20px; padding: 14px 22px;
         border-radius: 6px; min-width: 120px; text-align: center; }
.badge small { display: block; font-size: 13px; font-weight: 400; }
#verdict p { margin: 0; font-size: 14px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #e0e0e0; padding: 4px 8px; text-align: right; }
th { background: #f5f5f5; } td.l, th.l { text-align: left; }
tr.leak td { background: %(hl)s; font-weight: 600; }
.cells { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; font-size: 11px; text-align: center; }
figure img { display: block; image-rendering: pixelated; image-rendering: crisp-edges; margin-bottom: 2px; }
.bad { color: #c62828; } .ok { color: #2e7d32; } .note { color: #616161; font-size: 13px; }
"""


def _badge(result: Any) -> tuple[str, str, str]:
    """(word, colour, sub-text) of the verdict badge."""
    rep = result.security
    if rep is None:
        return "N/A", BADGE_COLOURS["N/A"], "no layer-wise analysis"
    word = rep.verdict.split(":")[0].strip()
    return word, BADGE_COLOURS.get(word, BADGE_COLOURS["N/A"]), f"score {_fmt(rep.score, '.1f')} dB"


def _layers_table(result: Any) -> str:
    rep = result.security
    if rep is None:
        return f'<p class="note">The layer-wise analysis does not apply: {_e(result.security_error)}</p>'
    leak = result.leaking_layer.index if result.leaking_layer is not None else -1
    head = ("<tr><th class='l'>#</th><th class='l'>layer</th><th class='l'>kind</th><th class='l'>activation</th>"
            "<th>unknowns n</th><th>forward rows m</th><th>gradient rows p</th><th>rank</th><th>deficiency</th>"
            "<th>forward deficiency</th><th>σ<sub>min</sub></th><th>condition σ<sub>max</sub>/σ<sub>min</sub></th>"
            "<th>lost energy</th></tr>")
    rows = [head]
    for r in rep.layers:
        ok = math.isfinite(r.sigma_min) and r.sigma_min > 0
        cond = _fmt(r.sigma_max / r.sigma_min, ".1e") if ok and math.isfinite(r.sigma_max) else "–"
        cls = ' class="leak"' if r.index == leak else ""
        rows.append(
            f'<tr id="layer-{r.index}"{cls}><td class="l">{r.index}</td><td class="l">{_e(r.path)}</td>'
            f'<td class="l">{_e(r.kind)} ({_e(r.role)})</td><td class="l">{_e(r.activation)}</td>'
            f"<td>{r.unknowns}</td><td>{r.forward_rows}</td><td>{r.gradient_rows}</td><td>{r.rank}</td>"
            f"<td>{r.deficiency}</td><td>{r.forward_deficiency}</td>"
            f'<td title="{_e(r.sigma_kind)}">{_fmt(r.sigma_min, ".1e")}</td><td>{cond}</td>'
            f"<td>{_fmt(r.lost_energy, '.3f')}</td></tr>")
    return '<table id="layers-table">' + "\n".join(rows) + "</table>"


def _attacks_table(result: Any) -> str:
    rows = ["<tr><th class='l'>attack</th><th>mean PSNR (dB)</th><th>mean SSIM</th><th>labels recovered</th>"
            "<th>gradient distance</th><th>seconds</th><th class='l'>notes</th></tr>"]
    for a in result.attacks:
        if not a.ok:
            rows.append(f'<tr id="attack-{slug(a.name)}"><td class="l">{_e(a.name)}</td><td>–</td><td>–</td>'
                        f'<td>–</td><td>–</td><td>{a.seconds:.1f}</td><td class="l bad">could not run: '
                        f"{_e(a.error)}</td></tr>")
            continue
        notes = "; ".join(f"{r.path}: {r.message}" for r in a.layers if r.status) or (
            "layer-wise" if a.layers else "optimisation")
        opts = ", ".join(f"{k}={v}" for k, v in a.options.items())
        rows.append(
            f'<tr id="attack-{slug(a.name)}"><td class="l">{_e(a.name)}</td><td>{_fmt(a.mean_psnr, ".2f")}</td>'
            f"<td>{_fmt(a.mean_ssim, '.3f')}</td>"
            f"<td>{'given (not recoverable)' if a.labels_given else format(a.label_accuracy, '.0%')}</td>"
            f"<td>{_fmt(float(np.nanmean(a.gradient_distance)) if np.any(np.isfinite(a.gradient_distance)) else float('nan'))}</td>"
            f"<td>{a.seconds:.1f}</td><td class='l'>{_e(notes)}{' (' + _e(opts) + ')' if opts else ''}</td></tr>")
    return '<table id="attacks-table">' + "\n".join(rows) + "</table>"


def _grid(result: Any, a: Any, display: int = 96) -> str:
    sid = f"grid-{slug(a.name)}"
    if not a.ok:
        return (f'<section id="{sid}" class="grid"><h3>{_e(a.name)}</h3><p class="note bad">could not run: '
                f"{_e(a.error)}</p></section>")
    h, w = result.truth.shape[1:3]
    s = max(1, round(display / max(h, w)))
    cells = []
    for i in range(result.truth.shape[0]):
        truth_label = int(result.labels[i])
        got = int(a.labels[i])
        if a.labels_given:
            mark = "(given)"
        elif got == truth_label:
            mark = '<span class="ok">✓</span>'
        else:
            mark = f'<span class="bad">✗ (true {truth_label})</span>'
        cells.append(
            f'<figure class="cell" id="{sid}-{i}">'
            f'<img class="truth" alt="image {i}" width="{w * s}" height="{h * s}" src="{_data_uri(result.truth[i])}">'
            f'<img class="recon" alt="{_e(a.name)} reconstruction {i}" width="{w * s}" height="{h * s}" '
            f'src="{_data_uri(a.images[i])}">'
            f"<figcaption>PSNR {_fmt(float(a.psnr[i]), '.1f')} dB<br>SSIM {_fmt(float(a.ssim[i]), '.3f')}<br>"
            f"label {got} {mark}</figcaption></figure>")
    return (f'<section id="{sid}" class="grid"><h3>{_e(a.name)}: true image (top) and reconstruction (bottom)</h3>'
            f'<div class="cells">{"".join(cells)}</div></section>')


def render(result: Any) -> str:
    """The self-contained HTML report of an audit (a string; :meth:`jaxinv.AuditResult.save` writes it).

    ``result`` is a :class:`jaxinv.AuditResult`, or any object with its fields and ``best_psnr``.

    Sections: verdict badge and score (``#verdict``), the indices (``#indices``), the leaking layer (``#leak``), the
    per-layer table with that layer's row highlighted (``#layers``), the advice (``#advice``), the attacks'
    summary (``#attacks``), one truth/reconstruction grid per attack with per-image PSNR/SSIM (``#grid-<attack>``)
    and the per-layer residual plot (``#residuals``). No external resource is referenced.
    """
    rep = result.security
    word, colour, sub = _badge(result)
    sentence = rep.verdict.split(":", 1)[1].strip() if rep is not None and ":" in rep.verdict else (
        rep.verdict if rep is not None else f"The layer-wise analysis does not apply: {result.security_error}")
    n = result.truth.shape[0]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>jaxinv audit: {_e(result.model)}</title>", f"<style>{_CSS % {'hl': HIGHLIGHT}}</style>",
        "</head><body>",
        f"<header><h1>Gradient-inversion audit of <code>{_e(result.model)}</code></h1>",
        f'<p class="meta">input {_e(result.input_shape)} {_e(result.dtype)} · {n} image(s) from '
        f"{_e(result.source or 'user images')} · jaxinv {_e(__version__)} · {result.seconds:.0f} s</p></header>",
        f'<section id="verdict"><div id="verdict-badge" class="badge" style="background:{colour}">{_e(word)}'
        f"<small>{_e(sub)}</small></div><p>{_e(sentence)}</p></section>",
    ]
    if rep is not None:
        best = result.best_psnr
        parts.append(
            '<section id="indices"><h2>Indices</h2><table><tr><th class="l">COPA index</th><th class="l">R-GAP index'
            '</th><th class="l">score (predicted attack PSNR)</th><th class="l">best measured PSNR</th></tr>'
            f'<tr><td class="l">{rep.copa_index}</td><td class="l">{rep.rgap_index}</td>'
            f'<td class="l">{_fmt(rep.score, ".1f")} dB</td><td class="l">{_fmt(best, ".1f")} dB</td></tr></table>'
            '<p class="note">Indices: 0 means every layer is determined; more negative is more secure. Score: the '
            "PSNR a layer-wise attack is predicted to reach on a typical image.</p></section>")
    else:
        parts.append(f'<section id="indices"><h2>Indices</h2><p class="note">not available: '
                     f"{_e(result.security_error)}</p></section>")
    leak = result.leaking_layer
    parts.append('<section id="leak"><h2>Leaking layer</h2><p>'
                 + (f"<strong>{_e(leak.path)}</strong>: {_e(leak.text)}" if leak is not None else
                    "not determined (no layer-wise analysis)") + "</p></section>")
    parts.append('<section id="layers"><h2>Per-layer systems</h2>' + _layers_table(result)
                 + '<p class="note">Each layer poses a linear system for its input: n unknowns, m forward rows (active '
                   "output units), p gradient rows (kernel-gradient entries). Deficiency = n − rank: directions the "
                   "gradient does not see. σ are singular values of the balanced system. The highlighted row is the "
                   "leaking layer.</p></section>")
    advice = rep.advice if rep is not None else ()
    parts.append('<section id="advice"><h2>Advice</h2><ul>'
                 + "".join(f"<li>{_e(a.text)}</li>" for a in advice if a.text)
                 + ("" if advice else "<li>none</li>") + "</ul></section>")
    parts.append('<section id="attacks"><h2>Attacks</h2>' + _attacks_table(result)
                 + '<p class="note">Each attack inverts every image\'s own single-image gradient; labels are recovered '
                   "by the attack. PSNR/SSIM of the reconstruction clipped to [0, 1], data range 1. Seconds include "
                   "compilation.</p>"
                 + "".join(_grid(result, a) for a in result.attacks) + "</section>")
    svg = residual_plot(result)
    parts.append('<section id="residuals"><h2>Per-layer residuals (log scale)</h2>'
                 + (svg or '<p class="note">No layer-wise attack (copa, rgap, hybrid) ran: residuals are their '
                           "per-layer diagnostics.</p>")
                 + '<p class="note">Solid: gradient residual ‖B x − g<sub>W</sub>‖/‖g<sub>W</sub>‖; dashed: forward '
                   "residual ‖A x − (z − b)‖/‖z − b‖, at each attack's answer (mean over images).</p></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def save(result: Any, out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``report.html`` (:func:`render`, self-contained), ``metrics.json`` (``result.to_dict()``),
    ``truth.png`` and one ``recon_<attack>.png`` per attack that ran into ``out_dir`` (created if missing).

    Each ``recon_<attack>.png`` has the true images in its first row and the reconstructions below, upscaled.

    Returns:
        ``{"html": path, "json": path, "<attack>": png path, "truth": png path}``.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {"html": os.path.join(out_dir, "report.html"), "json": os.path.join(out_dir, "metrics.json"),
             "truth": write_grid(os.path.join(out_dir, "truth.png"), [result.truth])}
    for a in result.attacks:
        if a.images is not None:
            paths[a.name] = write_grid(os.path.join(out_dir, f"recon_{slug(a.name)}.png"), [result.truth, a.images])
    with open(paths["json"], "w") as f:
        json.dump(result.to_dict(), f, indent=1)
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write(render(result))
    return paths
