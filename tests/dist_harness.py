"""Run a function on several local processes joined by a ``gloo`` process group (for tests).

Usage::

    from tests.dist_harness import requires_gloo, run_distributed

    def _check(rank: int, world_size: int, n: int) -> float:  # module level: it is pickled
        ...
        return value

    @requires_gloo
    def test_something() -> None:
        results = run_distributed(_check, world_size=2, args=(3,))  # [rank 0's value, rank 1's value]

Each worker is a fresh ``spawn`` process: it sets ``MASTER_ADDR``/``MASTER_PORT``
(a free localhost port), calls ``init_process_group(backend, rank, world_size)``,
runs ``fn(rank, world_size, *args)`` on one thread, and sends the return value
(serialised with :func:`torch.save`, so tensors are fine) or the traceback to
the parent. The parent raises if any rank failed, exited without a result, or
missed the ``timeout`` (hung collectives then fail the test instead of
blocking CI); stragglers are terminated. ``destroy_process_group`` always runs.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "gloo_available", "requires_gloo", "run_distributed"]


def gloo_available() -> bool:
    """Whether :mod:`torch.distributed` with the ``gloo`` backend is built in."""
    return bool(dist.is_available() and dist.is_gloo_available())


#: Skip marker for tests that spawn a gloo group.
requires_gloo = pytest.mark.skipif(
    not gloo_available(), reason="torch.distributed with the gloo backend is unavailable"
)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: tuple[Any, ...] = (),
    timeout: float = 60.0,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes and return the results by rank.

    Args:
        fn: a module-level (picklable) function; it runs after the process
            group is initialised and before it is destroyed.
        world_size: number of processes.
        args: extra picklable arguments.
        timeout: seconds for the whole run (and the process group's own timeout).
        backend: the :mod:`torch.distributed` backend.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        RuntimeError: a rank raised (its traceback is included), exited without
            a result, or the run exceeded ``timeout``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"`world_size` must be a positive integer, got {world_size!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    got: dict[int, tuple[bool, Any]] = {}
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                r, ok, payload = results.get(timeout=min(left, 0.5))
                got[r] = (ok, payload)
            except queue.Empty:
                missing = [r for r in range(world_size) if r not in got]
                if all(not procs[r].is_alive() for r in missing):  # died without a word (segfault, kill)
                    time.sleep(0.2)  # a last message may still be in flight
                    while True:
                        try:
                            r, ok, payload = results.get_nowait()
                            got[r] = (ok, payload)
                        except queue.Empty:
                            break
                    break
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        results.close()
    failures = [f"rank {r} raised:\n{payload}" for r, (ok, payload) in sorted(got.items()) if not ok]
    missing = [r for r in range(world_size) if r not in got]
    if failures or missing:
        detail = "\n".join(failures)
        if missing:
            codes = {r: procs[r].exitcode for r in missing}
            detail += f"\nno result from ranks {missing} within {timeout:g} s (exit codes {codes})"
        raise RuntimeError(f"distributed run of {getattr(fn, '__name__', fn)!r} failed:\n{detail}")
    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(world_size)]
