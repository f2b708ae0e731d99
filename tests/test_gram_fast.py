"""The faster pieces of the Gram route compute what the plain formulas compute, to round-off.

* ``_gram64``: ``M M^T`` in float64 by NumPy's symmetric rank-k update on the CPU, against torch's float64
  product (the same sums in another order), also across the column chunks it converts one at a time;
* ``rows_times_samples``: a layer's Hadamard product of the rows' and the samples' Gram matrices in NumPy,
  against torch's broadcast (the same products: bit for bit);
* ``_patches``: the unfolded patches of a convolution from a strided view, against ``F.unfold`` (the same
  values, copied: bit for bit);
* ``_Outer.rows``: the formed per-row gradients without repeating a sample's input factor for each of its
  ``D`` rows (and a bias's as the sum of its output factor), against the repeated-input product;
* the whole loss-rule step: a short classifier run with each piece switched back to its plain formula
  gives the same losses to float32 round-off.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sven
from sven.linearize import gram_factors as GF
from sven.linearize import gram_products as GP

from .strategies import seeds

EPS64 = torch.finfo(torch.float64).eps


def _reference_gram(M: torch.Tensor) -> torch.Tensor:
    M64 = M.double()
    return M64 @ M64.T


@given(seed=seeds(), n=st.integers(1, 40), q=st.integers(1, 90), dtype=st.sampled_from([torch.float32, torch.float64]),
       transposed=st.booleans(), chunk=st.sampled_from([7, 2048]))  # fmt: skip
def test_gram64_is_the_float64_product(seed: int, n: int, q: int, dtype: torch.dtype, transposed: bool, chunk: int):
    """|K - M M^T| <= 4 q eps64 |m_i| |m_j| entrywise (each float64 dot product's rounding), and K is symmetric."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(q, n, generator=gen, dtype=dtype).T if transposed else torch.randn(n, q, generator=gen, dtype=dtype)
    M = M * torch.logspace(-3, 3, q, dtype=dtype)  # columns of very different scales
    old, GP.CHUNK = GP.CHUNK, chunk
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the NumPy path (dsyrk) is taken on one torch thread only
    try:
        assert GP.host_view(M) is not None
        K = GP.gram64(M)
    finally:
        GP.CHUNK = old
        torch.set_num_threads(threads)
    ref = _reference_gram(M)
    norms = M.double().norm(dim=1)
    assert K.dtype == torch.float64 and K.shape == (n, n)
    assert bool(((K - ref).abs() <= 4 * q * EPS64 * norms[:, None] * norms[None, :]).all())
    assert torch.equal(K, K.T)


def test_gram64_keeps_torch_beside_more_torch_threads():
    """With torch on two threads the product is torch's (NumPy's BLAS pool would compete with them), and equal."""
    M = torch.randn(6, 50, dtype=torch.float32) * torch.logspace(-2, 2, 50)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert GP.host_view(M) is None
        K2 = GP.gram64(M)
    finally:
        torch.set_num_threads(threads)
    ref = _reference_gram(M)
    norms = M.double().norm(dim=1)
    assert bool(((K2 - ref).abs() <= 4 * 50 * EPS64 * norms[:, None] * norms[None, :]).all())


def test_gram64_keeps_torch_for_tensors_without_storage():
    """Inside ``torch.func`` transforms (no storage: no NumPy view) the product is torch's."""
    M = torch.randn(5, 3, dtype=torch.float64)
    out = torch.func.vmap(lambda m: GP.gram64(m[None])[0, 0])(M)
    assert torch.allclose(out, (M**2).sum(1))


def _broadcast_product(Kg: torch.Tensor, Ka: torch.Tensor, D: int) -> torch.Tensor:
    B = Ka.shape[0]
    return (Kg.reshape(B, D, B, D) * Ka[:, None, :, None]).reshape(B * D, B * D)


@given(seed=seeds(), B=st.integers(1, 12), D=st.integers(1, 3), contiguous=st.booleans())
def test_rows_times_samples_is_the_broadcast_product(seed: int, B: int, D: int, contiguous: bool):
    """``K_nm = Kg_nm Ka_b(n)b(m)`` in place in NumPy (or torch's broadcast for a strided ``Kg``): bit for bit the
    broadcast product, on entries of very different scales, an infinite and a NaN one among them."""
    gen = torch.Generator().manual_seed(seed)
    N = B * D
    Kg = torch.randn(N, N, generator=gen, dtype=torch.float64) * torch.logspace(-150, 150, N, dtype=torch.float64)
    Ka = torch.randn(B, B, generator=gen, dtype=torch.float64) * 1e200
    Ka[0, -1], Kg[-1, 0] = math.inf, math.nan
    ref = _broadcast_product(Kg, Ka, D)
    given_kg = Kg.clone() if contiguous else Kg.T.clone().T  # (a transposed copy: not C-contiguous)
    got = GP.rows_times_samples(given_kg, Ka, D)
    assert got.shape == (N, N) and torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))
    if contiguous:
        assert got is given_kg  # (written in place)


@given(seed=seeds(), kh=st.integers(1, 3), kw=st.integers(1, 3), dil=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), H=st.integers(3, 9), W=st.integers(3, 9))  # fmt: skip
def test_patches_equal_unfold(
    seed: int, kh: int, kw: int, dil: tuple[int, int], stride: tuple[int, int], H: int, W: int
):
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(seed))
    if dil[0] * (kh - 1) + 1 > H or dil[1] * (kw - 1) + 1 > W:
        return
    ref = F.unfold(x, (kh, kw), dilation=dil, stride=stride)
    assert torch.equal(GF._patches(x, (kh, kw), dil, stride), ref)


