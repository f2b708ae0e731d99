"""Batches of dense matrices ``(..., m, n)``: ``tp.pinv`` and ``tp.lstsq`` over the leading dimensions.

Each matrix of the batch is factorised on its own (its own rank, cut-off and
solver statistics), exactly as a loop over the batch would; the right-hand
side broadcasts against the batch dimensions as in :func:`torch.linalg.solve`:
``b`` is a batch of vectors when ``b.ndim == 1`` or
``b.shape == A.shape[:-1]``, and a batch of ``(m, k)`` matrices otherwise.
Gradients flow through the batch as through a single matrix
(:mod:`truncpinv._autograd`). Matrix-free operators have no batch dimension.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["BatchedTruncatedPinv", "is_batch", "lstsq_batched", "pinv_batched"]


def is_batch(A: Any) -> bool:
    """A dense tensor or array (or array-like) with more than two dimensions."""
    if isinstance(A, (torch.Tensor, np.ndarray)):
        return A.ndim > 2
    return False


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def _rhs_layout(A_shape: tuple[int, ...], b: Any) -> tuple[tuple[int, ...], bool]:
    """``(batch dimensions of b, whether b holds vectors)`` by :func:`torch.linalg.solve`'s rule."""
    if not isinstance(getattr(b, "shape", None), tuple | torch.Size):
        raise TypeError(
            f"`b` must be a torch.Tensor or a numpy.ndarray (or an object with `__array__` and `shape`, such as a "
            f"pandas DataFrame), got {type(b).__name__}"
        )
    bs = _shape(b)
    vector = len(bs) == 1 or bs == A_shape[:-1]
    if len(bs) == 0:
        raise ValueError(f"`b` must have shape (..., m) or (..., m, k), got a scalar of shape {bs}")
    m = A_shape[-2]
    rows = bs[-1] if vector else bs[-2]
    if rows != m:
        raise ValueError(
            f"`b` must have {m} rows to match the batch `A` of shape {A_shape}, got shape {bs} "
            f"(a batch of vectors has shape A.shape[:-1]; of matrices, (..., m, k))"
        )
    return (bs[:-1] if vector else bs[:-2]), vector


def _broadcast(
    A_batch: tuple[int, ...], b_batch: tuple[int, ...], A_shape: tuple[int, ...], bs: tuple[int, ...]
) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(A_batch, b_batch))
    except RuntimeError:
        raise ValueError(
            f"the batch dimensions of `A` {A_batch} (shape {A_shape}) and of `b` {b_batch} (shape {bs}) "
            f"do not broadcast"
        ) from None


def _expand(x: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(x, torch.Tensor):
        return x.expand(shape)
    return np.broadcast_to(np.asarray(x), shape)


def _stack(items: list[Any], batch: tuple[int, ...]) -> Any:
    if isinstance(items[0], np.ndarray):
        out = np.stack(items)
        return out.reshape(batch + out.shape[1:])
    t = torch.stack(items)
    return t.reshape(batch + tuple(t.shape[1:]))


def _is_int(i: Any) -> bool:
    """A Python or NumPy integer (not a bool), or a 0-dim integer tensor."""
    if isinstance(i, torch.Tensor):
        return i.ndim == 0 and not i.is_floating_point() and not i.is_complex() and i.dtype != torch.bool
    return isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_))


