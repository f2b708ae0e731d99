"""``truncpinv.pinv_from_gram``: the shared property checker, and its input validation.

The adapter builds ``K = A A^T`` in float64 from the test matrix (as a caller
with per-layer factors would) and hands ``A`` over as an operator, so the
same checker as every solver's verifies the result.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import truncpinv as tp

from .checker import Reference, check_factorization
from .conftest import DEVICES
from .registry import DTYPES, SHAPES, SolverInfo
from .spectra import make_matrix
from .test_properties import _kappa, _problem

#: Accuracy demanded: that of the "gram" solver (eps * kappa + eps64 * kappa^2).
INFO = SolverInfo("from_gram", tp.GramEigen(), True, True, False, 50.0, True)


def _from_gram(A: torch.Tensor, **kw: Any) -> tp.TruncatedPinv:
    A64 = A.double()
    return tp.pinv_from_gram(A64 @ A64.T, tp.TensorOperator(A), **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@given(data=st.data())
def test_minimum_norm_least_squares(
    shape: tuple[int, int], dtype: torch.dtype, device: str, data: st.DataObject
) -> None:
    A, rank, rtol, kind = _problem(data, shape, dtype)
    ref = Reference.of(A)
    F = _from_gram(torch.from_numpy(A).to(device), rank=rank, rtol=rtol)
    assert F.device.type == device and F.dtype == dtype
    assert F.stats["solver"] == "from_gram"
    b = np.random.default_rng(1).standard_normal(shape[0])
    check_factorization(
        F,
        ref,
        rel_tol=INFO.rel_tol(dtype, _kappa(ref, F.rank)),
        b=b,
        check_vectors=kind in ("geometric", "gap"),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_agrees_with_gram_eigen_and_the_default_rtol(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Same truncation semantics as the solvers: default rtol from max(m, n) and the dtype, rank, atol."""
    A = torch.from_numpy(make_matrix(*shape, "geometric", 3)[0]).to(dtype)
    b = torch.randn(shape[0], dtype=dtype, generator=torch.Generator().manual_seed(0))
    for kw in ({}, {"rank": 4}, {"rtol": 1e-2}, {"atol": 0.1}):
        F = _from_gram(A, **kw)
        G = tp.GramEigen().factorize(A, **kw)
        assert F.tol == G.tol
        assert F.rank == G.rank and F.cutoff == pytest.approx(G.cutoff, rel=1e-5)
        if dtype == torch.float64:  # (float32 solutions differ by eps32 * kappa^2 here)
            torch.testing.assert_close(F @ b, G @ b, rtol=1e-9, atol=1e-10)


def test_exact_rank_deficiency_is_kept_by_the_noise_floor() -> None:
    A64, *_ = make_matrix(10, 30, "deficient", 0)
    F = _from_gram(torch.from_numpy(A64))
    assert F.rank == 5
    assert int((F.singular_values > 0).sum()) == 5


def test_inputs_kinds_and_rmatmat_only_operator() -> None:
    A = torch.from_numpy(make_matrix(6, 15, "flat", 1)[0])
    K = (A @ A.T).numpy()
    b = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = tp.pinv(A) @ b

    class RmatmatOnly:  # the protocol's rmatmat is all that is used
        shape = (6, 15)
        dtype = torch.float64
        device = torch.device("cpu")

        def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
            return A.T @ Y

    for K_, op in ((K, A), (K, A.numpy()), (torch.from_numpy(K).float(), RmatmatOnly())):
        F = tp.pinv_from_gram(K_, op)
        x = F @ b if not isinstance(op, np.ndarray) else torch.from_numpy(F @ b.numpy())
        torch.testing.assert_close(x, ref, rtol=1e-4 if K_.dtype != np.float64 else 1e-9, atol=1e-6)
    F = tp.pinv_from_gram(torch.from_numpy(K), RmatmatOnly())
    assert F.T.shape == (15, 6)  # forms V through rmatmat
    torch.testing.assert_close(F.approximation(), A, rtol=0, atol=1e-10)


