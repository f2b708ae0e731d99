"""The a-posteriori certificate catches bad answers, in both orientations and for every input kind (issue #11)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import truncpinv as tp

_TOL = tp.Tolerance(rank=5, rtol=1e-8, atol=0.0)


def _svd(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A matrix with a clear spectrum ``2, 1.8, ..., `` (geometric, no ties) and its exact SVD."""
    g = torch.Generator().manual_seed(seed)
    q = min(m, n)
    U = torch.linalg.qr(torch.randn(m, q, dtype=torch.float64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, q, dtype=torch.float64, generator=g)).Q
    S = 2.0 * 0.9 ** torch.arange(q, dtype=torch.float64)
    return (U * S) @ V.T, U, S, V


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)], ids=["tall", "wide"])
@pytest.mark.parametrize("kind", ["dense", "operator"])
def test_exact_triplets_are_certified(shape: tuple[int, int], kind: str) -> None:
    A, U, S, V = _svd(*shape)
    op = A if kind == "dense" else tp.TensorOperator(A)
    cert = tp.certify(op, U[:, :8], S[:8], V[:, :8], _TOL, rtol_res=1e-12)
    assert cert.certified, cert
    assert cert.residual < 1e-13 and cert.deflated_norm < cert.threshold


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)], ids=["tall", "wide"])
@pytest.mark.parametrize("kind", ["dense", "operator"])
def test_a_missed_singular_value_is_caught(shape: tuple[int, int], kind: str) -> None:
    """Triplets 1-4 and 6: every residual is zero, but sigma_5 was missed. Residuals alone cannot see it."""
    A, U, S, V = _svd(*shape)
    idx = torch.tensor([0, 1, 2, 3, 5])
    op = A if kind == "dense" else tp.TensorOperator(A)
    cert = tp.certify(op, U[:, idx], S[idx], V[:, idx], _TOL, rtol_res=1e-12)
    assert cert.residual < 1e-13, "a converged triplet of the wrong sigma"
    assert not cert.certified
    assert cert.deflated_norm >= cert.threshold  # the missed sigma_5 shows up in A - U S V^T
    assert cert.deflated_norm <= float(S[4]) * (1 + 1e-12)  # a lower estimate of ||D|| = sigma_5


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)], ids=["tall", "wide"])
def test_a_one_sided_residual_is_caught_in_the_other_orientation(shape: tuple[int, int]) -> None:
    """``U = A V S^{-1}`` for a wrong ``V``: ``||A v - s u|| = 0`` exactly, ``||A^T u - s v||`` is not."""
    A, _, _, V = _svd(*shape)
    g = torch.Generator().manual_seed(3)
    Vb = torch.linalg.qr(V[:, :5] + 0.1 * torch.randn(V.shape[0], 5, dtype=torch.float64, generator=g)).Q
    Sb = (A @ Vb).norm(dim=0)
    Ub = (A @ Vb) / Sb
    cert = tp.certify(A, Ub, Sb, Vb, _TOL, rtol_res=1e-12)
    assert float(((A @ Vb) - Ub * Sb).norm(dim=0).max()) < 1e-13
    assert not cert.certified and cert.residual > 1e-3


