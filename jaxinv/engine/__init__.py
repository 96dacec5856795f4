r"""The layer-wise engine: each layer's input from its weights and its weight gradient, from the output down.

Floor: above the model reading, the shared gradient, the labels and the per-layer maps; below the attacks (which
use only the names here), the security metric and the audit.
"""

from ._block import BlockSystem, levenberg_marquardt, solve_block
from ._copa import CopaOptions, copa, gradient_distance, relu_active
from ._refine import Pullback, Term, adam_refine, compose, layer_system, pullback_layer

__all__ = [
    "BlockSystem",
    "CopaOptions",
    "Pullback",
    "Term",
    "adam_refine",
    "compose",
    "copa",
    "gradient_distance",
    "layer_system",
    "levenberg_marquardt",
    "pullback_layer",
    "relu_active",
    "solve_block",
]
