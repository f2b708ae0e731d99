"""Batches of dense matrices ``(..., m, n)`` in ``tp.lstsq`` and ``tp.pinv`` (issue #24).

The facts: a batched result equals the loop over the batch, with ``b``
broadcast by :func:`torch.linalg.solve`'s rule; without truncation it equals
:func:`torch.linalg.pinv` (batched) and its gradients; matrix-free operators
have no batch and say so.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import truncpinv as tp

F64 = torch.float64


@st.composite
def batch_problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], bool]:
    """``(A, b, broadcast batch, b holds vectors)`` with batch dimensions that broadcast."""
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    a_batch = tuple(d if draw(st.booleans()) else 1 for d in batch)
    b_batch = tuple(d if draw(st.booleans()) else 1 for d in batch)[draw(st.integers(0, len(batch))) :]
    m, n = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    vector = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    A = torch.randn(*a_batch, m, n, generator=g, dtype=F64)
    if vector and b_batch != a_batch:
        b_batch = ()  # a batch of vectors must have exactly A.shape[:-1]; a single vector broadcasts
    b = torch.randn(*b_batch, m, *(() if vector else (2,)), generator=g, dtype=F64)
    full = tuple(torch.broadcast_shapes(a_batch, b_batch))
    return A, b, full, vector


def _loop(A: torch.Tensor, b: torch.Tensor, batch: tuple[int, ...], vector: bool, **kw: object) -> torch.Tensor:
    m, n = A.shape[-2:]
    A_e = A.expand(*batch, m, n)
    b_e = b.expand(*batch, *b.shape[-1 if vector else -2 :])
    out = [tp.lstsq(A_e[i], b_e[i], **kw) for i in np.ndindex(*batch)]  # type: ignore[arg-type]
    return torch.stack(out).reshape(*batch, *out[0].shape)


@settings(max_examples=25, deadline=None)
@given(problem=batch_problems(), solver=st.sampled_from(["svd", "gram", "auto", "randomized"]), rank=st.integers(1, 4))
def test_a_batch_equals_the_loop_over_it(
    problem: tuple[torch.Tensor, torch.Tensor, tuple[int, ...], bool], solver: str, rank: int
) -> None:
    A, b, batch, vector = problem
    x = tp.lstsq(A, b, rank=rank, solver=solver)
    ref = _loop(A, b, batch, vector, rank=rank, solver=solver)
    assert x.shape == ref.shape
    torch.testing.assert_close(x, ref, rtol=1e-13, atol=1e-13)  # the same computation, item by item
    F = tp.pinv(A, rank=rank, solver=solver)
    assert isinstance(F, tp.BatchedTruncatedPinv)
    torch.testing.assert_close(F @ b, ref, rtol=1e-12, atol=1e-12)


def test_without_truncation_a_batch_is_torch_linalg_pinv_with_its_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 7, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(3, 7, 2, generator=g, dtype=F64, requires_grad=True)
    x = tp.lstsq(A, b)
    y = torch.linalg.pinv(A) @ b
    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    w = torch.randn(x.shape, generator=g, dtype=F64)
    for got, ref in zip(torch.autograd.grad(x, (A, b), w), torch.autograd.grad(y, (A, b), w)):
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)
    F = tp.pinv(A)
    assert isinstance(F, tp.BatchedTruncatedPinv)
    torch.testing.assert_close(F.to_dense(), torch.linalg.pinv(A), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F.S, torch.linalg.svdvals(A), rtol=1e-12, atol=1e-12)
    assert F.ranks.shape == (2, 3) and F[1, 2].shape == (7, 4)


def test_ranks_differ_across_the_batch_and_s_is_zero_padded() -> None:
    A = torch.zeros(2, 4, 3, dtype=F64)
    A[0, :3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    A[1, 0, 0] = 5.0  # rank 1
    F = tp.pinv(A)
    assert isinstance(F, tp.BatchedTruncatedPinv)
    assert F.ranks.tolist() == [3, 1]
    torch.testing.assert_close(F.S, torch.tensor([[3.0, 2.0, 1.0], [5.0, 0.0, 0.0]], dtype=F64))


def test_numpy_batches_give_numpy_results() -> None:
    rng = np.random.default_rng(0)
    A, b = rng.standard_normal((3, 6, 4)), rng.standard_normal((3, 6))
    x = tp.lstsq(A, b)
    assert isinstance(x, np.ndarray) and x.shape == (3, 4)
    np.testing.assert_allclose(x, np.stack([np.linalg.lstsq(A[i], b[i], rcond=None)[0] for i in range(3)]),
                               rtol=1e-10, atol=1e-12)  # fmt: skip


def test_bad_batches_are_refused_with_the_rule() -> None:
    A = torch.ones(2, 3, 6, 4, dtype=F64)
    with pytest.raises(
        ValueError, match=re.escape("the batch dimensions of `A` (2, 3) (shape (2, 3, 6, 4)) and of `b` (4,)")
    ):
        tp.lstsq(A, torch.ones(4, 6, 1, dtype=F64))
    with pytest.raises(ValueError, match=r"`b` must have 6 rows to match the batch `A`"):
        tp.lstsq(A, torch.ones(2, 3, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"the batch of `A` must be non-empty, got batch dimensions \(0,\)"):
        tp.lstsq(torch.ones(0, 6, 4, dtype=F64), torch.ones(6, dtype=F64))
    with pytest.raises(ValueError, match=r"a matrix-free operator has no batch dimension.*shape \(2, 3, 6, 4\)"):
        tp.TensorOperator(A)


def test_a_batch_is_indexed_like_a_sequence_and_bad_indices_or_rhs_are_refused() -> None:
    A = torch.randn(2, 3, 5, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    F = tp.pinv(A)
    for index in [(1, 2), (-1, -1), (np.int64(1), np.int32(2)), (torch.tensor(1), 2)]:
        torch.testing.assert_close(F[index].to_dense(), torch.linalg.pinv(A[index]))
    G = tp.pinv(A[0])
    torch.testing.assert_close(G[np.int64(-1)].to_dense(), torch.linalg.pinv(A[0, 2]))
    for bad in [(2, 0), (0, -4), (1,), (0, 1.0), (True, 0)]:
        with pytest.raises(IndexError, match="batch of shape"):
            F[bad]
    for solve in (lambda b: tp.lstsq(A, b), lambda b: F @ b):
        with pytest.raises(TypeError, match=r"`b` must be a torch\.Tensor or a numpy\.ndarray"):
            solve([1.0] * 5)


def test_a_batch_transposes_and_retruncates_like_each_of_its_matrices() -> None:
    A = torch.randn(2, 3, 6, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    F = tp.pinv(A, solver="svd")
    torch.testing.assert_close(F.T.to_dense(), torch.linalg.pinv(A.mT))
    assert F.T.shape == (2, 3, 4, 6)
    G = F.truncate(rank=2)
    torch.testing.assert_close(G.to_dense(), tp.pinv(A, rank=2, solver="svd").to_dense())
    assert G.ranks.tolist() == [[2, 2, 2], [2, 2, 2]] and G.shape == F.shape
