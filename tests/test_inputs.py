"""Bad input gets a clear error naming the argument and the rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import truncpinv as tp

from .registry import SOLVER_INFOS, SolverInfo

A_OK = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("info", SOLVER_INFOS, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_matrix(info: SolverInfo, bad: float) -> None:
    A = A_OK.clone()
    A[2, 3] = bad
    with pytest.raises(ValueError, match=r"`A` must be finite, but it contains 1 NaN or Inf entry"):
        info.solver.factorize(A)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_rhs(bad: float) -> None:
    b = torch.ones(6, dtype=torch.float64)
    b[0] = bad
    with pytest.raises(ValueError, match=r"`b` must be finite"):
        tp.lstsq(A_OK, b)


@pytest.mark.parametrize("info", SOLVER_INFOS, ids=str)
def test_check_finite_false_skips_the_scan_but_nan_never_passes_silently(info: SolverInfo) -> None:
    A = A_OK.clone()
    A[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite singular values|`A` must be finite"):
        info.solver.factorize(A, check_finite=False)


@pytest.mark.parametrize(
    ("A", "match"),
    [
        (
            torch.ones(3, 4, dtype=torch.int64),
            r"`A` must have a floating dtype \(float32 or float64\), got torch.int64",
        ),
        (torch.ones(3, 4, dtype=torch.bool), r"`A` must have a floating dtype"),
        (torch.ones(3, 4, dtype=torch.float16), r"`A` must be float32 or float64, got torch.float16"),
        (np.ones((3, 4), dtype=np.int32), r"`A` must have a floating dtype .* got numpy int32"),
        (torch.ones(3, 4, dtype=torch.complex64).numpy().astype(np.clongdouble), r"`A` must be real"),
        ([[1.0, 2.0]], r"`A` must be a torch.Tensor, a numpy.ndarray .* got list"),
    ],
)
def test_bad_dtype_or_type(A: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        tp.pinv(A)


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_must_be_positive(rank: int) -> None:
    with pytest.raises(ValueError, match=rf"`rank` must be a positive integer, got {rank}"):
        tp.pinv(A_OK, rank=rank)


@pytest.mark.parametrize("rank", [2.5, "3", True])
def test_rank_must_be_an_integer(rank: object) -> None:
    with pytest.raises(TypeError, match=r"`rank` must be a positive integer or None"):
        tp.pinv(A_OK, rank=rank)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf")])
def test_tolerances_must_be_non_negative_and_finite(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"`{name}` must be a non-negative finite float, got"):
        tp.pinv(A_OK, **{name: value})


@pytest.mark.parametrize(
    ("b", "match"),
    [
        (torch.ones(5, dtype=torch.float64), r"`b` must have 6 rows to match `A` of shape \(6, 9\), got shape \(5,\)"),
        (torch.ones(6, 2, 2, dtype=torch.float64), r"`b` must have shape \(m,\) or \(m, r\)"),
        (torch.ones(6, dtype=torch.int64), r"`b` must have a floating dtype"),
        ("abc", r"`b` must be a torch.Tensor or a numpy.ndarray .*got str"),
    ],
)
def test_bad_rhs(b: object, match: str) -> None:
    F = tp.pinv(A_OK)
    with pytest.raises((ValueError, TypeError), match=match):
        F @ b


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 0)])
def test_empty_matrix(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=r"`A` must be non-empty, got shape"):
        tp.pinv(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(4,), ()])
def test_not_a_matrix(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"`A` must be a 2-D matrix"):
        tp.pinv(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"`A` must be a 2-D matrix.*tp.pinv and tp.lstsq take batches"):
        tp.DenseSVD().factorize(torch.zeros(2, 3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_devices_must_match() -> None:
    F = tp.pinv(A_OK.cuda())
    with pytest.raises(ValueError, match=r"`b` is on cpu but the factorisation is on cuda"):
        F @ torch.ones(6, dtype=torch.float64)


def test_devices_must_match_meta() -> None:
    """Mixed devices are caught even without a GPU (the meta device stands in)."""
    F = tp.pinv(A_OK)
    with pytest.raises(ValueError, match=r"`b` is on meta but the factorisation is on cpu"):
        F @ torch.ones(6, dtype=torch.float64, device="meta")


def test_unknown_solver_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown solver 'qr'; valid names are \['auto', "):
        tp.pinv(A_OK, solver="qr")


def test_dense_only_solver_refuses_operator_with_advice() -> None:
    with pytest.raises(TypeError, match=r"solver 'svd' needs a dense matrix.*use solver="):
        tp.pinv(tp.TensorOperator(A_OK), solver="svd")


def test_gram_fields_are_validated() -> None:
    with pytest.raises(ValueError, match=r"`precision` must be 'float64', 'mixed' or 'working', got 'half'"):
        tp.GramEigen(precision="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive integer, got 0"):
        tp.GramEigen(chunk_size=0)


def test_rank_above_min_side_is_clamped_and_reported() -> None:
    F = tp.pinv(A_OK, rank=100)
    assert F.tol.rank == 6 and F.rank == 6


def test_default_rtol_warning_for_very_wide_float32() -> None:
    A = torch.zeros(2, 100_000)
    A[0, 0] = A[1, 1] = 1.0
    with pytest.warns(RuntimeWarning, match=r"the default `rtol` = max\(m, n\) \* eps = 0.0119"):
        tp.pinv(A)


@pytest.mark.parametrize("solver", ["auto", "lanczos", "randomized", "lobpcg", "svds"])
def test_an_operator_whose_products_lose_its_declared_precision_is_refused(solver: str) -> None:
    """A ``CallableOperator`` declared float64 whose products come back in float32 would cap every solver at
    float32 accuracy without a word: the first product raises, naming it and both dtypes. Products more precise
    than declared are accepted, and the operator declared float32 is solved."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 30, dtype=torch.float64, generator=g)
    lossy = tp.CallableOperator((50, 30), lambda X: (A @ X).float(), lambda Y: (A.T @ Y).float(), dtype=A.dtype)
    with pytest.raises(TypeError, match=r"`A`'s `r?matmat` returned dtype float32, but the operator declares "
                                        r"dtype float64"):  # fmt: skip
        tp.pinv(lossy, rank=5, solver=solver)
    declared32 = tp.CallableOperator((50, 30), lambda X: A @ X.double(), lambda Y: A.T @ Y.double(),
                                     dtype=torch.float32)  # fmt: skip
    F = tp.pinv(declared32, rank=5, solver=solver)
    S = torch.linalg.svdvals(A)[:5]
    assert float((F.S.double() - S).abs().max()) <= 1e-4 * float(S[0])


