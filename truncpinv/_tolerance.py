"""The one place that turns ``rank``/``rtol``/``atol`` into a truncation.

Every solver, the :class:`~truncpinv.TruncatedPinv` re-truncation and the Sven
optimizer go through :func:`resolve_cutoff` and :func:`select_rank`, so the
semantics below hold everywhere:

* ``cutoff = max(atol, rtol * sigma_max)``;
* a singular value is kept when ``sigma > cutoff`` (strictly greater, so that
  an all-zero matrix keeps nothing and never divides by zero);
* at most ``rank`` values are kept.

The default ``rtol`` follows :func:`torch.linalg.pinv`: ``max(m, n) * eps`` of
the working dtype. This differs from :func:`numpy.linalg.pinv`, whose default
``rcond=1e-15`` ignores both the shape and the dtype (and so keeps noise-level
singular values of float32 data), and from :func:`scipy.linalg.pinv`, which
also uses ``max(m, n) * eps`` but only when neither ``atol`` nor ``rtol`` is
given, and otherwise uses ``atol + rtol * sigma_max`` (a sum, not a maximum).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Tolerance", "default_rtol", "is_int_scalar", "is_real_scalar", "resolve_cutoff", "select_rank"]

#: A default ``rtol`` above this value triggers a warning: it would silently
#: discard a sizeable part of the spectrum (float32 matrices wider than ~84k).
DEFAULT_RTOL_WARN = 1e-2


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def default_rtol(shape: tuple[int, int], dtype: torch.dtype) -> float:
    """``max(m, n) * eps(dtype)``, the default of :func:`torch.linalg.pinv`.

    Singular values below this fraction of ``sigma_max`` are indistinguishable
    from the rounding error of a backward-stable SVD of an ``m x n`` matrix.
    """
    return max(shape) * _eps(dtype)


@dataclass(frozen=True)
class Tolerance:
    """A resolved truncation request: keep at most ``rank`` values above the cutoff.

    Attributes:
        rank: maximum number of singular values to keep (already clamped to
            ``min(m, n)``).
        rtol: relative tolerance (fraction of ``sigma_max``).
        atol: absolute tolerance.
    """

    rank: int
    rtol: float
    atol: float

    def cutoff(self, sigma_max: float) -> float:
        """Absolute cut-off ``max(atol, rtol * sigma_max)``."""
        return resolve_cutoff(sigma_max, rtol=self.rtol, atol=self.atol)

    def keep(self, S: torch.Tensor) -> tuple[int, float]:
        """Number of values of the descending spectrum ``S`` to keep, and the cut-off."""
        smax = float(S[0]) if S.numel() else 0.0
        cut = self.cutoff(smax)
        return select_rank(S, cutoff=cut, rank=self.rank), cut


def resolve_cutoff(sigma_max: float, *, rtol: float, atol: float) -> float:
    """Absolute cut-off ``max(atol, rtol * sigma_max)``.

    A maximum rather than scipy's sum ``atol + rtol * sigma_max``: each
    tolerance then means exactly what it says on its own.
    """
    return max(float(atol), float(rtol) * float(sigma_max))


#: Up to this many singular values on the CPU, :func:`select_rank` counts them in NumPy (a fifth of torch's call;
#: a batch of 64 samples with two GGN rows each gives 128).
_HOST_SMALL = 4096


def select_rank(S: torch.Tensor, *, cutoff: float, rank: int) -> int:
    """How many of the descending singular values ``S`` to keep.

    Keeps ``sigma > cutoff`` (strict: zero singular values are never inverted,
    even with ``cutoff = 0``) and at most ``rank`` of them.
    """
    if S.numel() == 0:
        return 0
    return min(_count_above(S, cutoff), int(rank))


def _count_above(S: torch.Tensor, cutoff: float) -> int:
    if S.is_cpu and not S.requires_grad and S.dtype in (torch.float64, torch.float32) and S.numel() <= _HOST_SMALL:
        try:
            return int(np.count_nonzero(S.numpy() > cutoff))
        except RuntimeError:  # no storage of its own: inside a torch.func transform
            pass
    return int((S > cutoff).sum())


def is_int_scalar(v: Any) -> bool:
    """A Python or NumPy integer (``np.int64`` from shape arithmetic), not a bool."""
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer))


def is_real_scalar(v: Any) -> bool:
    """A Python or NumPy real scalar (``np.float32`` from array arithmetic), not a bool."""
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer, np.floating))


def make_tolerance(
    shape: tuple[int, int],
    dtype: torch.dtype,
    *,
    rank: int | None,
    rtol: float | None,
    atol: float | None,
) -> Tolerance:
    """Validate ``rank``/``rtol``/``atol`` and resolve the defaults for ``shape``.

    ``rank=None`` means ``min(m, n)``; a larger ``rank`` is clamped to it.
    ``rtol=None`` means :func:`default_rtol` when ``atol`` is not given either,
    and ``0`` when only ``atol`` is given (as in :func:`torch.linalg.pinv`).
    """
    full = min(shape)
    if rank is None:
        k = full
    else:
        # Python and NumPy integers (np.int64 from shape arithmetic); bools and floats are refused
        if not is_int_scalar(rank):
            raise TypeError(
                f"`rank` must be a positive integer or None, got {rank!r} ({type(rank).__name__}); "
                f"pass an int such as `rank=int(r)`"
            )
        if rank < 1:
            raise ValueError(f"`rank` must be a positive integer, got {rank}")
        k = min(int(rank), full)
    for name, val in (("rtol", rtol), ("atol", atol)):
        if val is None:
            continue
        # Python and NumPy real scalars (np.float32 from array arithmetic); bools are refused
        if not is_real_scalar(val):
            raise TypeError(f"`{name}` must be a non-negative float or None, got {val!r} ({type(val).__name__})")
        if not math.isfinite(float(val)) or val < 0:
            raise ValueError(f"`{name}` must be a non-negative finite float, got {val}")
    if rtol is None:
        if atol is None:
            rtol_v = default_rtol(shape, dtype)
            if rtol_v > DEFAULT_RTOL_WARN:
                warnings.warn(
                    f"the default `rtol` = max(m, n) * eps = {rtol_v:.3g} for a {shape[0]}x{shape[1]} "
                    f"{str(dtype).replace('torch.', '')} matrix discards every singular value below "
                    f"{rtol_v:.3g} * sigma_max; pass `rtol` explicitly (or use float64) to choose the truncation",
                    RuntimeWarning,
                    stacklevel=4,
                )
        else:
            rtol_v = 0.0
    else:
        rtol_v = float(rtol)
    return Tolerance(rank=k, rtol=rtol_v, atol=float(atol) if atol is not None else 0.0)
