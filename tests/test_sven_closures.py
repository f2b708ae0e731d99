"""Closures and contexts that Sven must accept: ``torch.no_grad()`` around the step, closures that
differentiate inside (physics-informed residuals, gradient penalties) under every step-control policy,
and the advice for an L-BFGS-style closure or a mistyped option."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import sven
from sven.tasks import mlp, per_sample_mse

#: Every step-control policy, by its keyword options.
POLICIES = {
    "plain": {},
    "damping": {"damping": 1e-3},
    "adaptive_damping": {"adaptive_damping": True},
    "check_step": {"check_step": True},
    "variable_k": {"variable_k": True},
    "trust_radius": {"trust_radius": 0.5},
}
ROUTES = ("auto", "gram", "hooks", "autograd", "matfree")


def _data(b: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.sin(3 * x)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def _poisson(model: nn.Module, n: int = 32) -> Callable[[], torch.Tensor]:
    """1-D Poisson residuals ``u'' + f`` with ``f = pi^2 sin(pi x)``: two input derivatives, ``create_graph=True``."""
    x = torch.linspace(-1, 1, n, dtype=torch.float64)[:, None]
    f = math.pi**2 * torch.sin(math.pi * x)

    def closure() -> torch.Tensor:
        xx = x.clone().requires_grad_(True)
        u = model(xx)
        (du,) = torch.autograd.grad(u.sum(), xx, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), xx, create_graph=True)
        return ((d2u + f) ** 2).sum(dim=-1)

    return closure


def _penalty(model: nn.Module) -> Callable[[], torch.Tensor]:
    """Squared error plus a per-sample input-gradient penalty ``0.1 |du/dx|^2``."""
    x, y = _data()

    def closure() -> torch.Tensor:
        xx = x.clone().requires_grad_(True)
        u = model(xx)
        (du,) = torch.autograd.grad(u.sum(), xx, create_graph=True)
        return ((u - y) ** 2).sum(dim=-1) + 0.1 * (du**2).sum(dim=-1)

    return closure


def _mean(closure: Callable[[], torch.Tensor]) -> float:
    return float(closure().detach().mean())


# --------------------------------------------------------------------------- no_grad
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_step_works_inside_no_grad(route: str, policy: str) -> None:
    x, y = _data()
    model = _net(1)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=4, jacobian=route, **POLICIES[policy])  # type: ignore[arg-type]
    closure = lambda: per_sample_mse(model(x), y)  # noqa: E731
    before = _mean(closure)
    with torch.no_grad():
        for _ in range(3):
            opt.step(closure)
    assert opt.skipped_steps == 0
    assert _mean(closure) < before
    assert all(p.requires_grad for p in model.parameters())


def test_step_inside_inference_mode_says_so() -> None:
    """``torch.inference_mode()`` turns autograd off even for ``enable_grad``: the error names it (not the closure),
    and the parameters are untouched."""
    x, y = _data()
    model = _net(1)
    opt = sven.Sven(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inside torch\.inference_mode\(\)"):
        opt.step(lambda: per_sample_mse(model(x), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_rmsprop_on_the_jacobian_works_inside_no_grad() -> None:
    x, y = _data()
    model = _net(2)
    opt = sven.Sven(model.parameters(), lr=0.2, rank=8, rmsprop=True)
    closure = lambda: per_sample_mse(model(x), y)  # noqa: E731
    before = _mean(closure)
    with torch.no_grad():
        for _ in range(3):
            opt.step(closure)
    assert _mean(closure) < before and opt.last_step is not None and opt.last_step.jacobian_method != "gram"


# --------------------------------------------------------------------------- closures that differentiate
@pytest.mark.parametrize("kind", ["poisson", "penalty"])
@pytest.mark.parametrize("route", ["autograd", "matfree"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_closures_that_differentiate_inside_work_under_every_policy(kind: str, route: str, policy: str) -> None:
    model = _net(3)
    closure = _poisson(model) if kind == "poisson" else _penalty(model)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=4, jacobian=route, **POLICIES[policy])  # type: ignore[arg-type]
    before = _mean(closure)
    for _ in range(3):
        opt.step(closure)
    assert opt.skipped_steps == 0
    assert _mean(closure) < before
    assert all(p.requires_grad for p in model.parameters())


def test_a_pinn_closure_under_no_grad_and_adaptive_damping_on_the_auto_route() -> None:
    """The Gram route's verification sees the input derivatives and falls back to the exact Jacobian once."""
    model = _net(4)
    closure = _poisson(model)
    opt = sven.Sven(model.parameters(), lr=1.0, rank=16, adaptive_damping=True)
    before = _mean(closure)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sven: the Gram route does not apply")
        with torch.no_grad():
            for _ in range(5):
                opt.step(closure)
    assert _mean(closure) < 0.5 * before


