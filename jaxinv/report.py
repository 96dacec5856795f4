"""The audit report: one self-contained HTML file, and PNG grids, with no dependency beyond numpy.

:func:`render` turns a :class:`jaxinv.AuditResult` into one HTML page that needs no network: images are inlined
as base64 PNG data URIs (encoded here, :func:`png_bytes`), the residual plot is inline SVG drawn here
(:func:`residual_plot`), the style is inline CSS. Every text taken from the model or the results is escaped.
:func:`save` writes the page, ``metrics.json`` and the PNG grids (what :meth:`jaxinv.AuditResult.save` does).

Stable element ids (for tests and for linking): ``#verdict`` (with the badge ``#verdict-badge``), ``#indices``,
``#leak``, ``#layers`` (rows ``#layer-<i>``, the leaking layer's row has class ``leak``), ``#advice``,
``#attacks``, ``#grid-<attack>`` (one per attack; images ``img.truth`` / ``img.recon``), ``#residuals``.

Example:
    >>> from jaxinv import report
    >>> res = jaxinv.audit(model, images[:2], attacks=("copa",), key=jax.random.key(0))
    >>> page = report.render(res)   # or res.save("report/") for report.html + metrics.json + PNGs
    >>> page.startswith("<!DOCTYPE html>"), 'id="grid-copa"' in page
    (True, True)
"""

from ._audit import BADGE_COLOURS, HIGHLIGHT, PALETTE, image_grid, png_bytes, render, residual_plot, save, slug
from ._audit import write_grid

__all__ = ["BADGE_COLOURS", "HIGHLIGHT", "PALETTE", "image_grid", "png_bytes", "render", "residual_plot", "save", "slug",
           "write_grid"]
