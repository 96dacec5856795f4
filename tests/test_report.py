"""The audit's HTML report: the renderer's contract, and a real report rendered by headless Chromium.

The browser test skips when Chromium (or the ``playwright`` package that drives it) is missing, unless
``JAXINV_REQUIRE_BROWSER=1`` (set by ``.ci/run`` once it has a working Chromium): then it fails.
"""

import dataclasses
import html
import io
import os
import re
import shutil
import struct
import zlib

import jax
import numpy as np
import pytest
from helpers import leaking_layer, load_target
from skimage import io as skio

import jaxinv
from jaxinv import data, report

REQUIRE_BROWSER = os.environ.get("JAXINV_REQUIRE_BROWSER") == "1"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
SHAPE = (16, 16, 3)


@pytest.fixture(scope="module")
def result():
    """A real audit: cnn2_c1 (every layer determined) on two bundled photos, COPA and a short IG."""
    model, shape = load_target("cnn2_c1", SHAPE, 0)
    x = data.sample_images(2, size=16, key=jax.random.key(0))
    return jaxinv.audit(model, x, labels=np.array([3, 7]), attacks=("copa", "ig"), key=jax.random.key(1),
                        attack_options={"ig": {"max_steps": 50}}, source="bundled photos")


def _hex(colour):
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], np.float64)


