"""The Gram route on a transformer's layers: shared positions, ``nn.MultiheadAttention``, half precision.

Each supported case is compared with the autograd Jacobian of the same
closure (:func:`tests.test_gram._agree`: ``K``, ``J^T C``, ``J X`` and ``J``
to ``1e-10`` in float64); a per-sample attribution error (a gradient summed
over the batch, a projection credited to the wrong rows of the packed
weight) changes ``K`` at order one. Unsupported uses must say so, naming the
layer and what to change.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sven
from sven.gram import GramJacobian, LayerGram, Unsupported
from sven.jacobian import autograd_jacobian
from sven.linearize.recorder import Labels, Recorder, recording

from .test_gram import _agree, _flat, _rel, _unsupported

F64 = torch.float64


# --------------------------------------------------------------------------- shared positions
def _positions(seed: int = 0, padding_idx: int | None = None) -> tuple[nn.Embedding, nn.Embedding, nn.Linear]:
    torch.manual_seed(seed)
    tok = nn.Embedding(9, 4).double()
    pos = nn.Embedding(8, 4, padding_idx=padding_idx).double()
    return tok, pos, nn.Linear(4, 3).double()


_USES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "tok + pos": lambda t, p: t + p,
    "pos + tok": lambda t, p: p + t,
    "tok + pos[None]": lambda t, p: t + p[None],
    "tok + pos.unsqueeze(0)": lambda t, p: t + p.unsqueeze(0),
    "tok * pos": lambda t, p: t * p,
    "torch.add(tok, pos)": lambda t, p: torch.add(t, p),
    "tok - pos, then += pos": lambda t, p: (t - p).__iadd__(p),  # two broadcasting uses of one output
}


@pytest.mark.parametrize("use", list(_USES))
@pytest.mark.parametrize("B", [5, 6])  # B == T: the batch and the positions have the same length
def test_shared_positions(use: str, B: int) -> None:
    tok, pos, head = _positions()
    T = 6
    idx = torch.randint(0, 9, (B, T), generator=torch.Generator().manual_seed(1))
    params = [tok.weight, pos.weight, *head.parameters()]

    def closure() -> torch.Tensor:
        return head(torch.tanh(_USES[use](tok(idx), pos(torch.arange(T))))).pow(2).sum((1, 2))

    _agree(closure, params)


@pytest.mark.parametrize("D", [1, 18])  # wide (N=5 < P) and tall (N=90 > P=76)
def test_shared_positions_with_repeats_padding_and_residual_rows(D: int) -> None:
    """Indices ``(1, T)`` with a repeated row and the padding row, rows ``(B, D)``."""
    tok, pos, head = _positions(2, padding_idx=2)
    idx = torch.randint(0, 9, (5, 6), generator=torch.Generator().manual_seed(3))
    where = torch.tensor([[0, 1, 1, 2, 5, 0]])
    params = [tok.weight, pos.weight, *head.parameters()]

    def closure() -> torch.Tensor:
        return head(torch.tanh(tok(idx) + pos(where))).flatten(1)[:, :D]

    G = _agree(closure, params, rows=_flat)
    on_padding = G.rmatmat(torch.ones(G.shape[0], dtype=F64))[tok.weight.numel() :][2 * 4 : 3 * 4]
    assert bool((on_padding == 0).all())


def test_shared_positions_used_as_they_are_and_broadcast_is_unsupported() -> None:
    tok, pos, head = _positions()
    idx = torch.randint(0, 9, (5, 6), generator=torch.Generator().manual_seed(1))
    params = [tok.weight, pos.weight, *head.parameters()]

    def mixed() -> torch.Tensor:
        p = pos(torch.arange(6))
        return head(tok(idx) + p).pow(2).sum((1, 2)) + p.sum()

    _unsupported(mixed, params, r"Embedding .*used both broadcast over the batch and as it is")

    def scaled() -> torch.Tensor:  # an operation before the broadcast: the output is used as it is
        return head(tok(idx) + 2 * pos(torch.arange(6))).pow(2).sum((1, 2))

    _unsupported(scaled, params, r"Embedding .*leading dimension is not the batch size.*tok\(idx\) \+ pos")


def test_batched_one_dimensional_indices_are_unchanged() -> None:
    """Indices ``(B,)`` used as they are (a lookup per sample) stay a batched call."""
    tok, pos, head = _positions(4)
    g = torch.Generator().manual_seed(5)
    u, v = torch.randint(0, 8, (7,), generator=g), torch.randint(0, 9, (7,), generator=g)

    def closure() -> torch.Tensor:
        return head(pos(u) * tok(v)).pow(2).sum(1)

    _agree(closure, [tok.weight, pos.weight, *head.parameters()])


# --------------------------------------------------------------------------- nn.MultiheadAttention
B, L, S, E = 4, 5, 7, 8


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -2:] = True
    return {
        "q": torch.randn(B, L, E, dtype=F64, generator=g),
        "k": torch.randn(B, S, E, dtype=F64, generator=g),
        "v": torch.randn(B, S, E, dtype=F64, generator=g),
        "k3": torch.randn(B, S, 3, dtype=F64, generator=g),
        "v5": torch.randn(B, S, 5, dtype=F64, generator=g),
        "causal": nn.Transformer.generate_square_subsequent_mask(L, dtype=F64),
        "kpm": kpm,
    }


#: (constructor options, call) pairs; the call gets the module and batch-first inputs, returns ``(B, L, E)``.
_MHA: dict[str, tuple[dict[str, Any], Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]]] = {
    "self, causal, no weights": (
        {},
        lambda m, x: m(x["q"], x["q"], x["q"], attn_mask=x["causal"], is_causal=True, need_weights=False)[0],
    ),
    "self, weights used in the loss": (
        {},
        lambda m, x: (lambda o: o[0] + (o[1] if m.batch_first else o[1].transpose(0, 1)).sum(-1, keepdim=True))(
            m(x["q"], x["q"], x["q"])
        ),
    ),
    "self, per-head weights, boolean mask": (
        {},
        lambda m, x: m(x["q"], x["q"], x["q"], attn_mask=x["causal"] < 0, average_attn_weights=False)[0],
    ),
    "cross, key is value, key padding mask": (
        {},
        lambda m, x: m(x["q"], x["k"], x["k"], key_padding_mask=x["kpm"], need_weights=False)[0],
    ),
    "cross, separate key and value": ({}, lambda m, x: m(x["q"], x["k"], x["v"])[0]),
    "kdim and vdim (separate projection weights)": (
        {"kdim": 3, "vdim": 5},
        lambda m, x: m(x["q"], x["k3"], x["v5"], need_weights=False)[0],
    ),
    "no bias, zero attention": ({"bias": False, "add_zero_attn": True}, lambda m, x: m(x["q"], x["q"], x["q"])[0]),
    "dropout": ({"dropout": 0.3}, lambda m, x: m(x["q"], x["q"], x["q"], need_weights=False)[0]),
    "dropout, weights": ({"dropout": 0.3}, lambda m, x: m(x["q"], x["q"], x["q"])[0]),
}


def _mha(name: str, batch_first: bool, seed: int = 7) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """The module and a closure returning its ``(B, L, E)`` output (inputs transposed when not batch-first)."""
    opts, call = _MHA[name]
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, 2, batch_first=batch_first, **opts).double()
    x = _inputs()
    if not batch_first:
        x = {k: (v.transpose(0, 1) if k in ("q", "k", "v", "k3", "v5") else v) for k, v in x.items()}

    def closure() -> torch.Tensor:
        torch.manual_seed(11)  # the same dropout masks in every evaluation
        out = call(m, x)
        return out if batch_first else out.transpose(0, 1)

    return m, closure


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("name", list(_MHA))
def test_multihead_attention(name: str, batch_first: bool) -> None:
    m, out = _mha(name, batch_first)
    params = list(m.parameters())
    G = _agree(lambda: torch.tanh(out()).pow(2).sum((1, 2)), params)
    assert G.shape[1] == sum(p.numel() for p in params)
    # the module's value is unchanged by the recording
    rec = Recorder({id(p): i for i, p in enumerate(params)}, Labels(params))
    with recording(rec):
        seen = out()
    assert type(seen) is torch.Tensor
    torch.testing.assert_close(seen, out(), rtol=1e-14, atol=1e-14)
    assert not rec.attention.active


@pytest.mark.parametrize("train", [True, False])
def test_multihead_attention_tall_rows_in_both_modes(train: bool) -> None:
    """Residual rows ``(B, L E)``: N = 160 > P = 96 (the input projection's weight frozen); eval mode too."""
    m, out = _mha("self, causal, no weights", True, seed=8)
    m.train(train)
    mm: Any = m
    params = [mm.in_proj_bias, mm.out_proj.weight, mm.out_proj.bias]
    G = _agree(lambda: out().flatten(1), params, rows=_flat)
    assert G.shape == (B * L * E, 96)


def test_multihead_attention_with_frozen_parts() -> None:
    """Only the output projection optimised, or only the packed input projection."""
    m, out = _mha("cross, separate key and value", True, seed=9)
    mm: Any = m
    closure = lambda: torch.tanh(out()).pow(2).sum((1, 2))  # noqa: E731
    _agree(closure, [mm.out_proj.weight, mm.out_proj.bias])
    _agree(closure, [mm.in_proj_weight])


def test_multihead_attention_unsupported_uses_say_what_to_change() -> None:
    torch.manual_seed(10)
    x = _inputs()["q"]
    m = nn.MultiheadAttention(E, 2, batch_first=True, add_bias_kv=True).double()
    params = list(m.parameters())
    closure = lambda: m(x, x, x)[0].pow(2).sum((1, 2))  # noqa: E731
    _unsupported(closure, params, r"MultiheadAttention .*add_bias_kv=True.*construct it with add_bias_kv=False")
    mm: Any = m
    _agree(closure, [p for p in params if p is not mm.bias_k and p is not mm.bias_v])
    plain = nn.MultiheadAttention(E, 2).double()
    _unsupported(
        lambda: plain(x[0], x[0], x[0])[0].pow(2).sum(1), list(plain.parameters()), r"unbatched input of shape"
    )


def test_a_forward_that_raises_leaves_no_capture_behind() -> None:
    m = nn.MultiheadAttention(E, 2, batch_first=True).double()
    params = list(m.parameters())
    rec = Recorder({id(p): i for i, p in enumerate(params)}, Labels(params))
    with pytest.raises(AssertionError), recording(rec):
        bad = torch.randn(B, L, E + 1, dtype=F64)
        m(bad, bad, bad)
    assert not rec.attention.active
    assert not torch._C._is_torch_function_mode_enabled()


# --------------------------------------------------------------------------- a small transformer, end to end
class _GPT(nn.Module):
    def __init__(self, mha: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.tok, self.pos = nn.Embedding(11, 8), nn.Embedding(6, 8)
        self.mha = mha
        self.attn: nn.Module = nn.MultiheadAttention(8, 2, batch_first=True) if mha else nn.Linear(8, 24)
        self.proj, self.ln, self.head = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 11)
        self.to(dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T))
        h = self.ln(x)
        if self.mha:
            mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
            a = self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        else:
            q, k, v = (t.unflatten(2, (2, 4)).transpose(1, 2) for t in self.attn(h).split(8, 2))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return self.head(x + self.proj(a))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, 11, (8, 7), generator=torch.Generator().manual_seed(13))
    return data[:, :-1], data[:, 1:]


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


