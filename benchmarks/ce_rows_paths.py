"""The loss rule's fast GGN rows on their two paths, timed in one process: the detached coefficients in NumPy
(small CPU batches, the default) against the same arithmetic in torch.

    OMP_NUM_THREADS=1 python benchmarks/ce_rows_paths.py [--tasks mnist-subset mnist1d] [--rounds 80]

Two optimizers with ``sven.Sven``'s defaults train two copies of the task's model (seed 0, batch 64, one
thread) on the same batches; each round times a block of ``--steps`` steps of each, in alternating order, by
the process's CPU time (``time.thread_time``), with :data:`sven.loss_rows._HOST_SMALL` set to the path's
value around the block. Printed: the median step of each path and their ratio, after ``--warmup`` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sven
from sven import loss_rows
from sven.bench.tasks import get_task

BATCH = 64


def measure(task_name: str, *, rounds: int, steps: int, warmup: int) -> dict[str, float]:
    """The median CPU time of a step (seconds) on each path."""
    task = get_task(task_name)
    data = task.build_data()
    x, y = data.x_train, data.y_train
    gen = torch.Generator().manual_seed(0)
    limits = {"numpy": loss_rows._HOST_SMALL, "torch": 0}
    nets = {k: task.model(0) for k in limits}
    opts = {k: sven.Sven(nets[k].parameters()) for k in limits}
    times: dict[str, list[float]] = {k: [] for k in limits}
    try:
        for r in range(warmup + rounds):
            idx = torch.randperm(x.shape[0], generator=gen)[: steps * BATCH]
            batches = [(x[idx[i : i + BATCH]], y[idx[i : i + BATCH]]) for i in range(0, len(idx), BATCH)]
            for k in ("numpy", "torch") if r % 2 else ("torch", "numpy"):
                loss_rows._HOST_SMALL, net, opt = limits[k], nets[k], opts[k]
                t0 = time.thread_time()
                for xb, yb in batches:
                    opt.step(lambda: task.per_sample_loss(net(xb), yb))  # noqa: B023
                if r >= warmup:
                    times[k].append((time.thread_time() - t0) / len(batches))
    finally:
        loss_rows._HOST_SMALL = limits["numpy"]
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["mnist-subset", "mnist1d"])
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--warmup", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| task | step, NumPy path, ms | torch path, ms | NumPy / torch |")
    print("|---|---|---|---|")
    for name in a.tasks:
        m = measure(name, rounds=a.rounds, steps=a.steps, warmup=a.warmup)
        print(
            f"| {name} | {1e3 * m['numpy']:.2f} | {1e3 * m['torch']:.2f} | {m['numpy'] / m['torch']:.3f} |", flush=True
        )


if __name__ == "__main__":
    main()
