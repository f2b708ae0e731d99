"""``sven.losses.cross_entropy``: the Gauss--Newton rows of softmax cross-entropy.

Every property is checked against a quantity derived independently here:
the gradient of ``torch.nn.functional.cross_entropy`` by autograd, the
Hessian ``diag(p) - p p^T`` and its factor ``A`` built densely, and the GGN
step ``-(J^T H J)^+ J^T (p - q)`` from ``numpy.linalg.lstsq``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sven
from sven.losses import cross_entropy, cross_entropy_targets

DT = torch.float64


def _rows_jacobian(logits: torch.Tensor, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' values (flattened) and their Jacobian with respect to the logits (rows x logits)."""
    rows = fn(logits).detach().reshape(-1)
    J = torch.autograd.functional.jacobian(lambda z: fn(z).reshape(-1), logits)
    return rows, J.reshape(rows.numel(), logits.numel())


def _ce_grad(logits: torch.Tensor, target: torch.Tensor, **kw) -> torch.Tensor:
    z = logits.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(z, target, reduction="sum", **kw), z)
    return g.reshape(-1)


def _factor(p: torch.Tensor) -> torch.Tensor:
    """``A = diag(sqrt p) - p sqrt(p)^T`` of one sample."""
    return torch.diag(p.sqrt()) - p[:, None] * p.sqrt()[None, :]


@st.composite
def problems(draw: st.DrawFn):
    """Random logits (scale up to 30: near one-hot probabilities), targets and options."""
    B = draw(st.integers(1, 5))
    C = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, C, generator=g, dtype=DT)
    kind = draw(st.sampled_from(["index", "probs"]))
    if kind == "index":
        target = torch.randint(0, C, (B,), generator=g)
    else:
        target = torch.softmax(torch.randn(B, C, generator=g, dtype=DT), -1)
    kw = {}
    if draw(st.booleans()):
        kw["weight"] = torch.rand(C, generator=g, dtype=DT) + 0.1
    if draw(st.booleans()):
        kw["label_smoothing"] = draw(st.sampled_from([0.05, 0.3]))
    if kind == "index" and draw(st.booleans()):
        target[0] = -100
    return logits, target, kw


@given(problems(), st.sampled_from([None, 0, 1, 2]))
def test_gradient_is_the_cross_entropy_gradient(problem, classes):  # classes=1 is the default
    """``M^T R`` is the gradient of ``F.cross_entropy(..., reduction='sum')`` in the logits, for every option."""
    logits, target, kw = problem
    R, J = _rows_jacobian(logits, lambda z: cross_entropy(z, target, classes=classes, **kw))
    g = _ce_grad(logits, target, **kw)
    assert torch.isfinite(R).all()
    torch.testing.assert_close(J.T @ R, g, atol=1e-9 * (1 + g.abs().max()), rtol=1e-7)


@given(problems())
def test_exact_rows_are_the_factor_of_the_hessian(problem):
    """All classes: the Jacobian is ``sqrt(s) A^T``, the value ``sqrt(s) A^+ (p - q)``, ``M^T M = s H``."""
    logits, target, kw = problem
    R, J = _rows_jacobian(logits, lambda z: cross_entropy(z, target, classes=None, **kw))
    q, s = cross_entropy_targets(logits, target, **kw)
    B, C = logits.shape
    p = torch.softmax(logits, -1)
    for i in range(B):
        A = _factor(p[i])
        blk = J[i * C : (i + 1) * C, i * C : (i + 1) * C]
        torch.testing.assert_close(blk, s[i].sqrt() * A.T)
        H = torch.diag(p[i]) - torch.outer(p[i], p[i])
        torch.testing.assert_close(blk.T @ blk, s[i] * H, atol=1e-12, rtol=1e-9)
        if bool(p[i].min() > 1e-12):  # A^+ (p - q) from a dense pseudoinverse, away from underflow
            want = s[i].sqrt() * torch.linalg.pinv(A, rtol=1e-10) @ (p[i] - q[i])  # rank C - 1: drop the null direction
            torch.testing.assert_close(R[i * C : (i + 1) * C], want, atol=1e-8 * (1 + want.abs().max()), rtol=1e-6)


