"""Cost of one Sven step against one Adam step, whole and broken into its stages.

Cases (``--cases``): ``toy1d-B32`` and ``toy1d-B128`` (593 parameters, rank
``B/2``), ``digits-B64`` (MLP 64-32-32-32-10, 4,522 parameters, rank 32) and
``mlp10M-B256`` (MLP 784-2048-2048-2048-10, 10.0M parameters, rank 128) and
``gru-B64`` (GRU(1, 64) + Linear(64, 1) on sequences of 50, 12,929 parameters,
rank 32; ``benchmarks/bench_rnn.py`` adds its peak memory), each at
1 and 2 threads (``--threads``). For each case the script prints the ratio of
a Sven step (torch.optim API, default options) to an Adam step measured in
the same run, and the stages of the Sven step: forward+backward (what Adam
also pays), the layer factors, forming ``K``, the finiteness checks, the
factorisation, the direction and applying it::

    python benchmarks/bench_sven_step.py [--cases toy1d-B32,...] [--threads 1,2] [--rounds R]

The original single case (toy1d B=128: both APIs and the Jacobian methods) is
``--legacy``.

or with pytest-benchmark::

    pytest benchmarks/bench_sven_step.py --benchmark-only

Each measured "step" is the whole training step: Adam is zero_grad + forward
+ backward + ``step()``; Sven (torch.optim API) is ``opt.step(closure)``,
whose closure runs the forward; Sven (seed API) is
``wrapped.loss_and_grad(batch)`` + ``opt.step()``; ``sven_jacrev_svd`` is
the seed API configured like the original code (``torch.func.jacrev``
Jacobian, dense SVD), for reference. The methods are timed
interleaved, in rounds, and the per-step medians over rounds are compared,
so that background load hits all of them alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sven
import truncpinv
from sven.jacobian import PerSampleJacobian, autograd_jacobian, func_jacobian
from sven.nn import SvenWrapper
from sven.tasks import make_toy1d, mlp, per_sample_mse

#: the cases of ``main`` (defined in benchmarks/step_cases.py)
CASES = ("toy1d-B32", "toy1d-B128", "digits-B64", "mlp10M-B256", "gru-B64")

#: the legacy case
B = 128
RANK = 64
RTOL = 1e-3
LR = 0.1


def _setup() -> dict[str, Callable[[], object]]:
    data = make_toy1d()
    x, y = data.x_train[:B], data.y_train[:B]
    base = mlp(seed=0)

    m_adam = copy.deepcopy(base)
    adam = torch.optim.Adam(m_adam.parameters(), lr=1e-3)

    def adam_step() -> object:
        adam.zero_grad()
        loss = per_sample_mse(m_adam(x), y).mean()
        loss.backward()
        adam.step()
        return loss

    m_native = copy.deepcopy(base)
    native = sven.Sven(m_native.parameters(), lr=LR, rank=RANK, rtol=RTOL, adaptive_damping=False)

    def native_step() -> object:
        return native.step(lambda: per_sample_mse(m_native(x), y))

    wrapped = SvenWrapper(copy.deepcopy(base), per_sample_mse, "cpu")
    seed_opt = sven.opt.Sven(wrapped, lr=LR, k=RANK, rtol=RTOL)

    def seed_step() -> object:
        wrapped.loss_and_grad((x, y))
        seed_opt.step()
        return None

    # like the original code: torch.func.jacrev Jacobian, then a dense SVD
    wrapped_ref = SvenWrapper(copy.deepcopy(base), per_sample_mse, "cpu", jacobian="func")
    ref_opt = sven.opt.Sven(wrapped_ref, lr=LR, k=RANK, rtol=RTOL, svd_mode=truncpinv.DenseSVD())

    def reference_step() -> object:
        wrapped_ref.loss_and_grad((x, y))
        ref_opt.step()
        return None

    return {"adam": adam_step, "sven_native": native_step, "sven_seed": seed_step, "sven_jacrev_svd": reference_step}


def _jacobian_methods() -> dict[str, Callable[[], object]]:
    data = make_toy1d()
    x, y = data.x_train[:B], data.y_train[:B]
    model = mlp(seed=0)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    hooks = PerSampleJacobian("auto")

    def closure() -> torch.Tensor:
        return per_sample_mse(model(x), y)

    def h() -> object:
        return hooks(closure, params, rows=lambda t: t).jacobian

    def ag() -> object:
        return autograd_jacobian(closure(), params)

    def fj() -> object:
        return func_jacobian(model, names, lambda pred: per_sample_mse(pred, y), (x,))[1]

    detached = {n: p.detach() for n, p in model.named_parameters()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return per_sample_mse(torch.func.functional_call(model, p, (xi[None],)), yi[None]).sum()

    def vg() -> object:
        g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(detached, x, y)
        return torch.cat([g[n].reshape(B, -1) for n in names], dim=1)

    J = h()
    assert isinstance(J, torch.Tensor)
    for f in (ag, fj, vg):
        other = f()
        assert isinstance(other, torch.Tensor)
        torch.testing.assert_close(other, J, rtol=1e-4, atol=1e-6)
    R = per_sample_mse(model(x), y).detach()
    gram = truncpinv.GramEigen()

    def pinv_gram() -> object:
        return gram.factorize(J, rank=RANK, rtol=RTOL, check_finite=False).solve(R, check_finite=False)

    def pinv_full_svd() -> object:  # what the original "torch" mode did
        U, S, Vh = torch.linalg.svd(J, full_matrices=False)
        r = int((S[:RANK] > RTOL * S[0]).sum())
        return Vh[:r].T @ ((U[:, :r].T @ R) / S[:r])

    return {
        "jacobian: hooks (fast path)": h,
        "jacobian: autograd is_grads_batched": ag,
        "jacobian: torch.func jacrev": fj,
        "jacobian: torch.func vmap(grad) (per-sample only)": vg,
        "pinv: truncpinv GramEigen factorize+solve": pinv_gram,
        "pinv: full torch.linalg.svd + truncate": pinv_full_svd,
    }


def measure(fns: dict[str, Callable[[], object]], *, rounds: int, per_round: int) -> dict[str, float]:
    """Median over ``rounds`` of the mean time per call (seconds), the functions interleaved."""
    for f in fns.values():  # warm-up
        for _ in range(20):
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                f()
            samples[name].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(v) for k, v in samples.items()}


def legacy(args: argparse.Namespace) -> None:
    """The original report: toy1d B=128, both APIs, the Jacobian methods."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); toy1d B={B}, rank={RANK}, rtol={RTOL}")

    steps = measure(_setup(), rounds=args.rounds, per_round=args.per_round)
    adam = steps["adam"]
    print("\nwhole training step            ms/step   x Adam")
    for name, t in steps.items():
        print(f"  {name:28s} {t * 1e3:8.3f}  {t / adam:6.2f}")

    parts = measure(_jacobian_methods(), rounds=max(3, args.rounds // 3), per_round=max(5, args.per_round // 5))
    print("\ncomponents                                          ms")
    for name, t in parts.items():
        print(f"  {name:50s} {t * 1e3:8.3f}")
    print(
        f"\nratio Sven/Adam: torch.optim API {steps['sven_native'] / adam:.2f}x, "
        f"seed API {steps['sven_seed'] / adam:.2f}x (target <= 4x)"
    )


# --------------------------------------------------------------------------- pytest-benchmark
_STEPS: dict[str, Callable[[], object]] | None = None


def _steps() -> dict[str, Callable[[], object]]:
    global _STEPS
    if _STEPS is None:
        _STEPS = _setup()
    return _STEPS


@pytest.mark.benchmark(group="sven_step_toy1d_B128")
def test_adam_step(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(_steps()["adam"])


@pytest.mark.benchmark(group="sven_step_toy1d_B128")
def test_sven_step_torch_optim_api(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(_steps()["sven_native"])


@pytest.mark.benchmark(group="sven_step_toy1d_B128")
def test_sven_step_seed_api(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(_steps()["sven_seed"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=20, help="steps per round (the 10M case: a tenth)")
    ap.add_argument("--legacy", action="store_true", help="the original toy1d B=128 report")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on cuda the thread counts are ignored)")
    args = ap.parse_args(argv)
    if args.legacy:
        torch.set_num_threads(int(args.threads.split(",")[0]))
        args.per_round = max(args.per_round, 50)
        legacy(args)
        return
    from benchmarks.step_cases import CASES as cases
    from benchmarks.step_cases import report_case

    print(f"torch {torch.__version__}; median of {args.rounds} rounds, the functions interleaved")
    thread_counts = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [torch.get_num_threads()]
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for name in args.cases.split(","):
            report_case(cases[name], threads=threads, rounds=args.rounds, per_round=args.per_round, device=args.device)


if __name__ == "__main__":
    main()
