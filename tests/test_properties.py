"""Property-based tests: every solver x shape x dtype against the mathematical facts.

For ``x = F @ b`` and the truncation ``A_r`` the cut-off selects, the shared
checker verifies the normal equations, minimum norm, the Moore–Penrose
conditions, Eckart–Young and the SVD itself (see ``checker.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import truncpinv as tp

from .checker import Reference, check_factorization
from .conftest import DEVICES
from .registry import DTYPES, SHAPES, SOLVER_INFOS, SolverInfo
from .spectra import KINDS, make_matrix, spectrum

_NP = {torch.float32: np.float32, torch.float64: np.float64}


def _problem(
    data: st.DataObject, shape: tuple[int, int], dtype: torch.dtype
) -> tuple[np.ndarray, int | None, float | None, str]:
    """Draw a matrix (cast to ``dtype``), and a truncation at a spectral gap."""
    m, n = shape
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    A64, _, s, _ = make_matrix(m, n, kind, seed)
    A = A64.astype(_NP[dtype])
    q = min(m, n)
    _, safe = spectrum(kind, q)
    how = data.draw(st.sampled_from(["rank", "rtol", "none"]), label="truncate by")
    if how == "rank" and safe:
        return A, data.draw(st.sampled_from(safe), label="rank"), None, kind
    if how == "rtol" or (how == "rank" and not safe):
        # a relative cut-off in the middle (log scale) of a gap of the spectrum, kept part cond <= 1e3
        ok = [j for j in range(q - 1) if 0 < s[j + 1] < 0.75 * s[j] and s[j] >= 1e-3 * s[0]]
        if ok:
            j = data.draw(st.sampled_from(ok), label="cut index")
            return A, None, float(np.sqrt(s[j] * s[j + 1]) / s[0]), kind
    return A, None, None, kind


def _kappa(ref: Reference, r: int) -> float:
    return float(ref.s[0] / ref.s[r - 1]) if r > 0 else 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("info", SOLVER_INFOS, ids=str)
@given(data=st.data())
def test_minimum_norm_least_squares(
    info: SolverInfo, shape: tuple[int, int], dtype: torch.dtype, device: str, data: st.DataObject
) -> None:
    A, rank, rtol, kind = _problem(data, shape, dtype)
    ref = Reference.of(A)
    F = info.solver.factorize(torch.from_numpy(A).to(device), rank=rank, rtol=rtol)
    assert F.device.type == device
    b = np.random.default_rng(1).standard_normal(shape[0])
    check_factorization(
        F,
        ref,
        rel_tol=info.rel_tol(dtype, _kappa(ref, F.rank)),
        b=b,
        check_vectors=kind in ("geometric", "gap"),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", SOLVER_INFOS, ids=str)
@given(seed=st.integers(0, 2**31 - 1), wide=st.booleans(), k=st.integers(1, 3))
def test_agrees_with_numpy_lstsq_and_pinv(info: SolverInfo, dtype: torch.dtype, seed: int, wide: bool, k: int) -> None:
    """With nothing truncated, the solution is numpy's (same cut-off passed as ``rcond``)."""
    m, n = (12, 30) if wide else (30, 12)
    A64, *_ = make_matrix(m, n, "flat", seed)
    A = A64.astype(_NP[dtype])
    B = np.random.default_rng(seed).standard_normal((m, k)).astype(_NP[dtype])
    F = info.solver.factorize(A)
    assert F.rank == min(m, n)
    rcond = tp.default_rtol((m, n), dtype)
    x_np = np.linalg.lstsq(A.astype(np.float64), B.astype(np.float64), rcond=rcond)[0]
    x = F.solve(B)
    assert isinstance(x, np.ndarray) and x.dtype == _NP[dtype]
    tol = info.rel_tol(dtype, 1.5)
    np.testing.assert_allclose(x, x_np, rtol=0, atol=tol * np.abs(x_np).max())
    np.testing.assert_allclose(F.to_dense(), np.linalg.pinv(A.astype(np.float64), rcond=rcond), rtol=0, atol=tol)


@pytest.mark.parametrize("info", SOLVER_INFOS, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_zero_matrix_gives_rank_zero_and_zero_solution(info: SolverInfo, shape: tuple[int, int]) -> None:
    A = torch.zeros(shape, dtype=torch.float64)
    F = info.solver.factorize(A, rank=3)
    assert F.rank == 0
    x = F @ torch.ones(shape[0], dtype=torch.float64)
    assert x.shape == (shape[1],) and bool((x == 0).all())
    assert F.to_dense().abs().max() == 0


@pytest.mark.parametrize("info", [i for i in SOLVER_INFOS if i.matrix_free], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_operator_input_matches_dense(info: SolverInfo, shape: tuple[int, int]) -> None:
    A64, *_ = make_matrix(*shape, "geometric", 7)
    A = torch.from_numpy(A64)
    b = torch.randn(shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_dense = info.solver.factorize(A, rank=5) @ b
    x_op = info.solver.factorize(tp.TensorOperator(A), rank=5) @ b
    torch.testing.assert_close(x_op, x_dense, rtol=1e-8, atol=1e-10)
