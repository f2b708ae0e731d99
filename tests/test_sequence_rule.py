"""The sequence rule of ``sven.Sven`` (``sven/sequence_rule.py``): per-sequence token cross-entropy.

Checked against what the rule promises: the graph forms it recognises and
those it does not, and that the default optimizer's steps equal those of the
optimizer configured explicitly with the rule's settings.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sven
from sven.sequence_rule import SEQUENCE_GROUP, recognise_sequence

DT = torch.float64
B, T, C = 6, 5, 7


class _TinyLM(nn.Module):
    """Embedding, a per-position MLP and a head: ``(B, T)`` ids to ``(B, T, C)`` logits."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(C, 8).to(DT)
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, C)).to(DT)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.tok(idx))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, C, (B, T), generator=g)
    return x, (x + 1) % C  # learnable: the next id


def _seq_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z.transpose(1, 2), y, reduction="none").mean(-1)


def _params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


# ----------------------------------------------------------------------------- recognition
Z = torch.randn(B, T, C, dtype=DT)
Y = torch.randint(0, C, (B, T))

RECOGNISED = {
    "transpose, mean(-1)": lambda z: F.cross_entropy(z.transpose(1, 2), Y, reduction="none").mean(-1),
    "transpose, mean(1)": lambda z: F.cross_entropy(z.transpose(1, 2), Y, reduction="none").mean(1),
    "sum(-1)": lambda z: F.cross_entropy(z.transpose(1, 2), Y, reduction="none").sum(-1),
    "flattened tokens": lambda z: F.cross_entropy(z.flatten(0, 1), Y.flatten(), reduction="none").view(B, T).mean(1),
    "nn.CrossEntropyLoss": lambda z: nn.CrossEntropyLoss(reduction="none")(z.transpose(1, 2), Y).mean(-1),
    "nll_loss(log_softmax)": lambda z: F.nll_loss(F.log_softmax(z.transpose(1, 2), 1), Y, reduction="none").mean(1),
    "log_softmax(dim=-1) of the flattened tokens": lambda z: (
        F.nll_loss(F.log_softmax(z.reshape(-1, C), -1), Y.reshape(-1), reduction="none").view(B, T).mean(-1)
    ),
    "log_softmax(dim=-1), then flattened": lambda z: (
        F.nll_loss(F.log_softmax(z, -1).reshape(-1, C), Y.reshape(-1), reduction="none").view(B, T).mean(-1)
    ),
    "log_softmax(dim=-2) of (B, C, T)": lambda z: F.nll_loss(F.log_softmax(z.mT, -2), Y, reduction="none").mean(1),
}
NOT_RECOGNISED = {
    "a classifier's (B, C) losses": lambda z: F.cross_entropy(z[:, 0], Y[:, 0], reduction="none"),
    "mean over the batch": lambda z: F.cross_entropy(z.transpose(1, 2), Y, reduction="none").mean(0),
    "keepdim": lambda z: F.cross_entropy(z.transpose(1, 2), Y, reduction="none").mean(-1, keepdim=True),
    "one position": lambda z: F.cross_entropy(z[:, :1].transpose(1, 2), Y[:, :1], reduction="none").mean(-1),
    "label_smoothing": lambda z: F.cross_entropy(z.transpose(1, 2), Y, label_smoothing=0.1, reduction="none").mean(1),
    "a scaled loss": lambda z: (2 * F.cross_entropy(z.transpose(1, 2), Y, reduction="none")).mean(1),
    "squared error": lambda z: (z**2).sum(-1).mean(-1),
    "log_softmax over positions": lambda z: F.nll_loss(F.log_softmax(z.mT, 2), Y, reduction="none").mean(1),
    "log_softmax over positions, then flattened": lambda z: (
        F.nll_loss(F.log_softmax(z, 1).reshape(-1, C), Y.reshape(-1), reduction="none").view(B, T).mean(-1)
    ),
    "nll_loss of raw scores": lambda z: F.nll_loss(z.transpose(1, 2), Y, reduction="none").mean(1),
    "no graph": lambda z: F.cross_entropy(z.detach().transpose(1, 2), Y, reduction="none").mean(1),
}


@pytest.mark.parametrize("name", RECOGNISED)
def test_recognises_per_sequence_cross_entropy(name: str) -> None:
    assert recognise_sequence(RECOGNISED[name](Z.clone().requires_grad_(True)))


@pytest.mark.parametrize("name", NOT_RECOGNISED)
def test_does_not_recognise_anything_else(name: str) -> None:
    assert not recognise_sequence(NOT_RECOGNISED[name](Z.clone().requires_grad_(True)))


