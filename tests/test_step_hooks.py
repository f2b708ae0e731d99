"""``Sven.step`` skips ``torch.optim``'s step wrapper only where nothing observes it (``sven/_step_hooks.py``)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import sven

F64 = torch.float64


def _fit() -> tuple[torch.nn.Parameter, sven.Sven, Any]:
    x = torch.nn.Parameter(torch.tensor([1.0, 0.5], dtype=F64))
    t = torch.linspace(0, 1, 20, dtype=F64)
    y = 2.0 * torch.exp(-3.0 * t)
    return x, sven.Sven([x], residuals=True), lambda: x[0] * torch.exp(-x[1] * t) - y


def test_the_step_is_not_wrapped_again_by_the_constructor() -> None:
    _, opt, _ = _fit()
    assert type(opt).step is sven.Sven.step and getattr(sven.Sven.step, "hooked", False)


def test_step_hooks_run_in_order_around_the_step() -> None:
    _, opt, closure = _fit()
    seen: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, k: seen.append(f"pre {o.state_dict()['sven']['steps']}")),
        opt.register_step_post_hook(lambda o, a, k: seen.append(f"post {o.state_dict()['sven']['steps']}")),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append("global post")),
    ]
    try:
        opt.step(closure)
    finally:
        for h in handles:
            h.remove()
    assert seen == ["global pre", "pre 0", "post 1", "global post"]
    opt.step(closure)  # (the hooks removed: nothing more)
    assert len(seen) == 4


def test_a_pre_hook_may_replace_the_arguments() -> None:
    _, opt, closure = _fit()
    calls: list[int] = []

    def counted() -> torch.Tensor:
        calls.append(1)
        return closure()

    handle = opt.register_step_pre_hook(lambda o, a, k: ((a[0], counted), k))  # (torch.optim: a[0] is the optimizer)
    try:
        opt.step(closure)
    finally:
        handle.remove()
    assert calls  # the step ran the closure the hook gave


def test_a_profiler_sees_the_step() -> None:
    _, opt, closure = _fit()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step(closure)
    assert any(e.name == "Optimizer.step#Sven.step" for e in prof.events())
