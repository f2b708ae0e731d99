"""The loss rule's fast path for the common graph (:func:`sven.loss_rows.top_class_rows`) against the general
builder (:func:`sven.loss_rows.ggn_rows` of :func:`sven.loss_rows.cross_entropy_targets`).

The fast path makes the same floating-point operations on the same factors (its docstring), so the values and the
derivatives agree to a few ulps of their own size (bitwise on this machine; a few ulps leave room for another
vectorisation of the same elementwise functions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sven import loss_rows
from sven.loss_rows import cross_entropy_targets, ggn_rows, top_class_rows
from sven.loss_rule import recognise


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(float(b.abs().max()), float(torch.finfo(b.dtype).tiny)) if b.numel() else 1.0
    return (
        a.shape == b.shape
        and float(
            (a - b).abs().max(),
        )
        <= 4 * float(torch.finfo(b.dtype).eps) * scale
    )


def _rows_and_jacobian(build, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The ``(B, 2)`` rows from ``build(logp)`` and, per column, the gradient of its sum at the logits."""
    z = z.detach().requires_grad_()
    rows = build(torch.log_softmax(z, 1))
    return rows.detach(), [torch.autograd.grad(rows[:, d].sum(), z, retain_graph=True)[0] for d in range(2)]


#: Both paths of the fast rows: the detached arithmetic in NumPy (small CPU batches) or in torch (limit 0).
PATHS = pytest.mark.parametrize("limit", [loss_rows._HOST_SMALL, 0], ids=["numpy", "torch"])


@PATHS
@given(
    B=st.integers(1, 40),
    C=st.integers(2, 12),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 100.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_fast_rows_are_the_general_rows(limit: int, B: int, C: int, scale: float, dtype: torch.dtype, seed: int):
    """Values and the Jacobian at the logits, on random logits (large scales: probabilities that underflow, where
    the clamp of ``1/sqrt(p)`` acts) and random targets."""
    gen = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(B, C, generator=gen, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=gen)

    def general(logp: torch.Tensor) -> torch.Tensor:
        return ggn_rows(logp, *cross_entropy_targets(logp, y), 1)

    ref, ref_jac = _rows_and_jacobian(general, z)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loss_rows, "_HOST_SMALL", limit)
        got, jac = _rows_and_jacobian(lambda logp: top_class_rows(logp, y), z)
    assert _close(got, ref)
    assert all(_close(a, b) for a, b in zip(jac, ref_jac))


@PATHS
def test_the_fast_path_can_fail(limit: int):
    """Not vacuous: the comparison tells rows of the opposite sign apart."""
    z, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    logp = torch.log_softmax(z, 1)
    ref = ggn_rows(logp, *cross_entropy_targets(logp, y), 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loss_rows, "_HOST_SMALL", limit)
        assert not _close(-top_class_rows(logp, y), ref)


@pytest.mark.parametrize(
    "options", [{}, {"ignore_index": 2}, {"weight": torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0])}], ids=str
)
def test_recognised_losses_take_the_rows_of_the_general_builder(options: dict):
    """:meth:`sven.loss_rule.CrossEntropyLosses.rows`: the fast path where it applies (no weight, nothing ignored),
    the general builder otherwise (weights, an ignored target present): the same rows either way."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(12, 5, generator=gen).requires_grad_()
    y = torch.randint(0, 5, (12,), generator=gen)
    y[0] = 2
    ce = recognise(F.cross_entropy(z, y, reduction="none", **options))
    assert ce is not None
    q, s = cross_entropy_targets(
        ce.logp, y, weight=options.get("weight"), ignore_index=options.get("ignore_index", -100)
    )
    ref = ggn_rows(ce.logp, q, s, 1).reshape(-1)
    got = ce.rows()
    assert _close(got.detach(), ref.detach())
    for d in range(2):
        go = torch.zeros(12, 2)
        go[:, d] = 1
        a = torch.autograd.grad(got, z, go.reshape(-1), retain_graph=True)[0]
        b = torch.autograd.grad(ref, z, go.reshape(-1), retain_graph=True)[0]
        assert _close(a, b)


def test_a_small_cpu_batch_takes_the_numpy_path():
    """The ``numpy`` cases above test that path: a small CPU batch takes it, an accelerator-sized one does not."""
    z, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    lp = torch.log_softmax(z, 1)
    p = lp.exp()
    top = p.topk(1, dim=-1).indices
    assert loss_rows._host_coefficients(lp, p, y, top) is not None
    big = torch.log_softmax(torch.randn(1000, 10), 1)
    assert loss_rows._host_coefficients(big, big.exp(), torch.zeros(1000, dtype=torch.long), top) is None
