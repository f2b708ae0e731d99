"""Focused tests of the iterative solvers :class:`~truncpinv.LOBPCG` and :class:`~truncpinv.Lanczos`.

The shared property suite (``test_properties.py``) uses matrices so small that
LOBPCG always takes its exact full-space step; here the shapes are large enough
for both solvers to iterate (and restart), plus the shapes ``torch.lobpcg``
refuses (``rank > short side / 3``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

import truncpinv as tp

from .spectra import jac_like

ITERATIVE = [tp.LOBPCG(), tp.Lanczos(), tp.Lanczos(block_size=1)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The matrices here are tiny, so intra-op threads only add overhead: on a busy
    2-core machine, OpenMP barriers made this module 10x slower (20 s instead of 2 s)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


IDS = ["lobpcg", "lanczos", "lanczos-b1"]
_NP = {torch.float32: np.float32, torch.float64: np.float64}


def _matrix(m: int, n: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    """``U diag(s) V^T`` with random orthonormal ``U``, ``V`` (float64)."""
    rng = np.random.default_rng(seed)
    q = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, q)))
    V, _ = np.linalg.qr(rng.standard_normal((n, q)))
    return (U * s[:q]) @ V.T


def _check(F: tp.TruncatedPinv, A: np.ndarray, rank: int | None, rtol: float | None, rel: float) -> None:
    """Rank, singular values and ``x = F @ b`` against the float64 SVD of ``A``.

    ``rel`` is relative to ``sigma_max`` for the spectrum and to ``||b|| / sigma_r``
    (the size of the smallest kept component of ``x``) for the solution.
    """
    A64 = A.astype(np.float64)
    U, s, Vh = np.linalg.svd(A64, full_matrices=False)
    r = min(F.tol.rank, int((s > F.tol.cutoff(float(s[0]))).sum()))
    assert F.rank == r, f"rank {F.rank} != reference {r}"
    if r == 0:
        return
    S = F.S.double().numpy()
    np.testing.assert_allclose(S, s[:r], rtol=0, atol=rel * s[0])
    b = np.random.default_rng(1).standard_normal((A.shape[0],))
    x = F.solve(torch.from_numpy(b.astype(A.dtype))).double().numpy()
    x_ref = Vh[:r].T @ ((U[:, :r].T @ b) / s[:r])
    assert np.linalg.norm(x - x_ref) <= rel * np.linalg.norm(b) / s[r - 1] * np.sqrt(r)


@pytest.mark.parametrize("solver", ITERATIVE, ids=IDS)
@pytest.mark.parametrize("shape", [(40, 150), (150, 40), (48, 48), (1, 30), (30, 1), (6, 6)], ids=str)
def test_every_shape_and_rank_works(solver: tp.Solver, shape: tuple[int, int]) -> None:
    """Any rank from 1 to min(m, n), including rank > short side / 3 (which torch.lobpcg refuses)."""
    q = min(shape)
    A = _matrix(*shape, 0.8 ** np.arange(q) + 0.05)  # distinct, decaying, well conditioned
    for rank in sorted({1, max(1, q // 3), q // 2 + 1, q}):
        if rank > q:
            continue
        F = solver.factorize(torch.from_numpy(A), rank=rank)
        _check(F, A, rank, None, rel=1e-10)


@pytest.mark.parametrize("solver", ITERATIVE, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("tall", [False, True], ids=["wide", "tall"])
def test_accuracy_decaying_spectrum(solver: tp.Solver, dtype: torch.dtype, tall: bool) -> None:
    A = _matrix(120, 500, 0.85 ** np.arange(120)).astype(_NP[dtype])
    A = np.ascontiguousarray(A.T) if tall else A
    F = solver.factorize(torch.from_numpy(A), rank=8, rtol=1e-3)
    kappa = 0.85**-7
    _check(F, A, 8, 1e-3, rel=100 * torch.finfo(dtype).eps * kappa)
    assert F.stats.get("fallback") is None  # a real iteration, not the exact fallback
    assert F.stats["matvecs"] > 0 and F.stats["residual"] <= 1e-5


def test_lobpcg_refused_shape_128x593_rank64() -> None:
    """The case the original code's torch.lobpcg mode refused: now accurate, in float32."""
    A = jac_like(128, 593, 0.9)
    for solver in (tp.LOBPCG(), tp.Lanczos()):
        F = solver.factorize(torch.from_numpy(A), rank=64, rtol=1e-3)
        _check(F, A, 64, 1e-3, rel=2e-5)
    assert tp.LOBPCG().factorize(torch.from_numpy(A), rank=64, rtol=1e-3).stats["fallback"] == "full_space"


