"""truncpinv never returns a result silently detached from an input that requires grad (issue #24).

Before: ``tp.lstsq(A, b)`` with ``A.requires_grad`` returned an ``x`` whose graph
reached ``b`` only, and ``A.grad`` stayed ``None``; ``tp.lstsq(op, b)`` by LSMR
cut ``b``'s graph too. Now a dense ``A`` is differentiable on every solver
(the values are checked in ``tests/test_autograd.py``), and what cannot be
differentiated (a matrix-free operator or Gram matrix that requires grad, the
singular vectors, a NumPy result) is refused with a message that says how to
proceed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import truncpinv as tp


def _A(m: int = 12, n: int = 5, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, n, generator=g, dtype=torch.float64).requires_grad_(grad)


@pytest.mark.parametrize("solver", [*sorted(tp.SOLVERS), "lsmr"])
@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
def test_every_solver_reaches_a_dense_a_that_requires_grad(solver: str, shape: tuple[int, int]) -> None:
    A = _A(*shape)
    b = torch.ones(shape[0], dtype=torch.float64, requires_grad=True)
    x = tp.lstsq(A, b, solver=solver)
    assert x.requires_grad
    (gA, gb) = torch.autograd.grad(x.sum(), (A, b))
    assert float(gA.abs().max()) > 0 and float(gb.abs().max()) > 0
    if solver != "lsmr":
        F = tp.pinv(A, solver=solver)
        assert F.requires_grad and F.S.requires_grad and (F @ b).requires_grad and F.to_dense().requires_grad


def test_operators_and_gram_inputs_that_require_grad_are_refused() -> None:
    A = _A()
    with pytest.raises(NotImplementedError, match=r"`A` requires grad.*matrix-free.*A.detach\(\)"):
        tp.pinv(tp.TensorOperator(A), rank=2, solver="lanczos")
    with pytest.raises(NotImplementedError, match="`A` requires grad"):
        tp.lstsq(tp.TensorOperator(A), torch.ones(12, dtype=torch.float64))
    K = (A @ A.T).detach().requires_grad_(True)
    with pytest.raises(NotImplementedError, match="`K` requires grad"):
        tp.pinv_from_gram(K, A.detach())
    with pytest.raises(NotImplementedError, match="`operator` requires grad"):
        tp.pinv_from_gram((A @ A.T).detach(), A)


def test_lsmr_keeps_the_gradient_of_b_for_a_matrix_free_a() -> None:
    A = _A().detach()
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    x = tp.lstsq(tp.TensorOperator(A), b)  # auto -> LSMR for an operator
    assert x.requires_grad
    x.sum().backward()
    # x = A^+ b is linear in b: d(sum x)/db = (A^+)^T 1
    ref = torch.linalg.pinv(A).T @ torch.ones(5, dtype=torch.float64)
    assert b.grad is not None and torch.allclose(b.grad, ref, rtol=1e-8, atol=1e-10)


def test_what_cannot_carry_the_gradient_is_refused() -> None:
    A = _A()
    F = tp.pinv(A)
    for attr in ("U", "V", "Vh"):
        with pytest.raises(NotImplementedError, match=rf"`F.{attr}` is not differentiable.*A.detach\(\)"):
            getattr(F, attr)
    with pytest.raises(NotImplementedError, match=r"`F.approximation\(\)` is not differentiable"):
        F.approximation()
    with pytest.raises(TypeError, match=r"`b` is a NumPy array.*torch.as_tensor\(b\)"):
        F @ np.ones(12)


def test_detached_a_or_no_grad_mode_solves_and_b_keeps_its_gradient() -> None:
    A = _A()
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    x = tp.lstsq(A.detach(), b)
    x.sum().backward()
    # x = A^+ b is linear in b: d(sum x)/db = (A^+)^T 1, the same as torch.linalg.pinv's
    ref = torch.linalg.pinv(A.detach()).T @ torch.ones(5, dtype=torch.float64)
    assert b.grad is not None and torch.allclose(b.grad, ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        y = tp.lstsq(A, b.detach())
        F = tp.pinv(A)
    assert not y.requires_grad and not F.requires_grad
    np.testing.assert_allclose(y.numpy(), np.linalg.lstsq(A.detach().numpy(), b.detach().numpy(), rcond=None)[0],
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    assert F.U.shape == (12, 5)  # vectors are available where no gradient is recorded
