"""The security metric: how determined each layer's system is at the model's operating point, how noise grows
through it, and the verdict (the floor above the engine and the attacks; below audit, report, CLI and Flower)."""

from ._security import (
    Advice,
    LayerSecurity,
    RGapLayer,
    SecurityReport,
    batch_psnr,
    copa_index,
    count_conv_rank,
    natural_probes,
    noise_propagation,
    predict_psnr,
    rgap_analysis,

    security,
)

__all__ = [
    "Advice",
    "LayerSecurity",
    "RGapLayer",
    "SecurityReport",
    "batch_psnr",
    "copa_index",
    "count_conv_rank",
    "natural_probes",
    "noise_propagation",
    "predict_psnr",
    "rgap_analysis",

    "security",
]