@given(problems(), st.integers(0, 4))
def test_fewer_classes_restrict_the_curvature(problem, classes):
    """``classes=k``: ``k + 1`` rows; the curvature is below the full one (PSD) and equals it when ``k >= C - 1``."""
    logits, target, kw = problem
    B, C = logits.shape
    _, Jf = _rows_jacobian(logits, lambda z: cross_entropy(z, target, classes=None, **kw))
    Rk, Jk = _rows_jacobian(logits, lambda z: cross_entropy(z, target, classes=classes, **kw))
    assert Rk.numel() == B * min(classes + 1, C)
    gap = torch.linalg.eigvalsh(Jf.T @ Jf - Jk.T @ Jk)
    scale = 1 + float(torch.linalg.eigvalsh(Jf.T @ Jf).abs().max())
    assert float(gap.min()) >= -1e-9 * scale
    if classes >= C - 1:
        assert float(gap.abs().max()) <= 1e-9 * scale


@given(problems())
def test_one_row_is_the_gradient_direction(problem):
    """``classes=0``: one row per sample, value ``||r|| = sqrt(chi^2(q || p))``, Jacobian ``grad l / ||r||``."""
    logits, target, kw = problem
    B, C = logits.shape
    R, J = _rows_jacobian(logits, lambda z: cross_entropy(z, target, classes=0, **kw))
    full = cross_entropy(logits, target, classes=None, **kw)
    torch.testing.assert_close(R, full.norm(dim=1))
    g = _ce_grad(logits, target, **kw).reshape(B, C)
    for i in range(B):
        if float(R[i]) > 1e-6 * float(full[i].abs().max() + 1):
            torch.testing.assert_close(J[i].reshape(B, C)[i], g[i] / R[i], atol=1e-9, rtol=1e-7)


