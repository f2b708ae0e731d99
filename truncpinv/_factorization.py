"""The factorised truncated pseudoinverse returned by every solver."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ._autograd import differentiable_singular_values, differentiable_solve
from ._operator import LinearOperator
from ._spectral_grad import Truncated
from ._tolerance import Tolerance, make_tolerance
from ._validation import prepare_rhs

__all__ = ["Triplets", "TruncatedPinv", "no_tf32"]


def _precision_knobs() -> list[Any]:
    """The per-backend float32 precision settings of this torch (``fp32_precision``, torch >= 2.9).

    The CUDA and cuDNN ones only where CUDA is available: elsewhere they govern
    nothing, and toggling them costs more than a small factorisation.
    """
    knobs = []
    paths = ["mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn"]
    if torch.cuda.is_available():
        paths = ["cuda.matmul", "cudnn.conv", "cudnn.rnn", *paths]
    for path in paths:
        obj: Any = torch.backends
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            # (backend, op): the pair torch.backends' ``_FP32Precision`` object passes to the C getter and setter,
            # which :func:`no_tf32` calls directly (the object's ``__getattr__`` doubled the cost of each access)
            knobs.append((obj.backend, obj.op) if isinstance(getattr(obj, "op", None), str) else obj)
    return knobs


_KNOBS = _precision_knobs()


def _get_precision(knob: Any) -> str:
    if isinstance(knob, tuple):
        backend, op = knob
        return torch._C._get_fp32_precision_getter(backend, op)
    return knob.fp32_precision  # type: ignore[no-any-return]


def _set_precision(knob: Any, value: str) -> None:
    if isinstance(knob, tuple):
        backend, op = knob
        torch._C._set_fp32_precision_setter(backend, op, value)
    else:
        knob.fp32_precision = value


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Run float32 matmuls and convolutions in full IEEE float32 (no TF32/bf16) inside the block.

    Uses the per-backend ``fp32_precision`` settings where torch has them (so
    it never mixes the legacy and the new API), and the legacy
    ``allow_tf32``/``set_float32_matmul_precision`` switches otherwise. The
    previous settings are restored on exit.
    """
    knobs = _KNOBS
    if knobs:
        # only touch the settings that differ (this runs twice per Sven step)
        changed = [(k, v) for k in knobs if (v := _get_precision(k)) != "ieee"]
        try:
            for k, _ in changed:
                _set_precision(k, "ieee")
            yield
        finally:
            for k, v in changed:
                _set_precision(k, v)
        return
    prev_prec = torch.get_float32_matmul_precision()  # pragma: no cover - torch < 2.9
    prev_cuda = torch.backends.cuda.matmul.allow_tf32
    prev_cudnn = torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(prev_prec)
        torch.backends.cuda.matmul.allow_tf32 = prev_cuda
        torch.backends.cudnn.allow_tf32 = prev_cudnn