def _decode_png(blob):
    """Minimal decoder of our own PNGs (8-bit RGB, filter 0): the encoder must round-trip."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(blob):
        (n,) = struct.unpack(">I", blob[pos:pos + 4])
        tag, body = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + n]
        crc = struct.unpack(">I", blob[pos + 8 + n:pos + 12 + n])[0]
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, ctype) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[i * (3 * w + 1):(i + 1) * (3 * w + 1)] for i in range(h)]
    assert all(r[0] == 0 for r in rows)
    return np.frombuffer(b"".join(r[1:] for r in rows), np.uint8).reshape(h, w, 3)


# ============================================================================================== renderer
def test_png_round_trip_and_readers():
    rng = np.random.default_rng(0)
    img = rng.random((5, 7, 3))
    blob = report.png_bytes(img)
    expect = (img * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(_decode_png(blob), expect)
    np.testing.assert_array_equal(skio.imread(io.BytesIO(blob)), expect)  # a real decoder agrees
    grey = report.png_bytes(rng.random((4, 4, 1)))
    assert _decode_png(grey).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="an image must be"):
        report.png_bytes(np.zeros((2, 2, 5)))


def test_image_grid_layout():
    a = np.zeros((2, 3, 3, 3))
    b = np.ones((1, 3, 3, 1))
    g = report.image_grid([a, b], scale=2, pad=1)
    assert g.shape == (6 + 1 + 6, 2 * 6 + 1, 3) and g.dtype == np.uint8
    assert (g[:6, :6] == 0).all() and (g[:6, 6] == 255).all() and (g[7:, :6] == 255).all()


def test_all_sections_present_and_self_contained(result):
    page = report.render(result)
    for sid in ("verdict", "verdict-badge", "indices", "leak", "layers", "layers-table", "advice", "attacks",
                "grid-copa", "grid-ig", "residuals", "residuals-plot"):
        assert len(re.findall(rf'id="{sid}"', page)) == 1, sid
    assert "http://" not in page and "https://" not in page  # no network resources, not even a namespace
    assert not re.search(r"<(script|link|iframe)\b", page)
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 2 * 2 * 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert page.count('class="truth"') == 4 and page.count('class="recon"') == 4
    assert f'background:{report.BADGE_COLOURS["LEAKS"]}' in page  # cnn2_c1 leaks
    # per-image PSNR/SSIM captions match the results
    for a in result.attacks:
        for i in range(2):
            assert f"PSNR {a.psnr[i]:.1f} dB" in page and f"SSIM {a.ssim[i]:.3f}" in page
    # the residual plot has one point per layer for COPA's gradient residuals, and none for IG (not layer-wise)
    svg = report.residual_plot(result)
    assert svg.count("<circle") == len(result["copa"].layers) and "ig " not in svg


def test_leaking_row_highlighted(result):
    page = report.render(result)
    rows = re.findall(r'<tr id="layer-(\d+)"( class="leak")?>', page)
    assert [(int(i), bool(c)) for i, c in rows] == [(0, True), (1, False)]  # determined: the input layer
    assert f"tr.leak td {{ background: {report.HIGHLIGHT}" in page
    # a deficient layer moves the highlight to it
    rep = result.security
    layers = list(rep.layers)
    layers[1] = dataclasses.replace(layers[1], role="hidden", deficiency=5, rank=layers[1].unknowns - 5,
                                    lost_energy=0.4)
    layers.append(dataclasses.replace(layers[1], index=2, path="Head/kernel", role="head", deficiency=0))
    rep2 = dataclasses.replace(rep, layers=tuple(layers))
    res2 = dataclasses.replace(result, security=rep2, leaking_layer=leaking_layer(rep2))
    assert res2.leaking_layer.index == 1 and not res2.leaking_layer.determined
    assert "5 of the" in res2.leaking_layer.text and "40%" in res2.leaking_layer.text
    rows = re.findall(r'<tr id="layer-(\d+)"( class="leak")?>', report.render(res2))
    assert [bool(c) for _, c in rows] == [False, True, False]


def test_text_is_escaped(result):
    evil = '<script>alert("x")</script>&'
    rep = result.security
    layers = (dataclasses.replace(rep.layers[0], path=evil),) + rep.layers[1:]
    rep2 = dataclasses.replace(rep, model=evil, layers=layers, verdict="LEAKS: " + evil,
                               advice=(dataclasses.replace(rep.advice[0], text=evil),))
    bad = dataclasses.replace(result["ig"], name=evil, error=evil, images=None)
    res = dataclasses.replace(result, model=evil, source=evil, security=rep2, attacks=(result["copa"], bad),
                              leaking_layer=dataclasses.replace(result.leaking_layer, path=evil, text=evil))
    page = report.render(res)
    assert "<script" not in page and evil not in page
    assert page.count(html.escape(evil)) >= 8  # title, header, source, verdict, layer, advice, leak, attack error
    assert 'id="grid-script-alert-x-script"' in page  # ids are slugs


def test_failed_attack_and_missing_security_render(result):
    failed = dataclasses.replace(result["copa"], images=None, labels=None, error="HeadNotInvertibleError: no bias",
                                 psnr=np.full(2, np.nan), ssim=np.full(2, np.nan), layers=())
    res = dataclasses.replace(result, security=None, leaking_layer=None, attacks=(failed, result["ig"]),
                              security_error="UnsupportedModelError: max pooling at layer 2")
    page = report.render(res)
    assert ">N/A<" in page and "max pooling at layer 2" in page and "could not run" in page
    assert "No layer-wise attack" in page  # the residual section says why it is empty
    assert 'id="layers"' in page and 'id="grid-copa"' in page


# ============================================================================================== browser
def _chromium():
    """(sync_playwright, executable) or skip/fail."""

    def missing(why):
        if REQUIRE_BROWSER:
            pytest.fail(f"JAXINV_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)

    exe = os.environ.get("JAXINV_CHROMIUM") or next(
        (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome",
                                               "google-chrome-stable")) if p), None)
    if not exe:
        missing("no Chromium executable (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -e '.[test]')")
    return sync_playwright, exe


def _box_crop(img, box, inset=2):
    x0, y0 = int(round(box["x"])) + inset, int(round(box["y"])) + inset
    x1, y1 = int(round(box["x"] + box["width"])) - inset, int(round(box["y"] + box["height"])) - inset
    assert x1 > x0 and y1 > y0 and y1 <= img.shape[0] and x1 <= img.shape[1], (box, img.shape)
    return img[y0:y1, x0:x1, :3].astype(np.float64)


def _fraction_near(crop, colour, tol=12.0):
    return float(np.mean(np.max(np.abs(crop - _hex(colour)), axis=-1) <= tol))


def test_report_in_headless_chromium(result, tmp_path):
    sync_playwright, exe = _chromium()
    paths = result.save(tmp_path / "report")
    url = "file://" + os.path.abspath(paths["html"])
    shot = tmp_path / "shot.png"
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=BROWSER_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900}, device_scale_factor=1)
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            boxes = page.evaluate("""() => {
                const box = s => { const e = document.querySelector(s); if (!e) return null;
                    const r = e.getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY,
                    width: r.width, height: r.height}; };
                return {badge: box('#verdict-badge'), leak: box('#layers-table tr.leak'),
                        other: box('#layer-1'), table: box('#layers-table'), grid: box('#grid-copa'),
                        truth: box('#grid-copa-0 img.truth'), recon: box('#grid-copa-0 img.recon'),
                        igrecon: box('#grid-ig-0 img.recon'), plot: box('#residuals-plot'),
                        complete: [...document.images].every(i => i.complete && i.naturalWidth > 0)}; }""")
            texts = {s: page.inner_text(s) for s in ("#verdict", "#layers-table", "#grid-copa")}
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing from the network
    assert boxes["complete"], "an inlined image failed to decode"
    assert "LEAKS" in texts["#verdict"] and "Conv_0/kernel" in texts["#layers-table"]
    assert "PSNR" in texts["#grid-copa"]
    img = skio.imread(shot)
    # the verdict badge is drawn in its colour (white text on it)
    badge = _box_crop(img, boxes["badge"])
    assert _fraction_near(badge, report.BADGE_COLOURS["LEAKS"]) > 0.6
    # the leaking layer's row is highlighted, the other row is not
    assert _fraction_near(_box_crop(img, boxes["leak"]), report.HIGHLIGHT) > 0.6
    assert _fraction_near(_box_crop(img, boxes["other"]), report.HIGHLIGHT) < 0.05
    # the per-layer table has text on it (dark pixels), below the badge
    table = _box_crop(img, boxes["table"], inset=0)
    assert np.mean(table.mean(-1) < 100) > 0.01 and boxes["table"]["y"] > boxes["badge"]["y"]
    # the grid shows the true photo: the displayed pixels, averaged back to 16 x 16, are the image
    truth = result.truth[0] * 255.0

    def shown(box):
        crop = _box_crop(img, box, inset=0)
        k = crop.shape[0] // SHAPE[0]
        assert crop.shape[:2] == (SHAPE[0] * k, SHAPE[1] * k), crop.shape
        return crop.reshape(SHAPE[0], k, SHAPE[1], k, 3).mean(axis=(1, 3))

    def corr(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    seen_truth = shown(boxes["truth"])
    assert np.abs(seen_truth - truth).mean() < 3.0 and corr(seen_truth, truth) > 0.99
    assert corr(shown(boxes["recon"]), truth) > 0.99  # COPA recovers cnn2_c1's input exactly
    assert corr(shown(boxes["igrecon"]), truth) < 0.95  # 50 IG steps do not: the crops are not all the same
    # the residual plot is drawn (coloured strokes inside its box)
    plot = _box_crop(img, boxes["plot"])
    assert _fraction_near(plot, report.PALETTE[0], tol=40) > 0.001
