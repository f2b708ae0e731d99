"""Habits from ``torch.optim`` training loops, as a user writes them with Sven.

Each habit either works or says so: a ``backward()`` before ``step`` warns,
``clip_grad_norm_`` after ``step`` has nothing to clip (``trust_radius`` is the
equivalent, and caps the step), a closure that calls ``backward()`` itself
(L-BFGS style, or Lightning's automatic optimisation) gets advice, and a
model or closure compiled with ``torch.compile`` trains with exactly the uncompiled step.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sven


class _Net(nn.Module):
    """A user-defined module (``model.compile()`` leaves a bare ``nn.Sequential`` uncompiled)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(2, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def _problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _Net().double()
    x = torch.rand(16, 2, generator=g, dtype=torch.float64) * 2 - 1
    return model, x, torch.sin(3 * x[:, :1]) * x[:, 1:]


def _losses(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum(dim=-1)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------------- .grad: backward() and clipping
@pytest.mark.usefixtures("one_thread")
def test_backward_before_step_warns_and_the_grad_is_ignored() -> None:
    model, x, y = _problem()
    twin = copy.deepcopy(model)
    opt = sven.Sven(model.parameters(), adaptive_damping=False)
    ref = sven.Sven(twin.parameters(), adaptive_damping=False)
    _losses(model, x, y).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    msg = r"Sven\.step ignores `\.grad`, but parameter #0 of shape \(8, 2\) has one .*trust_radius"
    with pytest.warns(RuntimeWarning, match=msg):
        opt.step(lambda: _losses(model, x, y))
    ref.step(lambda: _losses(twin, x, y))
    # the step is the one without backward(), and .grad is neither read nor written
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


@pytest.mark.usefixtures("one_thread")
def test_no_grad_warning_without_backward_or_after_zero_grad() -> None:
    model, x, y = _problem()
    opt = sven.Sven(model.parameters())
    _losses(model, x, y).mean().backward()
    opt.zero_grad()  # set_to_none: nothing left for step to ignore
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.step(lambda: _losses(model, x, y))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.usefixtures("one_thread")
def test_clip_grad_norm_after_step_has_nothing_to_clip() -> None:
    model, x, y = _problem()
    opt = sven.Sven(model.parameters())
    opt.step(lambda: _losses(model, x, y))
    after = _flat(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert float(norm) == 0.0  # as documented: Sven writes no .grad, so there is no gradient norm
    assert torch.equal(_flat(model), after)
    assert opt.last_step is not None and opt.last_step.step_norm > 0  # what to log instead


@pytest.mark.usefixtures("one_thread")
def test_trust_radius_is_the_clipping_equivalent() -> None:
    model, x, y = _problem(1)
    twin = copy.deepcopy(model)
    start = _flat(model)
    free = sven.Sven(twin.parameters(), lr=0.5, adaptive_damping=False)
    free.step(lambda: _losses(twin, x, y))
    full = _flat(twin) - start
    radius = 0.25 * float(full.norm())
    opt = sven.Sven(model.parameters(), lr=0.5, adaptive_damping=False, trust_radius=radius)
    opt.step(lambda: _losses(model, x, y))
    capped = _flat(model) - start
    assert opt.last_step is not None and opt.last_step.capped
    # the same direction, shortened to the radius: ||delta theta|| = r
    torch.testing.assert_close(capped, full * (radius / float(full.norm())), rtol=1e-9, atol=1e-12)
    assert opt.last_step.step_norm == pytest.approx(radius, rel=1e-9)


# --------------------------------------------------------------------------- closures that call backward()
@pytest.mark.usefixtures("one_thread")
def test_a_lightning_style_automatic_closure_gets_advice() -> None:
    """Lightning's automatic mode: the closure zeroes the gradients, calls backward() and returns the mean."""
    model, x, y = _problem()
    opt = sven.Sven(model.parameters())
    before = _flat(model)

    def automatic() -> torch.Tensor:
        opt.zero_grad()
        loss = _losses(model, x, y).mean()
        loss.backward()
        return loss

    advice = r"the closure called backward\(\).*must not call backward\(\).*automatic_optimization = False"
    with pytest.raises(ValueError, match=advice) as info:
        opt.step(automatic)
    assert "returned a scalar loss" in str(info.value.__cause__)  # the original error, chained
    assert torch.equal(_flat(model), before)


@pytest.mark.usefixtures("one_thread")
def test_backward_on_the_per_sample_losses_gets_advice() -> None:
    """A closure that returns the per-sample losses but still calls backward() on them (Lightning's, unreduced)."""
    model, x, y = _problem()
    opt = sven.Sven(model.parameters())

    def closure() -> torch.Tensor:
        losses = _losses(model, x, y)
        losses.backward()
        return losses

    with pytest.raises(RuntimeError, match=r"non-scalar tensor without `grad_outputs`.*must not call backward"):
        opt.step(closure)


@pytest.mark.usefixtures("one_thread")
def test_a_closure_error_without_backward_is_left_alone() -> None:
    model, x, y = _problem()
    opt = sven.Sven(model.parameters())
    with pytest.raises(ValueError, match="returned a scalar loss") as info:
        opt.step(lambda: _losses(model, x, y).mean())
    assert "backward" not in str(info.value)


# --------------------------------------------------------------------------- torch.compile
class _Counting:
    """A ``torch.compile`` backend that counts compilations and runs the captured graph as is."""

    def __init__(self) -> None:
        self.compiled = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs: Any) -> Callable[..., Any]:
        self.compiled += 1
        return gm.forward


def _compiled(how: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, backend: Any) -> Callable[[], Any]:
    if how == "torch.compile(model)":
        compiled = torch.compile(model, backend=backend)
        return lambda: _losses(compiled, x, y)
    if how == "model.compile()":
        model.compile(backend=backend)
        return lambda: _losses(model, x, y)
    return torch.compile(lambda: _losses(model, x, y), backend=backend)  # a compiled closure


def _our_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """Sven's warnings (the Gram fallback's) and torch's about global hooks under torch.compile."""
    texts = [str(w.message) for w in caught]
    return [t for t in texts if re.search(r"Sven|in place|global hooks", t)]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()", "compiled closure"])
@pytest.mark.parametrize("route", ["auto", "gram", "hooks", "autograd", "matfree"])
def test_a_compiled_model_gets_the_uncompiled_step(how: str, route: str) -> None:
    torch._dynamo.reset()
    model, x, y = _problem()
    twin = copy.deepcopy(model)
    backend = _Counting()
    closure = _compiled(how, model, x, y, backend)
    opt = sven.Sven(model.parameters(), jacobian=route)
    ref = sven.Sven(twin.parameters(), jacobian=route)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            got = opt.step(closure)
            want = ref.step(lambda: _losses(twin, x, y))
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert _our_warnings(caught) == []
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-12, atol=1e-14)
    assert backend.compiled == 0  # the step ran the original code
    # outside step the compiled code runs again (the stance is put back)
    with torch.no_grad():
        torch.testing.assert_close(closure(), _losses(twin, x, y))
    assert backend.compiled >= 1


def test_the_eager_switch_is_undone_when_its_block_raises() -> None:
    """``sven._compile.eager`` puts back the stance and the warning filters, also after an error in the block."""
    from sven._compile import eager

    torch._dynamo.reset()
    backend = _Counting()
    f = torch.compile(lambda t: t * 2.0, backend=backend)
    filters = list(warnings.filters)
    with pytest.raises(ValueError, match="inside"):
        with eager():
            f(torch.ones(3))
            raise ValueError("inside")
    assert backend.compiled == 0 and warnings.filters == filters
    with eager(), eager():  # nested: the inner block restores the outer's stance
        f(torch.ones(3))
    assert backend.compiled == 0 and warnings.filters == filters
    f(torch.ones(3))
    assert backend.compiled == 1


def test_the_eager_switch_puts_back_a_stance_set_through_the_public_api() -> None:
    """``eager`` swaps TorchDynamo's stance itself (without ``set_stance``'s import): what the public API set before
    is what stands after, and the public API's own switch still nests around it."""
    from torch._dynamo import eval_frame

    from sven._compile import eager

    before = eval_frame._stance
    with torch.compiler.set_stance("eager_on_recompile"):
        outer = eval_frame._stance
        with eager():
            assert eval_frame._stance.stance == "force_eager"
        assert eval_frame._stance is outer and outer.stance == "eager_on_recompile"
    assert eval_frame._stance is before


@pytest.mark.usefixtures("one_thread")
def test_a_model_compiled_with_inductor_trains() -> None:
    """The default backend: its compiled backward cannot take the batched tensors of the exact Jacobian."""
    torch._dynamo.reset()
    model, x, y = _problem(2)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model)
    opt = sven.Sven(compiled.parameters(), jacobian="autograd")
    ref = sven.Sven(twin.parameters(), jacobian="autograd")
    losses = []
    for _ in range(5):
        losses.append(float(opt.step(lambda: _losses(compiled, x, y)).mean()))
        ref.step(lambda: _losses(twin, x, y))
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-12, atol=1e-14)
    assert losses[-1] < losses[0]


