"""``tp.lstsq(A, b)`` with defaults on sparse and operator input against SciPy's ``lsmr`` and ``lsqr`` (issue #25).

The matrix is ``scipy.sparse.random(20000, 3000, density=0.01, random_state=0)``
(CSR, float64) with ``TRUNCPINV_BENCH=full``, ``2000 x 300`` otherwise; ``b``
is standard normal. Each method runs on the sparse matrix itself and on a
``scipy.sparse.linalg.LinearOperator`` wrapping it. The peers stop at
``atol = btol = tp.default_tol`` (``1e-12`` here), the tolerance of our
default, so the accuracies are comparable; both are reported:

* ``normal_residual``: ``||A^T r|| / (||A||_F ||r||)`` from explicit float64 products;
* ``rel_err``: ``||x - x_ref|| / ||x_ref||`` against the normal-equations solution
  ``(A^T A)^{-1} A^T b`` (Cholesky in float64; ``cond(A) ~ 8`` here, so its own
  error is about ``cond^2 eps ~ 1e-14``).

The table with the time ratios (best of ``--repeats``, all methods interleaved
round by round in one process, one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lsmr.py            # 20000 x 3000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lsmr.py --small    # 2000 x 300

As pytest-benchmark (``--benchmark-disable`` runs each case once on the small
matrix and asserts our accuracy)::

    TRUNCPINV_BENCH=full .venv/bin/python -m pytest benchmarks/bench_lsmr.py --benchmark-only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg as spla
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import truncpinv as tp
from benchmarks.cases import FULL

SHAPE_FULL, SHAPE_SMALL = (20_000, 3_000), (2_000, 300)
SHAPE = SHAPE_FULL if FULL else SHAPE_SMALL


@cache
def problem(shape: tuple[int, int]) -> tuple[Any, np.ndarray, np.ndarray]:
    """``(A, b, x_ref)``: the sparse matrix, the right-hand side and the float64 reference solution."""
    A = scipy.sparse.random(*shape, density=0.01, random_state=0, format="csr")
    b = np.random.default_rng(1).standard_normal(shape[0])
    G = (A.T @ A).toarray()
    x_ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(G), A.T @ b)
    return A, b, x_ref


def tol(shape: tuple[int, int]) -> float:
    """The stopping tolerance of ``tp.lstsq``'s default (``tp.default_tol`` of float64), given to the peers."""
    return tp.default_tol(torch.float64, shape)


def _inputs(A: Any) -> dict[str, Any]:
    return {"sparse": A, "operator": spla.aslinearoperator(A)}


def _ours(A: Any, b: np.ndarray) -> np.ndarray:
    return np.asarray(tp.lstsq(A, b))


def _scipy_lsmr(A: Any, b: np.ndarray) -> np.ndarray:
    t = tol(A.shape)
    return spla.lsmr(A, b, atol=t, btol=t, maxiter=10 * min(A.shape))[0]  # type: ignore[no-any-return]


def _scipy_lsqr(A: Any, b: np.ndarray) -> np.ndarray:
    t = tol(A.shape)
    return spla.lsqr(A, b, atol=t, btol=t, iter_lim=10 * min(A.shape))[0]  # type: ignore[no-any-return]


METHODS: dict[str, Callable[[Any, np.ndarray], np.ndarray]] = {
    "truncpinv tp.lstsq(A, b)": _ours,
    "scipy lsmr": _scipy_lsmr,
    "scipy lsqr": _scipy_lsqr,
}


def accuracy(A: Any, b: np.ndarray, x: np.ndarray, x_ref: np.ndarray) -> tuple[float, float]:
    """``(normal_residual, rel_err)`` (see the module docstring)."""
    r = b - A @ x
    ne = float(np.linalg.norm(A.T @ r) / (scipy.sparse.linalg.norm(A) * np.linalg.norm(r)))
    return ne, float(np.linalg.norm(x - x_ref) / np.linalg.norm(x_ref))


@pytest.mark.parametrize("kind", ["sparse", "operator"])
@pytest.mark.parametrize("method", list(METHODS))
def test_lstsq(benchmark, method: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    A, b, x_ref = problem(SHAPE)
    A_in = _inputs(A)[kind]
    benchmark.group = f"lstsq {SHAPE[0]}x{SHAPE[1]} density=0.01, {kind}"
    x = benchmark.pedantic(METHODS[method], args=(A_in, b), rounds=5, iterations=1, warmup_rounds=1)
    ne, err = accuracy(A, b, x, x_ref)
    benchmark.extra_info.update(method=method, normal_residual=ne, rel_err=err)
    if method.startswith("truncpinv"):
        assert ne <= 1e-11 and err <= 1e-9, f"{method}: normal residual {ne:.1e}, error {err:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="2000 x 300 instead of 20000 x 3000")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    shape = SHAPE_SMALL if args.small else SHAPE_FULL
    A, b, x_ref = problem(shape)
    print(
        f"scipy.sparse.random({shape[0]}, {shape[1]}, density=0.01, random_state=0), float64; peers at "
        f"atol = btol = {tol(shape):g}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n"
    )
    for kind, A_in in _inputs(A).items():
        best = dict.fromkeys(METHODS, float("inf"))
        xs: dict[str, np.ndarray] = {}
        for fn in METHODS.values():  # warm-up
            fn(A_in, b)
        for _ in range(args.repeats):  # interleaved: a noisy machine slows every method alike
            for name, fn in METHODS.items():
                t0 = time.perf_counter()
                xs[name] = fn(A_in, b)
                best[name] = min(best[name], time.perf_counter() - t0)
        base = best["scipy lsmr"]
        print(f"**{kind} input** (best of {args.repeats}; ratio against `scipy lsmr`)\n")
        print("| method | time [s] | time / scipy lsmr | normal residual | rel. error |")
        print("|---|---:|---:|---:|---:|")
        for name in METHODS:
            ne, err = accuracy(A, b, xs[name], x_ref)
            print(f"| {name} | {best[name]:.4f} | {best[name] / base:.2f} | {ne:.1e} | {err:.1e} |")
        res = tp.LSMR().solve(A_in, b)
        print(
            f"\nours: {res.stats['iterations']} iterations, {res.stats['matvecs']} products, "
            f"stop={res.stats['stop']!r}, certified={res.stats['certified']}\n"
        )


if __name__ == "__main__":
    main()