@pytest.mark.parametrize("mha", [False, True])
def test_transformer_takes_the_gram_route_and_trains(mha: bool) -> None:
    model = _GPT(mha).double()
    x, y = _batch()
    params = list(model.parameters())
    _agree(lambda: _ce(model(x), y), params)
    opt = sven.Sven(model.parameters(), lr=0.5, jacobian="gram")
    with torch.no_grad():
        first = float(_ce(model(x), y).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        for _ in range(5):
            opt.step(lambda: _ce(model(x), y))
    assert float(_ce(model(x), y).mean()) < first


# --------------------------------------------------------------------------- half precision
def _k_of(model: nn.Module, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    J = autograd_jacobian(closure(), list(model.parameters())).double()
    return J @ J.T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype: torch.dtype) -> None:
    """K accumulated in float64 from half-precision factors; products in float32; the step keeps the dtype."""
    model = _GPT(True, dtype)
    x, y = _batch()
    closure = lambda: _ce(model(x), y)  # noqa: E731
    G = LayerGram()(closure, list(model.parameters()), rows=_flat)
    assert isinstance(G, GramJacobian), getattr(G, "reason", None)
    assert G.gram.dtype == F64 and G.dtype == torch.float32
    ref = _k_of(model, closure)  # autograd's own half-precision Jacobian
    assert _rel(G.gram, ref) <= 0.05
    # the same model in float64: the half-precision K is a rounding of it
    exact = _GPT(True).double()
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    assert _rel(G.gram, _k_of(exact, lambda: _ce(exact(x), y).double())) <= 0.05
    opt = sven.Sven(model.parameters(), lr=0.5)
    opt.step(closure)
    assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("jacobian", ["autograd", "hooks", "matfree"])
def test_half_precision_on_the_other_routes(jacobian: str) -> None:
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).bfloat16()
    x, y = torch.randn(16, 3).bfloat16(), torch.randn(16, 1).bfloat16()
    opt = sven.Sven(model.parameters(), lr=0.5, jacobian=jacobian)
    opt.step(lambda: ((model(x) - y) ** 2).sum(1))
    assert all(p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()) for p in model.parameters())


def test_autocast() -> None:
    """float32 parameters, bfloat16 layers: verified, K close to the float32 model's; a coupling is still found."""
    model = _GPT(True)
    x, y = _batch()

    def closure() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _ce(model(x), y)

    G = LayerGram()(closure, list(model.parameters()), rows=_flat)
    assert isinstance(G, GramJacobian), getattr(G, "reason", None)
    assert _rel(G.gram, _k_of(model, lambda: _ce(model(x), y))) <= 0.05

    def coupled() -> torch.Tensor:  # rows normalised over the batch
        r = closure()
        return r / r.sum()

    U = LayerGram()(coupled, list(model.parameters()), rows=_flat)
    assert isinstance(U, Unsupported) and "disagrees with autograd" in U.reason
