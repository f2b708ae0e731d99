"""SciPy input on the ``svds`` path (issue #22): ``ScipySVDS`` against a dense float64 SVD, ``auto``'s choice,
and the certificate catching bad ``svds`` answers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import truncpinv as tp
import truncpinv.solvers.scipy_svds as SS

from .spectra import make_matrix

#: ``(m, n)`` for the differential tests: tall and wide.
SHAPES = {"tall": (240, 90), "wide": (90, 240)}


def _inputs(A: np.ndarray) -> dict[str, object]:
    """The SciPy input kinds of one matrix: CSR, CSC, and a matrix-free ``LinearOperator``."""
    csr = sp.csr_matrix(A)
    op = spla.LinearOperator(A.shape, matvec=lambda x: A @ x, rmatvec=lambda y: A.T @ y, dtype=A.dtype)
    return {"csr": csr, "csc": sp.csc_matrix(A), "operator": op}


def _residual(A: np.ndarray, F: tp.TruncatedPinv) -> float:
    U, S, V = np.asarray(F.U), np.asarray(F.S), np.asarray(F.V)
    r1 = np.linalg.norm(A @ V - U * S, axis=0).max(initial=0.0)
    r2 = np.linalg.norm(A.T @ U - V * S, axis=0).max(initial=0.0)
    return max(r1, r2)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("kind", ["gap", "flat", "geometric", "deficient"])
@pytest.mark.parametrize("inp", ["csr", "csc", "operator"])
def test_svds_agrees_with_the_dense_svd(shape: tuple[int, int], kind: str, inp: str) -> None:
    """Kept values within ``sqrt(2) tol sigma_1`` of the dense SVD's (the certificate's promise), residuals in
    both orientations within ``tol sigma_1``, certified, at ranks from 1 to the whole short side."""
    A, _, s, _ = make_matrix(*shape, kind, seed=len(kind))
    q = min(shape)
    for rank in (1, 7, q // 8, q):
        with warnings.catch_warnings():
            warnings.simplefilter("error", tp.UncertifiedResultWarning)
            F = tp.ScipySVDS().factorize(_inputs(A)[inp], rank=rank, rtol=1e-10)
        r = F.rank
        expect = min(rank, int((s > 1e-10 * s[0]).sum()))
        assert r == expect
        tol = F.stats["residual_tol"] if "residual_tol" in F.stats else 1e-12
        assert np.abs(np.asarray(F.S) - s[:r]).max(initial=0.0) <= np.sqrt(2) * tol * s[0] * 10
        assert _residual(A, F) <= tol * s[0] * 10
        assert F.stats.get("certified", True)


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(20, 120),
    n=st.integers(20, 120),
    density=st.sampled_from([0.05, 0.2, 1.0]),
    rank=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    float32=st.booleans(),
)
def test_svds_on_random_sparse_matrices(m: int, n: int, density: float, rank: int, seed: int, float32: bool) -> None:
    """Random sparse matrices of any orientation: the kept values are the top ones of the dense float64 SVD
    to the certified tolerance (float64), or to ``sqrt(2) tol`` (float32), and never uncertified silently."""
    A = sp.random(m, n, density=density, random_state=seed, format="csr")
    A = A.astype(np.float32) if float32 else A
    s = np.linalg.svd(A.toarray().astype(np.float64), compute_uv=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        F = tp.ScipySVDS().factorize(A, rank=rank, rtol=1e-4)
    if F.stats.get("certified", True):
        tol = F.stats.get("residual_tol", tp.default_tol(torch.float64, (m, n)))
        err = np.abs(np.asarray(F.S, dtype=np.float64) - s[: F.rank]).max(initial=0.0)
        assert err <= 2 * tol * s[0] + 4 * np.finfo(np.float32 if float32 else np.float64).eps * s[0]
    else:  # a tie at the cut can leave the check undecided: then one warning says so
        assert any(issubclass(x.category, tp.UncertifiedResultWarning) for x in w)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_auto_takes_svds_for_scipy_input_at_low_rank(shape: tuple[int, int]) -> None:
    """The rule of docs/solvers.md: SciPy sparse or LinearOperator input on the CPU at ``rank <= min(m, n) / 8``
    runs ``svds``; torch operators, dense arrays and higher ranks keep their paths."""
    A, _, s, _ = make_matrix(*shape, "gap", seed=0)
    q = min(shape)
    for name, inp in _inputs(A).items():
        F = tp.pinv(inp, rank=q // 8, rtol=1e-10)
        assert F.stats["chosen"] == "svds", name
        np.testing.assert_allclose(np.asarray(F.S), s[: q // 8], rtol=0, atol=1e-11 * s[0])
    assert tp.pinv(sp.csr_matrix(A), rank=q // 8 + 1).stats["chosen"] == "lanczos"
    assert tp.pinv(tp.TensorOperator(torch.from_numpy(A)), rank=q // 8 + 1).stats["chosen"] == "lanczos"
    assert tp.pinv(A, rank=q // 8).stats["chosen"] != "svds"


def _torch_inputs(A: np.ndarray, dtype: torch.dtype) -> dict[str, object]:
    """The torch matrix-free kinds of one matrix: sparse CSR/COO/CSC tensors and a dense tensor in a
    ``TensorOperator``, and a ``CallableOperator`` whose products run in torch."""
    T = torch.from_numpy(A).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR tensor support is in beta state"
        kinds: dict[str, object] = {
            "csr": tp.TensorOperator(T.to_sparse_csr()),
            "coo": tp.TensorOperator(T.to_sparse_coo()),
            "csc": tp.TensorOperator(T.to_sparse_csc()),
            "dense": tp.TensorOperator(T),
            "callable": tp.CallableOperator(A.shape, lambda X: T @ X, lambda Y: T.T @ Y, dtype=dtype),
        }
    return kinds


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_auto_takes_svds_for_cpu_torch_operators(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Torch operators on the CPU at low rank run ``svds`` too (docs/solvers.md): the values agree with the
    dense float64 SVD to the certified tolerance, and U, S, V come back as torch tensors of the input's
    dtype and device, with residuals in both orientations within ``tol sigma_1``."""
    A, _, s, _ = make_matrix(*shape, "gap", seed=4)
    q = min(shape)
    for name, inp in _torch_inputs(A, dtype).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", tp.UncertifiedResultWarning)
            F = tp.pinv(inp, rank=q // 8)
        assert F.stats["chosen"] == "svds" and F.stats["certified"], name
        assert all(isinstance(X, torch.Tensor) and X.dtype == dtype and X.device.type == "cpu" for X in (F.U, F.S, F.V))
        tol = F.stats["residual_tol"]
        err = np.abs(np.asarray(F.S, dtype=np.float64) - s[: q // 8]).max()
        assert err <= 2 * tol * s[0] + 8 * float(torch.finfo(dtype).eps) * s[0], name
        U, S, V = (X.double().numpy() for X in (F.U, F.S, F.V))
        res = max(np.abs(A @ V - U * S).max(), np.abs(A.T @ U - V * S).max())
        assert res <= 4 * tol * s[0] + 8 * float(torch.finfo(dtype).eps) * s[0] * np.sqrt(max(shape)), name


def test_choose_solver_keeps_lanczos_for_cuda_and_high_rank_operators() -> None:
    """The rule itself: a CPU operator at low rank is ``svds``'s; one on CUDA (``cpu_operator=False``) and
    one at a high rank are ``Lanczos``'s."""
    from truncpinv.solvers.auto import choose_solver

    assert isinstance(choose_solver((3000, 500), 50, dense=False, cpu_operator=True), tp.ScipySVDS)
    assert isinstance(choose_solver((3000, 500), 50, dense=False, cpu_operator=False), tp.Lanczos)
    assert isinstance(choose_solver((3000, 500), 63, dense=False, cpu_operator=True), tp.Lanczos)


def test_a_nan_in_a_torch_operator_is_named() -> None:
    """A torch sparse or dense tensor is handed to SciPy only when its entries are finite; otherwise the
    products go through the checked operator, whose first product names the NaN."""
    A, _, _, _ = make_matrix(240, 90, "gap", seed=5)
    A[3, 7] = np.nan
    for name, inp in _torch_inputs(A, torch.float64).items():
        with pytest.raises(ValueError, match=r"`A` must be finite"):
            tp.pinv(inp, rank=10)
        assert name


@pytest.mark.parametrize("solver", ["auto", "svds", "lanczos"])
@pytest.mark.parametrize("wide", [False, True])
def test_a_product_of_the_wrong_shape_or_type_is_named(solver: str, wide: bool) -> None:
    """A ``CallableOperator`` whose products break the protocol (one row too few, or a NumPy array) raises an error
    naming the product, instead of SciPy's "cannot reshape array" or torch's shape error inside a solver."""
    A = torch.from_numpy(make_matrix(90, 240, "gap", seed=2)[0] if wide else make_matrix(240, 90, "gap", seed=2)[0])
    m, n = A.shape
    short = tp.CallableOperator((m, n), lambda X: (A @ X)[:-1], lambda Y: A.T @ Y, dtype=A.dtype)
    msg = rf"`A`'s `matmat` must map a block of shape \({n}, k\) to one of shape \({m}, k\)"
    with pytest.raises(ValueError, match=msg):
        tp.pinv(short, rank=5, solver=solver)
    short_t = tp.CallableOperator((m, n), lambda X: A @ X, lambda Y: (A.T @ Y)[:-1], dtype=A.dtype)
    with pytest.raises(ValueError, match=r"`A`'s `rmatmat` must map"):
        tp.pinv(short_t, rank=5, solver=solver)
    arrays = tp.CallableOperator((m, n), lambda X: (A @ X).numpy(), lambda Y: (A.T @ Y).numpy(), dtype=A.dtype)
    with pytest.raises(TypeError, match=r"`A`'s `(r?)matmat` must return a torch.Tensor, got ndarray"):
        tp.pinv(arrays, rank=5, solver=solver)


def test_a_block_sparse_cpu_tensor_is_refused_with_the_conversion() -> None:
    """torch has no CPU product for the transpose of a BSR (or BSC) tensor, which every solver needs: the
    operator refuses it at once, naming the layout and the conversion, and the converted one is solved."""
    A = torch.from_numpy(make_matrix(240, 90, "gap", seed=3)[0])
    for bsr in (A.to_sparse_bsr((2, 2)), A.to_sparse_bsc((2, 2))):
        with pytest.raises(ValueError, match=r"layout torch.sparse_bs[rc].*A.to_sparse_coo\(\).to_sparse_csr\(\)"):
            tp.pinv(tp.TensorOperator(bsr), rank=5)
        F = tp.pinv(tp.TensorOperator(bsr.to_sparse_coo().to_sparse_csr()), rank=5)
        torch.testing.assert_close(F.S, torch.linalg.svdvals(A)[:5], rtol=1e-10, atol=0.0)


def _broken_ritz(drop: int) -> object:
    """ARPACK's Ritz pairs of the Gram operator (``arpack_ritz``) leaving out the ``drop``-th largest one
    (exact pairs otherwise, the further ones included): a missed value, which the Rayleigh–Ritz step and the
    residuals cannot see."""
    real = SS.arpack_ritz

    def ritz(G: object, k: int, tol: float, v0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w, E, est = real(G, k + 1, tol, v0)
        keep = np.delete(np.arange(w.size), drop)
        return w[keep], E[:, keep], est[keep]

    return ritz


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_a_missed_value_from_arpack_is_caught_and_auto_falls_back(shape: tuple[int, int], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An ARPACK that skips sigma_3: every residual is at round-off (the reused Rayleigh–Ritz product on one
    side, a fresh product on the other), but the one-run check of the projected operator finds sigma_3 above
    the smallest kept value. ``ScipySVDS`` warns; ``auto`` runs ``Lanczos``."""
    A, _, s, _ = make_matrix(*shape, "geometric", seed=1)
    monkeypatch.setattr(SS, "arpack_ritz", _broken_ritz(2))
    with pytest.warns(tp.UncertifiedResultWarning, match="missed a singular value"):
        F = tp.ScipySVDS().factorize(sp.csr_matrix(A), rank=5, rtol=1e-10)
    assert F.stats["certified"] is False and F.stats["residual"] < 1e-13
    assert F.stats["deflated_norm"] >= F.stats["deflated_threshold"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.UncertifiedResultWarning)
        G = tp.pinv(sp.csr_matrix(A), rank=5, rtol=1e-10)
    assert G.stats["fallback"] == "lanczos" and G.stats["uncertified"]["certified"] is False
    np.testing.assert_allclose(np.asarray(G.S), s[:5], rtol=0, atol=1e-11 * s[0])


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("inp", ["csr", "operator"])
def test_perturbed_arpack_vectors_fail_the_residual(shape: tuple[int, int], inp: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """ARPACK's eigenvectors rotated by 1e-6 out of the invariant subspace: the Rayleigh–Ritz step makes
    ``A v - s u`` vanish on one side by construction, and the freshly multiplied other side
    (``A^T u - s v`` tall, ``A v - s u`` wide) exposes them in either orientation."""
    A, _, _, _ = make_matrix(*shape, "gap", seed=2)
    real = SS.arpack_ritz

    def ritz(G: object, k: int, tol: float, v0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w, E, est = real(G, k, tol, v0)
        return w, E + 1e-6 * np.random.default_rng(0).standard_normal(E.shape), est

    monkeypatch.setattr(SS, "arpack_ritz", ritz)
    with pytest.warns(tp.UncertifiedResultWarning, match="residual"):
        F = tp.ScipySVDS().factorize(_inputs(A)[inp], rank=4)
    assert F.stats["residual"] > 1e-8


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(40, 160), n=st.integers(40, 160), seed=st.integers(0, 2**16), kind=st.sampled_from(["flat", "gap"])
)
def test_the_reused_rayleigh_ritz_product_is_the_product(m: int, n: int, seed: int, kind: str) -> None:
    """``arpack_triplets`` returns ``C V`` for reuse by the certificate: it equals a fresh product
    ``C V`` to round-off, and ``C V = U diag(S)`` (the Rayleigh–Ritz identity), ``U`` and ``V`` orthonormal,
    ``S`` the top singular values of the dense SVD."""
    from truncpinv.solvers.scipy_svds import arpack_triplets

    A, _, s, _ = make_matrix(max(m, n), min(m, n), kind, seed=seed)
    k = min(m, n) // 8 + 1
    U, S, V, CV = arpack_triplets(spla.aslinearoperator(A), k, 1e-14, seed)
    scale = s[0] * np.finfo(np.float64).eps * 100
    assert np.abs(CV - A @ V).max() <= scale
    assert np.abs(CV - U * S).max() <= scale
    assert np.abs(U.T @ U - np.eye(k)).max() <= 1e-12 and np.abs(V.T @ V - np.eye(k)).max() <= 1e-12
    assert np.all(np.diff(S) <= 0) and np.abs(S - s[:k]).max() <= 1e-10 * s[0]


def test_zero_matrix_and_bad_arguments() -> None:
    Z = sp.csr_matrix((120, 50))
    F = tp.ScipySVDS().factorize(Z, rank=3)
    assert F.rank == 0 and F.stats["certified"]
    with pytest.raises(ValueError, match=r"`method` must be one of \['arpack', 'propack'\], got 'lobpcg'"):
        tp.ScipySVDS(method="lobpcg")
    with pytest.raises(ValueError, match=r"`check_steps` must be a positive integer, got 0"):
        tp.ScipySVDS(check_steps=0)


def test_propack_is_certified_at_a_loose_tolerance() -> None:
    """PROPACK through the same protocol; its residuals stall above 1e-11 sigma_1, so it is held to 1e-6 here."""
    A, _, s, _ = make_matrix(200, 80, "gap", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.UncertifiedResultWarning)
        F = tp.ScipySVDS(method="propack", tol=1e-6).factorize(sp.csr_matrix(A), rank=6)
    assert F.stats["method"] == "propack" and F.stats["certified"]
    np.testing.assert_allclose(np.asarray(F.S), s[:6], rtol=0, atol=2e-6 * s[0])


@pytest.mark.parametrize("runs", [1, 4])
@pytest.mark.parametrize("shape", [(300, 40), (40, 300)], ids=["tall", "wide"])
def test_one_run_check_still_catches_a_missed_value(runs: int, shape: tuple[int, int]) -> None:
    """The projected check with one run (the SciPy path) and four (the default) on the broken triplets of
    tests/test_certify.py: sigma_5 left out, all residuals zero."""
    A, U, s, V = make_matrix(*shape, "geometric", seed=0)
    idx = [0, 1, 2, 3, 5]
    T = [torch.from_numpy(np.ascontiguousarray(X)) for X in (U[:, idx], s[idx], V[:, idx])]
    tol = tp.Tolerance(rank=5, rtol=1e-8, atol=0.0)
    cert = tp.certify(tp.aslinearoperator(sp.csr_matrix(A)), *T, tol, rtol_res=1e-12, runs=runs)
    assert cert.residual < 1e-13 and not cert.certified
    assert cert.threshold <= cert.deflated_norm <= s[4] * (1 + 1e-12)
    good = [torch.from_numpy(np.ascontiguousarray(X)) for X in (U[:, :5], s[:5], V[:, :5])]
    assert tp.certify(tp.aslinearoperator(sp.csr_matrix(A)), *good, tol, rtol_res=1e-12, runs=runs).certified


@pytest.mark.parametrize("solver", ["lanczos", "irlba", "randomized"])
def test_operator_solvers_take_torch_sparse_tensors(solver: str) -> None:
    """``TensorOperator`` over sparse CSR/CSC/COO tensors serves every matrix-free solver (its ``rmatmat``
    transposes with ``.t()``: ``.T`` of a sparse CSR tensor is refused by torch); Auto's fallback from
    ``svds`` is ``Lanczos``, so this is its path too."""
    A, _, s, _ = make_matrix(240, 90, "gap", seed=6)
    for name, inp in _torch_inputs(A, torch.float64).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tp.UncertifiedResultWarning)
            F = tp.pinv(inp, rank=8, solver=solver)
        np.testing.assert_allclose(F.S.numpy(), s[:8], rtol=0, atol=1e-6 * s[0], err_msg=name)


@settings(max_examples=10, deadline=None)
@given(
    wide=st.booleans(),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["gap", "geometric"]),
    drop=st.sampled_from([None, 2]),
)
def test_a_reused_product_certifies_as_a_fresh_one(wide: bool, seed: int, kind: str, drop: int | None) -> None:
    """``certify(AV=A V)`` or ``certify(AtU=A^T U)`` (the solver's own product) reaches the same residual and
    the same verdict as multiplying afresh, for exact triplets and for triplets missing sigma_3 (uncertified
    either way: the reused product does not hide a missed value)."""
    shape = (60, 200) if wide else (200, 60)
    A, U, s, V = make_matrix(*shape, kind, seed=seed)
    idx = [i for i in range(6) if i != drop][:5]
    T = [torch.from_numpy(np.ascontiguousarray(X)) for X in (U[:, idx], s[idx], V[:, idx])]
    tol = tp.Tolerance(rank=5, rtol=1e-8, atol=0.0)
    op = tp.aslinearoperator(sp.csr_matrix(A))
    At = torch.from_numpy(A)
    fresh = tp.certify(op, *T, tol, rtol_res=1e-12, runs=1)
    for own in ({"AV": At @ T[2]}, {"AtU": At.T @ T[0]}):
        reused = tp.certify(op, *T, tol, rtol_res=1e-12, runs=1, **own)
        assert reused.certified == fresh.certified == (drop is None)
        assert abs(reused.residual - fresh.residual) <= 1e-14
        assert reused.matvecs == fresh.matvecs - 5


@pytest.mark.parametrize("shape", [(300, 60), (60, 300)], ids=["tall", "wide"])
def test_ill_conditioned_rayleigh_ritz_keeps_u_orthonormal(shape: tuple[int, int]) -> None:
    """sigma_1 / sigma_6 ~ 1.2e3, so the k x k Gram rotation would leave U orthonormal only to
    eps kappa^2 ~ 3e-10: ``arpack_triplets`` takes the QR of ``C V`` there, and U stays orthonormal to
    working precision, with ``C V`` still the fresh product and ``C V = U diag(S)``."""
    from truncpinv.solvers.scipy_svds import arpack_triplets

    rng = np.random.default_rng(7)
    q = min(shape)
    s = np.concatenate([[1.0], 1e-3 * 0.95 ** np.arange(q - 1)])
    U0 = np.linalg.qr(rng.standard_normal((shape[0], q)))[0]
    V0 = np.linalg.qr(rng.standard_normal((shape[1], q)))[0]
    A = (U0 * s) @ V0.T
    C = A if shape[0] >= shape[1] else A.T
    U, S, V, CV = arpack_triplets(spla.aslinearoperator(C), 6, 1e-10, 0)
    assert np.abs(U.T @ U - np.eye(6)).max() <= 1e-13
    assert np.abs(CV - C @ V).max() <= 1e-14 and np.abs(CV - U * S).max() <= 1e-14
    assert np.abs(S - s[:6]).max() <= 1e-9


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(60, 200), n=st.integers(60, 200), seed=st.integers(0, 2**16), kind=st.sampled_from(["flat", "gap"])
)
def test_arpack_ritz_pairs_satisfy_the_lanczos_relation(m: int, n: int, seed: int, kind: str) -> None:
    """``arpack_ritz`` reads ARPACK's final factorisation ``G V = V T + f e^T``: it returns all ``ncv`` Ritz
    pairs (more than the ``k`` wanted), descending, with orthonormal vectors; the wanted ones are the top
    eigenvalues of ``G = A^T A``; and each free bound ``||f|| |y_m|`` is the explicit residual
    ``||G e - theta e||`` up to round-off (the relation holds, so the harvest reads the right memory)."""
    A, _, s, _ = make_matrix(max(m, n), min(m, n), kind, seed=seed)
    q, k = min(m, n), min(m, n) // 8 + 1
    G = spla.LinearOperator((q, q), matvec=lambda x: A.T @ (A @ x), dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(q)
    theta, E, est = SS.arpack_ritz(G, k, 1e-14, v0)
    assert theta.size > k and E.shape == (q, theta.size) and np.all(np.diff(theta) <= 0)
    assert np.abs(E.T @ E - np.eye(theta.size)).max() <= 1e-10
    assert np.abs(theta[:k] - s[:k] ** 2).max() <= 1e-10 * s[0] ** 2
    explicit = np.linalg.norm(A.T @ (A @ E) - E * theta, axis=0)
    assert np.abs(explicit - est).max() <= 1e-10 * s[0] ** 2


def test_harvested_ritz_pairs_widen_the_gap_of_the_check(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On a flat sparse spectrum ARPACK's last basis resolves further pairs (``stats["triplets"]`` above the
    rank, with no guard asked for): they are deflated, and the check then needs fewer products than with
    ARPACK's ``k`` pairs alone; the answer is certified and agrees with the dense SVD."""
    A = sp.random(1500, 300, density=0.05, random_state=4, format="csr")
    s = np.linalg.svd(A.toarray(), compute_uv=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.UncertifiedResultWarning)
        F = tp.ScipySVDS().factorize(A, rank=10, rtol=1e-8)
    assert F.stats["certified"] and F.stats["triplets"] > 10
    np.testing.assert_allclose(np.asarray(F.S), s[:10], rtol=1e-12)
    real = SS.arpack_triplets

    def k_only(C: object, k: int, tol: float, seed: int, rtol_res: float = 0.0, G: object = None) -> object:
        return real(C, k, tol, seed, 0.0, G)

    monkeypatch.setattr(SS, "arpack_triplets", k_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.UncertifiedResultWarning)
        G = tp.ScipySVDS().factorize(A, rank=10, rtol=1e-8)
    assert G.stats["triplets"] == 10
    assert F.stats["matvecs"] < G.stats["matvecs"]


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_a_wrong_free_bound_does_not_deflate_a_bad_ritz_pair(shape: tuple[int, int], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The further Ritz pairs join on their free bound, but the certificate deflates only those whose explicit
    residual is small: pairs rotated by 1e-3 out of their eigenvectors and claimed exact (bound 0) join the
    Rayleigh–Ritz step, come out with residuals far above ``sqrt(tol)``, and are not deflated; the answer is
    still the dense SVD's, certified by the check alone (the spectrum has a gap after the rank)."""
    A, _, s, _ = make_matrix(*shape, "gap", seed=5)
    real = SS.arpack_ritz
    k = 5

    def lying(G: object, kk: int, tol: float, v0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w, E, est = real(G, kk, tol, v0)
        E, est = E.copy(), est.copy()
        E[:, kk:] += 1e-3 * np.random.default_rng(1).standard_normal(E[:, kk:].shape)
        est[kk:] = 0.0
        return w, E, est

    monkeypatch.setattr(SS, "arpack_ritz", lying)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.UncertifiedResultWarning)
        F = tp.ScipySVDS().factorize(sp.csr_matrix(A), rank=k, rtol=1e-10)
    assert F.stats["certified"] and F.stats["triplets"] > k
    np.testing.assert_allclose(np.asarray(F.S), s[:k], rtol=0, atol=1e-11 * s[0])


def test_without_scipys_arpack_driver_eigsh_serves_alone(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Where SciPy's ARPACK driver cannot be imported (a SciPy that moved it), ``arpack_ritz`` returns
    ``eigsh``'s ``k`` pairs alone (no further pairs to deflate) and the answer is still certified."""
    import sys

    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg._eigen.arpack.arpack", None)
    A, _, s, _ = make_matrix(240, 90, "gap", seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.UncertifiedResultWarning)
        F = tp.ScipySVDS().factorize(sp.csr_matrix(A), rank=5, rtol=1e-10)
    assert F.stats["certified"] and F.stats["triplets"] == 5
    np.testing.assert_allclose(np.asarray(F.S), s[:5], rtol=0, atol=1e-11 * s[0])


def test_sparse_table_times_a_baseline_checkout_beside_this_one(tmp_path) -> None:
    """``benchmarks/sparse_table.py --baseline DIR`` loads the truncpinv of ``DIR`` beside this one (here a copy of
    this one) and times its ``auto`` in the same rounds; ``truncpinv`` still names this checkout's package."""
    import shutil
    import sys
    from pathlib import Path

    from benchmarks.sparse_table import load_baseline, measure, random_sparse, reference

    here = Path(tp.__file__).parent
    shutil.copytree(here, tmp_path / "truncpinv", ignore=shutil.ignore_patterns("__pycache__"))
    base = load_baseline(str(tmp_path))
    assert Path(base.__file__).parent == tmp_path / "truncpinv"
    assert sys.modules["truncpinv"] is tp and base.Auto is not tp.Auto
    A = random_sparse(300, 120, 0.05)
    s_ref, _ = reference(A)
    res = measure(A, s_ref, 5, 1e-10, repeats=1, baseline=base)
    assert res["auto@base"].certified and res["auto@base"].err <= 1e-9, res["auto@base"]
    with pytest.raises(ValueError, match="`--baseline`"):
        load_baseline(str(here.parent))
    assert sys.modules["truncpinv"] is tp


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 30),
    n=st.integers(1, 30),
    density=st.floats(0.0, 1.0),
    fmt=st.sampled_from(["csr", "csc", "coo", "dense"]),
    dtype=st.sampled_from([np.float64, np.float32]),
    index=st.sampled_from([np.int32, np.int64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_vector_product_is_the_matrix_product(m, n, density, fmt, dtype, index, seed) -> None:
    """``vector_product(M)(x)`` (SciPy's kernel called directly for CSR/CSC float64) is ``M @ x`` for every
    format, dtype and index type, and for a float32 or 2-D ``x`` too (they go through ``M @ x``)."""
    rng = np.random.default_rng(seed)
    M = sp.random(m, n, density=density, random_state=seed, format="csr", dtype=dtype)
    M.indptr, M.indices = M.indptr.astype(index), M.indices.astype(index)
    M = M.toarray() if fmt == "dense" else M.asformat(fmt)
    mv = SS.vector_product(M)
    for x in (rng.standard_normal(n), rng.standard_normal(n).astype(np.float32), rng.standard_normal((n, 2))):
        want = np.asarray(M @ x)
        got = mv(x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12 if want.dtype == np.float64 else 1e-5, atol=1e-12)


@given(k=st.integers(1, 400), n=st.integers(2, 2000))
def test_arpack_ncv_is_a_valid_krylov_dimension(k: int, n: int) -> None:
    """ARPACK needs ``k < ncv <= n``; ``arpack_ncv`` gives at least SciPy's ``max(2 k + 1, 20)`` where it fits,
    and more than that only below rank 20."""
    if k >= n:
        return
    ncv = SS.arpack_ncv(k, n)
    assert k < ncv <= n
    assert ncv >= min(n, max(2 * k + 1, 20))
    if k >= 20:
        assert ncv == min(n, 2 * k + 1)


def _incidence(nodes: int, edges: int, seed: int) -> sp.csr_matrix:
    """Signed edge-node incidence matrix of a random multigraph (rows of two entries, +1 and -1)."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, nodes, edges)
    j = (i + rng.integers(1, nodes, edges)) % nodes
    vals = np.tile([1.0, -1.0], edges)
    return sp.csr_matrix((vals, (np.repeat(np.arange(edges), 2), np.stack([i, j], 1).ravel())), shape=(edges, nodes))


@settings(max_examples=20, deadline=None)
@given(nodes=st.integers(3, 60), edges=st.integers(3, 200), seed=st.integers(0, 2**31 - 1), wide=st.booleans())
def test_a_formed_gram_matrix_is_the_product_pair(nodes: int, edges: int, seed: int, wide: bool) -> None:
    """Where rows have one or two entries (an incidence matrix, or its transpose seen from the other side),
    ARPACK multiplies ``C^T C`` formed once, if it has at most ``GRAM_NNZ nnz(C)`` entries (a sparse graph;
    not a small dense one): each product equals ``C^T (C x)`` and counts two columns. With rows of many
    entries (a dense block) nothing is formed."""
    A = _incidence(nodes, edges, seed)
    C = SS._Counted(A.T.tocsr()).T if wide else SS._Counted(A)  # wide: C = (A^T)^T, a CSC view of A
    G = SS._Gram(C)
    assert (G.formed is not None) == ((A.T @ A).nnz <= SS.GRAM_NNZ * A.nnz)
    x = np.random.default_rng(seed).standard_normal(nodes)
    np.testing.assert_allclose(G.matvec(x), A.T @ (A @ x), rtol=0, atol=1e-12 * max(1.0, float(np.abs(x).max())))
    assert C.columns[0] == 2
    assert SS._Gram(SS._Counted(_incidence(60, 100, seed))).formed is not None  # a sparse graph
    assert SS._Gram(SS._Counted(sp.csr_matrix(np.ones((40, 30))))).formed is None


@pytest.mark.parametrize("wide", [False, True], ids=["tall", "wide"])
def test_svds_on_an_incidence_matrix_with_the_formed_gram_is_certified(wide: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """ARPACK on the formed ``C^T C`` (the graph Laplacian) finds the same triplets, certified: the Rayleigh-Ritz
    step and the certificate multiply ``A`` itself."""
    A = _incidence(300, 1500, 3)
    A = A.T.tocsr() if wide else A
    formed: list[bool] = []
    real = SS.formed_gram

    def spy(C: object) -> object:
        out = real(C)
        formed.append(out is not None)
        return out

    monkeypatch.setattr(SS, "formed_gram", spy)
    F = tp.ScipySVDS().factorize(A, rank=12, rtol=1e-8)
    assert formed == [True]
    assert F.stats["certified"]
    ref = np.linalg.svd(A.toarray(), compute_uv=False)[:12]
    np.testing.assert_allclose(np.asarray(F.S), ref, rtol=1e-10)


@pytest.mark.parametrize("wide", [False, True], ids=["tall", "wide"])
def test_the_check_on_the_formed_gram_matrix_catches_a_missed_value(wide: bool) -> None:
    """The missed-value check multiplies the formed ``C^T C`` (``gram``) in place of the pair ``C^T (C x)``: on
    exact triplets it certifies with the same estimate and the same count of columns as the pair, and with the
    5th triplet left out (every residual zero) it proves the miss, as the pair does."""
    A = _incidence(200, 900, 4)
    A = A.T.tocsr() if wide else A
    C = SS._Counted(A.T.tocsr() if wide else A)  # the short side's C: A^T for wide A
    G = SS._Gram(C)
    assert G.formed is not None
    U, S, Vh = np.linalg.svd(A.toarray(), full_matrices=False)
    U, S, V = (torch.from_numpy(np.ascontiguousarray(X)) for X in (U, S, Vh.T))
    tol = tp.Tolerance(rank=8, rtol=1e-8, atol=0.0)
    op = tp.aslinearoperator(A)
    for idx, ok in ((list(range(8)), True), ([0, 1, 2, 3, 5, 6, 7, 8], False)):
        i = torch.tensor(idx)
        certs = [
            tp.certify(op, U[:, i], S[i], V[:, i], tol, rtol_res=1e-12, runs=1, max_steps=400, gram=g)
            for g in (None, G.formed)
        ]
        for cert in certs:
            assert cert.certified == ok, cert
            assert cert.residual < 1e-12
        if not ok:  # the missed sigma_5 shows up in A (I - V V^T) either way
            assert all(cert.deflated_norm >= cert.threshold for cert in certs)
        assert certs[0].matvecs == certs[1].matvecs
        assert certs[0].steps == certs[1].steps
        assert abs(certs[0].deflated_norm - certs[1].deflated_norm) <= 1e-10 * float(S[0])


@pytest.mark.parametrize("shape", [(1500, 300), (300, 1500), (300, 300)], ids=["tall", "wide", "square"])
def test_svds_hands_its_formed_gram_matrix_to_the_check_in_the_same_orientation(
    shape: tuple[int, int], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """ARPACK's formed ``C^T C`` goes to the certificate where the two take the same short side (tall and
    wide); a square matrix, whose check takes ``A A^T`` while ARPACK takes ``A^T A``, multiplies the pair."""
    import truncpinv.solvers._base as base

    m, n = shape
    A = _incidence(min(m, n), max(m, n), 5)
    A = A.T.tocsr() if m < n else A
    if m == n:  # a square incidence-like matrix: one +1 and one -1 per row
        A = _incidence(n, m, 5)
    seen: list[bool] = []
    real = base.certify

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("gram") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(base, "certify", spy)
    F = tp.ScipySVDS().factorize(A, rank=6, rtol=1e-8)
    assert seen == [m != n]
    assert F.stats["certified"]
    ref = np.linalg.svd(A.toarray(), compute_uv=False)[:6]
    np.testing.assert_allclose(np.asarray(F.S), ref, rtol=1e-10)
