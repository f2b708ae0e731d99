"""Large batches on the Gram route: the Sven step against an Adam step, and the factorisation of ``K``.

Model: MLP 64-256-256-10 (tanh, 85k parameters), ``rank = min(B/2, 256)``,
``rtol = 1e-3``. For each batch size the script prints, in the same run:

* the Sven step with the default options (the Gram route, ``solver="auto"``:
  certified Lanczos on a large ``K`` when the rank is small, see
  :func:`truncpinv.pinv_from_gram`), the Sven step with the exact
  eigendecomposition of ``K`` forced (``solver=GramEigen()``, what every
  step did before), and an Adam step, with their ratios;
* the parts of the step: the linearisation (forward, backward, layer factors,
  forming ``K``) and the factorisation of ``K``;
* every way to factorise ``K`` (the exact float64 eigendecomposition, and the
  truncpinv solvers on ``K``), with the relative distance of its direction
  ``M^T c`` to the exact one and whether the solver certified its result;
* the microbatch alternative of the seed API (``microbatch_size``): a smaller
  ``K`` at the price of a different direction (its angle to the full-batch one).

    python benchmarks/bench_large_batch.py [--batches 64,256,1024,2048] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sven
import truncpinv as tp
from sven.linearize import LayerGram, RowSpec


def model_and_data(B: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 256),
            torch.nn.Tanh(),
            torch.nn.Linear(256, 256),
            torch.nn.Tanh(),
            torch.nn.Linear(256, 10),
        )
    x = torch.randn(B, 64, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (B,), generator=g), 10).float()
    return model, x, y


def loss_fn(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).sum(dim=-1)


def timed(f: Callable[[], object], repeats: int) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def direction(F: tp.TruncatedPinv, R: torch.Tensor) -> torch.Tensor:
    return F.solve(R.to(F.dtype), check_finite=False)  # type: ignore[no-any-return]


def run(B: int, repeats: int, *, solvers: bool = True) -> None:
    rank = min(B // 2, 256)
    model, x, y = model_and_data(B)
    adam_model, _, _ = model_and_data(B)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=rank, rtol=1e-3, adaptive_damping=False)
    exact_model, _, _ = model_and_data(B)
    opt_exact = sven.Sven(
        exact_model.parameters(),
        lr=0.1,
        rank=rank,
        rtol=1e-3,
        jacobian="gram",
        solver=tp.GramEigen(),
        adaptive_damping=False,
    )

    def adam_step() -> None:
        adam.zero_grad()
        loss_fn(adam_model(x), y).mean().backward()
        adam.step()

    def sven_step() -> None:
        opt.step(lambda: loss_fn(model(x), y))

    def exact_step() -> None:
        opt_exact.step(lambda: loss_fn(exact_model(x), y))

    t_adam, t_sven, t_exact = timed(adam_step, repeats), timed(sven_step, repeats), timed(exact_step, repeats)
    params = list(model.parameters())
    lg = LayerGram(verify=False)
    G = lg(lambda: loss_fn(model(x), y), params, rows=RowSpec())
    t_lin = timed(lambda: lg(lambda: loss_fn(model(x), y), params, rows=RowSpec()), repeats)
    R = G.output
    exact = tp.pinv_from_gram(G.gram, G, rank=rank, rtol=1e-3, check_finite=False, solver=tp.GramEigen())
    d_ref = direction(exact, R)
    default = tp.pinv_from_gram(G.gram, G, rank=rank, rtol=1e-3, check_finite=False)
    err = float((direction(default, R) - d_ref).norm() / d_ref.norm())
    print(
        f"\nB={B} rank={rank}: Sven step {t_sven * 1e3:.1f} ms ({t_sven / t_adam:.1f}x Adam; K factorised by "
        f"{default.stats['method']}, direction rel. err {err:.1e}); with the exact eigh forced "
        f"{t_exact * 1e3:.1f} ms ({t_exact / t_adam:.1f}x Adam); Adam {t_adam * 1e3:.1f} ms; "
        f"linearisation {t_lin * 1e3:.1f} ms; kept {exact.rank} values"
    )
    ways: dict[str, tp.Solver | None] = {"exact eigh (float64)": tp.GramEigen(), "default (auto)": None}
    if not solvers:
        return
    if 256 <= B <= 2048:  # (at 4096 the randomized solver alone takes minutes)
        ways.update({"RandomizedSVD on K": tp.RandomizedSVD(), "Lanczos on K": tp.Lanczos()})
    for name, solver in ways.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = timed(lambda solver=solver: tp.pinv_from_gram(G.gram, G, rank=rank, rtol=1e-3, check_finite=False,
                                                              solver=solver), repeats)  # fmt: skip
            F = tp.pinv_from_gram(G.gram, G, rank=rank, rtol=1e-3, check_finite=False, solver=solver)
        err = float((direction(F, R) - d_ref).norm() / d_ref.norm())
        flag = "uncertified (warned)" if caught else F.stats["method"]
        print(f"  factorise: {name:24s} {t * 1e3:9.1f} ms  direction rel. err {err:.1e}  {flag}")
    if B >= 256:
        mb = B // 256 * 2 if B > 256 else 2
        Bm = B // mb
        S = torch.zeros(Bm, B, dtype=torch.float64)
        S[torch.arange(B) // mb, torch.arange(B)] = 1.0 / mb
        M = sven.linearize.row_transform(G, S)
        t = timed(lambda: tp.pinv_from_gram(M.gram, M, rank=min(rank, Bm // 2), rtol=1e-3, check_finite=False),
                  repeats)  # fmt: skip
        Fm = tp.pinv_from_gram(M.gram, M, rank=min(rank, Bm // 2), rtol=1e-3, check_finite=False)
        dm = direction(Fm, (S @ R.double()).to(R.dtype))
        cos = float(dm.double() @ d_ref.double() / (dm.double().norm() * d_ref.double().norm()))
        print(
            f"  microbatch_size={mb} ({Bm} rows): factorise {t * 1e3:9.1f} ms, angle to the full-batch "
            f"direction {math.degrees(math.acos(max(-1.0, min(1.0, cos)))):.1f} deg"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,256,1024,2048,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps-only", action="store_true", help="only the steps, not each way to factorise K")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); MLP 64-256-256-10; median of "
        f"{args.repeats} repeats"
    )
    for B in (int(b) for b in args.batches.split(",")):
        run(B, args.repeats, solvers=not args.steps_only)


if __name__ == "__main__":
    main()
