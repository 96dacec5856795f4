"""The security metric: how determined each layer's system is at the model's operating point, how noise grows
through it, and the verdict (the floor above the engine and the attacks; below audit, report, CLI and Flower).

Its modules, bottom to top: ``_blas`` (OpenBLAS threads), ``_rank`` (numerical rank, :data:`RANK_TOL`),
``_layer_maps`` (a layer's maps, batched: :class:`LayerMaps`), ``_conv`` (a convolution's structure, tiles),
``_report`` (the result types), ``_pass`` (the representative pass, :func:`natural_probes`), ``_certificates``
(one layer's rank certificate), ``_counting`` (:func:`count_conv_rank`, :func:`rgap_analysis`, :func:`copa_index`),
``_score`` (:func:`predict_psnr`, the verdict), ``_advice``, ``_defended`` (:func:`model_labels`,
:func:`precision_psnr`, :func:`noise_propagation`, :func:`batch_psnr`, the score under the client's setting),
``_security`` (the entry, :func:`security`).
"""

from ._counting import copa_index, count_conv_rank, rgap_analysis
from ._defended import batch_psnr, model_labels, noise_propagation, precision_psnr
from ._layer_maps import LayerMaps
from ._pass import natural_probes
from ._rank import RANK_TOL
from ._report import Advice, LayerSecurity, RGapLayer, SecurityReport, blamed_layer
from ._score import LEAK_DB, SAFE_DB, SCORE_CONSTANTS, predict_psnr
from ._security import security

__all__ = [
    "LEAK_DB",
    "RANK_TOL",
    "SAFE_DB",
    "SCORE_CONSTANTS",
    "Advice",
    "LayerMaps",
    "LayerSecurity",
    "RGapLayer",
    "SecurityReport",
    "batch_psnr",
    "blamed_layer",
    "copa_index",
    "count_conv_rank",
    "model_labels",
    "natural_probes",
    "noise_propagation",
    "precision_psnr",
    "predict_psnr",
    "rgap_analysis",
    "security",
]
