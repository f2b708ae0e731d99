"""Complex input (complex64, complex128) for the dense solvers (issue #24).

Facts: without truncation the results and their gradients are
:func:`torch.linalg.pinv`'s; truncated, the result is ``V_r S_r^{-1} U_r^H b``
from :func:`torch.linalg.svd`; a real pseudoinverse applied to a complex ``b``
maps the real and imaginary parts apart; the iterative solvers and LSMR, and
complex operators, are refused with a message that names the way out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import truncpinv as tp
from tests.registry import SHAPES

C128, C64 = torch.complex128, torch.complex64
TOL = {C128: 1e-10, C64: 1e-4}
REAL_ONLY = ["gram", "randomized", "lobpcg", "lanczos"]


def _randn(*shape: int, dtype: torch.dtype = C128, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", [C128, C64])
@pytest.mark.parametrize("solver", ["svd", "auto"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_complex_results_are_torch_linalg_pinvs(shape: tuple[int, int], solver: str, dtype: torch.dtype) -> None:
    m, n = shape
    A, b = _randn(m, n, dtype=dtype), _randn(m, 3, dtype=dtype, seed=1)
    tol = TOL[dtype]
    ref = torch.linalg.pinv(A)
    F = tp.pinv(A, solver=solver)
    assert F.dtype == dtype and F.S.dtype == dtype.to_real()
    torch.testing.assert_close(F.to_dense(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(tp.lstsq(A, b, solver=solver), ref @ b, rtol=tol, atol=tol)
    torch.testing.assert_close(F.T.to_dense(), torch.linalg.pinv(A.T), rtol=tol, atol=tol)
    torch.testing.assert_close(F.S, torch.linalg.svdvals(A), rtol=tol, atol=tol)
    torch.testing.assert_close((F.U * F.S) @ F.Vh, A, rtol=tol, atol=tol * float(A.abs().max()))


@pytest.mark.parametrize("shape", [(9, 6), (6, 9)])
def test_truncated_complex_solution_is_that_of_the_kept_triplets(shape: tuple[int, int]) -> None:
    A, b = _randn(*shape), _randn(shape[0], seed=2)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    ref = Vh[:3].mH @ ((U[:, :3].mH @ b) / S[:3])
    torch.testing.assert_close(tp.lstsq(A, b, rank=3), ref, rtol=1e-10, atol=1e-12)


def test_complex_gradients_are_torch_linalg_pinvs_and_pass_gradcheck() -> None:
    A = _randn(7, 4).requires_grad_(True)
    b = _randn(7, 2, seed=1).requires_grad_(True)
    w = _randn(4, 2, seed=3)
    got = torch.autograd.grad(tp.lstsq(A, b), (A, b), w)
    ref = torch.autograd.grad(torch.linalg.pinv(A) @ b, (A, b), w)
    for g, h in zip(got, ref):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-10)

    def f(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return tp.lstsq(A, b, rank=3)

    assert torch.autograd.gradcheck(f, (A, b), atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradgradcheck(f, (A, b), atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda A: tp.pinv(A).S, (A,), atol=1e-6, rtol=1e-5)


def test_a_complex_batch_is_torch_linalg_pinv() -> None:
    A, b = _randn(2, 3, 6, 4), _randn(2, 3, 6, seed=1)  # a batch of vectors: b.shape == A.shape[:-1]
    torch.testing.assert_close(tp.lstsq(A, b), (torch.linalg.pinv(A) @ b[..., None])[..., 0], rtol=1e-10, atol=1e-12)


def test_mixed_real_and_complex() -> None:
    A = _randn(8, 5, dtype=torch.float64)
    b = _randn(8, 2, seed=1)
    x = tp.lstsq(A, b)  # a real pseudoinverse maps the real and imaginary parts apart
    assert x.dtype == C128
    torch.testing.assert_close(x, torch.complex(tp.lstsq(A, b.real), tp.lstsq(A, b.imag)), rtol=0, atol=0)
    F = tp.pinv(tp.TensorOperator(A), solver="gram")  # implicit V: products with the real operator
    torch.testing.assert_close(F @ b, torch.linalg.pinv(A).to(C128) @ b, rtol=1e-10, atol=1e-12)
    A_req = A.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A: tp.lstsq(A, b), (A_req,))  # a real gradient of Re <w, x>
    Ac = _randn(8, 5).requires_grad_(True)
    br = b.real.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A, b: tp.lstsq(A, b), (Ac, br))


def test_numpy_complex_gives_numpy_complex() -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 4)) + 1j * rng.standard_normal((6, 4))
    b = rng.standard_normal(6) + 1j * rng.standard_normal(6)
    x = tp.lstsq(A, b)
    assert isinstance(x, np.ndarray) and x.dtype == np.complex128
    np.testing.assert_allclose(x, np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", [*REAL_ONLY, "lsmr"])
def test_real_only_solvers_refuse_complex_input(solver: str) -> None:
    A = _randn(8, 5)
    with pytest.raises(
        TypeError, match=rf"`A` must be real \(float32 or float64\) for solver '{solver}'.*solver='svd'"
    ):
        tp.lstsq(A, _randn(8, seed=1), solver=solver)
    if solver == "lsmr":
        with pytest.raises(TypeError, match=r"`b` must be real \(float32 or float64\) for solver 'lsmr'"):
            tp.lstsq(A.real.contiguous(), _randn(8, seed=1), solver=solver)


def test_complex_operators_are_refused() -> None:
    with pytest.raises(TypeError, match=r"a matrix-free `A` must be real.*pass the dense complex matrix"):
        tp.pinv(tp.TensorOperator(_randn(8, 5)), rank=2, solver="lanczos")
