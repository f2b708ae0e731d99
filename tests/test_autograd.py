"""Gradients of the truncated pseudoinverse through a dense ``A`` (issue #24), checked against facts.

* finite differences (``gradcheck``, ``gradgradcheck``) of ``tp.lstsq`` itself,
  on matrices with a clean gap at the cut (so that finite differences stay on
  one branch of the truncation), tall, wide, rank-deficient, at and below the
  numerical rank, for every solver;
* where nothing is truncated, the gradients of ``torch.linalg.pinv``;
* below the rank, the gradient of ``V_r S_r^{-1} U_r^T b`` through
  ``torch.linalg.svd`` (distinct values), an independent derivation;
* the damped LSMR solution against ``(A^T A + damp^2 I)^{-1} A^T b``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import truncpinv as tp
from tests.registry import SHAPES
from tests.strategies import gapped_spectra, matrix_with_spectrum
from truncpinv._svd_grad import svd

F64 = torch.float64
SOLVERS = sorted(tp.SOLVERS)
#: gradients agree with an exact reference to this (float64, condition <= 10 on the kept part)
GRAD_TOL = 1e-8


def _spectral(m: int, n: int, s: list[float], seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(matrix_with_spectrum(m, n, np.asarray(s, dtype=np.float64), seed))


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = GRAD_TOL) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


def _grads(f: Callable[..., torch.Tensor], *args: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """The gradients of ``<w, f(args)>`` for a fixed random ``w``."""
    args = tuple(a.detach().requires_grad_(True) for a in args)
    out = f(*args)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, args, w)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(2, 6),
    n=st.integers(2, 6),
    data=st.data(),
    solver=st.sampled_from(SOLVERS),
    by_rank=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lstsq_passes_gradcheck_and_gradgradcheck(
    m: int, n: int, data: st.DataObject, solver: str, by_rank: bool, seed: int
) -> None:
    """First and second derivatives in ``A`` and ``b`` match finite differences of ``tp.lstsq`` itself.

    The dropped values are exactly zero (rank deficiency) or lie a factor 100
    below the kept ones, and the cut-off ``rtol`` sits in that gap, so a
    perturbation of ``1e-6`` keeps the same values: the truncation at or below
    the numerical rank, given as ``rank=r`` or as the ``rtol``. Second
    derivatives go through torch.linalg.svd's backward, which needs distinct
    nonzero values: checked when they are (zeros may repeat).
    """
    s, r, rtol = data.draw(gapped_spectra(min(m, n), kappa_max=10.0, cond_max=1e3, gap=10.0), label="spectrum")
    A = torch.from_numpy(matrix_with_spectrum(m, n, s, seed)).requires_grad_(True)
    b = torch.randn(m, 2, generator=torch.Generator().manual_seed(seed), dtype=F64).requires_grad_(True)
    kw = {"rank": r, "rtol": 1e-3 * rtol} if by_rank else {"rtol": rtol}

    def f(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return tp.lstsq(A, b, solver=solver, **kw)  # type: ignore[arg-type]

    assert torch.autograd.gradcheck(f, (A, b), atol=1e-6, rtol=1e-5, fast_mode=True)
    nonzero = s[s > 0]
    if np.all(np.diff(nonzero) < -1e-2 * nonzero[0]):
        assert torch.autograd.gradgradcheck(f, (A, b), atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize(
    ("shape", "spectrum", "kw"),
    [
        ((7, 4), [3.0, 2.0, 1.5, 1.0], {}),  # tall, full rank, nothing truncated
        ((4, 7), [3.0, 2.0, 1.0, 0.0], {"rtol": 1e-3}),  # wide, rank-deficient, at the numerical rank
        ((7, 5), [3.0, 2.0, 1.0, 0.0, 0.0], {"rank": 2}),  # tall, rank-deficient, below it
        ((6, 6), [3.0, 2.0, 1.0, 1e-2, 1e-3, 0.0], {"rank": 3}),  # square, below a gap of 100
    ],
)
@pytest.mark.parametrize("solver", ["svd", "lanczos"])
def test_full_gradcheck_and_gradgradcheck(
    shape: tuple[int, int], spectrum: list[float], kw: dict[str, float], solver: str
) -> None:
    """The whole Jacobians (not a random projection) of the first and second derivatives."""
    A = _spectral(*shape, spectrum, seed=4).requires_grad_(True)
    b = torch.randn(shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=F64).requires_grad_(True)

    def f(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return tp.lstsq(A, b, solver=solver, **kw)  # type: ignore[arg-type]

    assert torch.autograd.gradcheck(f, (A, b), atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradgradcheck(f, (A, b), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("solver", [*SOLVERS, "lsmr"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_without_truncation_the_gradients_are_torch_linalg_pinvs(solver: str, shape: tuple[int, int]) -> None:
    m, n = shape
    q = min(m, n)
    A = _spectral(m, n, list(np.geomspace(1.0, 0.1, q)))
    b = torch.randn(m, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = _grads(lambda A, b: tp.lstsq(A, b, solver=solver), A, b)
    ref = _grads(lambda A, b: torch.linalg.pinv(A) @ b, A, b)
    for g, h in zip(got, ref):
        _assert_close(g, h)
    if solver != "lsmr":  # the factorisation's pieces: F.S against svdvals, F.to_dense() against pinv
        _assert_close(_grads(lambda A: tp.pinv(A, solver=solver).S, A)[0], _grads(torch.linalg.svdvals, A)[0])
        _assert_close(_grads(lambda A: tp.pinv(A, solver=solver).to_dense(), A)[0], _grads(torch.linalg.pinv, A)[0])
        c = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=F64)
        for g, h in zip(  # F.T is the pseudoinverse of A^T
            _grads(lambda A, c: tp.pinv(A, solver=solver).T @ c, A, c),
            _grads(lambda A, c: torch.linalg.pinv(A.T) @ c, A, c),
        ):
            _assert_close(g, h)


def _truncated_by_svd(A: torch.Tensor, b: torch.Tensor, r: int) -> torch.Tensor:
    """``V_r S_r^{-1} U_r^T b`` through torch.linalg.svd's own backward (distinct values)."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return Vh[:r].T @ ((U[:, :r].T @ b) / S[:r, None])


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_below_the_rank_the_gradients_are_those_of_the_kept_triplets(solver: str, shape: tuple[int, int]) -> None:
    m, n = shape
    q = min(m, n)
    s = [*np.geomspace(2.0, 1.0, 4), *np.geomspace(1e-2, 1e-3, q - 4)]  # gap 100 after 4 distinct values
    A = _spectral(m, n, s, seed=3)
    b = torch.randn(m, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = _grads(lambda A, b: tp.lstsq(A, b, rank=4, solver=solver), A, b)
    ref = _grads(lambda A, b: _truncated_by_svd(A, b, 4), A, b)
    for g, h in zip(got, ref):
        _assert_close(g, h)


def test_equal_kept_values_cost_nothing() -> None:
    """Kept values that coincide (where torch.linalg.svd's backward divides by zero) give finite gradients.

    Full rank: torch.linalg.pinv's (its backward needs no SVD). Truncated below
    the repeated values: finite differences, which are valid since the gap at
    the cut is clean.
    """
    A = _spectral(7, 5, [1.0, 1.0, 1.0, 0.5, 0.5])
    b = torch.randn(7, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = _grads(lambda A, b: tp.lstsq(A, b), A, b)
    ref = _grads(lambda A, b: torch.linalg.pinv(A) @ b, A, b)
    for g, h in zip(got, ref):
        _assert_close(g, h)
    A = _spectral(6, 5, [1.0, 1.0, 1.0, 1e-3, 0.0]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A: tp.lstsq(A, b[:6], rank=3), (A,), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(9, 5), (5, 9)])
@pytest.mark.parametrize("deficient", [False, True])
def test_damped_lsmr_is_differentiated_as_ridge_regression(shape: tuple[int, int], deficient: bool) -> None:
    m, n = shape
    s = [2.0, 1.0, 0.5, 0.0, 0.0] if deficient else [2.0, 1.0, 0.5, 0.3, 0.2]
    A = _spectral(m, n, s, seed=2)
    b = torch.randn(m, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    damp = 0.7
    solver = tp.LSMR(damp=damp, tol=1e-14)

    def ridge(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(A.T @ A + damp**2 * torch.eye(n, dtype=F64), A.T @ b)

    for g, h in zip(_grads(lambda A, b: tp.lstsq(A, b, solver=solver), A, b), _grads(ridge, A, b)):
        _assert_close(g, h)
    A.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda A: tp.lstsq(A, b, solver=solver), (A,), atol=1e-6, rtol=1e-5)


def test_float32_gradients_keep_the_dtypes_of_the_inputs() -> None:
    A = _spectral(8, 5, [2.0, 1.5, 1.0, 0.7, 0.5]).float().requires_grad_(True)
    b = torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=F64).requires_grad_(True)
    x = tp.lstsq(A, b)
    assert x.dtype == F64  # NumPy's promotion
    gA, gb = torch.autograd.grad(x.sum(), (A, b))
    assert gA.dtype == torch.float32 and gb.dtype == F64
    A64 = A.detach().double().requires_grad_(True)
    (gA64,) = torch.autograd.grad((torch.linalg.pinv(A64) @ b.detach()).sum(), (A64,))
    _assert_close(gA.double(), gA64, tol=1e-5)


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_exactly_zero_singular_values_keep_second_derivatives_finite(shape: tuple[int, int]) -> None:
    """Zero rows and columns give exactly zero singular values (torch.linalg.svd's backward: 0/0 = NaN there)."""
    m, n = shape
    A = torch.zeros(m, n, dtype=F64)
    A[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    A.requires_grad_(True)
    b = torch.randn(m, 2, generator=torch.Generator().manual_seed(0), dtype=F64).requires_grad_(True)
    for kw in ({"rank": 2}, {"rtol": 1e-3}):

        def f(A: torch.Tensor, b: torch.Tensor, kw: dict[str, float] = kw) -> torch.Tensor:
            return tp.lstsq(A, b, **kw)  # type: ignore[arg-type]

        assert torch.autograd.gradgradcheck(f, (A, b), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [F64, torch.complex128])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_the_safe_svd_backward_is_torch_linalg_svds_on_distinct_values(
    shape: tuple[int, int], dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(*shape, generator=g, dtype=dtype)
    W = torch.randn(*shape, generator=g, dtype=dtype)

    def loss(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
        # depends on U, V only through gauge-invariant products, as the spectral filters do
        return ((U[:, :3] * S[:3] ** 2) @ Vh[:3] * W).real.sum() + (S**3).sum() + (U[:, :2] @ U[:, :2].mH).abs().sum()

    got = _grads(lambda A: loss(*svd(A)), A)[0]
    ref = _grads(lambda A: loss(*torch.linalg.svd(A, full_matrices=False)), A)[0]
    _assert_close(got, ref, tol=1e-10)


@pytest.mark.parametrize("solver", ["svd", "randomized"])
def test_the_factorisations_pieces_pass_gradcheck_and_gradgradcheck(solver: str) -> None:
    """``F.S``, ``F.singular_values``, ``F.to_dense()`` and ``F.T @ c`` of a rank-deficient ``A`` cut below a gap."""
    A = _spectral(7, 5, [3.0, 2.0, 1.0, 1e-2, 0.0], seed=5).requires_grad_(True)
    c = torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=F64).requires_grad_(True)

    def pieces(A: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        F = tp.pinv(A, rank=3, solver=solver)
        assert isinstance(F, tp.TruncatedPinv)
        return F.S, F.singular_values[:3], F.to_dense(), F.T @ c

    assert torch.autograd.gradcheck(pieces, (A, c), atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradgradcheck(pieces, (A, c), atol=1e-6, rtol=1e-5)
