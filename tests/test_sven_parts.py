"""Each stage of a Sven step on its own: the step-control policies, the route rule, and injected parts.

The policies are run on a linear least-squares problem, rows ``R(theta) = A theta - b``,
whose Jacobian is ``A``: every expected direction follows from the SVD of ``A``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sven
import truncpinv as tp
from sven import control as C
from sven.info import StepFault
from sven.linearize import GRAM_MIN_ENTRIES, RowSpec, choose_route
from sven.params import ParamBlock
from sven.step_context import step_context
from sven.tasks import mlp, per_sample_mse


class _Problem:
    """``R(theta) = A theta - b`` with ``theta`` a parameter of 5 entries, ``A`` 8 x 5 of rank 5."""

    def __init__(self, lr: float = 1.0, shift: float = 0.0) -> None:
        g = torch.Generator().manual_seed(3)
        self.A = torch.randn(8, 5, dtype=torch.float64, generator=g)
        self.b = torch.randn(8, dtype=torch.float64, generator=g)
        self.theta = torch.zeros(5, dtype=torch.float64)  # policies run under no_grad in the optimizer
        self.blocks = [ParamBlock(self.theta, lr, 0, 5)]
        self.shift = shift  # added to the residuals after the step (to make it fail)
        self.evaluations = 0

    def residuals(self) -> torch.Tensor:
        return self.A @ self.theta.detach() - self.b

    def context(self, state: dict | None = None) -> C.StepContext:
        R = self.residuals()
        F = tp.DenseSVD().factorize(self.A, rtol=1e-12)

        def rows_after() -> torch.Tensor:
            self.evaluations += 1
            return self.residuals() + self.shift

        rejected = []
        ctx = step_context(
            F, R, self.A, self.blocks,
            state=state if state is not None else {},
            precondition=None,
            loss=lambda: float(R.pow(2).mean()),
            evaluate=C.Evaluator(rows_after, RowSpec(residuals=True)),
            reject=lambda: rejected.append(1),
        )  # fmt: skip
        self.rejected = rejected
        return ctx

    def lstsq_step(self) -> torch.Tensor:
        """The Gauss-Newton step from theta: -pinv(A) R."""
        return -torch.linalg.lstsq(self.A, self.residuals().unsqueeze(1)).solution[:, 0]


def test_plain_applies_the_pseudoinverse_step() -> None:
    p = _Problem(lr=0.5)
    expected = 0.5 * p.lstsq_step()
    out = C.Plain().run(p.context())
    torch.testing.assert_close(p.theta.detach(), expected)
    assert out.damping == 0.0 and out.direction is not None and p.evaluations == 0


def test_tikhonov_shrinks_each_component_by_its_filter() -> None:
    p = _Problem()
    lam = 0.3
    U, S, Vh = torch.linalg.svd(p.A, full_matrices=False)
    R = p.residuals()
    s2 = S**2
    expected = -(Vh.T @ ((S / (s2 + lam * s2[0])) * (U.T @ R)))
    C.Tikhonov(lam).run(p.context())
    torch.testing.assert_close(p.theta.detach(), expected)


def test_trust_radius_caps_the_applied_change_of_any_policy() -> None:
    for inner in (C.Plain(), C.Tikhonov(0.1)):
        p = _Problem(lr=2.0)
        free = 2.0 * p.lstsq_step().norm()
        radius = 0.25 * float(free)
        out = C.TrustRadius(inner, radius).run(p.context())
        assert out.capped
        assert math.isclose(float(p.theta.detach().norm()), radius, rel_tol=1e-9)
    p = _Problem()
    out = C.TrustRadius(C.Plain(), 1e6).run(p.context())
    assert not out.capped


def test_adaptive_damping_accepts_a_good_step_and_lowers_the_damping() -> None:
    p = _Problem()
    pol = C.AdaptiveDamping(start=1e-3, max_retries=2)
    before = float(p.residuals().norm())
    out = pol.run(p.context())
    assert not out.rejected and out.retries == 0 and out.gain_ratio is not None and out.gain_ratio > 0.9
    assert float(p.residuals().norm()) < before and pol.damping < 1e-3


def test_adaptive_damping_rejects_every_try_and_restores_the_parameters() -> None:
    p = _Problem(shift=1e3)  # every re-evaluated loss is far worse than predicted
    pol = C.AdaptiveDamping(start=1e-3, max_retries=2)
    out = pol.run(p.context())
    assert out.rejected and out.retries == 3 and out.direction is None
    assert bool((p.theta.detach() == 0).all()) and len(p.rejected) == 3 and p.evaluations == 3
    assert pol.damping > 1e-3  # raised after each rejection


def test_check_step_undoes_a_nonfinite_step() -> None:
    p = _Problem(shift=float("nan"))
    with pytest.raises(StepFault, match="the loss after the step"):
        C.CheckStep(C.Plain()).run(p.context())
    assert bool((p.theta.detach() == 0).all()) and len(p.rejected) == 1
    q = _Problem()
    expected = q.lstsq_step()
    C.CheckStep(C.Plain()).run(q.context())
    torch.testing.assert_close(q.theta, expected)
    assert q.evaluations == 1


def test_variable_k_keeps_components_while_the_loss_does_not_increase() -> None:
    p = _Problem()
    out = C.VariableK().run(p.context())
    # on a linear problem every component lowers the loss: all 5 are kept, the full Gauss-Newton step
    assert out.k_used == 5 and out.substep_losses is not None and len(out.substep_losses) == 1 + 5
    assert all(b <= a + 1e-12 for a, b in zip(out.substep_losses, out.substep_losses[1:]))
    torch.testing.assert_close(p.A @ p.theta.detach(), p.A @ torch.linalg.lstsq(p.A, p.b[:, None]).solution[:, 0])


def test_a_policy_that_needs_the_loss_says_so() -> None:
    p = _Problem()
    ctx = p.context()
    ctx.evaluate = None
    with pytest.raises(ValueError, match="re-evaluates the loss"):
        C.AdaptiveDamping().run(ctx)


@pytest.mark.parametrize(
    ("options", "kind"),
    [
        ({}, C.Plain),
        ({"damping": 0.1}, C.Tikhonov),
        ({"adaptive_damping": True}, C.AdaptiveDamping),
        ({"variable_k": True}, C.VariableK),
        ({"check_step": True}, C.CheckStep),
        ({"trust_radius": 1.0}, C.TrustRadius),
    ],
)
def test_the_options_build_the_policies(options: dict, kind: type) -> None:
    assert type(C.make_policy(**options)) is kind


@pytest.mark.parametrize(
    ("requested", "kw", "expected"),
    [
        ("auto", {}, "gram"),
        ("auto", {"gram_allowed": False}, "dense"),
        ("auto", {"gram_failed": True}, "dense"),
        ("auto", {"rmsprop_on_jacobian": True}, "dense"),
        ("auto", {"entries": GRAM_MIN_ENTRIES - 1}, "dense"),
        ("auto", {"entries": GRAM_MIN_ENTRIES - 1, "distributed": True}, "gram"),
        ("auto", {"entries": GRAM_MIN_ENTRIES}, "gram"),
        ("gram", {"gram_allowed": False}, "gram"),
        ("hooks", {}, "dense"),
        ("autograd", {}, "dense"),
        ("matfree", {}, "matfree"),
    ],
)
def test_the_route_rule(requested: str, kw: dict, expected: str) -> None:
    args = {"gram_allowed": True, "rmsprop_on_jacobian": False, "entries": None, "gram_failed": False}
    args.update(kw)
    args.setdefault("distributed", False)
    assert choose_route(requested, **args) == expected


def test_gram_with_rmsprop_on_the_jacobian_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be combined with RMSProp"):
        choose_route(
            "gram", gram_allowed=True, rmsprop_on_jacobian=True, entries=None, gram_failed=False, distributed=False
        )


def _run(steps: int = 3, **kw: object) -> list[torch.Tensor]:
    model = mlp(width=8, depth=2, seed=4)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(24, 1, generator=g), torch.randn(24, 1, generator=g)
    opt = sven.Sven(model.parameters(), lr=0.5, rank=8, **kw)
    for _ in range(steps):
        opt.step(lambda: per_sample_mse(model(x), y))
    return [p.detach().clone() for p in model.parameters()]


def test_an_injected_policy_equals_the_options() -> None:
    a = _run(adaptive_damping=True, damping=0.01, trust_radius=0.5)
    b = _run(control=C.TrustRadius(C.AdaptiveDamping(0.01), 0.5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_route_names_the_same_route_as_jacobian() -> None:
    a = _run(jacobian="gram")
    b = _run(route="gram")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="`route` or `jacobian`"):
        sven.Sven(nn.Linear(2, 1).parameters(), route="gram", jacobian="gram")


def test_options_read_as_attributes() -> None:
    opt = sven.Sven(nn.Linear(2, 1).parameters(), rank=3, rtol=1e-4)
    assert opt.rank == 3 and opt.rtol == 1e-4 and opt.config.rank == 3
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        opt.nonsense


def test_matfree_route_survives_rejected_tries_and_matches_the_materialised_route() -> None:
    """A rejected try restores the parameters; the matrix-free products still use the closure's graph."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)
    models = [mlp(width=8, depth=2, seed=1).double() for _ in range(2)]
    opts = [
        sven.Sven(models[0].parameters(), lr=50.0, rank=8, jacobian="matfree", adaptive_damping=True),
        sven.Sven(models[1].parameters(), lr=50.0, rank=8, jacobian="autograd", adaptive_damping=True, solver="gram"),
    ]
    rejected = 0
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.step(lambda model=model: per_sample_mse(model(x), y))
        rejected += opts[0].rejected_steps
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    assert rejected > 0  # the case that used to fail: a retry after a rejection