def test_broken_solver_result_warns_and_auto_falls_back() -> None:
    """Issue #11 item 1 in miniature: a flat tall matrix at low rank. A randomized sketch at a small budget is
    not certified (one warning, naming the estimate); ``auto`` is never uncertified and is accurate."""
    A = np.random.default_rng(0).standard_normal((1600, 200))
    s = np.linalg.svd(A, compute_uv=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        F = tp.RandomizedSVD(power_iters=1, max_power_iters=1).factorize(A, rank=10, rtol=1e-8)
    msgs = [x for x in w if issubclass(x.category, tp.UncertifiedResultWarning)]
    assert len(msgs) == 1 and "uncertified" in str(msgs[0].message) and "residual" in str(msgs[0].message)
    assert msgs[0].filename == __file__, "the warning points at the caller, not into truncpinv"
    assert F.stats["certified"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.UncertifiedResultWarning)
        Fa = tp.pinv(A, rank=10, rtol=1e-8)
        Ft = tp.pinv(A.T.copy(), rank=10, rtol=1e-8)
    assert np.abs(Fa.S - s[:10]).max() < 1e-12 * s[0]
    assert np.abs(Ft.S - s[:10]).max() < 1e-12 * s[0]


def test_randomized_keeps_going_on_a_small_gap() -> None:
    """Issue #11 item 2: digits, rank 4 (gap 1.16). At its defaults RandomizedSVD is certified and accurate."""
    datasets = pytest.importorskip("sklearn.datasets")
    X = datasets.load_digits().data.astype(np.float64)
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    b = np.random.default_rng(0).standard_normal(X.shape[0])
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    x_ref = Vt[:4].T @ ((U[:, :4].T @ b) / s[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.UncertifiedResultWarning)
        F = tp.RandomizedSVD().factorize(X, rank=4, rtol=1e-8)
    assert F.stats["certified"]
    assert np.linalg.norm(F @ b - x_ref) < 1e-8 * np.linalg.norm(x_ref)


@pytest.mark.parametrize("solver", ["auto", "lanczos", "randomized", "lobpcg", "gram", "svds"])
def test_nan_in_sparse_or_operator_input_is_named(solver: str) -> None:
    S = sp.random(60, 40, density=0.2, random_state=0, format="csr")
    S.data[3] = np.nan
    with pytest.raises(ValueError, match=r"`A` must be finite, but it contains 1 NaN or Inf entry"):
        tp.pinv(S, rank=3, solver=solver)
    with pytest.raises(ValueError, match=r"`A` must be finite, but the operator's `(r)?matmat` returned NaN or Inf"):
        tp.pinv(spla.aslinearoperator(S), rank=3, solver=solver)


def test_numpy_scalars_are_accepted() -> None:
    A = np.random.default_rng(0).standard_normal((30, 20))
    F = tp.pinv(A, rank=np.int64(5), rtol=np.float32(1e-3), atol=np.float64(0.0))
    G = tp.pinv(A, rank=5, rtol=float(np.float32(1e-3)), atol=0.0)
    assert F.rank == G.rank == 5 and np.array_equal(F.S, G.S)
    assert tp.pinv(A, rank=np.int32(3)).rank == 3
    with pytest.raises(TypeError, match=r"`rank` must be a positive integer or None, got np.float64\(3.0\)"):
        tp.pinv(A, rank=np.float64(3.0))
    with pytest.raises(TypeError, match=r"`rank` must be a positive integer or None, got np.True_"):
        tp.pinv(A, rank=np.bool_(True))
    with pytest.raises(TypeError, match=r"`rtol` must be a non-negative float or None, got"):
        tp.pinv(A, rtol=np.bool_(True))


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)], ids=["tall", "wide"])
def test_accurate_extras_next_to_the_cut_are_deflated_at_a_loose_tol(shape: tuple[int, int]) -> None:
    """tol = 1e-6: exact further triplets just below sigma_5 (gap 1e-3) are deflated because they lie below it by
    more than 4x their own residual. A fixed margin of 4 sqrt(tol) sigma_1 kept them out, and the check then had
    to resolve sigma_6 / sigma_5 = 0.999 within its 64 steps: uncertified however accurate the answer."""
    g = torch.Generator().manual_seed(5)
    m, n = shape
    q = min(m, n)
    U = torch.linalg.qr(torch.randn(m, q, dtype=torch.float64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, q, dtype=torch.float64, generator=g)).Q
    i = torch.arange(q, dtype=torch.float64)
    S = torch.where(i < 5, 2.0 - 0.25 * i, torch.where(i < 20, 0.999 - 5e-4 * (i - 5), 0.5 * 0.9 ** (i - 20)))
    A = (U * S) @ V.T
    cert = tp.certify(A, U[:, :20], S[:20], V[:, :20], tp.Tolerance(rank=5, rtol=1e-8, atol=0.0), rtol_res=1e-6)
    assert cert.certified, cert
    assert cert.deflated_norm <= float(S[20]) * (1 + 1e-12)  # the extras were deflated: what is left is sigma_21


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_matrix_fails_the_certificate_instead_of_crashing_in_lapack(bad):
    # check_finite=False lets NaN/Inf reach the missed-value check; its Lanczos coefficients are then not finite
    # and LAPACK's tridiagonal bisection refuses them. The certificate must say "not certified", not raise.
    g = torch.Generator().manual_seed(3)
    A = torch.randn(40, 30, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    A[5, 7] = bad
    cert = tp.certify(A, U[:, :4], S[:4], Vh[:4].T, _TOL, rtol_res=1e-12)
    assert not cert.certified
    assert not math.isfinite(cert.deflated_norm) or not math.isfinite(cert.residual)


@settings(max_examples=25, deadline=None)
@given(
    s=st.integers(12, 40),
    d=st.integers(0, 5),
    runs=st.integers(1, 3),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_check_step_is_lanczos_on_the_deflated_operator(s: int, d: int, runs: int, steps: int, seed: int) -> None:
    """The missed-value check's step, on NumPy arrays (the CPU) and on torch tensors (other devices) alike, is
    a Lanczos step of ``P M P`` (``P = I - Q Q^T``): each run's basis stays orthonormal and orthogonal to ``Q``,
    and ``alpha``, ``beta`` are the entries of the projected tridiagonal ``K P M P K^T``."""
    from truncpinv._certify import _check_step

    rng = np.random.default_rng(seed)
    C = rng.standard_normal((s + 5, s))
    M = C.T @ C
    Q = np.linalg.qr(rng.standard_normal((s, d)))[0]
    x = rng.standard_normal((runs, s))
    x -= (x @ Q) @ Q.T
    bases = {}
    for kind in ("numpy", "torch"):
        Kb = np.zeros((runs, steps + 1, s))
        Kb[:, 0] = x / np.linalg.norm(x, axis=1, keepdims=True)
        Kd: Any = np.ascontiguousarray(Q.T)
        K: Any = Kb
        if kind == "torch":
            Kd, K = torch.from_numpy(Kd), torch.from_numpy(Kb)
        alpha, beta = np.zeros((runs, steps)), np.zeros((runs, steps))
        for j in range(steps):
            W, a, bn = _check_step(
                K[:, j] @ (M if kind == "numpy" else torch.from_numpy(M)), Kd, K, j, beta[:, j - 1] if j else None
            )
            K[:, j + 1] = W / (bn[:, None] if kind == "numpy" else torch.from_numpy(bn)[:, None])
            alpha[:, j], beta[:, j] = a, bn
        bases[kind] = (Kb, alpha, beta)
    Kb, alpha, beta = bases["numpy"]
    scale = float(np.linalg.norm(M, 2))
    for got, want in zip(bases["torch"], bases["numpy"]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * max(scale, 1.0))
    P = np.eye(s) - Q @ Q.T
    for r in range(runs):
        K = Kb[r]
        assert np.abs(K @ K.T - np.eye(steps + 1)).max() < 1e-12
        if d:
            assert np.abs(K @ Q).max() < 1e-12
        T = K[:steps] @ P @ M @ P @ K[:steps].T
        T_ref = np.diag(alpha[r]) + np.diag(beta[r, : steps - 1], 1) + np.diag(beta[r, : steps - 1], -1)
        assert np.abs(T - T_ref).max() <= 1e-10 * scale


def test_loose_extras_are_deflated_when_their_margin_costs_less_than_the_gap_they_open() -> None:
    """Further triplets whose residual (1e-5 sigma_1) exceeds sqrt(tol) = 1e-6 but that lie clearly below sigma_5
    are deflated when that widens the predicted gap: all but the last (whose value predicts the gap, the next
    value not being known), and the check then resolves sigma_20 / sigma_5 = 0.981 in about 20 steps instead of
    sigma_6 / sigma_5 = 0.995 (about 86 steps at s = 300, more than its 64). Their Weyl margin sqrt(2 d) r sigma_1
    is subtracted from the threshold, so the certificate stays sound."""
    g = torch.Generator().manual_seed(7)
    m, n = 600, 300
    U = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g)).Q
    i = torch.arange(n, dtype=torch.float64)
    S = torch.where(i < 5, 2.0 - 0.25 * i, torch.where(i < 20, 0.995 - 1e-3 * (i - 5), 0.5 * 0.9 ** (i - 20)))
    A = (U * S) @ V.T
    V_ret = V[:, :20].clone()
    V_ret[:, 5:] += 1e-5 * V[:, 20:35]  # residual ||A^T u - s v|| = 1e-5 s per further triplet
    V_ret[:, 5:] /= V_ret[:, 5:].norm(dim=0)
    cert = tp.certify(A, U[:, :20], S[:20], V_ret, tp.Tolerance(rank=5, rtol=1e-8, atol=0.0), rtol_res=1e-12)
    assert cert.certified, cert
    assert cert.deflated_norm <= float(S[19]) * (1 + 1e-9)  # what is left is sigma_20
    assert cert.threshold < float(S[4])  # their margin was subtracted
    assert cert.steps < 64


