"""Matrix-free linear operators.

An operator only has to provide ``shape``, ``dtype``, ``device``,
``matmat(X)`` (``A @ X`` for an ``n x r`` tensor ``X``) and ``rmatmat(Y)``
(``A^T @ Y`` for an ``m x r`` tensor ``Y``). :func:`aslinearoperator` adapts
dense tensors, NumPy arrays, SciPy sparse matrices and
:class:`scipy.sparse.linalg.LinearOperator` objects to this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["CallableOperator", "LinearOperator", "ScipyOperator", "TensorOperator", "aslinearoperator"]


@runtime_checkable
class LinearOperator(Protocol):
    """The matrix-free protocol: an ``m x n`` real linear map ``A``."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` for ``X`` of shape ``(n, r)``; returns ``(m, r)``."""
        ...

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """``A^T @ Y`` for ``Y`` of shape ``(m, r)``; returns ``(n, r)``."""
        ...


class OperatorView:
    """Base of an operator that wraps another one, ``op``: ``shape``, ``dtype`` and ``device`` are ``op``'s."""

    def __init__(self, op: Any) -> None:
        self.op = op

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.op.shape[0]), int(self.op.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype  # type: ignore[no-any-return]

    @property
    def device(self) -> torch.device:
        return torch.device(self.op.device)


class AdjointOperator(OperatorView):
    """The adjoint ``A^H`` of an operator ``A``: its products swapped."""

    @property
    def shape(self) -> tuple[int, int]:
        m, n = self.op.shape
        return (int(n), int(m))

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.op.rmatmat(X)
        return out

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.op.matmat(Y)
        return out


class TensorOperator:
    """A dense ``torch.Tensor`` seen as an operator (``matmat`` is ``A @ X``)."""

    def __init__(self, A: torch.Tensor) -> None:
        if isinstance(A, torch.Tensor) and A.ndim != 2:
            raise ValueError(
                f"a matrix-free operator has no batch dimension: `A` must be 2-D, got shape {tuple(A.shape)}; "
                f"pass a dense batch (..., m, n) to tp.pinv / tp.lstsq directly, or loop over it"
            )
        if isinstance(A, torch.Tensor) and A.layout in (torch.sparse_bsr, torch.sparse_bsc) and A.device.type == "cpu":
            raise ValueError(
                f"`A` has layout {A.layout}, whose transposed product torch does not implement on the CPU (every "
                f"solver needs A^T Y); convert it with `A.to_sparse_coo().to_sparse_csr()`"
            )
        self.A = A

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.A.shape[0]), int(self.A.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.A @ X

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self.A.t() @ Y  # ``.T`` of a sparse CSR/CSC tensor is refused ("as_strided"); ``.t()`` is not


def _check_shape(shape: Any) -> tuple[int, int]:
    """``shape`` as two non-negative Python integers (NumPy integers accepted), or a ValueError naming it."""
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    ok = len(dims) == 2 and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) and d >= 0 for d in dims
    )
    if not ok:
        raise ValueError(f"`shape` must be a pair (m, n) of non-negative integers, got {shape!r}")
    return (int(dims[0]), int(dims[1]))


