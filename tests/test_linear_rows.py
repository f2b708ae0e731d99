r"""Rows linear in a tensor with a graph (:class:`sven.linearize.base.LinearRows`): the Gram route's backward passes
start at that tensor, and the rows get no graph of their own unless a fallback or the verification needs one.

The loss rule's GGN rows of softmax cross-entropy are such rows (linear in :math:`\log p`). The cotangent
``coef[:, d]`` at :math:`\log p` is what the rows' own backward hands it for the cotangent ``e_d``, so the
factors, ``K`` and every product are the same numbers on both paths (the test allows round-off).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sven.linearize import Declined, GramJacobian, LayerGram, LinearRows, Unsupported
from sven.linearize.dense import autograd_jacobian
from sven.loss_rule import CrossEntropyRows

from .strategies import seeds


def _problem(seed: int, B: int, C: int, width: int, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, width), nn.GELU(), nn.Linear(width, C)).to(dtype)
    x = torch.randn(B, 3, generator=gen, dtype=dtype)
    return net, x, torch.randint(0, C, (B,), generator=gen)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    scale = max(float(b.abs().max()), 1e-30)
    return a.shape == b.shape and float((a - b).abs().max()) <= rel * scale


@given(seed=seeds(), B=st.integers(1, 9), C=st.integers(2, 6), width=st.integers(1, 7),
       dtype=st.sampled_from([torch.float32, torch.float64]))  # fmt: skip
def test_the_head_gives_the_rows_own_gram_and_products(seed: int, B: int, C: int, width: int, dtype: torch.dtype):
    """``K``, ``J^T C``, ``J X`` and the rows through :meth:`CrossEntropyRows.linear` (the head) against the same
    spec hidden behind a plain callable (the rows' own graph), and against the autograd Jacobian of the rows."""
    net, x, y = _problem(seed, B, C, width, dtype)
    params = list(net.parameters())
    spec = CrossEntropyRows()

    def closure() -> torch.Tensor:
        return F.cross_entropy(net(x), y, reduction="none")

    fast = LayerGram()(closure, params, rows=spec)
    assert spec.found and torch.equal(spec.output(fast.output), closure().detach())  # kept, as by a call
    plain = LayerGram()(closure, params, rows=lambda out: spec(out))  # (not a RowSpec: no head)
    assert isinstance(fast, GramJacobian) and isinstance(plain, GramJacobian)
    eps = torch.finfo(dtype).eps
    assert torch.equal(fast.output, plain.output)
    assert _close(fast.gram, plain.gram, 16 * eps)
    gen = torch.Generator().manual_seed(seed + 1)
    Cm = torch.randn(2 * B, 2, generator=gen, dtype=dtype)
    Xm = torch.randn(fast.shape[1], 2, generator=gen, dtype=dtype)
    assert _close(fast.rmatmat(Cm), plain.rmatmat(Cm), 16 * eps)
    assert _close(fast.matmat(Xm), plain.matmat(Xm), 16 * eps)
    rows = spec(closure())
    J = autograd_jacobian(rows, params).double()
    assert _close(fast.gram, J @ J.T, 1e3 * eps)


def test_the_head_path_can_fail():
    """Not vacuous: a head whose coefficients are off changes ``K``."""
    net, x, y = _problem(0, 6, 4, 5, torch.float64)
    params = list(net.parameters())
    spec = CrossEntropyRows()

    class Off(CrossEntropyRows):
        def linear(self, out: object) -> LinearRows | None:
            head = spec.linear(out)
            return None if head is None else LinearRows(head.base, 2 * head.coef, head.values)

    def closure() -> torch.Tensor:
        return F.cross_entropy(net(x), y, reduction="none")

    good = LayerGram(verify=False)(closure, params, rows=spec)
    bad = LayerGram(verify=False)(closure, params, rows=Off())
    assert isinstance(good, GramJacobian) and isinstance(bad, GramJacobian)
    assert not torch.allclose(good.gram, bad.gram)


def test_an_unsupported_model_gets_the_rows_with_their_graph():
    """A fallback needs the rows' graph: :class:`Unsupported` carries the rows, built from the head, and their
    autograd Jacobian is the rows' own."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 4).double()
    scale = nn.Parameter(torch.ones(4, dtype=torch.float64))  # a bare parameter: not a layer the route supports
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    spec = CrossEntropyRows()
    params = [*lin.parameters(), scale]

    def closure() -> torch.Tensor:
        return F.cross_entropy(lin(x) * scale, y, reduction="none")

    res = LayerGram()(closure, params, rows=spec)
    assert isinstance(res, Unsupported) and res.output.requires_grad
    ref = spec(closure())
    assert torch.equal(res.output.detach(), ref.detach())
    assert torch.allclose(autograd_jacobian(res.output, params), autograd_jacobian(ref, params), atol=1e-14)
    declined = LayerGram()(closure, params[:2], rows=spec, max_rows=1)  # (more rows than that: declined)
    assert isinstance(declined, Declined) and declined.output.requires_grad
    assert torch.equal(declined.output.detach(), ref.detach())


@pytest.mark.parametrize("options", [{"ignore_index": 2}, {"weight": torch.tensor([1.0, 0.5, 2.0, 1.0])}], ids=str)
def test_weighted_or_ignored_losses_take_the_rows_own_graph(options: dict):
    """The general builder's rows (class weights, an ignored target present) have no head: the route uses them."""
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([2, 0, 1, 3, 2, 1])
    spec = CrossEntropyRows()
    assert spec.linear(F.cross_entropy(z, y, reduction="none", **options)) is None
    assert spec.linear(F.cross_entropy(z, y, reduction="none")) is not None
    assert spec.linear(((z - 1) ** 2).sum(1)) is None
