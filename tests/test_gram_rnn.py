"""Recurrent layers on the Gram route (``sven/linearize/gram_rnn.py``): ``K``, ``J^T C``, ``J X`` agree with autograd.

The reference is :func:`sven.jacobian.autograd_jacobian` on the same closure
run *without* the recorder, so through PyTorch's own fused ``RNN``/``GRU``/``LSTM``
operator; a wrong gate order, a missing carry or a wrong direction makes the
agreement fail. Every refusal must name the layer and say how to make it
supported, and hand back rows whose graph gives the exact Jacobian.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import sven
from sven.gram import GramJacobian, LayerGram, Unsupported, supported_modules
from sven.jacobian import autograd_jacobian
from sven.linearize import gram_rnn

F64 = torch.float64
RTOL = 1e-10

CELLS: dict[str, Callable[..., nn.Module]] = {
    "gru": nn.GRU,
    "lstm": nn.LSTM,
    "rnn_tanh": nn.RNN,
    "rnn_relu": lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _agree(
    closure: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    rows: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.reshape(-1),
) -> GramJacobian:
    """Assert that the Gram route matches the autograd Jacobian of the fused operator."""
    G = LayerGram()(closure, params, rows=rows)
    assert isinstance(G, GramJacobian), G.reason  # type: ignore[union-attr]
    J = autograd_jacobian(rows(closure()), params)
    assert G.shape == tuple(J.shape)
    torch.testing.assert_close(G.output, rows(closure()).detach(), rtol=0, atol=0)
    assert _rel(G.gram, J.double() @ J.double().T) <= RTOL
    gen = torch.Generator().manual_seed(1)
    C = torch.randn(J.shape[0], 3, dtype=J.dtype, generator=gen)
    X = torch.randn(J.shape[1], 2, dtype=J.dtype, generator=gen)
    assert _rel(G.rmatmat(C), J.T @ C) <= RTOL
    assert _rel(G.matmat(X), J @ X) <= RTOL
    return G


class Seq(nn.Module):
    """A recurrent layer and a linear head on its outputs (``use="seq"``), its last state (``"last"``) or both."""

    def __init__(self, cell: str, d: int, h: int, *, layers: int = 1, batch_first: bool = True, **kw: Any) -> None:
        super().__init__()
        self.rnn = CELLS[cell](d, h, num_layers=layers, batch_first=batch_first, **kw)
        dirs = 2 if kw.get("bidirectional") else 1
        self.head = nn.Linear(dirs * h, 2)
        self.head_last = nn.Linear(h, 2)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, hx: Any = None, use: str = "seq") -> torch.Tensor:
        out, states = self.rnn(x, hx)
        hn = states[0] if isinstance(states, tuple) else states
        seq = out if self.batch_first else out.transpose(0, 1)
        rows = torch.zeros(seq.shape[0], 2, dtype=seq.dtype)
        if use in ("seq", "both"):
            rows = rows + self.head(seq).sum(1)
        if use in ("last", "both"):
            rows = rows + self.head_last(hn[-1])
        if isinstance(states, tuple) and use == "both":
            rows = rows + states[1][-1][:, :2]  # the cell state reaches the rows too
        return rows


def _data(B: int, T: int, d: int, *, batch_first: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, dtype=F64, generator=g)
    return (x if batch_first else x.transpose(0, 1).contiguous()), torch.randn(B, 2, dtype=F64, generator=g)


def _h0(cell: str, layers: int, B: int, h: int, dirs: int = 1, seed: int = 5) -> Any:
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(layers * dirs, B, h, dtype=F64, generator=g)
    return (h0, 0.5 * torch.randn(h0.shape, dtype=F64, generator=g)) if cell == "lstm" else h0


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize(
    ("cell", "batch_first", "layers", "h0_use"),
    list(itertools.product(CELLS, [True, False], [1, 2], [(False, "seq"), (True, "last"), (True, "both")])),
)
def test_agrees_with_autograd(cell: str, batch_first: bool, layers: int, h0_use: tuple[bool, str]) -> None:
    with_h0, use = h0_use
    torch.manual_seed(0)
    B, T, d, h = 5, 4, 3, 3
    model = Seq(cell, d, h, layers=layers, batch_first=batch_first).double()
    x, y = _data(B, T, d, batch_first=batch_first)
    hx = _h0(cell, layers, B, h) if with_h0 else None
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    assert B < P
    _agree(lambda: ((model(x, hx, use) - y) ** 2).sum(1), params)


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn_tanh"])
def test_more_rows_than_parameters(cell: str) -> None:
    torch.manual_seed(1)
    B, T = 60, 6
    model = Seq(cell, 1, 2).double()
    x, y = _data(B, T, 1, batch_first=True, seed=1)
    params = list(model.rnn.parameters()) + list(model.head.parameters())
    assert B > sum(p.numel() for p in params)
    _agree(lambda: ((model(x) - y) ** 2).sum(1), params)


@pytest.mark.parametrize("cell", list(CELLS))
def test_bidirectional_stacked(cell: str) -> None:
    torch.manual_seed(2)
    B, T, d, h = 4, 5, 2, 3
    model = Seq(cell, d, h, layers=2, batch_first=False, bidirectional=True).double()
    x, y = _data(B, T, d, batch_first=False, seed=2)
    hx = _h0(cell, 2, B, h, dirs=2)
    _agree(lambda: ((model(x, hx, "both") - y) ** 2).sum(1), list(model.parameters()))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gradients_reach_layers_before_the_input_and_the_initial_state(cell: str) -> None:
    """An encoder makes h0 (and c0) from a context, an embedding-like Linear makes the input: both are optimised."""
    torch.manual_seed(3)
    B, T, h = 6, 5, 4
    embed, enc = nn.Linear(2, 3).double(), nn.Linear(3, h).double()
    model = Seq(cell, 3, h).double()
    x, y = _data(B, T, 2, batch_first=True, seed=3)
    ctx = torch.randn(B, 3, dtype=F64)

    def closure() -> torch.Tensor:
        h0 = torch.tanh(enc(ctx))[None]
        hx = (h0, 0.5 * h0) if cell == "lstm" else h0
        return ((model(embed(x), hx, "both") - y) ** 2).sum(1)

    _agree(closure, list(embed.parameters()) + list(enc.parameters()) + list(model.parameters()))


def test_residual_rows_and_keyword_arguments() -> None:
    """``D > 1`` rows per sample (one backward each), the states passed as ``hx=`` and the input as ``input=``."""
    torch.manual_seed(4)
    B, T, d, h = 5, 6, 2, 3
    rnn, head = nn.GRU(d, h, batch_first=True).double(), nn.Linear(h, 1).double()
    x, _ = _data(B, T, d, batch_first=True, seed=4)
    y = torch.randn(B, T, dtype=F64)
    h0 = torch.randn(1, B, h, dtype=F64)
    params = list(rnn.parameters()) + list(head.parameters())
    G = _agree(lambda: head(rnn(x, hx=h0)[0]).squeeze(-1) - y, params)
    assert G.rows_per_sample == T
    _agree(lambda: (head(rnn(input=x)[0]).squeeze(-1) - y).sum(1), params)


def test_a_layer_called_twice_and_step_by_step() -> None:
    """Shared weights: two sequences through one GRU, and an LSTM unrolled one step per call with its states chained."""
    torch.manual_seed(11)
    B, T, d, h = 5, 4, 2, 3
    gru, lstm, head = nn.GRU(d, h, batch_first=True), nn.LSTM(d, h), nn.Linear(h, 1)
    gru, lstm, head = gru.double(), lstm.double(), head.double()
    x1, _ = _data(B, T, d, batch_first=True, seed=11)
    x2, _ = _data(B, T + 2, d, batch_first=True, seed=12)

    def closure() -> torch.Tensor:
        a, b = gru(x1)[0], gru(x2)[0]
        state = None
        for t in range(3):  # one step per call: T = 1, the states of the previous call as hx
            out, state = lstm(x1[:, t][None], state)
        return head(a).sum((1, 2)) * head(b[:, -1]).squeeze(1) + head(out[0]).squeeze(1) ** 2

    _agree(closure, [*gru.parameters(), *lstm.parameters(), *head.parameters()])


def test_the_auto_route_warns_with_the_fix_and_falls_back() -> None:
    torch.manual_seed(12)
    rnn, head = nn.GRU(1, 8, num_layers=2, dropout=0.2, batch_first=True), nn.Linear(8, 1)
    x, y = torch.randn(16, 6, 1), torch.randn(16, 6)
    params = [*rnn.parameters(), *head.parameters()]
    opt = sven.Sven(params, rank=8, adaptive_damping=False)
    with pytest.warns(RuntimeWarning, match=r"GRU \(parameters .*dropout=0.2.*nn\.Dropout between them"):
        opt.step(lambda: ((head(rnn(x)[0]).squeeze(-1) - y) ** 2).sum(1))


def test_only_some_parameters_optimised() -> None:
    torch.manual_seed(5)
    model = Seq("lstm", 2, 3, layers=2).double()
    x, y = _data(5, 4, 2, batch_first=True, seed=5)
    params = [model.rnn.weight_hh_l0, model.rnn.bias_ih_l1, model.head.weight]
    _agree(lambda: ((model(x) - y) ** 2).sum(1), params)


def test_supported_modules_lists_the_recurrent_layers() -> None:
    assert {nn.RNN, nn.GRU, nn.LSTM} <= set(supported_modules())


def test_grad_mode_is_restored_when_the_forward_raises() -> None:
    """The fused forward runs without a graph; an error inside it must not leave autograd off."""
    rnn = nn.GRU(3, 4, batch_first=True).double()
    bad = torch.randn(2, 5, 7, dtype=F64)  # 7 features, the layer expects 3
    with pytest.raises(RuntimeError):
        LayerGram()(lambda: rnn(bad)[0].sum((1, 2)), list(rnn.parameters()), rows=lambda t: t)
    assert torch.is_grad_enabled()


# --------------------------------------------------------------------------- refusals
def _unsupported(closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], match: str) -> str:
    U = LayerGram()(closure, params, rows=lambda t: t)
    assert isinstance(U, Unsupported), "expected the Gram route to refuse"
    assert re.search(match, U.reason), U.reason
    # the rows keep the exact graph: the fallback Jacobian is autograd's
    J = autograd_jacobian(closure(), params)
    assert _rel(autograd_jacobian(U.output, params), J) <= RTOL
    return U.reason


class _Scale(nn.Module):
    """A layer the Gram route does not support (its own parameter)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


