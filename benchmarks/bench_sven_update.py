"""Does the update stage help? Sven with heavy-ball / Nesterov momentum and decoupled weight decay on the
sven-bench tasks, against the task's defaults (same lr, rank, rtol, data order and model seeds).

    python benchmarks/bench_sven_update.py --task toy1d polynomial digits --seeds 2 --epochs 5 --quick

Prints, per task and variant, the median over seeds of the final validation loss (and accuracy on digits),
and the median step time as a ratio to the defaults' in the same run.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, ClassVar

import torch
from torch import nn

import sven
from sven.bench.optimizers import Hparams, OptimizerFactory, Stepper
from sven.bench.runner import run_one
from sven.bench.tasks import get_task
from sven.bench.tasks.base import Task

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "momentum 0.5": {"momentum": 0.5},
    "momentum 0.5, lr x0.5": {"momentum": 0.5, "lr_scale": 0.5},
    "momentum 0.9, lr x0.1": {"momentum": 0.9, "lr_scale": 0.1},
    "nesterov 0.5, lr x0.5": {"momentum": 0.5, "nesterov": True, "lr_scale": 0.5},
    "weight_decay 1e-3": {"weight_decay": 1e-3},
    "weight_decay 1e-2": {"weight_decay": 1e-2},
}


class _Closure:
    def __init__(self, model: nn.Module, task: Task, opt: sven.Sven) -> None:
        self.model, self.task, self.opt = model, task, opt

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.opt.step(lambda: self.task.per_sample_loss(self.model(x), y))


class _Variant(OptimizerFactory):
    name: ClassVar[str] = "sven"
    description: ClassVar[str] = "sven.Sven with the update stage"

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = dict(options)

    def grid(self, task: Task, *, quick: bool = False, sven_grid: bool = False) -> list[Hparams]:
        return [dict(task.sven_defaults)]

    def make(self, model: nn.Module, task: Task, hparams: Hparams) -> Stepper:
        opts = dict(self.options)
        scale = float(opts.pop("lr_scale", 1.0))
        opt = sven.Sven(model.parameters(), lr=float(hparams["lr"]) * scale, rank=int(hparams["rank"]),
                        rtol=float(hparams["rtol"]), kappa=float(hparams.get("kappa", 2.0)),
                        **{"adaptive_damping": False, **opts})  # fmt: skip
        return _Closure(model, task, opt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", nargs="+", default=["toy1d", "polynomial", "digits"])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="the --quick training subsets of sven-bench")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.task:
        task = get_task(name)
        data = task.data()
        if args.quick and task.quick_n_train is not None:
            data = data.subsample(task.quick_n_train)
        print(f"\n{name}: {task.sven_defaults}, {args.seeds} seeds x {args.epochs} epochs")
        base_time = None
        for label, options in VARIANTS.items():
            runs = [run_one(task, _Variant(options), dict(task.sven_defaults), s, data=data, epochs=args.epochs)
                    for s in range(args.seeds)]  # fmt: skip
            val = statistics.median(r.val_loss[-1] for r in runs)
            acc = [r.metrics["accuracy"][-1] for r in runs if "accuracy" in r.metrics]
            t = statistics.median(r.step_time_median or float("nan") for r in runs)
            base_time = base_time or t
            extra = f"  acc {statistics.median(acc):.3f}" if acc else ""
            div = sum(r.diverged for r in runs)
            seeds = [f"{r.val_loss[-1]:.2e}" for r in runs]
            print(f"  {label:24s} val {val:.3e}{extra}  step time x{t / base_time:.2f}"
                  f"{f'  diverged {div}/{len(runs)}' if div else ''}  per seed {seeds}")  # fmt: skip


if __name__ == "__main__":
    main()
