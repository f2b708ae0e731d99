"""Threads for the benchmark files: chosen deliberately, the same for every peer, and reported.

Every benchmark in this folder runs on ``BENCH_THREADS`` intra-op threads
(default 1): torch's (``torch.set_num_threads``) and the BLAS/OpenMP pools that
NumPy and SciPy use (through ``threadpoolctl``, which scikit-learn brings with
the ``bench`` extra). On a busy 2-core machine, default threads made one
sparse ``tp.pinv`` 85x slower than on one thread and let the peers' times
swing with the load, so ratios between methods meant little. Set
``BENCH_THREADS=2`` (or more) to measure the threaded case; the count is
printed in pytest's header and stored in the JSON export's ``machine_info``
(``benchmarks/report.py`` prints it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch


def bench_threads() -> int:
    """``BENCH_THREADS`` as a positive integer (default 1)."""
    raw = os.environ.get("BENCH_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise pytest.UsageError(f"BENCH_THREADS must be a positive integer, got {raw!r}")
    return n


@contextlib.contextmanager
def limited_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads and ``n`` BLAS/OpenMP threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # only without the `bench` extra: torch's threads are still set
            yield
        else:
            with threadpool_limits(limits=n):
                yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _deliberate_threads() -> Iterator[None]:
    with limited_threads(bench_threads()):
        yield


def pytest_report_header(config: pytest.Config) -> str:
    return f"benchmarks: BENCH_THREADS={bench_threads()} (torch and BLAS threads per benchmark)"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    machine_info["bench_threads"] = bench_threads()