@dataclass
class Triplets:
    """What a solver computes: the leading singular triplets of ``A``.

    Attributes:
        U: ``(m, q)`` left singular vectors, orthonormal columns.
        S: ``(q,)`` singular values, descending and non-negative.
        V: ``(n, q)`` right singular vectors, or ``None`` when the solver only
            computed ``U`` and ``S`` (the Gram route); ``V = A^T U S^{-1}`` is
            then applied implicitly through ``A``.
        stats: solver statistics (``matvecs``, ``iterations``, ...).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor | None
    stats: dict[str, Any] = field(default_factory=dict)


def reciprocal_or_zero(S: torch.Tensor) -> torch.Tensor:
    """``1 / S`` where ``S > 0`` and ``0`` elsewhere (zero singular values are never inverted)."""
    pos = S > 0
    return torch.where(pos, 1.0 / torch.where(pos, S, torch.ones_like(S)), torch.zeros_like(S))


def _out(x: torch.Tensor, numpy_out: bool) -> Any:
    return x.detach().cpu().numpy() if numpy_out else x


class TruncatedPinv:
    r"""A factorised truncated pseudoinverse :math:`A_r^+ = V_r \Sigma_r^{-1} U_r^\top`.

    ``A_r = U_r \Sigma_r V_r^\top`` is the truncation of the SVD of ``A`` to the
    ``r`` largest singular values with ``sigma > cutoff`` (see
    :mod:`truncpinv._tolerance`). ``x = F @ b`` is the minimum-norm solution of
    ``min_x ||A_r x - b||``: it satisfies the normal equations
    ``A_r^T (A_r x - b) = 0`` and lies in the row space of ``A_r``.

    The dense ``n x m`` pseudoinverse is never formed unless :meth:`to_dense`
    is called. All computed triplets are kept, so :meth:`truncate` can
    re-threshold without recomputing.

    **Gradients.** When ``A`` is a dense tensor that requires grad (and
    autograd records), ``F @ b``, :attr:`S`, :attr:`singular_values` and
    :meth:`to_dense` are differentiable with respect to ``A`` (and ``b``), at
    the fixed kept rank ``r`` (see :mod:`truncpinv._autograd` for the
    semantics at the cut-off). The singular vectors (:attr:`U`, :attr:`V`,
    :meth:`approximation`) are then refused: they are defined only up to sign.

    Attributes:
        rank: number of singular values in use (``r``).
        cutoff: the absolute cut-off that was applied.
        stats: solver statistics: ``solver``, ``matvecs``, ``iterations`` and,
            where the solver estimates it, ``residual``.
        shape: ``(m, n)``, the shape of ``A``.
    """

    def __init__(
        self,
        U: torch.Tensor,
        S: torch.Tensor,
        V: torch.Tensor | None,
        *,
        tol: Tolerance,
        shape: tuple[int, int],
        stats: dict[str, Any] | None = None,
        operator: torch.Tensor | LinearOperator | None = None,
        numpy_out: bool = False,
        grad_source: torch.Tensor | None = None,
    ) -> None:
        if V is None and operator is None:
            raise ValueError("`operator` is required when the right singular vectors `V` are implicit")
        self._U = U
        self._S = S
        self._V = V
        self._op = operator
        self.tol = tol
        self.shape = shape
        self.stats: dict[str, Any] = dict(stats or {})
        self.numpy_out = numpy_out
        self._source = grad_source  # the dense A that requires grad (results are differentiable in it)
        self.rank, self.cutoff = tol.keep(S)
        # The implicit-V solve x = A^T U S^{-2} U^T b squares S: safe while sigma_max lies within the fourth
        # root of the dtype's range (2^+-32 in float32), with room for the kept part's kappa^2. Beyond it
        # (|A| ~ 1e+-20 in float32) V = A^T U S^{-1} is formed once instead (one product with r columns).
        s1 = float(S[0]) if S.numel() else 0.0
        fi = torch.finfo(U.dtype)
        self._squares_safe = s1 == 0.0 or float(fi.tiny) ** 0.25 <= s1 <= float(fi.max) ** 0.25

    # ------------------------------------------------------------------ factors
    @property
    def dtype(self) -> torch.dtype:
        return self._U.dtype

    @property
    def device(self) -> torch.device:
        return self._U.device

    @property
    def requires_grad(self) -> bool:
        """Whether the results are differentiable with respect to ``A`` (a dense ``A`` that requires grad)."""
        return self._source is not None

    def _refuse_vectors(self, what: str) -> None:
        if self._source is not None:
            raise NotImplementedError(
                f"`F.{what}` is not differentiable: `A` requires grad, and singular vectors are defined only up to "
                f"sign (and rotations within repeated values). F.S, F @ b, F.to_dense() and tp.lstsq are "
                f"differentiable; use torch.linalg.svd for singular vectors with gradients, or build F from "
                f"`A.detach()` if no gradient is wanted"
            )

    def _complete_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The factors, for the backward pass, when they are a complete backward-stable thin SVD of ``A``."""
        exact = self.stats.get("chosen", self.stats.get("solver")) == "svd"
        if exact and self._V is not None and self._S.numel() == min(self.shape):
            return self._U, self._S, self._V
        return None

    def _values(self, count: int) -> Any:
        if self._source is not None:
            return differentiable_singular_values(self._source, self._S[:count], self._complete_svd())
        return _out(self._S[:count], self.numpy_out)

    @property
    def U(self) -> Any:
        """``(m, r)`` left singular vectors in use."""
        self._refuse_vectors("U")
        return _out(self._U[:, : self.rank], self.numpy_out)

    @property
    def S(self) -> Any:
        """``(r,)`` singular values in use, descending (differentiable in a dense ``A`` that requires grad)."""
        return self._values(self.rank)

    @property
    def V(self) -> Any:
        """``(n, r)`` right singular vectors in use (formed on first access if implicit)."""
        self._refuse_vectors("V")
        return _out(self._full_V()[:, : self.rank], self.numpy_out)

    @property
    def Vh(self) -> Any:
        """``(r, n)``: the conjugate transpose of :attr:`V`, as in ``torch.linalg.svd``."""
        self._refuse_vectors("Vh")
        return _out(self._full_V()[:, : self.rank].mH, self.numpy_out)

    @property
    def singular_values(self) -> Any:
        """Every singular value the solver computed, kept or not (differentiable as :attr:`S`)."""
        return self._values(int(self._S.shape[0]))

    def _full_V(self) -> torch.Tensor:
        if self._V is None:
            assert self._op is not None
            inv = reciprocal_or_zero(self._S)
            W = self._rmatmat(self._U)
            self._V = W * inv
        return self._V

    def _rmatmat(self, Y: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``A^T Y`` in ``dtype`` (default: the factors'); a dense ``A`` is promoted to it, an operator is not."""
        op = self._op
        dt = self._U.dtype if dtype is None else dtype
        if isinstance(op, torch.Tensor):
            wide = torch.promote_types(op.dtype, dt)
            return (op.mH.to(wide) @ Y.to(wide)).to(dt)
        assert op is not None
        return op.rmatmat(Y.to(op.dtype)).to(dt)

    # ------------------------------------------------------------------ solving
    def solve(self, b: Any, *, check_finite: bool = True) -> Any:
        r"""Minimum-norm solution ``x = A_r^+ b``.

        Args:
            b: ``(m,)`` or ``(m, k)`` right-hand side(s), tensor or array.
            check_finite: reject NaN/Inf in ``b`` (default ``True``).

        Returns:
            ``(n,)`` or ``(n, k)``, of the same kind (tensor or array) as ``b``, in the promoted
            dtype of the factorisation and ``b`` (a float64 ``b`` gives float64, as NumPy's
            ``float32 @ float64`` does; the factors keep their own precision).
        """
        b2, vec, was_numpy = prepare_rhs(
            b, shape=self.shape, dtype=self.dtype, device=self.device, check_finite=check_finite
        )
        if self._source is None:
            x = self._apply(b2)
        elif was_numpy:
            raise TypeError(
                "`b` is a NumPy array, so the result would be one too, without the gradient with respect to `A` "
                "(which requires grad); pass `b` as a tensor, torch.as_tensor(b), or factorise `A.detach()`"
            )
        else:
            filt = Truncated(self.rank)
            x = differentiable_solve(self._source, b2, lambda: self._apply(b2), filt, self._complete_svd())
        if vec:
            x = x[:, 0]
        return x.detach().cpu().numpy() if was_numpy else x

    def _apply(self, b2: torch.Tensor) -> torch.Tensor:
        """``A_r^+ b2`` for a prepared ``(m, k)`` right-hand side, from the factors."""
        if b2.is_complex() and not self._U.is_complex():  # a real A_r^+ maps real and imaginary parts apart
            return torch.complex(self._apply(b2.real), self._apply(b2.imag))
        r = self.rank
        dt = b2.dtype  # the factorisation's dtype, or float64 for a float64 `b` (NumPy's promotion)
        with no_tf32():
            if r == 0:
                x = torch.zeros(self.shape[1], b2.shape[1], dtype=dt, device=self.device)
            else:
                U = self._U[:, :r].to(dt)
                y = U.mH @ b2
                S = self._S[:r, None].to(dt.to_real())
                if self._V is None and self._squares_safe:
                    x = self._rmatmat(U @ (y / (S * S)), dtype=dt)
                else:  # V orthonormal, y / S of the order of x: no intermediate over- or underflows
                    x = self._full_V()[:, :r].to(dt) @ (y / S)
        return x

    def __matmul__(self, b: Any) -> Any:
        return self.solve(b)

    @property
    def T(self) -> TruncatedPinv:
        """The truncated pseudoinverse of ``A^T``: the same factors with ``U`` and ``V`` swapped (and conjugated)."""
        V = self._full_V()
        return TruncatedPinv(
            V.conj(),
            self._S,
            self._U.conj(),
            tol=self.tol,
            shape=(self.shape[1], self.shape[0]),
            stats=self.stats,
            numpy_out=self.numpy_out,
            grad_source=None if self._source is None else self._source.mT,
        )

    def truncate(
        self, *, rank: int | None = None, rtol: float | None = None, atol: float | None = None
    ) -> TruncatedPinv:
        """Re-threshold the computed spectrum without recomputing anything.

        Arguments left as ``None`` keep their current value. Only singular
        values that were computed can be kept: asking for a looser truncation
        than the solver computed keeps all computed ones (see
        :attr:`singular_values`).
        """
        tol = make_tolerance(
            self.shape,
            self.dtype,
            rank=self.tol.rank if rank is None else rank,
            rtol=self.tol.rtol if rtol is None else rtol,
            atol=self.tol.atol if atol is None else atol,
        )
        return TruncatedPinv(
            self._U,
            self._S,
            self._V,
            tol=tol,
            shape=self.shape,
            stats=self.stats,
            operator=self._op,
            numpy_out=self.numpy_out,
            grad_source=self._source,
        )

    def to_dense(self) -> Any:
        """The ``n x m`` matrix ``A_r^+ = V_r diag(1/sigma) U_r^T`` (memory ``O(m n)``)."""
        if self._source is not None:  # A_r^+ I, differentiable
            return self.solve(torch.eye(self.shape[0], dtype=self.dtype, device=self.device))
        r = self.rank
        V = self._full_V()[:, :r]
        return _out((V / self._S[:r]) @ self._U[:, :r].mH, self.numpy_out)

    def approximation(self) -> Any:
        """The ``m x n`` rank-``r`` approximation ``A_r = U_r diag(sigma) V_r^T``."""
        self._refuse_vectors("approximation()")
        r = self.rank
        V = self._full_V()[:, :r]
        return _out((self._U[:, :r] * self._S[:r]) @ V.mH, self.numpy_out)

    def __repr__(self) -> str:
        name = self.stats.get("solver", "?")
        return (
            f"TruncatedPinv(shape={self.shape}, rank={self.rank}, cutoff={self.cutoff:.3g}, "
            f"solver={name!r}, dtype={self.dtype}, device={self.device})"
        )