@pytest.mark.parametrize("cell", list(CELLS))
def test_an_unsupported_layer_after_a_substituted_one_falls_back_exactly(cell: str) -> None:
    """The rows then carry the rebuilt recurrent graph: the fallback's batched backward runs through it."""
    torch.manual_seed(13)
    rnn, scale, head = CELLS[cell](2, 3, batch_first=True).double(), _Scale(3), nn.Linear(3, 1).double()
    x, _ = _data(6, 5, 2, batch_first=True, seed=13)
    params = [*rnn.parameters(), *scale.parameters(), *head.parameters()]
    _unsupported(lambda: head(scale(rnn(x)[0])).pow(2).sum((1, 2)), params, r"^_Scale .*not a layer the Gram route")


def test_dropout_between_layers_in_training_is_refused_with_the_fix() -> None:
    torch.manual_seed(6)
    rnn = nn.GRU(2, 3, num_layers=2, dropout=0.3, batch_first=True).double()
    x = torch.randn(4, 5, 2, dtype=F64)
    params = list(rnn.parameters())

    def closure() -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout masks in every evaluation
        return rnn(x)[0].sum((1, 2))

    _unsupported(closure, params, r"^GRU \(parameters .*dropout=0.3.*nn\.Dropout")
    rnn.eval()  # no dropout in eval mode: supported
    _agree(lambda: rnn(x)[0].pow(2).sum((1, 2)), params)


