"""Judging only every k-th step of the loss rule's control (``CrossEntropyDamping(judge_every=k, calm=n)``).

The rule: the first ``calm`` steps are judged; once ``calm`` judged steps in a row were calm (first try, the
damping at the floor, gain ratio >= 1/2) only every ``judge_every``-th step is judged, and a judged step that is
not calm (a rejected try, or rho < 1/2) makes every step judged again. A fake step context dictates each
judged try's gain ratio; the softmax regression checks the rule inside ``sven.Sven``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sven
from sven.config import JUDGE_EVERY
from sven.control import JUMP, CrossEntropyDamping, Evaluator, StepContext

DT = torch.float64
FLOOR = 0.1


class Script:
    """A step context whose judged tries have the gain ratios of ``rhos``, in order.

    One row, ``R = [1]``, a predicted change ``M d = [1]``: the predicted fall of the loss is ``1/2``, and a
    loss ``before - rho / 2`` after the try (from the loss ``before`` before it) gives the gain ratio ``rho``.
    """

    def __init__(self, rhos: list[float]) -> None:
        self.rhos: Iterator[float] = iter(rhos)
        self.applied = 0.0  # the sum of the applied steps (restored ones taken back)
        self.undone = 0

    def ctx(self, before: float = 1.0) -> StepContext:
        def rows() -> torch.Tensor:
            return torch.tensor([before - next(self.rhos) / 2], dtype=DT)

        def apply(d: torch.Tensor, sign: float) -> None:
            self.applied += sign * float(d.sum())

        def save() -> object:
            kept = self.applied

            def restore() -> None:
                self.applied, self.undone = kept, self.undone + 1

            return restore

        return StepContext(
            F=None, R=torch.ones(1, dtype=DT), loss=lambda: before, direction=lambda lam: torch.ones(1, dtype=DT),
            apply=apply, predict=lambda d: torch.ones(1, dtype=DT), norm=lambda d: float(d.norm()), save=save,
            reject=lambda: None, evaluate=Evaluator(rows, None),
        )  # type: ignore[arg-type]  # fmt: skip


def judged_steps(control: CrossEntropyDamping, script: Script, steps: int) -> list[bool]:
    """Run ``steps`` steps; for each, whether it was judged (its gain ratio set)."""
    return [control.run(script.ctx()).gain_ratio is not None for _ in range(steps)]


def test_every_step_is_judged_by_default() -> None:
    c = CrossEntropyDamping(FLOOR)
    assert c.judge_every == 1
    assert judged_steps(c, Script([0.9] * 40), 40) == [True] * 40


def test_the_first_calm_steps_are_judged_then_every_kth() -> None:
    c = CrossEntropyDamping(FLOOR, judge_every=3, calm=4)
    s = Script([0.9] * 40)
    assert judged_steps(c, s, 13) == [True] * 4 + [False, False, True] * 3
    assert s.applied == 13 and s.undone == 0  # the unjudged steps are applied, none undone


def test_a_rejected_try_at_a_judged_step_is_undone_and_every_step_is_judged_again() -> None:
    """The 8th step (judged) has a first try that raises the loss (rho < 0): caught there, undone and retried
    more damped; the count restarts, so the next ``calm`` steps are judged before the next skip."""
    c = CrossEntropyDamping(FLOOR, judge_every=3, calm=2)
    rhos = [0.9, 0.9] + [0.9] + [-1.0, 0.9] + [0.9] * 20  # steps 1-2, step 5, step 8 (two tries), then on
    s = Script(rhos)
    seen = judged_steps(c, s, 8)
    assert seen == [True, True, False, False, True, False, False, True]
    assert s.undone == 1 and s.applied == 8 and c.calmed == 0  # 8 steps kept, 1 try undone
    assert judged_steps(c, s, 6) == [True, True, False, False, True, False]


def test_a_damping_above_the_floor_is_judged() -> None:
    """A rejected try doubles the damping; while it stays above the floor every step is judged, although each
    has rho >= 1/2 (0.6: the factor 1 - 0.2^3 lowers it by 0.8 %); back at the floor, skipping resumes."""
    c = CrossEntropyDamping(FLOOR, judge_every=2, calm=1)
    s = Script([-1.0, 0.6, 0.6, 0.6, 0.9] + [0.9] * 10)
    assert judged_steps(c, s, 3) == [True] * 3 and c.damping > FLOOR  # the first step took two tries
    assert judged_steps(c, s, 5) == [True, True, False, True, False]  # to the floor; one calm; then every 2nd


@pytest.mark.parametrize("rho", [0.3, 0.49])
def test_a_low_gain_ratio_restarts_the_count(rho: float) -> None:
    """rho in (0, 1/2) is accepted but raises the damping (Madsen--Nielsen factor 1 - (2 rho - 1)^3 > 1):
    the next steps are judged again."""
    c = CrossEntropyDamping(FLOOR, judge_every=4, calm=2)
    s = Script([0.9, 0.9, rho] + [0.9] * 20)
    assert judged_steps(c, s, 6) == [True, True, False, False, False, True]
    assert c.damping > FLOOR
    # the next try starts above the floor (judged, not calm: back to the floor), then ``calm`` calm ones, a skip
    assert judged_steps(c, s, 4) == [True, True, True, False]


def test_a_jump_of_the_batch_loss_is_judged() -> None:
    """A batch loss before the step above ``JUMP`` times the running level (an unjudged step may have hurt) is
    judged where the step could skip; judged calm, the skipping goes on. Just below the jump it skips."""
    c = CrossEntropyDamping(FLOOR, judge_every=4, calm=2)
    s = Script([0.9] * 20)
    assert judged_steps(c, s, 3) == [True, True, False]
    assert c.level == pytest.approx(1.0)
    assert c.run(s.ctx(before=1.01 * JUMP)).gain_ratio is not None  # judged, calm
    assert c.run(s.ctx()).gain_ratio is None  # the level rose to about 1.1: 1 is no jump
    level = c.level
    assert c.run(s.ctx(before=0.99 * JUMP * level)).gain_ratio is None


def test_the_state_is_saved_and_restored_mid_count() -> None:
    a = CrossEntropyDamping(FLOOR, judge_every=4, calm=3)
    judged_steps(a, Script([0.9] * 5), 5)  # three judged, two skipped
    state = a.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    b = CrossEntropyDamping(FLOOR, judge_every=4, calm=3)
    b.load_state_dict(state)
    assert judged_steps(a, Script([0.9] * 9), 9) == judged_steps(b, Script([0.9] * 9), 9)
    fresh = CrossEntropyDamping(FLOOR, judge_every=4, calm=3)
    assert judged_steps(fresh, Script([0.9] * 2), 2) == [True, True]  # without the state: judged


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"judge_every": 0}, r"`judge_every` must be a positive integer, got 0"),
        ({"judge_every": 2.5}, r"`judge_every` must be a positive integer"),
        ({"judge_every": True}, r"`judge_every` must be a positive integer"),
        ({"calm": 0}, r"`calm` must be a positive integer, got 0"),
    ],
)
def test_the_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CrossEntropyDamping(FLOOR, **kwargs)


# ----------------------------------------------------------------------------- inside sven.Sven
def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Linear(6, 4).to(DT)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen, dtype=DT)
    return m, x, torch.randint(0, 4, (32,), generator=gen)


def test_unjudged_steps_are_the_judged_steps_while_rho_stays_above_one_half() -> None:
    """Short steps (lr 0.05) of softmax regression: every judged rho is near 1, so the damping stays at the
    floor, and a judged step applies the same direction as an unjudged one: the trajectories agree to round-off,
    while the unjudged steps call the closure once instead of twice."""
    runs = {}
    for k in (1, 3):
        m, x, y = _problem()
        opt = sven.Sven(m.parameters(), ggn=True, lr=0.05, judge_every=k)
        calls, judged = [0], []

        def closure(m: nn.Module = m, x: torch.Tensor = x, y: torch.Tensor = y, calls: list = calls) -> torch.Tensor:
            calls[0] += 1
            return F.cross_entropy(m(x), y, reduction="none")

        for _ in range(30):
            opt.step(closure)
            assert opt.last_step is not None
            judged.append(opt.last_step.gain_ratio is not None)
            assert opt.last_step.gain_ratio is None or opt.last_step.gain_ratio >= 0.5
        runs[k] = (torch.cat([p.detach().flatten() for p in m.parameters()]), judged, calls[0])
    assert all(runs[1][1]) and runs[1][2] == 60
    calm = opt.control.calm  # type: ignore[attr-defined]
    assert runs[3][1][:calm] == [True] * calm and runs[3][1].count(False) > 10
    assert runs[3][2] == 30 + runs[3][1].count(True)
    torch.testing.assert_close(runs[3][0], runs[1][0], rtol=1e-10, atol=1e-12)


def test_the_loss_rule_judges_every_step_by_default() -> None:
    """The decided default (docs/results_notes.md, "Judging only every k-th step"): ``judge_every=1`` under the
    loss rule and with ``ggn=True``; ``judge_every=4`` (a NumPy integer too) skips, and the option keeps the rule
    on."""
    m, x, y = _problem()
    default = sven.Sven(m.parameters())
    default.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    assert isinstance(default.control, CrossEntropyDamping) and default.control.judge_every == JUDGE_EVERY == 1
    assert sven.Sven(m.parameters(), ggn=True).control.judge_every == 1  # type: ignore[attr-defined]
    given = sven.Sven(m.parameters(), judge_every=np.int64(4))
    given.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    assert given.config.ggn is True and isinstance(given.control, CrossEntropyDamping)
    assert given.control.judge_every == 4
    with pytest.raises(ValueError, match=r"`judge_every` must be a positive integer, got 0"):
        sven.Sven(m.parameters(), judge_every=0)
