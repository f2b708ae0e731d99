"""The loss rule of ``sven.Sven`` (``sven/loss_rule.py``): softmax cross-entropy losses get the GGN rows.

The rule is checked against quantities derived here: the Tikhonov-damped GGN
step ``-lr (G + lambda I)^{-1} g`` built densely from the logits' Jacobian and
the softmax Hessian ``diag(p) - p p^T`` (two classes, where ``classes=1``
keeps every row, so the rows' curvature is the whole GGN), and the explicit
preset of ``sven.losses``.
"""

from __future__ import annotations

import logging
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sven
from sven.control import CrossEntropyDamping, Plain, Tikhonov, TrustRadius
from sven.loss_rule import recognise

DT = torch.float64
RULE = sven.loss_rows.RULE_PRESET


def _model(n_out: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, n_out)).to(DT)


def _data(n: int = 24, classes: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=DT)
    return x, torch.randint(0, classes, (n,), generator=g)


def _params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


# ----------------------------------------------------------------------------- recognition
Z = torch.randn(5, 4, dtype=DT)
Y = torch.tensor([0, 3, 1, 1, 2])
WEIGHT = torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=DT)

RECOGNISED = {
    "F.cross_entropy": lambda z: F.cross_entropy(z, Y, reduction="none"),
    "nn.CrossEntropyLoss": lambda z: nn.CrossEntropyLoss(reduction="none")(z, Y),
    "weight": lambda z: F.cross_entropy(z, Y, weight=WEIGHT, reduction="none"),
    "ignore_index": lambda z: F.cross_entropy(z, Y, ignore_index=1, reduction="none"),
    "nll_loss(log_softmax(z, -1))": lambda z: F.nll_loss(F.log_softmax(z, -1), Y, reduction="none"),
}
NOT_RECOGNISED = {
    "squared error": lambda z: (z**2).sum(-1),
    "reduction='mean'": lambda z: F.cross_entropy(z, Y),
    "label_smoothing": lambda z: F.cross_entropy(z, Y, label_smoothing=0.1, reduction="none"),
    "probability targets": lambda z: F.cross_entropy(z, torch.softmax(torch.ones_like(z), -1), reduction="none"),
    "a scaled loss": lambda z: 2 * F.cross_entropy(z, Y, reduction="none"),
    "a loss plus a penalty": lambda z: F.cross_entropy(z, Y, reduction="none") + (z**2).sum(-1),
    "log_softmax over the batch": lambda z: F.nll_loss(F.log_softmax(z, 0), Y, reduction="none"),
    "nll_loss of raw scores": lambda z: F.nll_loss(z, Y, reduction="none"),
    "no graph": lambda z: F.cross_entropy(z.detach(), Y, reduction="none"),
    "positions": lambda z: F.cross_entropy(z.reshape(5, 2, 2), Y.reshape(5, 1).expand(5, 2) % 2, reduction="none"),
}


@pytest.mark.parametrize("name", RECOGNISED)
def test_recognises_softmax_cross_entropy(name: str) -> None:
    z = Z.clone().requires_grad_(True)
    out = RECOGNISED[name](z)
    ce = recognise(out)
    assert ce is not None
    torch.testing.assert_close(ce.logp.detach(), torch.log_softmax(Z, -1))
    assert torch.equal(ce.target, Y)
    # the rows: M^T R is the gradient of the summed losses (sven.losses derives it), here in the logits
    rows = ce.rows()
    (g_rows,) = torch.autograd.grad(rows, z, grad_outputs=rows.detach())
    (g_loss,) = torch.autograd.grad(RECOGNISED[name](z).sum(), z)
    torch.testing.assert_close(g_rows, g_loss)


@pytest.mark.parametrize("name", NOT_RECOGNISED)
def test_does_not_recognise_anything_else(name: str) -> None:
    assert recognise(NOT_RECOGNISED[name](Z.clone().requires_grad_(True))) is None


