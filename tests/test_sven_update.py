"""The update stage (:mod:`sven.update`): heavy-ball and Nesterov momentum, decoupled weight decay, per group;
exact against a hand-written reference, undone with a rejected step, resumed exactly, cycled by schedulers."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import sven
from sven.tasks import per_sample_mse
from sven.update import BUFFER


def _data(b: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 2, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.sin(3 * x[:, :1]) * x[:, 1:]


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _direction(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The plain Sven direction d at the model's parameters (a step of a fresh copy with lr = 1)."""
    probe = copy.deepcopy(model)
    before = _flat(probe)
    sven.Sven(probe.parameters(), lr=1.0, rank=6, jacobian="autograd", solver="svd", adaptive_damping=False).step(
        lambda: per_sample_mse(probe(x), y)
    )
    return before - _flat(probe)


def _set(model: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, model.parameters())


@pytest.mark.parametrize(("momentum", "nesterov", "wd"), [(0.9, False, 0.0), (0.5, True, 0.0), (0.8, False, 0.1)])
def test_matches_the_heavy_ball_reference(momentum: float, nesterov: bool, wd: float) -> None:
    x, y = _data()
    model, ref = _net(1), _net(1)
    lr = 0.3
    opt = sven.Sven(model.parameters(), lr=lr, rank=6, jacobian="autograd", solver="svd", adaptive_damping=False,
                    momentum=momentum, nesterov=nesterov, weight_decay=wd)  # fmt: skip
    buf = torch.zeros_like(_flat(ref))
    for _ in range(4):
        opt.step(lambda: per_sample_mse(model(x), y))
        theta = _flat(ref)
        d = _direction(ref, x, y)
        buf = momentum * buf + d
        step = d + momentum * buf if nesterov else buf
        _set(ref, theta - lr * step - lr * wd * theta)
        torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-9, atol=1e-11)


def test_group_options_are_per_group_and_validated() -> None:
    x, y = _data()
    model = _net(2)
    first, last = list(model[0].parameters()), list(model[2].parameters())
    opt = sven.Sven([{"params": first, "weight_decay": 0.5}, {"params": last}], lr=0.1, rank=6, momentum=0.9)
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    opt.step(lambda: per_sample_mse(model(x), y))
    assert all(BUFFER in opt.state[p] for p in model.parameters())
    for bad, msg in (({"momentum": 1.0}, r"`momentum` must be a float in \[0, 1\), got 1.0"),
                     ({"weight_decay": -1}, r"`weight_decay` must be a non-negative float, got -1"),
                     ({"nesterov": 1}, r"`nesterov` must be True or False, got 1")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], **bad})
        with pytest.raises(ValueError, match=msg):
            sven.Sven(model.parameters(), **bad)  # type: ignore[arg-type]


def test_a_rejected_step_leaves_parameters_and_buffers_unchanged() -> None:
    x, y = _data()
    model = _net(3)
    opt = sven.Sven(model.parameters(), lr=0.2, rank=6, momentum=0.9, weight_decay=0.1, adaptive_damping=True,
                    max_retries=1)  # fmt: skip
    closure = lambda: per_sample_mse(model(x), y)  # noqa: E731
    opt.step(closure)
    opt.step(closure)
    before = _flat(model)
    bufs = [opt.state[p][BUFFER].clone() for p in model.parameters()]
    calls = [0]

    def worse() -> torch.Tensor:  # every re-evaluation reports a much larger loss
        calls[0] += 1
        out = closure()
        return out if calls[0] == 1 else out * 1e6 + 1.0

    opt.step(worse)
    assert opt.last_step is not None and opt.last_step.rejected
    assert torch.equal(_flat(model), before)
    assert all(torch.equal(opt.state[p][BUFFER], b) for p, b in zip(model.parameters(), bufs))
    # check_step: a step that makes the loss non-finite is undone, buffers too
    check = sven.Sven(model.parameters(), lr=0.2, rank=6, momentum=0.9, check_step=True)
    check.step(closure)
    before = _flat(model)
    bufs = [check.state[p][BUFFER].clone() for p in model.parameters()]
    calls[0] = 0

    def nan_after() -> torch.Tensor:
        calls[0] += 1
        out = closure()
        return out if calls[0] == 1 else out * float("nan")

    with pytest.warns(RuntimeWarning, match="the loss after the step"):
        check.step(nan_after)
    assert torch.equal(_flat(model), before)
    assert all(torch.equal(check.state[p][BUFFER], b) for p, b in zip(model.parameters(), bufs))


