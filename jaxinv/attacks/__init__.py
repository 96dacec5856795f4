"""Gradient-inversion attacks behind one interface: ``jaxinv.attack(name, model, grads, ...)``.

==========  =====================================================================  =========================
name        method                                                                 needs
==========  =====================================================================  =========================
``copa``    layer-wise least squares, forward + gradient constraints (Chen &        readable layers
            Campbell 2021)
``rgap``    R-GAP's recursive least squares (Zhu & Blaschko 2021), COPA's engine    readable layers
``dlg``     L-BFGS on data and soft label, L2 gradient distance (Zhu et al. 2019)  ``key``
``idlg``    label from the head's gradient, then DLG on the data (Zhao et al.)     ``key``
``ig``      cosine distance + TV, signed Adam, box, restarts (Geiping et al.)      ``key``
``hybrid``  COPA's least squares, then gradient matching per layer (Chen &          readable layers
            Campbell, BMVC 2022)
==========  =====================================================================  =========================

Every attack returns a :class:`jaxinv.Reconstruction`. The optimisation attacks work on any differentiable model
and on batch gradients (``batch_size`` of the :class:`jaxinv.Client`); each runs as one compiled loop. Options come
as objects (``client=Client(...)``, ``options=IGOptions(...)`` / ``DLGOptions(...)``) or as their fields in flat
keywords (``max_steps=...``); :func:`check_options` checks them against each attack's signature.

Floor: above the engine (:mod:`jaxinv.engine`, whose public names ``copa``, ``rgap`` and ``hybrid`` use) and the
priors (:mod:`jaxinv._priors`); below the security metric and the audit.
"""

from .._labels import recover_labels
from .._priors import project_box, total_variation
from ._dlg import DLGOptions, dlg, idlg
from ._hybrid import HybridOptions, hybrid, hybrid_down, null_fraction, suffix_gradient, suffix_leaves
from ._ig import IGOptions, ig, milestones, multistep_schedule
from ._objectives import (
    LoopResult,
    candidate_gradient,
    candidate_shared,
    candidate_update_gradient,
    cosine_distance,
    hard_targets,
    l2_distance,
    minimise,
    relative_distance,
    soft_cross_entropy,
)
from ._registry import ATTACKS, RENAMED, attack, check_options
from ._rgap import rgap

__all__ = [
    "attack",
    "ATTACKS",
    "candidate_gradient",
    "candidate_shared",
    "candidate_update_gradient",
    "check_options",
    "cosine_distance",
    "dlg",
    "DLGOptions",
    "hard_targets",
    "hybrid",
    "hybrid_down",
    "HybridOptions",
    "idlg",
    "ig",
    "IGOptions",
    "l2_distance",
    "LoopResult",
    "milestones",
    "minimise",
    "multistep_schedule",
    "null_fraction",
    "project_box",
    "recover_labels",
    "relative_distance",
    "RENAMED",
    "rgap",
    "soft_cross_entropy",
    "suffix_gradient",
    "suffix_leaves",
    "total_variation",
]