# ----------------------------------------------------------------------------- when the rule acts
@pytest.mark.parametrize("loss", ["F.cross_entropy", "nn.CrossEntropyLoss"])
def test_default_sven_takes_the_ggn_rows_for_cross_entropy(loss: str, caplog: pytest.LogCaptureFixture) -> None:
    m = _model()
    x, y = _data()
    fn = F.cross_entropy if loss == "F.cross_entropy" else nn.CrossEntropyLoss(reduction="none")
    opt = sven.Sven(m.parameters())
    assert opt.config.ggn is None  # not decided before the first step
    with caplog.at_level(logging.INFO, logger="sven"):
        expected = F.cross_entropy(m(x), y, reduction="none").detach()
        for _ in range(2):
            out = opt.step(lambda: fn(m(x), y, reduction="none") if loss == "F.cross_entropy" else fn(m(x), y))
            if _ == 0:
                torch.testing.assert_close(out, expected)  # step returns the losses, not the rows
    assert opt.config.ggn is True and opt.last_step is not None and opt.last_step.ggn
    assert opt.config.residuals and opt.config.damping == RULE["damping"] and opt.config.adaptive_damping
    assert isinstance(opt.control, CrossEntropyDamping) and opt.control.cap == RULE["damping"]
    assert opt.control.floor == RULE["damping_start"] < RULE["damping"]  # two steps: no block of the plateau test yet
    assert opt.param_groups[0]["lr"] == RULE["lr"] and not opt.config.scale
    assert opt.param_groups[0]["weight_decay"] == RULE["weight_decay"]
    assert out.shape == (x.shape[0],) and opt.last_step.losses.shape == (x.shape[0],)
    said = [r for r in caplog.records if r.name == "sven" and "cross-entropy" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


def test_squared_errors_keep_todays_step() -> None:
    x, _ = _data()
    target = torch.randn(x.shape[0], 3, dtype=DT)
    a, b = _model(), _model()
    oa, ob = sven.Sven(a.parameters()), sven.Sven(b.parameters(), ggn=False)
    for _ in range(3):
        oa.step(lambda: ((a(x) - target) ** 2).sum(-1))
        ob.step(lambda: ((b(x) - target) ** 2).sum(-1))
    assert oa.config.ggn is False and oa.last_step is not None and not oa.last_step.ggn
    assert oa.config.adaptive_damping and not oa.config.residuals
    assert torch.equal(_params(a), _params(b))


@pytest.mark.parametrize(
    "options",
    [
        {"lr": 0.5},
        {"damping": 0.1},
        {"adaptive_damping": True},
        {"kappa": 1.0},
        {"variable_k": True},
        {"check_step": True},
        {"rmsprop": True},
        {"control": Plain()},
        {"momentum": 0.9},
        {"momentum": 0.0},
        {"nesterov": False},
        {"ggn": False},
    ],
    ids=lambda o: next(iter(o)),
)
def test_options_set_explicitly_keep_the_losses(options: dict) -> None:
    m = _model()
    x, y = _data()
    opt = sven.Sven(m.parameters(), **options)
    assert opt.config.ggn is False
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    assert opt.last_step is not None and not opt.last_step.ggn


@pytest.mark.parametrize("key, value", [("lr", 0.5), ("momentum", 0.0), ("nesterov", False)])
def test_a_group_lr_or_momentum_keeps_the_losses(key: str, value: object) -> None:
    m = _model()
    opt = sven.Sven([{"params": list(m.parameters()), key: value}])
    assert opt.config.ggn is False


def test_momentum_with_cross_entropy_keeps_a_working_step() -> None:
    """Momentum 0.9 once switched the rule on with its judged damping and ``lr=0.5``: the carried steps made the
    loss rise from about 1.1 to 4.7 in 30 steps. An explicit momentum now keeps the losses and its plain step."""
    torch.manual_seed(0)
    X = torch.randn(256, 20)
    y = X[:, :3].argmax(1)
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = sven.Sven(m.parameters(), momentum=0.9)
    with torch.no_grad():
        start = float(F.cross_entropy(m(X), y))
    for i in range(30):
        xb, yb = X[(i * 32) % 256 :][:32], y[(i * 32) % 256 :][:32]
        opt.step(lambda xb=xb, yb=yb: F.cross_entropy(m(xb), yb, reduction="none"))
    assert opt.config.ggn is False
    with torch.no_grad():
        assert float(F.cross_entropy(m(X), y)) < 0.5 * start


def test_the_seed_api_never_takes_the_rows() -> None:
    m = _model()
    wrapped = sven.nn.SvenWrapper(m, lambda pred, y: F.cross_entropy(pred, y, reduction="none"), "cpu")
    assert sven.Sven(wrapped, 0.5, 4, 1e-3).config.ggn is False


# ----------------------------------------------------------------------------- the step
def test_the_rule_sets_its_lr_on_the_groups() -> None:
    """The rule switches at the first step; no ``lr`` was given, so every group (and a later one) gets the rule's."""
    m, extra = _model(), nn.Linear(2, 2).to(DT)
    x, y = _data()
    opt = sven.Sven([{"params": list(m.parameters())}])
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    opt.add_param_group({"params": list(extra.parameters())})
    assert [g["lr"] for g in opt.param_groups] == [RULE["lr"], RULE["lr"]]


@pytest.mark.parametrize("jacobian", ["auto", "gram", "autograd"])
@pytest.mark.parametrize("extra", [{}, {"ignore_index": 2}, {"weight": torch.tensor([0.5, 2.0, 1.0], dtype=DT)}])
def test_the_step_is_the_explicit_preset_step(jacobian: str, extra: dict) -> None:
    a, b = _model(), _model()
    x, y = _data()
    oa = sven.Sven(a.parameters(), ggn=True, adaptive_damping=False, jacobian=jacobian)  # a fixed damping
    ob = sven.losses.optimizer(b.parameters(), jacobian=jacobian, damping=RULE["damping"], lr=RULE["lr"],
                               weight_decay=RULE["weight_decay"])  # fmt: skip
    for _ in range(3):
        oa.step(lambda: F.cross_entropy(a(x), y, reduction="none", **extra))
        ob.step(lambda: sven.losses.cross_entropy(b(x), y, **extra))
    assert oa.config.ggn is True
    torch.testing.assert_close(_params(a), _params(b), rtol=1e-9, atol=1e-12)


def test_the_step_is_the_damped_ggn_step() -> None:
    r"""Two classes: ``-lr (G + damping_start * lambda_max(G) I)^{-1} g - lr w theta`` with ``G = sum_i J_i^T H_i J_i``,
    built densely (the first step's floor is the preset's start; the weight decay ``w`` comes after the kept step)."""
    m = _model(n_out=2)
    x, y = _data(classes=2)
    names = [n for n, _ in m.named_parameters()]
    theta = {n: p.detach().clone() for n, p in m.named_parameters()}

    def logits(flat: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n in names:
            parts[n] = flat[i : i + theta[n].numel()].reshape(theta[n].shape)
            i += theta[n].numel()
        return torch.func.functional_call(m, parts, (x,))

    flat = _params(m)
    J = torch.autograd.functional.jacobian(logits, flat)  # (B, C, P)
    p = torch.softmax(logits(flat), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("bcp,bcd,bdq->pq", J, H, J)
    g = torch.einsum("bcp,bc->p", J, p - F.one_hot(y, 2).to(DT))
    lam = RULE["damping_start"] * float(torch.linalg.eigvalsh(G)[-1])
    want = flat - RULE["lr"] * torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=DT), g)
    want = want - RULE["lr"] * RULE["weight_decay"] * flat
    opt = sven.Sven(m.parameters())
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    # the first try is at the floor of the damping; it lowered the batch loss, so it was kept
    assert opt.last_step is not None and opt.last_step.retries == 0 and not opt.last_step.rejected
    torch.testing.assert_close(_params(m), want, rtol=1e-8, atol=1e-10)


def test_a_classifier_trains_lower_than_before_the_rule() -> None:
    """Five epochs of a small 4-class problem: the held-out loss with the rule is below the old default's.

    (The old default drives every training loss towards zero and inflates the logits: its training loss is about
    the same, its held-out loss 1.3--1.7x higher on this problem's seeds 0--3; seed 0 is asserted.)
    """
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 4, generator=g, dtype=DT)
    x = torch.randn(256, 10, generator=g, dtype=DT)
    y = (x @ W + 0.5 * torch.randn(256, 4, generator=g, dtype=DT)).argmax(-1)
    held = {}
    for ggn in (None, False):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).to(DT)
        opt = sven.Sven(m.parameters(), ggn=ggn)
        for _ in range(5):
            for i in range(0, 192, 32):
                xb, yb = x[i : i + 32], y[i : i + 32]
                opt.step(lambda m=m, xb=xb, yb=yb: F.cross_entropy(m(xb), yb, reduction="none"))
        with torch.no_grad():
            held[ggn] = float(F.cross_entropy(m(x[192:]), y[192:]))
    assert held[None] < 0.9 * held[False]


