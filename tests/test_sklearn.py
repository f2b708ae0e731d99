"""Tests of :class:`truncpinv.sklearn.TruncatedPinvRegressor`.

* scikit-learn's own estimator checks, one test per check;
* with nothing truncated it agrees with ``LinearRegression`` on real data;
* with ``rank``/``rtol``/``atol`` it is principal-component regression, derived
  here independently from ``numpy.linalg.svd`` of the centred data;
* bad parameters raise at fit time with messages that name the parameter.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

import truncpinv as tp
from truncpinv.sklearn import TruncatedPinvRegressor

#: Agreement demanded in float64 on the (well-conditioned, kappa ~ 22) diabetes data.
RTOL64 = 1e-8


@pytest.fixture(scope="module")
def diabetes() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_diabetes(return_X_y=True)
    return X, y


def _target(y: np.ndarray, kind: str) -> np.ndarray:
    if kind == "1d":
        return y
    if kind == "column":
        return y[:, None]
    return np.column_stack([y, 2 * y + 1])  # "multi"


def _close(actual: np.ndarray | float, desired: np.ndarray | float, rtol: float = RTOL64) -> None:
    """Elementwise ``rtol`` relative to the largest entry (a tiny coefficient is not held to 1e-8 of itself)."""
    desired = np.asarray(desired)
    assert np.shape(actual) == desired.shape
    assert_allclose(actual, desired, rtol=rtol, atol=rtol * float(np.max(np.abs(desired), initial=0.0)))


# --------------------------------------------------------------------------- scikit-learn API


@parametrize_with_checks(
    [
        TruncatedPinvRegressor(),
        TruncatedPinvRegressor(solver="svd", fit_intercept=False),
    ]
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_init_does_not_validate():
    est = TruncatedPinvRegressor(rank=0, rtol="x", solver=3)  # type: ignore[arg-type]
    assert est.get_params() == {"rank": 0, "rtol": "x", "atol": None, "solver": 3, "fit_intercept": True}


# --------------------------------------------------------------------------- nothing truncated == OLS


@pytest.mark.parametrize("solver", ["auto", "svd"])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("kind", ["1d", "column", "multi"])
def test_matches_linear_regression(diabetes, solver, fit_intercept, kind):
    X, y = diabetes
    Y = _target(y, kind)
    ours = TruncatedPinvRegressor(solver=solver, fit_intercept=fit_intercept).fit(X, Y)
    ref = LinearRegression(fit_intercept=fit_intercept).fit(X, Y)
    _close(ours.coef_, ref.coef_)
    if fit_intercept:
        _close(ours.intercept_, ref.intercept_)
    else:
        assert ours.intercept_ == ref.intercept_ == 0.0
    assert ours.rank_ == ref.rank_ == X.shape[1]
    _close(ours.singular_, ref.singular_, rtol=1e-10)
    _close(ours.predict(X), ref.predict(X))
    assert ours.score(X, Y) == pytest.approx(ref.score(X, Y), rel=1e-12)
    assert ours.coef_.dtype == np.float64
    assert ours.n_features_in_ == X.shape[1]


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_sample_weight_matches_linear_regression(diabetes, fit_intercept):
    X, y = diabetes
    Y = _target(y, "multi")
    w = np.random.default_rng(0).uniform(0.1, 3.0, size=X.shape[0])
    ours = TruncatedPinvRegressor(fit_intercept=fit_intercept).fit(X, Y, sample_weight=w)
    ref = LinearRegression(fit_intercept=fit_intercept).fit(X, Y, sample_weight=w)
    _close(ours.coef_, ref.coef_)
    _close(ours.intercept_, ref.intercept_)


@pytest.fixture(scope="module")
def collinear() -> tuple[np.ndarray, np.ndarray]:
    """60 x 7 data of rank 5: two columns are combinations of others."""
    rng = np.random.default_rng(1)
    B = rng.standard_normal((60, 5))
    X = np.column_stack([B, B[:, 0] + B[:, 1], 3 * B[:, 2]])
    y = X @ rng.standard_normal(7) + 0.1 * rng.standard_normal(60)
    return X, y


@pytest.mark.parametrize("solver", ["auto", "svd", "gram"])
def test_rank_deficient_minimum_norm(collinear, solver):
    """The two dependent directions are dropped, not inverted: the numerical rank and the minimum-norm solution."""
    X, y = collinear
    ours = TruncatedPinvRegressor(solver=solver).fit(X, y)
    ref = LinearRegression().fit(X, y)
    Xc, yc = X - X.mean(0), y - y.mean()
    assert ours.rank_ == ref.rank_ == np.linalg.matrix_rank(Xc) == 5
    _close(ours.coef_, np.linalg.lstsq(Xc, yc, rcond=None)[0])
    _close(ours.coef_, ref.coef_)
    _close(ours.intercept_, ref.intercept_)


# --------------------------------------------------------------------------- truncation == PCR


def _pcr(X: np.ndarray, Y: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCR with ``r`` components from numpy's SVD of the centred data: (coef, intercept, singular values)."""
    x_mean, y_mean = X.mean(axis=0), Y.mean(axis=0)
    U, s, Vt = np.linalg.svd(X - x_mean, full_matrices=False)
    scores = U[:, :r] * s[:r]  # principal-component scores Z = Xc V_r
    gamma = np.linalg.lstsq(scores, Y - y_mean, rcond=None)[0]  # regress y on the r scores
    coef = (Vt[:r].T @ gamma).T  # back to the original features
    return coef, y_mean - coef @ x_mean, s