def test_an_operator_product_must_keep_the_block_shape() -> None:
    """A product that returns a vector for a block of several columns is named; for a one-column block the
    vector is unambiguous and taken as that column, and a vector's product returned as one column as the vector."""
    from truncpinv._validation import FiniteCheckedOperator

    A = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    flat = tp.CallableOperator((6, 4), lambda X: (A @ X)[:, 0], lambda Y: (A.T @ Y)[:, 0], dtype=A.dtype)
    with pytest.raises(ValueError, match=r"`A`'s `matmat` must map a block of shape \(4, k\) to one of shape "
                                         r"\(6, k\).*returned shape \(6,\)"):  # fmt: skip
        tp.pinv(flat, rank=2, solver="lanczos")
    x = torch.randn(4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = FiniteCheckedOperator(flat).matmat(x)
    assert y.shape == (6, 1)
    torch.testing.assert_close(y, A @ x)
    column = tp.CallableOperator((6, 4), lambda X: (A @ X).reshape(6, 1), lambda Y: A.T @ Y, dtype=A.dtype)
    v = FiniteCheckedOperator(column).matmat(x[:, 0])  # a vector's product returned as one column: the vector
    assert v.shape == (6,)
    torch.testing.assert_close(v, (A @ x)[:, 0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (-1, 3)}, r"`shape` must be a pair \(m, n\) of non-negative integers, got \(-1, 3\)"),
        ({"shape": (2.5, 3)}, r"`shape` must be a pair .* got \(2.5, 3\)"),
        ({"shape": ("a", 3)}, r"`shape` must be a pair"),
        ({"shape": (3,)}, r"`shape` must be a pair"),
        ({"shape": 3}, r"`shape` must be a pair"),
        ({"shape": (True, 3)}, r"`shape` must be a pair"),
        ({"matmat": None}, r"`matmat` must be a callable that takes a tensor block, got NoneType"),
        ({"rmatmat": 3}, r"`rmatmat` must be a callable"),
        ({"dtype": torch.int64}, r"`dtype` must be the torch dtype of the operator's products"),
        ({"dtype": np.float64}, r"`dtype` must be the torch dtype"),
    ],
)
def test_callable_operator_arguments_are_checked(kwargs: dict, match: str) -> None:
    args = {"shape": (3, 2), "matmat": lambda X: X, "rmatmat": lambda Y: Y, "dtype": torch.float64, **kwargs}
    shape = args.pop("shape")
    with pytest.raises((ValueError, TypeError), match=match):
        tp.CallableOperator(shape, args["matmat"], args["rmatmat"], dtype=args["dtype"])


def test_callable_operator_takes_numpy_integer_shapes() -> None:
    op = tp.CallableOperator((np.int64(3), np.int32(2)), lambda X: X, lambda Y: Y, dtype=torch.float64)
    assert op.shape == (3, 2) and all(type(d) is int for d in op.shape)
