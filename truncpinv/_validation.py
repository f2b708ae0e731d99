"""Input validation, done once at the public entry points.

Every message names the argument in backticks, states the rule and shows what
was received, so that the fix is obvious from the error alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._operator import LinearOperator, OperatorView, aslinearoperator, is_operator

__all__ = ["PreparedMatrix", "check_no_grad", "is_numpy_world", "prepare_matrix", "prepare_rhs"]

_FLOATS = (torch.float32, torch.float64)
_COMPLEX = (torch.complex64, torch.complex128)


@dataclass
class PreparedMatrix:
    """A validated input: a dense tensor or an operator, and whether NumPy results are wanted."""

    A: torch.Tensor | LinearOperator
    numpy_out: bool
    #: the dense ``A`` itself when it requires grad while autograd records (``A`` above is then detached):
    #: results are made differentiable with respect to it (:mod:`truncpinv._autograd`)
    grad_source: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.A.shape[0]), int(self.A.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    @property
    def dense(self) -> bool:
        return isinstance(self.A, torch.Tensor)


_NOT_FINITE = (
    "`A` must be finite, but it contains {n} NaN or Inf entr{s}; "
    "clean the input or pass check_finite=False to skip this check"
)


class FiniteCheckedOperator(OperatorView):
    """An operator whose every product is checked for NaN/Inf (``check_finite=True``).

    An operator's entries cannot be scanned, so the first product that shows a
    non-finite value raises the same ``ValueError`` as a dense ``A`` with NaN
    would, instead of a misleading breakdown deeper in a solver. The check is
    one reduction per product (a sum: NaN and Inf propagate through it; an
    overflowing sum of finite values falls through to an exact scan). Each
    product is also checked to be a tensor with as many rows as the operator's
    shape says (and, for a 2-D block, as many columns as the input; a vector and a
    one-column block are taken for each other), and to be no less precise than the dtype the
    operator declares (a float32 product of a float64 operator would cap every
    solver's accuracy at float32 without a word): a wrong one raises an error
    naming the product instead of a shape error deep in a solver or in SciPy.
    """

    def _checked(self, Y: Any, X: torch.Tensor, what: str) -> torch.Tensor:
        m, n = self.shape
        rows = m if what == "matmat" else n
        if not isinstance(Y, torch.Tensor):
            raise TypeError(
                f"`A`'s `{what}` must return a torch.Tensor, got {type(Y).__name__}; convert its result with "
                f"torch.as_tensor"
            )
        if X.ndim == 2 and X.shape[1] == 1 and Y.ndim == 1:
            Y = Y[:, None]  # one column returned as a vector (or a vector's product as one column): unambiguous
        elif X.ndim == 1 and Y.ndim == 2 and Y.shape[1] == 1:
            Y = Y[:, 0]
        if Y.ndim != X.ndim or Y.shape[0] != rows or (X.ndim == 2 and Y.shape[1] != X.shape[1]):
            raise ValueError(
                f"`A`'s `{what}` must map a block of shape ({n if what == 'matmat' else m}, k) to one of shape "
                f"({rows}, k) (the operator's shape is ({m}, {n})), but it returned shape {tuple(Y.shape)} for an "
                f"input of shape {tuple(X.shape)}"
            )
        field = Y.is_complex() == self.dtype.is_complex and (Y.is_floating_point() or Y.is_complex())
        if not field or torch.finfo(Y.dtype).eps > torch.finfo(self.dtype).eps:
            got, want = str(Y.dtype).replace("torch.", ""), str(self.dtype).replace("torch.", "")
            raise TypeError(
                f"`A`'s `{what}` returned dtype {got}, but the operator declares dtype {want}: its products would "
                f"silently lose {want} accuracy (or change the field); return {want} from `{what}`, or declare "
                f"dtype={Y.dtype} for the operator"
            )
        if not bool(torch.isfinite(Y.sum())) and not bool(torch.isfinite(Y).all()) and bool(torch.isfinite(X).all()):
            raise ValueError(
                f"`A` must be finite, but the operator's `{what}` returned NaN or Inf for a finite input; "
                f"the operator contains NaN or Inf entries (or overflows in {str(Y.dtype).replace('torch.', '')}). "
                f"Clean the operator or pass check_finite=False to skip this check"
            )
        return Y

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._checked(self.op.matmat(X), X, "matmat")

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self._checked(self.op.rmatmat(Y), Y, "rmatmat")


def _check_dtype(name: str, dtype: Any, *, complex_ok: bool = False, solver: str = "") -> None:
    if dtype in _FLOATS or (complex_ok and dtype in _COMPLEX):
        return
    if dtype in _COMPLEX and solver:
        raise TypeError(
            f"`{name}` must be real (float32 or float64) for solver {solver!r}; complex dtype {dtype} is not "
            f"supported by it: use solver='svd' (or 'auto', which picks it for complex input)"
        )
    if isinstance(dtype, torch.dtype) and dtype.is_complex:
        raise TypeError(
            f"`{name}` must be real (float32 or float64) or complex64/complex128; complex dtype {dtype} is not "
            f"supported"
        )
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        raise TypeError(
            f"`{name}` must be float32 or float64, got {dtype}; half precision loses the small singular values, "
            f"convert with `.float()`"
        )
    raise TypeError(f"`{name}` must have a floating dtype (float32 or float64), got {dtype}; convert with `.float()`")


def is_numpy_world(x: Any) -> bool:
    """Whether results for ``x`` come back as NumPy arrays: NumPy arrays and array-likes, SciPy matrices and operators.

    The rule of the package: a torch input (a tensor, a truncpinv operator)
    gives torch results, anything from the NumPy/SciPy world gives NumPy
    results (as :func:`numpy.linalg.lstsq` would), on the CPU.
    """
    if isinstance(x, torch.Tensor):
        return False
    if isinstance(x, np.ndarray):
        return True
    return type(x).__module__.split(".")[0] in ("scipy", "numpy", "pandas") or (
        hasattr(x, "__array__") and not is_operator(x)
    )


def _from_array_like(name: str, x: Any) -> np.ndarray | None:
    """``np.asarray(x)`` for an array-like that is neither a tensor nor an ndarray (a pandas DataFrame...)."""
    if isinstance(x, (torch.Tensor, np.ndarray)) or not hasattr(x, "__array__"):
        return None
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`{name}` could not be converted to a NumPy array ({type(x).__name__}): {exc}") from None
    if arr.dtype == object:
        raise TypeError(
            f"`{name}` ({type(x).__name__}) converts to a NumPy array of dtype object (mixed or non-numeric "
            f"columns); select the numeric columns and convert with `.astype(np.float64)`"
        )
    return arr


def _as_tensor(name: str, x: Any) -> tuple[torch.Tensor, bool]:
    arr = _from_array_like(name, x)
    if arr is not None:
        x = arr
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided:
            raise TypeError(
                f"`{name}` must be a dense (strided) tensor, got layout {x.layout}; convert it with `.to_dense()`"
                + (" or pass it as a matrix-free operator (truncpinv.TensorOperator)" if name == "A" else "")
            )
        return x, False
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "c" and x.dtype.itemsize not in (8, 16):  # complex256
            raise TypeError(
                f"`{name}` must be real (float32 or float64) or complex64/complex128; complex dtype {x.dtype} is "
                f"not supported"
            )
        if x.dtype.kind not in "fc" or (x.dtype.kind == "f" and x.dtype.itemsize not in (4, 8)):  # half, long double
            raise TypeError(
                f"`{name}` must have a floating dtype (float32 or float64), got numpy {x.dtype}; "
                f"convert with `.astype(np.float64)`"
            )
        # native byte order (torch cannot read swapped bytes); np.require keeps a 0-d array 0-d
        x = np.require(x, dtype=x.dtype.newbyteorder("="), requirements="C")
        if not x.flags.writeable:
            # truncpinv never writes to its inputs: a read-only array is shared as it is, without torch's warning
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
                return torch.from_numpy(x), True
        return torch.from_numpy(x), True
    arrays = "a numpy.ndarray (or an object with `__array__`, such as a pandas DataFrame)"
    what = f"a torch.Tensor, {arrays}, or a matrix-free operator (see truncpinv.LinearOperator)"
    raise TypeError(
        f"`{name}` must be {what if name == 'A' else 'a torch.Tensor or ' + arrays}, got {type(x).__name__}"
    )


def check_no_grad(name: str, x: Any) -> None:
    """Refuse a matrix-free input that requires grad while autograd records: it cannot be differentiated.

    A matrix-free operator only offers products, so the dense SVD that the
    backward pass needs (:mod:`truncpinv._autograd`) is not available, and
    ``x.grad`` would silently stay ``None``. Dense tensors are differentiable.
    """
    inner = getattr(x, "A", None) if not isinstance(x, torch.Tensor) else x  # a TensorOperator's matrix
    if isinstance(inner, torch.Tensor) and inner.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"`{name}` requires grad, but truncpinv does not differentiate through a matrix-free `{name}`: its "
            f"factorisations run without an autograd graph, so `{name}.grad` would silently stay None. Pass the "
            f"dense tensor itself (tp.lstsq(A, b) and tp.pinv(A) are differentiable in a dense `A`), or "
            f"`{name}.detach()` if no gradient with respect to `{name}` is wanted"
        )


def check_reverse_mode(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor that carries a forward-mode tangent: truncpinv differentiates in reverse mode only.

    The solvers run without a graph and the result is differentiable through a
    custom :class:`torch.autograd.Function` with a backward pass only, so the
    tangent of ``torch.func.jvp`` / ``jacfwd`` or :mod:`torch.autograd.forward_ad`
    would silently come out as zero.
    """
    if torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
        raise NotImplementedError(
            f"`{name}` carries a forward-mode tangent (torch.func.jvp, torch.func.jacfwd or "
            f"torch.autograd.forward_ad), but truncpinv differentiates in reverse mode only, so the tangent would "
            f"silently be zero; use reverse mode (torch.autograd.grad, .backward(), torch.func.grad)"
        )


def prepare_matrix(
    A: Any, *, allow_operator: bool, solver: str, check_finite: bool = True, complex_ok: bool = False
) -> PreparedMatrix:
    """Validate the matrix ``A`` and convert it to a tensor or an operator.

    A dense tensor that requires grad (while autograd records) is returned
    detached, with itself as :attr:`PreparedMatrix.grad_source`; an operator
    that requires grad is refused (:func:`check_no_grad`).
    """
    if is_operator(A):
        check_no_grad("A", A)
        if not allow_operator:
            raise TypeError(
                f"solver {solver!r} needs a dense matrix, but `A` is a matrix-free operator "
                f"({type(A).__name__}); use solver='randomized', 'lanczos', 'lobpcg', 'gram' or 'auto'"
            )
        op = aslinearoperator(A)
        shape = tuple(op.shape)
        if len(shape) != 2:
            raise ValueError(f"`A` must be 2-D, got an operator of shape {shape}")
        if op.dtype in _COMPLEX:
            raise TypeError(
                f"a matrix-free `A` must be real (float32 or float64); complex operators (dtype {op.dtype}) are not "
                f"supported: pass the dense complex matrix itself (solver='svd' or 'auto')"
            )
        _check_dtype("A", op.dtype)
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"`A` must be non-empty, got shape {shape}")
        if check_finite:
            data = getattr(A, "data", None)  # SciPy sparse matrices: scan the stored entries
            if isinstance(data, np.ndarray) and data.dtype.kind == "f" and not bool(np.isfinite(data).all()):
                n_bad = int((~np.isfinite(data)).sum())
                raise ValueError(_NOT_FINITE.format(n=n_bad, s="y" if n_bad == 1 else "ies"))
            op = FiniteCheckedOperator(op)  # any other operator: checked at every product
        return PreparedMatrix(op, numpy_out=is_numpy_world(A))
    t, numpy_out = _as_tensor("A", A)
    check_reverse_mode("A", t)
    if t.ndim != 2:
        raise ValueError(
            f"`A` must be a 2-D matrix, got {t.ndim} dimension(s) with shape {tuple(t.shape)}"
            + ("; tp.pinv and tp.lstsq take batches (..., m, n)" if t.ndim > 2 else "")
        )
    _check_dtype("A", t.dtype, complex_ok=complex_ok, solver=solver)
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"`A` must be non-empty, got shape {tuple(t.shape)}")
    # fast path: NaN and Inf propagate through a sum, so a finite sum proves a finite matrix
    # (an overflowing sum of finite values falls through to the exact count)
    if check_finite and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(_NOT_FINITE.format(n=n_bad, s="y" if n_bad == 1 else "ies"))
    source = t if t.requires_grad and torch.is_grad_enabled() else None
    return PreparedMatrix(t.detach(), numpy_out=numpy_out, grad_source=source)


