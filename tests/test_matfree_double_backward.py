"""``M X`` by double backward is refused, not silently wrong, when a backward step is not differentiable."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.function import once_differentiable

from sven.linearize.matfree import ClosureJacobian


class _OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


def test_a_once_differentiable_backward_is_refused_for_matmat_but_rmatmat_works() -> None:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    out = _OnceTanh.apply(lin(x)).reshape(-1)
    params = list(lin.parameters())
    op = ClosureJacobian(out, params)
    u = torch.randn(10, 1, generator=g, dtype=torch.float64)
    exact = torch.autograd.grad(out, params, grad_outputs=u[:, 0], retain_graph=True)
    torch.testing.assert_close(op.rmatmat(u)[:, 0], torch.cat([e.reshape(-1) for e in exact]))
    with pytest.raises(RuntimeError, match="double-backward trick is not available"):
        op.matmat(torch.randn(8, 1, generator=g, dtype=torch.float64))


def test_an_ordinary_graph_still_gives_m_x() -> None:
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    out = lin(x).tanh().reshape(-1)
    params = list(lin.parameters())
    J = torch.func.jacrev(lambda w, b: torch.nn.functional.linear(x, w, b).tanh().reshape(-1), argnums=(0, 1))(
        *[p.detach() for p in params]
    )
    J = torch.cat([J[0].reshape(10, -1), J[1].reshape(10, -1)], dim=1)
    X = torch.randn(8, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ClosureJacobian(out, params).matmat(X), J @ X)
