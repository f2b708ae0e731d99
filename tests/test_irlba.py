"""Thick-restart Lanczos bidiagonalisation (:class:`truncpinv.IRLBA`) against NumPy's dense SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import truncpinv as tp
from tests.strategies import matrix_with_spectrum
from truncpinv.solvers.irlba import IRLBA

#: Spectra (descending, length q): power-law, geometric, a 1e3 gap after q // 3, flat (close distinct values),
#: and clusters of three equal values (IRLBA's single vector sees one copy: the block Lanczos takes over).
SPECTRA = {
    "power-law": lambda q: 1.0 / np.arange(1, q + 1),
    "geometric": lambda q: 0.93 ** np.arange(q),
    "gapped": lambda q: np.where(np.arange(q) < q // 3, 1.0 + 1.0 / np.arange(1, q + 1), 1e-3 / np.arange(1, q + 1)),
    "flat": lambda q: 1.0 + 0.5 * (q - np.arange(q)) / q,
    "triples": lambda q: 4.0 * 0.8 ** (np.arange(q) // 3),
}


def _sparse_operator(A: torch.Tensor) -> tp.CallableOperator:
    """``A`` held as a torch COO sparse tensor, multiplied matrix-free."""
    S, St = A.to_sparse(), A.T.to_sparse()
    return tp.CallableOperator(
        (A.shape[0], A.shape[1]), lambda X: torch.sparse.mm(S, X), lambda Y: torch.sparse.mm(St, Y), dtype=A.dtype
    )


FORMS = {
    "dense": lambda A: A,
    "sparse": lambda A: _sparse_operator(A),
    "operator": lambda A: tp.TensorOperator(A),
}


@settings(max_examples=12, deadline=None)
@given(
    tall=st.booleans(),
    kind=st.sampled_from(sorted(SPECTRA)),
    form=st.sampled_from(sorted(FORMS)),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_kept_values_match_the_dense_svd(tall: bool, kind: str, form: str, frac: float, seed: int) -> None:
    """Ranks 1 .. q - 1 (restarted below about q / 3, exact above): kept values to 1e-10 of NumPy's, certified."""
    q, L = 90, 240
    m, n = (L, q) if tall else (q, L)
    s = SPECTRA[kind](q)
    A = torch.from_numpy(matrix_with_spectrum(m, n, s, seed))
    rank = 1 + int(frac * (q - 2))
    if kind == "triples":  # a cut inside a cluster of equal values is a tie: cut between clusters
        rank = max(3, rank - rank % 3)
    F = IRLBA().factorize(FORMS[form](A), rank=rank, rtol=1e-8)
    ref = np.linalg.svd(A.numpy(), compute_uv=False)
    S = F.S.numpy()
    assert F.rank == min(rank, int((ref > 1e-8 * ref[0]).sum()))
    np.testing.assert_allclose(S, ref[: F.rank], rtol=1e-10)
    assert F.stats["certified"], F.stats
    U, V = F.U.numpy(), F.V.numpy()
    res = max(np.abs(A.numpy() @ V - U * S).max(), np.abs(A.numpy().T @ U - V * S).max())
    assert res <= 1e-10 * ref[0]


@pytest.mark.parametrize("shape", [(400, 150), (150, 400)], ids=["tall", "wide"])
def test_the_basis_stays_bounded_while_restarting(shape: tuple[int, int]) -> None:
    """A slowly converging spectrum needs several cycles; the basis length stays ``work``."""
    m, n = shape
    A = torch.from_numpy(matrix_with_spectrum(m, n, 1.0 + 0.5 * np.linspace(1, 0, 150) ** 2, 3))
    F = IRLBA(work=24).factorize(A, rank=8, rtol=1e-8)
    assert F.stats["restarts"] >= 2 and F.stats["work"] == 24 and "fallback" not in F.stats
    assert F.stats["matvecs"] > 4 * 24  # more products than two bases' worth: the restarts bound the basis
    np.testing.assert_allclose(F.S.numpy(), np.linalg.svd(A.numpy(), compute_uv=False)[:8], rtol=1e-10)


def test_a_repeated_value_is_resolved_and_certified() -> None:
    """sigma_1 = sigma_2 = sigma_3, well separated: rounding in the fully reorthogonalised short side (or else the
    block Lanczos, when the certificate proves a miss) brings out every copy."""
    s = np.concatenate([[3.0, 3.0, 3.0], 1.0 / np.arange(2, 119)])
    A = torch.from_numpy(matrix_with_spectrum(300, 120, s, 0))
    F = IRLBA().factorize(A, rank=5, rtol=1e-8)
    assert F.stats["certified"]
    np.testing.assert_allclose(F.S.numpy(), s[:5], rtol=1e-10)


def test_an_unfinished_run_is_handed_to_the_block_lanczos() -> None:
    """No restarts allowed on a slowly converging spectrum: uncertified, so the block Lanczos finishes the job."""
    A = torch.from_numpy(matrix_with_spectrum(400, 150, 1.0 + 0.5 * np.linspace(1, 0, 150) ** 2, 3))
    F = IRLBA(work=24, max_restarts=0).factorize(A, rank=8, rtol=1e-8)
    G = tp.Lanczos().factorize(A, rank=8, rtol=1e-8)
    assert F.stats["fallback"] == "lanczos" and F.stats["certified"]
    assert F.stats["matvecs"] > G.stats["matvecs"]  # the products of both runs are counted
    np.testing.assert_allclose(F.S.numpy(), G.S.numpy(), rtol=1e-10)


def test_the_certificate_still_catches_broken_irlba_results() -> None:
    """Drop the top triplet (a missed value) or perturb a vector (a residual): the certificate fails."""
    A = torch.from_numpy(matrix_with_spectrum(300, 120, 1.0 / np.arange(1, 121), 1))
    F = IRLBA().factorize(A, rank=6, rtol=1e-8)
    U, S, V = F.U, F.S, F.V
    assert U is not None and V is not None
    tol = tp.Tolerance(rank=6, rtol=1e-8, atol=0.0)
    assert tp.certify(A, U, S, V, tol, rtol_res=1e-10).certified
    tol5 = tp.Tolerance(rank=5, rtol=1e-8, atol=0.0)
    assert not tp.certify(A, U[:, 1:], S[1:], V[:, 1:], tol5, rtol_res=1e-10).certified
    V2 = V.clone()
    V2[:, 2] = (V[:, 2] + 1e-4 * V[:, 3]) / (V[:, 2] + 1e-4 * V[:, 3]).norm()
    assert not tp.certify(A, U, S, V2, tol, rtol_res=1e-10).certified


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: IRLBA(work=1), "`work` must be an integer >= 2 or None, got 1"),
        (lambda: IRLBA(max_restarts=-1), "`max_restarts` must be a non-negative integer, got -1"),
        (lambda: IRLBA(tol=2.0), r"`tol` must be a float in \(0, 1\) or None, got 2.0"),
    ],
)
def test_bad_arguments_are_named(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_stay_on_the_device() -> None:
    A = torch.from_numpy(matrix_with_spectrum(2000, 500, 1.0 / np.arange(1, 501), 0)).cuda()
    F = IRLBA().factorize(A, rank=20, rtol=1e-8)
    assert F.S.device.type == "cuda" and F.stats["certified"]
    ref = np.linalg.svd(A.cpu().numpy(), compute_uv=False)[:20]
    np.testing.assert_allclose(F.S.cpu().numpy(), ref, rtol=1e-10)
