"""``mnist-subset-cnn``: ``mnist-subset`` with a small CNN, per-sample cross-entropy.

The data, the split, the batches and the loss are those of
:mod:`sven.bench.tasks.mnist_subset` (the ``(N, 784)`` rows are reshaped to
``(N, 1, 28, 28)`` inside the model); the model is

``Conv2d(1, 8, 3, padding=1) - GELU - MaxPool2d(2) - Conv2d(8, 16, 3, padding=1) - GELU - MaxPool2d(2) -
Flatten - Linear(784, 10)``

(9,098 parameters), initialised from the model seed; 5 epochs. Sven:
``k=32, lr=0.5, rtol=1e-4, kappa=2`` (the ``digits-ce`` settings).

Time-to-target uses a validation cross-entropy of ``0.15`` (Adam at lr=1e-2 reached 0.14 in 2 epochs).
"""

from __future__ import annotations

import torch
from torch import nn

from .mnist_subset import N_CLASSES, MnistSubsetTask

__all__ = ["MnistSubsetCNNTask", "small_cnn"]


def small_cnn(*, seed: int = 0) -> nn.Sequential:
    """The CNN of the module docstring on ``(N, 784)`` rows, initialised from ``seed`` (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 7 * 7, N_CLASSES),
        )


class MnistSubsetCNNTask(MnistSubsetTask):
    """``mnist-subset`` with a small CNN (see the module docstring)."""

    name = "mnist-subset-cnn"
    summary = (
        "mnist-subset's 4,000/1,000 real MNIST digits, per-sample cross-entropy, CNN conv8-pool-conv16-pool-linear "
        "(9,098 params), batch 64, 5 epochs"
    )
    epochs = 5
    target = 0.15

    def model(self, seed: int) -> nn.Module:
        """See :func:`small_cnn`."""
        return small_cnn(seed=seed)
