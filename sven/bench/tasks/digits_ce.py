"""``digits-ce``: the cross-entropy variant of ``digits`` (the "extension" of ``docs/tasks.md``).

The data, the split, the model and the batches are those of
:mod:`sven.bench.tasks.digits`; the per-sample loss is the cross-entropy of
the raw outputs (logits), ``F.cross_entropy(pred, y, reduction="none")``, and
the reported validation loss is its mean. Sven uses ``kappa=2`` (the losses
themselves are the residuals, no fractional powers), ``k=32, lr=0.5, rtol=1e-4``.

Time-to-target uses a validation cross-entropy of ``0.15``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Goal
from .digits import DigitsTask

__all__ = ["DigitsCETask"]


class DigitsCETask(DigitsTask):
    """``digits`` with per-sample cross-entropy."""

    name = "digits-ce"
    summary = "sklearn digits as in `digits`, per-sample cross-entropy, Sven with kappa=2"
    target = 0.15
    sven_defaults: ClassVar[Mapping[str, float | int]] = {"lr": 0.5, "rank": 32, "rtol": 1e-4, "kappa": 2.0}
    goals: ClassVar[tuple[Goal, ...]] = (Goal("loss_ratio", 1.0),)
    loss_label = "mean per-sample cross-entropy"

    def per_sample_loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``cross_entropy(pred, y, reduction="none")``."""
        return F.cross_entropy(pred, y, reduction="none")