@pytest.mark.parametrize("solver", ["auto", "svd", "gram"])
@pytest.mark.parametrize("r", [1, 3, 7])
@pytest.mark.parametrize("kind", ["1d", "multi"])
def test_rank_is_principal_component_regression(diabetes, solver, r, kind):
    X, y = diabetes
    Y = _target(y, kind)
    coef, intercept, s = _pcr(X, Y, r)
    est = TruncatedPinvRegressor(rank=r, solver=solver).fit(X, Y)
    assert est.rank_ == r
    _close(est.singular_, s[:r], rtol=1e-10)
    _close(est.coef_, coef)
    _close(est.intercept_, intercept)


def test_randomized_solver_object_low_rank(diabetes):
    X, y = diabetes
    coef, intercept, _ = _pcr(X, y, 2)
    est = TruncatedPinvRegressor(rank=2, solver=tp.RandomizedSVD()).fit(X, y)
    assert est.rank_ == 2
    _close(est.coef_, coef, rtol=1e-6)
    _close(est.intercept_, intercept, rtol=1e-6)


@pytest.mark.parametrize("r", [2, 6])
def test_rtol_and_atol_truncate_like_rank(diabetes, r):
    X, y = diabetes
    coef, intercept, s = _pcr(X, y, r)
    cut = np.sqrt(s[r - 1] * s[r])  # strictly between the r-th and (r+1)-th singular values
    by_rtol = TruncatedPinvRegressor(rtol=cut / s[0]).fit(X, y)
    by_atol = TruncatedPinvRegressor(atol=cut).fit(X, y)
    for est in (by_rtol, by_atol):
        assert est.rank_ == r
        _close(est.coef_, coef)
        _close(est.intercept_, intercept)


def test_rank_above_full_is_clamped(diabetes):
    X, y = diabetes
    est = TruncatedPinvRegressor(rank=1000).fit(X, y)
    assert est.rank_ == X.shape[1]
    _close(est.coef_, LinearRegression().fit(X, y).coef_)


def test_numpy_integer_rank_grid_search(diabetes):
    X, y = diabetes
    search = GridSearchCV(TruncatedPinvRegressor(), {"rank": np.arange(1, 11, 3)}, cv=2).fit(X, y)
    assert isinstance(search.best_params_["rank"], np.integer)
    assert search.best_estimator_.rank_ == search.best_params_["rank"]


