"""Measure the solver targets of the truncpinv issue and print a markdown table.

    .venv/bin/python benchmarks/solver_table.py            # the sizes of docs/tasks.md (several minutes on 2 cores)
    .venv/bin/python benchmarks/solver_table.py --small    # quick check

Every time is the best of ``--repeats`` runs, and every ratio is taken against
a baseline measured in the same run, on the same matrix. Errors are relative
to the float64 SVD solution of the same truncated problem.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import (
    PEERS,
    SPARSE_METHODS,
    Case,
    matrix,
    ours,
    rel_err,
    sparse_matrix,
    sparse_rel_err,
)


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out, best = None, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(
    shape: tuple[int, int], spectrum: str, rank: int, methods: list[str], repeats: int
) -> dict[str, tuple[float, float]]:
    A, b = matrix(shape, spectrum)
    case = Case(shape, spectrum, rank)
    res: dict[str, tuple[float, float]] = {}
    for name in methods:
        fn = ours(name.removeprefix("truncpinv-")) if name.startswith("truncpinv-") else PEERS[name]
        reps = (
            1
            if name in ("torch-svd-then-truncate", "numpy.linalg.pinv", "scipy.linalg.pinv", "torch.linalg.pinv")
            else repeats
        )
        t, x = best_time(lambda fn=fn: fn(A, b, rank), reps)
        res[name] = (t, rel_err(x, case))
        print(f"  {name:<28} {t:8.3f} s  err {res[name][1]:.1e}", file=sys.stderr, flush=True)
    if "gemm" not in res:
        t, _ = best_time(lambda: A @ A.T, repeats)
        res["one float32 A @ A.T"] = (t, float("nan"))
    return res


def run_sparse(shape: tuple[int, int], rank: int, repeats: int) -> dict[str, tuple[float, float]]:
    """SciPy sparse input: every method of ``SPARSE_METHODS``, interleaved round by round (a noisy machine
    then slows all of them alike), best of ``repeats``."""
    A, b = sparse_matrix(shape)
    best = dict.fromkeys(SPARSE_METHODS, float("inf"))
    xs: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in SPARSE_METHODS.items():
            t0 = time.perf_counter()
            xs[name] = fn(A, b, rank)
            best[name] = min(best[name], time.perf_counter() - t0)
    res = {name: (best[name], sparse_rel_err(xs[name], shape, rank)) for name in SPARSE_METHODS}
    for name, (t, e) in res.items():
        print(f"  {name:<28} {t:8.3f} s  err {e:.1e}", file=sys.stderr, flush=True)
    return res


def table(title: str, res: dict[str, tuple[float, float]], base: str) -> str:
    tb = res[base][0]
    lines = [
        f"**{title}** (ratios against `{base}`)",
        "",
        "| method | time [s] | time / baseline | rel. error |",
        "|---|---:|---:|---:|",
    ]
    for name, (t, e) in res.items():
        err = "" if e != e else f"{e:.1e}"
        lines.append(f"| {name} | {t:.3f} | {t / tb:.3f} | {err} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="small matrices (a quick check, not the targets)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sparse-only", action="store_true", help="only the SciPy sparse case (issue #11)")
    args = p.parse_args()
    if args.sparse_only:
        shape, rank = ((2_000, 300), 10) if args.small else ((20_000, 3_000), 50)
        res = run_sparse(shape, rank, args.repeats)
        print(
            table(
                f"Sparse: scipy.sparse.random {shape[0]}x{shape[1]}, density 0.01, rank={rank}, rtol=1e-8",
                res,
                "scipy-svds",
            )
        )
        return
    torch.manual_seed(0)
    big, mid = ((128, 4000), (64, 4000)) if args.small else ((512, 200_000), (256, 100_000))
    out = [f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"]
    exact_methods = ["truncpinv-auto", "truncpinv-gram", "truncpinv-svd", "torch-svd-then-truncate"]
    for spec in ("decay0.9", "flat"):
        print(f"exact path {big} {spec}", file=sys.stderr)
        res = run(big, spec, big[0] // 2, exact_methods, args.repeats)
        out.append(
            table(
                f"Exact path: {big[0]}x{big[1]} {spec}, rank={big[0] // 2}, rtol=1e-3", res, "torch-svd-then-truncate"
            )
        )
    low = [
        "truncpinv-auto",
        "truncpinv-randomized",
        "truncpinv-lanczos",
        "truncpinv-lobpcg",
        "sklearn-randomized_svd",
        "scipy-svds",
        "torch.svd_lowrank",
    ]
    for spec in ("decay0.9", "flat"):
        rank = 32 if not args.small else 8
        print(f"low-rank path {mid} {spec}", file=sys.stderr)
        res = run(mid, spec, rank, low, args.repeats)
        exact = run(mid, spec, mid[0] // 2, ["truncpinv-auto"], args.repeats)["truncpinv-auto"]
        res[f"exact path (auto, rank={mid[0] // 2})"] = (exact[0], float("nan"))
        out.append(
            table(f"Low-rank path: {mid[0]}x{mid[1]} {spec}, rank={rank}, rtol=1e-3", res, "sklearn-randomized_svd")
        )
    print("\n".join(out))


if __name__ == "__main__":
    main()
