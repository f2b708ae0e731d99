"""Cost of a step under the loss rule (issue #20) against an Adam step, with and without the factored model.

    OMP_NUM_THREADS=1 python benchmarks/bench_ce_step.py [--tasks mnist-subset mnist-subset-cnn] [--rounds 30]

For each task (sven-bench's data, model seed 0, batch 64, one thread) the script times, interleaved in one
process, blocks of ``--steps`` steps of:

* Adam (lr 1e-3): zero_grad, forward, backward, ``step()``;
* ``sven.Sven`` defaults on ``F.cross_entropy(..., reduction="none")`` (the loss rule: GGN rows,
  :class:`sven.control.CrossEntropyDamping`), whose step predicts each try's change of the rows from
  the factorisation (:mod:`sven.factored_model`);
* the same with that shortcut off (``sven.factored_model.exact_model`` patched to ``False``): the
  prediction is a product with :math:`M` through the layer factors, the step before this change.

Both Sven runs take ``--warmup`` steps (the first steps verify the route and settle the damping); each round
then starts the "before" run from the state of the other, so that both take the same steps and retries. The
script prints the median block time of each over Adam's (and the ratio of the fastest blocks, which other
jobs on the machine disturb least), and
the relative difference of the gain ratios of one step from the same state (round-off: the two paths
compute the same prediction). docs/results_notes.md ("The cost of a step under the loss rule") quotes it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sven
from sven import factored_model
from sven.bench.tasks import get_task

BATCH = 64


def sven_step(opt: sven.Sven, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, old: bool) -> None:
    """One step of ``opt`` under the loss rule; ``old``: with the factored model off (a product with ``M``)."""
    off = mock.patch.object(factored_model, "exact_model", lambda F: False) if old else contextlib.nullcontext()
    with off:
        opt.step(lambda: F.cross_entropy(net(x), y, reduction="none"))


def measure(task_name: str, *, rounds: int, steps: int, warmup: int) -> dict[str, float]:
    """Median block times over Adam's for ``"factored"`` and ``"product"``, and the gain ratios' difference."""
    task = get_task(task_name)
    data = task.build_data()
    x, y = data.x_train, data.y_train
    nets = {name: task.model(0) for name in ("adam", "factored", "product")}
    adam = torch.optim.Adam(nets["adam"].parameters(), lr=1e-3)
    # every step judged (judge_every=1): the gain ratio compared below is the judged step's
    opts = {name: sven.Sven(nets[name].parameters(), judge_every=1) for name in ("factored", "product")}
    gen = torch.Generator().manual_seed(0)

    def block(name: str, idx: torch.Tensor) -> None:
        net = nets[name]
        for i in range(idx.shape[0] // BATCH):
            b = idx[i * BATCH : (i + 1) * BATCH]
            xb, yb = x[b], y[b]
            if name == "adam":
                adam.zero_grad()
                F.cross_entropy(net(xb), yb).backward()
                adam.step()
            else:
                sven_step(opts[name], net, xb, yb, old=name == "product")

    warm = torch.randperm(x.shape[0], generator=gen)[: warmup * BATCH]
    for name in nets:  # (both Sven runs: the first step decides the loss rule, which a loaded state does not)
        block(name, warm)
    times: dict[str, list[float]] = {name: [] for name in nets}
    for k in range(rounds):
        # the same start for both Sven paths, so that they take the same steps (and retries) up to round-off
        nets["product"].load_state_dict(nets["factored"].state_dict())
        opts["product"].load_state_dict(opts["factored"].state_dict())
        idx = torch.randperm(x.shape[0], generator=gen)[: steps * BATCH]
        for name in ("adam", "factored", "product") if k % 2 else ("adam", "product", "factored"):  # (alternating)
            t0 = time.perf_counter()
            block(name, idx)
            times[name].append(time.perf_counter() - t0)
    base, low = statistics.median(times["adam"]), min(times["adam"])
    return {
        "factored": statistics.median(times["factored"]) / base,
        "product": statistics.median(times["product"]) / base,
        "factored_min": min(times["factored"]) / low,
        "product_min": min(times["product"]) / low,
        "adam_ms": 1e3 * base / steps,
        "difference": one_step_difference(nets["factored"], opts["factored"], x[:BATCH], y[:BATCH]),
    }


def one_step_difference(net: torch.nn.Module, opt: sven.Sven, x: torch.Tensor, y: torch.Tensor) -> float:
    """The relative difference of the gain ratios of one step of each path from the same state.

    The prediction enters only the gain ratio (the direction is the same tensor): the parameters after
    the step are identical unless the decision to keep it flips.
    """
    rho = []
    for old in (False, True):
        n, o = copy.deepcopy((net, opt))  # (together: the copy's optimizer holds the copy's parameters)
        sven_step(o, n, x, y, old=old)
        rho.append(float(o.last_step.gain_ratio))
    return abs(rho[0] - rho[1]) / abs(rho[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["mnist-subset", "mnist-subset-cnn"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--warmup", type=int, default=40)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| task | Adam step, ms | Sven step / Adam's, before (product with M) | after (factored model) | "
          "saved | the same from the fastest blocks: before, after | gain ratio, relative difference |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in a.tasks:
        r = measure(name, rounds=a.rounds, steps=a.steps, warmup=a.warmup)
        print(f"| {name} | {r['adam_ms']:.2f} | {r['product']:.2f}x | {r['factored']:.2f}x | "
              f"{1 - r['factored'] / r['product']:.0%} | {r['product_min']:.2f}x, {r['factored_min']:.2f}x | "
              f"{r['difference']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
