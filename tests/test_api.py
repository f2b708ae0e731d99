"""The TruncatedPinv object and the public entry points."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import aslinearoperator

import truncpinv as tp

from .conftest import cuda_only
from .registry import SOLVER_INFOS, SolverInfo
from .spectra import make_matrix

A64, _U, S_TRUE, _V = make_matrix(12, 30, "geometric", 3)
A = torch.from_numpy(A64)


def _np_trunc_pinv(M: np.ndarray, r: int) -> np.ndarray:
    U, s, Vh = np.linalg.svd(M, full_matrices=False)
    return (Vh[:r].T / s[:r]) @ U[:, :r].T


@pytest.mark.parametrize("info", SOLVER_INFOS, ids=str)
def test_transpose_is_the_pseudoinverse_of_the_transpose(info: SolverInfo) -> None:
    F = info.solver.factorize(A, rank=5)
    c = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = _np_trunc_pinv(A64.T, 5) @ c.numpy()
    np.testing.assert_allclose((F.T @ c).numpy(), expected, atol=1e-9 * np.abs(expected).max())
    assert F.T.shape == (30, 12) and F.T.rank == 5


@pytest.mark.parametrize("info", SOLVER_INFOS, ids=str)
def test_truncate_equals_a_fresh_factorisation(info: SolverInfo) -> None:
    F = info.solver.factorize(A, rtol=1e-9)
    G = F.truncate(rtol=0.05)
    H = info.solver.factorize(A, rtol=0.05)
    assert G.rank == H.rank == int((S_TRUE > 0.05 * S_TRUE[0]).sum())
    b = torch.ones(12, dtype=torch.float64)
    torch.testing.assert_close(G @ b, H @ b, rtol=1e-9, atol=1e-12)
    assert F.truncate(rank=2).rank == 2
    assert F.rank == 12  # the original is untouched


def test_several_right_hand_sides_equal_column_by_column_solves() -> None:
    F = tp.pinv(A, rank=6)
    B = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    X = F @ B
    assert X.shape == (30, 4)
    for j in range(4):
        torch.testing.assert_close(X[:, j], F @ B[:, j])


def test_numpy_in_numpy_out() -> None:
    F = tp.pinv(A64, rank=4)
    for arr in (F.U, F.S, F.Vh, F.V, F.to_dense(), F.approximation(), F @ np.ones(12)):
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float64
    assert F.Vh.shape == (4, 30)
    x = tp.lstsq(A64.astype(np.float32), np.ones(12, dtype=np.float32), rank=4)
    assert isinstance(x, np.ndarray) and x.dtype == np.float32


def test_lstsq_equals_pinv_solve_and_records_stats() -> None:
    b = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    F = tp.pinv(A, rank=7, rtol=1e-3, solver="svd")
    torch.testing.assert_close(tp.lstsq(A, b, rank=7, rtol=1e-3, solver="svd"), F @ b)
    assert F.stats["solver"] == "svd" and F.stats["time"] >= 0
    assert F.cutoff == pytest.approx(1e-3 * S_TRUE[0], rel=1e-12)
    assert "TruncatedPinv(shape=(12, 30), rank=7" in repr(F)


@pytest.mark.parametrize("info", [i for i in SOLVER_INFOS if i.matrix_free], ids=str)
@pytest.mark.parametrize("kind", ["scipy-linop", "scipy-sparse", "callable"])
def test_matrix_free_inputs(info: SolverInfo, kind: str) -> None:
    if kind == "scipy-linop":
        op: object = aslinearoperator(A64)
    elif kind == "scipy-sparse":
        op = sp.csr_matrix(A64)
    else:
        op = tp.CallableOperator((12, 30), lambda X: A @ X, lambda Y: A.T @ Y, dtype=torch.float64)
    b = np.random.default_rng(0).standard_normal(12)
    x = info.solver.factorize(op, rank=4) @ torch.from_numpy(b)
    expected = _np_trunc_pinv(A64, 4) @ b
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-8 * np.abs(expected).max())


@pytest.mark.parametrize(
    "path",
    [
        "mkldnn.matmul",
        pytest.param("cuda.matmul", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")),
    ],
)
def test_no_tf32_forces_ieee_float32_and_restores_the_settings(path: str) -> None:
    # (without CUDA the CUDA knobs govern nothing, and no_tf32 leaves them alone)
    knob: Any = torch.backends
    for part in path.split("."):
        knob = getattr(knob, part)
    before = knob.fp32_precision
    knob.fp32_precision = "tf32"
    try:
        with tp.no_tf32():
            assert knob.fp32_precision == "ieee"
        assert knob.fp32_precision == "tf32"
        tp.pinv(A.float())
        assert knob.fp32_precision == "tf32"
    finally:
        knob.fp32_precision = before


def test_get_solver_accepts_objects_and_names() -> None:
    s = tp.GramEigen(precision="working")
    assert tp.get_solver(s) is s
    assert isinstance(tp.get_solver("gram"), tp.GramEigen)
    with pytest.raises(TypeError, match="solver options can only be given together with a solver name"):
        tp.get_solver(s, chunk_size=3)
    with pytest.raises(TypeError, match=r"`solver` must be a solver name or a truncpinv Solver object, got int"):
        tp.get_solver(3)  # type: ignore[arg-type]


def test_auto_rule() -> None:
    choose = tp.solvers.auto.choose_solver
    assert isinstance(choose((512, 200_000), 256, dense=True), tp.GramEigen)
    assert isinstance(choose((256, 100_000), 32, dense=True), tp.RandomizedSVD)
    assert isinstance(choose((300, 300), 200, dense=True), tp.DenseSVD)
    assert isinstance(choose((512, 200_000), 256, dense=True, dtype=torch.float64), tp.DenseSVD)
    assert isinstance(choose((256, 100_000), 200, dense=False), tp.Lanczos)
    assert isinstance(choose((32, 100_000), 20, dense=False), tp.GramEigen)


def test_gram_float64_accumulation_beats_float32_gram_on_ill_conditioned_float32() -> None:
    """The reason GramEigen accumulates in float64: a float32 Gram squares the condition number."""
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    Aw = ((U * 0.9 ** np.arange(64)) @ rng.standard_normal((64, 4000)) / np.sqrt(4000)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    x_ref = (
        _np_trunc_pinv(
            Aw.astype(np.float64),
            int((np.linalg.svd(Aw.astype(np.float64))[1] > 1e-3 * np.linalg.norm(Aw.astype(np.float64), 2)).sum()),
        )
        @ b
    )
    err = {}
    for prec in ("float64", "working"):
        x = tp.GramEigen(precision=prec).factorize(Aw, rtol=1e-3) @ b
        err[prec] = np.linalg.norm(x - x_ref) / np.linalg.norm(x_ref)
    assert err["float64"] < 1e-4
    assert err["working"] > 10 * err["float64"]


@cuda_only
@pytest.mark.parametrize("info", SOLVER_INFOS, ids=str)
def test_cuda_matches_cpu(info: SolverInfo) -> None:
    b = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x_cpu = info.solver.factorize(A, rank=5) @ b
    F = info.solver.factorize(A.cuda(), rank=5)
    assert F.device.type == "cuda"
    torch.testing.assert_close((F @ b.cuda()).cpu(), x_cpu, rtol=1e-7, atol=1e-9)


def test_mixed_gram_refinement_reaches_float32_svd_accuracy() -> None:
    """``precision="mixed"``: float32 Gram matrix + one subspace step through ``A`` + float64 Rayleigh–Ritz."""
    rng = np.random.default_rng(5)
    U, _ = np.linalg.qr(rng.standard_normal((400, 400)))
    Aw = ((U * 0.8 ** np.arange(400)) @ rng.standard_normal((400, 4000)) / np.sqrt(4000)).astype(np.float32)
    b = rng.standard_normal(400).astype(np.float32)
    A64 = Aw.astype(np.float64)
    s = np.linalg.svd(A64, compute_uv=False)
    x_ref = _np_trunc_pinv(A64, int((s > 1e-3 * s[0]).sum())) @ b
    for solver, M in ((tp.GramEigen(precision="mixed"), Aw), (tp.GramEigen(precision="mixed"), Aw.T.copy())):
        F = solver.factorize(M, rtol=1e-3)
        assert F.stats.get("refined") is True
        rhs = b if M.shape[0] == 400 else None
        if rhs is None:  # tall: check the transpose's solution instead
            x = F.T @ b
        else:
            x = F @ rhs
        assert np.linalg.norm(x - x_ref) / np.linalg.norm(x_ref) < 1e-4
    working = tp.GramEigen(precision="working").factorize(Aw, rtol=1e-3) @ b
    assert np.linalg.norm(working - x_ref) / np.linalg.norm(x_ref) > 1e-3  # what the refinement repairs


@pytest.mark.parametrize(
    ("decay", "expect_fallback"),
    [(0.85, False), (0.7, True), (1.0, True)],  # kappa ~ 11 | kappa ~ 210 (eps kappa^2 too big) | no gap
)
def test_auto_checks_its_sketch_and_falls_back_to_an_exact_solver(decay: float, expect_fallback: bool) -> None:
    rng = np.random.default_rng(11)
    U, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    Aw = ((U * decay ** np.arange(128)) @ rng.standard_normal((128, 3000)) / np.sqrt(3000)).astype(np.float32)
    b = rng.standard_normal(128).astype(np.float32)
    F = tp.pinv(Aw, rank=16, rtol=1e-6)
    assert ("fallback" in F.stats) == expect_fallback
    assert F.stats["chosen"] == ("gram" if expect_fallback else "randomized")
    x_ref = _np_trunc_pinv(Aw.astype(np.float64), 16) @ b
    assert np.linalg.norm(F @ b - x_ref) / np.linalg.norm(x_ref) < 1e-4
