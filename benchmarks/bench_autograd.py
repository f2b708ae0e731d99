"""The backward pass of ``tp.lstsq`` against ``torch.linalg.lstsq``'s and ``torch.linalg.pinv``'s (issue #24).

For a dense float64 ``A`` (standard normal, full rank) and ``b`` with 4
columns, each method's forward pass runs once; then the backward pass
``torch.autograd.grad(x, (A, b), xbar)`` is timed, best of ``--repeats``, the
methods interleaved round by round in one process on one thread. Methods:

* ``tp.lstsq`` with ``solver="svd"``: the backward reuses the factorisation's SVD (so the forward
  pass, an SVD against ``torch.linalg.lstsq``'s QR, carries the cost: see the forward + backward column);
* ``tp.lstsq`` with ``solver="randomized"``, ``rank=min(m, n)//8``: the backward computes a dense SVD;
* ``torch.linalg.lstsq(A, b)``: its backward (a pseudoinverse through ``linalg.pinv``'s formula);
* ``torch.linalg.pinv(A) @ b``: the backward of the explicit pseudoinverse.

The ratios (ours over ``torch.linalg.lstsq``'s backward)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_autograd.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_autograd.py --small

As pytest-benchmark (``--benchmark-disable`` runs each case once, small, and
checks the gradients against ``torch.linalg.pinv``'s)::

    .venv/bin/python -m pytest benchmarks/bench_autograd.py --benchmark-only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import truncpinv as tp

SHAPES = [(2000, 200), (200, 2000), (600, 600)]
SMALL = [(200, 40), (40, 200), (80, 80)]
K = 4
Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def methods(shape: tuple[int, int]) -> dict[str, Method]:
    """The solves whose backward passes are compared."""
    r = max(1, min(shape) // 8)
    return {
        "tp.lstsq svd": lambda A, b: tp.lstsq(A, b, solver="svd"),
        f"tp.lstsq randomized rank {r}": lambda A, b: tp.lstsq(A, b, rank=r, solver="randomized"),
        "torch.linalg.lstsq": lambda A, b: torch.linalg.lstsq(A, b).solution,
        "torch.linalg.pinv @ b": lambda A, b: torch.linalg.pinv(A) @ b,
    }


def problem(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[0], K, generator=g, dtype=torch.float64, requires_grad=True)
    xbar = torch.randn(shape[1], K, generator=g, dtype=torch.float64)
    return A, b, xbar


def backward_time(f: Method, A: torch.Tensor, b: torch.Tensor, xbar: torch.Tensor) -> float:
    """Seconds of one backward pass (the forward pass is not timed)."""
    return timed(f, A, b, xbar)[1]


def timed(f: Method, A: torch.Tensor, b: torch.Tensor, xbar: torch.Tensor) -> tuple[float, float]:
    """Seconds of one forward and of one backward pass."""
    t0 = time.perf_counter()
    x = f(A, b)
    t1 = time.perf_counter()
    torch.autograd.grad(x, (A, b), xbar)
    return t1 - t0, time.perf_counter() - t1


def table(shapes: list[tuple[int, int]], repeats: int) -> None:
    torch.set_num_threads(1)
    print(f"backward pass, best of {repeats}, 1 thread, float64, b with {K} columns")
    print(
        f"{'shape':>12} | {'method':<32} | {'backward (s)':>12} | {'/ torch.linalg.lstsq':>20} | "
        f"{'fwd + bwd (s)':>13} | {'/ torch.linalg.lstsq':>20}"
    )
    for shape in shapes:
        A, b, xbar = problem(shape)
        ms = methods(shape)
        bwd = {name: float("inf") for name in ms}
        both = dict(bwd)
        for _ in range(repeats):  # interleaved: every method sees the same machine state
            for name, f in ms.items():
                tf, tb = timed(f, A, b, xbar)
                bwd[name], both[name] = min(bwd[name], tb), min(both[name], tf + tb)
        base, base2 = bwd["torch.linalg.lstsq"], both["torch.linalg.lstsq"]
        for name in ms:
            print(
                f"{shape!s:>12} | {name:<32} | {bwd[name]:12.4f} | {bwd[name] / base:20.2f} | "
                f"{both[name]:13.4f} | {both[name] / base2:20.2f}"
            )


@pytest.mark.parametrize("shape", SMALL, ids=[f"{m}x{n}" for m, n in SMALL])
@pytest.mark.parametrize("name", ["tp.lstsq svd", "tp.lstsq randomized", "torch.linalg.lstsq", "torch.linalg.pinv @ b"])
def test_backward(benchmark, shape: tuple[int, int], name: str) -> None:  # type: ignore[no-untyped-def]
    A, b, xbar = problem(shape)
    f = next(v for k, v in methods(shape).items() if k.startswith(name))
    benchmark(backward_time, f, A, b, xbar)
    if name == "tp.lstsq svd":  # full rank, nothing truncated: torch.linalg.pinv's gradients
        got = torch.autograd.grad(f(A, b), (A, b), xbar)
        ref = torch.autograd.grad(torch.linalg.pinv(A) @ b, (A, b), xbar)
        for u, v in zip(got, ref):
            torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the small shapes (seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    table(SMALL if args.small else SHAPES, args.repeats)
