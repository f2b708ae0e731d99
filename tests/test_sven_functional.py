"""The Sven maths (``sven.functional``) against closed forms derived by hand or by NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sven
import sven.functional as SF
import truncpinv

EXACT = truncpinv.GramEigen()


def _lstsq_problem(b: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, p, generator=g, dtype=torch.float64)
    y = torch.randn(b, generator=g, dtype=torch.float64)
    w0 = torch.randn(p, generator=g, dtype=torch.float64)
    return X, y, w0


def _reference_step(X: torch.Tensor, y: torch.Tensor, w0: torch.Tensor) -> np.ndarray:
    """w1 = w0 + argmin-norm_d ||X d - (y - X w0)||, by numpy.linalg.lstsq."""
    Xn, yn, wn = X.numpy(), y.numpy(), w0.numpy()
    d, *_ = np.linalg.lstsq(Xn, yn - Xn @ wn, rcond=None)
    return wn + d


# --------------------------------------------------------------------------- least squares
@pytest.mark.parametrize("shape", [(20, 50), (50, 8), (16, 16)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("mode", ["residuals", "kappa1", "functional"])
def test_one_step_lands_on_min_norm_least_squares_solution(shape: tuple[int, int], mode: str) -> None:
    """With lr=1 and nothing truncated, one step on pred = X w solves the least-squares problem.

    Residual mode: R = Xw - y, M = X, so delta = -pinv(X)(Xw0 - y).
    kappa=1 with loss (pred - y)^2: R = |r|, M = diag(s) X with s = sign(r);
    pinv(diag(s) X) = pinv(X) diag(s) (diag(s) is orthogonal and s^2 = 1), so
    pinv(M) R = pinv(X) diag(s) |r| = pinv(X) r: the same step, the sign cancels.
    """
    b, p = shape
    X, y, w0 = _lstsq_problem(b, p, seed=b * 100 + p)
    expected = _reference_step(X, y, w0)
    if mode == "functional":
        step = SF.sven_update(X, X @ w0 - y, lr=1.0, rank=None, rtol=1e-12, solver=EXACT)
        w1 = (w0 + step).numpy()
    else:
        w = torch.nn.Parameter(w0.clone())
        if mode == "residuals":
            opt = sven.Sven([w], lr=1.0, rtol=1e-12, residuals=True, solver=EXACT, adaptive_damping=False)
            opt.step(lambda: X @ w - y)
        else:
            opt = sven.Sven([w], lr=1.0, rtol=1e-12, kappa=1.0, solver=EXACT, adaptive_damping=False)
            opt.step(lambda: (X @ w - y) ** 2)
        w1 = w.detach().numpy()
    np.testing.assert_allclose(w1, expected, rtol=0, atol=1e-6)
    if b <= p:  # interpolation: every residual is zero
        np.testing.assert_allclose(X.numpy() @ w1, y.numpy(), atol=1e-6)


def test_least_squares_with_an_nn_linear_model_uses_the_fast_path() -> None:
    X, y, w0 = _lstsq_problem(12, 30, seed=3)
    lin = torch.nn.Linear(30, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w0[None])
    opt = sven.Sven(lin.parameters(), lr=1.0, rtol=1e-12, residuals=True, solver=EXACT, adaptive_damping=False)
    opt.step(lambda: lin(X)[:, 0] - y)
    assert opt.last_step is not None and opt.last_step.jacobian_method == "hooks"
    np.testing.assert_allclose(lin.weight.detach().numpy()[0], _reference_step(X, y, w0), atol=1e-6)


# --------------------------------------------------------------------------- a problem solved on paper
def _two_param_losses(theta: torch.Tensor) -> torch.Tensor:
    r"""l_1 = (t1 - 1)^2, l_2 = (t1 + t2 - 3)^2; minimised at t = (1, 2)."""
    return torch.stack([(theta[0] - 1) ** 2, (theta[0] + theta[1] - 3) ** 2])


@pytest.mark.parametrize(
    ("kappa", "expected"),
    [
        # kappa = 2: R = l = (1, 9) at t = (0, 0); M = dl/dt = [[-2, 0], [-6, -6]].
        # M^{-1} = (1/12) [[-6, 0], [6, -2]], so M^{-1} R = (1/12)(-6, 6 - 18) = (-0.5, -1)
        # and delta = -M^{-1} R = (0.5, 1): Newton on each residual, l_1 linearised
        # 1 - 2 d1 = 0 (d1 = 0.5), l_2 linearised 9 - 6 (d1 + d2) = 0 (d2 = 1).
        (2.0, (0.5, 1.0)),
        # kappa = 1: R = sqrt(l) = (|t1 - 1|, |t1 + t2 - 3|) = (1, 3); M = [[-1, 0], [-1, -1]].
        # M x = R gives x1 = -1, x2 = -2, so delta = (1, 2): the residuals are linear
        # (up to sign) and Gauss-Newton solves them in one step, t = (1, 2).
        (1.0, (1.0, 2.0)),
    ],
)
def test_two_parameter_problem_derived_on_paper(kappa: float, expected: tuple[float, float]) -> None:
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = sven.Sven([theta], lr=1.0, rtol=1e-12, kappa=kappa, solver=EXACT, adaptive_damping=False)
    opt.step(lambda: _two_param_losses(theta))
    torch.testing.assert_close(theta.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_two_parameter_problem_rank_one_truncation() -> None:
    """l_1 = (2 t1 - 2)^2, l_2 = (t2 - 1)^2, kappa = 1 at t = 0: R = (2, 1), M = diag(-2, -1).

    M = U S V^T with S = diag(2, 1), U = I, V = -I. Keeping one singular value
    (rank=1, or rtol=0.6 since 1 <= 0.6 * 2): M_1^+ R = v1 (u1^T R) / s1 = -e1 * 2 / 2,
    so delta = -M_1^+ R = (1, 0). Keeping both: M^{-1} R = (-1, -1), delta = (1, 1).
    """
    for kwargs, expected in (({"rank": 1}, (1.0, 0.0)), ({"rtol": 0.6}, (1.0, 0.0)), ({}, (1.0, 1.0))):
        theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        opts = {"rtol": 1e-12, **kwargs}
        opt = sven.Sven([theta], lr=1.0, kappa=1.0, solver=EXACT, adaptive_damping=False, **opts)
        opt.step(lambda theta=theta: torch.stack([(2 * theta[0] - 2) ** 2, (theta[1] - 1) ** 2]))
        torch.testing.assert_close(theta.detach(), torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
        assert opt.last_step is not None and opt.last_step.rank == (1 if kwargs else 2)


# --------------------------------------------------------------------------- kappa
@pytest.mark.parametrize("kappa", [0.5, 1.0, 1.5, 3.0])
def test_residual_jacobian_is_the_chain_rule(kappa: float) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    X = torch.randn(7, 5, dtype=torch.float64, generator=g)
    losses = (X @ w) ** 2 + 0.1
    J = torch.stack([torch.autograd.grad(losses[i], w, retain_graph=True)[0] for i in range(7)])
    R, M = SF.residual_jacobian(losses.detach(), J, kappa=kappa)
    direct = losses ** (kappa / 2)
    M_ref = torch.stack([torch.autograd.grad(direct[i], w, retain_graph=True)[0] for i in range(7)])
    torch.testing.assert_close(R, direct.detach())
    torch.testing.assert_close(M, M_ref)


def test_kappa_below_two_gives_zero_rows_for_zero_losses() -> None:
    losses = torch.tensor([0.0, 4.0], dtype=torch.float64)
    J = torch.tensor([[0.0, 0.0], [4.0, 2.0]], dtype=torch.float64)
    R, M = SF.residual_jacobian(losses, J, kappa=1.0)
    torch.testing.assert_close(R, torch.tensor([0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(M, torch.tensor([[0.0, 0.0], [1.0, 0.5]], dtype=torch.float64))
    assert torch.isfinite(M).all()


def test_kappa_changes_the_step() -> None:
    """On a non-quadratic loss kappa=1 and kappa=2 give different steps (kappa is not ignored)."""
    steps = []
    for kappa in (1.0, 2.0):
        theta = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
        opt = sven.Sven([theta], lr=1.0, rtol=1e-12, kappa=kappa, solver=EXACT, adaptive_damping=False)
        opt.step(lambda theta=theta: torch.stack([(theta[0] - 1) ** 4, (theta[1] + 2) ** 2 + theta[0] ** 2]))
        steps.append(theta.detach().clone())
    assert not torch.allclose(steps[0], steps[1])


# --------------------------------------------------------------------------- microbatching
def test_group_rows_averages_consecutive_rows() -> None:
    x = torch.arange(12.0).reshape(6, 2)
    torch.testing.assert_close(SF.group_rows(x, size=3), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    assert SF.group_rows(x, size=1) is x
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by `microbatch_size`=4"):
        SF.group_rows(x, size=4)


# --------------------------------------------------------------------------- RMSProp
def test_rmsprop_precondition_matches_its_formula() -> None:
    g = torch.Generator().manual_seed(2)
    M = torch.randn(4, 3, generator=g, dtype=torch.float64)
    v = torch.full((3,), 0.5, dtype=torch.float64)
    out = SF.rmsprop_precondition_(M, v, alpha=0.9, eps=1e-3)
    gbar = M.mean(0)
    v_ref = 0.9 * 0.5 + 0.1 * gbar**2
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(out, M / (v_ref.sqrt() + 1e-3))


def test_rmsprop_transform_with_momentum_matches_its_formula() -> None:
    d = torch.tensor([1.0, -2.0], dtype=torch.float64)
    v = torch.zeros(2, dtype=torch.float64)
    b = torch.tensor([0.5, 0.5], dtype=torch.float64)
    out = SF.rmsprop_transform_(d, v, b, alpha=0.75, eps=0.0, momentum=0.5)
    # v = 0.25 d^2 -> d / sqrt(v) = d / (0.5 |d|) = 2 sign(d); b = 0.5 * 0.5 + 2 sign(d)
    torch.testing.assert_close(v, 0.25 * d**2)
    torch.testing.assert_close(out, torch.tensor([2.25, -1.75], dtype=torch.float64))
    assert out is b


# --------------------------------------------------------------------------- variable k
def test_variable_k_search_stops_at_the_first_increase_and_undoes_it() -> None:
    comps = torch.eye(4, dtype=torch.float64)
    applied: list[tuple[int, float]] = []
    losses = iter([0.5, 0.8, 1.2, 0.1])

    def apply(c: torch.Tensor, sign: float) -> None:
        applied.append((int(c.argmax()), sign))

    res = SF.variable_k_search(comps, apply=apply, evaluate=lambda: next(losses), reference=1.0)
    assert res.k_used == 2
    assert res.substep_losses == [1.0, 0.5, 0.8]
    assert applied == [(0, 1.0), (1, 1.0), (2, 1.0), (2, -1.0)]
    assert res.applied is not None
    torch.testing.assert_close(res.applied, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_variable_k_search_treats_nan_as_an_increase() -> None:
    res = SF.variable_k_search(torch.eye(2), apply=lambda c, s: None, evaluate=lambda: float("nan"), reference=1.0)
    assert res.k_used == 0 and res.substep_losses == [1.0]


def test_rank_one_components_sum_to_the_direction() -> None:
    g = torch.Generator().manual_seed(4)
    M = torch.randn(6, 10, generator=g, dtype=torch.float64)
    R = torch.randn(6, generator=g, dtype=torch.float64)
    d, F = SF.sven_direction(M, R, rank=4, rtol=1e-12, solver=EXACT)
    comps = SF.rank_one_components(F, R)
    assert comps.shape == (10, 4)
    torch.testing.assert_close(comps.sum(1), d)


def test_all_finite() -> None:
    ok = torch.ones(3)
    assert SF.all_finite(ok, torch.zeros(2, 2))
    assert not SF.all_finite(ok, torch.tensor([1.0, float("nan")]))
    assert not SF.all_finite(torch.tensor([float("inf")]))
    big = torch.full((4,), 3e38)  # the float32 sum overflows, the entries are finite
    assert SF.all_finite(big)
    # past the NumPy path (more than 2**16 entries): the sum first, the entries where it is not finite
    large = torch.ones(70_000)
    assert SF.all_finite(large) and SF.all_finite(torch.full((70_000,), 3e38))
    for bad in (math.nan, math.inf, -math.inf):
        hit = large.clone()
        hit[12_345] = bad
        assert not SF.all_finite(hit)
    cplx = torch.ones(70_000, dtype=torch.complex64)
    assert SF.all_finite(cplx)
    cplx[7] = complex(1.0, math.inf)
    assert not SF.all_finite(cplx)
