"""``RESULTS``: what a layer's solve (or a whole attack) ended with, as data, with a message that says what to do.

The codes are small integers so that they live in arrays under ``jit`` and ``vmap`` (``LayerReport.status``);
``RESULTS(code).message`` turns one back into words.
"""

from __future__ import annotations

import enum


class RESULTS(enum.IntEnum):
    """Status of a solve. ``RESULTS.successful`` (0) is success; every other member's ``message`` says what to do.

    Example:
        >>> RESULTS(1).name, RESULTS.successful == 0
        ('max_steps_reached', True)
    """

    successful = 0
    max_steps_reached = 1
    breakdown = 2
    inconsistent = 3
    nonfinite = 4
    fallback = 5

    @property
    def message(self) -> str:
        """What this status means and what to do about it."""
        return _MESSAGES[self]


_MESSAGES = {
    RESULTS.successful: "ok",
    RESULTS.max_steps_reached: "solver reached max_steps before the tolerance: raise `max_steps` or use float64",
    RESULTS.breakdown: "solver broke down (ill-conditioned system): use float64 or a hybrid/optimisation attack",
    RESULTS.inconsistent: "the layer's system is inconsistent (large residual): the gradient may be noisy, defended "
    "or from a batch",
    RESULTS.nonfinite: "non-finite values in the solution: the gradient or the layer above is degenerate",
    RESULTS.fallback: "no answer matched the gradient better than a flat image: returned the flat image of the "
    "recovered mean colour (the gradient's noise, its precision or a defence, hides the input here)",
}

# The earlier name of the same table (code -> message).
STATUS_MESSAGES: dict[int, str] = {int(r): r.message for r in RESULTS}
