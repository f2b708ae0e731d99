"""Shared cases for the solver benchmarks: the Jacobian-shaped matrices and the methods compared.

``TRUNCPINV_BENCH=full`` selects the sizes of ``docs/tasks.md``
(128 x 593, 256 x 100k, 512 x 200k); the default ``smoke`` sizes keep a
``--benchmark-disable`` run (CI) within seconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch

import truncpinv as tp
from truncpinv._optional import require

FULL = os.environ.get("TRUNCPINV_BENCH", "smoke") == "full"
SHAPES: list[tuple[int, int]] = [(128, 593), (256, 100_000), (512, 200_000)] if FULL else [(128, 593), (64, 4000)]
DECAYS = {"decay0.9": 0.9, "flat": 1.0}
RTOL = 1e-3


def jac_like(B: int, P: int, decay: float, seed: int = 0) -> torch.Tensor:
    """``A = U diag(decay^i) G / sqrt(P)``, ``U`` random orthogonal ``B x B``, ``G`` standard normal, float32."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(B, B, generator=g, dtype=torch.float64))
    G = torch.randn(B, P, generator=g)
    return ((U * decay ** torch.arange(B, dtype=torch.float64)).float() @ G) / float(np.sqrt(P))


@dataclass(frozen=True)
class Case:
    """One benchmark problem: matrix, right-hand side, truncation, and its float64 reference solution."""

    shape: tuple[int, int]
    spectrum: str
    rank: int

    @property
    def id(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}-{self.spectrum}-rank{self.rank}"


@cache
def matrix(shape: tuple[int, int], spectrum: str) -> tuple[torch.Tensor, torch.Tensor]:
    A = jac_like(*shape, DECAYS[spectrum])
    b = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    return A, b


@cache
def reference(case: Case) -> torch.Tensor:
    """The float64 SVD solution of the truncated problem (same rank and rtol)."""
    A, b = matrix(case.shape, case.spectrum)
    return tp.DenseSVD().factorize(A.double(), rank=case.rank, rtol=RTOL) @ b.double()


def rel_err(x: torch.Tensor | np.ndarray, case: Case) -> float:
    ref = reference(case)
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).double().reshape(-1)
    return float((x - ref).norm() / ref.norm())


def _trunc_solve(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, b: torch.Tensor, rank: int) -> torch.Tensor:
    keep = min(rank, int((S > RTOL * S[0]).sum()))
    return Vh[:keep].T @ ((U[:, :keep].T @ b) / S[:keep])


def _np_trunc_solve(U: np.ndarray, S: np.ndarray, Vh: np.ndarray, b: np.ndarray, rank: int) -> np.ndarray:
    keep = min(rank, int((S > RTOL * S[0]).sum()))
    return Vh[:keep].T @ ((U[:, :keep].T @ b) / S[:keep])


def ours(name: str) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    def run(A: torch.Tensor, b: torch.Tensor, rank: int) -> torch.Tensor:
        return tp.pinv(A, rank=rank, rtol=RTOL, solver=name) @ b

    return run