def test_extra_pairs_takes_loose_ritz_pairs_only_where_they_pay() -> None:
    """ARPACK's further Ritz pairs join the Rayleigh-Ritz step when the check they shorten costs more than their
    two block columns each; the next pair is returned too, as the certificate's predictor of the gap."""
    import truncpinv.solvers.scipy_svds as SS

    sv = np.concatenate([2.0 - 0.25 * np.arange(5), 0.995 - 1e-3 * np.arange(15), 0.5 * 0.9 ** np.arange(11)])
    res = np.concatenate([np.full(5, 1e-14), np.full(15, 1e-5), np.full(11, 1e-1)])
    # the close pairs, as many as allowed (EXTRA_PER_RANK k = 5), and the next one to predict the gap from
    assert SS.extra_pairs(sv, res, 5, 1e-12, 3000) == 5 + int(SS.EXTRA_PER_RANK * 5) + 1
    wide = np.concatenate([2.0 - 0.25 * np.arange(5), 0.5 * 0.9 ** np.arange(26)])  # sigma_6 / sigma_5 = 0.5
    assert SS.extra_pairs(wide, res, 5, 1e-12, 3000) == 5  # a wide gap already: none pays


@settings(max_examples=30, deadline=None)
@given(
    s=st.integers(5, 60),
    d=st.integers(0, 5),
    noise=st.sampled_from([0.0, 1e-9, 1e-4, 1.0]),
    repeat=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_orthonormal_basis_spans_the_columns(s: int, d: int, noise: float, repeat: bool, seed: int) -> None:
    """``orthonormal_basis`` returns orthonormal columns spanning those of ``X``: by Cholesky QR for nearly
    orthonormal ``X`` (noise 0, 1e-9), by Householder QR otherwise (1e-4, a random ``X``, a repeated column)."""
    from truncpinv._certify import orthonormal_basis

    d = min(d, s - 1)
    g = torch.Generator().manual_seed(seed)
    X = torch.linalg.qr(torch.randn(s, d, dtype=torch.float64, generator=g)).Q
    X = X + noise * torch.randn(s, d, dtype=torch.float64, generator=g)
    if repeat and d >= 2:
        X[:, -1] = X[:, 0]  # rank deficient: Householder still returns d orthonormal columns
    Q = orthonormal_basis(X)
    assert Q.shape == X.shape
    if d == 0:
        return
    assert float((Q.T @ Q - torch.eye(d, dtype=torch.float64)).abs().max()) < 1e-12
    # every column of X lies in the span of Q
    assert float((X - Q @ (Q.T @ X)).abs().max()) < 1e-12 * max(1.0, float(X.abs().max()))


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 5000), cols=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_residual_norms_in_blocks_are_the_column_norms(rows: int, cols: int, seed: int) -> None:
    """``||y_i - s_i x_i||`` in cache-sized row blocks equals the norm of the whole column (blocks of
    ``BLOCK_ENTRIES / cols`` rows: several blocks for the larger draws)."""
    from truncpinv._certify import _column_norms

    g = torch.Generator().manual_seed(seed)
    Y, X = (torch.randn(rows, cols, dtype=torch.float64, generator=g) for _ in range(2))
    S = torch.rand(cols, dtype=torch.float64, generator=g)
    want = torch.linalg.vector_norm(Y - X * S, dim=0)
    torch.testing.assert_close(_column_norms(Y, X, S), want, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)], ids=["tall", "wide"])
