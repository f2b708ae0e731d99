"""Damping and step rejection, fault injection, and exact checkpoint/resume (issue 6).

Every expectation is derived from the mathematics (a dense float64 SVD, the
linear model of a linear least-squares problem) or from bit-identity with
a run that was not interrupted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sven
import truncpinv as tp
from sven import functional as SF
from sven.jacobian import JacobianResult
from sven.tasks import mlp, per_sample_mse

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int = 16, d_in: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d_in, generator=g) * 2 - 1
    y = torch.sin(3 * x.sum(dim=1, keepdim=True))
    return x, y


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- the spectral filter
@given(
    s=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=8),
    damping=st.floats(0.0, 10.0),
)
def test_filter_factors_shrink_the_inverse_and_keep_its_order(s: list[float], damping: float) -> None:
    S = torch.tensor(sorted(s, reverse=True), dtype=torch.float64)
    phi = SF.filter_factors(S, damping=damping)
    inv = 1.0 / S
    assert bool((phi <= inv * (1 + 1e-12)).all())
    lam = damping * float(S[0]) ** 2
    assert torch.allclose(phi, S / (S * S + lam), rtol=1e-12)
    if damping == 0.0:
        assert torch.allclose(phi, inv, rtol=1e-15)


def test_filtered_direction_matches_the_dense_svd_formula() -> None:
    g = torch.Generator().manual_seed(1)
    M = torch.randn(12, 30, generator=g, dtype=torch.float64)
    R = torch.randn(12, generator=g, dtype=torch.float64)
    F = tp.pinv(M, rank=8, rtol=1e-3, solver="svd")
    U, S, Vh = np.linalg.svd(M.numpy(), full_matrices=False)
    for damping in (0.0, 1e-3, 0.1, 5.0):
        lam = damping * S[0] ** 2
        phi = S[:8] / (S[:8] ** 2 + lam)
        expected = Vh[:8].T @ (phi * (U[:, :8].T @ R.numpy()))
        got = SF.filtered_direction(F, R, damping=damping).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("c", [1e-6, 3e-2, 7.0, 1e5])
def test_damped_direction_is_scale_invariant(c: float) -> None:
    """``M -> cM`` scales every singular value by ``c``: with relative damping the step scales by ``1/c``."""
    g = torch.Generator().manual_seed(2)
    M = torch.randn(10, 25, generator=g, dtype=torch.float64)
    R = torch.randn(10, generator=g, dtype=torch.float64)
    d1 = SF.filtered_direction(tp.pinv(M, rank=6, rtol=1e-6), R, damping=0.05)
    dc = SF.filtered_direction(tp.pinv(c * M, rank=6, rtol=1e-6), R, damping=0.05)
    torch.testing.assert_close(dc * c, d1, rtol=1e-9, atol=1e-12)


def test_madsen_nielsen_rule() -> None:
    st_ = SF.DampingState(lam=1e-2)
    assert SF.madsen_nielsen_update(st_, 1.0)  # perfect model: shrink by 3
    assert st_.lam == pytest.approx(1e-2 / 3) and st_.nu == 2.0
    st_ = SF.DampingState(lam=1e-2)
    assert SF.madsen_nielsen_update(st_, 0.5)  # 1 - (2*0.5 - 1)^3 = 1: unchanged
    assert st_.lam == pytest.approx(1e-2)
    st_ = SF.DampingState(lam=1e-2)
    assert not SF.madsen_nielsen_update(st_, -0.3)  # rejected: grow by nu, nu doubles
    assert st_.lam == pytest.approx(2e-2) and st_.nu == 4.0
    assert not SF.madsen_nielsen_update(st_, float("-inf"))
    assert st_.lam == pytest.approx(8e-2) and st_.nu == 8.0


def test_gain_ratio_of_a_linear_model_is_one() -> None:
    """For residuals linear in the parameters the linear model is exact: rho = 1."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 8, generator=g, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    opt = sven.Sven(
        [w], lr=0.7, rank=5, rtol=1e-8, residuals=True, adaptive_damping=True, damping=0.01, jacobian="autograd"
    )
    for _ in range(3):
        opt.step(lambda: X @ w - y)
        info = opt.last_step
        assert info is not None and info.gain_ratio is not None
        assert info.gain_ratio == pytest.approx(1.0, rel=1e-8)
        assert info.retries == 0 and not info.rejected
    assert opt.state_dict()["sven"]["damping"] < 0.01  # three perfect steps shrink lambda