def prepare_rhs(
    b: Any, *, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, check_finite: bool = True
) -> tuple[torch.Tensor, bool, bool]:
    """Validate a right-hand side for an ``m x n`` problem.

    Returns ``(b2, was_vector, was_numpy)`` where ``b2`` has shape ``(m, r)``
    and the promotion of ``dtype`` (the factorisation's) and ``b``'s dtype, as
    NumPy promotes ``float32 @ float64`` to float64.
    """
    t, was_numpy = _as_tensor("b", b)
    check_reverse_mode("b", t)
    if t.ndim not in (1, 2):
        raise ValueError(f"`b` must have shape (m,) or (m, r), got {t.ndim} dimensions with shape {tuple(t.shape)}")
    _check_dtype("b", t.dtype, complex_ok=True)
    if t.shape[0] != shape[0]:
        raise ValueError(f"`b` must have {shape[0]} rows to match `A` of shape {shape}, got shape {tuple(t.shape)}")
    if was_numpy:
        t = t.to(device)
    elif t.device != device:
        raise ValueError(
            f"`b` is on {t.device} but the factorisation is on {device}; move it with `.to({str(device)!r})`"
        )
    if check_finite and not bool(torch.isfinite(t).all()):
        raise ValueError("`b` must be finite, but it contains NaN or Inf")
    vec = t.ndim == 1
    t2 = t.unsqueeze(1) if vec else t
    return t2.to(torch.promote_types(dtype, t2.dtype)), vec, was_numpy
