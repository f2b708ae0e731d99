"""The ``toy1d`` task of the Sven paper, rebuilt to run offline (recipe in ``TASKS.md``).

* target :math:`f(x) = e^{-10 x^2} \\sin(2x)`, :math:`x \\sim U[-1, 1]`;
* 10,000 train and 10,000 validation points from one ``torch.Generator``
  seeded 54631 (train first); targets standardised with the training mean
  and (unbiased) standard deviation;
* MLP 1-16-16-16-1 with GELU (593 parameters), batch 32, shuffled by a
  generator seeded 51159;
* per-sample MSE ``((pred - y) ** 2).sum(-1)``.

Used by the tests, the example and the benchmark.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DATA_SEED", "LOADER_SEED", "Toy1D", "batches", "make_toy1d", "mlp", "per_sample_mse", "target_fn"]

DATA_SEED = 54631
#: Seed of the training-batch shuffling generator.
LOADER_SEED = 51159


def target_fn(x: torch.Tensor) -> torch.Tensor:
    """:math:`f(x) = e^{-10 x^2} \\sin(2x)`."""
    return torch.exp(-10 * x**2) * torch.sin(2 * x)


def per_sample_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``((pred - y) ** 2).sum(-1)``: one loss per sample, shape ``(B,)``."""
    return ((pred - y) ** 2).sum(dim=-1)


@dataclass
class Toy1D:
    """The standardised data set: ``(N, 1)`` inputs and targets, and the standardisation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    mean: float
    std: float


def make_toy1d(n_train: int = 10_000, n_val: int = 10_000, *, seed: int = DATA_SEED) -> Toy1D:
    """The toy1d data (float32) drawn from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    x_train = torch.rand(n_train, 1, generator=g) * 2 - 1
    x_val = torch.rand(n_val, 1, generator=g) * 2 - 1
    y_train, y_val = target_fn(x_train), target_fn(x_val)
    mean, std = float(y_train.mean()), float(y_train.std())
    return Toy1D(x_train, (y_train - mean) / std, x_val, (y_val - mean) / std, mean, std)


def mlp(width: int = 16, depth: int = 3, *, seed: int = 0, n_in: int = 1, n_out: int = 1) -> nn.Sequential:
    """MLP ``n_in - width x depth - n_out`` with GELU, initialised from ``seed`` (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        d = n_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.GELU()]
            d = width
        layers.append(nn.Linear(d, n_out))
        return nn.Sequential(*layers)


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled mini-batches, in exactly the order of
    ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True, generator=generator)``
    (which draws one number for its worker seed, then a ``randperm`` for the
    epoch, then one more, unused, ``randperm`` when its sampler runs out),
    without the per-sample collation overhead.
    """
    n = x.shape[0]
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # DataLoader's _base_seed draw
    perm = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)  # RandomSampler's trailing randperm(n)[: num_samples % n]
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]
