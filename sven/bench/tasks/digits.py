"""``digits``: label regression on real 8x8 images, the offline stand-in for the paper's MNIST.

* data: ``sklearn.datasets.load_digits`` (1,797 handwritten digits, 64
  pixels); pixels scaled to ``[0, 1]`` (divided by 16), then standardised
  with **one** mean and **one** standard deviation over all training pixels
  (numpy, ``ddof=0``): the analogue of MNIST's ``Normalize((0.1307,), (0.3081,))``;
* stratified 80/20 train/validation split,
  ``train_test_split(..., test_size=0.2, stratify=y, random_state=0)``:
  1,437 training and 360 validation images;
* per-sample loss ``||f(x) - onehot(y)||^2`` on the raw outputs; accuracy
  (argmax) is reported too;
* MLP 64-32-32-32-10 with GELU (4,522 parameters), batch 64; ``docs/tasks.md``
  gives no loader seed, so the batches are shuffled by a generator seeded 0;
* Sven: the paper's MNIST settings were ``k=64, lr=0.5, rtol=1e-4``; here
  ``k=32`` (half the batch of 64).

Time-to-target uses a validation loss of ``0.1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from truncpinv._optional import require

from .base import Goal, Task, TaskData, accuracy, mlp

__all__ = ["LOADER_SEED", "SPLIT_SEED", "DigitsTask", "load_digits_split"]

#: ``random_state`` of the stratified split.
SPLIT_SEED = 0
#: Seed of the training-batch shuffling generator (not given by ``docs/tasks.md``).
LOADER_SEED = 0
N_CLASSES = 10


def load_digits_split() -> TaskData:
    """The digits images, scaled and standardised, split 80/20 (stratified, ``random_state=0``).

    Returns:
        :class:`TaskData` with ``(N, 64)`` float32 inputs and ``(N,)`` int64 labels.
    """
    require("sklearn", "bench", "the digits benchmark tasks")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0  # pixels are 0..16
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SPLIT_SEED)
    mean, std = float(np.mean(x_train)), float(np.std(x_train))
    return TaskData(
        torch.tensor((x_train - mean) / std, dtype=torch.float32),
        torch.tensor(y_train),
        torch.tensor((x_val - mean) / std, dtype=torch.float32),
        torch.tensor(y_val),
        {"x_mean": mean, "x_std": std, "n_classes": N_CLASSES},
    )


class DigitsTask(Task):
    """The ``digits`` task (see the module docstring for the recipe)."""

    name = "digits"
    summary = (
        "sklearn digits (8x8), stratified 80/20 split, per-sample ||f(x) - onehot||^2, "
        "MLP 64-32-32-32-10 (4,522 params), batch 64"
    )
    batch_size = 64
    loader_seed = LOADER_SEED
    target = 0.1
    sven_defaults: ClassVar[Mapping[str, float | int]] = {"lr": 0.5, "rank": 32, "rtol": 1e-4, "kappa": 2.0}
    goals: ClassVar[tuple[Goal, ...]] = (Goal("loss_ratio", 1.0),)
    metric_names = ("accuracy",)
    loss_label = "mean per-sample ||f(x) - onehot(y)||^2"

    def build_data(self) -> TaskData:
        """See :func:`load_digits_split`."""
        return load_digits_split()

    def model(self, seed: int) -> nn.Module:
        """MLP 64-32-32-32-10 with GELU, 4,522 parameters."""
        return mlp(32, 3, seed=seed, n_in=64, n_out=N_CLASSES)

    def per_sample_loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``||pred - onehot(y)||^2`` per sample."""
        onehot = torch.nn.functional.one_hot(y, N_CLASSES).to(pred.dtype)
        return ((pred - onehot) ** 2).sum(dim=-1)

    def metrics(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """See :func:`~sven.bench.tasks.base.accuracy`."""
        return accuracy(pred, y)