# ----------------------------------------------------------------------------- the default optimizer
def test_default_sven_takes_the_sequence_settings(caplog: pytest.LogCaptureFixture) -> None:
    m = _TinyLM()
    x, y = _data()
    opt = sven.Sven(m.parameters())
    assert opt.param_groups[0]["lr"] == sven.config.DEFAULT_LR and opt.config.adaptive_damping
    with caplog.at_level(logging.INFO, logger="sven"):
        out = opt.step(lambda: _seq_ce(m(x), y))
    assert out.shape == (B,)
    g = opt.param_groups[0]
    assert {k: g[k] for k in SEQUENCE_GROUP} == SEQUENCE_GROUP
    assert opt.config.ggn is False and not opt.config.adaptive_damping and opt.last_step is not None
    assert not opt.last_step.ggn and opt.last_step.gain_ratio is None  # the plain step: no re-evaluation
    said = [r for r in caplog.records if r.name == "sven" and "per-sequence" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


def test_the_steps_are_the_explicit_settings_steps() -> None:
    """The default optimizer and one given the rule's settings take the same steps from the first one on."""
    a, b = _TinyLM(), _TinyLM()
    x, y = _data()
    oa = sven.Sven(a.parameters())
    ob = sven.Sven(b.parameters(), adaptive_damping=False, **SEQUENCE_GROUP)
    start = _params(a)
    for _ in range(3):
        oa.step(lambda: _seq_ce(a(x), y))
        ob.step(lambda: _seq_ce(b(x), y))
        torch.testing.assert_close(_params(a), _params(b), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(_params(a), start)
    # and not today's default step (lr 0.5, adaptive damping): the rule changed something
    c = _TinyLM()
    oc = sven.Sven(c.parameters(), ggn=False)
    for _ in range(3):
        oc.step(lambda: _seq_ce(c(x), y))
    assert not torch.allclose(_params(c), _params(a))


@pytest.mark.parametrize(
    "options",
    [{"lr": 0.5}, {"momentum": 0.5}, {"ggn": False}, {"adaptive_damping": True}, {"kappa": 1.0}],
    ids=lambda o: next(iter(o)),
)
def test_options_set_explicitly_keep_them(options: dict) -> None:
    m = _TinyLM()
    x, y = _data()
    opt = sven.Sven(m.parameters(), **options)
    before = dict(opt.param_groups[0]), opt.config.adaptive_damping
    opt.step(lambda: _seq_ce(m(x), y))
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"]) == (before[0]["lr"], before[0]["momentum"], before[0]["nesterov"])
    assert opt.config.adaptive_damping == before[1]


def test_other_losses_keep_todays_step() -> None:
    """Squared errors over positions: the groups and the adaptive damping are untouched."""
    m = _TinyLM()
    x, _ = _data()
    opt = sven.Sven(m.parameters())
    opt.step(lambda: (m(x) ** 2).sum(-1).mean(-1))
    assert opt.param_groups[0]["lr"] == sven.config.DEFAULT_LR and opt.param_groups[0]["momentum"] == 0
    assert opt.config.adaptive_damping and opt.config.ggn is False


def test_a_scheduler_attached_before_the_first_step_keeps_todays_step() -> None:
    m = _TinyLM()
    x, y = _data()
    opt = sven.Sven(m.parameters())
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    with pytest.warns(UserWarning, match=r"learning-rate scheduler was attached before the first step"):
        opt.step(lambda: _seq_ce(m(x), y))
    assert opt.param_groups[0]["lr"] == sven.config.DEFAULT_LR and opt.param_groups[0]["momentum"] == 0
    assert opt.config.adaptive_damping and opt.config.ggn is False


def test_a_checkpoint_resumes_in_a_fresh_default_optimizer() -> None:
    """The groups' settings and momentum buffers are saved; a fresh optimizer continues the same run."""
    a = _TinyLM()
    x, y = _data()
    oa = sven.Sven(a.parameters())
    oa.step(lambda: _seq_ce(a(x), y))
    oa.param_groups[0]["lr"] = 0.01  # as a scheduler would: the resumed run must keep it
    b = _TinyLM(seed=3)
    b.load_state_dict(a.state_dict())
    ob = sven.Sven(b.parameters())
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as from a file: torch would share the momentum buffers
    for _ in range(2):
        oa.step(lambda: _seq_ce(a(x), y))
        ob.step(lambda: _seq_ce(b(x), y))
    assert ob.param_groups[0]["lr"] == 0.01 and not ob.config.adaptive_damping
    torch.testing.assert_close(_params(b), _params(a), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- an explicit momentum means what it says
@pytest.mark.parametrize("kw", [{"momentum": 0.0}, {"nesterov": False}, {"momentum": 0.5}])
def test_an_explicit_momentum_or_nesterov_turns_the_rule_off(kw: dict[str, object]) -> None:
    """``Sven(params, momentum=0.0)`` asked for no momentum: the rule must not give it Nesterov momentum 0.9."""
    m = _TinyLM()
    x, y = _data()
    opt = sven.Sven(m.parameters(), **kw)  # type: ignore[arg-type]
    opt.step(lambda: _seq_ce(m(x), y))
    g = opt.param_groups[0]
    assert opt.config.ggn is False
    assert g["lr"] == pytest.approx(0.5) and g["momentum"] == pytest.approx(float(kw.get("momentum", 0.0)))
    assert g["nesterov"] is False


def test_a_group_with_its_own_momentum_turns_the_rule_off() -> None:
    m = _TinyLM()
    x, y = _data()
    opt = sven.Sven([{"params": list(m.tok.parameters()), "momentum": 0.0}, {"params": list(m.mlp.parameters())}])
    opt.step(lambda: _seq_ce(m(x), y))
    assert opt.config.ggn is False
    assert all(g["momentum"] == 0.0 and g["nesterov"] is False for g in opt.param_groups)