def test_packed_sequences_projections_and_unbatched_inputs_are_refused() -> None:
    torch.manual_seed(7)
    x = torch.randn(3, 4, 2, dtype=F64)
    gru = nn.GRU(2, 3, batch_first=True).double()

    def packed() -> torch.Tensor:
        seq = pack_padded_sequence(x, torch.tensor([4, 3, 2]), batch_first=True)
        return gru(seq)[1][0].sum(1)

    _unsupported(packed, list(gru.parameters()), r"^GRU .*PackedSequence.*padded")
    lstm = nn.LSTM(2, 4, proj_size=2, batch_first=True).double()
    _unsupported(lambda: lstm(x)[0].sum((1, 2)), list(lstm.parameters()), r"^LSTM .*proj_size=2.*proj_size=0")
    rnn = nn.RNN(2, 3).double()
    U = LayerGram()(lambda: rnn(x[0])[0].sum(1), list(rnn.parameters()), rows=lambda t: t)
    assert isinstance(U, Unsupported) and re.search(r"^RNN .*unbatched input of shape \(4, 2\)", U.reason)


def test_the_value_check_catches_a_wrong_gate_order() -> None:
    """The recomputation from the gates must reproduce the module: with the r and z rows swapped it does not."""
    torch.manual_seed(8)
    B, T, d, H = 4, 5, 2, 3
    gru = nn.GRU(d, H, batch_first=True).double()
    x = torch.randn(B, T, d, dtype=F64)
    with torch.no_grad():
        hs = gru(x)[0]
        hprev = torch.cat([torch.zeros(B, 1, H, dtype=F64), hs[:, :-1]], 1)

        def mismatch(swap: bool) -> float | None:
            w_ih, w_hh, b_ih, b_hh = gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0
            order = torch.cat([torch.arange(H, 2 * H), torch.arange(H), torch.arange(2 * H, 3 * H)]) if swap else None
            if order is not None:
                w_ih, w_hh, b_ih, b_hh = w_ih[order], w_hh[order], b_ih[order], b_hh[order]
            zi = x @ w_ih.T + b_ih
            zh = hprev @ w_hh.T + b_hh
            return gram_rnn._coefficients("GRU", zi, zh, hprev, hs, None)[1]

        assert mismatch(False) is None
        err = mismatch(True)
        assert err is not None and err > 1e-3


