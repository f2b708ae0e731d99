"""``sven.normal_equations``: a tall Jacobian's damped steps from ``M^T M``, certified, with the SVD as fallback."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sven
import truncpinv
from sven import functional as SF
from sven import normal_equations as NE
from sven.factorize import factorize
from sven.params import blocks_of_groups
from sven.step_context import step_context
from sven.trust_region import TrustRegion

F64 = torch.float64


def _tall(m: int, n: int, kappa: float, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """``U diag(s) V^T`` with singular values from 1 down to ``1 / kappa`` (geometric)."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64)).Q
    s = torch.logspace(0.0, -math.log10(kappa), n, dtype=F64)
    return ((U * s) @ V.T).to(dtype)


def _svd(M: torch.Tensor) -> truncpinv.TruncatedPinv:
    return truncpinv.DenseSVD().factorize(M, rtol=truncpinv.default_rtol(tuple(M.shape), M.dtype))


def _bound(F: truncpinv.TruncatedPinv, damping: float) -> float:
    """The relative error bound of the damped step (module docstring of sven.normal_equations)."""
    delta, lam_n, lam1 = F.stats["gram_error"], F.stats["lambda_min"], F.stats["lambda_max"]
    return delta / (lam_n + damping * lam1 - delta)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(16, 40),
    aspect=st.integers(8, 20),
    log_kappa=st.floats(0.0, 6.0),
    log_damping=st.floats(-8.0, 0.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_damped_steps_agree_with_the_svd_within_the_certified_bound(
    n: int, aspect: int, log_kappa: float, log_damping: float, seed: int
) -> None:
    M = _tall(aspect * n, n, 10.0**log_kappa, seed)
    R = torch.randn(aspect * n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    damping = 10.0**log_damping
    F = NE.factorize_normal(M, rank=None, rtol=None, atol=0.0, damping=damping)
    if F is None:  # refused: the bound must then exceed the accuracy (the SVD is used instead)
        K = M.T @ M
        lam = torch.linalg.eigvalsh(K)
        delta = max(M.shape) * torch.finfo(F64).eps * float(lam[-1])
        assert delta > NE.ACCURACY * (max(float(lam[0]), 0.0) + damping * float(lam[-1]) - delta)
        return
    assert NE.resolves(F, damping)
    bound = _bound(F, damping)
    assert bound <= NE.ACCURACY
    exact = SF.filtered_direction(_svd(M), R, damping=damping)
    mine = SF.filtered_direction(F, R, damping=damping)
    # the bound covers the Gram matrix's error; the SVD's own backward error adds ~ m kappa_lambda eps
    kappa = math.sqrt((1.0 + damping) / (F.stats["lambda_min"] / F.stats["lambda_max"] + damping))
    tol = 2.0 * bound + 10.0 * M.shape[0] * kappa * torch.finfo(F64).eps
    assert float((mine - exact).norm()) <= tol * float(exact.norm())
    # every other use of the factorisation: the gradient angle, and U^T R scaled by S (= V^T M^T R)
    assert float(SF.gradient_cosine(F, R)) == pytest.approx(float(SF.gradient_cosine(_svd(M), R)), rel=1e-6)


def test_an_ill_conditioned_jacobian_is_refused_without_damping() -> None:
    M = _tall(400, 20, 1e8, seed=3)  # eps * m * kappa^2 = 9e2: the normal equations lose every digit
    assert NE.factorize_normal(M, rank=None, rtol=None, atol=0.0, damping=0.0) is None
    F = NE.factorize_normal(M, rank=None, rtol=None, atol=0.0, damping=1e-3)
    assert F is not None and NE.resolves(F, 1e-3) and not NE.resolves(F, 1e-12)
    # a well-conditioned one is accepted even undamped, and its Gauss-Newton step is the SVD's
    W = _tall(400, 20, 10.0, seed=3)
    G = NE.factorize_normal(W, rank=None, rtol=None, atol=0.0, damping=0.0)
    assert G is not None
    R = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = SF.filtered_direction(_svd(W), R, damping=0.0)
    assert torch.allclose(SF.filtered_direction(G, R, damping=0.0), exact, rtol=1e-9, atol=0.0)


def _context(M: torch.Tensor, R: torch.Tensor, F: truncpinv.TruncatedPinv) -> object:
    w = torch.zeros(M.shape[1], dtype=F64, requires_grad=True)
    blocks = blocks_of_groups([{"params": [w], "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False}])
    return step_context(
        F, R, M, blocks, state={w: {}}, precondition=None, loss=lambda: 0.0, evaluate=None, reject=lambda: None,
        exact=lambda: _svd(M),
    )  # fmt: skip


def test_a_damping_the_normal_equations_cannot_resolve_takes_the_svd() -> None:
    M = _tall(400, 20, 1e8, seed=5)
    R = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=F64)
    F = NE.factorize_normal(M, rank=None, rtol=None, atol=0.0, damping=1e-2)
    assert F is not None
    ctx = _context(M, R, F)
    assert ctx.resolve(1e-2) is F  # resolved: kept
    d = ctx.direction(1e-14)  # kappa_lambda^2 ~ 1e14: the Gram matrix cannot give this step
    assert ctx.F is not F and ctx.F.stats["solver"] != NE.NAME
    exact = SF.filtered_direction(_svd(M), R, damping=1e-14)
    assert torch.allclose(d, exact, rtol=1e-10, atol=0.0)
    # the step the normal equations would have given is far off: the fallback is what makes it right
    wrong = SF.filtered_direction(F, R, damping=1e-14)
    assert float((wrong - exact).norm()) > 1e-3 * float(exact.norm())


def test_factorize_takes_the_normal_equations_only_for_a_tall_jacobian_with_a_damping() -> None:
    M = _tall(400, 20, 10.0, seed=7)
    auto = truncpinv.Auto()
    assert factorize(M, auto, rank=None, rtol=None, atol=0.0, damping=1e-3).stats["solver"] == NE.NAME
    assert factorize(M, auto, rank=None, rtol=None, atol=0.0).stats["solver"] != NE.NAME  # no damping: the SVD
    assert factorize(M[:100], auto, rank=None, rtol=None, atol=0.0, damping=1e-3).stats["solver"] != NE.NAME
    assert factorize(M, truncpinv.DenseSVD(), rank=None, rtol=None, atol=0.0, damping=1e-3).stats["solver"] == "svd"


def _mlp_problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x = torch.linspace(-1, 1, 400, dtype=F64)[:, None]
    return model, x, torch.sinc(4 * x)


@pytest.mark.parametrize("control", ["trust_region", "adaptive"])
def test_a_sven_step_with_the_normal_equations_is_the_svd_step(control: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1-8-1 MLP at 400 points (25 parameters): the steps agree with the SVD's to the certified accuracy."""
    used: list[str] = []

    def spy(*args: object, **kwargs: object) -> truncpinv.TruncatedPinv:
        F = factorize(*args, **kwargs)  # type: ignore[arg-type]
        used.append(F.stats["solver"])
        return F

    monkeypatch.setattr("sven.optim.factorize", spy)
    thetas = []
    for normal in (True, False):
        model, x, y = _mlp_problem()
        ctl = (
            TrustRegion(normal_equations=normal)
            if control == "trust_region"
            else sven.control.AdaptiveDamping(1e-2, 10, floor=0.0, normal_equations=normal)
        )
        opt = sven.Sven(model.parameters(), residuals=True, control=ctl)
        for _ in range(4):
            opt.step(lambda: (model(x) - y)[:, 0])  # noqa: B023 (called at once)
        thetas.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert NE.NAME in used[:4] and NE.NAME not in used[4:]  # the first run used them, the second never
    scale = float(thetas[1].norm())
    assert float((thetas[0] - thetas[1]).norm()) <= 1e-3 * scale


def test_the_trust_region_takes_the_svd_for_a_step_the_normal_equations_cannot_resolve() -> None:
    """A linear fit with kappa = 1e8: factorised from the normal equations at the hint 1e-2, but the radius asks
    for the Gauss-Newton step (lambda = 0), which they cannot give: the try is the SVD's step, exactly."""
    from sven.control import Evaluator
    from sven.linearize.base import RowSpec

    A = _tall(400, 20, 1e8, seed=11)
    b = torch.randn(400, generator=torch.Generator().manual_seed(2), dtype=F64)
    w = torch.zeros(20, dtype=F64, requires_grad=True)
    R = (A @ w.detach() - b).detach()
    F = NE.factorize_normal(A, rank=None, rtol=None, atol=0.0, damping=1e-2)
    assert F is not None
    blocks = blocks_of_groups([{"params": [w], "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False}])
    ctx = step_context(
        F, R, A, blocks, state={w: {}}, precondition=None, loss=lambda: 0.0, reject=lambda: None,
        evaluate=Evaluator(lambda: (A @ w.detach() - b), RowSpec(residuals=True)), exact=lambda: _svd(A),
    )  # fmt: skip
    tr = TrustRegion()
    tr.radius = 1e30  # the Gauss-Newton step fits
    with torch.no_grad():  # as in Sven's step
        out = tr.run(ctx)
    assert not out.rejected and out.damping == 0.0
    assert ctx.F.stats["solver"] != NE.NAME
    exact = SF.filtered_direction(_svd(A), R, damping=0.0)
    assert torch.allclose(out.direction, exact, rtol=1e-9, atol=0.0)
    assert torch.allclose(w.detach(), -exact, rtol=1e-9, atol=0.0)
