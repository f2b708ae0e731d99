"""``torch.func`` on ``tp.lstsq`` and ``tp.pinv``: reverse mode is right, forward mode is a clear error.

truncpinv's results are differentiable through custom ``torch.autograd.Function``
objects with a backward pass only. Reverse-mode transforms (``torch.func.grad``,
``jacrev``) must give ``torch.linalg.pinv``'s derivatives where nothing is
truncated; forward mode (``jvp``, ``jacfwd``, ``torch.autograd.forward_ad``)
must be refused, never a silently zero tangent.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacfwd, jacrev, jvp

import truncpinv as tp

F64 = torch.float64
#: float64, condition of order 10: reverse-mode derivatives agree with torch.linalg.pinv's to this
TOL = 1e-8


def _problem(m: int = 7, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, n, dtype=F64, generator=g), torch.randn(m, dtype=F64, generator=g)


@pytest.mark.parametrize("solver", ["svd", "randomized", "lanczos", "lsmr", "auto"])
@pytest.mark.parametrize("shape", [(7, 4), (4, 7)])
def test_torch_func_grad_and_jacrev_equal_torch_linalg_pinv_s(solver: str, shape: tuple[int, int]) -> None:
    A, b = _problem(*shape)

    def ours(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return tp.lstsq(A, b, solver=solver)

    def ref(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.pinv(A) @ b

    for argnums in (0, 1, (0, 1)):
        got = grad(lambda A, b: ours(A, b).pow(2).sum(), argnums=argnums)(A, b)
        want = grad(lambda A, b: ref(A, b).pow(2).sum(), argnums=argnums)(A, b)
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    torch.testing.assert_close(jacrev(ours)(A, b), jacrev(ref)(A, b), rtol=TOL, atol=TOL)


def test_torch_func_grad_of_the_singular_values_is_svdvals_s() -> None:
    A, _ = _problem()
    got = jacrev(lambda A: tp.pinv(A, solver="svd").S)(A)
    torch.testing.assert_close(got, jacrev(torch.linalg.svdvals)(A), rtol=TOL, atol=TOL)


def test_forward_mode_is_refused_not_a_zero_tangent() -> None:
    A, b = _problem()
    with pytest.raises(NotImplementedError, match="`A` carries a forward-mode tangent"):
        jvp(lambda A: tp.lstsq(A, b), (A,), (torch.ones_like(A),))
    with pytest.raises(NotImplementedError, match="`b` carries a forward-mode tangent"):
        jacfwd(lambda b: tp.lstsq(A, b))(b)
    F = tp.pinv(A)
    with pytest.raises(NotImplementedError, match="`b` carries a forward-mode tangent"):
        jvp(lambda b: F @ b, (b,), (torch.ones_like(b),))
    with pytest.raises(NotImplementedError, match="`A` carries a forward-mode tangent"):
        jvp(lambda A: tp.lstsq(A, b, solver="lsmr"), (A,), (torch.ones_like(A),))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(A, torch.ones_like(A))
        with pytest.raises(NotImplementedError, match="reverse mode only"):
            tp.pinv(dual)