def test_a_repeated_triplet_does_not_hide_a_missed_value(shape: tuple[int, int]) -> None:
    """Triplets 1, 1, 2, 3, 5: every residual is zero, and the vectors are not orthonormal; they span 4
    directions, and sigma_4 > sigma_5 = tau is left in ``A P``. The orthonormality test refuses them before the
    missed-value check; the deflation alone (Householder QR of the span, not Cholesky QR) leaves the miss in
    ``A P`` too."""
    from truncpinv._certify import orthonormal_basis

    A, U, S, V = _svd(*shape)
    idx = torch.tensor([0, 0, 1, 2, 4])
    cert = tp.certify(A, U[:, idx], S[idx], V[:, idx], _TOL, rtol_res=1e-12)
    assert cert.residual < 1e-13
    assert not cert.certified
    assert cert.orthonormality > 0.5 > cert.tol and "orthonormal" in cert.explain("lanczos")
    X = (U if shape[0] <= shape[1] else V)[:, idx]
    Q = orthonormal_basis(X)
    AP = A - A @ Q @ Q.T if shape[0] > shape[1] else A - Q @ (Q.T @ A)
    # ||A P|| <= sigma_4 (P removes directions 1, 2, 3, 5 and the arbitrary fifth column of Q), and above tau
    assert float(S[4]) < float(torch.linalg.matrix_norm(AP, ord=2)) <= float(S[3]) * (1 + 1e-12)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)], ids=["tall", "wide"])
