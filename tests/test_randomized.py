"""Focused tests of :class:`truncpinv.RandomizedSVD`: seeds, field validation, accuracy of the sketched path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import truncpinv as tp

from .spectra import jac_like


def _reference_solution(A: torch.Tensor, b: torch.Tensor, rank: int, rtol: float) -> torch.Tensor:
    """``x = V_r S_r^{-1} U_r^T b`` from the float64 SVD of ``A`` (as given), truncated like the solver."""
    U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    r = min(rank, int((S > rtol * S[0]).sum()))
    return Vh[:r].T @ ((U[:, :r].T @ b.double()) / S[:r])


def _rel_err(x: torch.Tensor, x_ref: torch.Tensor) -> float:
    return float((x.double() - x_ref).norm() / x_ref.norm())


@pytest.fixture(scope="module")
def jac() -> torch.Tensor:
    """A 64 x 2000 Jacobian-like float32 matrix, sigma_i ~ 0.8^i (``jac_like`` of docs/tasks.md)."""
    return torch.from_numpy(jac_like(64, 2000, 0.8, seed=3))


def _factors(F: tp.TruncatedPinv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return F.U, F.S, F.V


def test_same_seed_is_bit_identical_and_another_seed_differs(jac: torch.Tensor) -> None:
    F1, F2 = (tp.RandomizedSVD(seed=5).factorize(jac, rank=8, rtol=1e-3) for _ in range(2))
    assert not F1.stats["exact"]  # the sketched path, not the exact fallback
    for a, b in zip(_factors(F1), _factors(F2)):
        assert torch.equal(a, b)
    F3 = tp.RandomizedSVD(seed=6).factorize(jac, rank=8, rtol=1e-3)
    assert not torch.equal(F1.U, F3.U)
    torch.testing.assert_close(F3.S, F1.S, rtol=1e-5, atol=0)  # different sketch, same answer


def test_generator_seed_is_used_and_advanced(jac: torch.Tensor) -> None:
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    Fa = tp.RandomizedSVD(seed=g1).factorize(jac, rank=8, rtol=1e-3)
    Fb = tp.RandomizedSVD(seed=g2).factorize(jac, rank=8, rtol=1e-3)
    assert torch.equal(Fa.U, Fb.U) and torch.equal(Fa.V, Fb.V)
    Fc = tp.RandomizedSVD(seed=g1).factorize(jac, rank=8, rtol=1e-3)  # g1 has moved on
    assert not torch.equal(Fa.U, Fc.U)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"oversample": -1}, r"`oversample` must be a non-negative integer, got -1"),
        ({"oversample": 2.5}, r"`oversample` must be a non-negative integer, got 2.5"),
        ({"power_iters": -2}, r"`power_iters` must be a non-negative integer, got -2"),
        ({"power_iters": None}, r"`power_iters` must be a non-negative integer, got None"),
        ({"power_iters": True}, r"`power_iters` must be a non-negative integer, got True"),
        ({"block_krylov": 1}, r"`block_krylov` must be True or False, got 1"),
        ({"seed": -3}, r"`seed` must be a non-negative integer, a torch.Generator or None, got -3"),
        ({"seed": "0"}, r"`seed` must be a non-negative integer, a torch.Generator or None, got '0'"),
    ],
)
def test_invalid_fields_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tp.RandomizedSVD(**kwargs)  # type: ignore[arg-type]


# Measured on this matrix, 30 seeds, wide and tall: max relative error 3.6e-7 (float32), 1.6e-9 (float64).
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.float64, 2e-8)], ids=str)
@pytest.mark.parametrize("block_krylov", [True, False], ids=["krylov", "subspace"])
def test_solution_matches_float64_reference(
    jac: torch.Tensor, dtype: torch.dtype, tol: float, block_krylov: bool
) -> None:
    A = jac.to(dtype)
    b = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x_ref = _reference_solution(A, b, 8, 1e-3)
    F = tp.RandomizedSVD(block_krylov=block_krylov).factorize(A, rank=8, rtol=1e-3)
    assert F.stats["certified"] and F.rank == 8 and F.dtype == dtype
    assert _rel_err(F @ b, x_ref) < tol
    # the tall matrix: the same factorisation with U and V swapped
    Ft = tp.RandomizedSVD(block_krylov=block_krylov).factorize(A.T, rank=8, rtol=1e-3)
    assert _rel_err(Ft.T @ b, x_ref) < tol
    U, V = F.U.double(), F.V.double()
    eye = torch.eye(8, dtype=torch.float64)
    assert float((U.T @ U - eye).abs().max()) < 10 * tol and float((V.T @ V - eye).abs().max()) < 10 * tol


def test_operator_input_matches_dense(jac: torch.Tensor) -> None:
    A = jac.double()
    b = torch.randn(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    F_dense = tp.RandomizedSVD(tol=1e-6).factorize(A, rank=8, rtol=1e-3)
    F_op = tp.RandomizedSVD(tol=1e-6).factorize(tp.TensorOperator(A), rank=8, rtol=1e-3)
    assert F_op.stats["matvecs"] == F_dense.stats["matvecs"] > 0
    torch.testing.assert_close(F_op @ b, F_dense @ b, rtol=1e-10, atol=0)
    F_op_tall = tp.RandomizedSVD(tol=1e-6).factorize(tp.TensorOperator(A.T), rank=8, rtol=1e-3)
    torch.testing.assert_close(F_op_tall.T @ b, F_dense @ b, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_full_rank_request_is_exact(jac: torch.Tensor, dtype: torch.dtype) -> None:
    """With the search space as large as the short side, no sketch is drawn and the result is exact."""
    A = jac[:, :300].to(dtype)
    F = tp.RandomizedSVD().factorize(A, rtol=0.0)
    assert F.stats["exact"] and F.rank == 64
    s_ref = np.linalg.svd(A.double().numpy(), compute_uv=False)
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(F.S.double().numpy(), s_ref, rtol=0, atol=50 * eps * s_ref[0])


def test_zero_matrix_has_rank_zero_without_nan() -> None:
    A = torch.zeros(80, 500)
    F = tp.RandomizedSVD().factorize(A, rank=4)
    assert not F.stats["exact"] and F.rank == 0
    assert bool(torch.isfinite(F.singular_values).all()) and bool((F.singular_values == 0).all())
    x = F @ torch.ones(80)
    assert bool((x == 0).all())
