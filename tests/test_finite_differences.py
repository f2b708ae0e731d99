"""Jacobians without autograd (``sven/linearize/finite.py``): finite differences and a callable, in Sven and
``least_squares`` (scipy's ``jac`` options)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sven
from sven.linearize.base import RowSpec
from sven.linearize.finite import FiniteDifferences, GivenJacobian, fd_steps

F64 = torch.float64
EPS = float(torch.finfo(F64).eps)


def _smooth(seed: int, p: int, m: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, p, generator=g, dtype=F64)
    x = torch.randn(p, generator=g, dtype=F64) * 3

    def fun(z: torch.Tensor) -> torch.Tensor:
        return torch.sin(A @ z) + 0.5 * (A @ z) ** 2

    return fun, x


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    p=st.integers(1, 6),
    m=st.integers(1, 12),
    scheme=st.sampled_from(["2-point", "3-point"]),
)
def test_differences_approximate_the_jacobian_to_their_order(seed: int, p: int, m: int, scheme: str) -> None:
    fun, x0 = _smooth(seed, p, m)
    x = torch.nn.Parameter(x0.clone())
    lin = FiniteDifferences(scheme)(lambda: fun(x), [x], RowSpec(residuals=True))
    exact = torch.func.jacfwd(fun)(x0)
    # truncation h |f''| / 2 (or h^2 |f'''| / 6) plus round-off eps |f| / h, with h ~ eps^(1/2) (eps^(1/3)) max(1, |x|)
    a = 1.0 + float(torch.linalg.matrix_norm(torch.func.jacfwd(lambda z: torch.func.jacfwd(fun)(z))(x0).flatten(1), 2))
    size = 1.0 + float(x0.abs().max()) + float(fun(x0).abs().max())
    order = EPS**0.5 if scheme == "2-point" else EPS ** (2.0 / 3.0)
    assert float((lin.jacobian - exact).abs().max()) <= 50 * order * a * size**2
    assert torch.equal(x.detach(), x0)  # every perturbed entry written back bit for bit
    assert lin.method == scheme and torch.equal(lin.rows, fun(x0))


def test_steps_follow_scipys_rule() -> None:
    x = torch.tensor([0.0, -0.0, 3.0, -4.0, 1e-3, 1e20], dtype=F64)
    h = fd_steps(x, "2-point", EPS)
    rel = EPS**0.5
    expected = torch.tensor([1.0, 1.0, 3.0, -4.0, 1.0, 1e20], dtype=F64) * rel
    # sign(0) = +1, max(1, |x|); rounded to what x + h can hold: within ulp(x) / 2 = (eps / 2) |x|, a relative
    # sqrt(eps) / 2 = 7.5e-9 of h
    torch.testing.assert_close(h, expected, rtol=0.5 * EPS / rel * 1.01, atol=0.0)
    assert torch.equal((x + h) - x, h)  # representable: the divisor is the step actually taken
    h3 = fd_steps(x, "3-point", EPS)
    torch.testing.assert_close(h3[2], torch.tensor(3.0 * EPS ** (1 / 3), dtype=F64), rtol=1e-10, atol=0.0)


def test_a_closure_that_raises_mid_way_leaves_the_parameters_bit_identical() -> None:
    w = torch.nn.Parameter(torch.tensor([[0.1, -0.2], [0.3, 0.7]], dtype=F64))
    before = w.detach().clone()
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")
        return (w**2).reshape(-1)

    with pytest.raises(RuntimeError, match="boom"):
        FiniteDifferences("3-point")(closure, [w], RowSpec(residuals=True))
    assert torch.equal(w.detach(), before) and w.requires_grad


def test_rows_that_change_size_under_a_perturbation_are_refused() -> None:
    x = torch.nn.Parameter(torch.tensor([1.0], dtype=F64))
    n = [0]

    def closure() -> torch.Tensor:
        n[0] += 1
        return x.repeat(1 if n[0] == 1 else 2)

    with pytest.raises(ValueError, match="the same rows at every point"):
        FiniteDifferences()(closure, [x], RowSpec(residuals=True))
    assert x.item() == 1.0


def test_sven_steps_a_module_by_differences() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    X, y = torch.randn(40, 2, dtype=F64), torch.randn(40, 1, dtype=F64)
    opts = [sven.Sven(model.parameters(), residuals=True, jacobian=j) for j in ("2-point", "autograd")]
    states = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    for opt in opts:
        model.load_state_dict(states)
        opt.step(lambda: (model(X) - y)[:, 0])
        steps.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert opts[0].last_step.jacobian_method == "2-point"
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=1e-6)  # the difference Jacobian's accuracy


def test_a_callable_jacobian_is_checked() -> None:
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))
    rows = RowSpec(residuals=True)
    good = GivenJacobian(lambda: np.eye(2))(lambda: x * 1.0, [x], rows)  # an array is taken
    assert good.jacobian.dtype == F64 and good.method == "callable"
    for jac, err, match in [
        (lambda: torch.ones(3, 2), ValueError, r"`jacobian` must return the \(2, 2\) Jacobian .* got shape \(3, 2\)"),
        (lambda: torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "NaN or Inf"),
        (lambda: [[1.0, 0.0], [0.0, 1.0]], TypeError, "torch.Tensor or a NumPy array, got list"),
    ]:
        with pytest.raises(err, match=match):
            GivenJacobian(jac)(lambda: x * 1.0, [x], rows)
    with pytest.raises(TypeError, match="`jacobian` must be callable"):
        GivenJacobian(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kind", ["float64", "float32", "array", "transposed", "requires grad", "vector", "nan", "inf", "huge"]
)
def test_a_callable_jacobian_of_each_kind_is_taken_or_refused_alike(kind: str) -> None:
    # a float64 CPU tensor takes the short test (values only); every other kind the general conversions: both
    # must hand on the same Jacobian, or refuse the same non-finite one, and call jac() as under no_grad()
    p = 1 if kind == "vector" else 2
    x = torch.nn.Parameter(torch.arange(1.0, p + 1.0, dtype=F64))
    ref = torch.arange(1.0, 3.0 * p + 1.0, dtype=F64).reshape(3, p)
    if kind in ("nan", "inf", "huge"):
        ref[1, 0] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e308}[kind]
    seen: list[tuple[bool, bool]] = []

    def jac() -> object:
        seen.append((torch.is_grad_enabled(), x.requires_grad))
        if kind == "float32":
            return ref.float()
        if kind == "array":
            return ref.numpy()
        if kind == "transposed":
            return ref.T.contiguous().T  # column-major: a strided view
        if kind == "requires grad":
            return ref.clone().requires_grad_(True)
        return ref[:, 0] if kind == "vector" else ref

    route = GivenJacobian(jac)
    closure = lambda: torch.cat([x, x, x])[:3] * 1.0  # noqa: E731
    if kind in ("nan", "inf"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            route(closure, [x], RowSpec(residuals=True))
        return
    lin = route(closure, [x], RowSpec(residuals=True))
    assert seen == [(False, True)] and x.requires_grad and lin.jacobian.dtype == F64
    assert not lin.jacobian.requires_grad and not lin.rows.requires_grad
    torch.testing.assert_close(lin.jacobian, ref.float().double() if kind == "float32" else ref, rtol=0, atol=0)


T = torch.linspace(0, 1, 30, dtype=F64)
Y = 2.0 * torch.exp(-3.0 * T) + 0.5


def _decay(p: torch.Tensor) -> torch.Tensor:
    return p[0] * torch.exp(-p[1] * T) + p[2] - Y


def _decay_jac(p: torch.Tensor) -> torch.Tensor:
    e = torch.exp(-p[1] * T)
    return torch.stack([e, -p[0] * T * e, torch.ones_like(T)], 1)


@pytest.mark.parametrize("jac", ["2-point", "3-point", _decay_jac, lambda p: _decay_jac(p).numpy()])
def test_least_squares_solves_with_each_jacobian_option(jac) -> None:  # type: ignore[no-untyped-def]
    calls = [0]

    def fun(p: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return _decay(p)

    res = sven.least_squares(fun, np.array([1.0, 1.0, 0.0]), jac=jac)
    assert res.success
    torch.testing.assert_close(res.x, torch.tensor([2.0, 3.0, 0.5], dtype=F64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res.jac, _decay_jac(res.x), rtol=1e-5, atol=1e-6)
    # nfev counts the differences, as scipy's lm: every call but each step's first (at the current point) and the
    # solution's Jacobian (1 + the differences there)
    per = {"2-point": 3, "3-point": 6}.get(jac, 0) if isinstance(jac, str) else 0
    assert res.nfev == calls[0] - res.nit - (1 + per)


def test_curve_fit_takes_scipys_callable_and_weights_it() -> None:
    sigma = torch.linspace(0.5, 2.0, 30, dtype=F64)

    def model(t, a, b, c):  # type: ignore[no-untyped-def]
        return a * torch.exp(-b * t) + c

    def jac(t, a, b, c):  # type: ignore[no-untyped-def]
        return _decay_jac(torch.stack([a, b, c]))

    exact = sven.curve_fit(model, T, Y + 0.5, p0=[1.0, 1.0, 0.0], sigma=sigma)
    given_ = sven.curve_fit(model, T, Y + 0.5, p0=[1.0, 1.0, 0.0], sigma=sigma, jac=jac)
    for u, v in zip(exact, given_):
        torch.testing.assert_close(u, v, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(
    ("jac", "err", "match"),
    [
        ("cs", ValueError, "`jac` must be 'autograd', '2-point', '3-point' or a callable"),
        (3, TypeError, "`jac` must be a string"),
        (lambda p: torch.zeros(2, 3), ValueError, r"`jac` must return the \(30, 3\) Jacobian"),
        (lambda p: torch.full((30, 3), float("inf")), ValueError, "`jac` returned a Jacobian with NaN or Inf"),
    ],
)
def test_least_squares_refuses_a_bad_jac(jac, err, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(err, match=match):
        sven.least_squares(_decay, [1.0, 1.0, 0.0], jac=jac)


def test_jac_and_a_sven_route_are_not_given_together() -> None:
    with pytest.raises(ValueError, match="`jac` or `jacobian`, not both"):
        sven.least_squares(_decay, [1.0, 1.0, 0.0], jac="2-point", jacobian="autograd")


def test_numpy_scalars_start_a_difference_fit() -> None:
    res = sven.least_squares(lambda p: p**2 - 4.0, np.float64(1.0), jac="2-point")
    assert res.success and abs(float(res.x) - 2.0) < 1e-6


def test_parameters_fitted_in_place_take_each_jac() -> None:
    X = torch.linspace(-1, 1, 20, dtype=F64)[:, None]
    target = 3 * X[:, 0] - 1
    fits = []
    for jac in ("2-point", "callable"):
        model = torch.nn.Linear(1, 1).double()

        def fun() -> torch.Tensor:
            return model(X)[:, 0] - target  # noqa: B023 (called at once)

        option = (lambda: torch.cat([X, torch.ones_like(X)], 1)) if jac == "callable" else jac  # d/d(weight, bias)
        res = sven.least_squares(fun, model.parameters(), jac=option)
        assert res.success
        fits.append(torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]))
    for fit in fits:
        torch.testing.assert_close(fit, torch.tensor([3.0, -1.0], dtype=F64), rtol=1e-7, atol=1e-8)


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, -1.0])),
        min_size=1, max_size=12,
    ),
    scheme=st.sampled_from(["2-point", "3-point"]),
)  # fmt: skip
def test_the_float_steps_are_fd_steps_bit_for_bit(values: list[float], scheme: str) -> None:
    # float64 parameters take the steps on floats: the same IEEE operations as the tensor formula, in its order
    from sven.linearize.finite import _float_steps

    want = fd_steps(torch.tensor(values, dtype=F64), scheme, EPS).tolist()
    got = _float_steps(values, scheme, EPS)
    assert len(got) == len(want)
    for a, b in zip(got, want):  # bit for bit: NaN where NaN, the sign of a zero included
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1.0, a) == math.copysign(1.0, b))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_differences_write_each_entry_back_and_bump_the_version(dtype: torch.dtype, layout: str) -> None:
    # a contiguous CPU parameter is perturbed on its NumPy view, any other through torch's indexing: the same
    # columns, every entry written back bit for bit, and the version counter moving at each write
    torch.manual_seed(0)
    base = torch.randn(3, 2, dtype=dtype)
    w = torch.nn.Parameter(base.clone() if layout == "contiguous" else base.T.contiguous().T)
    X = torch.randn(5, 3, dtype=dtype)
    before, version = w.detach().clone(), w._version
    lin = FiniteDifferences("3-point")(lambda: (X @ w).sin().reshape(-1), [w], RowSpec(residuals=True))
    assert torch.equal(w.detach(), before) and w._version >= version + 3 * w.numel()
    exact = torch.autograd.functional.jacobian(lambda v: (X @ v).sin().reshape(-1), before.clone())
    tol = 1e-6 if dtype == F64 else 2e-3
    torch.testing.assert_close(lin.jacobian, exact.reshape(10, 6), rtol=tol, atol=tol)
