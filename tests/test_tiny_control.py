"""The lean step's twins of the two step controls (``sven/tiny_control.py``) against the general controls.

Two references: the general control's own ``run`` on the same lean step (``policy.run(lean.context())``: the same
arrays, so the same arithmetic), and the general step (``sven.tiny.applies`` off). Each is compared over
multi-step trajectories: decisions (rejected, retries, stalled, converged), damping, gain ratio, radius,
iterates, counters and the saved state; and the public behaviours around them (stall warnings, the stop
reasons of ``sven.least_squares``, NaN after a try).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sven
import sven.tiny as tiny
import sven.tiny_control as tiny_control
from sven.control import AdaptiveDamping
from sven.trust_region import TrustRegion

from .test_tiny import _problem


def _general_control(policy, lean):  # type: ignore[no-untyped-def]
    return policy.run(lean.context())


def _control(kind: str):  # type: ignore[no-untyped-def]
    if kind == "adaptive":
        return AdaptiveDamping()
    if kind == "trust":
        return TrustRegion()
    return TrustRegion(ftol=1e-6, xtol=1e-6)  # MINPACK's convergence tests inside the step


def _trajectory(fun, x0, kind: str, steps: int, *, way: str, jacobian):  # type: ignore[no-untyped-def]
    """``steps`` steps with the twin (``way="twin"``), the general control on the lean step (``"control"``) or the
    general step (``"general"``): the iterates, the step records, the optimizer and the warnings."""
    x = torch.nn.Parameter(x0.clone())
    jac = (lambda: torch.func.jacrev(fun)(x.detach())) if jacobian == "callable" else jacobian
    opt = sven.Sven([x], residuals=True, control=_control(kind), jacobian=jac)
    path, infos = [], []
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if way == "control":
            mp.setattr(tiny_control, "run", _general_control)
        elif way == "general":
            mp.setattr(tiny, "applies", lambda opt: False)
        for _ in range(steps):
            opt.step(lambda: fun(x))
            path.append(x.detach().clone())
            infos.append(opt.last_step)
    return path, infos, opt, [str(w.message) for w in caught]


def _decisions(info):  # type: ignore[no-untyped-def]
    return (info.rejected, info.retries, info.rank, info.stalled, info.converged, info.skipped)


def _same_state(a: dict, b: dict, rel: float) -> None:  # type: ignore[type-arg]
    assert a.keys() == b.keys()
    for k in a:
        if math.isnan(a[k]) or math.isnan(b[k]):
            assert math.isnan(a[k]) and math.isnan(b[k]), k
        else:
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-300), k


#: the random problems of the property tests below: seed, columns, extra rows, step control
PROBLEMS = {
    "seed": st.integers(0, 2**31 - 1),
    "p": st.integers(1, tiny.TINY_COLUMNS),
    "extra": st.integers(0, 30),
    "kind": st.sampled_from(["adaptive", "trust", "trust with tolerances"]),
}


@settings(max_examples=30, deadline=None)
@given(
    **PROBLEMS,
    dtype=st.sampled_from([torch.float64, torch.float32]),
    jacobian=st.sampled_from(["autograd", "callable", "2-point"]),
)
def test_the_twin_takes_the_general_controls_decisions_and_steps(
    seed: int, p: int, extra: int, kind: str, dtype: torch.dtype, jacobian: str
) -> None:
    # the same arrays: the twin's arithmetic is the general control's, so every try agrees to round-off
    fun, x0 = _problem(seed, p, p + extra, dtype)
    (a, ia, oa, wa), (b, ib, ob, wb) = (_trajectory(fun, x0, kind, 6, way=way, jacobian=jacobian)
                                        for way in ("twin", "control"))  # fmt: skip
    eps = torch.finfo(dtype).eps
    for u, v, i, j in zip(a, b, ia, ib):
        assert _decisions(i) == _decisions(j)
        torch.testing.assert_close(u, v, rtol=100 * eps, atol=100 * eps * (1.0 + float(v.abs().max())))
        assert i.damping == pytest.approx(j.damping, rel=100 * eps, abs=1e-300)
        assert (i.gain_ratio is None) == (j.gain_ratio is None)
        if i.gain_ratio is not None and math.isfinite(j.gain_ratio):
            assert i.gain_ratio == pytest.approx(j.gain_ratio, rel=1e3 * eps, abs=1e3 * eps)
        assert i.step_norm == pytest.approx(j.step_norm, rel=1e3 * eps, abs=1e-300)
    assert wa == wb
    _same_state(oa.state_dict()["sven"], ob.state_dict()["sven"], rel=100 * eps)


@settings(max_examples=20, deadline=None)
@given(**PROBLEMS, jacobian=st.sampled_from(["autograd", "callable"]))
def test_the_lean_step_with_its_twin_follows_the_general_step(
    seed: int, p: int, extra: int, kind: str, jacobian: str
) -> None:
    # the whole lean step against the general one (another SVD route: round-off apart); the trajectories are
    # compared while the loss still falls well above round-off, where no gain ratio sits at a threshold
    fun, x0 = _problem(seed, p, p + extra)
    (a, ia, oa, _), (b, ib, ob, _) = (_trajectory(fun, x0, kind, 6, way=way, jacobian=jacobian)
                                      for way in ("twin", "general"))  # fmt: skip
    previous = float(ib[0].losses.double().pow(2).sum())
    for u, v, i, j in zip(a, b, ia, ib):
        assert _decisions(i) == _decisions(j)
        torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-11 * (1.0 + float(v.abs().max())))
        assert i.damping == pytest.approx(j.damping, rel=1e-7, abs=1e-300)
        loss = float(j.losses.double().pow(2).sum())
        if abs(previous - loss) <= 1e-6 * previous:  # near the solution: later decisions may turn on round-off
            return
        previous = loss
    _same_state(oa.state_dict()["sven"], ob.state_dict()["sven"], rel=1e-7)


def _wrong_jacobian_problem():  # type: ignore[no-untyped-def]
    """A smooth fit whose given Jacobian has the wrong sign: every try goes uphill, so both controls stall."""
    t = torch.linspace(0, 1, 30, dtype=torch.float64)
    y = 2.0 * torch.exp(-3.0 * t)

    def fun(z: torch.Tensor) -> torch.Tensor:
        return z[0] * torch.exp(-z[1] * t) - y

    return fun, torch.tensor([1.0, 1.0], dtype=torch.float64), t


@pytest.mark.parametrize("kind", ["adaptive", "trust"])
@pytest.mark.parametrize("way", ["twin", "general"])
def test_a_stall_warns_as_the_general_control_does(kind: str, way: str) -> None:
    fun, x0, _ = _wrong_jacobian_problem()
    x = torch.nn.Parameter(x0.clone())
    wrong = lambda: -torch.func.jacrev(fun)(x.detach())  # noqa: E731
    opt = sven.Sven([x], residuals=True, control=_control(kind), jacobian=wrong)
    with pytest.MonkeyPatch.context() as mp:
        if way == "general":
            mp.setattr(tiny, "applies", lambda opt: False)
        with pytest.warns(RuntimeWarning, match="Sven stalled"):
            for _ in range(12):
                opt.step(lambda: fun(x))
    assert opt.last_step.stalled and opt.last_step.rejected
    assert torch.equal(x.detach(), x0)  # every try was undone
    assert opt.rejected_steps == 12 * (1 + _control(kind).max_retries) or kind == "trust"


@pytest.mark.parametrize("jac", ["autograd", "callable", "2-point"])
def test_least_squares_stops_for_the_same_reason_on_either_step(jac: str) -> None:
    fun, x0, t = _wrong_jacobian_problem()

    def analytic(z: torch.Tensor) -> torch.Tensor:
        e = torch.exp(-z[1] * t)
        return torch.stack([e, -z[0] * t * e], 1)

    results = []
    for lean in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not lean:
                mp.setattr(tiny, "applies", lambda opt: False)
            results.append(sven.least_squares(fun, x0.clone(), jac=analytic if jac == "callable" else jac))
    a, b = results
    assert (a.status, a.message, a.nfev, a.njev) == (b.status, b.message, b.nfev, b.njev)
    torch.testing.assert_close(a.x, b.x, rtol=1e-7, atol=1e-10)
    assert a.success and a.cost == pytest.approx(b.cost, rel=1e-9, abs=1e-30)


@pytest.mark.parametrize("kind", ["adaptive", "trust"])
def test_a_try_that_gives_nan_is_rejected_by_the_twin(kind: str) -> None:
    # the residuals turn NaN beyond x = 1.2 (the minimum is at 2): the long tries are rejected (gain -inf) and
    # undone, shorter ones kept
    t = torch.linspace(0, 1, 20, dtype=torch.float64)

    def fun(z: torch.Tensor) -> torch.Tensor:
        r = z[0] * t - 2.0 * t
        return torch.where(z[0] > 1.2, torch.full_like(r, float("nan")), r)

    paths = []
    for way in ("twin", "general"):
        x = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
        opt = sven.Sven([x], residuals=True, control=_control(kind), jacobian="autograd")
        with pytest.MonkeyPatch.context() as mp:
            if way == "general":
                mp.setattr(tiny, "applies", lambda opt: False)
            for _ in range(3):
                opt.step(lambda x=x: fun(x))
        paths.append((x.detach().clone(), opt.rejected_steps, opt.skipped_steps))
    (xa, na, sa), (xb, nb, sb) = paths
    assert (na, sa) == (nb, sb) and na >= 1 and sa == 0  # tries met NaN and were undone; no step was skipped
    torch.testing.assert_close(xa, xb, rtol=1e-12, atol=0.0)
    assert 0.0 < float(xa[0]) <= 1.2


@pytest.mark.parametrize("kind", ["adaptive", "trust"])
def test_a_graph_recorded_before_a_lean_step_sees_the_parameters_change(kind: str) -> None:
    # the twin writes through detached aliases: the version counter still moves, so autograd refuses the stale graph
    fun, x0 = _problem(1, 3, 12)
    x = torch.nn.Parameter(x0.clone())
    stale = (x**3).sum()  # (its backward reads x itself)
    opt = sven.Sven([x], residuals=True, control=_control(kind))
    version = x._version
    opt.step(lambda: fun(x))
    assert not opt.last_step.rejected and x._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


@pytest.mark.parametrize("jacobian", ["autograd", "callable"])
def test_the_twins_xtol_test_reads_the_parameters_after_the_step(jacobian: str) -> None:
    # from x = 0 the parameters' norm before the step is 0 (no xtol test can hold) and after it the step's own
    # length: with a loose xtol the test holds after the first (accepted) step, on both controls
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)

    def fun(z: torch.Tensor) -> torch.Tensor:
        return A @ z - b

    infos = []
    for way in ("twin", "control"):
        x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        jac = (lambda x=x: A.clone()) if jacobian == "callable" else jacobian
        opt = sven.Sven([x], residuals=True, control=TrustRegion(xtol=5.0), jacobian=jac)
        with pytest.MonkeyPatch.context() as mp:
            if way == "control":
                mp.setattr(tiny_control, "run", _general_control)
            opt.step(lambda x=x: fun(x))
        infos.append(opt.last_step)
    assert not infos[0].rejected and "xtol" in infos[0].converged
    assert _decisions(infos[0]) == _decisions(infos[1])