@pytest.mark.parametrize("options", [{"variable_k": True}, {"trust_radius": 0.05}, {"adaptive_damping": True}])
def test_momentum_composes_with_the_policies(options: dict[str, object]) -> None:
    x, y = _data()
    model = _net(4)
    opt = sven.Sven(model.parameters(), lr=0.2, rank=6, momentum=0.5, **options)  # type: ignore[arg-type]
    closure = lambda: per_sample_mse(model(x), y)  # noqa: E731
    start = float(closure().detach().mean())
    for _ in range(5):
        opt.step(closure)
    assert float(closure().detach().mean()) < start and opt.skipped_steps == 0


def test_state_dict_resumes_momentum_exactly() -> None:
    x, y = _data()
    model = _net(5)
    closure = lambda m: lambda: per_sample_mse(m(x), y)  # noqa: E731
    kwargs = {"lr": 0.2, "rank": 6, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2, "jacobian": "autograd"}
    opt = sven.Sven(model.parameters(), **kwargs)  # type: ignore[arg-type]
    twin, fresh = copy.deepcopy(model), copy.deepcopy(model)
    for _ in range(3):
        opt.step(closure(model))
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    twin.load_state_dict(model.state_dict())
    fresh.load_state_dict(model.state_dict())
    opt2 = sven.Sven(twin.parameters(), **kwargs)  # type: ignore[arg-type]
    opt2.load_state_dict(sd)
    opt3 = sven.Sven(fresh.parameters(), **kwargs)  # type: ignore[arg-type]
    for _ in range(3):
        opt.step(closure(model))
        opt2.step(closure(twin))
        opt3.step(closure(fresh))
    assert torch.equal(_flat(model), _flat(twin))
    assert not torch.allclose(_flat(model), _flat(fresh))  # the buffers mattered


@pytest.mark.parametrize("kind", ["onecycle", "cyclic"])
def test_schedulers_that_cycle_momentum_work_with_their_defaults(kind: str) -> None:
    x, y = _data()
    model = _net(6)
    opt = sven.Sven(model.parameters(), lr=0.1, rank=6)
    sched: torch.optim.lr_scheduler.LRScheduler
    if kind == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10)
    else:
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.2, step_size_up=5)
    moms = []
    for _ in range(10):
        opt.step(lambda: per_sample_mse(model(x), y))
        sched.step()
        moms.append(opt.param_groups[0]["momentum"])
    assert len(set(moms)) > 2 and all(0.0 < m < 1.0 for m in moms)
    assert torch.isfinite(_flat(model)).all() and opt.skipped_steps == 0


def test_decay_terms_and_their_application():
    """:func:`sven.update.decay` and :func:`~sven.update.apply_decay`: :math:`\\theta - \\eta w \\theta` per block, with
    rates and learning rates that differ between blocks, a block without decay, a gathered (``index``) block and a
    float64 block beside float32 ones; nothing at all without decay."""
    from sven.params import ParamBlock
    from sven.update import apply_decay, decay

    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(6, generator=g, dtype=torch.float64),
          torch.randn(7, generator=g)]  # fmt: skip
    index = torch.tensor([0, 2, 5])
    blocks = [ParamBlock(ps[0], 0.5, 0, 12, weight_decay=0.1), ParamBlock(ps[1], 0.25, 12, 17, weight_decay=0.3),
              ParamBlock(ps[2], 0.5, 17, 23, weight_decay=0.1), ParamBlock(ps[3], 1.0, 23, 26, index, weight_decay=0.2),
              ]  # fmt: skip
    want = [p - b.lr * b.weight_decay * p for p, b in zip(ps, blocks)]
    want[3] = ps[3].clone()
    want[3][index] -= 0.2 * ps[3][index]
    assert decay([ParamBlock(ps[0], 0.5, 0, 12)]) is None
    terms = decay([*blocks, ParamBlock(torch.ones(2), 1.0, 26, 28)])
    assert terms is not None and terms[-1] is None
    with torch.no_grad():
        apply_decay(blocks, terms[:-1])
    for p, w in zip(ps, want):
        assert p.dtype == w.dtype
        torch.testing.assert_close(p, w, rtol=4 * torch.finfo(p.dtype).eps, atol=0.0)
