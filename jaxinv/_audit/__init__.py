"""Audits: every attack and the security metric on a set of images, sweeps over models and defences, the HTML
report and the model loader of the CLI (the floor above the metric; below :mod:`jaxinv.report`, the CLI and Flower).

Inside, from the bottom: ``_report`` (HTML page and PNGs, reading an audit as data) -> ``_result`` (what an audit
returns) -> ``_audit`` (one attack scored, the audit) -> ``_sweep`` (models x defences x attacks x images);
``_targets`` resolves the CLI's MODEL argument.
"""

from .._fedavg import shared_gradients
from ._audit import (
    AUDIT_DEFAULTS,
    OPTIMISATION_ATTACKS,
    audit,
    check_attacks,
    check_client,
    check_client_fits,
    check_images,
    client_keywords,
    error_text,
    image_scores,
    layer_residuals,
    merged_options,
    param_dtype,
    run_attack,
    step_options,
)
from ._report import (
    BADGE_COLOURS,
    HIGHLIGHT,
    PALETTE,
    image_grid,
    png_bytes,
    render,
    residual_plot,
    save,
    slug,
    write_grid,
)
from ._result import AttackResult, AuditResult, LayerResidual, LeakingLayer, jsonable, leaking_layer, nanmean
from ._sweep import BACKENDS, Execution, ray_module, run_task, sweep
from ._targets import FACTORY_CONTRACT, load_target

__all__ = [
    "AUDIT_DEFAULTS",
    "AttackResult",
    "AuditResult",
    "BACKENDS",
    "BADGE_COLOURS",
    "Execution",
    "FACTORY_CONTRACT",
    "HIGHLIGHT",
    "LayerResidual",
    "LeakingLayer",
    "OPTIMISATION_ATTACKS",
    "PALETTE",
    "audit",
    "check_attacks",
    "check_client",
    "check_client_fits",
    "check_images",
    "client_keywords",
    "error_text",
    "image_grid",
    "image_scores",
    "jsonable",
    "layer_residuals",
    "leaking_layer",
    "load_target",
    "merged_options",
    "nanmean",
    "param_dtype",
    "png_bytes",
    "ray_module",
    "render",
    "residual_plot",
    "run_attack",
    "run_task",
    "save",
    "shared_gradients",
    "slug",
    "step_options",
    "sweep",
    "write_grid",
]
