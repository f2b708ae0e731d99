"""Sven's defaults against the best-tuned Adam/AdamW at equal epochs and at equal wall time, from sven-bench runs.

Reads the ``results.json`` of one or more ``sven-bench`` runs and prints, per task,
the ratio of ``sven-native`` (the defaults) to the best baseline, seed by seed:

* **baseline**: of ``adam`` and ``adamw``, the grid point with the lowest final
  validation loss on seed 0 (as sven-bench selects it), then that point on every seed;
* **equal epochs**: Sven's final validation loss / the baseline's;
* **equal wall time**: each run's validation loss at the last epoch end within
  the shorter run's training time ``T`` (the curves are per epoch, and the
  validation is outside the clock), Sven's / the baseline's;
* **step**: the ratio of the median step times.

``--step-ratio TASK=R`` replaces a task's measured times (which other jobs on the machine distort) by a step
cost ratio ``R`` measured apart (``benchmarks/bench_ce_step.py``): the baseline's ``E`` epochs then buy Sven
``floor(E / R)`` whole epochs, and the equal-wall-time ratio is Sven's validation loss after them over the
baseline's final one.

Ratios are medians over the seeds (each seed's pair from the same run).

    sven-bench --threads 1 --seeds 3 --task mnist1d mnist-subset --optimizers sven-native adam adamw --out runs/ce
    python benchmarks/equal_time.py runs/ce/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

BASELINES = ("adam", "adamw")


def loss_at(run: dict[str, Any], seconds: float) -> float:
    """The validation loss at the last epoch end whose cumulative training time is within ``seconds``."""
    loss = run["val_loss"][0]
    for t, value in zip(run["train_time"], run["val_loss"], strict=True):
        if t <= seconds * (1 + 1e-9):
            loss = value
    return float(loss)


def _key(run: dict[str, Any]) -> str:
    return json.dumps(run["hparams"], sort_keys=True)


def compare(runs: list[dict[str, Any]], task: str, step_ratio: float | None = None) -> dict[str, Any]:
    """Sven's defaults against the selected baseline on ``task``: per-seed ratios and their medians.

    ``step_ratio``: Sven's step cost over the baseline's, measured apart, for the equal-wall-time ratio
    (module docstring); ``None``: the runs' own training times.
    """
    ok = [r for r in runs if r["task"] == task and not r.get("error")]
    choices = [
        (r["final_val_loss"], r["optimizer"], _key(r)) for r in ok if r["optimizer"] in BASELINES and r["seed"] == 0
    ]
    if not choices:
        raise ValueError(f"no adam/adamw run on seed 0 of task {task!r}")
    _, name, key = min(choices)
    base = {r["seed"]: r for r in ok if r["optimizer"] == name and _key(r) == key}
    rows = []
    for s in (r for r in ok if r["optimizer"] == "sven-native" and r["config"] == "defaults"):
        b = base.get(s["seed"])
        if b is None:
            continue
        T = min(s["total_train_time"], b["total_train_time"])
        if step_ratio is None:
            at_time = loss_at(s, T) / loss_at(b, T)
        else:
            epochs = min(int((len(b["val_loss"]) - 1) / step_ratio), len(s["val_loss"]) - 1)
            at_time = s["val_loss"][epochs] / b["final_val_loss"]
        acc = s["metrics"].get("accuracy"), b["metrics"].get("accuracy")
        rows.append(
            {
                "seed": s["seed"],
                "sven": s["final_val_loss"],
                "base": b["final_val_loss"],
                "epochs": s["final_val_loss"] / b["final_val_loss"],
                "time": at_time,
                "step": s["step_time_median"] / b["step_time_median"],
                "accuracy": None if acc[0] is None else (acc[0][-1], acc[1][-1]),
            }
        )
    med = statistics.median
    return {
        "task": task,
        "baseline": f"{name} {key}",
        "seeds": rows,
        **{k: med(r[k] for r in rows) for k in ("sven", "base", "epochs", "time", "step")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results.json files of sven-bench runs (merged)")
    ap.add_argument(
        "--step-ratio", nargs="*", default=[], metavar="TASK=R", help="a step cost ratio measured apart, per task"
    )
    args = ap.parse_args()
    ratios = {}
    for item in args.step_ratio:
        task, _, value = item.partition("=")
        try:
            ratios[task] = float(value)
        except ValueError:
            ap.error(f"--step-ratio takes TASK=RATIO with a positive number, got {item!r}")
        if not ratios[task] > 0:
            ap.error(f"--step-ratio takes TASK=RATIO with a positive number, got {item!r}")
    runs: list[dict[str, Any]] = []
    for path in args.results:
        with open(path) as f:
            runs += json.load(f)["runs"]
    print("| task | best baseline | Sven / baseline loss, median | equal epochs | equal wall time | step | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for task in sorted({r["task"] for r in runs}):
        c = compare(runs, task, ratios.get(task))
        accs = [r["accuracy"] for r in c["seeds"] if r["accuracy"] is not None]
        acc = ", ".join(f"{a:.1%} / {b:.1%}" for a, b in accs) or "-"
        per_seed = {k: ", ".join(format(r[k], ".2f") for r in c["seeds"]) for k in ("epochs", "time")}
        print(
            f"| {task} | {c['baseline']} | {c['sven']:.4g} / {c['base']:.4g} | {c['epochs']:.2f}x "
            f"({per_seed['epochs']}) | {c['time']:.2f}x ({per_seed['time']}) | {c['step']:.1f}x | {acc} |"
        )


if __name__ == "__main__":
    main()