def test_zero_gram_gives_rank_zero() -> None:
    A = torch.zeros(4, 9, dtype=torch.float64)
    F = tp.pinv_from_gram(torch.zeros(4, 4), A)
    assert F.rank == 0
    assert bool((F @ torch.ones(4, dtype=torch.float64) == 0).all())


_A = torch.ones(3, 5, dtype=torch.float64)
_K = _A @ _A.T


@pytest.mark.parametrize(
    ("K", "op", "kw", "error", "match"),
    [
        (torch.ones(3, 4), _A, {}, ValueError, r"`K` must be a square matrix, got shape \(3, 4\)"),
        (torch.ones(4, 4), _A, {}, ValueError, r"`K` must be 3x3 to match `operator` with 3 rows"),
        (torch.ones(3), _A, {}, ValueError, r"`K` must be a square matrix"),
        (torch.tensor([[1.0, 2.0, 0], [0, 1, 0], [0, 0, 1]]), _A, {}, ValueError, r"`K` must be symmetric"),
        (-torch.eye(3), _A, {}, ValueError, r"`K` must be positive semi-definite"),
        (torch.full((3, 3), float("nan")), _A, {}, ValueError, r"`K` must be finite"),
        (torch.ones(3, 3, dtype=torch.int64), _A, {}, TypeError, r"`K` must have a real floating dtype"),
        ([[1.0]], _A, {}, TypeError, r"`K` must be a torch.Tensor or numpy.ndarray, got list"),
        (_K, torch.ones(3, 5, 2), {}, ValueError, r"`operator` must be a 2-D matrix"),
        (_K, torch.ones(3, 5, dtype=torch.float16), {}, TypeError, r"`operator` must have dtype float32 or float64"),
        (_K, "A", {}, TypeError, r"`operator` must be a torch.Tensor.*got str"),
        (_K, _A, {"rank": 0}, ValueError, r"`rank` must be a positive integer"),
        (_K, _A, {"rtol": -1.0}, ValueError, r"`rtol` must be a non-negative finite float"),
    ],
)
def test_bad_input_is_rejected(K: Any, op: Any, kw: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        tp.pinv_from_gram(K, op, **kw)


def test_nan_passes_when_check_finite_is_off_but_not_silently() -> None:
    K = torch.full((3, 3), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="`K`"):
        tp.pinv_from_gram(K, _A, check_finite=False)


@given(seed=st.integers(0, 2**16), q=st.integers(1, 20), side=st.integers(20, 400))
def test_singular_values_from_eigenvalues_in_numpy_match_torch(seed: int, q: int, side: int) -> None:
    from truncpinv._gram import _singular_values

    gen = torch.Generator().manual_seed(seed)
    # descending eigenvalues of a PSD K with round-off: some tiny, some slightly negative
    lam = torch.cat([torch.rand(q, generator=gen, dtype=torch.float64).sort(descending=True).values,
                     torch.tensor([1e-20, 0.0, -1e-18], dtype=torch.float64)])  # fmt: skip
    eps = torch.finfo(torch.float64).eps
    floor = math.sqrt(eps * side) * math.sqrt(float(lam[0]))
    expected = torch.tensor(
        [math.sqrt(max(v, 0.0)) if math.sqrt(max(v, 0.0)) > floor else 0.0 for v in lam[: q + 2].tolist()],
        dtype=torch.float64,
    )
    S = _singular_values(lam, q + 2, eps_k=eps, side=side, exact=True)  # float64 on the CPU: NumPy, correctly rounded
    assert torch.equal(S, expected)
    S = _singular_values(lam.float(), q + 2, eps_k=eps, side=side, exact=True)  # otherwise torch's path
    assert torch.allclose(S.double(), expected, rtol=4 * float(torch.finfo(torch.float32).eps), atol=0.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        _singular_values(torch.tensor([1.0, -1e-3], dtype=torch.float64), 2, eps_k=eps, side=side, exact=True)
    with pytest.raises(ValueError, match="not finite"):
        _singular_values(torch.tensor([float("nan"), 0.0], dtype=torch.float64), 2, eps_k=eps, side=side, exact=True)