def torch_full_svd(A: torch.Tensor, b: torch.Tensor, rank: int) -> torch.Tensor:
    """The original Sven code's route: full ``torch.linalg.svd``, then truncate."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return _trunc_solve(U, S, Vh, b, rank)


def torch_pinv(A: torch.Tensor, b: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.linalg.pinv(A, rtol=RTOL) @ b  # no rank cap available


def numpy_pinv(A: torch.Tensor, b: torch.Tensor, rank: int) -> np.ndarray:
    return np.linalg.pinv(A.numpy(), rcond=RTOL) @ b.numpy()  # no rank cap available


def scipy_pinv(A: torch.Tensor, b: torch.Tensor, rank: int) -> np.ndarray:
    return scipy.linalg.pinv(A.numpy(), rtol=RTOL) @ b.numpy()  # no rank cap available


def sklearn_randomized(A: torch.Tensor, b: torch.Tensor, rank: int) -> np.ndarray:
    require("sklearn", "bench", "the sklearn-randomized_svd benchmark case")
    from sklearn.utils.extmath import randomized_svd

    U, S, Vh = randomized_svd(A.numpy(), rank, random_state=0)
    return _np_trunc_solve(U, S, Vh, b.numpy(), rank)


def scipy_svds(A: torch.Tensor, b: torch.Tensor, rank: int) -> np.ndarray:
    U, S, Vh = scipy.sparse.linalg.svds(A.numpy(), k=min(rank, min(A.shape) - 1), random_state=0)
    order = np.argsort(S)[::-1]
    return _np_trunc_solve(U[:, order], S[order], Vh[order], b.numpy(), rank)


def torch_svd_lowrank(A: torch.Tensor, b: torch.Tensor, rank: int) -> torch.Tensor:
    torch.manual_seed(0)  # svd_lowrank only draws from the global generator
    U, S, V = torch.svd_lowrank(A, q=rank, niter=2)
    return _trunc_solve(U, S, V.T, b, rank)


OURS = {f"truncpinv-{n}": ours(n) for n in tp.SOLVERS}
PEERS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor | np.ndarray]] = {
    "torch-svd-then-truncate": torch_full_svd,
    "torch.linalg.pinv": torch_pinv,
    "numpy.linalg.pinv": numpy_pinv,
    "scipy.linalg.pinv": scipy_pinv,
    "sklearn-randomized_svd": sklearn_randomized,
    "scipy-svds": scipy_svds,
    "torch.svd_lowrank": torch_svd_lowrank,
}
METHODS = {**OURS, **PEERS}


def cases() -> list[Case]:
    """Exact path (``rank = B/2``) and low-rank path (``rank = B/8``) for every shape and spectrum."""
    return [Case(shape, spec, r) for shape in SHAPES for spec in DECAYS for r in (shape[0] // 2, shape[0] // 8)]


# --------------------------------------------------------------------------- sparse input (issue #11)
#: ``scipy.sparse.random(m, n, density=0.01)`` (CSR, float64, uniform [0, 1) entries), rank 50, rtol 1e-8.
SPARSE_SHAPE: tuple[int, int] = (20_000, 3_000) if FULL else (2_000, 300)
SPARSE_RANK = 50 if FULL else 10
SPARSE_RTOL = 1e-8


@cache
def sparse_matrix(shape: tuple[int, int]) -> tuple[Any, np.ndarray]:
    A = scipy.sparse.random(*shape, density=0.01, random_state=0, format="csr")
    b = np.random.default_rng(1).standard_normal(shape[0])
    return A, b


@cache
def sparse_reference(shape: tuple[int, int], rank: int) -> np.ndarray:
    """The float64 solution of the truncated problem from a dense LAPACK SVD (not timed)."""
    A, b = sparse_matrix(shape)
    U, S, Vh = np.linalg.svd(A.toarray(), full_matrices=False)
    r = min(rank, int((S > SPARSE_RTOL * S[0]).sum()))
    return _np_trunc_solve(U, S, Vh, b, r)


def sparse_rel_err(x: np.ndarray, shape: tuple[int, int], rank: int) -> float:
    ref = sparse_reference(shape, rank)
    return float(np.linalg.norm(np.asarray(x).reshape(-1) - ref) / np.linalg.norm(ref))


def _sparse_ours(name: str) -> Callable[[Any, np.ndarray, int], np.ndarray]:
    def run(A: Any, b: np.ndarray, rank: int) -> np.ndarray:
        return np.asarray(tp.pinv(A, rank=rank, rtol=SPARSE_RTOL, solver=name) @ b)

    return run


def sparse_svds(A: Any, b: np.ndarray, rank: int) -> np.ndarray:
    U, S, Vh = scipy.sparse.linalg.svds(A, k=rank, random_state=0)
    order = np.argsort(S)[::-1]
    return _np_trunc_solve(U[:, order], S[order], Vh[order], b, rank)


SPARSE_METHODS: dict[str, Callable[[Any, np.ndarray, int], np.ndarray]] = {
    "truncpinv-auto": _sparse_ours("auto"),
    "truncpinv-lanczos": _sparse_ours("lanczos"),
    "scipy-svds": sparse_svds,
}