def _indices(batch: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    return itertools.product(*(range(d) for d in batch))


def _empty_batch(batch: tuple[int, ...]) -> None:
    if 0 in batch:
        raise ValueError(f"the batch of `A` must be non-empty, got batch dimensions {batch}")


def lstsq_batched(A: Any, b: Any, solve: Callable[[Any, Any], Any]) -> Any:
    """``solve(A[i], b[i])`` over the broadcast batch dimensions, stacked to ``(..., n)`` or ``(..., n, k)``."""
    As = _shape(A)
    b_batch, vector = _rhs_layout(As, b)
    bs = _shape(b)
    batch = _broadcast(As[:-2], b_batch, As, bs)
    _empty_batch(batch)
    A_e = _expand(A, batch + As[-2:])
    b_e = _expand(b, batch + (bs[-1:] if vector else bs[-2:]))
    return _stack([solve(A_e[i], b_e[i]) for i in _indices(batch)], batch)


class BatchedTruncatedPinv:
    """The truncated pseudoinverses of a batch of matrices ``(..., m, n)``, one :class:`TruncatedPinv` each.

    ``F[i]`` (a tuple index over the batch dimensions) is one factorisation;
    ``F @ b`` broadcasts ``b`` as :func:`torch.linalg.solve` does;
    ``F.to_dense()`` is ``(..., n, m)``; ``F.T`` and ``F.truncate(...)`` act on
    each matrix as :class:`TruncatedPinv`'s do. The ranks may differ across the batch:
    :attr:`ranks` holds them, and :attr:`S` pads each kept spectrum with zeros
    (the value ``g(sigma) = 0`` a discarded value has in the pseudoinverse) to
    the largest rank.
    """

    def __init__(self, items: list[Any], batch: tuple[int, ...], shape: tuple[int, int]) -> None:
        self._items = items
        self.batch = batch
        self.shape = batch + shape

    def __getitem__(self, index: tuple[int, ...] | int) -> Any:
        """The factorisation of ``A[index]``: one integer per batch dimension (negative ones count from the end)."""
        idx = (index,) if not isinstance(index, tuple) else index
        if len(idx) != len(self.batch) or not all(_is_int(i) for i in idx):
            raise IndexError(f"index a batch of shape {self.batch} with {len(self.batch)} integers, got {index!r}")
        norm = tuple(int(i) + d if int(i) < 0 else int(i) for i, d in zip(idx, self.batch))
        if not all(0 <= i < d for i, d in zip(norm, self.batch)):
            raise IndexError(f"index {index!r} is out of range for a batch of shape {self.batch}")
        return self._items[int(np.ravel_multi_index(norm, self.batch))]

    def __len__(self) -> int:
        return self.batch[0]

    @property
    def ranks(self) -> np.ndarray:
        """The kept rank of each matrix, shape ``batch``."""
        return np.array([F.rank for F in self._items], dtype=np.int64).reshape(self.batch)

    @property
    def S(self) -> Any:
        """``(..., max rank)`` kept singular values, zero-padded (differentiable as :attr:`TruncatedPinv.S`)."""
        width = max(F.rank for F in self._items)
        vals = [F.S for F in self._items]
        if isinstance(vals[0], np.ndarray):
            return _stack([np.pad(v, (0, width - v.shape[0])) for v in vals], self.batch)
        return _stack([torch.nn.functional.pad(v, (0, width - v.shape[0])) for v in vals], self.batch)

    def solve(self, b: Any) -> Any:
        """``A_r^+ b`` for each matrix of the batch, ``b`` broadcast (see the class docstring)."""
        A_shape = self.shape
        b_batch, vector = _rhs_layout(A_shape, b)
        bs = _shape(b)
        batch = _broadcast(self.batch, b_batch, A_shape, bs)
        _empty_batch(batch)
        b_e = _expand(b, batch + (bs[-1:] if vector else bs[-2:]))
        own = tuple(
            np.broadcast_to(np.arange(int(np.prod(self.batch))).reshape(self.batch), batch).reshape(-1).tolist()
        )
        return _stack([self._items[k] @ b_e[i] for k, i in zip(own, _indices(batch))], batch)

    def __matmul__(self, b: Any) -> Any:
        return self.solve(b)

    @property
    def T(self) -> BatchedTruncatedPinv:
        """The truncated pseudoinverses of the transposes ``A^T`` (of each matrix), reusing the factorisations."""
        return BatchedTruncatedPinv([F.T for F in self._items], self.batch, (self.shape[-1], self.shape[-2]))

    def truncate(
        self, *, rank: int | None = None, rtol: float | None = None, atol: float | None = None
    ) -> BatchedTruncatedPinv:
        """Each matrix re-thresholded as :meth:`TruncatedPinv.truncate`, without recomputing anything."""
        items = [F.truncate(rank=rank, rtol=rtol, atol=atol) for F in self._items]
        return BatchedTruncatedPinv(items, self.batch, (self.shape[-2], self.shape[-1]))

    def to_dense(self) -> Any:
        """``(..., n, m)``: the dense truncated pseudoinverses."""
        return _stack([F.to_dense() for F in self._items], self.batch)

    def __repr__(self) -> str:
        return f"BatchedTruncatedPinv(shape={self.shape}, ranks={self.ranks.reshape(-1).tolist()})"


def pinv_batched(A: Any, factorize: Callable[[Any], Any]) -> BatchedTruncatedPinv:
    """``factorize(A[i])`` for every matrix of the batch ``A`` ``(..., m, n)``."""
    As = _shape(A)
    batch = As[:-2]
    _empty_batch(batch)
    items = [factorize(A[i]) for i in _indices(batch)]
    return BatchedTruncatedPinv(items, batch, (As[-2], As[-1]))