# --------------------------------------------------------------------------- rejection
@dataclass(frozen=True)
class CountingSVD(tp.DenseSVD):
    """A solver that counts its factorisations (a class attribute, the dataclass is frozen)."""

    calls: ClassVar[list[int]] = [0]

    def _compute(self, A, tol):  # type: ignore[no-untyped-def]
        CountingSVD.calls[0] += 1
        return super()._compute(A, tol)


def test_a_rejected_step_refilters_the_cached_factorisation() -> None:
    torch.manual_seed(0)
    model = mlp(width=8, depth=2, seed=4)
    x, y = _data(32)
    evals = [0]

    def closure() -> torch.Tensor:
        evals[0] += 1
        return per_sample_mse(model(x), y)

    CountingSVD.calls[0] = 0
    # a huge learning rate overshoots: the first tries are rejected until lambda is large
    opt = sven.Sven(model.parameters(), lr=50.0, rank=16, adaptive_damping=True, max_retries=8, solver=CountingSVD())
    opt.step(closure)
    info = opt.last_step
    assert info is not None
    assert CountingSVD.calls[0] == 1  # one factorisation, whatever the number of tries
    assert info.retries >= 1 and opt.rejected_steps == info.retries
    assert evals[0] == 1 + info.retries + 1  # the Jacobian pass, then one forward per try
    assert not info.rejected and info.gain_ratio is not None and info.gain_ratio > 0
    after = float(per_sample_mse(model(x), y).detach().mean())
    assert after == after and info.damping > 1e-3  # finite, and damped


def test_when_every_try_is_rejected_the_parameters_are_bit_identical() -> None:
    model = mlp(width=8, depth=2, seed=5)
    x, y = _data(16)
    p0 = _params(model)
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        out = per_sample_mse(model(x), y)
        return out if calls[0] == 1 else out + 1e6  # every re-evaluation looks worse

    opt = sven.Sven(model.parameters(), lr=0.1, rank=8, adaptive_damping=True, max_retries=2)
    opt.step(closure)
    info = opt.last_step
    assert info is not None and info.rejected and info.retries == 3
    assert _identical(p0, _params(model))
    assert opt.rejected_steps == 3


def test_trust_radius_caps_the_step_norm() -> None:
    model = mlp(width=8, depth=2, seed=6)
    x, y = _data(16)
    p0 = torch.cat([p.reshape(-1) for p in _params(model)])
    opt = sven.Sven(model.parameters(), lr=1.0, rank=8, trust_radius=1e-3)
    opt.step(lambda: per_sample_mse(model(x), y))
    p1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    info = opt.last_step
    assert info is not None and info.capped
    assert float((p1 - p0).norm()) == pytest.approx(1e-3, rel=1e-4)
    assert info.step_norm == pytest.approx(1e-3, rel=1e-4)


def test_fixed_damping_changes_the_step_as_the_filter_says() -> None:
    g = torch.Generator().manual_seed(7)
    X = torch.randn(10, 6, generator=g, dtype=torch.float64)
    y = torch.randn(10, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = sven.Sven([w], lr=1.0, rank=None, rtol=1e-10, residuals=True, damping=0.2, jacobian="autograd")
    opt.step(lambda: X @ w - y)
    U, S, Vh = np.linalg.svd(X.numpy(), full_matrices=False)
    phi = S / (S**2 + 0.2 * S[0] ** 2)
    expected = -(Vh.T @ (phi * (U.T @ (-y.numpy()))))
    np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-9)


