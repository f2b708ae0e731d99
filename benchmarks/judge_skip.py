"""Judging only every k-th step of the loss rule (``sven.Sven(judge_every=k)``): the gain ratios behind it, the screen.

The loss rule's step control (:class:`sven.control.CrossEntropyDamping`) judges each try by one more forward
pass of the closure. At the floor, a try with gain ratio :math:`\\rho \\ge 1/2` leaves the damping where it
is, so that pass changes nothing. ``--rho`` runs the loss rule (seed 0) and prints, per task, the quantiles of
the first try's :math:`\\rho`, where the tries with :math:`\\rho < 1/2` and :math:`\\rho \\le 0` (rejected) fall,
and how often they follow ``N`` calm judged steps in a row (first try, damping at the floor, :math:`\\rho \\ge
1/2`): the evidence for the rule's ``calm`` count. ``--screen`` trains each task with ``judge_every`` 1 (the
judge at every step) and the given values, Sven's defaults otherwise, and prints the median test loss per task,
the change against ``judge_every=1`` (same seeds), the fraction of steps judged and the blow-ups (a diverged
run, or a final loss above 10x the same seed's at ``judge_every=1``)::

    OMP_NUM_THREADS=1 python benchmarks/judge_skip.py --rho --task mnist-subset mnist-subset-cnn mnist1d digits-ce
    OMP_NUM_THREADS=1 python benchmarks/judge_skip.py --screen 2 4 8 --seeds 0 --out runs/s0.json
    OMP_NUM_THREADS=1 python benchmarks/judge_skip.py --screen 4 --seeds 1 2 --out runs/s12.json
    python benchmarks/judge_skip.py --from-json docs/data/judge_skip.json        # the stored screen

The tasks are those of ``benchmarks/ce_preset_grid.py``: the four sven-bench classifiers and the held-out
classifiers of ``benchmarks/ce_heldout.py`` (``heldout``, ``heldout-cnn``, ``heldout-quantiles``), one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sven
import sven.config
from benchmarks.ce_preset_grid import _task
from sven.bench.optimizers import OptimizerFactory, Stepper
from sven.bench.runner import run_one
from sven.bench.tasks.base import Task
from sven.control import CrossEntropyDamping

SEVEN = ("mnist1d", "mnist-subset", "mnist-subset-cnn", "digits-ce", "heldout", "heldout-cnn", "heldout-quantiles")
FOUR = SEVEN[:4]
CALM_COUNTS = (0, 4, 8, 16)


class _Judged(OptimizerFactory):
    """``sven.Sven(params, judge_every=k)`` (the loss rule otherwise); counts the steps it judged."""

    name = "sven"
    description = "sven.Sven(judge_every=k)"

    def __init__(self) -> None:
        self.steps = self.judged = 0

    def grid(self, task: Any, *, quick: bool = False, sven_grid: bool = False) -> list[dict[str, Any]]:
        return []

    def make(self, model: nn.Module, task: Task, hparams: dict[str, Any]) -> Stepper:
        opt = sven.Sven(model.parameters(), judge_every=hparams["judge_every"])
        counts = self

        class _S:
            def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                out = opt.step(lambda: task.per_sample_loss(model(x), y))
                info = opt.last_step
                counts.steps += 1
                counts.judged += info is not None and info.gain_ratio is not None
                return out

        return _S()


def rho_log(task_name: str, seed: int = 0) -> list[dict[str, float]]:
    """Per step of the loss rule: the damping and floor before it, the first try's rho, the tries, rejected."""
    log: list[dict[str, float]] = []

    class Recorder(CrossEntropyDamping):
        def judge(self, ctx: Any, evaluate: Any, loss: float) -> Any:
            gain = super().judge(ctx, evaluate, loss)
            row = {"lam": self.state.lam, "floor": self.floor, "tries": 0.0, "rho": math.nan}
            log.append(row)

            def recorded(change: torch.Tensor) -> float:
                rho = gain(change)
                row["rho"] = rho if not row["tries"] else row["rho"]
                row["tries"] += 1
                return rho

            return recorded

    torch.set_num_threads(1)
    task, real = _task(task_name), sven.config.CrossEntropyDamping
    sven.config.CrossEntropyDamping = Recorder  # type: ignore[misc]
    try:
        run_one(task, _Judged(), {"judge_every": 1}, seed, data=task.data(), epochs=task.epochs)
    finally:
        sven.config.CrossEntropyDamping = real  # type: ignore[misc]
    return log


