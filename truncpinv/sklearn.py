r"""A scikit-learn regressor: minimum-norm linear regression on a truncated spectrum.

:class:`TruncatedPinvRegressor` is :class:`sklearn.linear_model.LinearRegression`
with the least-squares solve replaced by a truncated pseudoinverse from
:func:`truncpinv.pinv`, so that ``rank``/``rtol``/``atol`` act as a spectral
regulariser (principal-component regression) and any truncpinv solver can be
used. It needs scikit-learn, which truncpinv itself does not depend on.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from ._optional import require
from .solvers import SOLVERS, Solver, get_solver

require("sklearn", "sklearn", "truncpinv.sklearn")

from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin  # noqa: E402
from sklearn.utils import check_array  # noqa: E402
from sklearn.utils.validation import check_is_fitted, validate_data  # noqa: E402

__all__ = ["TruncatedPinvRegressor"]

#: Working dtypes: float32 input stays float32 (as in ``LinearRegression``);
#: everything else (integers, booleans, float16, object) becomes float64.
_DTYPES = [np.float64, np.float32]


class TruncatedPinvRegressor(MultiOutputMixin, RegressorMixin, BaseEstimator):
    r"""Minimum-norm least squares on the truncated spectrum of the centred data.

    With ``fit_intercept=True`` the data are centred first (weighted means
    when ``sample_weight`` is given), exactly as in
    :class:`~sklearn.linear_model.LinearRegression`:
    :math:`X_c = X - \mathbf{1}\bar x^\top`, :math:`y_c = y - \mathbf{1}\bar y`.
    With the thin SVD :math:`X_c = U \Sigma V^\top`, keep the
    :math:`r` largest singular values with

    .. math::

        \sigma_i > \max(\mathrm{atol},\ \mathrm{rtol}\,\sigma_1), \qquad r \le \mathrm{rank},

    and solve with the truncated pseudoinverse
    :math:`X_{c,r}^+ = V_r \Sigma_r^{-1} U_r^\top`:

    .. math::

        w = V_r \Sigma_r^{-1} U_r^\top y_c, \qquad b = \bar y - \bar x^\top w .

    :math:`w` is the minimum-norm minimiser of
    :math:`\lVert X_{c,r} w - y_c \rVert_2` over the rank-:math:`r`
    approximation :math:`X_{c,r} = U_r \Sigma_r V_r^\top`; it lies in the span of
    the :math:`r` leading right singular vectors.

    **Relation to LinearRegression.** When nothing is truncated
    (:math:`r = \operatorname{rank} X_c`, the default ``rank=None`` with the
    default ``rtol = max(n_samples, n_features) * eps``), :math:`w` is the
    minimum-norm ordinary-least-squares solution, which ``LinearRegression``
    also returns (up to rounding) unless ``X`` has singular values between the
    two estimators' cut-offs (``LinearRegression`` passes its ``tol``, default
    ``1e-6``, as the relative ``cond`` of :func:`scipy.linalg.lstsq`).

    **Relation to principal-component regression.** The principal-component
    scores are :math:`Z = X_c V_r = U_r \Sigma_r`. Regressing :math:`y_c` on
    :math:`Z` gives :math:`\gamma = (Z^\top Z)^{-1} Z^\top y_c =
    \Sigma_r^{-1} U_r^\top y_c`, and mapping back gives
    :math:`V_r \gamma = w`. So ``rank=r`` is PCR with ``r`` components, i.e.
    ``make_pipeline(PCA(r), LinearRegression())``, in one factorisation and with
    the coefficients expressed in the original features. Compared with
    :class:`~sklearn.linear_model.Ridge`, whose spectral filter is
    :math:`\sigma_i / (\sigma_i^2 + \alpha)`, truncation applies
    :math:`1/\sigma_i` to kept directions and :math:`0` to the others.

    Args:
        rank: keep at most this many singular values (default: all, i.e.
            ``min(n_samples, n_features)``; larger values are clamped).
        rtol: relative cut-off; keep ``sigma > max(atol, rtol * sigma_max)``.
            Default ``max(n_samples, n_features) * eps`` of the working dtype
            (``0`` when only ``atol`` is given), as in :func:`truncpinv.pinv`.
        atol: absolute cut-off (default 0).
        solver: a truncpinv solver name (``"auto"``, ``"svd"``, ``"gram"``,
            ``"randomized"``, ``"lobpcg"``, ``"lanczos"``) or a solver object
            such as ``truncpinv.RandomizedSVD(seed=0)``. ``"svd"`` is the exact
            reference; see :func:`truncpinv.solvers.auto.choose_solver` for
            ``"auto"``.
        fit_intercept: centre ``X`` and ``y`` and fit an intercept. If
            ``False`` the data are used as given and ``intercept_`` is ``0.0``.

    Attributes:
        coef_: ``(n_features,)`` for 1-D ``y``, ``(n_targets, n_features)`` for
            2-D ``y``.
        intercept_: a float for 1-D ``y``, ``(n_targets,)`` for 2-D ``y``
            (``0.0`` when ``fit_intercept=False``).
        rank_: the number of singular values used, ``r``.
        singular_: ``(rank_,)`` the singular values used, descending, of the
            matrix that was factorised: ``X``, centred when ``fit_intercept``
            and row-scaled by ``sqrt(sample_weight)`` when weights are given.
        n_features_in_: number of features seen during :meth:`fit`.
        feature_names_in_: ``(n_features_in_,)`` feature names, when ``X`` has
            string column names.

    Float32 ``X`` is fitted in float32 (with the float32 default ``rtol``);
    every other input is converted to float64. ``y`` is cast to the dtype of
    ``X``. Sparse ``X`` is not supported.

    Example:
        ``rank=3`` gives the same predictions as PCR with three components:

        >>> import numpy as np
        >>> from sklearn.datasets import load_diabetes
        >>> from sklearn.decomposition import PCA
        >>> from sklearn.linear_model import LinearRegression
        >>> from sklearn.pipeline import make_pipeline
        >>> from truncpinv.sklearn import TruncatedPinvRegressor
        >>> X, y = load_diabetes(return_X_y=True)
        >>> reg = TruncatedPinvRegressor(rank=3).fit(X, y)
        >>> reg.rank_, reg.coef_.shape
        (3, (10,))
        >>> pcr = make_pipeline(PCA(n_components=3), LinearRegression()).fit(X, y)
        >>> bool(np.allclose(reg.predict(X), pcr.predict(X)))
        True
        >>> full = TruncatedPinvRegressor().fit(X, y)
        >>> bool(np.allclose(full.coef_, LinearRegression().fit(X, y).coef_))
        True
    """

    def __init__(
        self,
        rank: int | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        solver: str | Solver = "auto",
        fit_intercept: bool = True,
    ) -> None:
        # scikit-learn rule: store the parameters unchanged; validate in fit.
        self.rank = rank
        self.rtol = rtol
        self.atol = atol
        self.solver = solver
        self.fit_intercept = fit_intercept

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> TruncatedPinvRegressor:
        """Fit the truncated minimum-norm linear model.

        Args:
            X: ``(n_samples, n_features)`` training data (dense).
            y: ``(n_samples,)`` or ``(n_samples, n_targets)`` targets, cast to
                the dtype of ``X``.
            sample_weight: optional ``(n_samples,)`` non-negative weights;
                rows are scaled by ``sqrt(sample_weight)`` after weighted
                centring, as in ``LinearRegression``.

        Returns:
            The fitted estimator.
        """
        rank, rtol, atol, solver = self._validated_params()
        X, y = validate_data(self, X, y, dtype=_DTYPES, y_numeric=True, multi_output=True)
        y = np.asarray(y, dtype=X.dtype)
        sw = None if sample_weight is None else _check_sample_weight(sample_weight, X.shape[0], X.dtype)

        if self.fit_intercept:
            X_offset = np.average(X, axis=0, weights=sw).astype(X.dtype, copy=False)
            y_offset = np.average(y, axis=0, weights=sw).astype(X.dtype, copy=False)
            Xc, yc = X - X_offset, y - y_offset
        else:
            # torch.from_numpy warns on read-only arrays (e.g. memory maps): copy those.
            Xc = X if X.flags.writeable else X.copy()
            yc = y if y.flags.writeable else y.copy()
        if sw is not None:
            root = np.sqrt(sw)
            Xc = Xc * root[:, None]
            yc = yc * (root if yc.ndim == 1 else root[:, None])

        F = get_solver(solver).factorize(Xc, rank=rank, rtol=rtol, atol=atol)  # X is 2-D: one factorisation
        coef = F @ yc  # (n_features,) or (n_features, n_targets)
        self.coef_ = coef if coef.ndim == 1 else np.ascontiguousarray(coef.T)
        self.rank_ = int(F.rank)
        self.singular_ = F.S
        if self.fit_intercept:
            self.intercept_ = y_offset - (X_offset @ self.coef_ if self.coef_.ndim == 1 else X_offset @ self.coef_.T)
        else:
            self.intercept_ = 0.0
        return self

    def predict(self, X: Any) -> Any:
        """Predict ``X @ coef_.T + intercept_``.

        Args:
            X: ``(n_samples, n_features)`` samples.

        Returns:
            ``(n_samples,)`` or ``(n_samples, n_targets)`` predictions.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=_DTYPES, reset=False)
        coef = self.coef_
        return (X @ coef if coef.ndim == 1 else X @ coef.T) + self.intercept_

    def _validated_params(self) -> tuple[int | None, float | None, float | None, str | Solver]:
        """Check the constructor parameters (at fit time, as scikit-learn requires).

        NumPy scalars (e.g. from a ``GridSearchCV`` grid built with
        ``np.arange``) are accepted and converted to Python numbers, which is
        what :func:`truncpinv.pinv` expects.
        """
        rank = self.rank
        if rank is not None:
            if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, Integral):
                raise TypeError(f"`rank` must be a positive integer or None, got {rank!r}")
            if rank < 1:
                raise ValueError(f"`rank` must be a positive integer or None, got {rank}")
            rank = int(rank)
        tols: list[float | None] = []
        for name in ("rtol", "atol"):
            val = getattr(self, name)
            if val is not None:
                if isinstance(val, (bool, np.bool_)) or not isinstance(val, Real):
                    raise TypeError(f"`{name}` must be a non-negative float or None, got {val!r}")
                val = float(val)
                if not math.isfinite(val) or val < 0:
                    raise ValueError(f"`{name}` must be a non-negative finite float or None, got {val}")
            tols.append(val)
        solver = self.solver
        if isinstance(solver, str):
            if solver not in SOLVERS:
                raise ValueError(
                    f"`solver` must be one of {sorted(SOLVERS)} or a truncpinv Solver object, got {solver!r}"
                )
        elif not isinstance(solver, Solver):
            raise TypeError(f"`solver` must be a solver name or a truncpinv Solver object, got {type(solver).__name__}")
        if not isinstance(self.fit_intercept, (bool, np.bool_)):
            raise TypeError(f"`fit_intercept` must be True or False, got {self.fit_intercept!r}")
        return rank, tols[0], tols[1], solver


def _check_sample_weight(sample_weight: Any, n_samples: int, dtype: Any) -> np.ndarray:
    """Validate ``sample_weight``: a scalar or ``(n_samples,)``, finite, non-negative, not all zero."""
    if isinstance(sample_weight, Real) and not isinstance(sample_weight, (bool, np.bool_)):
        sw = np.full(n_samples, float(sample_weight), dtype=dtype)
    else:
        sw = check_array(sample_weight, ensure_2d=False, dtype=dtype, input_name="sample_weight")
        if sw.ndim != 1 or sw.shape[0] != n_samples:
            raise ValueError(f"`sample_weight` must have shape ({n_samples},) to match `X`, got shape {sw.shape}")
    if not np.all(np.isfinite(sw)):
        raise ValueError("`sample_weight` must be finite, but it contains NaN or Inf")
    if np.any(sw < 0):
        raise ValueError(f"`sample_weight` must be non-negative, got minimum {sw.min()}")
    if not np.any(sw > 0):
        raise ValueError("`sample_weight` must have at least one positive entry, got all zeros")
    return sw
