"""``sven.least_squares`` / ``sven.curve_fit`` against scipy, and residual-mode Sven as Levenberg--Marquardt."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import scipy.optimize as so
import torch

import sven
from benchmarks.mgh import PROBLEMS, solved
from sven.trust_region import TrustRegion

F64 = torch.float64
BY_NUMBER = {p.number: p for p in PROBLEMS}


def _scipy_lm(p):  # type: ignore[no-untyped-def]
    return so.least_squares(
        lambda x: p.fun(torch.as_tensor(x)).numpy(),
        np.array(p.x0),
        jac=lambda x: torch.func.jacrev(p.fun)(torch.as_tensor(x)).numpy(),
        method="lm",
    )


# Brown badly scaled and Meyer are the stalls; Bard has a nonzero residual; Box 3-D is zero-residual
@pytest.mark.parametrize("number", [4, 8, 10, 12])
def test_least_squares_agrees_with_scipy_lm_on_mgh(number: int) -> None:
    p = BY_NUMBER[number]
    ref = _scipy_lm(p)
    res = sven.least_squares(p.fun, p.start())
    assert res.success and res.status in (1, 2, 3, 4)
    assert solved(2 * res.cost, p.fstar, rtol=p.rtol) and solved(2 * ref.cost, p.fstar, rtol=p.rtol)
    np.testing.assert_allclose(res.x.numpy(), ref.x, rtol=1e-5, atol=1e-9)
    assert res.nfev <= 2 * ref.nfev  # the goal: at most twice scipy's evaluations
    # the result describes the returned point: r, J and the gradient J^T r
    np.testing.assert_allclose(res.fun.numpy(), p.fun(res.x).numpy())
    np.testing.assert_allclose(res.jac.numpy(), torch.func.jacrev(p.fun)(res.x).numpy())
    # J^T r cancels near the solution: compare at round-off of its terms |J|^T |r|, not of the small sum
    J, r = res.jac.numpy(), res.fun.numpy()
    scale = float((np.abs(J).T @ np.abs(r)).max())
    np.testing.assert_allclose(res.grad.numpy(), J.T @ r, rtol=1e-7, atol=1e-12 * scale)


def test_linear_problem_lands_on_the_least_squares_solution() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 4, generator=g, dtype=F64)
    b = torch.randn(30, generator=g, dtype=F64)
    # only the gradient test: |A^T r| <= 1e-12 sigma_max(A) |r|, so x is within ~1e-12 cond(A) of x*
    res = sven.least_squares(lambda x: A @ x - b, torch.zeros(4, dtype=F64), ftol=0.0, xtol=0.0, gtol=1e-12)
    x_star = np.linalg.lstsq(A.numpy(), b.numpy(), rcond=None)[0]  # the normal equations' solution
    np.testing.assert_allclose(res.x.numpy(), x_star, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.grad.numpy(), 0.0, atol=1e-9)  # A^T (A x - b) = 0
    assert res.status == 1


def test_parameters_form_changes_the_model_in_place() -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, generator=g, dtype=F64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.25
    model = torch.nn.Linear(3, 1).double()
    res = sven.least_squares(lambda: model(X)[:, 0] - y, model.parameters())
    np.testing.assert_allclose(model.weight.detach().numpy()[0], [1.0, -2.0, 0.5], atol=1e-8)
    np.testing.assert_allclose(res.x.numpy(), [1.0, -2.0, 0.5, 0.25], atol=1e-8)  # weight then bias, flat


def test_curve_fit_matches_scipy_popt_and_pcov() -> None:
    rng = np.random.default_rng(2)
    xdata = np.linspace(0, 4, 50)
    ydata = 2.5 * np.exp(-1.3 * xdata) + 0.5 + 0.05 * rng.standard_normal(50)

    def f_np(x, a, b, c):  # type: ignore[no-untyped-def]
        return a * np.exp(-b * x) + c

    def f_t(x, a, b, c):  # type: ignore[no-untyped-def]
        return a * torch.exp(-b * x) + c

    popt_ref, pcov_ref = so.curve_fit(f_np, xdata, ydata, p0=[1.0, 1.0, 1.0])
    popt, pcov = sven.curve_fit(f_t, torch.as_tensor(xdata), torch.as_tensor(ydata), p0=[1.0, 1.0, 1.0])
    np.testing.assert_allclose(popt.numpy(), popt_ref, rtol=1e-6)
    np.testing.assert_allclose(pcov.numpy(), pcov_ref, rtol=1e-4)
    # absolute sigma and p0 from the signature, as scipy
    sigma = np.full(50, 0.05)
    popt_ref, pcov_ref = so.curve_fit(f_np, xdata, ydata, sigma=sigma, absolute_sigma=True)
    popt, pcov = sven.curve_fit(f_t, xdata, ydata, sigma=sigma, absolute_sigma=True)
    np.testing.assert_allclose(popt.numpy(), popt_ref, rtol=1e-6)
    np.testing.assert_allclose(pcov.numpy(), pcov_ref, rtol=1e-4)


def test_curve_fit_without_redundancy_gives_an_infinite_covariance_with_a_warning() -> None:
    with pytest.warns(RuntimeWarning, match="could not be estimated"):
        _, pcov = sven.curve_fit(lambda x, a, b: a * x + b, [0.0, 1.0], [1.0, 3.0], p0=[0.0, 0.0])
    assert bool(torch.isinf(pcov).all())


# --------------------------------------------------------------------------- stopping rules and stalls
@pytest.mark.parametrize("damping", [1e-6, 1.0])
def test_a_damping_is_the_start_of_the_adaptive_damping(damping: float) -> None:
    p = BY_NUMBER[8]
    res = sven.least_squares(p.fun, p.start(), damping=damping)
    assert res.success and solved(2 * res.cost, p.fstar) and res.nfev > 2


def test_status_says_why_it_stopped() -> None:
    p = BY_NUMBER[1]  # Rosenbrock: zero residual at (1, 1)
    assert sven.least_squares(p.fun, p.start(), ftol=0.0, xtol=0.0, gtol=1e-8).status == 1
    p = BY_NUMBER[8]  # Bard: nonzero residual, the cost stops decreasing
    assert sven.least_squares(p.fun, p.start(), xtol=0.0, gtol=0.0).status == 2
    assert sven.least_squares(p.fun, p.start(), ftol=0.0, gtol=0.0, xtol=1e-3).status == 3
    with pytest.warns(RuntimeWarning, match="max_nfev=3 evaluations without converging"):
        res = sven.least_squares(BY_NUMBER[10].fun, BY_NUMBER[10].start(), max_nfev=3)
    assert res.status == 0 and not res.success and res.nfev >= 3
    assert "maximum number of function evaluations" in res.message


def test_a_wrong_jacobian_stalls_with_a_warning() -> None:
    # the residual is sin(x), but the closure tells autograd its derivative is -1: every step goes uphill
    def fun(x: torch.Tensor) -> torch.Tensor:
        return -x + (torch.sin(x) + x).detach()

    with pytest.warns(RuntimeWarning, match="Sven stalled"):
        res = sven.least_squares(fun, torch.tensor([0.5], dtype=F64))
    assert res.status == 2 and res.message.startswith("No step reduces the cost")
    assert "trust radius" in res.message  # the default step control's words, not the damping's
    assert res.x.item() == 0.5  # every rejected try was undone
    with pytest.warns(RuntimeWarning, match="Sven stalled"):
        res = sven.least_squares(fun, torch.tensor([0.5], dtype=F64), damping=1e-3)
    assert res.status == 2 and "largest damping" in res.message and res.x.item() == 0.5


def test_residual_mode_sven_solves_brown_badly_scaled_with_its_defaults() -> None:
    p = BY_NUMBER[4]  # the silent stall: rtol=1e-4 kept 1 of 2 values, f stayed at 9.8e11
    x = torch.nn.Parameter(p.start())
    opt = sven.Sven([x], residuals=True)
    for _ in range(40):
        opt.step(lambda: p.fun(x))
    assert solved(float(p.fun(x.detach()).pow(2).sum()), p.fstar)


def test_residual_mode_defaults_and_the_unchanged_ones() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    lm = sven.Sven([w], residuals=True)
    assert lm.param_groups[0]["lr"] == 1.0 and lm.rtol is None and lm.scale and lm.adaptive_damping
    plain = sven.Sven([w])  # per-sample losses: as before
    assert plain.param_groups[0]["lr"] == 0.5 and plain.rtol == 1e-4 and not plain.scale
    no_damping = sven.Sven([w], residuals=True, adaptive_damping=False)
    assert no_damping.param_groups[0]["lr"] == 0.5 and no_damping.rtol == 1e-4 and not no_damping.scale
    pinn = sven.pinn.optimizer([w])
    assert pinn.rtol == 1e-10 and not pinn.scale and pinn.param_groups[0]["lr"] == 1.0


def test_column_scaling_is_invariant_to_a_parameter_unit() -> None:
    # Meyer-like: rescaling one parameter by 1e4 changes nothing with Moré's scaling
    t = torch.linspace(0.0, 1.0, 12, dtype=F64)
    y = 3.0 * torch.exp(-2.0 * t)
    a = sven.least_squares(lambda p: p[0] * torch.exp(-p[1] * t) - y, [1.0, 1.0])
    b = sven.least_squares(lambda p: p[0] * torch.exp(-1e4 * p[1] * t) - y, [1.0, 1e-4])
    assert a.nfev == b.nfev
    np.testing.assert_allclose(b.x.numpy() * [1.0, 1e4], a.x.numpy(), rtol=1e-8)


# --------------------------------------------------------------------------- input checks
def _lin(x: torch.Tensor) -> torch.Tensor:
    return x - 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ftol": -1.0}, ValueError, "`ftol` must be a non-negative float"),
        ({"max_nfev": 0}, ValueError, "`max_nfev` must be a positive integer"),
        ({"ftol": 0.0, "xtol": 0.0, "gtol": 0.0}, ValueError, "at least one of `ftol`, `xtol` and `gtol`"),
        ({"residuals": False}, ValueError, "`residuals` is fixed by least_squares"),
        ({"adaptive_damping": False}, ValueError, "`adaptive_damping=False` does not apply to least_squares"),
    ],
)
def test_bad_options_name_the_argument(kwargs: dict, error: type, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(error, match=match):
        sven.least_squares(_lin, [0.0], **kwargs)


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(TypeError, match="`fun` must be callable"):
        sven.least_squares(3, [0.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`params` .* must be finite"):
        sven.least_squares(_lin, [math.nan])
    with pytest.raises(ValueError, match="`params` must have at least one entry"):
        sven.least_squares(_lin, [])
    with pytest.raises(TypeError, match=r"`fun` must return a torch\.Tensor"):
        sven.least_squares(lambda x: 1.0, [0.0])  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError, match="`fun` returned NaN or Inf residuals at the start"):
        sven.least_squares(lambda x: torch.log(x - 1.0), [0.0])
    with pytest.raises(ValueError, match=r"`sigma` must be a scalar or have as many entries as `ydata` \(shape \(3,\)"
                       r", 3 entries\), got shape \(2,\)"):  # fmt: skip
        sven.curve_fit(lambda x, a: a * x, [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], p0=[1.0], sigma=[1.0, 1.0])
    with pytest.raises(ValueError, match="`p0` is required"):
        sven.curve_fit(lambda *a: a[0], [1.0, 2.0], [1.0, 2.0])


def test_numpy_scalars_and_arrays_are_accepted() -> None:
    res = sven.least_squares(_lin, np.zeros(3), ftol=np.float32(1e-8), max_nfev=np.int64(50))
    assert res.x.dtype == F64
    np.testing.assert_allclose(res.x.numpy(), 1.0)
    start = torch.zeros(3, dtype=F64)
    sven.least_squares(_lin, start)
    assert bool((start == 0).all())  # the start is not modified


def test_gradient_cosine_is_the_angle_of_the_gradient() -> None:
    import truncpinv
    from sven.functional import gradient_cosine

    g = torch.Generator().manual_seed(3)
    M = torch.randn(20, 5, generator=g, dtype=F64)
    R = torch.randn(20, generator=g, dtype=F64)
    F = truncpinv.DenseSVD().factorize(M)
    ref = float((M.T @ R).norm() / (torch.linalg.matrix_norm(M, 2) * R.norm()))  # the definition
    assert float(gradient_cosine(F, R)) == pytest.approx(ref, rel=1e-12)
    # at the least-squares solution the residual is orthogonal to the range of M
    x = torch.linalg.lstsq(M, R).solution
    assert float(gradient_cosine(F, R - M @ x)) < 1e-12
    assert float(gradient_cosine(F, torch.zeros(20, dtype=F64))) == 0.0


def test_column_scaling_direction_is_the_scaled_lm_step() -> None:
    # one Sven step with scale=True and damping lam is argmin |M d + R|^2 + lam sigma_1(M D^-1)^2 |D d|^2
    g = torch.Generator().manual_seed(4)
    A = torch.randn(12, 3, generator=g, dtype=F64) * torch.tensor([1.0, 1e3, 1e-2], dtype=F64)
    b = torch.randn(12, generator=g, dtype=F64)
    w = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = sven.Sven([w], residuals=True, control=sven.control.Tikhonov(0.1), scale=True)
    opt.step(lambda: A @ w - b)
    D = A.norm(dim=0)
    s1 = torch.linalg.matrix_norm(A / D, 2)
    lam = 0.1 * s1**2
    ref = torch.linalg.solve(A.T @ A + lam * torch.diag(D**2), A.T @ b)  # the normal equations of the damped problem
    np.testing.assert_allclose(w.detach().numpy(), ref.numpy(), rtol=1e-9)


def test_column_scaling_leaves_a_round_off_column_unscaled() -> None:
    """A column that is zero but for round-off (the bias before a BatchNorm, an attention key bias) gets the
    largest column norm as its scale, not its own: scaled to unit norm, round-off became a direction of the
    step, and the step along it ``1/eps`` (an attention key bias went to 8e15)."""
    from sven.params import blocks_of_groups
    from sven.precondition import ColumnScaling

    g = torch.Generator().manual_seed(5)
    M = torch.randn(10, 4, generator=g, dtype=F64) * torch.tensor([1.0, 1e-6, 3e-17, 0.0], dtype=F64)
    w = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    blocks = blocks_of_groups([{"params": [w], "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False}])
    state: dict = {w: {}}
    scaled = ColumnScaling().jacobian(M, blocks, state)
    norms = M.norm(dim=0)
    D = ColumnScaling().weights(blocks, state)
    torch.testing.assert_close(D, torch.stack([norms[0], norms[1], norms[0], torch.ones((), dtype=F64)]))
    torch.testing.assert_close(scaled, M / D)


@pytest.mark.parametrize("layer", ["attention", "conv-batchnorm"])
def test_residual_mode_with_a_round_off_column_keeps_the_parameters_bounded(layer: str) -> None:
    """Residual mode's defaults (Moré's scaling on) on a model with a parameter the output does not depend on
    but for round-off: the step stays of the size of the other parameters' steps."""
    torch.manual_seed(6)
    if layer == "attention":
        attn = torch.nn.MultiheadAttention(6, 2, batch_first=True).double()
        first: torch.nn.Module = torch.nn.Linear(4, 6).double()
        x = torch.randn(8, 5, 4, dtype=F64)
        head = torch.nn.Linear(6, 2).double()

        def model(t: torch.Tensor) -> torch.Tensor:
            h = first(t)
            return head(torch.tanh(attn(h, h, h, need_weights=False)[0]).mean(1))

        params = [*first.parameters(), *attn.parameters(), *head.parameters()]
    else:
        net = torch.nn.Sequential(
            torch.nn.Conv2d(2, 3, 3),
            torch.nn.BatchNorm2d(3),
            torch.nn.Tanh(),
            torch.nn.Flatten(),
            torch.nn.Linear(48, 2),
        ).double()
        x = torch.randn(8, 2, 6, 6, dtype=F64)
        model, params = net, list(net.parameters())
    y = torch.randn(8, 2, dtype=F64)
    before = [p.detach().clone() for p in params]
    opt = sven.Sven(params, residuals=True)
    assert opt.config.scale
    for _ in range(3):
        opt.step(lambda: model(x) - y)
    assert max(float((p - q).abs().max()) for p, q in zip(params, before)) < 100