def rho_report(name: str, log: list[dict[str, float]]) -> str:
    """Quantiles of the first try's rho; steps with rho < 1/2 and rho <= 0; their rate after N calm steps."""
    rho = [r["rho"] for r in log]
    at_floor = [r["lam"] <= r["floor"] for r in log]
    calm = [p >= 0.5 and f for p, f in zip(rho, at_floor, strict=True)]
    q = sorted(rho)
    quant = ", ".join(f"{p:.0%} {q[int(p * (len(q) - 1))]:.2f}" for p in (0.01, 0.05, 0.25, 0.5))
    low = [i for i, p in enumerate(rho) if p < 0.5]
    bad = [i for i, p in enumerate(rho) if p <= 0]
    lines = [f"{name}: {len(log)} steps; rho quantiles {quant}; rho < 1/2 at {len(low)} steps "
             f"(first: {low[:12]}); rho <= 0 (rejected) at {bad}"]  # fmt: skip
    for n in CALM_COUNTS:
        after = [t for t in range(n, len(log)) if all(calm[t - n : t]) and at_floor[t]]
        lo, rj = sum(rho[t] < 0.5 for t in after), sum(rho[t] <= 0 for t in after)
        lines.append(f"  after {n:2d} calm steps: {len(after)} steps, rho < 1/2 at {lo} "
                     f"({lo / max(len(after), 1):.1%}), rejected {rj}")  # fmt: skip
    return "\n".join(lines)


def screen(tasks: tuple[str, ...], everys: list[int], seeds: list[int]) -> list[dict[str, Any]]:
    """Train each task with ``judge_every`` 1 and each of ``everys`` on each seed: one row per run."""
    torch.set_num_threads(1)
    rows = []
    for name in tasks:
        task = _task(name)
        data = task.data()
        for k in [1, *everys]:
            for seed in seeds:
                factory = _Judged()
                r = run_one(task, factory, {"judge_every": k}, seed, data=data, epochs=task.epochs)
                row = {"task": name, "judge_every": k, "seed": seed, "loss": r.final_val_loss,
                       "accuracy": r.metrics.get("accuracy", [math.nan])[-1], "diverged": r.diverged,
                       "judged": factory.judged / max(factory.steps, 1), "step_time": r.step_time_median}  # fmt: skip
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Median test loss per task and ``judge_every``, the change against 1, judged fraction, blow-ups."""
    ref = {(r["task"], r["seed"]): r["loss"] for r in rows if r["judge_every"] == 1}
    everys = sorted({r["judge_every"] for r in rows} - {1})
    head = "| task | seeds | judge_every=1 |"
    head += "".join(f" judge_every={k} (change, judged, blow-ups) |" for k in everys)
    out = [head, "|---" * (3 + len(everys)) + "|"]
    for task in dict.fromkeys(r["task"] for r in rows):

        def of(k: int, task: str = task) -> list[dict[str, Any]]:
            return [r for r in rows if r["task"] == task and r["judge_every"] == k]

        base = statistics.median(r["loss"] for r in of(1))
        cells = [task, str(len(of(1))), f"{base:.4f}"]
        for k in everys:
            runs = of(k)
            med = statistics.median(r["loss"] for r in runs)
            blow = sum(r["diverged"] or not r["loss"] <= 10 * ref.get((task, r["seed"]), math.inf) for r in runs)
            judged = statistics.median(r["judged"] for r in runs)
            cells.append(f"{med:.4f} ({med / base - 1:+.1%}, {judged:.0%}, {blow})")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="+", default=None, help="default: the seven classifiers (the four with --rho)")
    ap.add_argument("--rho", action="store_true", help="log the loss rule's gain ratios (seed 0)")
    ap.add_argument("--screen", nargs="+", type=int, metavar="K", help="screen these judge_every against 1")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="model seeds (default 0)")
    ap.add_argument("--out", help="write the screen's runs here (JSON)")
    ap.add_argument("--from-json", nargs="+", help="print the table of earlier screens, run nothing")
    args = ap.parse_args(argv)
    if args.rho:
        for t in args.task or FOUR:
            print(rho_report(t, rho_log(t)), flush=True)
        return
    if args.from_json:
        rows = [r for f in args.from_json for r in json.load(open(f))]
    else:
        rows = screen(tuple(args.task or SEVEN), args.screen or [4], args.seeds)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
