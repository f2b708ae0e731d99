"""Where the Gram route stops paying: Sven's step on the Gram route against the materialised one, by N / P.

The Gram route factorises ``K = M M^T`` (``N x N``); the materialised
("hooks") route forms ``M`` (``N x P``) and factorises it. With more rows
than parameters the second is cheaper, and ``jacobian="auto"`` takes it
(:data:`sven.linearize.TALL_RATIO`). This script times one Sven step (plain
step, no damping, one thread) of ``1-w-w-1`` tanh MLPs fitting ``sinc(10 x)``
on ``N = f * P`` points, on each route and under ``"auto"``, in the same
run, and prints the ratios; the median of ``--repeats`` steps after one
warm-up step. ``--example`` times the full-batch example of issue #25
(``1-20-1`` tanh MLP, 61 parameters, ``N`` = 2,000 and 4,000 points,
``residuals=True`` with the default options), where the Gram route took
2-98 s a step::

    python benchmarks/bench_route_crossover.py [--widths 8,24] [--fractions 0.25,0.5,1,2,4] [--example]

Under pytest the file runs once on a tiny case, as a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import sven


def _problem(width: int, depth: int, N: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x = torch.linspace(-1, 1, N)[:, None]
    y = torch.sinc(10 * x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(1, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(width, 1))
    return model, x, y


def step_time(width: int, depth: int, N: int, route: str, repeats: int, **options: object) -> tuple[float, float]:
    """(first step, median of ``repeats`` later steps) in seconds for one route."""
    model, x, y = _problem(width, depth, N)
    opt = sven.Sven(model.parameters(), residuals=True, jacobian=route, **options)  # type: ignore[arg-type]

    def closure() -> torch.Tensor:
        return model(x) - y

    t0 = time.perf_counter()
    opt.step(closure)
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step(closure)
        ts.append(time.perf_counter() - t0)
    return first, statistics.median(ts)


def crossover(widths: list[int], fractions: list[float], repeats: int) -> None:
    head = ("P", "N", "N/P", "gram ms", "hooks ms", "auto ms", "gram/hooks", "auto/hooks")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (6, 6, 5, 9, 9, 9, 10, 10))))
    for w in widths:
        P = sum(p.numel() for p in _problem(w, 2, 2)[0].parameters())
        for f in fractions:
            N = max(2, int(f * P))
            plain = {"adaptive_damping": False, "lr": 0.5}
            _, tg = step_time(w, 2, N, "gram", repeats, **plain)
            _, th = step_time(w, 2, N, "hooks", repeats, **plain)
            _, ta = step_time(w, 2, N, "auto", repeats, **plain)
            times = f"{tg * 1e3:9.2f} {th * 1e3:9.2f} {ta * 1e3:9.2f}"
            print(f"{P:6d} {N:6d} {f:5.2f} {times} {tg / th:10.2f} {ta / th:10.2f}", flush=True)


def example(repeats: int, sizes: list[int]) -> None:
    print("\n1-20-1 tanh MLP (61 parameters), sinc fit, residuals=True, default options")
    print(f"{'N':>6} {'auto first':>11} {'auto step':>10} {'hooks first':>12} {'hooks step':>11} {'step ratio':>11}")
    for N in sizes:
        fa, ta = step_time(20, 1, N, "auto", repeats)
        fh, th = step_time(20, 1, N, "hooks", repeats)
        print(f"{N:6d} {fa * 1e3:9.1f}ms {ta * 1e3:8.1f}ms {fh * 1e3:10.1f}ms {th * 1e3:9.1f}ms {ta / th:11.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="8,24")
    ap.add_argument("--fractions", default="0.25,0.5,1,2,4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--example", action="store_true", help="also the N = 2,000 and 4,000 example of issue #25")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {args.repeats} steps")
    crossover([int(w) for w in args.widths.split(",")], [float(f) for f in args.fractions.split(",")], args.repeats)
    if args.example:
        example(args.repeats, [2000, 4000])


def test_route_crossover_smoke() -> None:
    threads = torch.get_num_threads()
    try:
        main(["--widths", "4", "--fractions", "0.5,3", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
