"""jaxinv: can a shared gradient be turned back into the training image, which layer makes it possible, and how
secure is the model? Layer-wise gradient inversion (COPA, R-GAP) and security audits in JAX."""

__version__ = "0.1.0"

from . import attacks, defences
from ._activations import Activation
from ._audit._audit import AttackResult, AuditResult, LeakingLayer, audit
from .engine._refine import Pullback
from .engine._copa import copa
from ._fedavg import local_update, update_as_gradient
from ._gradient import client_gradient, num_labels
from ._labels import HeadNotInvertibleError, recover_label, recover_labels
from ._model import Layer, Model, UnsupportedModelError, from_fn, from_linen, from_nnx
from ._result import LayerReport, Reconstruction
from ._security._security import LayerSecurity, SecurityReport, security
from ._sharding import shard_targets, target_mesh
from ._audit._sweep import sweep
from .attacks import ATTACKS, attack

__all__ = [
    "ATTACKS",
    "attack",
    "audit",
    "AuditResult",
    "AttackResult",
    "LeakingLayer",
    "attacks",
    "defences",
    "recover_labels",
    "security",
    "SecurityReport",
    "LayerSecurity",
    "Activation",
    "Layer",
    "LayerReport",
    "Model",
    "Reconstruction",
    "UnsupportedModelError",
    "HeadNotInvertibleError",
    "client_gradient",
    "copa",
    "local_update",
    "update_as_gradient",
    "Pullback",
    "shard_targets",
    "sweep",
    "target_mesh",
    "recover_label",
    "num_labels",
    "__version__",
    "from_fn",
    "from_linen",
    "from_nnx",
]
