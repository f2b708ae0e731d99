"""``mnist-subset-mse``: ``mnist-subset`` as label regression, the loss of ``digits`` on real MNIST.

The data, the split, the MLP 784-128-10 (101,770 parameters), the batches and
the 10 epochs are those of :mod:`sven.bench.tasks.mnist_subset`; the
per-sample loss is ``||f(x) - onehot(y)||^2`` on the raw outputs, as in
``digits`` (the loss the Sven paper used on MNIST); accuracy is reported too.
Sven: ``k=32, lr=0.5, rtol=1e-4, kappa=2`` (the ``digits`` settings).

Time-to-target uses a validation loss of ``0.15``.
"""

from __future__ import annotations

import torch

from .mnist_subset import N_CLASSES, MnistSubsetTask

__all__ = ["MnistSubsetMSETask"]


class MnistSubsetMSETask(MnistSubsetTask):
    """``mnist-subset`` with the per-sample loss ``||f(x) - onehot(y)||^2``."""

    name = "mnist-subset-mse"
    summary = (
        "mnist-subset's 4,000/1,000 real MNIST digits, per-sample ||f(x) - onehot(y)||^2, MLP 784-128-10 "
        "(101,770 params), batch 64, 10 epochs"
    )
    target = 0.15
    loss_label = "mean per-sample ||f(x) - onehot(y)||^2"

    def per_sample_loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``||pred - onehot(y)||^2`` per sample."""
        onehot = torch.nn.functional.one_hot(y, N_CLASSES).to(pred.dtype)
        return ((pred - onehot) ** 2).sum(dim=-1)
