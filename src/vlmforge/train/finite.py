"""Stopping a training loop at a step whose loss or gradient norm is not finite (NaN / inf).

The main trainer (``train.loop``) and the small loops (vision-pretrain, curate train-filter) raise
the same error, :class:`NonFiniteStepError`, a UserError: one line naming the step and the value,
exit 2. The checks only read values; a normal run's numbers do not change.
"""

from __future__ import annotations

import math

import torch

from vlmforge.errors import UserError

HINT = "lower the learning rate or check the data"


class NonFiniteStepError(UserError):
    """A training step's loss or gradient norm (or the weights before a save) is NaN or infinite."""


def require_finite(step: int, what: str, value: float | torch.Tensor, *, hint: str = HINT) -> None:
    """Raise :class:`NonFiniteStepError` when ``value`` (the step's ``what``: "loss", "gradient norm")
    is NaN or infinite. Call it before the update it guards (the loss before ``backward``, the
    gradient norm before ``optimizer.step``), so nothing of that step is applied or saved."""
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        raise NonFiniteStepError(f"step {step}: the {what} is {v}; stopped without updating or saving the weights; {hint}")
