"""Audits: every attack and the security metric on a set of images, sweeps over models and defences, and the
model loader of the CLI (the floor above the metric; below report, CLI and Flower)."""

from ._audit import (
    AttackResult,
    AuditResult,
    LayerResidual,
    LeakingLayer,
    audit,
    check_images,
    leaking_layer,
    merged_options,
    run_attack,
    step_options,
)
from ._sweep import sweep
from ._targets import load_target

__all__ = [
    "AttackResult",
    "AuditResult",
    "LayerResidual",
    "LeakingLayer",
    "audit",
    "check_images",
    "leaking_layer",
    "load_target",
    "merged_options",
    "run_attack",
    "step_options",
    "sweep",
]
