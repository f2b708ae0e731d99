"""The short paths of a Sven step on a small problem give the long paths' steps, to round-off.

* the direct float64 SVD of a Jacobian of at most ``DIRECT_SIDE`` columns (:mod:`sven.factorize`) against
  ``truncpinv.Auto``;
* the one-pass double-backward columns of :func:`sven.linearize.dense.autograd_jacobian` against the chunked
  :class:`~sven.linearize.matfree.ClosureJacobian` and ``torch.func.jacrev``;
* the NumPy arithmetic of small CPU tensors (:func:`sven.functional.host`: finiteness, norms, filtered
  directions, the stationarity angle, the column scaling, the Jacobian's check, the rank count) against torch's;
* whole Sven steps (trust region and adaptive damping) with all of them against the long paths, on random
  curve fits of up to ``DIRECT_SIDE`` parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sven
import sven.factorize
import sven.linearize.dense as dense
import truncpinv
import truncpinv._tolerance as tolerance
from sven import functional as SF
from sven.factorize import DIRECT_SIDE, factorize
from sven.precondition import column_norms
from sven.trust_region import TrustRegion

F64 = torch.float64


def _matrix(m: int, n: int, log_kappa: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64)).Q
    s = torch.logspace(0.0, -log_kappa, k, dtype=F64)
    return ((U * s) @ V.T).to(dtype)


#: Small damped problems: M (m x n, condition up to 1e5), a damping, a dtype and a seed.
_SMALL_PROBLEMS = given(
    m=st.integers(1, 60),
    n=st.integers(1, DIRECT_SIDE),
    log_kappa=st.floats(0.0, 5.0),
    damping=st.sampled_from([0.0, 1e-6, 1e-2, 1.0]),
    dtype=st.sampled_from([torch.float32, F64]),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=40, deadline=None)
@_SMALL_PROBLEMS
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


def _long_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every short path of this file off: truncpinv's solver, the chunked columns, torch for small tensors."""
    monkeypatch.setattr(sven.factorize, "DIRECT_SIDE", 0)  # truncpinv's solver
    monkeypatch.setattr(dense, "COLUMN_CHUNK", 1)  # the ClosureJacobian columns
    monkeypatch.setattr(SF, "HOST_SMALL", -1)  # torch's arithmetic for every tensor
    monkeypatch.setattr(tolerance, "_HOST_SMALL", -1)


def _trajectory(control: str, steps: int, p: int = 3, seed: int = -1) -> tuple[torch.Tensor, list[float]]:
    """The parameters after each step of a fit, and the relative decrease of ``||r||^2`` by each step.

    ``seed=-1``: the benchmark's fit of ``a exp(-b t) + c`` to 100 points; otherwise the well-conditioned
    quadratic residuals ``r = A z + (B z)^2 / 2 - y`` of ``p`` parameters and 100 rows, ``A``, ``B`` and ``y``
    drawn from ``seed`` (Gaussian; ``y`` a solution plus noise, so the minimum is not a zero residual).
    """
    gen = torch.Generator().manual_seed(max(seed, 0))
    t = torch.linspace(0, 1, 100, dtype=F64)
    A, B = torch.randn(100, p, generator=gen, dtype=F64), torch.randn(100, p, generator=gen, dtype=F64)
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64) if seed < 0 else torch.zeros(p, dtype=F64)
    z_true = torch.randn(p, generator=gen, dtype=F64)
    y = (A @ z_true + 0.5 * (B @ z_true) ** 2 + 0.1 * torch.randn(100, generator=gen, dtype=F64)) if seed >= 0 else (
        2.0 * torch.exp(-3.0 * t) + 0.01 * torch.sin(50 * t))  # fmt: skip

    def fun(z: torch.Tensor) -> torch.Tensor:
        if seed < 0:
            return z[0] * torch.exp(-z[1] * t) + z[2] - y
        return A @ z + 0.5 * (B @ z) ** 2 - y

    x = torch.nn.Parameter(x0)
    opt = sven.Sven([x], residuals=True, control=TrustRegion() if control == "trust_region" else None)
    path, decrease = [], []
    for _ in range(steps):
        before = float(opt.step(lambda: fun(x)).pow(2).sum())
        with torch.no_grad():
            after = float(fun(x).pow(2).sum())
        path.append(x.detach().clone())
        decrease.append((before - after) / before)
    return torch.stack(path), decrease


def _same_steps(short: tuple[torch.Tensor, list[float]], long: tuple[torch.Tensor, list[float]]) -> int:
    """How many leading steps agree to round-off; the comparison ends after the first step that decreased
    ``||r||^2`` by less than 1e-9 of itself: the next gain ratio is then round-off, and so is its decision."""
    (a, da), (b, _) = short, long
    n = 0
    for i in range(a.shape[0]):
        assert torch.allclose(a[i], b[i], rtol=1e-9, atol=1e-12), f"step {i + 1}: {a[i]} against {b[i]}"
        n += 1
        if abs(da[i]) < 1e-9:
            break
    return n


