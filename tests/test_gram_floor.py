"""GramEigen's noise floor: values the tolerance keeps but the Gram matrix squared away are detected, never silent.

Forming ``A^T A`` squares the condition number, so in float64 singular values
below ``sqrt(eps * max(m, n)) * sigma_max`` vanish into the eigenvalues' noise.
On an ill-conditioned float64 Vandermonde matrix with ``rtol=1e-10`` (issue
#23: 2000 x 25 on [-1, 1], cond 5.7e8) the solver used to keep 20 of 25
values and return a wrong solution without a word. Now a direct call warns
(``UncertifiedResultWarning``, ``stats["certified"] = False``) and ``auto``
falls back to an exact SVD, on dense and on sparse input alike.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import truncpinv as tp


def _vandermonde(m: int = 600, n: int = 22) -> np.ndarray:
    return np.vander(np.linspace(-1, 1, m), n, increasing=True)


def _rhs(m: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(m)


def _lstsq(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(A, b, rcond=None)[0]


@pytest.mark.parametrize("wide", [False, True])
def test_gram_eigen_warns_when_its_floor_loses_requested_values(wide: bool) -> None:
    A = _vandermonde()
    A = A.T.copy() if wide else A
    s = np.linalg.svd(A, compute_uv=False)
    floor = np.sqrt(np.finfo(np.float64).eps * max(A.shape)) * s[0]
    assert (s[s > 1e-10 * s[0]] < floor).sum() >= 2  # the case: requested values below the floor
    with pytest.warns(tp.UncertifiedResultWarning, match="squares the condition number"):
        F = tp.pinv(A, rtol=1e-10, solver="gram")
    assert F.stats["certified"] is False
    assert F.stats["lost_below_floor"] >= 1


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_auto_falls_back_to_an_exact_svd_there(wide: bool, sparse: bool) -> None:
    A = _vandermonde()
    A = A.T.copy() if wide else A
    b = _rhs(A.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F = tp.pinv(sp.csr_matrix(A) if sparse else A, rtol=1e-10)
        x = F @ b
    ref = _lstsq(A, b)
    kept = int((np.linalg.svd(A, compute_uv=False) > 1e-10 * np.linalg.norm(A, 2)).sum())
    assert F.rank == kept
    # the residual of the normal equations, relative to ||A||^2 ||x||: backward-stable accuracy
    normal = A.T @ (A @ x - b)
    assert np.linalg.norm(normal) <= 1e-8 * np.linalg.norm(A, 2) ** 2 * np.linalg.norm(x) + 1e-10
    slack = 1e-10 * np.linalg.norm(A, 2) * np.linalg.norm(x)
    assert np.linalg.norm(A @ x - b) <= np.linalg.norm(A @ ref - b) + slack
    # the old silent answer kept 20 of 22 values and missed lstsq's by far more than kappa * eps
    assert np.linalg.norm(x - ref) <= 1e-5 * np.linalg.norm(ref)


def test_a_tolerance_above_the_floor_costs_no_probe() -> None:
    A = _vandermonde()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F = tp.pinv(A, rtol=1e-5, solver="gram")
    assert "floor" not in F.stats and F.stats.get("certified", True) is True


@given(
    m=st.integers(2, 60),
    n=st.integers(2, 60),
    rank=st.integers(1, 59),
    seed=st.integers(0, 2**31 - 1),
)
def test_an_exactly_rank_deficient_matrix_stays_silent(m: int, n: int, rank: int, seed: int) -> None:
    """Null directions measure at round-off through ``A``: no warning, and the solution is lstsq's."""
    rank = min(rank, m, n)
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    b = rng.standard_normal(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F = tp.pinv(A, solver="gram")
        x = F @ b
    ref = _lstsq(A, b)
    s = np.linalg.svd(A, compute_uv=False)
    kappa = s[0] / s[rank - 1]
    assert F.rank == rank
    assert np.linalg.norm(x - ref) <= 1e-8 * kappa**2 * np.linalg.norm(ref) + 1e-12
