"""The ranking that chose Sven's defaults (:mod:`sven.bench.defaults`): regrets, divergence, the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sven.bench.defaults import main, rank_configurations, ranking_markdown
from sven.bench.runner import RunResult


def _run(task: str, hparams: dict[str, float], loss: float, *, diverged: bool = False, seed: int = 0) -> RunResult:
    r = RunResult(task=task, optimizer="sven-native", hparams=dict(hparams), seed=seed)
    r.epochs, r.val_loss, r.train_time = [0, 1], [1.0, loss], [0.0, 1.0]
    r.diverged = diverged
    return r


A, B, C = {"lr": 0.1}, {"lr": 0.5}, {"lr": 1.0}


def test_the_point_close_to_the_best_everywhere_beats_the_one_that_wins_one_task_by_a_mile() -> None:
    runs = [
        # A: best on t1, 1000x the best on t2; B: 2x the best on both; C: 10x on t1, best on t2
        _run("t1", A, 1e-6), _run("t1", B, 2e-6), _run("t1", C, 1e-5),
        _run("t2", A, 1.0), _run("t2", B, 2e-3), _run("t2", C, 1e-3),
    ]  # fmt: skip
    tasks, ranked = rank_configurations(runs)
    assert tasks == ["t1", "t2"]
    assert [p.hparams for p in ranked] == [B, C, A]
    # regret = log10(loss / best loss of the task), averaged over the tasks
    assert ranked[0].regrets == pytest.approx({"t1": math.log10(2), "t2": math.log10(2)})
    assert ranked[0].mean_regret == pytest.approx(math.log10(2))
    assert ranked[2].worst_regret == pytest.approx(3.0)
    assert ranked[1].mean_regret == pytest.approx(0.5)


def test_a_point_that_diverged_anywhere_ranks_after_every_point_that_finished() -> None:
    runs = [
        _run("t1", A, 1e-9), _run("t2", A, float("nan"), diverged=True),
        _run("t1", B, 1.0), _run("t2", B, 1.0),
    ]  # fmt: skip
    _, ranked = rank_configurations(runs)
    assert [p.hparams for p in ranked] == [B, A]
    assert ranked[1].losses["t2"] is None and math.isinf(ranked[1].mean_regret) and not ranked[1].finished
    assert "diverged" in ranking_markdown(["t1", "t2"], ranked)


def test_other_optimizers_and_seeds_are_ignored_and_no_run_is_an_error() -> None:
    other = _run("t1", A, 1.0)
    other.optimizer = "adam"
    with pytest.raises(ValueError, match=r"no run of optimizer 'sven-native' on seed 0"):
        rank_configurations([other, _run("t1", B, 1.0, seed=1)])


def test_the_command_line_reads_several_results_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sven.bench.report import write_json
    from sven.bench.runner import BenchConfig, BenchResults

    for name, runs in (
        ("a", [_run("t1", A, 1e-3), _run("t1", B, 1e-2)]),
        ("b", [_run("t2", A, 1.0), _run("t2", B, 0.5)]),
    ):
        cfg = BenchConfig(tasks=("toy1d",), optimizers=("sven-native",), seeds=1)
        write_json(BenchResults(cfg, {}, tasks={}, runs=runs), tmp_path / f"{name}.json")
    out = tmp_path / "ranking.md"
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--top", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table == out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1 ")]
    # A: regrets 0 and log10(2) (mean 0.15); B: 1 and 0 (mean 0.5)
    assert len(rows) == 1 and "lr=0.1" in rows[0] and f"{math.log10(2) / 2:.2f}" in rows[0]
    assert json.loads((tmp_path / "a.json").read_text())["runs"][0]["task"] == "t1"


def test_the_command_line_rejects_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope.json")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err


# --------------------------------------------------------------------------- publishing merged runs
def _results(tasks: tuple[str, ...], runs: list[RunResult], *, seeds: int = 1):  # type: ignore[no-untyped-def]
    from sven.bench.runner import BenchConfig, BenchResults

    cfg = BenchConfig(tasks=tasks, optimizers=("sven-native",), seeds=seeds)
    return BenchResults(
        cfg, {}, tasks={t: {"summary": t, "target": 1e-3} for t in tasks}, runs=runs, command=f"run {tasks[0]}"
    )


def test_merged_parts_keep_every_run_task_and_command() -> None:
    from sven.bench.merge import merge_results

    a = _results(("toy1d",), [_run("toy1d", A, 1e-3)])
    b = _results(("digits",), [_run("digits", A, 1e-2), _run("digits", B, 1e-1)])
    m = merge_results([a, b])
    assert m.config.tasks == ("toy1d", "digits") and set(m.tasks) == {"toy1d", "digits"}
    assert [r.task for r in m.runs] == ["toy1d", "digits", "digits"]
    assert m.command == "run toy1d && run digits"
    with pytest.raises(ValueError, match=r"cannot merge runs with different `seeds`: 1 and 5"):
        merge_results([a, _results(("digits",), [], seeds=5)])
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_results([])


@pytest.mark.usefixtures("one_thread")
def test_from_json_writes_the_report_elsewhere_with_notes_and_relative_plot_links(tmp_path: Path) -> None:
    from sven.bench.cli import main as bench_main

    pytest.importorskip("matplotlib")
    parts = tmp_path / "parts"
    for i, task in enumerate(("toy1d", "polynomial")):
        run = _run(task, A, 1e-3 * (i + 1))
        run.train_time, run.epoch_time, run.step_time_median, run.n_steps = [0.0, 1.0], [1.0], 1e-3, 10
        from sven.bench.report import write_json

        write_json(_results((task,), [run]), parts / f"{task}.json")
    notes = tmp_path / "notes.md"
    notes.write_text("## How to read this\n\nHand-written words.\n")
    report = tmp_path / "docs" / "results.md"
    argv = [str(parts / "toy1d.json"), str(parts / "polynomial.json")]
    code = bench_main(["--from-json", *argv, "--out", str(tmp_path / "docs" / "img"), "--report", str(report),
                       "--notes", str(notes)])  # fmt: skip
    assert code == 0
    text = report.read_text()
    assert text.index("## How to read this") < text.index("## toy1d") < text.index("## polynomial")
    links = [line for line in text.splitlines() if line.startswith("![")]
    assert links and all("](img/" in line for line in links)
    assert all((report.parent / line.split("](")[1].rstrip(")")).is_file() for line in links)
    assert json.loads((tmp_path / "docs" / "img" / "results.json").read_text())["config"]["tasks"] == [
        "toy1d",
        "polynomial",
    ]


def test_report_and_notes_need_from_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sven.bench.cli import main as bench_main

    with pytest.raises(SystemExit) as e:
        bench_main(["--report", str(tmp_path / "r.md"), "--out", str(tmp_path)])
    assert e.value.code == 2 and "--report and --notes go with --from-json" in capsys.readouterr().err


def test_time_to_a_loss_level_and_the_toy1d_goal_built_on_it() -> None:
    from sven.bench.report import check_goals
    from sven.bench.runner import BenchConfig, BenchResults

    def run(opt: str, seed: int, vals: list[float], hp: dict[str, float]) -> RunResult:
        r = RunResult(task="toy1d", optimizer=opt, hparams=hp, seed=seed)
        r.epochs, r.val_loss = list(range(len(vals))), vals
        r.train_time = [float(i) for i in range(len(vals))]
        r.epoch_time, r.step_time_median, r.n_steps = [1.0] * (len(vals) - 1), 1e-3, 10
        return r

    fast = run("sven-native", 0, [1.0, 1e-7, 5e-9, 1e-9], {})
    assert fast.time_to(1e-8) == 2.0 and fast.time_to(1e-12) is None and fast.time_to(1.0) == 0.0
    runs = [
        fast,
        run("sven-native", 1, [1.0, 1e-7, 1e-7, 9e-9], {}),  # reaches 1e-8 at 3 s
        run("sven-native", 2, [1.0, 1e-6, 1e-7, 1e-7], {}),  # never
        *(run("adam", s, [1.0, 0.1, 0.01, 1e-3, 1e-4], {"lr": 1e-3}) for s in range(3)),  # 4 s of training
    ]
    cfg = BenchConfig(tasks=("toy1d",), optimizers=("sven-native", "adam"), seeds=3)
    results = BenchResults(cfg, {}, tasks={"toy1d": {"target": 1e-4}}, runs=runs)
    rows = {c["goal"]: c for c in check_goals(results)["toy1d"]}
    row = rows["Sven's median time to a validation loss <= 1e-08 / best Adam's training time <= 1.5"]
    # the median of (2 s, 3 s, never) is 3 s; Adam trained for 4 s
    assert row["met"] is True and row["measured"].startswith("0.75 (3")