def test_an_exact_fit_at_round_off_is_convergence_not_a_stall() -> None:
    """Once the residuals are at round-off, every try is rejected: that is the end of the fit, so no stall warning."""
    x = torch.linspace(0, 1, 100, dtype=torch.float64)
    y = 2 * torch.exp(-1.5 * x) + 0.3  # exactly representable by the model
    p = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = sven.Sven([p], residuals=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(30):
            R = opt.step(lambda: p[0] * torch.exp(p[1] * x) + p[2] - y)
    assert float(R.pow(2).sum()) <= 1e-24
    torch.testing.assert_close(p.detach(), torch.tensor([2.0, -1.5, 0.3], dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_no_route_warning_when_the_user_chose_no_route() -> None:
    # bare parameters have no layer for the Gram route: the exact route serves them, silently (issue #23)
    x = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=F64))
    t = torch.linspace(0.0, 1.0, 30, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = sven.Sven([x], residuals=True)
        for _ in range(3):
            opt.step(lambda: x[0] * torch.exp(-x[1] * t) - torch.exp(-2.0 * t))
        res = sven.least_squares(lambda p: p[0] * torch.exp(-p[1] * t) - torch.exp(-2.0 * t), [1.0, 1.0])
    assert res.success


def test_curve_fit_refuses_ydata_of_another_size_naming_both_shapes() -> None:
    # the old code raised torch's broadcasting error ("The size of tensor a (20) must match ...")
    t = torch.linspace(0, 1, 20, dtype=F64)
    y = 2.0 * torch.exp(-3.0 * t)
    model = lambda x, a, b: a * torch.exp(-b * x)  # noqa: E731
    with pytest.raises(ValueError, match=r"`ydata` must have as many entries as the model f\(xdata, \*p0\): `ydata` "
                       r"has shape \(10,\) \(10 entries\), f\(xdata, \*p0\) has shape \(20,\)"):  # fmt: skip
        sven.curve_fit(model, t, y[:10], p0=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"`ydata` .* has shape \(20, 1\) .* has shape \(10,\)"):
        sven.curve_fit(model, t[:10], y[:, None], p0=[1.0, 1.0])
    # as scipy: compared flattened, so any shape with the model's number of entries fits ...
    popt, _ = sven.curve_fit(model, t, y.reshape(4, 5), p0=[1.0, 1.0])
    ref, _ = so.curve_fit(lambda x, a, b: a * np.exp(-b * x), t.numpy(), y.numpy(), p0=[1.0, 1.0])
    np.testing.assert_allclose(popt.numpy(), ref, rtol=1e-6)
    # ... and a constant model (one value) is broadcast to the data: its fit is the mean
    c, _ = sven.curve_fit(lambda x, a: a, t, y, p0=[0.0])
    assert math.isclose(float(c[0]), float(y.mean()), rel_tol=1e-9)


@pytest.mark.parametrize("seed", [5, 6])
def test_a_converged_float32_fit_reports_convergence_not_a_stall(seed: int) -> None:
    # with scipy's default tolerances (1e-8, below float32's eps) the old code ended these fits with "Sven
    # stalled ... not stationary" at the float64 solution: float32 round-off caps the angle at ~sqrt(eps)
    t = torch.linspace(0, 1, 20, dtype=F64)
    y = 2.0 * torch.exp(-3.0 * t) + 0.01 * torch.randn(20, generator=torch.Generator().manual_seed(seed), dtype=F64)
    exact = sven.least_squares(lambda p: p[0] * torch.exp(-p[1] * t) - y, [1.0, 1.0])
    t32, y32 = t.float(), y.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = sven.least_squares(lambda p: p[0] * torch.exp(-p[1] * t32) - y32, torch.ones(2))
    assert res.success and res.status in (2, 3, 4) and not res.message.startswith("No step")
    assert res.x.dtype == torch.float32
    np.testing.assert_allclose(res.x.double().numpy(), exact.x.numpy(), rtol=1e-4)


def test_tolerances_below_the_dtype_round_off_are_raised_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    module = sys.modules["sven.least_squares"]
    made: list[TrustRegion] = []

    class Spy(TrustRegion):  # records the policy least_squares builds
        def __init__(self, *args: object, **kwargs: float) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(module, "TrustRegion", Spy)
    sven.least_squares(_lin, torch.zeros(3), ftol=1e-10, xtol=0.0)
    assert made[-1].ftol == float(torch.finfo(torch.float32).eps) and made[-1].xtol == 0.0  # 0 keeps a test off
    sven.least_squares(_lin, torch.zeros(3, dtype=F64), ftol=1e-10, xtol=1e-20)
    assert made[-1].ftol == 1e-10 and made[-1].xtol == float(torch.finfo(F64).eps)
