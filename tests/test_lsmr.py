"""LSMR (``tp.LSMR``, ``solver="lsmr"``) and the Krylov path of ``tp.lstsq`` for matrix-free input (issue #25).

Every solution is compared with a float64 reference from LAPACK
(:func:`numpy.linalg.lstsq`, the minimum-norm solution) or with SciPy's
``lsmr``, and checked against the facts that define it: the normal equations
``A^T (b - A x) = 0`` and ``x`` orthogonal to the null space of ``A``. The
accuracy demanded follows the perturbation theory of least squares: a
backward error ``eta`` moves the solution by at most about
``kappa eta (1 + kappa ||r|| / (||A|| ||x||))`` (Wedin), with ``kappa`` the
condition number of the non-zero part.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from hypothesis import given
from hypothesis import strategies as st

import truncpinv as tp
from truncpinv._lsmr import _vector_products, backward_error

from .conftest import DEVICES
from .strategies import NP_FLOAT, float_dtypes, matrix_with_spectrum, seeds, shapes

KINDS = ["torch", "numpy", "scipy-sparse", "scipy-linop", "callable"]
#: Iteration limit of the agreement tests: LSMR without reorthogonalisation may need a few times
#: ``min(m, n)`` iterations on graded spectra (loss of orthogonality), never fewer than exact arithmetic.
MAXITER = 2000


def _matrix(m: int, n: int, rank: int, kappa: float, seed: int) -> np.ndarray:
    """``m x n`` float64 with ``rank`` singular values log-spaced in ``[1/kappa, 1]`` and the rest exactly 0."""
    q = min(m, n)
    s = np.zeros(q)
    s[:rank] = np.logspace(0.0, -math.log10(kappa), rank)
    return matrix_with_spectrum(m, n, s, seed)


def _as(kind: str, A: np.ndarray, dtype: torch.dtype, device: str = "cpu") -> Any:
    """``A`` (float64) in the input ``kind``, rounded to ``dtype``."""
    A = A.astype(NP_FLOAT[dtype])
    if kind == "torch":
        return torch.from_numpy(A).to(device)
    if kind == "numpy":
        return A
    if kind == "scipy-sparse":
        return sp.csr_matrix(A)
    if kind == "scipy-linop":
        return spla.aslinearoperator(A)
    T = torch.from_numpy(A)
    return tp.CallableOperator(A.shape, lambda X: T @ X, lambda Y: T.T @ Y, dtype=dtype)


def _np64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()  # type: ignore[no-any-return]
    return np.asarray(x, dtype=np.float64)


def _wedin_bound(A: np.ndarray, b: np.ndarray, x: np.ndarray, eta: float) -> float:
    """Relative error bound ``c kappa eta (1 + kappa ||r|| / (||A|| ||x||))`` with ``c = 10``."""
    s = np.linalg.svd(A, compute_uv=False)
    s = s[s > s[0] * 1e-10]
    kappa = s[0] / s[-1]
    r = np.linalg.norm(b - A @ x)
    return 10.0 * kappa * eta * (1.0 + kappa * r / (s[0] * max(np.linalg.norm(x), 1e-300)))


class Counting:
    """A matrix-free operator that counts the columns it multiplies (``A`` or ``A^T``)."""

    def __init__(self, A: Any) -> None:
        self.A, self.products = A, 0
        self.shape, self.dtype, self.device = A.shape, torch.float64, torch.device("cpu")

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        self.products += X.shape[1]
        return torch.from_numpy(np.asarray(self.A @ X.numpy()))

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        self.products += Y.shape[1]
        return torch.from_numpy(np.asarray(self.A.T @ Y.numpy()))


# ------------------------------------------------------------------------- the default path (fails on the old main)
def test_default_lstsq_on_a_sparse_operator_needs_tens_of_products_not_thousands() -> None:
    """``tp.lstsq(A, b)`` with defaults on a sparse operator solves by LSMR, not by every singular triplet.

    The SVD path needs at least ``min(m, n) = 400`` products (to materialise
    the operator; the old default used 1200 here); LSMR needs two per
    iteration, about 25 iterations on this well-conditioned matrix.
    """
    A = sp.random(4000, 400, density=0.02, random_state=0, format="csr")
    b = np.random.default_rng(1).standard_normal(4000)
    op = Counting(A)
    x = tp.lstsq(op, torch.from_numpy(b))
    assert op.products <= 200, f"{op.products} products: the default took the SVD path"
    x_ref = np.linalg.lstsq(A.toarray(), b, rcond=None)[0]
    np.testing.assert_allclose(x.numpy(), x_ref, rtol=0, atol=1e-9 * np.abs(x_ref).max())
    # and through SciPy input: the same solution, as NumPy
    x_sp = tp.lstsq(A, b)
    assert isinstance(x_sp, np.ndarray)
    np.testing.assert_allclose(x_sp, x_ref, rtol=0, atol=1e-9 * np.abs(x_ref).max())


def test_lsmr_stats_name_the_method_the_stop_and_the_certificate() -> None:
    A = sp.random(3000, 300, density=0.02, random_state=0, format="csr")
    b = np.random.default_rng(1).standard_normal(3000)
    res = tp.LSMR().solve(A, b)
    s = res.stats
    assert s["solver"] == "lsmr" and s["stop"] == "normal" and res.certified
    assert s["backward_error"] <= s["tol"] == tp.default_tol(torch.float64, A.shape)
    assert s["matvecs"] == 2 * s["iterations"] + 1 + 2  # start, two per iteration, the explicit check
    r = b - A @ res.x
    ne = np.linalg.norm(A.T @ r) / (s["norm_A"] * np.linalg.norm(r))
    assert ne == pytest.approx(s["normal_residual"], rel=1e-6)
    assert s["norm_A"] <= spla.norm(A) * (1 + 1e-12)  # LSMR's estimate is a lower bound on ||A||_F


# ----------------------------------------------------------------------------------- agreement with LAPACK
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(60, 25), (25, 60)], ids=["tall", "wide"])
@pytest.mark.parametrize("deficient", [False, True], ids=["full", "deficient"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_agrees_with_numpy_lstsq(kind: str, shape: tuple[int, int], deficient: bool, dtype: torch.dtype) -> None:
    m, n = shape
    r = 10 if deficient else min(m, n)
    A64 = _matrix(m, n, r, 10.0, seed=3)
    A_in = _as(kind, A64, dtype)
    A_used = A64.astype(NP_FLOAT[dtype]).astype(np.float64)
    rng = np.random.default_rng(4)
    B = rng.standard_normal((m, 2))
    b_in = B.astype(NP_FLOAT[dtype]) if kind != "torch" else torch.from_numpy(B).to(dtype)
    res = tp.LSMR(maxiter=MAXITER).solve(A_in, b_in)
    assert res.certified, res.stats
    X = _np64(res.x)
    assert X.shape == (n, 2) and isinstance(res.x, torch.Tensor) == (kind == "torch")
    assert res.x.dtype == (dtype if kind == "torch" else NP_FLOAT[dtype])
    B_used = _np64(b_in)
    rcond = 1e-4 if dtype == torch.float32 else 1e-10  # the exact zeros, rounded to the dtype
    X_ref = np.linalg.lstsq(A_used, B_used, rcond=rcond)[0]
    eta = max(res.stats["tol"], res.stats["attainable"])
    for j in range(2):
        bound = _wedin_bound(A_used, B_used[:, j], X_ref[:, j], eta) + 100 * float(torch.finfo(dtype).eps) * 10
        err = np.linalg.norm(X[:, j] - X_ref[:, j]) / np.linalg.norm(X_ref[:, j])
        assert err <= bound, f"column {j}: relative error {err:.2e} > {bound:.2e}"
    # tp.lstsq with defaults: LSMR for the operators, the SVD for dense input; the same solution either way
    X_auto = _np64(tp.lstsq(A_in, b_in))
    for j in range(2):
        bound = _wedin_bound(A_used, B_used[:, j], X_ref[:, j], eta) + 100 * float(torch.finfo(dtype).eps) * 10
        assert np.linalg.norm(X_auto[:, j] - X_ref[:, j]) <= bound * np.linalg.norm(X_ref[:, j])
    # x in range(A^T): orthogonal to the null space (LSMR from x0 = 0 never leaves the row space)
    _, _, Vh = np.linalg.svd(A64)
    null = Vh[r:]
    if null.shape[0]:
        assert np.linalg.norm(null @ X) <= 1e3 * float(torch.finfo(dtype).eps) * np.linalg.norm(X)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dense_tensor_on_each_device_satisfies_the_normal_equations(device: str, dtype: torch.dtype) -> None:
    A = torch.from_numpy(_matrix(80, 30, 30, 20.0, seed=5)).to(device, dtype)
    b = torch.randn(80, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    x = tp.lstsq(A, b, solver="lsmr")
    assert x.device == A.device and x.dtype == dtype and x.shape == (30,)
    A64, b64, x64 = A.double().cpu(), b.double().cpu(), x.double().cpu()
    r = b64 - A64 @ x64
    ne = float((A64.T @ r).norm() / (torch.linalg.matrix_norm(A64, ord=2) * r.norm()))
    assert ne <= (1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("shape", [(50, 20), (20, 50)], ids=["tall", "wide"])
@pytest.mark.parametrize("damp", [0.0, 0.3])
def test_agrees_with_scipy_lsmr_and_with_the_damped_normal_equations(shape: tuple[int, int], damp: float) -> None:
    m, n = shape
    A = sp.random(m, n, density=0.3, random_state=2, format="csr")
    b = np.random.default_rng(3).standard_normal(m)
    x = tp.LSMR(damp=damp, maxiter=MAXITER).solve(A, b).x
    x_sp = spla.lsmr(A, b, damp=damp, atol=1e-14, btol=1e-14, conlim=1e16, maxiter=MAXITER)[0]
    if damp > 0:  # the unique solution of (A^T A + damp^2 I) x = A^T b
        Ad = A.toarray()
        x_ref = np.linalg.solve(Ad.T @ Ad + damp**2 * np.eye(n), Ad.T @ b)
    else:
        x_ref = np.linalg.lstsq(A.toarray(), b, rcond=None)[0]
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-8 * np.abs(x_ref).max())
    np.testing.assert_allclose(x, x_sp, rtol=0, atol=1e-8 * np.abs(x_ref).max())


@given(shape=shapes(1, 30), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_property_minimum_norm_least_squares(
    shape: tuple[int, int], dtype: torch.dtype, seed: int, data: st.DataObject
) -> None:
    """Any shape, rank and (moderate) condition: LSMR's certified answer is ``A^+ b`` within Wedin's bound."""
    m, n = shape
    q = min(m, n)
    r = data.draw(st.integers(1, q), label="rank")
    kappa = data.draw(st.sampled_from([1.0, 10.0] if dtype == torch.float32 else [1.0, 10.0, 1e3]), label="kappa")
    A64 = _matrix(m, n, r, kappa, seed).astype(NP_FLOAT[dtype]).astype(np.float64)
    b = np.random.default_rng(seed + 1).standard_normal(m).astype(NP_FLOAT[dtype])
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    res = tp.LSMR(maxiter=MAXITER).solve(_as(kind, A64, dtype), b)
    assert res.certified, res.stats
    x = _np64(res.x)
    rcond = 1e-4 if dtype == torch.float32 else 1e-10
    x_ref = np.linalg.lstsq(A64, b.astype(np.float64), rcond=rcond)[0]
    if np.linalg.norm(x_ref) == 0:
        assert np.linalg.norm(x) <= 1e-6
        return
    eta = max(res.stats["tol"], res.stats["attainable"])
    bound = _wedin_bound(A64, b.astype(np.float64), x_ref, eta) + 1e3 * float(torch.finfo(dtype).eps)
    assert np.linalg.norm(x - x_ref) <= bound * np.linalg.norm(x_ref)


# ----------------------------------------------------------------------------------- the certificate can fail
def test_the_certificate_rejects_a_wrong_solution() -> None:
    A = torch.from_numpy(_matrix(40, 15, 15, 10.0, seed=7))
    b = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    x = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
    mv, rmv = _vector_products(A)
    nA = float(torch.linalg.matrix_norm(A))
    good = backward_error(mv, rmv, b, x, damp=0.0, norm_A=nA, tol=1e-12)
    assert good["certified"] and good["normal_residual"] <= 1e-14
    bad = backward_error(mv, rmv, b, x * (1 + 1e-6), damp=0.0, norm_A=nA, tol=1e-12)
    assert not bad["certified"] and bad["normal_residual"] > 1e-9


def test_iteration_limit_warns_and_reports_uncertified() -> None:
    A = _matrix(60, 40, 40, 1e4, seed=9)
    b = np.random.default_rng(10).standard_normal(60)
    with pytest.warns(tp.UncertifiedResultWarning, match=r"solver 'lsmr' returned an uncertified result: it reached"):
        res = tp.LSMR(maxiter=5).solve(A, b)
    assert not res.certified and res.stats["stop"] == "maxiter" and res.stats["iterations"] == 5


def test_condition_limit_stops_and_says_so() -> None:
    A = _matrix(60, 40, 40, 1e4, seed=9)
    b = np.random.default_rng(10).standard_normal(60)
    with pytest.warns(tp.UncertifiedResultWarning, match=r"its estimate of cond\(A\) reached conlim = 10"):
        res = tp.LSMR(conlim=10.0, maxiter=MAXITER).solve(A, b)
    assert res.stats["stop"] == "cond" and res.stats["cond_A"] >= 10.0 and not res.certified


def test_auto_below_the_default_cutoff_gives_the_truncated_solution() -> None:
    """A singular value below the default cut-off ``max(m, n) eps sigma_1``: the truncated SVD drops it, and
    so does ``tp.lstsq``'s LSMR path (its component of ``A^T r`` is below the tolerance: LSMR stops first;
    were it reached, the condition estimate would send ``auto`` back to the SVD)."""
    s = np.r_[np.linspace(1.0, 0.5, 11), 1e-15]
    A = matrix_with_spectrum(60, 12, s, 11)
    b = np.random.default_rng(12).standard_normal(60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = tp.lstsq(spla.aslinearoperator(A), b)
    x_trunc = tp.lstsq(A, b, solver="svd")  # drops 1e-15 < max(m, n) eps
    np.testing.assert_allclose(x, x_trunc, rtol=0, atol=1e-9 * np.abs(x_trunc).max())


def test_auto_never_returns_an_uncertified_lsmr_answer() -> None:
    """A graded spectrum (kappa 1e4) that LSMR cannot certify within its default ``min(m, n) + 32``
    iterations: ``tp.lstsq`` falls back to the SVD path silently and still returns ``A^+ b``."""
    A = _matrix(60, 40, 40, 1e4, seed=9)
    b = np.random.default_rng(10).standard_normal(60)
    op = spla.aslinearoperator(A)
    assert not tp.LSMR().solve_quietly(op, b).certified
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = tp.lstsq(op, b)
    x_ref = np.linalg.lstsq(A, b, rcond=None)[0]
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-8 * np.abs(x_ref).max())


def test_explicit_truncation_keeps_the_svd_path() -> None:
    A = sp.random(300, 40, density=0.2, random_state=0, format="csr")
    b = np.random.default_rng(1).standard_normal(300)
    op = Counting(A)
    x = tp.lstsq(op, torch.from_numpy(b), rank=5)
    expected = tp.lstsq(A.toarray(), b, rank=5, solver="svd")
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-8 * np.abs(expected).max())
    assert not tp.krylov_applies(A, rank=None, rtol=1e-3, atol=None)
    assert not tp.krylov_applies(A.toarray(), rank=None, rtol=None, atol=None)  # dense: the direct path
    assert tp.krylov_applies(A, rank=None, rtol=None, atol=None)


# --------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("kind", KINDS)
def test_zero_rhs_and_zero_matrix_give_zero(kind: str) -> None:
    A = _as(kind, _matrix(7, 5, 5, 2.0, seed=1), torch.float64)
    res = tp.LSMR().solve(A, np.zeros(7))
    assert np.all(_np64(res.x) == 0) and res.stats["stop"] == "zero" and res.certified
    Z = _as(kind, np.zeros((7, 5)), torch.float64)
    x = tp.lstsq(Z, np.ones(7), solver="lsmr")
    assert np.all(_np64(x) == 0) and _np64(x).shape == (5,)


def test_multiple_rhs_equal_column_by_column_solves_and_report_each_column() -> None:
    A = torch.from_numpy(_matrix(30, 12, 12, 5.0, seed=2))
    B = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    B[:, 1] = 0
    res = tp.LSMR().solve(A, B)
    assert res.x.shape == (12, 3) and [c["stop"] for c in res.stats["columns"]][1] == "zero"
    for j in range(3):
        torch.testing.assert_close(res.x[:, j], tp.LSMR().solve(A, B[:, j]).x)


@pytest.mark.parametrize(
    ("dtype", "e"), [(torch.float32, 70), (torch.float32, -70), (torch.float64, 600), (torch.float64, -600)]
)
def test_extreme_scales_are_exact_powers_of_two_apart(dtype: torch.dtype, e: int) -> None:
    """``lstsq(2^e A, b) = 2^-e lstsq(A, b)`` and ``lstsq(A, 2^e b) = 2^e lstsq(A, b)`` where ``||A||^2`` and
    ``||b||^2`` over- or underflow the dtype (``2^{+-140}`` in float32, ``2^{+-1200}`` in float64)."""
    A = torch.from_numpy(_matrix(20, 8, 8, 3.0, seed=4)).to(dtype)
    b = torch.randn(20, generator=torch.Generator().manual_seed(5)).to(dtype)
    x = tp.lstsq(A, b, solver="lsmr")
    eps = float(torch.finfo(dtype).eps)
    two_e = torch.tensor(e)
    for xs, scale in (
        (tp.lstsq(torch.ldexp(A, two_e), b, solver="lsmr"), -e),
        (tp.lstsq(A, torch.ldexp(b, two_e), solver="lsmr"), e),
    ):
        assert bool(torch.isfinite(xs).all())
        torch.testing.assert_close(torch.ldexp(xs, torch.tensor(-scale)), x, rtol=1e3 * eps, atol=1e3 * eps)
    # the statistics are in the units of the given A
    big = tp.LSMR().solve(torch.ldexp(A, two_e), b).stats["norm_A"]
    assert big == pytest.approx(math.ldexp(tp.LSMR().solve(A, b).stats["norm_A"], e), rel=1e-4)


def test_nonfinite_input_is_rejected() -> None:
    A = sp.random(20, 8, density=0.5, random_state=0, format="csr")
    A.data[0] = np.nan
    with pytest.raises(ValueError, match=r"`A` must be finite, but it contains 1 NaN or Inf entry"):
        tp.lstsq(A, np.ones(20))
    T = torch.from_numpy(_matrix(6, 4, 4, 2.0, seed=0))
    b = torch.ones(6, dtype=torch.float64)
    b[2] = math.inf
    with pytest.raises(ValueError, match=r"`b` must be finite, but it contains NaN or Inf"):
        tp.lstsq(T, b, solver="lsmr")
    Tn = T.clone()
    Tn[1, 1] = math.nan
    bad_op = tp.CallableOperator((6, 4), lambda X: Tn @ X, lambda Y: Tn.T @ Y, dtype=torch.float64)
    products = r"`A` must be finite, but its products with finite vectors contain NaN or Inf"
    for check_finite in (True, False):
        with pytest.raises(ValueError, match=products):
            tp.lstsq(bad_op, torch.ones(6, dtype=torch.float64), check_finite=check_finite)
    with pytest.raises(ValueError, match=products):
        tp.LSMR().solve(Tn, torch.ones(6, dtype=torch.float64), check_finite=False)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tol": 0.0}, ValueError, r"`tol` must be a float in \(0, 1\) or None, got 0.0"),
        ({"tol": 1.5}, ValueError, r"`tol` must be a float in \(0, 1\) or None, got 1.5"),
        ({"tol": "1e-6"}, ValueError, r"`tol` must be a float in \(0, 1\) or None, got '1e-6'"),
        ({"tol": True}, ValueError, r"`tol` must be a float in \(0, 1\) or None, got True"),
        ({"maxiter": 0}, ValueError, r"`maxiter` must be a positive integer, got 0"),
        ({"maxiter": 2.5}, TypeError, r"`maxiter` must be a positive integer or None, got 2.5"),
        ({"damp": -1.0}, ValueError, r"`damp` must be a non-negative finite float, got -1.0"),
        ({"damp": math.nan}, ValueError, r"`damp` must be a non-negative finite float, got nan"),
        ({"conlim": 0.5}, ValueError, r"`conlim` must be a float above 1 \(math.inf for no limit\) or None"),
    ],
)
def test_invalid_hyperparameters_are_rejected(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        tp.LSMR(**kwargs)


def test_numpy_scalars_are_accepted() -> None:
    A = _matrix(30, 10, 10, 3.0, seed=1)
    b = np.random.default_rng(2).standard_normal(30)
    solver = tp.LSMR(tol=np.float32(1e-6), maxiter=np.int64(200), damp=np.float64(0.0), conlim=np.float32(1e10))
    res = solver.solve(A, b)
    assert res.certified and res.stats["tol"] == pytest.approx(1e-6)
    np.testing.assert_allclose(res.x, np.linalg.lstsq(A, b, rcond=None)[0], rtol=0, atol=1e-4)


def test_lsmr_refuses_truncation_arguments_and_pinv() -> None:
    A = _matrix(10, 4, 4, 2.0, seed=0)
    for kw in ({"rank": 2}, {"rtol": 1e-3}, {"atol": 0.0}):
        with pytest.raises(ValueError, match=rf"`{next(iter(kw))}` truncates the SVD, which solver 'lsmr' never"):
            tp.lstsq(A, np.ones(10), solver="lsmr", **kw)
    with pytest.raises(ValueError, match=r"solver 'lsmr' solves least-squares problems without factorising"):
        tp.pinv(A, solver="lsmr")
    with pytest.raises(ValueError, match=r"`b` must have 10 rows to match `A` of shape \(10, 4\)"):
        tp.LSMR().solve(A, np.ones(9))