def test_solver_object_equals_name_and_clones(diabetes):
    X, y = diabetes
    est = TruncatedPinvRegressor(rank=4, solver=tp.DenseSVD())
    a = clone(est).fit(X, y)
    b = TruncatedPinvRegressor(rank=4, solver="svd").fit(X, y)
    assert isinstance(a.solver, tp.DenseSVD)
    _close(a.coef_, b.coef_, rtol=1e-12)


def test_float32_stays_float32(diabetes):
    X, y = diabetes
    est = TruncatedPinvRegressor().fit(X.astype(np.float32), y)
    ref = LinearRegression().fit(X, y)
    assert est.coef_.dtype == np.float32
    _close(est.coef_, ref.coef_, rtol=1e-4)


def test_integer_input_becomes_float64():
    X = np.array([[1, 1], [1, 2], [2, 2], [2, 3]])
    y = X @ np.array([1, 2]) + 3
    est = TruncatedPinvRegressor().fit(X, y)
    assert est.coef_.dtype == np.float64
    _close(est.coef_, np.array([1.0, 2.0]), rtol=1e-12)
    assert est.intercept_ == pytest.approx(3.0)


# --------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"^`rank` must be a positive integer or None, got 0$"),
        ({"rank": -3}, ValueError, r"^`rank` must be a positive integer or None, got -3$"),
        ({"rank": 2.5}, TypeError, r"^`rank` must be a positive integer or None, got 2\.5$"),
        ({"rank": True}, TypeError, r"^`rank` must be a positive integer or None, got True$"),
        ({"rtol": -1e-3}, ValueError, r"^`rtol` must be a non-negative finite float or None, got -0\.001$"),
        ({"rtol": "tiny"}, TypeError, r"^`rtol` must be a non-negative float or None, got 'tiny'$"),
        ({"atol": float("inf")}, ValueError, r"^`atol` must be a non-negative finite float or None, got inf$"),
        ({"atol": float("nan")}, ValueError, r"^`atol` must be a non-negative finite float or None, got nan$"),
        ({"solver": "qr"}, ValueError, r"^`solver` must be one of \[.*\] or a truncpinv Solver object, got 'qr'$"),
        ({"solver": 3}, TypeError, r"^`solver` must be a solver name or a truncpinv Solver object, got int$"),
        ({"fit_intercept": "yes"}, TypeError, r"^`fit_intercept` must be True or False, got 'yes'$"),
    ],
)
def test_bad_parameters_raise_at_fit(params, error, match):
    X, y = np.eye(4, 3), np.arange(4.0)
    est = TruncatedPinvRegressor(**params)
    with pytest.raises(error, match=match):
        est.fit(X, y)


@pytest.mark.parametrize(
    ("sample_weight", "match"),
    [
        (np.ones(3), r"^`sample_weight` must have shape \(4,\) to match `X`, got shape \(3,\)$"),
        (np.array([1.0, -1.0, 1.0, 1.0]), r"^`sample_weight` must be non-negative, got minimum -1\.0$"),
        (np.zeros(4), r"^`sample_weight` must have at least one positive entry, got all zeros$"),
        (np.array([1.0, np.inf, 1.0, 1.0]), "infinity"),
    ],
)
def test_bad_sample_weight(sample_weight, match):
    with pytest.raises(ValueError, match=match):
        TruncatedPinvRegressor().fit(np.eye(4, 3), np.arange(4.0), sample_weight=sample_weight)


def test_predict_before_fit_and_wrong_width(diabetes):
    from sklearn.exceptions import NotFittedError

    X, y = diabetes
    with pytest.raises(NotFittedError):
        TruncatedPinvRegressor().predict(X)
    est = TruncatedPinvRegressor().fit(X, y)
    with pytest.raises(ValueError, match="features"):
        est.predict(X[:, :5])
