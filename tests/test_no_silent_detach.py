"""truncpinv never returns a result silently detached from an ``A`` that requires grad (issue #24, first part).

Its factorisations run without an autograd graph, so before this check
``tp.lstsq(A, b)`` with ``A.requires_grad`` returned an ``x`` whose graph
reached ``b`` only and ``A.grad`` stayed ``None``. Now every entry point that
takes a matrix refuses such an ``A`` while autograd records, and says how to
proceed; gradients with respect to ``b`` still flow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import truncpinv as tp


def _A(m: int = 12, n: int = 5, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, n, generator=g, dtype=torch.float64).requires_grad_(grad)


@pytest.mark.parametrize("solver", sorted(tp.SOLVERS))
@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
def test_a_matrix_that_requires_grad_is_refused_by_every_solver(solver: str, shape: tuple[int, int]) -> None:
    A = _A(*shape)
    b = torch.ones(shape[0], dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"`A` requires grad.*A.detach\(\)"):
        tp.lstsq(A, b, solver=solver)
    with pytest.raises(NotImplementedError, match="`A` requires grad"):
        tp.pinv(A, solver=solver)
    assert A.grad is None


def test_operators_and_gram_inputs_that_require_grad_are_refused() -> None:
    A = _A()
    with pytest.raises(NotImplementedError, match="`A` requires grad"):
        tp.pinv(tp.TensorOperator(A), rank=2, solver="lanczos")
    K = (A @ A.T).detach().requires_grad_(True)
    with pytest.raises(NotImplementedError, match="`K` requires grad"):
        tp.pinv_from_gram(K, A.detach())
    with pytest.raises(NotImplementedError, match="`operator` requires grad"):
        tp.pinv_from_gram((A @ A.T).detach(), A)


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
    np.testing.assert_allclose(y.numpy(), np.linalg.lstsq(A.detach().numpy(), b.detach().numpy(), rcond=None)[0],
                               rtol=1e-10, atol=1e-12)  # fmt: skip
