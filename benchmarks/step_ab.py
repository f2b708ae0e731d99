"""A Sven step on a task's own per-sample loss before and after a change, both timed in one run.

    OMP_NUM_THREADS=1 python benchmarks/step_ab.py --against 7cc3dbf [--tasks mnist-subset-mse charlm] [--rounds 20]

The same protocol as ``benchmarks/ce_step_ab.py`` (its docstring), for the steps that are not the loss
rule's: each task's closure is ``task.per_sample_loss(net(x), y)``, sven-bench's own loss, with ``sven.Sven``
defaults. So ``mnist-subset-mse`` (per-sample squared error) takes the regression default (the adaptive
Levenberg--Marquardt damping of :class:`sven.control.AdaptiveDamping`) and ``charlm`` (per-sequence token
cross-entropy) the sequence rule (:mod:`sven.sequence_rule`: the plain step with Nesterov momentum). Two
worker processes import ``sven`` from ``--against`` (``git archive``) and from this checkout, build the task
(model seed 0, batch 64, one thread) and time, round by round in alternating order, one block of
``--steps`` Adam steps (lr 1e-3 on the mean loss) and one of Sven steps from the same batches. A worker's
ratio is the median of its Sven blocks over the median of its Adam blocks. The last column is the largest
relative difference of the two workers' batch losses over the run (0: the same steps bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


def worker(src: str) -> None:
    """Serve the driver's requests on stdin/stdout with ``sven`` imported from ``src`` (one JSON line each)."""
    sys.path.insert(0, src)
    import time

    import torch

    import sven
    from sven.bench.tasks import get_task

    torch.set_num_threads(1)
    state: dict[str, object] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "setup":
            task = get_task(req["task"])
            data = task.build_data()
            state.update(task=task, x=data.x_train, y=data.y_train, adam_net=task.model(0), sven_net=task.model(0))
            state["adam"] = torch.optim.Adam(state["adam_net"].parameters(), lr=1e-3)  # type: ignore[attr-defined]
            state["sven"] = sven.Sven(state["sven_net"].parameters())  # type: ignore[attr-defined]
            reply: dict[str, object] = {"ok": True}
        else:  # "block": time the Adam and the Sven block of this round's batches
            task, x, y = state["task"], state["x"], state["y"]
            gen = torch.Generator().manual_seed(int(req["seed"]))
            idx = torch.randperm(x.shape[0], generator=gen)[: req["steps"] * BATCH]  # type: ignore[attr-defined]
            batches = [(x[idx[i : i + BATCH]], y[idx[i : i + BATCH]]) for i in range(0, len(idx), BATCH)]  # type: ignore[index]
            times, losses = {}, []
            for name in ("adam", "sven") if req["adam_first"] else ("sven", "adam"):
                net, opt = state[f"{name}_net"], state[name]
                t0 = time.perf_counter()
                for xb, yb in batches:
                    if name == "adam":
                        opt.zero_grad()  # type: ignore[attr-defined]
                        task.per_sample_loss(net(xb), yb).mean().backward()  # type: ignore[attr-defined,operator]
                        opt.step()  # type: ignore[attr-defined]
                    else:
                        out = opt.step(lambda: task.per_sample_loss(net(xb), yb))  # type: ignore[attr-defined,operator]  # noqa: B023
                        losses.append(float(out.double().mean()))
                times[name] = time.perf_counter() - t0
            reply = {"times": times, "losses": losses}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Worker:
    """A worker process importing ``sven`` from ``src``."""

    def __init__(self, src: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(src)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env,
        )  # fmt: skip

    def ask(self, **req: object) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {req} ended without an answer")
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def measure(task: str, before: Path, *, rounds: int, steps: int, warmup: int) -> dict[str, float]:
    """Both workers' Sven/Adam step ratios (medians of blocks) and the largest relative difference of their
    batch losses."""
    from ce_step_ab import _largest_difference  # (this folder: the script's own directory is on sys.path)

    workers = {"before": Worker(before), "after": Worker(ROOT)}
    try:
        for w in workers.values():
            w.ask(op="setup", task=task)
        times: dict[str, dict[str, list[float]]] = {k: {"adam": [], "sven": []} for k in workers}
        losses: dict[str, list[float]] = {k: [] for k in workers}
        for k in range(-1, rounds):  # round -1: the warm-up, not timed
            order = list(workers) if k % 2 else list(reversed(workers))
            for name in order:
                r = workers[name].ask(op="block", seed=k + 1, steps=warmup if k < 0 else steps, adam_first=bool(k % 2))
                losses[name] += r["losses"]  # type: ignore[arg-type, operator]
                if k >= 0:
                    for opt in ("adam", "sven"):
                        times[name][opt].append(r["times"][opt])  # type: ignore[index]
    finally:
        for w in workers.values():
            w.close()
    out = {}
    for name in workers:
        adam = statistics.median(times[name]["adam"])
        out[name] = statistics.median(times[name]["sven"]) / adam
        out[f"{name}_adam_ms"] = 1e3 * adam / steps
    out["loss_difference"] = _largest_difference(losses["after"], losses["before"])
    return out


def main() -> None:
    from ce_step_ab import extract

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="the git revision timed as 'before'")
    ap.add_argument("--tasks", nargs="+", default=["mnist-subset-mse", "charlm"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--warmup", type=int, default=10)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = extract(a.against, Path(tmp))
        print(f"before: {a.against}; after: this checkout; {a.rounds} rounds of {a.steps} steps, one thread")
        print("| task | Adam step, ms | Sven step / Adam's, before | after | saved | batch losses, largest relative "
              "difference: before/after |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for task in a.tasks:
            r = measure(task, before, rounds=a.rounds, steps=a.steps, warmup=a.warmup)
            print(f"| {task} | {r['after_adam_ms']:.2f} | {r['before']:.2f}x | {r['after']:.2f}x | "
                  f"{1 - r['after'] / r['before']:.0%} | {r['loss_difference']:.1e} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