# ----------------------------------------------------------------------------- ggn=True and bad input
def test_ggn_true_takes_the_rows_from_the_start_and_refuses_other_losses() -> None:
    m = _model()
    x, y = _data()
    opt = sven.Sven(m.parameters(), ggn=True)
    assert opt.config.ggn is True and opt.param_groups[0]["lr"] == RULE["lr"]
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    with pytest.raises(ValueError, match=r"ggn=False for other losses"):
        opt.step(lambda: (m(x) ** 2).sum(-1))


def test_after_the_rule_another_loss_is_an_error() -> None:
    m = _model()
    x, y = _data()
    opt = sven.Sven(m.parameters())
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    with pytest.raises(ValueError, match=r"must return `F.cross_entropy"):
        opt.step(lambda: F.cross_entropy(m(x), y, reduction="none", label_smoothing=0.1))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"ggn": "yes"}, r"`ggn` must be True or False"),
        ({"ggn": True, "variable_k": True}, r"`ggn=True` cannot be combined with variable_k, check_step or scale"),
        ({"ggn": True, "check_step": True}, r"`ggn=True` cannot be combined"),
        ({"ggn": True, "scale": True}, r"`ggn=True` cannot be combined"),
        ({"ggn": True, "residuals": False}, r"`ggn=True` makes the closure's cross-entropy losses"),
    ],
)
def test_bad_ggn_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sven.Sven(_model().parameters(), **options)


