"""The cases of ``bench_sven_step.py`` and the stage-by-stage breakdown of one Sven step.

Each stage is timed by running that part of :meth:`sven.Sven.step` on its own,
on the state the optimizer reaches after warm-up (so the route is the one it
chose), interleaved with an Adam step and a whole Sven step over rounds.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import sven
from sven import functional as SF
from sven.factorize import factorize
from sven.params import apply_direction, blocks_of_groups
from sven.tasks import make_toy1d, mlp, per_sample_mse


@dataclass(frozen=True)
class Case:
    """A model, a batch and Sven's rank for one row of the table."""

    name: str
    build: Callable[[], tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]
    rank: int
    rtol: float = 1e-3
    heavy: bool = False  # fewer steps per round


def _toy1d(B: int) -> Callable[[], tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    def build() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        data = make_toy1d()
        return mlp(seed=0), data.x_train[:B], data.y_train[:B]

    return build


def _digits() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    # the digits task's shapes (64 inputs, one-hot targets of 10 classes), on Gaussian inputs: the cost does not
    # depend on the values, and the benchmark needs no scikit-learn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (64,), generator=g), 10).float()
    return mlp(32, 3, seed=0, n_in=64, n_out=10), x, y


def _mlp10m() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 784, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (256,), generator=g), 10).float()
    return mlp(2048, 3, seed=0, n_in=784, n_out=10), x, y


def noisy_sines(B: int = 64, T: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T, 1)`` inputs and ``(B, T)`` next-value targets of sines with random frequency and phase, plus noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T + 1, dtype=torch.float32) * 0.2
    w = 0.5 + torch.rand(B, 1, generator=g)
    phi = 6.283 * torch.rand(B, 1, generator=g)
    s = torch.sin(w * t + phi) + 0.05 * torch.randn(B, T + 1, generator=g)
    return s[:, :T, None], s[:, 1:]


class SeqRegressor(torch.nn.Module):
    """A recurrent layer (batch first) and a linear head on every step: ``(B, T, d) -> (B, T)``."""

    def __init__(self, cell: type[torch.nn.Module] = torch.nn.GRU, hidden: int = 64, n_in: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = cell(n_in, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0]).squeeze(-1)


def _gru() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    # issue #20: next value of noisy sines, GRU(1, 64) + Linear(64, 1), sequence 50, batch 64
    x, y = noisy_sines()
    return SeqRegressor(torch.nn.GRU), x, y


CASES: dict[str, Case] = {
    "toy1d-B32": Case("toy1d-B32", _toy1d(32), rank=16),
    "toy1d-B128": Case("toy1d-B128", _toy1d(128), rank=64),
    "digits-B64": Case("digits-B64", _digits, rank=32, rtol=1e-4),
    "mlp10M-B256": Case("mlp10M-B256", _mlp10m, rank=128, heavy=True),
    "gru-B64": Case("gru-B64", _gru, rank=32),
}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(fns: dict[str, Callable[[], object]], *, rounds: int, per_round: int) -> dict[str, float]:
    """Median over ``rounds`` of the mean seconds per call, the functions interleaved (after a warm-up)."""
    for f in fns.values():
        for _ in range(3):
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            _sync()
            t0 = time.perf_counter()
            for _ in range(per_round):
                f()
            _sync()
            samples[name].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(v) for k, v in samples.items()}


def adam_stepper(model: torch.nn.Module, losses: Callable[[], torch.Tensor], lr: float = 1e-3) -> Callable[[], object]:
    """One Adam training step on ``model`` (zero_grad, the mean of ``losses()``, backward, step): the baseline."""
    adam = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> object:
        adam.zero_grad()
        loss = losses().mean()
        loss.backward()
        adam.step()
        return loss

    return step


def stage_functions(case: Case, device: str = "cpu") -> dict[str, Callable[[], object]]:
    """An Adam step, a Sven step, and each stage of a Sven step on its own (on ``device``)."""
    base, x, y = case.build()
    base, x, y = base.to(device), x.to(device), y.to(device)

    def loss_of(model: torch.nn.Module) -> torch.Tensor:
        return per_sample_mse(model(x), y)

    m_adam = copy.deepcopy(base)
    adam_step = adam_stepper(m_adam, lambda: loss_of(m_adam))

    m_sven = copy.deepcopy(base)
    opt = sven.Sven(m_sven.parameters(), lr=0.1, rank=case.rank, rtol=case.rtol, adaptive_damping=False)

    def sven_step() -> object:
        return opt.step(lambda: loss_of(m_sven))

    for _ in range(3):  # the route settles (auto decides after the first step)
        sven_step()
    m = copy.deepcopy(m_sven)
    params = list(m.parameters())
    blocks = blocks_of_groups([{"params": params, "lr": 0.0}])
    rows = opt.rows
    route = opt.route
    lin = route(lambda: loss_of(m), params, rows)
    R, M = rows.residualize(lin.rows, lin.jacobian)
    F = factorize(M, opt.solver, rank=case.rank, rtol=case.rtol, atol=0.0)
    d = SF.filtered_direction(F, R, damping=0.0)
    blocks_list = getattr(lin.jacobian, "_blocks", None)

    def fwd_bwd() -> object:
        return torch.autograd.grad(loss_of(m).sum(), params)

    def form_k() -> object:
        if blocks_list is None:  # the materialised route: K is formed inside the solver
            return None
        K = torch.zeros(R.shape[0], R.shape[0], dtype=torch.float64, device=R.device)
        for blk in blocks_list:
            K += blk.gram()
        return K

    def checks() -> object:
        return SF.all_finite(R) and SF.all_finite(M if isinstance(M, torch.Tensor) else M.gram)

    def apply() -> None:
        with torch.no_grad():
            apply_direction(blocks, d, 1.0)  # lr 0: the cost of the update without changing the model

    return {
        "adam step": adam_step,
        "sven step": sven_step,
        "forward+backward": fwd_bwd,
        "linearise (route)": lambda: route(lambda: loss_of(m), params, rows),
        "form K": form_k,
        "checks": checks,
        "factorise": lambda: factorize(M, opt.solver, rank=case.rank, rtol=case.rtol, atol=0.0),
        "direction": lambda: SF.filtered_direction(F, R, damping=0.0),
        "apply": apply,
        "_method": lambda: lin.method,
    }


def report_case(case: Case, *, threads: int, rounds: int, per_round: int, device: str = "cpu") -> dict[str, float]:
    """Print one case's ratio and stages; return the medians (seconds)."""
    fns = stage_functions(case, device)
    method = str(fns.pop("_method")())
    t = measure(fns, rounds=rounds, per_round=max(1, per_round // 10) if case.heavy else per_round)
    adam = t["adam step"]
    factors = max(t["linearise (route)"] - t["forward+backward"] - t["form K"], 0.0)
    where = f"{threads} thread(s)" if device == "cpu" else device
    print(f"\n{case.name}, {where}, route {method}: Sven/Adam = {t['sven step'] / adam:.2f}x")
    print(f"  {'adam step':24s} {adam * 1e3:9.3f} ms")
    print(f"  {'sven step':24s} {t['sven step'] * 1e3:9.3f} ms")
    parts = [
        ("forward+backward", t["forward+backward"]),
        ("layer factors (derived)", factors),
        ("form K", t["form K"]),
        ("checks", t["checks"]),
        ("factorise", t["factorise"]),
        ("direction", t["direction"]),
        ("apply", t["apply"]),
    ]
    for name, v in parts:
        print(f"    {name:22s} {v * 1e3:9.3f} ms  ({v / t['sven step']:5.1%})")
    return t
