"""Recurrent layers on the Gram route: a Sven step against an Adam step, in time and in peak memory.

The task of issue #20: sequence regression of the next value of noisy sines
(``x_t = sin(w t + phi) + 0.05 noise``, predict ``x_{t+1}`` at every step), a
one-layer recurrent cell (input 1, hidden 64, sequence 50) with a linear head,
batch 64, per-sample loss ``sum_t (pred_t - x_{t+1})^2``. For each cell
(``--cells gru,lstm,rnn``) the script prints, from one run on one thread:

* the time of a Sven step (``jacobian="auto"``, which takes the Gram route,
  plain step: ``rank=32, rtol=1e-3, adaptive_damping=False``) over an Adam
  step (zero_grad + forward + backward + update), medians over interleaved
  rounds;
* the peak of the tensor memory allocated during one step, above what was
  live when the step began (parameters, optimizer state, data), Sven over
  Adam, from ``torch.profiler``'s memory timeline;
* with ``--fallback``, the same time ratio for the materialised autograd
  Jacobian (``jacobian="autograd"``), what these models used before.

Goals for the GRU (issue #20): time <= 3x Adam's step, peak memory <= 1.5x.
Run ``python benchmarks/bench_rnn.py [--cells gru] [--rounds 15] [--fallback]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sven
from benchmarks.step_cases import SeqRegressor, adam_stepper, measure, noisy_sines

TIME_GOAL = 3.0
MEMORY_GOAL = 1.5
CELLS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


def per_sample_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).sum(-1)


def steppers(cell: type[nn.Module], fallback: bool) -> dict[str, Callable[[], object]]:
    """An Adam step and Sven steps (Gram route; the autograd Jacobian if ``fallback``) on copies of one model."""
    x, y = noisy_sines()
    base = SeqRegressor(cell)
    m_adam = copy.deepcopy(base)
    fns: dict[str, Callable[[], object]] = {"adam": adam_stepper(m_adam, lambda: per_sample_loss(m_adam(x), y))}
    for name, route in [("sven", "auto")] + ([("sven autograd", "autograd")] if fallback else []):
        model = copy.deepcopy(base)
        opt = sven.Sven(model.parameters(), lr=0.1, rank=32, rtol=1e-3, jacobian=route, adaptive_damping=False)

        def step(opt: sven.Sven = opt, model: nn.Module = model) -> object:
            return opt.step(lambda: per_sample_loss(model(x), y))

        fns[name] = step
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback from the Gram route would warn
        for f in fns.values():
            f()
    return fns


def peak_step_bytes(fn: Callable[[], object]) -> int:
    """The peak of the tensor bytes allocated while ``fn`` runs, above the level when it starts (CPU)."""
    from torch.profiler import profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return max((sum(s) for s in sizes), default=0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="gru", help=f"comma-separated, from {list(CELLS)}")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--fallback", action="store_true", help="also time the autograd Jacobian (slow)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; B=64, T=50, hidden 64, input 1, linear head")
    for name in args.cells.split(","):
        fns = steppers(CELLS[name], args.fallback)
        t = measure(fns, rounds=args.rounds, per_round=args.per_round)
        mem = {k: peak_step_bytes(fns[k]) for k in ("adam", "sven")}
        ratio, mratio = t["sven"] / t["adam"], mem["sven"] / mem["adam"]
        print(f"\n{name}: Adam step {t['adam'] * 1e3:.2f} ms, peak {mem['adam'] / 2**20:.2f} MiB")
        print(f"  Sven (Gram route) {t['sven'] * 1e3:8.2f} ms  {ratio:5.2f}x Adam   (goal <= {TIME_GOAL}x)")
        print(f"  Sven peak memory  {mem['sven'] / 2**20:8.2f} MiB {mratio:5.2f}x Adam   (goal <= {MEMORY_GOAL}x)")
        if "sven autograd" in t:
            slow = t["sven autograd"]
            print(f"  Sven, autograd Jacobian {slow * 1e3:8.2f} ms  {slow / t['adam']:5.2f}x Adam   (the old fallback)")


if __name__ == "__main__":
    main()