def test_a_checkpoint_resumes_in_a_fresh_default_optimizer() -> None:
    """The decision is not saved: a fresh optimizer makes it again at its first step, and continues the run."""
    a = _model()
    x, y = _data()
    oa = sven.Sven(a.parameters())
    oa.step(lambda: F.cross_entropy(a(x), y, reduction="none"))
    b = _model()
    b.load_state_dict(a.state_dict())
    ob = sven.Sven(b.parameters())
    ob.load_state_dict(oa.state_dict())
    for _ in range(2):
        oa.step(lambda: F.cross_entropy(a(x), y, reduction="none"))
        ob.step(lambda: F.cross_entropy(b(x), y, reduction="none"))
    assert ob.config.ggn is True
    torch.testing.assert_close(_params(b), _params(a), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- the step control: CrossEntropyDamping
def _softmax_regression(seed: int = 0, classes: int = 4) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    m = nn.Linear(6, classes).to(DT)
    x, y = _data(n=32, classes=classes, seed=seed + 1)
    return m, x, y


def _batch_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(m(x), y, reduction="sum"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_gain_ratio_is_one_for_a_short_step_of_softmax_regression(seed: int) -> None:
    r"""Logits linear in the parameters: the GGN is the Hessian, and with two classes the rows keep all of it, so
    the rows' model ``1/2 ||R + M d||^2 - 1/2 ||R||^2`` is the second-order Taylor model of the summed cross-entropy
    and actual / predicted decrease is ``1 + O(lr^2)``. (A wrong factor 1/2 would give 0.5 or 2, a wrong sign -1.)"""
    m, x, y = _softmax_regression(seed, classes=2)
    opt = sven.Sven(m.parameters(), ggn=True, lr=1e-2)
    before = _batch_loss(m, x, y)
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    info = opt.last_step
    assert info is not None and info.gain_ratio is not None and not info.rejected
    assert abs(info.gain_ratio - 1.0) < 1e-3
    assert _batch_loss(m, x, y) < before


def test_a_try_that_raises_the_cross_entropy_is_undone_and_retried_more_damped() -> None:
    """No floor and lr 4: the first try (the undamped GGN step, four times over) raises the batch loss, so it is
    undone; the kept try is damped more and lowers the loss, and the damping never falls below the floor."""
    m, x, y = _softmax_regression()
    opt = sven.Sven(m.parameters(), ggn=True, lr=4.0, damping=0.0, max_retries=20)
    assert isinstance(opt.control, CrossEntropyDamping) and opt.control.floor == 0.0
    before = _batch_loss(m, x, y)
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    info = opt.last_step
    assert info is not None and info.retries >= 1 and opt.rejected_steps == info.retries and not info.rejected
    assert info.damping > 0 and _batch_loss(m, x, y) < before


def test_the_damping_stays_at_its_floor_while_the_model_predicts_the_loss() -> None:
    """Short steps are all kept (rho near 1): the damping is the floor, and the steps are the fixed-damping steps."""
    a, x, y = _softmax_regression()
    b, _, _ = _softmax_regression()
    oa = sven.Sven(a.parameters(), ggn=True, lr=0.05, damping=0.2, damping_start=None)
    ob = sven.Sven(b.parameters(), ggn=True, lr=0.05, damping=0.2, adaptive_damping=False)
    assert isinstance(ob.control, Tikhonov)
    for _ in range(5):
        oa.step(lambda: F.cross_entropy(a(x), y, reduction="none"))
        ob.step(lambda: F.cross_entropy(b(x), y, reduction="none"))
        assert oa.last_step is not None and oa.last_step.damping == 0.2 and oa.last_step.retries == 0
    torch.testing.assert_close(_params(a), _params(b), rtol=1e-10, atol=1e-12)


def test_ggn_with_a_trust_radius_caps_the_judged_step() -> None:
    m, x, y = _softmax_regression()
    opt = sven.Sven(m.parameters(), ggn=True, trust_radius=1e-3, weight_decay=0.0)  # the decay is outside the cap
    assert isinstance(opt.control, TrustRadius) and isinstance(opt.control.inner, CrossEntropyDamping)
    start = _params(m)
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    assert float((_params(m) - start).norm()) <= 1e-3 * (1 + 1e-9)


def test_a_stall_of_the_judged_step_warns() -> None:
    """Logits whose recorded derivative has the wrong sign: every try raises the cross-entropy, the damping climbs
    to its ceiling within the retries, and the stall warns (as the adaptive damping's does) instead of freezing
    the run in silence; every rejected try is undone."""
    m, x, y = _softmax_regression()
    start = _params(m)

    def closure() -> torch.Tensor:
        z = m(x)
        return F.cross_entropy((2 * z).detach() - z, y, reduction="none")  # the value of z, the derivative of -z

    opt = sven.Sven(m.parameters(), ggn=True, max_retries=40)
    with pytest.warns(RuntimeWarning, match="Sven stalled: every try was rejected"):
        opt.step(closure)
    info = opt.last_step
    assert info is not None and info.stalled and info.rejected
    assert torch.equal(_params(m), start)


def test_the_held_out_shapes_are_balanced_bounded_and_seeded() -> None:
    """``benchmarks.ce_heldout.shapes``: four balanced classes; noise-free pixels lie in [b, b + a] within
    [-0.2, 1.2] (background b in [-0.2, 0.2], brightness a in [0.5, 1]); the seed fixes the draw."""
    from benchmarks.ce_heldout import shapes

    x, y = shapes(64, seed=3, noise=0.0)
    assert x.shape == (64, 1, 16, 16) and y.shape == (64,)
    assert torch.bincount(y, minlength=4).tolist() == [16] * 4
    assert float(x.min()) >= -0.2 and float(x.max()) <= 1.2
    x2, y2 = shapes(64, seed=3, noise=0.0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(shapes(64, seed=4, noise=0.0)[0], x)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 7e2])
def test_the_screened_floors_are_scale_free_and_match_their_definitions(scale: float) -> None:
    """``benchmarks.ce_preset_grid.ScaledFloor``: relative to lambda_max, the mean floor is c tr(K) / (n lambda_max)
    and the quantile floor c lambda_(q) / lambda_max (the missing eigenvalues are zeros); multiplying every
    singular value by ``scale`` changes neither."""
    from types import SimpleNamespace

    from benchmarks.ce_preset_grid import ScaledFloor

    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=DT) * scale
    ctx = SimpleNamespace(F=SimpleNamespace(S=s), R=torch.zeros(8, dtype=DT))
    lam = (s / s[0]) ** 2  # 1, 1/4, 1/16, 1/64
    mean = ScaledFloor(3.0, "mean").relative_floor(ctx)
    assert mean == pytest.approx(3.0 * float(lam.sum()) / 8, rel=1e-12)
    # eight eigenvalues 0, 0, 0, 0, 1/64, 1/16, 1/4, 1: the 0.75-quantile lies between 1/16 and 1/4
    q = ScaledFloor(1.0, "quantile", q=0.75).relative_floor(ctx)
    assert 1 / 16 < q < 1 / 4
    assert q == pytest.approx(float(torch.quantile(torch.cat([lam, torch.zeros(4, dtype=DT)]), 0.75)), rel=1e-12)