def test_option_errors() -> None:
    w = nn.Parameter(torch.zeros(3))
    for kwargs, msg in [
        ({"damping": -1.0}, "`damping` must be a non-negative float, got -1.0"),
        ({"max_retries": -1}, "`max_retries` must be a non-negative integer, got -1"),
        ({"trust_radius": 0.0}, "`trust_radius` must be a positive float, got 0.0"),
        ({"check_step": 1}, "`check_step` must be True or False, got 1"),
        ({"seed": -2}, "`seed` must be a non-negative integer, got -2"),
        ({"adaptive_damping": True, "variable_k": True}, "cannot be combined with `variable_k=True`"),
    ]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            sven.Sven([w], **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- faults
def test_a_loss_that_turns_nan_on_step_three_is_skipped() -> None:
    model = mlp(width=8, depth=2, seed=8)
    x, y = _data(16)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=8)
    step = [0]

    def closure() -> torch.Tensor:
        out = per_sample_mse(model(x), y)
        return out * float("nan") if step[0] == 3 else out

    for step[0] in range(1, 6):
        before = _params(model)
        if step[0] == 3:
            with pytest.warns(RuntimeWarning, match="Sven step skipped"):
                opt.step(closure)
            assert _identical(before, _params(model))
        else:
            opt.step(closure)
            assert not _identical(before, _params(model))
    assert opt.state_dict()["sven"]["skipped_steps"] == 1 and opt.state_dict()["sven"]["steps"] == 5
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass(frozen=True)
class FailingSolver(tp.DenseSVD):
    def _compute(self, A, tol):  # type: ignore[no-untyped-def]
        raise tp.SolverError("injected breakdown")


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_a_solver_that_raises_skips_the_step(mode: str) -> None:
    model = mlp(width=8, depth=2, seed=9)
    x, y = _data(16)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=8, solver=FailingSolver(), on_nonfinite=mode)
    before = _params(model)
    if mode == "skip":
        with pytest.warns(RuntimeWarning, match="the solver failed .*injected breakdown"):
            opt.step(lambda: per_sample_mse(model(x), y))
        assert opt.skipped_steps == 1
    else:
        with pytest.raises(FloatingPointError, match="injected breakdown"):
            opt.step(lambda: per_sample_mse(model(x), y))
    assert _identical(before, _params(model))


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("solver", ["auto", "svd", "gram", "randomized"])
def test_a_jacobian_row_of_inf_skips_the_step(value: float, solver: str) -> None:
    model = mlp(width=8, depth=2, seed=10)
    x, y = _data(16)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=8, solver=solver, jacobian="hooks")
    real = opt.route.dense.per_sample

    def poisoned(closure, params, *, rows):  # type: ignore[no-untyped-def]
        res = real(closure, params, rows=rows)
        J = res.jacobian.clone()
        J[3] = value
        return JacobianResult(res.output, J, res.method)

    opt.route.dense.per_sample = poisoned  # type: ignore[assignment]
    before = _params(model)
    with pytest.warns(RuntimeWarning, match="Sven step skipped"):
        opt.step(lambda: per_sample_mse(model(x), y))
    assert _identical(before, _params(model)) and opt.skipped_steps == 1


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_nonfinite_gram_route_skips_the_step(value: float) -> None:
    """On the Gram route a non-finite Jacobian row shows up in ``K``: same outcome."""
    model = mlp(width=8, depth=2, seed=10)
    x, y = _data(16)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=8, jacobian="gram")
    real = opt.route.gram.layer_gram

    def poisoned(closure, params, *, rows):  # type: ignore[no-untyped-def]
        G = real(closure, params, rows=rows)
        G.gram[3] = value
        G.gram[:, 3] = value
        return G

    opt.route.gram.layer_gram = poisoned  # type: ignore[assignment]
    before = _params(model)
    with pytest.warns(RuntimeWarning, match="NaN or Inf in the Jacobian"):
        opt.step(lambda: per_sample_mse(model(x), y))
    assert _identical(before, _params(model)) and opt.skipped_steps == 1


def test_check_step_undoes_a_step_that_makes_the_loss_nonfinite() -> None:
    model = mlp(width=8, depth=2, seed=11)
    x, y = _data(16)
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        out = per_sample_mse(model(x), y)
        return out if calls[0] == 1 else out + float("inf")

    opt = sven.Sven(model.parameters(), lr=0.1, rank=8, check_step=True)
    before = _params(model)
    with pytest.warns(RuntimeWarning, match="NaN or Inf in the loss after the step"):
        opt.step(closure)
    assert _identical(before, _params(model))
    assert opt.skipped_steps == 1 and calls[0] == 2
    opt2 = sven.Sven(model.parameters(), lr=0.1, rank=8, check_step=True, on_nonfinite="raise")
    calls[0] = 0
    with pytest.raises(FloatingPointError):
        opt2.step(closure)
    assert _identical(before, _params(model))