def test_the_re_evaluation_builds_no_graph_for_the_parameters_and_restores_requires_grad() -> None:
    x, y = _data()
    model = _net(5)
    frozen = nn.Parameter(torch.ones(1, dtype=torch.float64), requires_grad=False)
    seen: list[tuple[bool, bool]] = []

    def closure() -> torch.Tensor:
        out = per_sample_mse(model(x) * frozen, y)
        seen.append((torch.is_grad_enabled(), out.requires_grad))
        return out

    opt = sven.Sven(model.parameters(), lr=0.1, rank=8, jacobian="autograd", check_step=True)
    with torch.no_grad():
        opt.step(closure)
    assert seen == [(True, True), (True, False)]  # the linearisation, then the check without a graph
    assert all(p.requires_grad for p in model.parameters()) and not frozen.requires_grad

    def failing() -> torch.Tensor:
        if len(seen) > 2:
            raise KeyError("boom")
        return closure()

    with pytest.raises(KeyError, match="boom"):
        opt.step(failing)
    assert all(p.requires_grad for p in model.parameters())  # put back in a finally


# --------------------------------------------------------------------------- migration traps
def test_a_closure_that_calls_backward_gets_advice() -> None:
    x, y = _data()
    model = _net(6)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=8)

    def lbfgs_style() -> torch.Tensor:
        opt.zero_grad()
        losses = per_sample_mse(model(x), y)
        losses.mean().backward()
        return losses

    for route in ROUTES:
        opt = sven.Sven(model.parameters(), lr=0.1, rank=8, jacobian=route)
        with pytest.raises(RuntimeError, match=r"Sven differentiates the closure's output itself: .*must not call "
                           r"backward\(\).*return the per-sample losses"):  # fmt: skip
            opt.step(lbfgs_style)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rnak": 4}, r"unknown option `rnak`; did you mean `rank`\?"),
        ({"weight_decya": 0.1}, r"unknown option `weight_decya`; did you mean `weight_decay`\?"),
        ({"use_rmsprop": True}, r"unknown option `use_rmsprop`; did you mean `rmsprop`\? \(`use_rmsprop` is its"),
        ({"betas": (0.9, 0.99)}, r"unknown option `betas`; the options are adaptive_damping, atol"),
    ],
)
def test_unknown_options_are_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        sven.Sven(mlp(width=2, depth=1).parameters(), lr=0.1, **options)


# --------------------------------------------------------------------------- NumPy scalars
def test_numpy_scalars_are_accepted_and_bools_are_not() -> None:
    params = list(mlp(width=2, depth=1).parameters())
    opt = sven.Sven(
        params,
        lr=np.float32(0.1),
        rank=np.int64(4),
        rtol=np.float64(1e-3),
        kappa=np.float32(2.0),
        momentum=np.float32(0.5),
        weight_decay=np.float64(1e-4),
        nesterov=np.bool_(True),
        trust_radius=np.float32(1.0),
        max_retries=np.int32(2),
        seed=np.int64(3),
        chunk_size=np.int16(8),
        rmsprop=np.bool_(False),
    )
    assert opt.rank == 4 and type(opt.rank) is int and type(opt.seed) is int
    assert type(opt.param_groups[0]["lr"]) is float and opt.param_groups[0]["nesterov"] is True
    for bad in ({"rank": True}, {"lr": True}, {"momentum": np.bool_(False)}, {"seed": False}, {"max_retries": True}):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}` must be"):
            sven.Sven(params, **{"lr": 0.1, **bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`rmsprop` must be True or False, got 1"):
        sven.Sven(params, lr=0.1, rmsprop=1)