# ----------------------------------------------------------------------------- the floor that starts low
def test_the_floor_doubles_on_a_plateau_up_to_its_cap() -> None:
    """Blocks of ``window`` batch losses: a block not ``gain`` below the previous one doubles the floor (and lifts
    the damping to it), a falling block keeps it, the cap stops it, and non-finite losses are not counted."""
    c = CrossEntropyDamping(0.1, start=0.025, window=4, gain=0.05)
    assert c.floor == c.damping == 0.025 and c.cap == 0.1
    seen = []
    for level in (1.0, 0.99, 0.5, 0.49, 0.2, 0.2):  # first block; plateau; falls; plateau; falls; plateau (capped)
        for v in (level, float("nan"), level, level, level):
            c.observe(v)
        seen.append(c.floor)
    assert seen == [0.025, 0.05, 0.05, 0.1, 0.1, 0.1]
    assert c.damping >= c.floor


def test_a_fall_just_short_of_the_gain_is_a_plateau() -> None:
    """The test is strict about the fraction: 4.9 % below the previous block doubles, 5.1 % does not."""
    for fall, doubled in ((0.049, True), (0.051, False)):
        c = CrossEntropyDamping(0.1, start=0.02, window=2, gain=0.05)
        for v in (1.0, 1.0, 1.0 - fall, 1.0 - fall):
            c.observe(v)
        assert (c.floor == 0.04) is doubled