def test_a_repeated_triplet_with_the_miss_below_the_cut_is_refused(shape: tuple[int, int]) -> None:
    """Triplets 1, 1, 2, 3, 4 at rank 5: every residual is zero and the 4 directions they span leave only
    sigma_5 < sigma_4 = tau in ``A P``, so the missed-value check passes; but ``V S^{-1} U^T`` counts sigma_1
    twice. Only the orthonormality of the returned vectors (``||X^T X - I|| = 1`` here) can refuse it."""
    A, U, S, V = _svd(*shape)
    idx = torch.tensor([0, 0, 1, 2, 3])
    Ub, Sb, Vb = U[:, idx], S[idx], V[:, idx]
    wrong = (Vb / Sb) @ Ub.T - (V[:, :4] / S[:4]) @ U[:, :4].T  # the direction 1 counted twice
    assert float(torch.linalg.matrix_norm(wrong, ord=2)) > 0.1
    cert = tp.certify(A, Ub, Sb, Vb, _TOL, rtol_res=1e-12)
    assert cert.residual < 1e-13
    assert not cert.certified
    assert cert.orthonormality > 0.5 > cert.tol
    assert "orthonormal" in cert.explain("lanczos")


def _repeated(m: int, n: int, mult: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A matrix whose singular value ``1.5`` has multiplicity ``mult`` (between ``2`` and ``1``), and its SVD."""
    g = torch.Generator().manual_seed(seed)
    q = min(m, n)
    U = torch.linalg.qr(torch.randn(m, q, dtype=torch.float64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, q, dtype=torch.float64, generator=g)).Q
    S = torch.cat([torch.tensor([2.0]), torch.full((mult,), 1.5), 0.9 ** torch.arange(q - mult - 1)]).double()
    return (U * S) @ V.T, U, S, V


@settings(max_examples=20, deadline=None)
@given(
    wide=st.booleans(),
    mult=st.integers(2, 4),
    eps=st.floats(1e-9, 1e-2),
    seed=st.integers(0, 2**31 - 1),
)
def test_orthonormality_is_checked_up_to_tol_and_a_basis_of_a_multiple_value_is_free(
    wide: bool, mult: int, eps: float, seed: int
) -> None:
    """Inside a multiple singular value ``sigma`` any basis is exact: ``A V_k M = sigma U_k M`` for every ``M``,
    so all residuals stay zero. An orthogonal ``M`` gives another exact SVD and stays certified; ``M = Q (I + E)``
    with symmetric ``E`` of norm ``eps`` (far above ``tol = 1e-12``) does not: ``(V_k M)(U_k M)^T / sigma`` is
    ``V_k (I + E)^2 U_k^T / sigma``, a wrong pseudoinverse, and the certificate refuses it, naming the
    orthonormality ``||M^T M - I||_2 = ||(I + E)^2 - I||_2``."""
    m, n = (60, 90) if wide else (90, 60)
    A, U, S, V = _repeated(m, n, mult, seed % 1000)
    g = torch.Generator().manual_seed(seed)
    k = mult + 2  # sigma_1, the multiple value, one more; rank k, tau = sigma_k
    Q = torch.linalg.qr(torch.randn(mult, mult, dtype=torch.float64, generator=g)).Q
    block = slice(1, 1 + mult)
    tol = tp.Tolerance(rank=k, rtol=1e-8, atol=0.0)

    def certify(M: torch.Tensor) -> tp.Certificate:
        Ub, Vb = U[:, :k].clone(), V[:, :k].clone()
        Ub[:, block], Vb[:, block] = U[:, block] @ M, V[:, block] @ M
        return tp.certify(A, Ub, S[:k], Vb, tol, rtol_res=1e-12)

    good = certify(Q)
    assert good.certified, good
    assert good.orthonormality < 1e-13
    E = torch.randn(mult, mult, dtype=torch.float64, generator=g)
    E = eps * (E + E.T) / torch.linalg.matrix_norm(E + E.T, ord=2)
    bad = certify(Q @ (torch.eye(mult, dtype=torch.float64) + E))
    assert bad.residual < 1e-12, "a basis of a multiple value: the residuals cannot see it"
    assert not bad.certified
    # ||(I + E)^2 - I||_2 = max |2 e + e^2| over the eigenvalues e of E, one of them +-eps
    assert bad.orthonormality >= (2 - eps) * eps * (1 - 1e-6)
    assert "orthonormal" in bad.explain("lanczos")
