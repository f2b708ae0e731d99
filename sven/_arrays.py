"""Small NumPy kernels on host arrays (views of small CPU tensors, :func:`sven.functional.host`), shared by the
general step, the lean step of tiny problems (:mod:`sven.tiny`) and the step controls: one ufunc or dot where
NumPy's generic entry points (``np.linalg.norm``, ``np.isfinite(a).all()``) cost more than the arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["finite_array", "squared_norm_of", "vector_norm"]

#: ``a.sum()`` without the Python frame of NumPy's ``_methods._sum`` around it (the same reduction)
_add = np.add.reduce


def squared_norm_of(a: np.ndarray) -> float:
    r""":math:`\|a\|^2` of a real NumPy array (any shape), accumulated in float64."""
    a = a if a.ndim == 1 and a.dtype == np.float64 else a.reshape(-1).astype(np.float64, copy=False)
    return float(a.dot(a))


def vector_norm(a: np.ndarray) -> float:
    """``np.linalg.norm`` of a real NumPy array, without its dispatch: the square root of :func:`squared_norm_of`."""
    return math.sqrt(squared_norm_of(a))


def finite_array(a: np.ndarray) -> bool:
    """Whether every entry of ``a`` is finite: its sum first (NaN and Inf propagate through a sum), the entries
    only where the sum is not finite (finite entries whose sum overflowed)."""
    return math.isfinite(_add(a, axis=None)) or bool(np.isfinite(a).all())
