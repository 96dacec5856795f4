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
==========  =====================================================================  =========================

Every attack returns a :class:`jaxinv.Reconstruction`. The optimisation attacks work on any differentiable model
and on batch gradients (option ``batch_size``); each runs as one compiled loop.
"""

from .._labels import recover_labels
from ._dlg import dlg, idlg
from ._ig import ig, multistep_schedule
from ._objectives import (
    candidate_gradient,
    cosine_distance,
    l2_distance,
    project_box,
    relative_distance,
    soft_cross_entropy,
    total_variation,
)
from ._registry import ATTACKS, attack
from ._rgap import rgap

__all__ = [
    "ATTACKS",
    "attack",
    "candidate_gradient",
    "cosine_distance",
    "dlg",
    "idlg",
    "ig",
    "l2_distance",
    "multistep_schedule",
    "project_box",
    "recover_labels",
    "relative_distance",
    "rgap",
    "soft_cross_entropy",
    "total_variation",
]
