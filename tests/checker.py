"""One checker for every factorisation (in the spirit of scipy's ``_check_svds``).

:func:`check_factorization` verifies the SVD part (orthonormality, ordering,
agreement with a float64 reference), the minimum-norm least-squares optimality
of ``x = F @ b``, the four Moore–Penrose conditions and Eckart–Young. Every
check compares against mathematical facts about the reference truncation
``A_r``, never against hard-coded numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import truncpinv as tp


@dataclass
class Reference:
    """The float64 SVD of the matrix actually handed to the solver."""

    A: np.ndarray  # float64 copy of the (possibly float32) input
    U: np.ndarray
    s: np.ndarray
    V: np.ndarray

    @classmethod
    def of(cls, A: np.ndarray) -> Reference:
        A64 = np.asarray(A, dtype=np.float64)
        U, s, Vh = np.linalg.svd(A64, full_matrices=False)
        return cls(A64, U, s, Vh.T)

    def truncation(self, r: int) -> np.ndarray:
        return (self.U[:, :r] * self.s[:r]) @ self.V[:, :r].T

    def rank(self, tol: tp.Tolerance) -> int:
        return _select(self.s, tol)


def _select(s: np.ndarray, tol: tp.Tolerance) -> int:
    cut = tol.cutoff(float(s[0]))
    return min(int((s > cut).sum()), tol.rank)


def _np(x: object) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().double().numpy()  # type: ignore[no-any-return,attr-defined]
    return np.asarray(x, dtype=np.float64)


def check_factorization(
    F: tp.TruncatedPinv,
    ref: Reference,
    *,
    rel_tol: float,
    b: np.ndarray,
    check_vectors: bool = True,
) -> None:
    """Assert that ``F`` is the truncated pseudoinverse of ``ref.A`` to ``rel_tol``.

    ``rel_tol`` is relative to ``sigma_max`` (for spectra and subspaces) and to
    the norms involved (for the solution); callers scale it with the condition
    number of the kept part.
    """
    r = F.rank
    assert r == _select(ref.s, F.tol), f"rank {r} != reference rank {_select(ref.s, F.tol)}"
    smax = float(ref.s[0]) if ref.s.size else 0.0
    if r == 0:
        x = _np(F.solve(b))
        assert np.all(x == 0), "rank-0 factorisation must give the zero solution"
        return
    U, S, V = _np(F.U), _np(F.S), _np(F.V)
    m, n = ref.A.shape
    assert U.shape == (m, r) and S.shape == (r,) and V.shape == (n, r)
    # spectrum: sorted, non-negative, accurate
    assert np.all(np.diff(S) <= rel_tol * smax), "singular values must be sorted descending"
    assert np.all(S > 0)
    np.testing.assert_allclose(S, ref.s[:r], rtol=0, atol=rel_tol * smax)
    # orthonormal bases
    np.testing.assert_allclose(U.T @ U, np.eye(r), rtol=0, atol=rel_tol * 10)
    np.testing.assert_allclose(V.T @ V, np.eye(r), rtol=0, atol=rel_tol * 10)
    # agreement with the reference up to sign (only where singular values are distinct)
    if check_vectors:
        for i in range(r):
            assert abs(abs(U[:, i] @ ref.U[:, i]) - 1) <= rel_tol * 10, f"left vector {i} differs"
            assert abs(abs(V[:, i] @ ref.V[:, i]) - 1) <= rel_tol * 10, f"right vector {i} differs"
    Ar = ref.truncation(r)
    # Eckart–Young: A_r is a best rank-r approximation (reconstruction agrees with the reference one)
    approx = _np(F.approximation())
    opt = np.sqrt(np.sum(ref.s[r:] ** 2))
    err = np.linalg.norm(ref.A - approx)
    assert err <= opt + rel_tol * smax * np.sqrt(r) + 1e-300, f"Eckart–Young: {err} > optimum {opt}"
    np.testing.assert_allclose(approx, Ar, rtol=0, atol=rel_tol * smax * 10)
    # minimum-norm least squares for x = F @ b
    x = _np(F.solve(b))
    xs = x if x.ndim == 2 else x[:, None]
    bs = b if b.ndim == 2 else b[:, None]
    scale = smax * (smax * np.linalg.norm(xs) + np.linalg.norm(bs))
    ne = np.linalg.norm(Ar.T @ (Ar @ xs - bs))
    assert ne <= rel_tol * scale, f"normal equations residual {ne:.3g} > {rel_tol * scale:.3g}"
    Vr = ref.V[:, :r]
    # the natural scale of x's error is ||A_r^+|| ||b|| = ||b|| / sigma_r (>= ||x||, and robust when
    # b is nearly orthogonal to the kept left singular vectors)
    x_scale = np.linalg.norm(bs) / ref.s[r - 1]
    null_part = np.linalg.norm(xs - Vr @ (Vr.T @ xs))
    assert null_part <= rel_tol * x_scale, "x has a component in the null space of A_r"
    x_ref = (Vr / ref.s[:r]) @ (ref.U[:, :r].T @ bs)
    np.testing.assert_allclose(xs, x_ref, rtol=0, atol=rel_tol * x_scale)
    # the four Moore–Penrose conditions for X = F.to_dense() against A_r
    X = _np(F.to_dense())
    assert X.shape == (n, m)
    xn = float(np.linalg.norm(X, 2))
    np.testing.assert_allclose(Ar @ X @ Ar, Ar, rtol=0, atol=rel_tol * smax * 10)
    np.testing.assert_allclose(X @ Ar @ X, X, rtol=0, atol=rel_tol * xn * 10)
    P1, P2 = Ar @ X, X @ Ar
    np.testing.assert_allclose(P1, P1.T, rtol=0, atol=rel_tol * 10)
    np.testing.assert_allclose(P2, P2.T, rtol=0, atol=rel_tol * 10)