def test_adaptive_damping_rejects_a_nonfinite_loss_and_recovers() -> None:
    model = mlp(width=8, depth=2, seed=12)
    x, y = _data(16)
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        out = per_sample_mse(model(x), y)
        return out + float("nan") if calls[0] == 2 else out  # only the first try sees NaN

    opt = sven.Sven(model.parameters(), lr=0.1, rank=8, adaptive_damping=True)
    opt.step(closure)
    info = opt.last_step
    assert info is not None and info.retries == 1 and not info.rejected
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --------------------------------------------------------------------------- seeds
def test_randomized_solvers_get_a_reproducible_seed_per_step() -> None:
    w = nn.Parameter(torch.zeros(3))
    opt = sven.Sven([w], solver=tp.RandomizedSVD(), seed=5)
    s1 = opt._solver_for_step()
    opt._counters["steps"] += 1
    s2 = opt._solver_for_step()
    assert isinstance(s1, tp.RandomizedSVD) and isinstance(s2, tp.RandomizedSVD)
    assert s1.seed == 5 and s2.seed == 6
    assert sven.Sven([w], solver="svd")._solver_for_step() == tp.DenseSVD()


# --------------------------------------------------------------------------- checkpoint / resume
_RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_sven_robustness import resume_scenario
    resume_scenario({mode!r}, {ckpt!r}, {out!r}, phase={phase!r})
    """
)


def _batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _data(32, seed=100 + step)


def resume_scenario(mode: str, ckpt: str, out: str, *, phase: str) -> None:
    """Train steps 0-9, save, train 10-19 (``phase="first"``); or load and train 10-19 (``"resume"``).

    ``mode="native"`` uses :class:`sven.Sven` with RMSProp, adaptive damping
    and a randomized solver; ``mode="seed"`` the seed API with a random
    ``param_fraction`` and RMSProp. The final parameters go to ``out``.
    """
    torch.set_num_threads(1)
    if mode == "native":
        model = mlp(width=8, depth=2, seed=13)
        opt: torch.optim.Optimizer = sven.Sven(
            model.parameters(),
            lr=0.3,
            rank=12,
            solver=tp.RandomizedSVD(power_iters=1),
            rmsprop=True,
            adaptive_damping=True,
        )

        def train(step: int) -> None:
            x, y = _batches(step)
            opt.step(lambda: per_sample_mse(model(x), y))

        def save() -> None:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, ckpt)

        def load() -> None:
            sd = torch.load(ckpt, weights_only=False)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["opt"])

        params = lambda: [p.detach() for p in model.parameters()]  # noqa: E731
    else:
        from sven.nn import SvenWrapper
        from sven.opt import Sven as SeedSven

        wrapped = SvenWrapper(mlp(width=8, depth=2, seed=14), per_sample_mse, "cpu", param_fraction=0.5, seed=3)
        sopt = SeedSven(wrapped, 0.2, 8, 1e-3, use_rmsprop=True, rmsprop_post=True)

        def train(step: int) -> None:
            wrapped.loss_and_grad(_batches(step))
            sopt.step()

        def save() -> None:
            torch.save({"wrapped": wrapped.state_dict(), "opt": sopt.state_dict()}, ckpt)

        def load() -> None:
            sd = torch.load(ckpt, weights_only=False)
            wrapped.load_state_dict(sd["wrapped"])
            sopt.load_state_dict(sd["opt"])

        params = lambda: [wrapped.params.detach()]  # noqa: E731

    if phase == "first":
        for step in range(10):
            train(step)
        save()
    else:
        load()
    for step in range(10, 20):
        train(step)
    torch.save([p.clone() for p in params()], out)


@pytest.mark.parametrize("mode", ["native", "seed"])
def test_resume_in_a_fresh_process_is_bit_identical(mode: str, tmp_path: Path) -> None:
    ckpt, straight, resumed = (str(tmp_path / n) for n in ("ckpt.pt", "straight.pt", "resumed.pt"))
    resume_scenario(mode, ckpt, straight, phase="first")
    script = _RESUME_SCRIPT.format(root=str(ROOT), mode=mode, ckpt=ckpt, out=resumed, phase="resume")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    a, b = torch.load(straight), torch.load(resumed)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
