"""The grid behind the loss rule's classifier preset (``sven.loss_rows.RULE_PRESET``): four tasks, seed 0.

Every point is ``sven.Sven(params, ggn=True, lr=..., ...)`` on the GGN rows of ``classes`` kept classes per
sample (the rule's ``GGN_CLASSES``), with either a fixed ``damping`` or (``--judge``) the step control that
judges each try on the cross-entropy, :class:`sven.control.CrossEntropyDamping`, with that damping as its floor.
It trains with the sven-bench tasks' data, batches and epochs on the four cross-entropy tasks (mnist1d,
mnist-subset, mnist-subset-cnn, digits-ce), one thread. Adam at lr 1e-3 and 1e-2 runs beside it (the best of
sven-bench's Adam grid on these tasks is one of the two). The seed-0 points are ranked like
``sven.bench.defaults`` ranks defaults: the regret on a task is ``log10(loss / best point's loss)``, by the mean
over the tasks, the worst beside it; a point more than 10x above the best on a task (a blow-up) ranks last.
Points run on more seeds (``--point ... --seeds 1 2``) get a second table of medians. The training times
are not compared here: the grid ran on a shared machine (sven-bench's 3-seed run measures them).

    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --out runs/fixed.json            # fixed damping
    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --judge --no-adam --out runs/judge.json
    OMP_NUM_THREADS=1 python benchmarks/ce_preset_grid.py --no-adam --seeds 1 2 --point 1,0.5,0.03 0,0.5,0.03 \\
        1,0.5,0.01 --out runs/seeds.json
    python benchmarks/ce_preset_grid.py --from-json docs/data/ce_preset_grid.json          # the stored runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from typing import Any

import torch
from torch import nn

import sven
import sven.loss_rule
from sven.bench.optimizers import OptimizerFactory, Stepper
from sven.bench.runner import run_one
from sven.bench.tasks import TASKS
from sven.bench.tasks.base import Task
from sven.control import CrossEntropyDamping

TASK_NAMES = ("mnist1d", "mnist-subset", "mnist-subset-cnn", "digits-ce")
ADAM_LRS = (1e-3, 1e-2)
#: the grid: classes x lr x damping (relative to sigma_max^2)
CLASSES = (0, 1)
LRS = (0.5, 1.0)
DAMPINGS = (0.03, 0.1, 0.3)
#: the damping floors of the control that judges each try on the cross-entropy (``--judge``)
JUDGE_FLOORS = (0.01, 0.03, 0.1, 0.3)
FLOORS_0 = (0.03, 0.1)  # and those of one row per sample (classes=0)


class _Adam(OptimizerFactory):
    name = "adam"
    description = "torch.optim.Adam"

    def grid(self, task: Any, *, quick: bool = False, sven_grid: bool = False) -> list[dict[str, Any]]:
        return []

    def make(self, model: nn.Module, task: Task, hparams: dict[str, Any]) -> Stepper:
        opt = torch.optim.Adam(model.parameters(), lr=hparams["lr"])

        class _S:
            def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = task.per_sample_loss(model(x), y)
                loss.mean().backward()
                opt.step()
                return loss.detach()

        return _S()


class _Ggn(OptimizerFactory):
    name = "sven-ggn"
    description = "sven.Sven(ggn=True) with the grid point's lr, damping and classes"

    def grid(self, task: Any, *, quick: bool = False, sven_grid: bool = False) -> list[dict[str, Any]]:
        return []

    def make(self, model: nn.Module, task: Task, hparams: dict[str, Any]) -> Stepper:
        opts = {k: v for k, v in hparams.items() if k not in ("classes", "judge")}
        if hparams.get("judge"):  # the damping is the floor of the control that judges the cross-entropy
            opts["control"] = CrossEntropyDamping(opts.pop("damping"))
        opt = sven.Sven(model.parameters(), ggn=True, **opts)
        classes = hparams["classes"]

        class _S:
            def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                sven.loss_rule.GGN_CLASSES = classes  # the rows the rule builds
                return opt.step(lambda: task.per_sample_loss(model(x), y))

        return _S()


def _points(judge: bool) -> list[dict[str, Any]]:
    if not judge:
        return [{"classes": c, "lr": lr, "damping": d} for c, lr, d in itertools.product(CLASSES, LRS, DAMPINGS)]
    pts = [{"classes": 1, "lr": lr, "damping": d, "judge": True} for lr, d in itertools.product(LRS, JUDGE_FLOORS)]
    return pts + [{"classes": 0, "lr": lr, "damping": d, "judge": True} for lr, d in itertools.product(LRS, FLOORS_0)]


def run(
    tasks: tuple[str, ...], points: list[dict[str, Any]], *, adam: bool = True, seeds: list[int] | None = None
) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    out = []
    for name in tasks:
        task = TASKS[name]()
        data = task.data()
        jobs = [(_Adam(), {"lr": lr}) for lr in ADAM_LRS] if adam else []
        jobs += [(_Ggn(), p) for p in points]
        for (factory, hp), seed in itertools.product(jobs, seeds or [0]):
            r = run_one(task, factory, hp, seed, data=data, epochs=task.epochs)
            acc = r.metrics.get("accuracy", [float("nan")])[-1]
            row = {"task": name, "optimizer": factory.name, "hparams": hp, "seed": seed, "loss": r.final_val_loss,
                   "accuracy": acc, "time": r.total_train_time, "diverged": r.diverged}  # fmt: skip
            print(json.dumps(row), file=sys.stderr, flush=True)
            out.append(row)
    return out


def _key(row: dict[str, Any]) -> str:
    return json.dumps(row["hparams"], sort_keys=True)


def _label(key: str) -> str:
    p = json.loads(key)
    what = "floor" if p.get("judge") else "damping"
    return f"classes={p['classes']} lr={p['lr']:g} {what}={p['damping']:g}"


def ranking(rows: list[dict[str, Any]]) -> str:
    """The seed-0 grid as a Markdown table, best mean regret first (a diverged point last)."""
    rows = [r for r in rows if r.get("seed", 0) == 0]
    tasks = sorted({r["task"] for r in rows}, key=lambda t: TASK_NAMES.index(t) if t in TASK_NAMES else 99)
    adam = {t: min((r for r in rows if r["task"] == t and r["optimizer"] == "adam"), key=lambda r: r["loss"])
            for t in tasks}  # fmt: skip
    sv = [r for r in rows if r["optimizer"] == "sven-ggn"]
    best = {t: min(r["loss"] for r in sv if r["task"] == t and math.isfinite(r["loss"])) for t in tasks}
    table = []
    for k in sorted({_key(r) for r in sv}):
        by = {r["task"]: r for r in sv if _key(r) == k}
        if set(by) != set(tasks):
            continue
        ok = all(math.isfinite(by[t]["loss"]) and by[t]["loss"] < 10 * best[t] for t in tasks)
        reg = [math.log10(by[t]["loss"] / best[t]) if ok else math.inf for t in tasks]
        table.append((statistics.mean(reg), max(reg), k, by))
    table.sort(key=lambda x: (x[0], x[1]))
    lines = ["| # | point | " + " | ".join(f"{t} (/ Adam)" for t in tasks) + " | mean regret | worst regret |",
             "|" + "---|" * (len(tasks) + 4),
             "| | best Adam | " + " | ".join(f"{adam[t]['loss']:.3f} (lr {adam[t]['hparams']['lr']:g})"
                                            for t in tasks) + " | | |"]  # fmt: skip
    for i, (mean, worst, k, by) in enumerate(table, 1):
        cells = [f"{by[t]['loss']:.3g} ({by[t]['loss'] / adam[t]['loss']:.2f}x)" for t in tasks]
        lines.append(f"| {i} | {_label(k)} | " + " | ".join(cells) + f" | {mean:.3f} | {worst:.3f} |")
    return "\n".join(lines)


def seeds_table(rows: list[dict[str, Any]]) -> str:
    """Points run on several seeds: each task's losses by seed and their median."""
    sv = [r for r in rows if r["optimizer"] == "sven-ggn"]
    keys = sorted(k for k in {_key(r) for r in sv} if len({r.get("seed", 0) for r in sv if _key(r) == k}) > 1)
    tasks = sorted({r["task"] for r in sv}, key=lambda t: TASK_NAMES.index(t) if t in TASK_NAMES else 99)
    lines = ["| point | " + " | ".join(f"{t}: median [seeds 0, 1, 2]" for t in tasks) + " |",
             "|" + "---|" * (len(tasks) + 1)]  # fmt: skip
    for k in keys:
        cells = []
        for t in tasks:
            got = sorted((r.get("seed", 0), r["loss"]) for r in sv if _key(r) == k and r["task"] == t)
            losses = [v for _, v in got]
            cells.append(f"{statistics.median(losses):.3g} [{', '.join(f'{v:.3g}' for v in losses)}]")
        lines.append(f"| {_label(k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="+", default=list(TASK_NAMES))
    ap.add_argument("--out", help="write the runs here (JSON)")
    ap.add_argument("--judge", action="store_true", help="the grid of the control that judges the cross-entropy")
    ap.add_argument("--no-adam", action="store_true", help="skip the Adam runs (take them from another file)")
    ap.add_argument("--point", nargs="+", metavar="CLASSES,LR,FLOOR", help="run only these points of the --judge grid")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="model seeds (default 0)")
    ap.add_argument("--from-json", nargs="+", help="print the ranking of earlier runs, run nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = [r for f in args.from_json for r in json.load(open(f))]
    else:
        points = _points(args.judge)
        if args.point:
            points = [{"classes": int(c), "lr": float(lr), "damping": float(d), "judge": True}
                      for c, lr, d in (p.split(",") for p in args.point)]  # fmt: skip
        rows = run(tuple(args.task), points, adam=not args.no_adam, seeds=args.seeds)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
    print(ranking(rows))
    if any(r.get("seed", 0) != 0 for r in rows):
        print()
        print(seeds_table(rows))


if __name__ == "__main__":
    main()
