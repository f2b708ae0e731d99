"""The kind and dtype of truncpinv's results follow one rule (documented in docs/solvers.md).

* Factors and dense results (``U``, ``S``, ``V``, ``Vh``, ``singular_values``,
  ``to_dense``, ``approximation``) are NumPy arrays when ``A`` came from the
  NumPy/SciPy world (an ndarray or array-like, a SciPy sparse matrix or
  ``LinearOperator``), torch tensors otherwise.
* ``F.solve(b)`` / ``tp.lstsq(A, b)`` returns the kind of ``b``, in the
  promoted dtype of ``A``'s factorisation and ``b`` (NumPy's rule).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

import truncpinv as tp

FACTORS = ("U", "S", "V", "Vh", "singular_values")


def _sparse(m: int = 60, n: int = 12) -> sp.csr_matrix:
    A = sp.random(m, n, density=0.3, random_state=1, format="csr")
    return A + sp.eye(m, n, format="csr")  # full column rank


def _kinds(F: tp.TruncatedPinv) -> set[type]:
    return {type(getattr(F, name)) for name in FACTORS} | {type(F.to_dense()), type(F.approximation())}


@pytest.mark.parametrize(
    "make",
    [
        lambda: _sparse(),
        lambda: _sparse().tocsc(),
        lambda: _sparse().tocoo(),
        lambda: sp.csr_array(_sparse()),
        lambda: spla.aslinearoperator(_sparse()),
        lambda: _sparse().toarray(),
    ],
    ids=["csr", "csc", "coo", "csr_array", "scipy-LinearOperator", "ndarray"],
)
@pytest.mark.parametrize("solver", ["auto", "lanczos", "randomized"])
def test_numpy_and_scipy_inputs_give_numpy_factors(make, solver: str) -> None:
    F = tp.pinv(make(), rank=4, solver=solver)
    assert _kinds(F) == {np.ndarray}
    assert _kinds(F.T) == {np.ndarray} and _kinds(F.truncate(rank=2)) == {np.ndarray}


@pytest.mark.parametrize("solver", ["auto", "lanczos"])
def test_torch_inputs_give_torch_factors(solver: str) -> None:
    A = torch.from_numpy(_sparse().toarray())
    for inp in (A, tp.TensorOperator(A), tp.ScipyOperator(_sparse())):
        assert _kinds(tp.pinv(inp, rank=4, solver=solver)) == {torch.Tensor}


@pytest.mark.parametrize("A_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("torch_in", [False, True])
def test_the_solution_has_numpys_promoted_dtype(A_dtype: type, b_dtype: type, torch_in: bool) -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 6)).astype(A_dtype)
    b = rng.standard_normal(40).astype(b_dtype)
    want = np.result_type(A_dtype, b_dtype)
    if torch_in:
        x = tp.lstsq(torch.from_numpy(A), torch.from_numpy(b))
        assert isinstance(x, torch.Tensor) and x.dtype == torch.from_numpy(np.zeros(1, want)).dtype
        x = x.numpy()
    else:
        x = tp.lstsq(A, b)
        assert isinstance(x, np.ndarray) and x.dtype == want
    ref = np.linalg.lstsq(A.astype(np.float64), b.astype(np.float64), rcond=None)[0]
    # A is stored in its own precision: the error is that of A's dtype, whatever b's
    eps = np.finfo(A_dtype).eps if A_dtype == np.float32 or b_dtype == np.float32 else np.finfo(np.float64).eps
    assert np.linalg.norm(x - ref) <= 1e3 * eps * np.linalg.norm(ref)


def test_float64_b_on_float32_factors_is_not_rounded_to_float32() -> None:
    rng = np.random.default_rng(3)
    A = rng.standard_normal((30, 5)).astype(np.float32)
    F = tp.pinv(A)
    b = rng.standard_normal(30)
    # the exact pseudoinverse of the float32 factors, applied in float64
    U, S, V = (np.asarray(f, dtype=np.float64) for f in (F.U, F.S, F.V))
    ref = V @ ((U.T @ b) / S)
    x = F @ b
    assert x.dtype == np.float64
    assert np.linalg.norm(x - ref) <= 1e-12 * np.linalg.norm(ref) * 1e3  # float64 arithmetic, not float32's 1e-7


def test_a_read_only_array_is_accepted_without_torchs_warning() -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((20, 4))
    b = rng.standard_normal(20)
    A.setflags(write=False)
    b.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = tp.lstsq(A, b)
    np.testing.assert_allclose(x, np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-10, atol=1e-12)
    assert not A.flags.writeable  # untouched


class _ArrayLike:
    """A minimal array-like (what pandas, xarray or a memmap wrapper present): only ``__array__``."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return self._data if dtype is None else self._data.astype(dtype)


def test_array_likes_are_accepted_as_numpy() -> None:
    rng = np.random.default_rng(2)
    A = rng.standard_normal((25, 5))
    b = rng.standard_normal(25)
    x = tp.lstsq(_ArrayLike(A), _ArrayLike(b))
    assert isinstance(x, np.ndarray)
    np.testing.assert_allclose(x, np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-10, atol=1e-12)
    assert _kinds(tp.pinv(_ArrayLike(A))) == {np.ndarray}


def test_a_pandas_dataframe_is_accepted() -> None:
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(4)
    A = rng.standard_normal((25, 3))
    b = rng.standard_normal(25)
    x = tp.lstsq(pd.DataFrame(A, columns=["a", "b", "c"]), pd.Series(b))
    np.testing.assert_allclose(x, np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-10, atol=1e-12)
    mixed = pd.DataFrame({"a": [1.0, 2.0, 3.0], "s": ["x", "y", "z"]})
    with pytest.raises(TypeError, match=r"`A`.*dtype object"):
        tp.lstsq(mixed, np.ones(3))
