"""Differential test zoo (issue #11): every solver at its defaults against the float64 SVD.

Shapes tall, wide, square, very tall (``m >= 20 n``) and very wide; inputs dense,
SciPy sparse and :class:`scipy.sparse.linalg.LinearOperator`; spectra decaying,
flat (Gaussian), a gap at ``k``, clustered, repeated (more copies than a block),
rank-deficient, and real data from the sklearn bundled datasets; ranks 1, just
below and above a gap, and ``min(m, n)``.

The rule checked is what the solvers document: an exact solver is within its
registry tolerance; an iterative or randomized one is either *certified* and
within the certified bound, or raises :class:`truncpinv.UncertifiedResultWarning`;
``auto`` is always certified (never warns) and within the bound. Ties are never
tested: the rank and cut-off are drawn so that the kept and the dropped
singular values differ by a clear factor.

``HYPOTHESIS_PROFILE=thorough`` widens the sampled part (1,000 examples a solver).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import truncpinv as tp

from .registry import SOLVER_INFOS, SolverInfo

SHAPES = {
    "tall": (90, 40),
    "wide": (40, 90),
    "square": (50, 50),
    "very-tall": (1600, 80),
    "very-wide": (80, 1600),
}
SPECTRA = ("decaying", "flat", "gap", "clustered", "repeated", "deficient")
KINDS = ("dense", "sparse", "operator")
#: A kept and a dropped singular value closer than this factor count as a tie and are not tested.
TIE = 1.05


def _spectrum(kind: str, q: int, rng: np.random.Generator) -> np.ndarray | None:
    """Singular values of kind ``kind`` (``None``: a Gaussian matrix, the flat case)."""
    i = np.arange(q, dtype=np.float64)
    if kind == "decaying":
        return 0.8**i
    if kind == "gap":
        k = max(1, q // 4)
        return np.where(i < k, 1.0 + 0.1 * (k - i), 1e-2 * 0.9 ** (i - k))
    if kind == "clustered":  # three tight clusters
        t = q // 3
        c = [1.0 + 1e-3 * rng.random(t), 0.1 + 1e-4 * rng.random(t), 1e-3 * (1 + rng.random(q - 2 * t))]
        return np.sort(np.concatenate(c))[::-1]
    if kind == "repeated":  # 12 copies of the top value: more than Lanczos' block of 8
        r = min(12, q - 1)
        return np.r_[np.full(r, 2.0), 0.5 * 0.8 ** i[: q - r]]
    if kind == "deficient":
        r = max(1, q // 2)
        return np.r_[0.9 ** i[:r], np.zeros(q - r)]
    return None


def _matrix(shape: tuple[int, int], spectrum: str, seed: int) -> np.ndarray:
    m, n = shape
    rng = np.random.default_rng(seed)
    s = _spectrum(spectrum, min(m, n), rng)
    if s is None:
        return rng.standard_normal((m, n))
    q = min(m, n)
    U = np.linalg.qr(rng.standard_normal((m, q)))[0]
    V = np.linalg.qr(rng.standard_normal((n, q)))[0]
    return (U * s) @ V.T


def _as(kind: str, A: np.ndarray) -> Any:
    if kind == "sparse":
        return sp.csr_matrix(A)
    if kind == "operator":
        return spla.aslinearoperator(sp.csr_matrix(A))
    return A


def _ranks(s: np.ndarray) -> list[int]:
    """1, just below and above the largest gap, and min(m, n), minus ties."""
    q = s.size
    ratio = s[:-1] / np.maximum(s[1:], 1e-300)
    g = int(np.argmax(ratio[:-1])) + 1 if q > 2 else 1  # the largest gap lies after s[g-1]
    out = sorted({1, max(1, g - 1), g, min(q, g + 1), q})
    return [r for r in out if r == q or s[r - 1] > TIE * s[r]]


def _cutoff_ok(s: np.ndarray, rtol: float) -> bool:
    cut = rtol * s[0]
    return not np.any((s > cut / TIE) & (s < cut * TIE))


def _check(info: SolverInfo, A: np.ndarray, kind: str, rank: int, rtol: float) -> None:
    """The rule of the module docstring for one problem."""
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    r = min(rank, int((s > rtol * s[0]).sum()))
    b = np.random.default_rng(1).standard_normal(A.shape[0])
    x_ref = Vt[:r].T @ ((U[:, :r].T @ b) / s[:r]) if r else np.zeros(A.shape[1])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        F = info.solver.factorize(_as(kind, A), rank=rank, rtol=rtol)
    warned = [x for x in w if issubclass(x.category, tp.UncertifiedResultWarning)]
    if info.name == "auto":
        assert not warned, "auto returned an uncertified result"
    if warned:
        assert len(warned) == 1 and F.stats.get("certified") is False
        return
    assert F.rank == r
    x = np.asarray(F @ b)
    nx = max(np.linalg.norm(x_ref), 1e-300)
    kappa = s[0] / s[r - 1] if r else 1.0
    # the truncation's own sensitivity: sigma to err * sigma_1 moves the kept subspace by err / relgap
    rel_gap = (s[r - 1] - (s[r] if r < s.size else 0.0)) / s[0] if r else 1.0
    allowed = info.rel_tol(torch.float64, kappa) * (1 + 1 / rel_gap)
    if "residual_tol" in F.stats:  # certified: residuals within tol * sigma_1 in both orientations
        allowed = max(allowed, 10 * F.stats["residual_tol"] * kappa * (1 + 1 / rel_gap))
    err = np.linalg.norm(x - x_ref) / nx
    assert err <= allowed, f"{info.name}: solution error {err:.2e} > {allowed:.2e} ({F.stats})"


#: At least this many sampled problems per solver (more under ``HYPOTHESIS_PROFILE=thorough``).
ZOO_EXAMPLES = max(60, settings().max_examples)


@pytest.mark.parametrize("info", SOLVER_INFOS, ids=str)
@settings(max_examples=ZOO_EXAMPLES)
@given(
    shape=st.sampled_from(sorted(SHAPES)),
    spectrum=st.sampled_from(SPECTRA),
    kind=st.sampled_from(KINDS),
    which=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_zoo_against_float64_svd(info: SolverInfo, shape: str, spectrum: str, kind: str, which: int, seed: int) -> None:
    assume(kind == "dense" or info.matrix_free)
    A = _matrix(SHAPES[shape], spectrum, seed)
    s = np.linalg.svd(A, compute_uv=False)
    ranks = _ranks(s)
    # a Gram matrix resolves sigma only down to sqrt(eps * max(m, n)) sigma_1 (documented): cut above it
    rtol = 1e-5 if info.squares else 1e-8
    assume(ranks and _cutoff_ok(s, rtol))
    _check(info, A, kind, ranks[which % len(ranks)], rtol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_zoo_auto_sweep(shape: str, spectrum: str, kind: str) -> None:
    """Every shape x spectrum x input kind x rank for ``auto``, the default."""
    info = next(i for i in SOLVER_INFOS if i.name == "auto")
    A = _matrix(SHAPES[shape], spectrum, 7)
    s = np.linalg.svd(A, compute_uv=False)
    for rank in _ranks(s):
        if _cutoff_ok(s, 1e-5):
            _check(info, A, kind, rank, 1e-5)


def _standardised(name: str) -> np.ndarray:
    datasets = pytest.importorskip("sklearn.datasets")
    data = getattr(datasets, f"load_{name}")()
    X = np.asarray(data.data, dtype=np.float64)
    sd = X.std(0)
    return (X - X.mean(0)) / np.where(sd > 0, sd, 1.0)


@pytest.mark.parametrize(
    "info", [i for i in SOLVER_INFOS if i.name in ("auto", "randomized", "lanczos", "lobpcg")], ids=str
)
@pytest.mark.parametrize("name", ["digits", "diabetes", "breast_cancer", "wine", "linnerud", "iris"])
def test_zoo_real_data(info: SolverInfo, name: str) -> None:
    X = _standardised(name)
    s = np.linalg.svd(X, compute_uv=False)
    rtol = 1e-5 if info.squares else 1e-8
    for rank in _ranks(s):
        if _cutoff_ok(s, rtol):
            _check(info, X, "dense", rank, rtol)
            _check(info, X.T.copy(), "operator", rank, rtol)