@pytest.mark.parametrize("solver", ITERATIVE, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_exact_rank_deficiency(solver: tp.Solver, dtype: torch.dtype) -> None:
    """Exact rank 10: the default cut-off keeps exactly the 10 non-zero singular values."""
    s = np.concatenate([2.0 ** -np.arange(10) * 3, np.zeros(40)])
    A = _matrix(50, 200, s, seed=3).astype(_NP[dtype])
    for rank in (None, 20, 6):
        F = solver.factorize(torch.from_numpy(A), rank=rank)
        _check(F, A, rank, None, rel=1000 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("solver", ITERATIVE, ids=IDS)
@pytest.mark.parametrize("shape", [(30, 70), (70, 30)], ids=str)
def test_zero_matrix(solver: tp.Solver, shape: tuple[int, int]) -> None:
    for A in (torch.zeros(shape, dtype=torch.float32), tp.TensorOperator(torch.zeros(shape, dtype=torch.float64))):
        F = solver.factorize(A, rank=5)
        assert F.rank == 0
        S = F.singular_values
        assert bool(torch.isfinite(S).all()) and bool((S == 0).all())
        x = F @ torch.ones(shape[0], dtype=F.dtype)
        assert bool((x == 0).all())


def test_flat_spectrum() -> None:
    A = jac_like(64, 400, 1.0)
    for solver in (tp.LOBPCG(), tp.Lanczos()):
        F = solver.factorize(torch.from_numpy(A), rank=10, rtol=1e-3)
        _check(F, A, 10, 1e-3, rel=1e-4)


def test_lanczos_repeated_singular_values() -> None:
    """A block of 8 resolves multiplicities up to 8 (single-vector Krylov sees one copy)."""
    A = _matrix(60, 200, 4.0 * 0.5 ** (np.arange(60) // 3))
    F = tp.Lanczos().factorize(torch.from_numpy(A), rank=6)
    _check(F, A, 6, None, rel=1e-10)


@pytest.mark.parametrize("solver", ITERATIVE, ids=IDS)
def test_operator_matches_dense(solver: tp.Solver) -> None:
    A = torch.from_numpy(_matrix(40, 300, 0.8 ** np.arange(40)))
    b = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_dense = solver.factorize(A, rank=6) @ b
    x_op = solver.factorize(tp.TensorOperator(A), rank=6) @ b
    torch.testing.assert_close(x_op, x_dense, rtol=1e-10, atol=0)


@pytest.mark.parametrize("cls", [tp.LOBPCG, tp.Lanczos], ids=["lobpcg", "lanczos"])
def test_deterministic_with_seed(cls: type[tp.Solver]) -> None:
    A = torch.from_numpy(jac_like(50, 300, 0.9))
    F1 = cls(seed=5).factorize(A, rank=6, rtol=1e-3)  # type: ignore[call-arg]
    F2 = cls(seed=5).factorize(A, rank=6, rtol=1e-3)  # type: ignore[call-arg]
    assert torch.equal(F1.U, F2.U) and torch.equal(F1.S, F2.S) and torch.equal(F1.V, F2.V)
    F3 = cls(seed=6).factorize(A, rank=6, rtol=1e-3)  # type: ignore[call-arg]
    torch.testing.assert_close(F3.S, F1.S, rtol=1e-5, atol=0)  # another start, same converged answer


def test_lanczos_returns_explicit_sorted_triplets_in_input_dtype() -> None:
    A = torch.from_numpy(jac_like(30, 200, 0.9))
    F = tp.Lanczos().factorize(A, rank=5)
    assert F._V is not None and F.U.dtype == F.V.dtype == F.S.dtype == torch.float32
    assert bool((F.S[:-1] >= F.S[1:]).all())
    assert {"matvecs", "iterations", "residual"} <= set(F.stats)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: tp.LOBPCG(max_iters=0), "`max_iters` must be a positive integer, got 0"),
        (lambda: tp.LOBPCG(tol=0.0), r"`tol` must be a float in \(0, 1\) or None, got 0.0"),
        (lambda: tp.LOBPCG(tol=1.5), r"`tol` must be a float in \(0, 1\)"),
        (lambda: tp.LOBPCG(guard=0), "`guard` must be a positive integer, got 0"),
        (lambda: tp.LOBPCG(seed=-1), "`seed` must be a non-negative integer"),
        (lambda: tp.Lanczos(krylov_dim=1), "`krylov_dim` must be an integer >= 2 or None, got 1"),
        (lambda: tp.Lanczos(block_size=0), "`block_size` must be a positive integer, got 0"),
        (lambda: tp.Lanczos(max_restarts=-1), "`max_restarts` must be a non-negative integer, got -1"),
        (lambda: tp.Lanczos(tol=True), r"`tol` must be a float in \(0, 1\) or None, got True"),
        (lambda: tp.Lanczos(seed="a"), "`seed` must be a non-negative integer"),  # type: ignore[arg-type]
    ],
)
def test_validation(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


@pytest.mark.parametrize(
    "make",
    [
        lambda: tp.LOBPCG(max_iters=np.int64(200), guard=np.int32(8), tol=np.float32(1e-6), seed=np.int64(1)),
        lambda: tp.Lanczos(krylov_dim=np.int64(40), block_size=np.int32(4), max_restarts=np.int64(50), seed=np.int8(2)),
        lambda: tp.IRLBA(work=np.int64(30), max_restarts=np.int64(100), tol=np.float64(1e-10), seed=np.uint8(3)),
        lambda: tp.ScipySVDS(check_steps=np.int64(64), guard=np.int64(3), seed=np.int64(4)),
    ],
)
def test_numpy_scalar_fields_are_accepted_as_python_numbers(make: object) -> None:
    solver = make()  # type: ignore[operator]
    ints = [f for f in ("max_iters", "guard", "krylov_dim", "block_size", "max_restarts", "work", "check_steps")
            if isinstance(getattr(solver, f, None), (int, np.integer))]  # fmt: skip
    assert ints and all(type(getattr(solver, f)) is int for f in ints)  # stored as Python ints
    A = torch.from_numpy(np.random.default_rng(0).standard_normal((120, 40)))
    F = solver.factorize(A, rank=3)
    ref = np.linalg.svd(A.numpy(), compute_uv=False)[:3]
    np.testing.assert_allclose(F.S.numpy(), ref, rtol=1e-6)
