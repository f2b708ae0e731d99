"""The benchmark command ``sven-bench`` (``python -m sven.bench``): optimizers, runner, report and CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import sven
from sven.bench import runner
from sven.bench.cli import main
from sven.bench.optimizers import (
    OPTIMIZERS,
    ReferenceSven,
    format_hparams,
    get_optimizer,
    reference_direction,
    train_epoch,
)
from sven.bench.runner import BenchConfig, RunResult, aggregate, select_config
from sven.bench.tasks import Task, get_task
from sven.bench.tasks.full_batch import FullBatchTask

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name", [n for n, f in OPTIMIZERS.items() if f.supports(get_task("digits"))])
def test_every_optimizer_takes_a_finite_step(name: str) -> None:
    task = get_task("digits")
    assert isinstance(task, Task)
    data = task.data()
    factory = get_optimizer(name)
    hp = factory.grid(task)[0]
    model = task.model(0)
    before = _flat(model)
    stepper = factory.make(model, task, hp)
    loss = stepper.step(data.x_train[:64], data.y_train[:64])
    assert torch.isfinite(loss).all() and torch.isfinite(_flat(model)).all()
    if not hp.get("adaptive_damping"):  # adaptive damping may reject a step (sven-native does, here)
        assert not torch.equal(before, _flat(model))


def test_train_epoch_times_every_step_and_stops_at_a_non_finite_loss() -> None:
    class Fake:
        def __init__(self, losses: list[float]) -> None:
            self.losses, self.calls = losses, 0

        def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return torch.tensor([self.losses[self.calls - 1], 0.0])

    data = [(torch.zeros(2, 1), torch.zeros(2, 1))] * 4
    ok = train_epoch(Fake([1.0, 2.0, 3.0, 4.0]), data)
    assert ok.finite and len(ok.step_times) == 4 and all(t >= 0 for t in ok.step_times)
    fake = Fake([1.0, math.nan, 3.0, 4.0])
    bad = train_epoch(fake, data)
    assert not bad.finite and len(bad.step_times) == 2 and fake.calls == 2


def test_grids_follow_tasks_md() -> None:
    task = get_task("polynomial")  # batch 32
    assert [p["lr"] for p in get_optimizer("adam").grid(task)] == [1e-4, 1e-3, 1e-2, 1e-1]
    assert [p["lr"] for p in get_optimizer("rmsprop").grid(task, quick=True)] == [1e-3, 1e-2]
    lbfgs = get_optimizer("lbfgs").grid(task)
    assert {(p["lr"], p["max_iter"]) for p in lbfgs} == {(a, b) for a in (0.1, 0.5, 1.0) for b in (1, 5)}
    assert get_optimizer("polyak").grid(task) == [{"f_star": 0.0, "max_lr": 1.0}]
    assert get_optimizer("sven").grid(task) == [dict(task.sven_defaults)]
    assert get_optimizer("sven-reference").grid(task, sven_grid=True) == [dict(task.sven_defaults)]
    grid = get_optimizer("sven").grid(task, sven_grid=True)
    assert len(grid) == 36 and {p["rank"] for p in grid} == {8, 16, 32}
    assert {p["lr"] for p in grid} == {0.1, 0.3, 0.5, 1.0} and {p["rtol"] for p in grid} == {1e-4, 1e-3, 1e-2}
    assert len(get_optimizer("sven").grid(task, quick=True, sven_grid=True)) == 4


def test_unknown_optimizer_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown optimizer 'nadam'; valid optimizers: sven, adam, adamw, sgd, rmsprop"
    ):
        get_optimizer("nadam")


def test_reference_sven_matches_sven_with_the_same_truncation() -> None:
    task = get_task("toy1d")
    d = task.data()
    xb, yb = d.x_train[:32], d.y_train[:32]
    m_ref = task.model(0)
    m_ours = copy.deepcopy(m_ref)
    w0 = _flat(m_ref)
    ReferenceSven(m_ref, task.per_sample_loss, lr=0.5, rank=16, rtol=1e-3).step(xb, yb)
    opt = sven.Sven(m_ours.parameters(), lr=0.5, rank=16, rtol=1e-3, solver="svd", adaptive_damping=False)
    opt.step(lambda: task.per_sample_loss(m_ours(xb), yb))
    delta_ref, delta_ours = _flat(m_ref) - w0, _flat(m_ours) - w0
    assert float((delta_ref - delta_ours).norm() / delta_ref.norm()) < 1e-3


def test_reference_direction_truncates_like_the_original() -> None:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64, generator=g))
    S = torch.tensor([10.0, 5.0, 1.0, 1e-2, 1e-5, 0.0], dtype=torch.float64)
    M = U @ torch.diag(S) @ V.T
    R = torch.randn(6, dtype=torch.float64, generator=g)

    def expected(r: int) -> torch.Tensor:
        return V[:, :r] @ ((U[:, :r].T @ R) / S[:r])

    assert torch.allclose(reference_direction(M, R, rank=6, rtol=5e-4), expected(4))  # 1e-2 > 5e-4 * 10 > 1e-5
    # cut-off 2e-2: sigma = 1 kept, 1e-2 dropped, both far from the cut-off (1e-3 * 10 would tie with 1e-2)
    assert torch.allclose(reference_direction(M, R, rank=6, rtol=2e-3), expected(3))
    assert torch.allclose(reference_direction(M, R, rank=2, rtol=1e-3), expected(2))  # rank caps first
    assert torch.allclose(reference_direction(M, R, rank=6, rtol=0.2), expected(2))
    assert torch.equal(reference_direction(torch.zeros(3, 4), torch.ones(3), rank=2, rtol=1e-3), torch.zeros(4))


# --------------------------------------------------------------------------- runner
def _run(config: str, seed: int, final: float, ttt: float | None = None) -> RunResult:
    r = RunResult("toy1d", "adam", {"lr": float(config)}, seed, epochs=[0, 1], val_loss=[1.0, final])
    r.train_time, r.time_to_target = [0.0, 2.0], ttt
    r.epochs_to_target = None if ttt is None else 1
    r.diverged = not math.isfinite(final)
    return r


def test_selection_and_aggregates() -> None:
    runs = [_run("0.1", 0, math.nan), _run("0.01", 0, 0.5, 1.0), _run("0.001", 0, 0.2), _run("0.01", 1, 0.1, 2.0)]
    assert select_config(runs, [0]) == "lr=0.001"  # the diverged point counts as worst
    assert select_config(runs, [0, 1]) == "lr=0.001"
    assert select_config(runs, [5]) is None
    runs += [_run("0.001", 1, 0.4, 3.0), _run("0.001", 2, 0.3, 1.5)]
    agg = aggregate(runs, [0])
    assert agg["config"] == "lr=0.001" and agg["seeds"] == [0, 1, 2] and agg["n_grid_points"] == 3
    assert agg["final_val_loss"] == {"median": 0.3, "min": 0.2, "max": 0.4}
    # time to target: the seed that never reached it counts as infinitely slow
    assert agg["time_to_target"] == 3.0 and agg["reached"] == 2
    assert agg["curves"]["median"] == [1.0, 0.3] and agg["curves"]["train_time"] == [0.0, 2.0]
    assert aggregate([_run("0.1", 0, 0.1), _run("0.1", 1, 0.1, 1.0)], [0])["time_to_target"] is None


def test_bench_config_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="`seeds` must be a positive int, got 0"):
        BenchConfig(("toy1d",), ("sven",), seeds=0)
    with pytest.raises(ValueError, match="valid tasks"):
        BenchConfig(("nope",), ("sven",))
    with pytest.raises(ValueError, match="`optimizers` must name at least one optimizer"):
        BenchConfig(("toy1d",), ())


# --------------------------------------------------------------------------- CLI and report
QUICK = ["--quick", "--task", "toy1d", "--optimizers", "sven", "adam", "--seeds", "1", "--epochs", "1"]


def _check_outputs(out: Path) -> dict:
    with open(out / "results.json") as f:
        data = json.load(f, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert {"config", "machine", "tasks", "runs", "summary", "goals", "interrupted"} <= set(data)
    assert {"platform", "torch", "cpu_count", "torch_threads"} <= set(data["machine"])
    md = (out / "results.md").read_text()
    assert md.startswith("# Sven benchmark results") and "## toy1d" in md
    for png in ("val_loss_vs_epoch.png", "val_loss_vs_time.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    return data


@pytest.mark.usefixtures("one_thread")
def test_quick_run_writes_valid_outputs(tmp_path: Path) -> None:
    assert main([*QUICK, "--out", str(tmp_path), "--threads", "1"]) == 0
    data = _check_outputs(tmp_path)
    assert data["interrupted"] is False and data["config"]["quick"] is True
    assert data["tasks"]["toy1d"]["n_train"] == 2000  # --quick subsamples toy1d
    runs = data["runs"]
    assert [(r["optimizer"], r["config"]) for r in runs] == [
        ("sven", "lr=0.1 rank=16 rtol=0.001 kappa=2"),
        ("adam", "lr=0.001"),
        ("adam", "lr=0.01"),
    ]
    for r in runs:
        assert r["epochs"] == [0, 1] and len(r["val_loss"]) == 2 and r["train_time"][0] == 0.0
        assert r["n_steps"] == 63 and r["step_time_median"] > 0 and r["epoch_time"][0] > 0
    summary = data["summary"]["toy1d"]
    assert set(summary) == {"sven", "adam"} and summary["adam"]["n_grid_points"] == 2
    assert "loss_ratio" in data["goals"]["toy1d"]
    md = (tmp_path / "results.md").read_text()
    assert "Quick run" in md and "## Goals" in md and "| sven |" in md


@pytest.mark.usefixtures("one_thread")
def test_interrupted_run_keeps_the_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = runner.run_one
    calls: list[int] = []

    def first_then_ctrl_c(*args: object, **kwargs: object) -> RunResult:
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "run_one", first_then_ctrl_c)
    assert main([*QUICK, "--out", str(tmp_path), "--threads", "1"]) == 130
    data = _check_outputs(tmp_path)
    assert data["interrupted"] is True
    assert [r["optimizer"] for r in data["runs"]] == ["sven"]
    assert "interrupted" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary file


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--task", "mnist"],
            "unknown task 'mnist'; valid tasks: toy1d, polynomial, digits, digits-ce, poisson2d, heat1d",
        ),
        (
            ["--optimizers", "nadam"],
            "valid optimizers: sven, adam, adamw, sgd, rmsprop, lbfgs, polyak, sven-reference, sven-plain, sven-native",
        ),
        (["--seconds", "0"], "--seconds must be a positive number, got 0"),
        (["--seeds", "0"], "--seeds must be a positive integer, got 0"),
        (["--epochs", "-1"], "--epochs must be a positive integer, got -1"),
        (["--threads", "0"], "--threads must be a positive integer or 'auto', got 0"),
        (["--threads", "many"], "must be a positive integer or 'auto', got 'many'"),
    ],
)
def test_bad_arguments_give_clear_errors(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_auto_threads_is_one_thread_for_the_small_task_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from sven.bench.cli import SMALL_MODEL_PARAMS, auto_threads, build_parser
    from sven.bench.tasks import TASKS

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert build_parser().parse_args([]).threads == "auto"
    assert all(sum(p.numel() for p in TASKS[t]().model(0).parameters()) < SMALL_MODEL_PARAMS for t in TASKS)
    assert auto_threads(list(TASKS)) == 1
    assert SMALL_MODEL_PARAMS > 116_705  # charlm's transformer, the largest task model
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads(["toy1d"]) == torch.get_num_threads()  # the user's setting is respected


def test_blas_threads_limits_numpys_blas_as_torch() -> None:
    """sven-bench's ``--threads`` also holds NumPy's BLAS (Sven's Gram products), and lets it go afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numpy as np

    from sven.bench.cli import blas_threads

    np.ones((2, 2)) @ np.ones((2, 2))  # (BLAS loaded)
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    with blas_threads(1):
        inside = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert inside and all(n == 1 for n in inside)
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"] == before


def test_sven_native_is_one_configuration_with_the_rank_as_a_fraction_of_the_batch() -> None:
    from sven.bench.optimizers import SVEN_NATIVE, SVEN_NATIVE_GRID

    factory = get_optimizer("sven-native")
    toy, digits = get_task("toy1d"), get_task("digits")  # batch 32 and 64
    assert isinstance(toy, Task) and isinstance(digits, Task)
    assert factory.grid(toy) == factory.grid(digits) == [SVEN_NATIVE]
    assert factory.grid(toy, sven_grid=True) == list(SVEN_NATIVE_GRID)
    for task, rank in ((toy, 16), (digits, 32)):
        stepper = factory.make(task.model(0), task, {"lr": 0.5, "rank_fraction": 0.5, "rtol": 1e-3})
        assert stepper.opt.config.rank_cap(task.batch_size) == rank  # type: ignore[attr-defined]
    free = factory.make(toy.model(0), toy, {"lr": 0.1, "rank_fraction": 0.0, "rtol": 1e-3})
    assert free.opt.config.rank is None  # type: ignore[attr-defined]
    # without --grid: the library's defaults, nothing passed
    assert SVEN_NATIVE == {} and format_hparams(SVEN_NATIVE) == "defaults"
    default = factory.make(toy.model(0), toy, SVEN_NATIVE)
    assert default.opt.config == sven.Sven(toy.model(0).parameters()).config  # type: ignore[attr-defined]
    # the PINN tasks too: residual mode, the fraction taken of the residual rows
    pinn = get_task("poisson2d")
    assert factory.supports(pinn) and isinstance(pinn, FullBatchTask)
    net = pinn.model(0)
    stepper = factory.make_full_batch(net, pinn.problem(net), {"rank_fraction": 0.5})
    rows = pinn.problem(net)().numel()
    assert stepper.opt.config.residuals and stepper.opt.config.rank_cap(rows) == 510  # type: ignore[attr-defined]
