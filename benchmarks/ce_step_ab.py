"""A Sven step's cost before and after a change, both timed in one run, and the same training run checked.

    OMP_NUM_THREADS=1 python benchmarks/ce_step_ab.py --against 0a41637 [--tasks mnist-subset ...] [--rounds 40]
    OMP_NUM_THREADS=1 python benchmarks/ce_step_ab.py --against 0a41637 --tasks mnist-subset-mse charlm --noise 0 \
        --rounds 20 --warmup 10

``--against REF`` extracts the project at the git revision ``REF`` (``git archive``) into a temporary folder.
Two worker processes then import ``sven`` from each tree, "before" (``REF``) and "after" (this checkout), and
build the same task (sven-bench's data, model seed 0, batch 64, one thread). Each round, the driver asks each
worker (in alternating order) to time one block of ``--steps`` Adam steps and one block of ``--steps`` Sven steps
(``sven.Sven`` defaults on the task's own per-sample loss, ``task.per_sample_loss(net(x), y)``; Adam, lr 1e-3,
on its mean), from the same batches in both workers. On the default tasks, the classifiers, that loss is
``F.cross_entropy(..., reduction="none")``, so the step is the loss rule's; ``mnist-subset-mse`` (per-sample
squared error) takes the regression default (:class:`sven.control.AdaptiveDamping`) and ``charlm`` (per-sequence
token cross-entropy) the sequence rule. A worker's Sven step cost is the median of its Sven blocks over the
median of its own Adam blocks, so that each ratio comes from one process and load on the machine hits both
workers alike. ``--clock cpu`` times the blocks by the worker's CPU time (``time.thread_time``) instead of the
wall clock: on a machine shared with other jobs, time spent waiting for a core then does not count (their
traffic through the caches still does).

Both workers take the same steps: the script also reports the largest relative difference between the two
workers' batch losses over the whole run (``--warmup + --rounds x --steps`` steps). Training amplifies
round-off, so that difference is set against a yardstick: a third worker runs "after" with each input of the
float64 Gram products perturbed by float32 round-off (relative noise ``--noise``, 6e-8: half a float32 ulp),
and its largest relative difference from "after" is reported too (``--noise 0``: no third worker). A change
that keeps the mathematics to round-off stays within about that envelope.

``--options JSON``: keyword options of ``sven.Sven`` for "after" (and its yardstick) only, e.g.
``--options '{"judge_every": 4}'`` times an option of this checkout against ``REF``'s default (a change of the
mathematics: its batch losses leave the envelope).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


def worker(src: str, noise: float, options: str = "{}") -> None:
    """Serve the driver's requests on stdin/stdout with ``sven`` imported from ``src`` (one JSON line each).

    ``noise > 0``: each input ``X`` of the Gram products ``X X^T`` is multiplied by ``1 + noise * N(0, 1)``;
    ``options``: the JSON of ``sven.Sven``'s keyword options.
    """
    sys.path.insert(0, src)
    import time

    import torch

    import sven
    from sven.bench.tasks import get_task

    torch.set_num_threads(1)
    if noise > 0:
        from sven.linearize import gram_factors

        plain, gen = gram_factors._gram64, torch.Generator().manual_seed(1)

        def perturbed(X: torch.Tensor) -> torch.Tensor:
            return plain(X * (1 + noise * torch.randn(X.shape, generator=gen, dtype=X.dtype)))

        gram_factors._gram64 = perturbed
    state: dict[str, object] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "setup":
            task = get_task(req["task"])
            data = task.build_data()
            state.update(task=task, x=data.x_train, y=data.y_train, adam_net=task.model(0), sven_net=task.model(0))
            state["adam"] = torch.optim.Adam(state["adam_net"].parameters(), lr=1e-3)  # type: ignore[attr-defined]
            state["sven"] = sven.Sven(state["sven_net"].parameters(), **json.loads(options))  # type: ignore[attr-defined]
            reply: dict[str, object] = {"ok": True, "sven": str(Path(sven.__file__).parent)}
        else:  # "block": time the Adam and the Sven block of this round's batches
            task, x, y = state["task"], state["x"], state["y"]
            gen = torch.Generator().manual_seed(int(req["seed"]))
            idx = torch.randperm(x.shape[0], generator=gen)[: req["steps"] * BATCH]  # type: ignore[attr-defined]
            batches = [(x[idx[i : i + BATCH]], y[idx[i : i + BATCH]]) for i in range(0, len(idx), BATCH)]  # type: ignore[index]
            times, losses = {}, []
            clock = time.thread_time if req.get("clock") == "cpu" else time.perf_counter
            for name in ("adam", "sven") if req["adam_first"] else ("sven", "adam"):
                net, opt = state[f"{name}_net"], state[name]
                t0 = clock()
                for xb, yb in batches:
                    if name == "adam":
                        opt.zero_grad()  # type: ignore[attr-defined]
                        task.per_sample_loss(net(xb), yb).mean().backward()  # type: ignore[attr-defined,operator]
                        opt.step()  # type: ignore[attr-defined]
                    else:
                        out = opt.step(lambda: task.per_sample_loss(net(xb), yb))  # type: ignore[attr-defined,operator]  # noqa: B023
                        losses.append(float(out.double().mean()))
                times[name] = clock() - t0
            reply = {"times": times, "losses": losses}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class JsonWorker:
    """A worker process (``argv``, one thread, ``PYTHONPATH`` set to ``path``) that answers one JSON line per
    request line: the driver's side of the A/B scripts (this one and ``benchmarks/tiny_step_ab.py``)."""

    def __init__(self, argv: list[str], path: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

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


class Worker(JsonWorker):
    """A worker process importing ``sven`` from ``src`` (:func:`worker`)."""

    def __init__(self, src: Path, noise: float = 0.0, options: str = "{}") -> None:
        super().__init__([sys.executable, __file__, "--worker", str(src), repr(noise), options], str(src))


def extract(ref: str, into: Path) -> Path:
    """The tree of git revision ``ref`` under ``into`` (``git archive``)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def _largest_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def measure(
    task: str, before: Path, *, rounds: int, steps: int, warmup: int, noise: float, clock: str = "wall",
    options: str = "{}",
) -> dict[str, float]:  # fmt: skip
    """Both workers' Sven/Adam step ratios (medians of blocks), the largest relative difference of their batch
    losses, and (``noise > 0``) that of "after" with float32 noise in the Gram products (the module docstring)."""
    workers = {"before": Worker(before), "after": Worker(ROOT, options=options)}
    if noise > 0:
        workers["perturbed"] = Worker(ROOT, noise, options)
    try:
        for w in workers.values():
            w.ask(op="setup", task=task)
        times: dict[str, dict[str, list[float]]] = {k: {"adam": [], "sven": []} for k in workers}
        losses: dict[str, list[float]] = {k: [] for k in workers}
        for k in range(-1, rounds):  # round -1: the warm-up (the first steps settle the damping), not timed
            n = warmup if k < 0 else steps
            order = list(workers) if k % 2 else list(reversed(workers))
            for name in order:
                r = workers[name].ask(op="block", seed=k + 1, steps=n, adam_first=bool(k % 2), clock=clock)
                losses[name] += r["losses"]  # type: ignore[arg-type, operator]
                if k >= 0 and name != "perturbed":
                    for opt in ("adam", "sven"):
                        times[name][opt].append(r["times"][opt])  # type: ignore[index]
    finally:
        for w in workers.values():
            w.close()
    out = {}
    for name in ("before", "after"):
        adam = statistics.median(times[name]["adam"])
        out[name] = statistics.median(times[name]["sven"]) / adam
        out[f"{name}_adam_ms"] = 1e3 * adam / steps
    out["loss_difference"] = _largest_difference(losses["after"], losses["before"])
    out["noise_difference"] = _largest_difference(losses["perturbed"], losses["after"]) if noise > 0 else math.nan
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="the git revision timed as 'before'")
    ap.add_argument("--tasks", nargs="+", default=["mnist-subset", "mnist1d", "digits-ce", "mnist-subset-cnn"])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--noise", type=float, default=6e-8, help="relative noise of the yardstick run (0: none)")
    ap.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="time blocks by the wall clock or by the worker's CPU time (time.thread_time: less swayed by other "
        "jobs on a shared machine, though their cache traffic still counts)",
    )  # fmt: skip
    ap.add_argument("--options", default="{}", help="sven.Sven's keyword options for 'after' (JSON)")
    a = ap.parse_args()
    if not isinstance(json.loads(a.options), dict):
        ap.error(f"--options must be a JSON object of sven.Sven's keyword options, got {a.options!r}")
    with tempfile.TemporaryDirectory() as tmp:
        before = extract(a.against, Path(tmp))
        print(f"before: {a.against}; after: this checkout {a.options}; {a.rounds} rounds of {a.steps} steps, "
              f"one thread, {a.clock} clock")  # fmt: skip
        print("| task | Adam step, ms | Sven step / Adam's, before | after | saved | batch losses, largest relative "
              "difference: before/after | after/after with float32 noise |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for task in a.tasks:
            r = measure(task, before, rounds=a.rounds, steps=a.steps, warmup=a.warmup, noise=a.noise, clock=a.clock,
                        options=a.options)  # fmt: skip
            noisy = "-" if math.isnan(r["noise_difference"]) else format(r["noise_difference"], ".1e")
            print(f"| {task} | {r['after_adam_ms']:.2f} | {r['before']:.2f}x | {r['after']:.2f}x | "
                  f"{1 - r['after'] / r['before']:.0%} | {r['loss_difference']:.1e} | {noisy} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    else:
        main()
