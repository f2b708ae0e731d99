r"""``gru``: sequence regression with ``nn.GRU``: predict the next value of a noisy sine.

* data (:func:`make_sines`): 4,000 training then 1,000 validation sequences
  from one ``torch.Generator`` seeded 60221. Sequence :math:`i` has an
  amplitude :math:`A \sim U[0.5, 1.5]`, an angular frequency
  :math:`\omega \sim U[0.1, 0.5]` per step (periods of 13 to 63 steps) and a
  phase :math:`\varphi \sim U[0, 2\pi]`; its input is
  :math:`x_t = A \sin(\omega t + \varphi) + 0.1\,\varepsilon_t`,
  :math:`\varepsilon_t \sim N(0, 1)`, for :math:`t = 0, \dots, 31`, shape
  ``(32, 1)``; its target is the *noise-free* next value
  :math:`A \sin(32\,\omega + \varphi)`, shape ``(1,)``. (A noisy target would
  add an irreducible 0.01 to every loss.)
* model (:class:`GRURegressor`): ``nn.GRU(1, 64, batch_first=True)`` (one
  layer), then ``nn.Linear(64, 1)`` on the last output; 12,929 parameters;
* per-sample MSE ``((pred - y) ** 2).sum(-1)``; batch 32 shuffled by a
  generator seeded 0; 5 epochs (125 steps each);
* Sven ``k=16, lr=0.5, rtol=1e-4, kappa=2`` (not tuned). ``nn.GRU`` is not a
  layer of the Gram route, so :class:`sven.Sven` falls back to the
  materialised Jacobian (correct, slower).

Time-to-target uses a validation loss of ``0.01`` (the variance of the input noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from .base import Task, TaskData

__all__ = ["DATA_SEED", "LOADER_SEED", "STEPS", "GRURegressor", "GRUTask", "make_sines"]

#: Seed of the data generator (training sequences first).
DATA_SEED = 60221
#: Seed of the training-batch shuffling generator.
LOADER_SEED = 0
#: Input points per sequence.
STEPS = 32
#: Standard deviation of the input noise.
NOISE = 0.1


def make_sines(
    n: int, *, generator: torch.Generator, steps: int = STEPS, noise: float = NOISE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` noisy sines and their noise-free next values (recipe in the module docstring).

    Args:
        n: sequences.
        generator: draws, in order, the amplitudes, frequencies, phases and the noise.
        steps: input points per sequence.
        noise: standard deviation of the input noise.

    Returns:
        ``(x, y, params)``: ``(n, steps, 1)`` float32 inputs, ``(n, 1)`` targets and the ``(n, 3)``
        ``(A, omega, phi)`` of each sequence.
    """
    amp = 0.5 + torch.rand(n, 1, generator=generator)
    omega = 0.1 + 0.4 * torch.rand(n, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    t = torch.arange(steps + 1, dtype=torch.float32)
    clean = amp * torch.sin(omega * t + phase)
    x = clean[:, :steps] + noise * torch.randn(n, steps, generator=generator)
    return x.unsqueeze(-1), clean[:, steps:], torch.cat([amp, omega, phase], dim=1)


class GRURegressor(nn.Module):
    """``nn.GRU(1, hidden)`` then ``nn.Linear(hidden, 1)`` on the last time step, initialised from ``seed``."""

    def __init__(self, *, seed: int = 0, hidden: int = 64) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.gru = nn.GRU(1, hidden, batch_first=True)
            self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, 1)`` sequences to ``(B, 1)`` predictions of the next value."""
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class GRUTask(Task):
    """The ``gru`` task (see the module docstring for the recipe)."""

    name = "gru"
    summary = (
        "next value of noisy sines (32 steps, noise 0.1), 4,000/1,000 sequences, GRU(1, 64) + linear "
        "(12,929 params), per-sample MSE, batch 32, 5 epochs"
    )
    batch_size = 32
    loader_seed = LOADER_SEED
    target = 0.01
    sven_defaults: ClassVar[Mapping[str, float | int]] = {"lr": 0.5, "rank": 16, "rtol": 1e-4, "kappa": 2.0}
    quick_n_train = 128
    epochs = 5
    sven_reference = False  # its step takes seconds on this model (base.Task.sven_reference)

    def build_data(self) -> TaskData:
        """4,000 training then 1,000 validation sequences (:func:`make_sines`, seed :data:`DATA_SEED`)."""
        g = torch.Generator().manual_seed(DATA_SEED)
        x_train, y_train, _ = make_sines(4_000, generator=g)
        x_val, y_val, _ = make_sines(1_000, generator=g)
        return TaskData(x_train, y_train, x_val, y_val, {"steps": STEPS, "noise": NOISE})

    def model(self, seed: int) -> nn.Module:
        """:class:`GRURegressor` with 64 hidden units, 12,929 parameters."""
        return GRURegressor(seed=seed)
