"""The Gram route against the materialised Jacobian: time to get ``K = J J^T`` and ``J^T c``.

Three ways to spend one training step's worth of autograd, per model and batch size:

* ``gram``: :class:`sven.gram.LayerGram` (one forward, one backward, ``K`` from the
  per-layer factors, in float64) and ``G.rmatmat(c)``;
* ``materialised``: :class:`sven.jacobian.PerSampleJacobian` ``("hooks")``, the
  ``(N, P)`` Jacobian, then ``K = J J^T`` accumulated in float64 as
  :class:`truncpinv.GramEigen` does, and ``J^T c``;
* ``adam``: a plain ``zero_grad`` + forward + backward + ``Adam.step()``.

Models: ``toy1d`` (MLP 1-16-16-16-1, GELU, 593 parameters) at B=32 and 128, and
an MLP 784-512-512-10 (GELU, 670k parameters) at B=256. ``TRUNCPINV_BENCH=full``
selects these sizes; the default (``smoke``) shrinks the large batch so that a
``--benchmark-disable`` run takes seconds.

Side-by-side ratios (the methods timed interleaved, medians over rounds)::

    python benchmarks/bench_gram.py [--threads N] [--rounds R]

or with pytest-benchmark::

    TRUNCPINV_BENCH=full pytest benchmarks/bench_gram.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sven.gram import GramJacobian, LayerGram
from sven.jacobian import PerSampleJacobian
from sven.tasks import make_toy1d, mlp, per_sample_mse
from truncpinv.solvers.gram_eigen import gram

FULL = os.environ.get("TRUNCPINV_BENCH", "smoke") == "full"
METHODS = ("gram", "materialised", "adam")


@dataclass(frozen=True)
class Case:
    """A model and a batch size."""

    model: str
    batch: int

    @property
    def id(self) -> str:
        return f"{self.model}-B{self.batch}"


def cases(full: bool = FULL) -> list[Case]:
    return [Case("toy1d", 32), Case("toy1d", 128), Case("mlp784", 256 if full else 16)]


@cache
def _problem(case: Case) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    if case.model == "toy1d":
        data = make_toy1d(n_train=case.batch, n_val=1)
        return mlp(seed=0), data.x_train, data.y_train
    g = torch.Generator().manual_seed(0)
    model = mlp(width=512, depth=2, seed=0, n_in=784, n_out=10)
    return model, torch.rand(case.batch, 784, generator=g), torch.randn(case.batch, 10, generator=g)


def methods(case: Case) -> dict[str, Callable[[], object]]:
    """The three ways, as zero-argument functions (each on its own copy of the model)."""
    model, x, y = _problem(case)
    params = list(model.parameters())
    c = torch.randn(case.batch, generator=torch.Generator().manual_seed(1))

    def closure() -> torch.Tensor:
        return per_sample_mse(model(x), y)

    layer_gram = LayerGram()
    hooks = PerSampleJacobian("hooks")

    def via_gram() -> object:
        G = layer_gram(closure, params, rows=lambda t: t)
        assert isinstance(G, GramJacobian)
        return G.gram, G.rmatmat(c)

    def materialised() -> object:
        J = hooks(closure, params, rows=lambda t: t).jacobian
        with torch.no_grad():
            return gram(J, accumulate=torch.float64, chunk_size=8192), J.T @ c

    adam = torch.optim.Adam(params, lr=0.0)  # lr 0: every round sees the same model

    def adam_step() -> object:
        adam.zero_grad()
        loss = closure().mean()
        loss.backward()
        adam.step()
        return loss

    return {"gram": via_gram, "materialised": materialised, "adam": adam_step}


def measure(fns: dict[str, Callable[[], object]], *, rounds: int, per_round: int) -> dict[str, float]:
    """Median over ``rounds`` of the mean time per call (seconds), the functions interleaved."""
    for f in fns.values():  # warm-up (and the Gram route's one-off verification)
        for _ in range(3):
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                f()
            samples[name].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(
        f"{'case':18s} {'gram ms':>9s} {'mat. ms':>9s} {'adam ms':>9s} {'gram/adam':>10s} {'mat./adam':>10s} "
        f"{'mat./gram':>10s}"
    )
    for case in cases(full=True):
        per_round = 20 if case.model == "toy1d" else 2
        t = measure(methods(case), rounds=args.rounds, per_round=per_round)
        g, m, a = t["gram"], t["materialised"], t["adam"]
        print(f"{case.id:18s} {g * 1e3:9.2f} {m * 1e3:9.2f} {a * 1e3:9.2f} {g / a:10.2f} {m / a:10.2f} {m / g:10.2f}")


# --------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_gram_agrees_with_the_materialised_jacobian(case: Case) -> None:
    fns = methods(case)
    out, ref = fns["gram"](), fns["materialised"]()
    assert isinstance(out, tuple) and isinstance(ref, tuple)
    (K, g), (K_ref, g_ref) = out, ref
    torch.testing.assert_close(K, K_ref, rtol=1e-4, atol=1e-6 * float(K_ref.abs().max()))
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
@pytest.mark.parametrize("method", METHODS)
def test_step_cost(benchmark, case: Case, method: str) -> None:  # type: ignore[no-untyped-def]
    model, _, _ = _problem(case)
    fn = methods(case)[method]
    benchmark.group = case.id
    benchmark.extra_info.update(
        method=method,
        batch=case.batch,
        params=sum(p.numel() for p in model.parameters()),
        threads=torch.get_num_threads(),
    )
    rounds = 3 if case.model == "mlp784" else 20
    # the warm-up round includes the Gram route's one-off verification of a new forward structure
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    main()
