"""The loss rule's prediction from the factors (sven/factored_model.py) equals the product with M to round-off."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sven
import truncpinv as tp
from sven import factored_model
from sven.factored_model import exact_model, model_change
from sven.functional import filtered_direction

from .spectra import KINDS, make_matrix


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(12, 30), (24, 60), (20, 20), (30, 12)]),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    rank=st.sampled_from([None, 3, 7]),
    rtol=st.sampled_from([1e-6, 1e-2, 0.1]),
    damping=st.sampled_from([0.0, 1e-3, 0.03, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_model_change_is_the_product_with_m(shape, kind, dtype, rank, rtol, damping, seed) -> None:  # type: ignore[no-untyped-def]
    """M d_lambda from the factors equals M @ d_lambda, truncated (rank, rtol) and rank-deficient spectra too."""
    m, n = shape
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32 and rtol < 1e-2:  # float32 products lose kappa * eps of M d: keep kappa <= 100
        rtol = 1e-2
    A, *_ = make_matrix(m, n, kind, seed)
    M = torch.tensor(A * 3.0, dtype=dtype)  # (sigma_max = 3: the scale is not 1)
    K = M.double() @ M.double().T  # as the Gram route: float64 from the factors' dtype
    F_ = tp.pinv_from_gram(K, M, rank=rank, rtol=rtol)
    assert exact_model(F_)
    R = torch.randn(m, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    got = model_change(F_, R, damping=damping)
    want = M.double() @ filtered_direction(F_, R, damping=damping).double()
    kappa = float(F_.S[0] / F_.S[-1]) if F_.rank > 0 else 1.0
    # the product M d rounds |M| |d| <= kappa |R| (times the inner dimension); the factors round |R|, and the
    # float64 eigenpairs' residual eps |K| becomes eps kappa^2 |R| in M V_r = U_r S_r (undamped; damped: less)
    eps64 = torch.finfo(torch.float64).eps
    tol = 10 * (eps * (n * kappa + m) + eps64 * kappa**2) * float(R.double().norm())
    assert float((got.double() - want).norm()) <= tol
    assert got.dtype == dtype and got.shape == (m,)


def test_model_change_with_nothing_kept_is_zero() -> None:
    M = torch.zeros(4, 6, dtype=torch.float64)
    F_ = tp.pinv_from_gram(M @ M.T, M)
    assert F_.rank == 0
    zero = torch.zeros(4, dtype=torch.float64)
    assert torch.equal(model_change(F_, torch.ones(4, dtype=torch.float64), damping=0.03), zero)


def test_only_the_exact_eigendecomposition_qualifies() -> None:
    M = torch.randn(6, 9, dtype=torch.float64)
    assert exact_model(tp.pinv_from_gram(M @ M.T, M))
    assert not exact_model(tp.pinv_from_gram(M @ M.T, M, solver=tp.RandomizedSVD(seed=0)))
    assert not exact_model(tp.pinv(M))


# ----------------------------------------------------------------------------- in the optimizer
def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 48), nn.Tanh(), nn.Linear(48, 5)).double()


def _batches(steps: int, n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 20, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g))
            for _ in range(steps)]  # fmt: skip


def _run(old: bool, steps: int = 6, **kw: float) -> tuple[list[float], list[float], torch.Tensor, int]:
    """Gain ratios, dampings, final parameters and the number of factored predictions of a run."""
    net, calls = _mlp(), [0]
    opt = sven.Sven(net.parameters(), **kw)
    real = factored_model.model_change

    def counted(*a, **k):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real(*a, **k)

    rho, lam = [], []
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(factored_model, "model_change", counted))
        if old:  # the reference: every prediction a product with M
            stack.enter_context(mock.patch.object(factored_model, "exact_model", lambda F: False))
        for x, y in _batches(steps):
            opt.step(lambda: F.cross_entropy(net(x), y, reduction="none"))  # noqa: B023
            rho.append(float(opt.last_step.gain_ratio))
            lam.append(opt.last_step.damping)
    return rho, lam, torch.cat([p.detach().reshape(-1) for p in net.parameters()]), calls[0]


def test_the_rule_steps_as_with_the_product_with_m() -> None:
    """The loss rule's run with the factored prediction equals the run with M's products to round-off."""
    rho, lam, theta, calls = _run(old=False)
    rho0, lam0, theta0, calls0 = _run(old=True)
    assert calls >= 6 and calls0 == 0  # the shortcut was taken on every try, and the reference never took it
    assert all(math.isfinite(r) for r in rho)
    np.testing.assert_allclose(rho, rho0, rtol=1e-9, atol=1e-12)
    assert lam == pytest.approx(lam0, rel=1e-12)
    torch.testing.assert_close(theta, theta0, rtol=1e-10, atol=1e-12)


def test_momentum_keeps_the_product_with_m() -> None:
    """Its carry enters the prediction, which the factors do not hold: the context's own predict is used."""
    *_, calls = _run(old=False, steps=2, ggn=True, momentum=0.5)
    assert calls == 0


def test_weight_decay_is_outside_the_judged_step_and_keeps_the_factored_prediction() -> None:
    """Decoupled weight decay comes after the kept step (sven/update.py): every prediction is the factored one, the
    control judges the same tries as without it, and each step is the undecayed step minus ``lr w theta_t``."""
    rho, lam, theta, calls = _run(old=False, steps=1, ggn=True, weight_decay=1e-2)
    rho0, lam0, theta0, _ = _run(old=True, steps=1, ggn=True, weight_decay=0.0)
    assert calls >= 1
    np.testing.assert_allclose(rho, rho0, rtol=1e-9)
    assert lam == lam0
    start = torch.cat([p.detach().reshape(-1) for p in _mlp().parameters()])
    lr = sven.loss_rows.RULE_PRESET["lr"]
    torch.testing.assert_close(theta, theta0 - lr * 1e-2 * start, rtol=1e-10, atol=1e-12)