@pytest.mark.parametrize("control", ["trust_region", "adaptive"])
def test_sven_steps_equal_the_long_paths_steps(control: str, monkeypatch: pytest.MonkeyPatch) -> None:
    short = _trajectory(control, 6)
    _long_paths(monkeypatch)
    long = _trajectory(control, 6)
    assert _same_steps(short, long) >= 3


@settings(max_examples=12, deadline=None)
@given(
    p=st.integers(1, DIRECT_SIDE),
    seed=st.integers(0, 2**31 - 1),
    control=st.sampled_from(["trust_region", "adaptive"]),
)
def test_random_fits_take_the_long_paths_steps(p: int, seed: int, control: str) -> None:
    short = _trajectory(control, 8, p, seed)
    with pytest.MonkeyPatch.context() as mp:
        _long_paths(mp)
        long = _trajectory(control, 8, p, seed)
    assert _same_steps(short, long) >= 4  # (they converge in 5 to 8 steps)


@settings(max_examples=40, deadline=None)
@_SMALL_PROBLEMS
def test_numpy_arithmetic_of_small_tensors_is_torchs(
    m: int, n: int, log_kappa: float, damping: float, dtype: torch.dtype, seed: int
) -> None:
    M = _matrix(m, n, log_kappa, seed, dtype)
    R = torch.randn(m, generator=torch.Generator().manual_seed(seed + 1), dtype=F64).to(dtype)
    u = torch.randn(m, generator=torch.Generator().manual_seed(seed + 2), dtype=F64).to(dtype)
    F = factorize(M, truncpinv.Auto(), rank=None, rtol=1e-3, atol=0.0)
    assert SF.host(M) is not None and SF.host(M.requires_grad_(True)) is None
    M.requires_grad_(False)
    bad = M.clone()
    bad[m // 2, n // 2] = float("nan")
    host = (SF.squared_norm(R), SF.filtered_direction(F, R, damping=damping), float(SF.gradient_cosine(F, R)),
            column_norms(M), SF.all_finite(M, R), SF.all_finite(R, bad), dense.vjp_agrees(M, u, M.T @ u),
            dense.vjp_agrees(M, u, M.T @ u + 1e-2 * u[:n].abs().sum()), tolerance.select_rank(F.singular_values,
            cutoff=float(F.singular_values[0]) * 0.5, rank=n))  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SF, "HOST_SMALL", -1)
        mp.setattr(tolerance, "_HOST_SMALL", -1)
        assert SF.host(M) is None
        ref = (SF.squared_norm(R), SF.filtered_direction(F, R, damping=damping), float(SF.gradient_cosine(F, R)),
               torch.linalg.vector_norm(M, dim=0), SF.all_finite(M, R), SF.all_finite(R, bad),
               dense.vjp_agrees(M, u, M.T @ u), dense.vjp_agrees(M, u, M.T @ u + 1e-2 * u[:n].abs().sum()),
               tolerance.select_rank(F.singular_values, cutoff=float(F.singular_values[0]) * 0.5, rank=n))  # fmt: skip
    eps = torch.finfo(dtype).eps
    assert host[0] == pytest.approx(ref[0], rel=1e-12)  # accumulated in float64 both ways
    assert torch.allclose(host[1], ref[1], rtol=100 * m * eps, atol=100 * m * eps * float(ref[1].abs().max()))
    assert host[2] == pytest.approx(ref[2], rel=100 * m * eps, abs=100 * m * eps)
    assert torch.allclose(host[3], ref[3], rtol=10 * m * eps, atol=0.0)
    assert host[4:] == ref[4:] and host[4] and not host[5] and host[6]
    # (the perturbed product is off by 1e-2 of |u| against a bound of 1e3 eps |J|^T |u|: always rejected)
    assert not host[7]


@pytest.mark.parametrize("scale", [1e200, 1e-150, 1.0])
def test_column_norms_survive_squares_that_overflow(scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for M in (torch.randn(50, 4, generator=gen, dtype=F64), torch.randn(100, 80, generator=gen, dtype=F64)):
        exact = torch.from_numpy(np.linalg.norm(M.numpy(), axis=0)) * scale  # the norms of M * scale
        big = M * scale
        norms = column_norms(big)
        # 1e200: the squares overflow, the norms do not; 1e-150: the squares are near the smallest normal number
        assert torch.allclose(norms, exact, rtol=1e-13, atol=0.0)
        assert torch.equal(column_norms(torch.zeros(5, 3, dtype=F64)), torch.zeros(3, dtype=F64))


def test_tensors_inside_torch_func_keep_torchs_path() -> None:
    seen: list[object] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(SF.host(x.detach()))  # a wrapper without storage of its own: no NumPy view
        assert tolerance.select_rank(x.detach(), cutoff=1.5, rank=3) == 2
        return (x**2).sum()

    g = torch.func.grad(f)(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    assert seen == [None] and torch.equal(g, torch.tensor([6.0, 4.0, 2.0], dtype=F64))
    assert SF.host(torch.ones(3, dtype=F64)) is not None
