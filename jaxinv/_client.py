r"""``Client``: the federated client's setting, validated once and shared by every entry point.

What the attacker assumes about how the shared object was made: the loss, how many images stand behind one
gradient, and whether it is a FedAvg update after :math:`K` local SGD steps with learning rate :math:`\eta`
(then pass :func:`jaxinv.update_as_gradient` of the update, :math:`\bar g = -\Delta/(K\eta)`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ._checks import positive_int
from ._gradient import LOSSES

DTYPES = ("float64", "float32", "bfloat16", "float16")
"""The precisions a client may share its gradient in."""


@dataclasses.dataclass(frozen=True)
class Client:
    """The client's setting (hashable: a static argument of compiled functions).

    Attributes:
        loss: the client's loss, one of ``"auto"`` (logistic for one output, cross-entropy otherwise),
            ``"cross_entropy"``, ``"logistic"``.
        batch_size: ``B`` images behind one unstacked gradient (``None``: one image, or as many as the labels
            given).
        local_steps: ``K``, the client's local SGD steps before it shares (1: a plain gradient).
        local_lr: :math:`\\eta`, the client's learning rate; required when ``local_steps > 1``.
        dtype: the precision the client shares its gradient in (``"float32"``, ``"bfloat16"``, ``"float16"``,
            ``"float64"``); ``None``: the model's parameters' dtype. Its rounding is noise the attack inherits
            (:func:`jaxinv.security` counts it).

    Raises:
        ValueError: at construction, naming the field and the fix.

    Example:
        >>> Client(local_steps=5, local_lr=0.01).fedavg
        True
        >>> Client(local_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: Client: local_steps must be a positive integer (the client's local SGD steps K), got 0
    """

    loss: str = "auto"
    batch_size: int | None = None
    local_steps: int = 1
    local_lr: float | None = None
    dtype: str | None = None

    def __post_init__(self):
        if self.dtype is not None:
            if self.dtype not in DTYPES:
                raise ValueError(f"Client: dtype must be one of {DTYPES} or None (the model's), got {self.dtype!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"Client: loss must be one of {LOSSES}, got {self.loss!r}")
        if self.batch_size is not None:
            positive_int(self.batch_size, "batch_size", "Client", what="images behind one gradient")
        positive_int(self.local_steps, "local_steps", "Client", what="the client's local SGD steps K")
        if self.local_lr is not None:
            try:
                lr = float(self.local_lr)
            except (TypeError, ValueError):
                raise TypeError(f"Client: local_lr must be a number, got {type(self.local_lr).__name__}") from None
            if not np.isfinite(lr) or lr <= 0:
                raise ValueError(f"Client: local_lr must be positive and finite (the client's learning rate), "
                                 f"got {self.local_lr!r}")
            object.__setattr__(self, "local_lr", lr)
        elif self.local_steps > 1:
            raise ValueError(f"Client: local_lr (the client's learning rate) is required with local_steps="
                             f"{self.local_steps}")

    @property
    def fedavg(self) -> bool:
        """Whether the shared object is a multi-step FedAvg update (``local_steps > 1``)."""
        return self.local_steps > 1

    def rounded(self, grads):
        """``grads`` as the client shares them: rounded to ``dtype`` (and back to their own dtype); unchanged when
        ``dtype`` is ``None``."""
        if self.dtype is None:
            return grads
        return jax.tree_util.tree_map(lambda a: a.astype(self.dtype).astype(a.dtype), grads)
