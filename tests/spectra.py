"""Test matrices with controlled spectra: ``A = U diag(s) V^T``."""

from __future__ import annotations

import numpy as np

#: The spectrum kinds the property tests draw from.
KINDS = ("geometric", "gap", "deficient", "duplicate", "flat")


def spectrum(kind: str, q: int) -> tuple[np.ndarray, list[int]]:
    """Singular values (descending, length ``q``) and the *safe* truncation ranks.

    A safe rank ``r`` leaves a relative gap of at least 2x between ``s[r-1]``
    and ``s[r]``, so the best rank-``r`` approximation is unique and a solver's
    choice of kept values is well defined. ``r = q`` is always safe.
    """
    i = np.arange(q, dtype=np.float64)
    if kind == "geometric":  # sigma_i = 0.7^i: condition ~ 1e3 over ~20 values
        s = 0.7**i
        safe = []  # ratio 0.7 between neighbours: split anywhere is unique but close; use rtol
    elif kind == "gap":  # two clusters separated by a factor 1e3
        h = max(1, q // 2)
        s = np.where(i < h, 1.0 + 0.5 * (h - i) / h, 1e-3 * (1.0 + 0.5 * (q - i) / q))
        safe = [h]
    elif kind == "deficient":  # exact rank q // 2 (at least 1)
        h = max(1, q // 2)
        s = np.where(i < h, 2.0 ** (-i / max(h, 1)), 0.0)
        safe = [h]
    elif kind == "duplicate":  # clusters of three equal values: 4, 4, 4, 2, 2, 2, 1, 1, 1, ...
        s = 4.0 * 0.5 ** (i // 3)
        safe = [r for r in range(3, q, 3)]
    elif kind == "flat":  # well conditioned, no structure
        s = 1.0 + 0.5 * (q - i) / q
        safe = []
    else:
        raise ValueError(kind)
    s = np.maximum(s, 0.0)
    return s, sorted({*safe, q})


def make_matrix(m: int, n: int, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A float64 ``m x n`` matrix with prescribed singular values; returns ``(A, U, s, V)``."""
    rng = np.random.default_rng(seed)
    q = min(m, n)
    s, _ = spectrum(kind, q)
    U, _ = np.linalg.qr(rng.standard_normal((m, q)))
    V, _ = np.linalg.qr(rng.standard_normal((n, q)))
    return (U * s) @ V.T, U, s, V


def jac_like(B: int, P: int, decay: float, seed: int = 0) -> np.ndarray:
    """The Jacobian-shaped matrix of docs/tasks.md, ``U diag(decay^i) G / sqrt(P)`` in float32."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((B, B)))
    G = rng.standard_normal((B, P), dtype=np.float32)
    return ((U * decay ** np.arange(B)).astype(np.float32) @ G / np.float32(np.sqrt(P))).astype(np.float32)
