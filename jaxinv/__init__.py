"""jaxinv: can a shared gradient be turned back into the training image, which layer makes it possible, and how
secure is the model? Layer-wise gradient inversion (COPA, R-GAP) and security audits in JAX.

The submodules ``attacks``, ``cli``, ``data``, ``defences``, ``engine``, ``flower``, ``metrics``, ``report`` and
``zoo`` are attributes of the package, imported on first use (``import jaxinv; jaxinv.zoo.names()``).
"""

import importlib

from . import attacks, defences
from ._activations import Activation
from ._audit import AUDIT_DEFAULTS, AttackResult, AuditResult, Execution, LeakingLayer, audit, leaking_layer, sweep
from ._client import Client
from ._fedavg import local_update, update_as_gradient
from ._gradient import client_gradient, num_labels
from ._labels import HeadNotInvertibleError, recover_label, recover_labels
from ._model import Layer, Model, UnsupportedModelError, from_fn, from_linen, from_nnx
from ._result import LayerReport, Reconstruction
from ._results import RESULTS
from ._security import LayerMaps, LayerSecurity, SecurityReport, security
from ._sharding import shard_targets, target_mesh
from ._version import __version__
from .attacks import ATTACKS, attack
from .engine import Pullback, Solver, copa

# submodules reachable as attributes of the package, imported when first used
_SUBMODULES = ("attacks", "cli", "data", "defences", "engine", "flower", "metrics", "report", "zoo")

__all__ = [
    "AUDIT_DEFAULTS",
    "LayerMaps",
    "leaking_layer",
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
    "Client",
    "Execution",
    "Layer",
    "LayerReport",
    "Model",
    "Reconstruction",
    "RESULTS",
    "Solver",
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


def __getattr__(name: str):
    """``jaxinv.zoo`` and the other submodules, imported on first access (PEP 562)."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