class CallableOperator:
    """An operator built from two functions.

    Example:
        >>> import torch, truncpinv as tp
        >>> A = torch.randn(5, 7, dtype=torch.float64)
        >>> op = tp.CallableOperator((5, 7), lambda X: A @ X, lambda Y: A.T @ Y, dtype=torch.float64)
        >>> F = tp.pinv(op, rank=3, solver="lanczos")
    """

    def __init__(
        self,
        shape: tuple[int, int],
        matmat: Any,
        rmatmat: Any,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self._shape = _check_shape(shape)
        for name, f in (("matmat", matmat), ("rmatmat", rmatmat)):
            if not callable(f):
                raise TypeError(f"`{name}` must be a callable that takes a tensor block, got {type(f).__name__}")
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
            raise TypeError(
                f"`dtype` must be the torch dtype of the operator's products (torch.float32 or torch.float64), "
                f"got {dtype!r}"
            )
        self._matmat = matmat
        self._rmatmat = rmatmat
        self._dtype = dtype
        self._device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._matmat(X)  # type: ignore[no-any-return]

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self._rmatmat(Y)  # type: ignore[no-any-return]


class ScipyOperator:
    """Adapter for :class:`scipy.sparse.linalg.LinearOperator` and SciPy sparse matrices.

    Products run in NumPy/SciPy on the CPU; tensors cross the boundary with
    ``torch.from_numpy`` (no copy when dtypes agree).
    """

    def __init__(self, op: Any) -> None:
        from scipy.sparse.linalg import aslinearoperator as _sp_aslinop

        self.op = _sp_aslinop(op)
        np_dtype = np.dtype(self.op.dtype)
        if np_dtype == np.float64:
            self._dtype = torch.float64
        elif np_dtype == np.float32:
            self._dtype = torch.float32
        else:
            raise TypeError(
                f"`A` must have a real floating dtype (float32 or float64), got a SciPy operator of dtype {np_dtype}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.op.shape[0]), int(self.op.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _call(self, f: Any, X: torch.Tensor) -> torch.Tensor:
        out = np.asarray(f(X.detach().cpu().numpy()))
        if out.ndim == 1:
            out = out[:, None]
        return torch.from_numpy(np.ascontiguousarray(out)).to(self._dtype)

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._call(self.op.matmat, X)

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self._call(self.op.rmatmat, Y)


def wide_products(A: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``(Q -> X^T Q, W -> X W)`` for the wide orientation ``X`` (``s x N``, ``s = min(m, n)``) of ``A``.

    ``X`` is ``A`` when ``m <= n`` and ``A^T`` otherwise; works for dense tensors
    (as views, no copy) and operators. Solvers that work on the short side use it.
    """
    m, n = A.shape
    if isinstance(A, torch.Tensor):
        X = A if m <= n else A.T
        return (lambda Q: X.T @ Q), (lambda W: X @ W)
    return (A.rmatmat, A.matmat) if m <= n else (A.matmat, A.rmatmat)


#: SciPy's ``LinearOperator`` class and ``issparse``, imported on first use (once: an import statement costs
#: microseconds even when the module is loaded, and every factorisation asks).
_SCIPY: tuple[type, Callable[[Any], bool]] | None = None


def _is_scipy(A: Any) -> bool:
    global _SCIPY
    if _SCIPY is None:
        try:
            import scipy.sparse as sp
            from scipy.sparse.linalg import LinearOperator as SpLinOp
        except ImportError:  # pragma: no cover - scipy is a dependency
            return False
        _SCIPY = (SpLinOp, sp.issparse)
    linop, issparse = _SCIPY
    return isinstance(A, linop) or bool(issparse(A))


def is_operator(A: Any) -> bool:
    """Whether ``A`` is a matrix-free operator (rather than a dense array)."""
    if isinstance(A, (torch.Tensor, np.ndarray)):
        return False
    return all(hasattr(A, a) for a in ("shape", "matmat", "rmatmat")) or _is_scipy(A)


def aslinearoperator(A: Any) -> LinearOperator:
    """Adapt ``A`` to the :class:`LinearOperator` protocol.

    Accepts a 2-D ``torch.Tensor``, a 2-D ``numpy.ndarray`` (converted to a CPU
    tensor), a SciPy sparse matrix or :class:`scipy.sparse.linalg.LinearOperator`,
    or any object that already implements the protocol.
    """
    if isinstance(A, torch.Tensor):
        return TensorOperator(A)
    if isinstance(A, np.ndarray):
        return TensorOperator(torch.from_numpy(A))
    if _is_scipy(A):
        return ScipyOperator(A)
    if all(hasattr(A, a) for a in ("shape", "dtype", "device", "matmat", "rmatmat")):
        return A  # type: ignore[no-any-return]
    raise TypeError(
        "`A` must be a torch.Tensor, a numpy.ndarray, a scipy LinearOperator/sparse matrix, or an object "
        f"with `shape`, `dtype`, `device`, `matmat` and `rmatmat`; got {type(A).__name__}"
    )