def test_the_plateau_state_is_saved_and_restored() -> None:
    a = CrossEntropyDamping(0.1, start=0.025, window=4)
    for v in (1.0, 1.0, 1.0, 1.0, 0.99, 0.99):  # one block and half of the next
        a.observe(v)
    b = CrossEntropyDamping(0.1, start=0.025, window=4)
    b.load_state_dict(a.state_dict())
    assert all(isinstance(v, float) for v in a.state_dict().values())
    for c in (a, b):
        c.observe(0.99)
        c.observe(0.99)  # completes the second block: a plateau
    assert a.floor == b.floor == 0.05 and a.previous == pytest.approx(b.previous)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": 0.2}, r"`start` must lie in \(0, floor\] = \(0, 0.1\], got 0.2"),
        ({"start": 0.0}, r"`start` must lie in"),
        ({"window": 0}, r"`window` must be a positive integer, got 0"),
        ({"window": 2.5}, r"`window` must be a positive integer"),
        ({"gain": 1.0}, r"`gain` must lie in \[0, 1\), got 1.0"),
    ],
)
def test_the_plateau_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CrossEntropyDamping(0.1, **kwargs)


def test_damping_start_none_keeps_a_fixed_floor_and_numpy_scalars_are_taken() -> None:
    m = _model()
    fixed = sven.Sven(m.parameters(), ggn=True, damping_start=None)
    assert isinstance(fixed.control, CrossEntropyDamping)
    assert fixed.control.floor == fixed.control.cap == RULE["damping"]
    low = sven.Sven(m.parameters(), ggn=True, damping_start=np.float32(0.02), weight_decay=np.float64(0.0))
    assert low.control.floor == pytest.approx(0.02) and low.param_groups[0]["weight_decay"] == 0.0
    above = sven.Sven(m.parameters(), ggn=True, damping=0.05, damping_start=0.2)  # not below the cap: fixed
    assert above.control.floor == above.control.cap == 0.05
    with pytest.raises(ValueError, match=r"`damping_start` must be a non-negative float, got -1"):
        sven.Sven(m.parameters(), damping_start=-1)


