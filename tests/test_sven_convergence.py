"""Convergence on ``toy1d`` (recipe in docs/tasks.md): 2 epochs of Sven beat 2 epochs of Adam.

Full data (10k train / 10k validation), batch 32, the paper-era settings
(Sven ``k=16, lr=0.1, rtol=1e-3, kappa=2``; Adam ``lr=1e-3``), the same
initial weights and the same batch order for both. The batches come from
:func:`sven.tasks.batches`, which reproduces the ``DataLoader`` order
exactly (checked below) without its per-sample collation cost.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import sven
from sven.tasks import LOADER_SEED, batches, make_toy1d, mlp, per_sample_mse

EPOCHS = 2
MODEL_SEED = 0


def _val(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(per_sample_mse(model(x), y).mean())


def test_fast_batches_reproduce_the_dataloader_order() -> None:
    data = make_toy1d(1000, 10)
    dataset = TensorDataset(data.x_train, data.y_train)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for _ in range(2):  # two epochs: the generator state carries over identically
        ours = list(batches(data.x_train, data.y_train, 32, g))
        theirs = list(loader)
        assert len(ours) == len(theirs) == 32
        for (a, b), (c, d) in zip(ours, theirs):
            assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.usefixtures("one_thread")
def test_two_epochs_of_sven_beat_two_epochs_of_adam_on_toy1d() -> None:
    data = make_toy1d()
    base = mlp(seed=MODEL_SEED)
    assert sum(p.numel() for p in base.parameters()) == 593
    start = _val(base, data.x_val, data.y_val)

    m_adam = copy.deepcopy(base)
    adam = torch.optim.Adam(m_adam.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(LOADER_SEED)
    for _ in range(EPOCHS):
        for xb, yb in batches(data.x_train, data.y_train, 32, g):
            adam.zero_grad()
            per_sample_mse(m_adam(xb), yb).mean().backward()
            adam.step()

    m_sven = copy.deepcopy(base)
    opt = sven.Sven(m_sven.parameters(), lr=0.1, rank=16, rtol=1e-3, kappa=2.0)
    g = torch.Generator().manual_seed(LOADER_SEED)
    for _ in range(EPOCHS):
        for xb, yb in batches(data.x_train, data.y_train, 32, g):
            opt.step(lambda: per_sample_mse(m_sven(xb), yb))  # noqa: B023

    val_adam = _val(m_adam, data.x_val, data.y_val)
    val_sven = _val(m_sven, data.x_val, data.y_val)
    assert opt.skipped_steps == 0
    assert val_adam < start  # Adam does learn
    assert val_sven < val_adam, (val_sven, val_adam)