def test_a_mismatch_is_refused_and_the_rows_keep_the_exact_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal found after the fused forward ran without a graph runs it again with one."""
    real = gram_rnn._coefficients

    def broken(*args: Any) -> Any:
        coefs, _, c_end = real(*args)
        return coefs, 1.0, c_end

    monkeypatch.setattr(gram_rnn, "_coefficients", broken)
    torch.manual_seed(9)
    model = Seq("gru", 2, 3).double()
    x, y = _data(4, 5, 2, batch_first=True, seed=9)
    reason = _unsupported(lambda: ((model(x) - y) ** 2).sum(1), list(model.parameters()), r"^GRU .*layer 0")
    assert "differs from the module's output" in reason


# --------------------------------------------------------------------------- the optimizer
def test_sven_steps_a_gru_on_the_gram_route() -> None:
    """``jacobian="auto"`` takes the Gram route (no fallback warning) and the loss goes down (measured: 6.7 -> 0.39)."""
    torch.manual_seed(10)
    B, T = 32, 12
    t = torch.arange(T + 1, dtype=torch.float32) * 0.3
    s = torch.sin((0.5 + torch.rand(B, 1)) * t + 6.28 * torch.rand(B, 1))
    x, y = s[:, :T, None], s[:, 1:]
    rnn, head = nn.GRU(1, 16, batch_first=True), nn.Linear(16, 1)
    params = list(rnn.parameters()) + list(head.parameters())
    opt = sven.Sven(params)  # the defaults, adaptive damping included

    def closure() -> torch.Tensor:
        return ((head(rnn(x)[0]).squeeze(-1) - y) ** 2).sum(1)

    first = float(closure().detach().mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(5):
            opt.step(closure)
    assert float(closure().detach().mean()) < 0.2 * first
