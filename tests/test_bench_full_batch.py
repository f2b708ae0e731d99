"""The full-batch, time-budgeted benchmark tasks (the PINNs): recipes, runner, goals and report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sven.bench.cli import main
from sven.bench.optimizers import OPTIMIZERS, get_optimizer
from sven.bench.runner import BenchConfig, run_full_batch
from sven.bench.tasks import TASKS, FullBatchTask, get_task, heat1d, poisson2d

FULL_BATCH = [n for n, t in TASKS.items() if issubclass(t, FullBatchTask)]


def _task(name: str) -> FullBatchTask:
    task = get_task(name)
    assert isinstance(task, FullBatchTask)
    return task


class _Exact(nn.Module):
    """The exact solution as a module (batched: ``(N, 2) -> (N, 1)``)."""

    def __init__(self, u: object) -> None:
        super().__init__()
        self.u = u
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))  # one parameter, for the optimizers' sake

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(x)[..., None] + self.w  # type: ignore[operator]


def test_full_batch_tasks_are_registered() -> None:
    assert FULL_BATCH == ["poisson2d", "heat1d"]


@pytest.mark.parametrize(
    ("name", "exact", "sizes"), [("poisson2d", poisson2d.exact, (900, 120)), ("heat1d", heat1d.exact, (900, 30, 60))]
)
def test_the_exact_solution_has_zero_residual_and_error(name: str, exact: object, sizes: tuple[int, ...]) -> None:
    task = _task(name)
    u = _Exact(exact)
    problem = task.problem(u)
    assert tuple(t.points.shape[0] for t in problem.terms) == sizes
    assert all(t.points.dtype == torch.float64 for t in problem.terms)
    r = problem().detach()
    assert r.shape == (sum(sizes),) and float(r.abs().max()) < 1e-9
    assert task.error(u) < 1e-12


@pytest.mark.parametrize("name", FULL_BATCH)
def test_model_and_residuals_follow_the_recipe(name: str) -> None:
    task = _task(name)
    m0, m0b, m1 = task.model(0), task.model(0), task.model(1)
    w = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (m0, m0b, m1)]
    assert w[0].numel() == 129 and w[0].dtype == torch.float64
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    ev = task.evaluate(m0, task.problem(m0))
    assert set(ev) == {"loss", "residual_loss"} and 0 < ev["loss"] < 10 and math.isfinite(ev["residual_loss"])
    cp = task.checkpoints(10.0)
    assert len(cp) == task.n_checkpoints and cp[-1] == pytest.approx(10.0) and cp == sorted(cp)


def test_poisson2d_collocation_points() -> None:
    interior, boundary = poisson2d.square_points(32)
    h = 1 / 31
    assert interior.shape == (900, 2) and float(interior.min()) == pytest.approx(h)
    assert boundary.shape == (120, 2)
    on_side = ((boundary == 0) | (boundary == 1)).sum(-1)
    assert torch.equal(on_side, torch.ones(120, dtype=on_side.dtype))  # no corners, each on exactly one side


@pytest.mark.parametrize("name", [n for n, f in OPTIMIZERS.items() if f.supports(get_task("poisson2d"))])
def test_every_full_batch_optimizer_takes_a_finite_step(name: str) -> None:
    task = _task("poisson2d")
    factory = get_optimizer(name)
    model = task.model(0)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    loss = factory.make_full_batch(model, task.problem(model), factory.grid(task)[0]).step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.isfinite(loss).all() and torch.isfinite(after).all() and not torch.equal(before, after)


def test_sven_reference_has_no_full_batch_form() -> None:
    task = _task("poisson2d")
    assert not get_optimizer("sven-reference").supports(task) and get_optimizer("sven-reference").grid(task) == []
    assert not get_optimizer("sven-plain").supports(get_task("toy1d"))
    assert len(get_optimizer("sven").grid(task, sven_grid=True)) == 4


@pytest.mark.usefixtures("one_thread")
def test_a_run_is_evaluated_at_every_checkpoint() -> None:
    task = _task("poisson2d")
    res = run_full_batch(task, get_optimizer("sven"), dict(task.sven_defaults), 0, seconds=0.3)
    assert not res.diverged and len(res.val_loss) == task.n_checkpoints + 1
    assert res.epochs[0] == 0 and res.epochs == sorted(res.epochs) and res.epochs[-1] == res.n_steps
    assert res.train_time[0] == 0.0 and res.train_time[-1] >= 0.3 and res.train_time == sorted(res.train_time)
    assert res.val_loss[-1] < res.val_loss[0]  # Sven makes progress within 0.3 s
    assert len(res.metrics["residual_loss"]) == len(res.val_loss)


def test_budget_and_its_check() -> None:
    task = _task("poisson2d")
    assert BenchConfig(("poisson2d",), ("sven",)).budget(task) == 60.0
    assert BenchConfig(("poisson2d",), ("sven",), quick=True).budget(task) == 2.0
    assert BenchConfig(("poisson2d",), ("sven",), seconds=5).budget(task) == 5.0
    with pytest.raises(ValueError, match="`seconds` must be a positive number, got -1"):
        BenchConfig(("poisson2d",), ("sven",), seconds=-1)


@pytest.mark.usefixtures("one_thread")
def test_quick_full_batch_run_reports_goals_and_rereads(tmp_path: Path) -> None:
    args = ["--quick", "--seconds", "0.3", "--task", "poisson2d", "--optimizers", "sven", "adam", "sven-reference"]
    assert main([*args, "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["optimizer"] for r in data["runs"]} == {"sven", "adam"}  # sven-reference does not apply
    checks = data["goal_checks"]["poisson2d"]
    assert [c["goal"] for c in checks] == [
        "Sven's median time to 1e-06 <= 60 s",
        "Sven / best Adam median final error <= 0.01",
    ]
    assert checks[0]["met"] is False and "not reached" in checks[0]["measured"]
    md = (tmp_path / "results.md").read_text()
    assert "## Goals" in md and "steps to target" in md and "**missed**" in md
    again = tmp_path / "again"
    assert main(["--from-json", str(tmp_path / "results.json"), "--out", str(again)]) == 0
    assert (again / "results.md").read_text().split("\n", 8)[8] == md.split("\n", 8)[8]
