"""Does damping help Sven on the benchmark tasks? Plain Sven against fixed and adaptive damping.

Runs the ``sven.bench`` tasks (``polynomial`` and ``digits`` by default) with
the task's default Sven hyperparameters and three step-control variants,
on the same seeds and data, and prints a markdown table: median (min-max)
final validation loss, median training time, time-to-target and the number
of seeds that reach the target. ``--plot`` writes validation loss against
training time.

    python benchmarks/damping_compare.py --seeds 3 --epochs 20 --plot docs/img/damping.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import sven
from sven.bench.optimizers import Hparams, OptimizerFactory, Stepper, _PerSampleClosure
from sven.bench.runner import RunResult, run_one
from sven.bench.tasks import get_task
from sven.bench.tasks.base import Task
from truncpinv._optional import require

#: The variants: extra keyword arguments of :class:`sven.Sven` on top of the task's defaults.
VARIANTS: Mapping[str, Mapping[str, Any]] = {
    "plain": {"adaptive_damping": False},
    "damping=1e-3": {"damping": 1e-3},
    "adaptive": {"adaptive_damping": True},
    "adaptive, lr=1": {"adaptive_damping": True, "lr": 1.0},
}


class DampedSven(OptimizerFactory):
    """``sven.Sven`` with the task's defaults plus one variant's step control."""

    description = "Sven with damping"

    def __init__(self, name: str, extra: Mapping[str, Any]) -> None:
        self.name = name
        self.extra = dict(extra)

    def grid(self, task: Task, *, quick: bool = False, sven_grid: bool = False) -> list[Hparams]:
        return [dict(task.sven_defaults)]

    def make(self, model: nn.Module, task: Task, hparams: Hparams) -> Stepper:
        kw = {"lr": float(hparams["lr"]), **self.extra}
        opt = sven.Sven(
            model.parameters(),
            rank=int(hparams["rank"]),
            rtol=float(hparams["rtol"]),
            kappa=float(hparams.get("kappa", 2.0)),
            **kw,
        )
        return _PerSampleClosure(model, task, opt)


def _fmt(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="+", default=["toy1d", "polynomial", "digits"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default=None, help="PNG: validation loss against training time")
    ap.add_argument("--json", default=None, help="write every run here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    runs: dict[tuple[str, str], list[RunResult]] = {}
    for name in args.task:
        task = get_task(name)
        data = task.data()
        for seed in range(args.seeds):
            for variant, extra in VARIANTS.items():  # interleaved: machine noise hits every variant alike
                fac = DampedSven(variant, extra)
                res = run_one(task, fac, dict(task.sven_defaults), seed, data=data, epochs=args.epochs)
                runs.setdefault((name, variant), []).append(res)

    print(
        "| task | variant | final val loss, median (min-max) | train time (s) | time to target (s) | seeds at target |"
    )
    print("|---|---|---|---|---|---|")
    for (name, variant), rs in runs.items():
        finals = [r.final_val_loss for r in rs]
        times = [r.total_train_time for r in rs]
        ttt = [r.time_to_target for r in rs if r.time_to_target is not None]
        print(
            f"| {name} | {variant} | {statistics.median(finals):.3g} ({min(finals):.3g}-{max(finals):.3g}) | "
            f"{statistics.median(times):.1f} | {_fmt(statistics.median(ttt) if ttt else None)} | "
            f"{len(ttt)}/{len(rs)} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}/{k[1]}": [r.to_dict() for r in v] for k, v in runs.items()}, f)
    if args.plot:
        require("matplotlib", "bench", "benchmarks/damping_compare.py --plot")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.task), figsize=(5.5 * len(args.task), 4), squeeze=False)
        for ax, name in zip(axes[0], args.task):
            for variant in VARIANTS:
                r = runs[(name, variant)][0]
                ax.plot(r.train_time, r.val_loss, label=variant)
            ax.set(title=f"{name} (seed 0)", xlabel="training time (s)", ylabel="validation loss", yscale="log")
            ax.axhline(get_task(name).target, color="grey", ls=":", lw=1)
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
