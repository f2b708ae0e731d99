"""``toy1d``: the 1-D regression of the Sven paper, rebuilt to run offline (recipe in ``docs/tasks.md``).

* target :math:`f(x) = e^{-10 x^2} \\sin(2x)`, :math:`x \\sim U[-1, 1]`;
* 10,000 train and 10,000 validation points from one ``torch.Generator``
  seeded 54631 (train first); targets standardised with the training mean
  and (unbiased, ``torch.std``) standard deviation;
* MLP 1-16-16-16-1 with GELU (593 parameters), batch 32, shuffled by a
  generator seeded 51159;
* per-sample MSE ``((pred - y) ** 2).sum(-1)``;
* paper-era settings: Sven ``k=16, lr=0.1, rtol=1e-3, kappa=2``; Adam ``lr=1e-3``.

Time-to-target uses a validation loss of ``1e-4`` (as ``examples/toy_1d_regression.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Goal, Task, TaskData, mlp

__all__ = ["DATA_SEED", "LOADER_SEED", "Toy1D", "Toy1DTask", "make_toy1d", "target_fn"]

#: Seed of the data generator (train points first, then validation).
DATA_SEED = 54631
#: Seed of the training-batch shuffling generator.
LOADER_SEED = 51159


def target_fn(x: torch.Tensor) -> torch.Tensor:
    """:math:`f(x) = e^{-10 x^2} \\sin(2x)`."""
    return torch.exp(-10 * x**2) * torch.sin(2 * x)


@dataclass
class Toy1D:
    """The standardised data set: ``(N, 1)`` inputs and targets, and the standardisation.

    Attributes:
        x_train: ``(n_train, 1)`` inputs in ``[-1, 1]``.
        y_train: ``(n_train, 1)`` standardised targets.
        x_val: ``(n_val, 1)`` inputs.
        y_val: ``(n_val, 1)`` targets, standardised with the training statistics.
        mean: training mean of ``f(x)``.
        std: training (unbiased) standard deviation of ``f(x)``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    mean: float
    std: float


def make_toy1d(n_train: int = 10_000, n_val: int = 10_000, *, seed: int = DATA_SEED) -> Toy1D:
    """The toy1d data (float32) drawn from ``torch.Generator().manual_seed(seed)``.

    Args:
        n_train: training points (drawn first).
        n_val: validation points.
        seed: data seed (the recipe's is :data:`DATA_SEED`).

    Returns:
        The standardised :class:`Toy1D` data.
    """
    g = torch.Generator().manual_seed(seed)
    x_train = torch.rand(n_train, 1, generator=g) * 2 - 1
    x_val = torch.rand(n_val, 1, generator=g) * 2 - 1
    y_train, y_val = target_fn(x_train), target_fn(x_val)
    mean, std = float(y_train.mean()), float(y_train.std())
    return Toy1D(x_train, (y_train - mean) / std, x_val, (y_val - mean) / std, mean, std)


class Toy1DTask(Task):
    """The ``toy1d`` task (see the module docstring for the recipe)."""

    name = "toy1d"
    summary = "1-D regression f(x) = exp(-10 x^2) sin(2x), 10k/10k points, MLP 1-16-16-16-1 (593 params), batch 32"
    batch_size = 32
    loader_seed = LOADER_SEED
    target = 1e-4
    sven_defaults: ClassVar[Mapping[str, float | int]] = {"lr": 0.1, "rank": 16, "rtol": 1e-3, "kappa": 2.0}
    goals: ClassVar[tuple[Goal, ...]] = (
        Goal("loss", 1e-8),
        Goal("time_ratio", 1.5),
        Goal("time_to_loss_ratio", 1.5, level=1e-8),
    )
    quick_n_train = 2_000

    def build_data(self) -> TaskData:
        """The recipe's 10,000 + 10,000 points (:func:`make_toy1d`)."""
        d = make_toy1d()
        return TaskData(d.x_train, d.y_train, d.x_val, d.y_val, {"y_mean": d.mean, "y_std": d.std})

    def model(self, seed: int) -> nn.Module:
        """MLP 1-16-16-16-1 with GELU, 593 parameters."""
        return mlp(16, 3, seed=seed, n_in=1, n_out=1)
