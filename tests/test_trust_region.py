"""``sven.trust_region``: the secular equation of the LM parameter and MINPACK's trust-region step control."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sven
import sven.trust_region as TR
from benchmarks.mgh import PROBLEMS, solved
from sven.trust_region import TrustRegion, lm_parameter

F64 = torch.float64
BY_NUMBER = {p.number: p for p in PROBLEMS}


def _length(S: np.ndarray, c: np.ndarray, lam: float) -> float:
    """||(S^2 + lam)^{-1} S c||: the length of the damped step in the right singular basis."""
    return float(np.linalg.norm(S * c / (S * S + lam)))


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 24),  # (up to 16 values in Python floats, more in NumPy)
    seed=st.integers(0, 2**31 - 1),
    decades=st.floats(0.0, 12.0),
    shrink=st.floats(1e-6, 2.0),
)
def test_lm_parameter_gives_the_step_of_the_radius(k: int, seed: int, decades: float, shrink: float) -> None:
    rng = np.random.default_rng(seed)
    S = np.sort(10.0 ** rng.uniform(-decades, 0.0, k))[::-1]  # condition number up to 1e12
    c = rng.standard_normal(k)
    radius = shrink * _length(S, c, 0.0)  # below the Gauss-Newton length (shrink < 1) or above it
    lam = lm_parameter(S, c, radius, rtol=1e-6)
    assert lam >= 0.0
    if lam == 0.0:  # the Gauss-Newton step fits in the radius
        assert _length(S, c, 0.0) <= (1 + 1e-6) * radius
    else:  # ||q(lam)|| = radius, approached from above (Newton on the concave 1/||q||)
        # (a k = 1 root is exact: round-off may land it an ulp below)
        assert (1 - 1e-12) * radius <= _length(S, c, lam) <= (1 + 1e-6) * radius * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, TR._SCALAR_SIZE),
    seed=st.integers(0, 2**31 - 1),
    decades=st.floats(0.0, 12.0),
    shrink=st.floats(1e-6, 2.0),
    zero=st.booleans(),
)
def test_lm_parameter_in_python_floats_is_the_numpy_one(k: int, seed: int, decades: float, shrink: float,
                                                        zero: bool) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    S = np.sort(10.0 ** rng.uniform(-decades, 0.0, k))[::-1].copy()
    S[-1] = 0.0 if zero and k > 1 else S[-1]  # a zero value adds nothing to the step
    c = rng.standard_normal(k)
    radius = shrink * _length(S[S > 0], c[S > 0], 0.0)
    scalar = lm_parameter(S, c, radius)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TR, "_SCALAR_SIZE", 0)
        vector = lm_parameter(S, c, radius)
    # the same operations, summed in another order: equal to round-off (the Newton steps amplify it little)
    assert scalar == pytest.approx(vector, rel=1e-11, abs=0.0)


def test_lm_parameter_is_the_damped_normal_equations_solution() -> None:
    # (J^T J + lam I) q = -J^T r has ||q|| = radius: checked on the dense matrices, not the SVD formula
    g = torch.Generator().manual_seed(3)
    J = torch.randn(12, 4, generator=g, dtype=F64) @ torch.diag(torch.tensor([1.0, 1e-2, 1e-4, 1e2], dtype=F64))
    r = torch.randn(12, generator=g, dtype=F64)
    U, S, _ = torch.linalg.svd(J, full_matrices=False)
    gn = torch.linalg.lstsq(J, r[:, None]).solution[:, 0].norm().item()
    radius = 1e-3 * gn
    lam = lm_parameter(S.numpy(), (U.T @ r).numpy(), radius)
    q = torch.linalg.solve(J.T @ J + lam * torch.eye(4, dtype=F64), J.T @ r)
    assert math.isclose(q.norm().item(), radius, rel_tol=1e-5)


# Powell's and Brown's badly scaled functions took 75 and 22 evaluations with the multiplicative damping
# (scipy lm: 19 and 16); Gaussian 10 against 4 (it converged inside a step whose tries change f at round-off)
@pytest.mark.parametrize("number", [3, 4, 9])
def test_least_squares_needs_at_most_twice_scipys_evaluations(number: int) -> None:
    so = pytest.importorskip("scipy.optimize")
    p = BY_NUMBER[number]
    jac = torch.func.jacrev(p.fun)
    ref = so.least_squares(
        lambda x: p.fun(torch.as_tensor(x)).numpy(),
        np.array(p.x0),
        jac=lambda x: jac(torch.as_tensor(x)).numpy(),
        method="lm",
    )
    res = sven.least_squares(p.fun, p.start())
    assert solved(2 * ref.cost, p.fstar, rtol=p.rtol) and solved(2 * res.cost, p.fstar, rtol=p.rtol)
    assert res.success and res.nfev <= 2 * ref.nfev


def test_gulf_research_is_solved_from_its_standard_start() -> None:
    """With MINPACK's suggested first radius (100 ||D x||) the trust region, like scipy's lm, drifts towards
    x1 -> 0 and stops at the 400-evaluation cap; from ||D x|| it solves Gulf research (225 evaluations)."""
    p = BY_NUMBER[11]
    res = sven.least_squares(p.fun, p.start())
    assert res.success and solved(2 * res.cost, p.fstar, rtol=p.rtol) and res.nfev < 400


def test_sven_with_the_trust_region_solves_powell_badly_scaled() -> None:
    p = BY_NUMBER[3]
    x = torch.nn.Parameter(p.start())
    opt = sven.Sven([x], residuals=True, control=TrustRegion())
    for _ in range(25):
        opt.step(lambda: p.fun(x))
    assert solved(float(p.fun(x.detach()).pow(2).sum()), p.fstar)
    # the radius is saved and restored with the optimizer
    state = opt.state_dict()["sven"]
    assert state["radius"] == opt.control.radius > 0
    fresh = sven.Sven([torch.nn.Parameter(p.start())], residuals=True, control=TrustRegion())
    fresh.load_state_dict(opt.state_dict())
    assert fresh.control.radius == opt.control.radius


def test_a_rejected_try_leaves_the_parameters_and_shrinks_the_radius() -> None:
    # r(x) = x^2 - 4 from x = 10 with a huge first radius: the first (Gauss-Newton) try is kept; a try that
    # overshoots far is rejected and undone
    x = torch.nn.Parameter(torch.tensor([10.0], dtype=F64))
    pol = TrustRegion(max_retries=0)
    opt = sven.Sven([x], residuals=True, control=pol, scale=False)
    f0 = float((x.detach() ** 2 - 4).pow(2).sum())
    opt.step(lambda: x**2 - 4)
    assert float((x.detach() ** 2 - 4).pow(2).sum()) < f0 and not opt.last_step.rejected
    radius = pol.radius
    with torch.no_grad():
        x.fill_(1e-3)  # near the stationary point x = 0: the Gauss-Newton step is enormous and goes uphill
    before = x.detach().clone()
    pol.radius = 1e6
    opt.step(lambda: x**2 - 4)
    assert opt.last_step.rejected and torch.equal(x.detach(), before)
    assert pol.radius < 1e6 and radius > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_retries": -1}, "`max_retries` must be a non-negative integer"),
        ({"factor": 0.0}, "`factor` must be a positive"),
        ({"ftol": -1.0}, "`ftol` must be a non-negative float"),
        ({"xtol": float("nan")}, "`xtol` must be a non-negative float"),
    ],
)
def test_bad_options_name_the_argument(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        TrustRegion(**kwargs)


def test_lm_parameter_ignores_zero_singular_values_and_refuses_a_zero_radius() -> None:
    S, c = np.array([2.0, 0.0]), np.array([1.0, 5.0])
    lam = lm_parameter(S, c, 0.1)  # only the first component counts: 2 * 1 / (4 + lam) = 0.1
    assert math.isclose(lam, 16.0, rel_tol=1e-5)
    with pytest.raises(ValueError, match="`radius` must be positive"):
        lm_parameter(S, c, 0.0)


def test_a_wrong_jacobian_stalls_with_a_warning_and_never_moves() -> None:
    # the residual is sin(x), but autograd is told its derivative is -1: every try goes uphill, the radius
    # shrinks below round-off of |x|, the stall is reported, and further steps change nothing
    x = torch.nn.Parameter(torch.tensor([0.5], dtype=F64))
    opt = sven.Sven([x], residuals=True, control=TrustRegion(), scale=False)
    with pytest.warns(RuntimeWarning, match="Sven stalled: every try was rejected with the step lost in round-off"):
        for _ in range(8):
            opt.step(lambda: -x + (torch.sin(x) + x).detach())
    assert opt.last_step.stalled and opt.last_step.rejected
    assert x.item() == 0.5 and opt.control.radius > 0


@pytest.mark.parametrize("radius", [1e-3, 1e-100, 1e-160, 1e-250, 1e-300])
def test_lm_parameter_reaches_radii_down_to_the_end_of_the_float64_range(radius: float) -> None:
    # the radius of a run that keeps rejecting tries falls by up to 10x per try; the secular equation
    # must stay solvable there (its squares and cubes of sigma^2 + lambda overflowed: ZeroDivisionError)
    S, c = np.array([3.0, 1.0, 0.5]), np.array([1.0, -2.0, 0.25])
    lam = lm_parameter(S, c, radius)
    ratio = float(np.linalg.norm(S * c / (S * S + lam) / radius))  # ||q(lambda)|| / radius, without underflow
    assert math.isfinite(lam) and math.isclose(ratio, 1.0, rel_tol=1e-5)


def test_momentum_with_the_trust_region_is_refused_naming_momentum_and_control() -> None:
    # the old code took it and stalled every step with warnings: a step with momentum is no trust-region step
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    match = r"`momentum` must be 0 with `control=TrustRegion\(\)`, got 0.9 \(parameter group {}\)"
    with pytest.raises(ValueError, match=match.format(0)):
        sven.Sven(model.parameters(), residuals=True, momentum=np.float64(0.9), control=TrustRegion())
    with pytest.raises(ValueError, match=match.format(1)):
        sven.Sven([{"params": model[0].parameters()}, {"params": model[2].parameters(), "momentum": 0.9}],
                  residuals=True, control=TrustRegion())  # fmt: skip
    opt = sven.Sven(model[0].parameters(), residuals=True, control=TrustRegion())
    with pytest.raises(ValueError, match=match.format(1)):
        opt.add_param_group({"params": model[2].parameters(), "momentum": 0.9})
    assert len(opt.param_groups) == 1  # the refused group is not added
    # a scheduler (or the user) that sets it later is refused at the step, before anything moves
    X = torch.linspace(-2, 2, 16, dtype=F64)[:, None]
    opt.param_groups[0]["momentum"] = 0.9
    before = [p.detach().clone() for p in model[0].parameters()]
    with pytest.raises(ValueError, match=match.format(0)):
        opt.step(lambda: (model(X) - torch.sin(2 * X)).reshape(-1))
    assert all(torch.equal(a, b) for a, b in zip(before, model[0].parameters(), strict=True))
    # momentum stays allowed with the adaptive damping
    sven.Sven(model.parameters(), residuals=True, momentum=0.9, adaptive_damping=True)


def test_the_peak_is_saved_and_restored_with_the_policy_state() -> None:
    p = BY_NUMBER[3]
    x = torch.nn.Parameter(p.start())
    opt = sven.Sven([x], residuals=True, control=TrustRegion())
    for _ in range(3):
        opt.step(lambda: p.fun(x))
    peak = float(p.fun(p.start()).pow(2).sum())  # the cost only falls: the start's is the largest seen
    assert opt.state_dict()["sven"]["peak"] == opt.control.peak and math.isclose(opt.control.peak, peak, rel_tol=1e-12)
    fresh = sven.Sven([torch.nn.Parameter(p.start())], residuals=True, control=TrustRegion())
    fresh.load_state_dict(opt.state_dict())
    assert fresh.control.peak == opt.control.peak and fresh.control.radius == opt.control.radius
    # the adaptive damping keeps its peak the same way
    y = torch.nn.Parameter(p.start())
    ad = sven.Sven([y], residuals=True, adaptive_damping=True)
    ad.step(lambda: p.fun(y))
    again = sven.Sven([torch.nn.Parameter(p.start())], residuals=True, adaptive_damping=True)
    again.load_state_dict(ad.state_dict())
    assert again.control.peak == ad.control.peak > 0


@pytest.mark.parametrize("option", [{"damping": 0.1}, {"adaptive_damping": True}, {"max_retries": 3},
                                    {"variable_k": True}, {"check_step": True}, {"trust_radius": 1.0}])  # fmt: skip
def test_a_control_object_and_the_options_it_replaces_are_refused_together(option: dict) -> None:  # type: ignore[type-arg]
    x = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"`control` replaces the step-control options, so `{name}` would be ignored"):
        sven.Sven([x], residuals=True, control=TrustRegion(), **option)
    with pytest.raises(ValueError, match=f"`{name}` would be ignored"):
        sven.least_squares(lambda p: p - 1.0, [0.0, 0.0], control=TrustRegion(), **option)