def _ggn_step(model, x, y) -> np.ndarray:
    """``-(sum_i J_i^T H_i J_i)^+ J^T (p - q)``, from the per-sample logit Jacobians by autograd."""
    params = list(model.parameters())
    z = model(x)
    B, C = z.shape
    rows = []
    for i in range(B):
        for c in range(C):
            g = torch.autograd.grad(z[i, c], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    Jz = torch.stack(rows).reshape(B, C, -1).detach()
    zd = z.detach()
    p = torch.softmax(zd, -1)
    q = F.one_hot(y, C).to(DT)
    G = torch.zeros(Jz.shape[-1], Jz.shape[-1], dtype=DT)
    grad = torch.zeros(Jz.shape[-1], dtype=DT)
    for i in range(B):
        H = torch.diag(p[i]) - torch.outer(p[i], p[i])
        G += Jz[i].T @ H @ Jz[i]
        grad += Jz[i].T @ (p[i] - q[i])
    return -np.linalg.lstsq(G.numpy(), grad.numpy(), rcond=1e-10)[0]


@pytest.mark.parametrize("jacobian", ["gram", "autograd"])
def test_sven_step_is_the_ggn_step(jacobian, one_thread):
    """The plain Sven step (lr 1, no truncation) on all ``C`` rows is the minimum-norm GGN step, on both routes."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    want = _ggn_step(model, x, y)  # P = 67 > B (C - 1) = 12: the GGN is singular
    before = torch.cat([t.detach().reshape(-1) for t in model.parameters()])
    opt = sven.Sven(model.parameters(), lr=1.0, rtol=1e-10, residuals=True, adaptive_damping=False, jacobian=jacobian)
    opt.step(lambda: cross_entropy(model(x), y, classes=None))
    got = (torch.cat([t.detach().reshape(-1) for t in model.parameters()]) - before).numpy()
    np.testing.assert_allclose(got, want, atol=1e-8 * np.abs(want).max(), rtol=1e-6)
    assert opt.last_step.rank == 6 * 2  # C - 1 directions per sample: ker A^T = span(1)


def test_preset_trains_a_classifier(one_thread):
    """``sven.losses.optimizer``: the training loss falls, no step is skipped, overrides apply."""
    torch.manual_seed(0)
    x = torch.randn(64, 10)
    y = (x @ torch.randn(10, 4)).argmax(1)  # learnable labels
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = sven.losses.optimizer(model.parameters())
    assert (opt.config.damping, opt.config.adaptive_damping, opt.config.residuals) == (0.1, False, True)
    assert sven.losses.optimizer(model.parameters(), lr=0.25).param_groups[0]["lr"] == 0.25
    before = float(F.cross_entropy(model(x), y).detach())
    for _ in range(10):
        opt.step(lambda: cross_entropy(model(x), y, classes=2))
    assert float(F.cross_entropy(model(x), y).detach()) < 0.5 * before
    assert opt.skipped_steps == 0


def test_positions_and_ignore_index():
    """``(B, C, T)`` logits (tokens): rows ``(B, C', T)``; ignored positions give zero rows."""
    torch.manual_seed(0)
    z = torch.randn(3, 5, 4, dtype=DT)
    t = torch.randint(0, 5, (3, 4))
    t[1, 2] = -100
    for classes in (None, 1):
        R, J = _rows_jacobian(z, lambda zz, k=classes: cross_entropy(zz, t, classes=k))
        rows = cross_entropy(z, t, classes=classes)
        assert rows.shape == (3, 5 if classes is None else 2, 4)
        assert bool((rows[1, :, 2] == 0).all())
        torch.testing.assert_close(J.T @ R, _ce_grad(z, t))


def test_underflowed_probabilities_stay_finite():
    """A target class with probability far below the float32 epsilon: finite rows, the other rows unchanged."""
    z = torch.tensor([[0.0, 200.0, -50.0], [3.0, 0.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    for classes in (None, 1):
        rows = cross_entropy(z, y, classes=classes)
        assert torch.isfinite(rows).all()
        (g,) = torch.autograd.grad(rows.sum(), z)
        assert torch.isfinite(g).all()
    ok = cross_entropy(z.detach().double(), y, classes=None)[1]
    p = torch.softmax(z.detach()[1].double(), -1)
    torch.testing.assert_close(ok, (p - F.one_hot(y[1], 3).double()) / p.sqrt())


def test_numpy_scalars_are_accepted():
    z = torch.randn(4, 3, dtype=DT)
    y = torch.randint(0, 3, (4,))
    a = cross_entropy(z, y, classes=np.int64(1), label_smoothing=np.float32(0.25), ignore_index=np.int64(-1))
    b = cross_entropy(z, y, classes=1, label_smoothing=0.25, ignore_index=-1)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": torch.tensor([0, 3])}, ValueError, r"`target` class indices must lie in \[0, 3\)"),
        ({"target": torch.tensor([0, -1])}, ValueError, r"`target` class indices must lie in \[0, 3\)"),
        ({"target": torch.tensor([0, 1, 2])}, ValueError, r"`target` as class indices must have shape \(2,\)"),
        ({"target": torch.zeros(2, 4)}, ValueError, r"`target` as class probabilities must have the logits' shape"),
        ({"target": -torch.ones(2, 3)}, ValueError, r"`target` probabilities must be finite and non-negative"),
        ({"target": torch.tensor([True, False])}, TypeError, r"`target` must hold integer class indices"),
        ({"target": [0, 1]}, TypeError, r"`target` must be a tensor"),
        ({"logits": torch.zeros(3)}, ValueError, r"`logits` must have shape \(B, C\)"),
        ({"logits": torch.zeros(2, 3, dtype=torch.long)}, TypeError, r"`logits` must be a floating-point tensor"),
        ({"weight": torch.ones(4)}, ValueError, r"`weight` must be a tensor of shape \(3,\)"),
        ({"weight": -torch.ones(3)}, ValueError, r"`weight` must hold finite, non-negative"),
        ({"label_smoothing": 1.5}, ValueError, r"`label_smoothing` must be a float in \[0, 1\]"),
        ({"classes": -1}, ValueError, r"`classes` must be a non-negative integer"),
        ({"classes": 1.5}, ValueError, r"`classes` must be a non-negative integer"),
        ({"ignore_index": 0.5}, ValueError, r"`ignore_index` must be an integer"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = {"logits": torch.zeros(2, 3), "target": torch.tensor([0, 1]), **kwargs}
    with pytest.raises(error, match=match):
        cross_entropy(args.pop("logits"), args.pop("target"), **args)


def test_forgetting_residuals_true_is_an_error():
    """The rows are residuals: without ``residuals=True`` Sven refuses the ``(B, C)`` output and says how to fix it."""
    model = torch.nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    before = [t.detach().clone() for t in model.parameters()]
    with pytest.raises(ValueError, match="residuals=True"):
        sven.Sven(model.parameters()).step(lambda: cross_entropy(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