@pytest.mark.usefixtures("one_thread")
def test_the_seed_api_with_a_compiled_model_gets_the_uncompiled_step() -> None:
    from sven.nn import SvenWrapper
    from sven.opt import Sven as SeedSven

    torch._dynamo.reset()
    model, x, y = _problem(3)
    twin = copy.deepcopy(model)
    backend = _Counting()
    loss_fn = lambda pred, target: ((pred - target) ** 2).sum(dim=-1)  # noqa: E731
    wrapped = SvenWrapper(torch.compile(model, backend=backend), loss_fn, "cpu")
    reference = SvenWrapper(twin, loss_fn, "cpu")
    opt, ref = SeedSven(wrapped, 0.1, 8, 1e-3), SeedSven(reference, 0.1, 8, 1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            got, _ = wrapped.loss_and_grad((x, y))
            want, _ = reference.loss_and_grad((x, y))
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
            opt.step()
            ref.step()
    assert _our_warnings(caught) == []
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-12, atol=1e-14)
    assert backend.compiled == 0


def test_warnings_from_inside_step_name_the_callers_line() -> None:
    """A warning raised deep inside ``opt.step`` (the step control, the route's fallback, a skipped step, ignored
    ``.grad``) is attributed to the user's ``opt.step(...)`` line, past Sven's frames and torch.optim's hooks."""
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    def stall() -> None:
        sven.Sven(m.parameters(), ggn=True, max_retries=40).step(
            lambda: F.cross_entropy((2 * m(x)).detach() - m(x), y, reduction="none"))  # fmt: skip

    def fallback() -> None:
        sven.Sven(bn.parameters()).step(lambda: ((bn(x) - 1) ** 2).sum(1))

    def skipped() -> None:
        sven.Sven(m.parameters()).step(lambda: (m(x) * float("nan")).sum(1))

    def ignored_grad() -> None:
        m(x).sum().backward()
        sven.Sven(m.parameters()).step(lambda: (m(x) ** 2).sum(1))
        m.zero_grad(set_to_none=True)

    for case in (stall, fallback, skipped, ignored_grad):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case()
        assert caught, case.__name__
        assert all(w.filename == __file__ for w in caught), [(w.filename, str(w.message)[:40]) for w in caught]
