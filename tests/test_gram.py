"""The Gram route (``sven.gram``): ``K = J J^T``, ``J^T C`` and ``J X`` from layer factors agree with the dense ``J``.

Every supported case is compared with :func:`sven.jacobian.autograd_jacobian`
on the same closure, in float64, to ``1e-10`` relative; every unsupported
case must say so, with a reason that names the layer or parameter, and hand
back rows whose graph still gives the exact Jacobian.
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import truncpinv as tp
from sven.gram import GramJacobian, LayerGram, Unsupported, row_transform, supported_modules
from sven.jacobian import autograd_jacobian

F64 = torch.float64
RTOL = 1e-10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _agree(
    closure: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    rows: Callable[[torch.Tensor], torch.Tensor] = _flat,
    rtol: float = RTOL,
    lg: LayerGram | None = None,
) -> GramJacobian:
    """Assert that the Gram route matches the dense Jacobian of ``rows(closure())``."""
    G = (lg or LayerGram())(closure, params, rows=rows)
    assert isinstance(G, GramJacobian), G.reason  # type: ignore[union-attr]
    J = autograd_jacobian(rows(closure()), params)
    assert G.shape == tuple(J.shape)
    assert G.gram.dtype == F64 and G.dtype == J.dtype
    torch.testing.assert_close(G.output, rows(closure()).detach())
    K = J.double() @ J.double().T
    assert _rel(G.gram, K) <= rtol
    C = torch.randn(J.shape[0], 3, dtype=J.dtype, generator=_gen(1))
    X = torch.randn(J.shape[1], 2, dtype=J.dtype, generator=_gen(2))
    assert _rel(G.rmatmat(C), J.T @ C) <= rtol
    assert _rel(G.rmatmat(C[:, 0]), J.T @ C[:, 0]) <= rtol
    assert _rel(G.matmat(X), J @ X) <= rtol
    assert _rel(G.to_dense(), J) <= rtol
    return G


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: ((model(x) - y) ** 2).flatten(1).sum(1)


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("bias", [True, False])
def test_mlp(bias: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 7, bias=bias), nn.GELU(), nn.Linear(7, 5, bias=bias), nn.Tanh(), nn.Linear(5, 2))
    model = model.double()
    x, y = torch.randn(9, 3, dtype=F64), torch.randn(9, 2, dtype=F64)
    _agree(_mse(model, x, y), list(model.parameters()))


@pytest.mark.parametrize(("d", "T", "formed"), [(32, 2, False), (3, 40, True)])
def test_linear_on_sequences_and_shared_layers(d: int, T: int, formed: bool) -> None:
    """``(B, T, d)`` inputs: the pair sum over positions, or the formed per-row gradients (cheaper one)."""
    torch.manual_seed(1)
    lin, head = nn.Linear(d, d).double(), nn.Linear(d, 2).double()
    x = torch.randn(5, T, d, dtype=F64)

    def closure() -> torch.Tensor:
        h = torch.tanh(lin(torch.tanh(lin(x))))  # shared weights, two calls
        return head(h).pow(2).sum(dim=(1, 2))

    G = _agree(closure, [*lin.parameters(), *head.parameters()])
    lin_block: Any = G._blocks[0]
    assert (lin_block.m is not None) == formed


def test_conv1d() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv1d(4, 3, 4, padding="same", padding_mode="circular"),
        nn.Tanh(),
        nn.Conv1d(3, 3, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(3 * 4, 1),
    ).double()
    x, y = torch.randn(6, 2, 11, dtype=F64), torch.randn(6, 1, dtype=F64)
    _agree(_mse(model, x, y), list(model.parameters()))


def test_conv2d() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 3, (2, 3), padding=(1, 0), dilation=(1, 2), padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(3 * 8 * 2, 2),
    ).double()
    x, y = torch.randn(5, 2, 13, 12, dtype=F64), torch.randn(5, 2, dtype=F64)
    _agree(_mse(model, x, y), list(model.parameters()))


@pytest.mark.parametrize("T", [1, 3, 30])  # pair sum / rows restricted to the indices in the batch
def test_embedding_with_repeated_indices_and_padding(T: int) -> None:
    torch.manual_seed(4)
    emb = nn.Embedding(6, 4, padding_idx=0).double()
    head = nn.Linear(4, 1).double()
    idx = torch.randint(1, 6, (7, T), generator=_gen(0))
    idx[:3, 0] = 3  # the same row of the table in several samples
    idx[3, 0] = 0  # padding
    if T == 1:
        idx = idx[:, 0]

    def closure() -> torch.Tensor:
        return head(torch.tanh(emb(idx))).flatten(1).pow(2).sum(1)

    G = _agree(closure, [emb.weight, *head.parameters()])
    assert bool((G.rmatmat(torch.ones(7, dtype=F64))[:4] == 0).all())  # padding_idx row: no gradient


def test_layernorm_and_rmsnorm() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.LayerNorm(6), nn.GELU(), nn.RMSNorm(6), nn.Linear(6, 6), nn.LayerNorm([6], bias=False)
    ).double()
    x = torch.randn(8, 5, 3, dtype=F64)
    _agree(lambda: model(x).pow(2).sum(dim=(1, 2)), list(model.parameters()))


class Block(nn.Module):
    """A custom module with Sequential children and no parameters of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.body = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6), nn.GELU())
        self.conv = nn.Sequential(nn.Conv1d(6, 4, 3, padding=1), nn.Tanh())
        self.head = nn.Linear(4, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.body(h)
        h = self.conv(h.transpose(1, 2)).mean(-1)
        return self.head(h)


def test_custom_module_mixing_every_layer_type() -> None:
    torch.manual_seed(6)
    model = Block().double()
    idx = torch.randint(0, 10, (6, 5), generator=_gen(3))
    y = torch.randn(6, 1, dtype=F64)
    _agree(_mse(model, idx, y), list(model.parameters()))


def test_tied_embedding_and_output_weights() -> None:
    """One parameter used by two kinds of layers: formed rows, summed over calls."""
    torch.manual_seed(7)
    emb = nn.Embedding(5, 3).double()
    head = nn.Linear(3, 5, bias=False).double()
    head.weight = emb.weight
    idx = torch.randint(0, 5, (6, 2), generator=_gen(4))
    _agree(lambda: head(torch.tanh(emb(idx))).pow(2).sum(dim=(1, 2)), [emb.weight])


def test_frozen_parameters_are_excluded() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    model[2].requires_grad_(False)
    model[4].bias.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.randn(7, 2, dtype=F64), torch.randn(7, 1, dtype=F64)
    G = _agree(_mse(model, x, y), params)
    assert G.shape == (7, sum(p.numel() for p in params))


@pytest.mark.parametrize("T", [1, 3])
def test_residual_rows_several_per_sample(T: int) -> None:
    """Rows ``(B, D)`` flattened (``residuals=True``): one backward per column ``d``."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.LayerNorm(6), nn.Linear(6, 4)).double()
    x = torch.randn(5, T, 3, dtype=F64)
    y = torch.randn(5, T, 4, dtype=F64)
    G = _agree(lambda: model(x) - y, list(model.parameters()))
    assert G.rows_per_sample == T * 4
    emb = nn.Embedding(4, 2).double()
    idx = torch.randint(0, 4, (6, 3), generator=_gen(5))
    G = _agree(lambda: torch.tanh(emb(idx)), [emb.weight])
    assert G.rows_per_sample == 6


def test_float32_model() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 16), nn.GELU(), nn.Linear(16, 1))
    x, y = torch.randn(12, 3), torch.randn(12, 1)
    G = _agree(_mse(model, x, y), list(model.parameters()), rtol=1e-5)
    assert G.dtype == torch.float32 and G.gram.dtype == F64


@given(
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    batch=st.integers(1, 12),
    n_in=st.integers(1, 4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_mlps(widths: list[int], batch: int, n_in: int, bias: bool, seed: int) -> None:
    g = _gen(seed)
    layers: list[nn.Module] = []
    d = n_in
    for w in widths:
        layers += [nn.Linear(d, w, bias=bias), nn.Tanh()]
        d = w
    layers.append(nn.Linear(d, 1))
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=F64, generator=g))
    x, y = torch.randn(batch, n_in, dtype=F64, generator=g), torch.randn(batch, 1, dtype=F64, generator=g)
    _agree(_mse(model, x, y), list(model.parameters()), rtol=1e-9)


# --------------------------------------------------------------------------- for the optimizer
def test_row_transforms_and_pinv_from_gram() -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = torch.randn(8, 2, dtype=F64), torch.randn(8, 1, dtype=F64)
    params = list(model.parameters())
    G = LayerGram()(_mse(model, x, y), params, rows=_flat)
    assert isinstance(G, GramJacobian)
    J = autograd_jacobian(_mse(model, x, y)(), params)
    s = torch.rand(8, dtype=F64, generator=_gen(6)) + 0.5
    S = torch.kron(torch.eye(4, dtype=F64), torch.full((1, 2), 0.5, dtype=F64))  # microbatches of 2
    M = row_transform(row_transform(G, s), S)  # M = S diag(s) J
    Md = S @ (s[:, None] * J)
    assert M.shape == tuple(Md.shape)
    assert _rel(M.gram, Md @ Md.T) <= RTOL
    c = torch.randn(4, 2, dtype=F64, generator=_gen(7))
    X = torch.randn(J.shape[1], 2, dtype=F64, generator=_gen(8))
    assert _rel(M.rmatmat(c), Md.T @ c) <= RTOL and _rel(M.matmat(X), Md @ X) <= RTOL
    F = tp.pinv_from_gram(M.gram, M, rank=3)
    torch.testing.assert_close(F @ c[:, 0], tp.pinv(Md, rank=3) @ c[:, 0], rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match=r"`S` must have 8 columns"):
        row_transform(G, torch.ones(2, 3, dtype=F64))


# --------------------------------------------------------------------------- unsupported
def _unsupported(closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], match: str, **kw: object) -> str:
    U = LayerGram()(closure, params, rows=_flat, **kw)  # type: ignore[arg-type]
    assert isinstance(U, Unsupported), "expected the Gram route to refuse"
    assert re.search(match, U.reason), U.reason
    # the rows keep their graph: the exact fallback needs no second forward
    J = autograd_jacobian(U.output, params)
    assert J.shape == (U.output.shape[0], sum(p.numel() for p in params))
    return U.reason


def test_batchnorm_in_training_mode_on_a_tiny_batch_is_unsupported_and_runs_once() -> None:
    """2 x channels >= rows: the coupling term would be larger than the materialised Jacobian (more in
    tests/test_gram_batchnorm.py)."""
    torch.manual_seed(12)
    x, y = torch.randn(10, 3, dtype=F64), torch.randn(10, 1, dtype=F64)
    for affine in (False, True):
        model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6, affine=affine), nn.Linear(6, 1)).double()
        _unsupported(_mse(model, x, y), list(model.parameters()), r"BatchNorm1d .*training mode.*couples")
        bn: Any = model[1]
        assert int(bn.num_batches_tracked) == 1


def test_batchnorm_in_eval_mode() -> None:
    torch.manual_seed(13)
    x, y = torch.randn(10, 3, dtype=F64), torch.randn(10, 1, dtype=F64)
    for affine in (False, True):  # a fixed per-sample affine map
        model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6, affine=affine), nn.Linear(6, 1)).double().eval()
        bn: Any = model[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        _agree(_mse(model, x, y), list(model.parameters()))


def test_raw_parameter_usage_is_unsupported() -> None:
    w = nn.Parameter(torch.randn(3, dtype=F64))
    lin = nn.Linear(3, 1).double()
    x = torch.randn(6, 3, dtype=F64)
    params = [w, *lin.parameters()]
    _unsupported(
        lambda: lin(x * w).squeeze(-1) ** 2,
        params,
        r"parameter\(s\) 'scale' are used outside",
        names=["scale", "w", "b"],
    )
    # a parameter reached through a supported module's attribute, but not its forward
    _unsupported(lambda: (x @ lin.weight.T).squeeze(-1) ** 2, [lin.weight], r"#0 of shape \(1, 3\) are used outside")

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.scale

    model = Scaled().double()
    reason = r"^Scaled \(parameters #0 of shape \(1,\)\) has optimised"
    _unsupported(lambda: model(x).squeeze(-1) ** 2, list(model.parameters()), reason)
    # parameters a supported layer owns but its factors do not use: the hook-based weight_norm's g and v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        normed = nn.utils.weight_norm(nn.Linear(3, 2).double())
    names = [n for n, _ in normed.named_parameters()]
    _unsupported(
        lambda: normed(x).pow(2).sum(-1),
        list(normed.parameters()),
        r"parameter\(s\) 'weight_g', 'weight_v' are used outside",
        names=names,
    )


def test_unsupported_layer_configurations_name_the_module() -> None:
    torch.manual_seed(14)
    x = torch.randn(4, 2, 6, 6, dtype=F64)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten()).double()
    _unsupported(lambda: conv(x).pow(2).sum(1), list(conv.parameters()), r"^Conv2d .*groups=2")
    tconv = nn.Sequential(nn.ConvTranspose2d(2, 1, 2), nn.Flatten()).double()
    _unsupported(lambda: tconv(x).pow(2).sum(1), list(tconv.parameters()), r"^ConvTranspose2d .*not a layer")
    emb = nn.Embedding(5, 2, max_norm=1.0).double()
    idx = torch.randint(0, 5, (4, 3), generator=_gen(9))
    _unsupported(lambda: emb(idx).pow(2).sum((1, 2)), [emb.weight], r"^Embedding .*max_norm")
    pos = nn.Embedding(3, 2).double()  # positional, scaled before the broadcast (tests/test_gram_layers.py)
    _unsupported(
        lambda: (emb(idx) + 2 * pos(torch.arange(3))).pow(2).sum((1, 2)), [pos.weight], r"leading dimension is not"
    )
    lin = nn.Linear(3, 3).double()
    v = torch.randn(4, 3, dtype=F64)
    _unsupported(lambda: torch.relu_(lin(v)).sum(1), list(lin.parameters()), r"Linear .*modified in place")


def test_coupling_found_by_verification_is_remembered() -> None:
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(8, 1, dtype=F64)

    def closure() -> torch.Tensor:
        out = model(x).squeeze(-1)
        return (out - out.mean()) ** 2  # each row depends on every sample

    lg = LayerGram()
    first = lg(closure, list(model.parameters()), rows=_flat)
    assert isinstance(first, Unsupported) and "disagrees with autograd" in first.reason
    again = lg(closure, list(model.parameters()), rows=_flat)
    assert isinstance(again, Unsupported) and again.reason == first.reason
    # without verification the (wrong) factors are trusted
    trusted = LayerGram(verify=False)(closure, list(model.parameters()), rows=_flat)
    assert isinstance(trusted, GramJacobian)


def test_a_closure_that_starts_coupling_the_samples_later_is_verified_again() -> None:
    """The verification is keyed by the forward structure *and* the closure's own arithmetic after the model
    (the head of its graph): a per-sample loss verified at the first step does not vouch for a loss normalised
    over the batch that the same modules feed later (a curriculum, a changed objective)."""
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(8, 1, dtype=F64)
    params = list(model.parameters())

    def per_sample() -> torch.Tensor:
        return model(x).squeeze(-1) ** 2

    def centred() -> torch.Tensor:
        out = model(x).squeeze(-1)
        return (out - out.mean()) ** 2

    lg = LayerGram()
    _agree(per_sample, params, lg=lg)
    later = lg(centred, params, rows=_flat)
    assert isinstance(later, Unsupported) and "disagrees with autograd" in later.reason
    _agree(per_sample, params, lg=lg)  # and the per-sample loss is still served


def test_bad_closures_and_the_global_hook() -> None:
    from torch.nn.modules import module as module_mod

    lin = nn.Linear(2, 1).double()
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="does not depend on the optimised parameters"):
        LayerGram()(lambda: lin(x).detach().squeeze(-1), list(lin.parameters()), rows=_flat)
    before = len(module_mod._global_forward_hooks)

    def boom() -> torch.Tensor:
        lin(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        LayerGram()(boom, list(lin.parameters()), rows=_flat)
    assert len(module_mod._global_forward_hooks) == before
    with torch.no_grad():  # the closure and `rows` run with grad enabled regardless
        assert isinstance(LayerGram()(lambda: lin(x), list(lin.parameters()), rows=_flat), GramJacobian)
    with pytest.raises(ValueError, match="`names` must name each of the 2 parameters"):
        LayerGram()(lambda: lin(x).squeeze(-1), list(lin.parameters()), rows=_flat, names=["w"])
    with pytest.raises(ValueError, match="`rows` must return the rows as a 1-D tensor, got \\(3, 1\\)"):
        LayerGram()(lambda: lin(x), list(lin.parameters()), rows=lambda t: t)
    with pytest.raises(ValueError, match="`params` must hold at least one parameter"):
        LayerGram()(lambda: lin(x).squeeze(-1), [], rows=_flat)
    with pytest.raises(ValueError, match="`seed` must be a non-negative integer"):
        LayerGram(seed=-1)


def test_state_is_not_carried_across_copies() -> None:
    lg = LayerGram(seed=3)
    lin = nn.Linear(2, 1).double()
    x = torch.randn(4, 2, dtype=F64)
    lg(lambda: lin(x).squeeze(-1) ** 2, list(lin.parameters()), rows=_flat)
    assert lg._verified
    for clone in (copy.deepcopy(lg), pickle.loads(pickle.dumps(lg))):
        assert clone.seed == 3 and clone.verify and not clone._verified


def test_supported_modules() -> None:
    assert set(supported_modules()) >= {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm}
