r"""The truncated pseudoinverse from a Gram matrix the caller already has.

Some callers can form ``K = A A^T`` more cheaply than any product with ``A``
(Sven builds the Gram matrix of a per-sample Jacobian from per-layer factors,
without ever forming the Jacobian). :func:`pinv_from_gram` turns that ``K``
and a matrix-free ``A`` into the same :class:`~truncpinv.TruncatedPinv` that
:class:`~truncpinv.GramEigen` computes:

.. math::

    K = A A^\top = U \Lambda U^\top, \qquad \sigma_i = \sqrt{\lambda_i}, \qquad
    V = A^\top U \Sigma^{-1},

with ``V`` never formed for a solve: ``x = A^T U_r \Sigma_r^{-2} U_r^T b``
costs one product with ``A^T`` (``operator.rmatmat``).

How ``K`` is factorised (``solver``):

* the exact path (:class:`~truncpinv.DenseSVD` and :class:`~truncpinv.GramEigen`):
  the whole spectrum by LAPACK's divide and conquer in float64
  (``torch.linalg.eigh``). Computing only the wanted pairs with LAPACK
  (``syevx``, ``syevr``) was measured slower on the spectra Sven sees
  (``docs/benchmarks.md``).
* the default (``None`` or :class:`~truncpinv.Auto`): the exact path, except
  for a large ``K`` on the CPU (at least :data:`PARTIAL_MIN_ROWS` rows) of
  which at most :data:`PARTIAL_MAX_FRACTION` of the pairs can be kept. There
  block Lanczos on ``K`` computes the top ``rank`` pairs, and its certificate
  (residuals of both orientations and the deflation check of
  :func:`truncpinv.certify`) decides: a certified result is used, otherwise the
  exact path runs (no warning). The crossover was measured on Sven's Gram
  matrices (``docs/benchmarks.md``): the full decomposition costs ``O(m^3)``,
  Lanczos ``O(m^2 rank)`` per restart cycle.
* any other :mod:`truncpinv` solver factorises ``K`` itself as a symmetric
  matrix (its singular triplets are the eigenpairs ``(u_i, \lambda_i, u_i)``
  of ``K``), with that solver's accuracy guarantee, e.g. a randomized or
  Krylov solver for the top ``rank`` pairs of a large ``K``.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np
import torch

from ._certify import UncertifiedResultWarning
from ._factorization import TruncatedPinv, no_tf32
from ._operator import OperatorView, aslinearoperator
from ._tolerance import make_tolerance
from ._validation import check_no_grad, is_numpy_world
from .solvers import Auto, DenseSVD, GramEigen, Lanczos, Solver
from .solvers.gram_eigen import _zero_below

__all__ = ["PARTIAL_MAX_FRACTION", "PARTIAL_MIN_ROWS", "pinv_from_gram"]

#: The default factorises a ``K`` of at least this many rows (on the CPU) by certified Lanczos ...
PARTIAL_MIN_ROWS = 3072
#: ... when at most this fraction of its eigenpairs can be kept.
PARTIAL_MAX_FRACTION = 0.125

_FLOATS = (torch.float32, torch.float64)
#: ``solver`` entry of the result's ``stats``.
NAME = "from_gram"


class _RmatmatOperator(OperatorView):
    """An object with ``shape``/``dtype``/``device``/``rmatmat`` only: ``matmat`` is never needed here."""

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"the operator {type(self.op).__name__} only provides `rmatmat`")

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self.op.rmatmat(Y)  # type: ignore[no-any-return]


def _prepare_operator(operator: Any) -> tuple[Any, bool]:
    """Validate ``operator``; returns ``(op, numpy_out)`` with ``op`` a tensor or an operator."""
    numpy_out = is_numpy_world(operator)
    check_no_grad("operator", operator)
    if isinstance(operator, (torch.Tensor, np.ndarray)):
        if operator.ndim != 2:
            raise ValueError(f"`operator` must be a 2-D matrix, got shape {tuple(operator.shape)}")
        op: Any = aslinearoperator(operator).A  # type: ignore[attr-defined]
    elif all(hasattr(operator, a) for a in ("shape", "dtype", "device", "rmatmat")) and not hasattr(operator, "matmat"):
        op = _RmatmatOperator(operator)
    else:
        try:
            op = aslinearoperator(operator)
        except TypeError:
            raise TypeError(
                "`operator` must be a torch.Tensor, a numpy.ndarray, a scipy LinearOperator/sparse matrix, or an "
                f"object with `shape`, `dtype`, `device` and `rmatmat`; got {type(operator).__name__}"
            ) from None
    shape = tuple(op.shape)
    if len(shape) != 2:
        raise ValueError(f"`operator` must be 2-D, got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"`operator` must be non-empty, got shape {shape}")
    if op.dtype not in _FLOATS:
        raise TypeError(f"`operator` must have dtype float32 or float64, got {op.dtype}")
    return op, numpy_out


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _prepare_gram(K: Any, m: int, device: torch.device, check_finite: bool) -> tuple[torch.Tensor, torch.dtype]:
    """Validate ``K`` (``m x m``, symmetric, finite); return it in float64 and the dtype it came in."""
    if isinstance(K, np.ndarray):
        if K.dtype.kind != "f":
            raise TypeError(f"`K` must have a floating dtype, got numpy {K.dtype}")
        K = torch.from_numpy(np.ascontiguousarray(K))
    if not isinstance(K, torch.Tensor):
        raise TypeError(f"`K` must be a torch.Tensor or numpy.ndarray, got {type(K).__name__}")
    check_no_grad("K", K)
    if not K.dtype.is_floating_point:
        raise TypeError(f"`K` must have a real floating dtype, got {K.dtype}")
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"`K` must be a square matrix, got shape {tuple(K.shape)}")
    if K.shape[0] != m:
        raise ValueError(
            f"`K` must be {m}x{m} to match `operator` with {m} rows (K = A A^T), got shape {tuple(K.shape)}"
        )
    if not _same_device(K.device, device):
        raise ValueError(f"`K` is on {K.device} but `operator` is on {device}; move it with `.to({str(device)!r})`")
    if check_finite and not bool(torch.isfinite(K).all()):
        raise ValueError("`K` must be finite, but it contains NaN or Inf; pass check_finite=False to skip this check")
    K64 = K.to(torch.float64)
    if not check_finite:
        # a trusted caller (Sven's Gram route): the eigensolvers read one triangle, so the symmetrisation
        # below would only move K by its rounding asymmetry; skip it and its check
        return K64, K.dtype
    # A Gram matrix computed in floating point is symmetric up to the rounding of its products:
    # sqrt(eps) of the largest entry leaves room for that and still rejects a non-Gram matrix.
    scale = float(K64.abs().max())
    asym = float((K64 - K64.T).abs().max())
    if asym > math.sqrt(torch.finfo(K.dtype).eps) * scale:
        raise ValueError(
            f"`K` must be symmetric (the Gram matrix A A^T), but max|K - K^T| = {asym:.3g} for max|K| = {scale:.3g}"
        )
    return (K64 + K64.T) * 0.5, K.dtype


def pinv_from_gram(
    K: Any,
    operator: Any,
    *,
    rank: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    check_finite: bool = True,
    solver: Solver | None = None,
) -> TruncatedPinv:
    r"""Truncated pseudoinverse of ``A`` from its Gram matrix ``K = A A^T``.

    The eigendecomposition ``K = U \Lambda U^T`` (float64, descending) gives
    the singular values ``sigma_i = sqrt(lambda_i)`` and left vectors ``U`` of
    ``A``; the right vectors ``V = A^T U \Sigma^{-1}`` stay implicit and are
    applied with ``operator.rmatmat``. Truncation is that of every solver
    (see :mod:`truncpinv._tolerance`): keep at most ``rank`` values with
    ``sigma > max(atol, rtol * sigma_max)``, default ``rtol = max(m, n) * eps``
    of ``operator.dtype``.

    As in :class:`~truncpinv.GramEigen`, eigenvalues of ``K`` are only known
    to ``~ eps_K * max(m, n) * lambda_max`` (``eps_K`` of the dtype ``K`` was
    given in), so singular values below ``sqrt(eps_K * max(m, n)) * sigma_max``
    are reported as zero. At most ``min(m, n)`` values are kept (``rank(K) <= n``).

    Args:
        K: ``(m, m)`` symmetric positive semi-definite ``A A^T`` (tensor or
            array, any float dtype; decomposed in float64). Symmetric up to
            ``sqrt(eps)`` of its largest entry; it is symmetrised.
        operator: the ``m x n`` matrix ``A``: a tensor, an array, anything
            :func:`~truncpinv.aslinearoperator` accepts, or an object with
            ``shape``, ``dtype``, ``device`` and ``rmatmat`` (``A^T Y``).
        rank: keep at most this many singular values (default ``min(m, n)``).
        rtol: relative cut-off (default ``max(m, n) * eps(operator.dtype)``).
        atol: absolute cut-off (default 0).
        check_finite: reject NaN/Inf in ``K`` and a ``K`` that is not symmetric
            (default ``True``); ``False`` trusts ``K`` and reads its lower triangle.
        solver: how ``K`` is factorised (module docstring): ``None`` or
            :class:`~truncpinv.Auto` (default: exact, or certified Lanczos for
            a large ``K`` and a small rank), :class:`~truncpinv.DenseSVD` or
            :class:`~truncpinv.GramEigen` (always exact); any other
            :mod:`truncpinv` solver factorises ``K`` itself.

    Returns:
        A :class:`~truncpinv.TruncatedPinv` in ``operator.dtype`` with
        ``stats["solver"] == "from_gram"`` and ``stats["method"]``: ``"eigh"``
        or the name of the solver that factorised ``K``.

    Example:
        >>> import torch, truncpinv as tp
        >>> A = torch.randn(8, 50, dtype=torch.float64)
        >>> F = tp.pinv_from_gram(A @ A.T, tp.TensorOperator(A), rank=5)
        >>> b = torch.randn(8, dtype=torch.float64)
        >>> bool(torch.allclose(F @ b, tp.pinv(A, rank=5) @ b))
        True
    """
    op, numpy_out = _prepare_operator(operator)
    m, n = int(op.shape[0]), int(op.shape[1])
    dtype, device = op.dtype, torch.device(op.device)
    K64, k_dtype = _prepare_gram(K, m, device, check_finite)
    tol = make_tolerance((m, n), dtype, rank=rank, rtol=rtol, atol=atol)
    t0 = time.perf_counter()
    q = min(m, n)
    want = min(tol.rank, q)
    with no_tf32(), torch.no_grad():
        lam, Q, method, extra = _factorize_gram(K64, solver, want)
        S = _singular_values(lam, q, eps_k=torch.finfo(k_dtype).eps, side=max(m, n), exact=method == "eigh")
        Q = Q[:, :q]
    stats = {"solver": NAME, "method": method, "matvecs": 0, "iterations": 1, "time": time.perf_counter() - t0}
    stats.update(extra)
    return TruncatedPinv(
        Q.to(dtype), S.to(dtype), None, tol=tol, shape=(m, n), stats=stats, operator=op, numpy_out=numpy_out
    )


def _singular_values(lam: torch.Tensor, q: int, *, eps_k: float, side: int, exact: bool) -> torch.Tensor:
    r"""The first ``q`` singular values :math:`\sigma_i = \sqrt{\max(\lambda_i, 0)}` from the descending eigenvalues
    ``lam`` of ``K`` (float64), with the checks of :func:`pinv_from_gram`.

    ``lam`` must be finite and, from the exact decomposition (``exact``), not below ``-100 eps_K side`` of
    the largest (positive semi-definite up to round-off). Values at or below the noise floor
    ``sqrt(eps_K side) sigma_max`` of a ``K`` accumulated with machine epsilon ``eps_K`` are set to zero, as in
    :class:`~truncpinv.GramEigen`. A CPU ``lam`` is post-processed in NumPy on a view of its memory: the same
    operations without a dozen small torch calls and their host synchronisations (NumPy's square roots are
    correctly rounded; torch's float64 ``sqrt`` on the CPU was seen one ulp off).
    """
    a = lam.numpy() if lam.device.type == "cpu" and lam.dtype == torch.float64 else None
    finite = bool(np.isfinite(a).all()) if a is not None else bool(torch.isfinite(lam).all())
    if not finite:
        raise ValueError("the eigenvalues of `K` are not finite: `K` contains NaN or Inf")
    lam = lam[:q]
    a = None if a is None else a[:q]
    first, last = (float(a[0]), float(a[-1])) if a is not None else (float(lam[0]), float(lam[-1]))
    lam_max = max(first, 0.0)
    if exact and last < -100 * eps_k * side * lam_max:
        raise ValueError(
            f"`K` must be positive semi-definite (the Gram matrix A A^T), but it has the eigenvalue "
            f"{last:.3g} for the largest {lam_max:.3g}"
        )
    floor = math.sqrt(eps_k * side) * math.sqrt(lam_max)
    if a is not None:
        s = np.sqrt(np.maximum(a, 0.0))
        s[s <= floor] = 0.0  # (all finite: checked above)
        return torch.from_numpy(s)
    return _zero_below(lam.clamp_min(0).sqrt(), floor)


def _factorize_gram(
    K64: torch.Tensor, solver: Solver | None, want: int
) -> tuple[torch.Tensor, torch.Tensor, str, dict[str, Any]]:
    """The top eigenpairs of ``K`` by the rule of the module docstring: ``(lam, Q, method, extra stats)``."""
    m = K64.shape[0]
    if solver is None or isinstance(solver, Auto):
        if K64.device.type == "cpu" and m >= PARTIAL_MIN_ROWS and want <= PARTIAL_MAX_FRACTION * m:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UncertifiedResultWarning)
                lam, Q, method, extra = _by_solver(K64, Lanczos(), want)
            if extra.get("gram_certified", False):
                return lam, Q, method, extra
        lam, Q, method = _exact(K64)
        return lam, Q, method, {}
    if isinstance(solver, (DenseSVD, GramEigen)):
        lam, Q, method = _exact(K64)
        return lam, Q, method, {}
    return _by_solver(K64, solver, want)


def _exact(K64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Every eigenpair of ``K``, descending: LAPACK's divide and conquer in float64."""
    try:
        lam, Q = torch.linalg.eigh(K64)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"the eigendecomposition of `K` failed (does it contain NaN or Inf?): {e}") from e
    return lam.flip(0), Q.flip(1), "eigh"


def _by_solver(K64: torch.Tensor, solver: Solver, want: int) -> tuple[torch.Tensor, torch.Tensor, str, dict[str, Any]]:
    """The top ``want`` eigenpairs of the symmetric PSD ``K`` from a truncpinv solver (its singular triplets)."""
    F = solver.factorize(K64, rank=want, rtol=0.0, check_finite=False)
    lam = F._S[:want].to(torch.float64)
    Q = F._U[:, :want].to(torch.float64)
    extra = {f"gram_{k}": v for k, v in F.stats.items() if k != "time"}
    return lam, Q, type(solver).__name__, extra