def test_the_rule_sets_its_weight_decay_only_where_none_was_given() -> None:
    """No weight decay given: the rule's on every group when it switches (and ``ggn=True``'s from the start). A
    weight decay given anywhere, even 0, is the user's, and the rule leaves every group as it is."""
    x, y = _data()
    for params, want in (
        (lambda m: m.parameters(), [RULE["weight_decay"]]),
        (lambda m: [{"params": list(m.parameters()), "weight_decay": 0.0}], [0.0]),
    ):
        m = _model()
        opt = sven.Sven(params(m))
        assert [g["weight_decay"] for g in opt.param_groups] == [0.0]  # undecided before the first step
        opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))  # noqa: B023
        assert [g["weight_decay"] for g in opt.param_groups] == want
    m = _model()
    opt = sven.Sven(m.parameters(), weight_decay=0.0)
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    assert opt.config.ggn is True and opt.param_groups[0]["weight_decay"] == 0.0
    assert sven.Sven(_model().parameters(), ggn=True).param_groups[0]["weight_decay"] == RULE["weight_decay"]
    m = _model()
    opt = sven.Sven(m.parameters())
    opt.step(lambda: ((m(x) - 1.0) ** 2).sum(1))  # not cross-entropy: no rule, no weight decay
    assert opt.config.ggn is False and opt.param_groups[0]["weight_decay"] == 0.0


def test_a_batch_fitted_to_round_off_stalls_in_silence() -> None:
    """One batch of random labels fitted again and again: its cross-entropy reaches the rounding of the logits'
    log-sum-exp (about 1e-8 in float32), every later try is rejected, and that is convergence, not a stall: no
    warning, though the angle of the rows is not small. The same stall at a loss of order one still warns
    (``test_a_stall_of_the_judged_step_warns``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = sven.Sven(net.parameters())
    stalled = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(200):
            losses = opt.step(lambda: F.cross_entropy(net(x), y, reduction="none"))
            stalled += bool(opt.last_step is not None and opt.last_step.stalled)
    assert stalled > 0 and float(losses.mean()) <= 1e3 * torch.finfo(torch.float32).eps


def test_a_resumed_run_keeps_the_rule_and_its_floor() -> None:
    """``state_dict`` records what the first step decided, so a new optimizer that loads it makes the same decision
    before it loads the step control's state: the raised floor, the damping and the plateau's block carry over
    (before, the rule was decided again at the next step and its floor started over), and the groups keep the
    loaded ``lr`` (a scheduler's) instead of the rule's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    X, Y = torch.randn(640, 8), torch.randint(0, 3, (640,))
    opt = sven.Sven(net.parameters())
    for k in range(100):
        x, y = X[64 * (k % 10) : 64 * (k % 10 + 1)], Y[64 * (k % 10) : 64 * (k % 10 + 1)]
        opt.step(lambda: F.cross_entropy(net(x), y, reduction="none"))  # noqa: B023
    assert opt.control.floor > RULE["damping_start"]  # raised on a plateau within the 100 steps
    opt.param_groups[0]["lr"] = 0.25  # as a scheduler would
    sd = opt.state_dict()
    assert sd["sven"]["rule"] == 1.0
    twin = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    twin.load_state_dict(net.state_dict())
    opt2 = sven.Sven(twin.parameters())
    opt2.load_state_dict(sd)
    assert opt2.config.ggn is True and isinstance(opt2.control, CrossEntropyDamping)
    assert opt2.control.floor == opt.control.floor and opt2.control.damping == opt.control.damping
    assert opt2.param_groups[0]["lr"] == 0.25 and opt2.param_groups[0]["weight_decay"] == RULE["weight_decay"]
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.config.ggn is True and clone.control.floor == opt.control.floor
