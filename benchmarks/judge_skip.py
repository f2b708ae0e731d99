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
    OMP_NUM_THREADS=1 python benchmarks/judge_skip.py --stress 1 4 8 --seeds 0 1 2 --task mnist-subset
    python benchmarks/judge_skip.py --from-json docs/data/judge_skip.json        # the stored screen

``--stress`` trains with the batch order of ``benchmarks/ce_step_ab.py`` instead (220 steps, each block of five
from its own random draw), where a run of unjudged steps once blew a model up (:func:`stress`).

The tasks are those of ``benchmarks/ce_preset_grid.py``: the four sven-bench classifiers and the held-out
classifiers of ``benchmarks/ce_heldout.py`` (``heldout``, ``heldout-cnn``, ``heldout-quantiles``), one thread.
"""

from __future__ import annotations

import argparse
import itertools
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


def stress(task_name: str, k: int, seed: int, *, blocks: int = 40, steps: int = 5, warmup: int = 20) -> dict[str, Any]:
    """The batch order of ``benchmarks/ce_step_ab.py`` (``warmup`` steps, then ``blocks`` blocks of ``steps`` steps,
    each from its own random draw of the training set), model seed ``seed``, ``judge_every=k``: the largest batch
    loss after the first 20 steps, the mean of the last 20, the fraction judged and the stalls (every try rejected).
    """
    torch.set_num_threads(1)
    task = _task(task_name)
    data = task.build_data()
    net = task.model(seed)
    opt = sven.Sven(net.parameters(), judge_every=k)
    losses, judged, stalls = [], 0, 0
    for r in range(-1, blocks):
        gen = torch.Generator().manual_seed(r + 1)
        idx = torch.randperm(data.x_train.shape[0], generator=gen)[: (warmup if r < 0 else steps) * task.batch_size]
        for j in idx.split(task.batch_size):
            xb, yb = data.x_train[j], data.y_train[j]
            losses.append(float(opt.step(lambda xb=xb, yb=yb: task.per_sample_loss(net(xb), yb)).mean()))
            info = opt.last_step
            judged += info is not None and info.gain_ratio is not None
            stalls += info is not None and info.rejected
    return {"task": task_name, "judge_every": k, "seed": seed, "peak": max(losses[20:]),
            "last": statistics.mean(losses[-20:]), "judged": judged / len(losses), "stalls": stalls}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    """Per task and ``judge_every``: the median test loss, its change against the median at ``judge_every=1`` on
    the same seeds, the largest change of one seed, the median fraction of steps judged, the blow-ups."""
    ref = {(r["task"], r["seed"]): r["loss"] for r in rows if r["judge_every"] == 1}
    everys = sorted({r["judge_every"] for r in rows} - {1})
    head = "| task | judge_every=1 (seeds) |"
    head += "".join(f" judge_every={k}: median (change, worst seed, judged, blow-ups) |" for k in everys)
    out = [head, "|---" * (2 + len(everys)) + "|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        base = [r["loss"] for r in rows if r["task"] == task and r["judge_every"] == 1]
        cells = [task, f"{statistics.median(base):.4f} ({len(base)})"]
        for k in everys:
            runs = [r for r in rows if r["task"] == task and r["judge_every"] == k and (task, r["seed"]) in ref]
            if not runs:
                cells.append("-")
                continue
            med = statistics.median(r["loss"] for r in runs)
            same = statistics.median(ref[task, r["seed"]] for r in runs)
            worst = max(r["loss"] / ref[task, r["seed"]] - 1 for r in runs)
            blow = sum(r["diverged"] or not r["loss"] <= 10 * ref[task, r["seed"]] for r in runs)
            judged = statistics.median(r["judged"] for r in runs)
            cells.append(f"{med:.4f} ({med / same - 1:+.1%}, {worst:+.1%}, {judged:.0%}, {blow}) on {len(runs)}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="+", default=None, help="default: the seven classifiers (the four with --rho)")
    ap.add_argument("--rho", action="store_true", help="log the loss rule's gain ratios (seed 0)")
    ap.add_argument("--screen", nargs="+", type=int, metavar="K", help="screen these judge_every against 1")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="model seeds (default 0)")
    ap.add_argument("--stress", nargs="+", type=int, metavar="K", help="ce_step_ab's batch order at these judge_every")
    ap.add_argument("--out", help="write the screen's runs here (JSON)")
    ap.add_argument("--from-json", nargs="+", help="print the table of earlier screens, run nothing")
    args = ap.parse_args(argv)
    if args.rho:
        for t in args.task or FOUR:
            print(rho_report(t, rho_log(t)), flush=True)
        return
    if args.stress:
        print("| task | seed | judge_every | largest batch loss after step 20 | last 20, mean | judged | stalls |")
        print("|---|---|---|---|---|---|---|")
        for t, seed, k in itertools.product(args.task or ("mnist-subset", "mnist-subset-cnn"), args.seeds, args.stress):
            r = stress(t, k, seed)
            print(f"| {t} | {seed} | {k} | {r['peak']:.3f} | {r['last']:.3f} | {r['judged']:.0%} | {r['stalls']} |",
                  flush=True)  # fmt: skip
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