def _repeated_rows(piece: GF._Outer, D: int) -> torch.Tensor:
    """The per-row gradients with ``a`` repeated for each of a sample's ``D`` rows (the plain product)."""
    a = piece.a.repeat_interleave(D, 0)
    return torch.bmm(piece.g.transpose(1, 2), a.to(piece.g.dtype)).reshape(piece.g.shape[0], -1)


@given(seed=seeds(), B=st.integers(1, 5), D=st.integers(1, 3), T=st.integers(1, 6), di=st.integers(1, 5),
       do=st.integers(1, 4))  # fmt: skip
def test_outer_rows_without_repeating_the_input(seed: int, B: int, D: int, T: int, di: int, do: int):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, di, generator=gen, dtype=torch.float64)
    g = torch.randn(B * D, T, do, generator=gen, dtype=torch.float64)
    piece = GF._Outer(a, g)
    assert torch.allclose(piece.rows(D), _repeated_rows(piece, D), rtol=1e-12, atol=1e-12 * T)
    ones = GF._Outer(torch.ones(B, T, 1, dtype=torch.float64), g, ones=True)
    assert torch.allclose(ones.rows(D), _repeated_rows(ones, D), rtol=1e-12, atol=1e-12 * T)


def _plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every piece back to its plain formula: torch's float64 product, ``F.unfold``, repeated inputs."""
    monkeypatch.setattr(GP, "host_view", lambda M: None)
    monkeypatch.setattr(GF, "rows_times_samples", _broadcast_product)
    monkeypatch.setattr(GF, "_patches", lambda xp, ks, dil, st: F.unfold(xp, ks, dilation=dil, stride=st))
    monkeypatch.setattr(GF._Outer, "rows", _repeated_rows)


def _classifier_losses() -> list[float]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(3 * 4 * 4, 16), nn.GELU(), nn.Linear(16, 4))  # fmt: skip
    x, y = torch.randn(96, 1, 8, 8), torch.randint(0, 4, (96,))
    opt = sven.Sven(net.parameters())
    losses = []
    for i in range(18):
        xb, yb = x[32 * (i % 3) : 32 * (i % 3 + 1)], y[32 * (i % 3) : 32 * (i % 3 + 1)]
        out = opt.step(lambda: F.cross_entropy(net(xb), yb, reduction="none"))  # noqa: B023
        losses.append(float(out.double().mean()))
    assert opt.config.ggn  # the loss rule's step
    return losses


def test_loss_rule_run_is_the_same_with_the_plain_formulas(monkeypatch: pytest.MonkeyPatch):
    """A CNN classifier under the loss rule: the same losses, step by step, to float32 round-off (1e-5).

    The rule's low starting floor (``damping_start=0.03``) lets 18 steps on 96 random labels amplify round-off
    about tenfold every six steps, so the first 12 are compared at 1e-5 and the last six at 1e-4."""
    fast = _classifier_losses()
    _plain(monkeypatch)
    plain = _classifier_losses()
    assert fast[:12] == pytest.approx(plain[:12], rel=1e-5)
    assert fast == pytest.approx(plain, rel=1e-4)
    assert fast[-1] < fast[0]


@given(seed=seeds(), B=st.integers(1, 6), D=st.integers(1, 3), r=st.sampled_from([1, 3]))
def test_jt_c_of_every_block_kind_is_the_jacobians(seed: int, B: int, D: int, r: int):
    """``J^T C`` from the factors (one right-hand side: each sample's rows combined by a product and a sum; the
    parts written into place) against the autograd Jacobian, for Linear, LayerNorm and Embedding blocks."""
    from sven.linearize import LayerGram
    from sven.linearize.dense import autograd_jacobian

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    emb, net = nn.Embedding(5, 3).double(), nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(),
                                                          nn.Linear(4, D)).double()  # fmt: skip
    idx = torch.randint(0, 5, (B,), generator=gen)
    params = [*emb.parameters(), *net.parameters()]
    G = LayerGram()(lambda: net(emb(idx)), params, rows=lambda t: t.reshape(-1))
    assert isinstance(G, GF.GramJacobian)
    out = net(emb(idx)).reshape(-1)
    J = autograd_jacobian(out, params)
    C = torch.randn(B * D, r, generator=gen, dtype=torch.float64)
    assert torch.allclose(G.rmatmat(C), J.T @ C, rtol=1e-12, atol=1e-12)
    assert torch.allclose(G.rmatmat(C[:, 0]), J.T @ C[:, 0], rtol=1e-12, atol=1e-12)


@given(seed=seeds(), B=st.integers(1, 6), D=st.integers(1, 3), T=st.integers(1, 3), widths=st.lists(st.integers(1, 5),
       min_size=1, max_size=3), do=st.integers(1, 4))  # fmt: skip
def test_one_column_written_in_place_is_the_gemm_split(seed: int, B: int, D: int, T: int, widths: list[int], do: int):
    """``J^T c`` of a factor block written into each parameter's rows (one product each) against the block's one
    GEMM split into its parameters' parts, to float32 round-off; a block of formed rows declines (``False``)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, sum(widths), generator=gen)
    g = torch.randn(B * D, T, do, generator=gen)
    blk = GF._OuterBlock(list(range(len(widths))), widths, a, g, D)
    C = torch.randn(B * D, 1, generator=gen)
    dest = [torch.full((do * w, 1), math.nan) for w in widths]
    if blk.m is not None:  # (forming the rows was the cheaper way to K)
        assert not blk.rmatvec_into(C, dest)
        return
    assert blk.rmatvec_into(C, dest)
    for i, part in blk.rmatmat(C).items():
        ref = part.reshape(-1, 1)
        tol = 1e-5 * float(ref.abs().max()) + 1e-30
        assert dest[i].shape == ref.shape and float((dest[i] - ref).abs().max()) <= tol
