r"""The layer-wise engine: each layer's input from its weights and its weight gradient, from the output down.

Floor: above the model reading (``_trace``, ``_model``), the shared gradient (``_gradient``), the labels
(``_labels``) and the per-layer maps (``_maps``); below the attacks (which use only the names here), the security
metric and the audit. Its pieces, in the data's order: the options (:class:`Solver`), the head
(:func:`head_step`), the layer solve (:func:`unactivate`, :func:`solve_layer`), the block solve
(:func:`solve_block`), the refinement (:class:`Pullback`, :func:`pullback_layer`), one step down
(:func:`down_step`), the fold (:func:`fold_down`), and the entries (:func:`copa`; batches and segmentation inside).
"""

from ._block import BlockSystem, block_step, levenberg_marquardt, solve_block
from ._copa import copa
from ._down import down_jit, down_step
from ._fold import Fold, as_fold_step, fold_down, is_traced, stamp_seconds, timed
from ._head import delta_of_logits, head_jit, head_step
from ._joint import Correction, apply_correction, correct_bottom, finish, flat_image, gradient_eps, inconsistent_layers
from ._layer import (
    LayerSolution,
    bias_residual,
    fit_status,
    layer_report,
    relu_active,
    residuals,
    solve_layer,
    unactivate,
)
from ._options import RENAMED, CopaOptions, Solver, layerwise_options, renamed_refine
from ._refine import (
    Pullback,
    RefineResult,
    Term,
    activation_box,
    adam_refine,
    as_pullback,
    balance_weights,
    compose,
    layer_system,
    output_projection,
    pullback_layer,
    range_penalty,
    relu_inactive,
    rms_scale,
)
from ._batch import batch_system
from .._gradient import loss_fn
from .._maps import LayerSystem, layer_pass, operator_norm

__all__ = [
    "BlockSystem",
    "Correction",
    "apply_correction",
    "correct_bottom",
    "finish",
    "flat_image",
    "gradient_eps",
    "inconsistent_layers",
    "LayerSystem",
    "CopaOptions",
    "RENAMED",
    "Fold",
    "LayerSolution",
    "Pullback",
    "RefineResult",
    "Solver",
    "Term",
    "activation_box",
    "adam_refine",
    "as_fold_step",
    "as_pullback",
    "balance_weights",
    "batch_system",
    "bias_residual",
    "block_step",
    "compose",
    "copa",
    "delta_of_logits",
    "down_jit",
    "down_step",
    "fit_status",
    "fold_down",
    "head_jit",
    "head_step",
    "is_traced",
    "layer_pass",
    "layer_report",
    "layer_system",
    "layerwise_options",
    "levenberg_marquardt",
    "loss_fn",
    "operator_norm",
    "output_projection",
    "pullback_layer",
    "range_penalty",
    "relu_inactive",
    "renamed_refine",
    "relu_active",
    "residuals",
    "rms_scale",
    "solve_block",
    "solve_layer",
    "stamp_seconds",
    "timed",
    "unactivate",
]
