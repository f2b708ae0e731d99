"""Jacobians through double backward: the tall ``autograd_jacobian`` (column by column) and matrix-free ``M X``.

Both rely on differentiating the backward pass once more; where a backward step
is not differentiable (a ``once_differentiable`` autograd.Function) the result
must be refused or replaced, never silently wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.function import once_differentiable

from sven.linearize.dense import autograd_jacobian
from sven.linearize.matfree import ClosureJacobian


def _rows_one_by_one(out: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for i in range(out.shape[0]):
        gs = torch.autograd.grad(out[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel(), dtype=out.dtype) if g is None else g.reshape(-1)
                               for p, g in zip(params, gs)]))  # fmt: skip
    return torch.stack(rows)


def _pinn(n: int = 60) -> tuple[torch.nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    x = torch.rand(n, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    u = net(x)[:, 0]
    (gu,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(gu[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2))
    out = torch.cat([lap + torch.sin(math.pi * x[:, 0]), 0.1 * u])  # 2n rows, 25 parameters
    return net, out


def test_a_tall_jacobian_with_input_derivatives_matches_the_rows() -> None:
    net, out = _pinn()
    params = list(net.parameters())
    assert out.shape[0] > sum(p.numel() for p in params)
    ref = _rows_one_by_one(out, params)
    torch.testing.assert_close(autograd_jacobian(out, params), ref, rtol=1e-10, atol=1e-12)


class _NoDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


def test_an_operation_without_double_backward_falls_back_to_the_rows() -> None:
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    out = _NoDoubleBackward.apply(lin(x)).reshape(-1)  # 80 rows, 8 parameters
    params = list(lin.parameters())
    ref = _rows_one_by_one(out, params)  # (the rows path frees the graph)
    torch.testing.assert_close(autograd_jacobian(out, params), ref, rtol=1e-10, atol=1e-12)


def test_a_once_differentiable_backward_is_refused_for_matmat_but_rmatmat_works() -> None:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    out = _NoDoubleBackward.apply(lin(x)).reshape(-1)
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


class _HalfDetachedBackward(torch.autograd.Function):
    """``2 x``, whose backward records only half of itself: the double backward silently misses the rest."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return 2 * x

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        with torch.no_grad():
            h = g * 1.0
        return g + h  # the right value, 2 g, but only g is differentiable in g


def test_the_free_probe_check_catches_silently_wrong_columns() -> None:
    # the columns from the double graph are half the truth, yet the graph exists (nothing raises); the value of
    # g(u) = J^T u recorded at the probe is exact, so the check sees the difference and the rows are used
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    out = _HalfDetachedBackward.apply(lin(x)).reshape(-1)  # 60 rows, 8 parameters: the column path
    params = list(lin.parameters())
    ref = _rows_one_by_one(out, params)
    op = ClosureJacobian(out, params, probe=torch.randn(60, generator=g, dtype=torch.float64), batching="batched")
    cols = op.matmat(torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(2 * cols, ref)  # what the check must catch: half of each column
    torch.testing.assert_close(autograd_jacobian(out, params), ref, rtol=1e-10, atol=1e-12)


def test_a_probe_of_the_wrong_shape_is_refused() -> None:
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    out = torch.stack([w[0] * w[1], w[0], w[1]])
    with pytest.raises(ValueError, match=r"`probe` must have shape \(3,\) like `out`"):
        ClosureJacobian(out, [w], probe=torch.zeros(2, dtype=torch.float64))
    u = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    op = ClosureJacobian(out, [w], probe=u)
    torch.testing.assert_close(op.probe_vjp(), op.rmatmat(u[:, None])[:, 0])  # the probe's value is M^T u
