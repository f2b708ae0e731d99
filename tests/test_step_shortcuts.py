"""The short paths of a Sven step on a small problem give the long paths' steps, to round-off.

* the direct float64 SVD of a Jacobian of at most ``DIRECT_SIDE`` columns (:mod:`sven.factorize`) against
  ``truncpinv.Auto``;
* the one-pass double-backward columns of :func:`sven.linearize.dense.autograd_jacobian` against the chunked
  :class:`~sven.linearize.matfree.ClosureJacobian` and ``torch.func.jacrev``;
* whole Sven steps (trust region and adaptive damping) with both against the long paths.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sven
import sven.factorize
import sven.linearize.dense as dense
import truncpinv
from sven import functional as SF
from sven.factorize import DIRECT_SIDE, factorize
from sven.trust_region import TrustRegion

F64 = torch.float64


def _matrix(m: int, n: int, log_kappa: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64)).Q
    s = torch.logspace(0.0, -log_kappa, k, dtype=F64)
    return ((U * s) @ V.T).to(dtype)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 60),
    n=st.integers(1, DIRECT_SIDE),
    log_kappa=st.floats(0.0, 5.0),
    damping=st.sampled_from([0.0, 1e-6, 1e-2, 1.0]),
    dtype=st.sampled_from([torch.float32, F64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_direct_svd_gives_the_solvers_directions(
    m: int, n: int, log_kappa: float, damping: float, dtype: torch.dtype, seed: int
) -> None:
    M = _matrix(m, n, log_kappa, seed, dtype)
    R = torch.randn(m, generator=torch.Generator().manual_seed(seed + 1), dtype=F64).to(dtype)
    rtol = 1e-6 if dtype == F64 else 1e-3  # a cut-off far from the spectrum (at most 1e-5 relative)
    F = factorize(M, truncpinv.Auto(), rank=None, rtol=rtol, atol=0.0)
    assert F.stats.get("direct") is True
    ref = truncpinv.Auto().factorize(M, rtol=rtol)
    assert F.rank == ref.rank
    eps = torch.finfo(dtype).eps
    kappa = 10.0 ** min(log_kappa, -math.log10(rtol))
    tol = 50.0 * max(m, n) * eps * kappa
    assert torch.allclose(F.S, ref.S, rtol=tol, atol=0.0)
    mine, theirs = SF.filtered_direction(F, R, damping=damping), SF.filtered_direction(ref, R, damping=damping)
    assert float((mine - theirs).norm()) <= tol * kappa * float(theirs.norm()) + 1e-30
    assert float(SF.gradient_cosine(F, R)) == pytest.approx(float(SF.gradient_cosine(ref, R)), rel=tol, abs=tol)


def test_the_direct_svd_is_only_for_a_few_columns() -> None:
    M = _matrix(40, DIRECT_SIDE + 1, 1.0, 0, F64)
    assert "direct" not in factorize(M, truncpinv.Auto(), rank=None, rtol=None, atol=0.0).stats
    assert "direct" not in factorize(M[:, :3], truncpinv.DenseSVD(), rank=None, rtol=None, atol=0.0).stats


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 40), p=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_the_one_pass_columns_are_the_jacobian(n: int, p: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, n + p, dtype=F64)
    z0 = torch.randn(p, generator=gen, dtype=F64)

    def fun(z: torch.Tensor) -> torch.Tensor:
        return torch.sin(z.sum() * t) * torch.exp(-(z**2).sum() * t) + z[0] * t**2

    z = z0.clone().requires_grad_(True)
    J = dense.autograd_jacobian(fun(z), [z])
    ref = torch.func.jacrev(fun)(z0)
    assert torch.allclose(J, ref, rtol=1e-12, atol=1e-13)


class _Square(torch.autograd.Function):
    """``x^2`` whose backward does not record its own derivative (``once_differentiable``)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2.0 * x * g


def test_a_backward_without_a_derivative_falls_back_to_the_rows() -> None:
    t = torch.linspace(0, 1, 30, dtype=F64)
    z = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=True)
    J = dense.autograd_jacobian(_Square.apply(z[0] * t + z[1]), [z])
    expected = torch.stack([2 * (0.5 * t - 1.0) * t, 2 * (0.5 * t - 1.0)], dim=1)
    assert torch.allclose(J, expected, rtol=1e-12, atol=0.0)


def _trajectory(control: str, steps: int) -> torch.Tensor:
    t = torch.linspace(0, 1, 100, dtype=F64)
    y = 2.0 * torch.exp(-3.0 * t) + 0.01 * torch.sin(50 * t)
    x = torch.nn.Parameter(torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    opt = sven.Sven([x], residuals=True, control=TrustRegion() if control == "trust_region" else None)
    path = []
    for _ in range(steps):
        opt.step(lambda: x[0] * torch.exp(-x[1] * t) + x[2] - y)
        path.append(x.detach().clone())
    return torch.stack(path)


@pytest.mark.parametrize("control", ["trust_region", "adaptive"])
def test_sven_steps_equal_the_long_paths_steps(control: str, monkeypatch: pytest.MonkeyPatch) -> None:
    short = _trajectory(control, 6)
    monkeypatch.setattr(sven.factorize, "DIRECT_SIDE", 0)  # truncpinv's solver
    monkeypatch.setattr(dense, "COLUMN_CHUNK", 1)  # the ClosureJacobian columns
    long = _trajectory(control, 6)
    assert torch.allclose(short, long, rtol=1e-10, atol=1e-12)
