"""The lean step of tiny dense least-squares problems (``sven/tiny.py``): the general step's iterates, faster."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sven
import sven.tiny as tiny
import truncpinv
from sven.control import AdaptiveDamping
from sven.trust_region import TrustRegion

F64 = torch.float64


def _problem(seed: int, p: int, m: int, dtype: torch.dtype = F64):  # type: ignore[no-untyped-def]
    """A smooth nonlinear residual function of ``p`` parameters and ``m`` rows, with a random start."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, p, generator=g, dtype=F64).to(dtype)
    B = (torch.randn(p, p, generator=g, dtype=F64) / p**0.5).to(dtype)
    scale = torch.logspace(-2, 2, p, dtype=F64).to(dtype)[torch.randperm(p, generator=g)]  # badly scaled columns
    y = torch.randn(m, generator=g, dtype=F64).to(dtype)
    x0 = torch.randn(p, generator=g, dtype=F64).to(dtype)

    def fun(x: torch.Tensor) -> torch.Tensor:
        return A @ (torch.tanh(B @ x) * scale) + 0.1 * (A @ x) ** 2 - y

    return fun, x0


def _run(fun, x0, control, steps: int, *, lean: bool, jacobian: str = "autograd"):  # type: ignore[no-untyped-def]
    x = torch.nn.Parameter(x0.clone())
    jac = (lambda: torch.func.jacrev(fun)(x.detach())) if jacobian == "callable" else jacobian
    opt = sven.Sven([x], residuals=True, control=control, jacobian=jac)
    path, infos = [], []
    with pytest.MonkeyPatch.context() as mp:
        if not lean:
            mp.setattr(tiny, "applies", lambda opt: False)
        for _ in range(steps):
            opt.step(lambda: fun(x))
            path.append(x.detach().clone())
            infos.append(opt.last_step)
    return path, infos, opt


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    p=st.integers(1, tiny.TINY_COLUMNS),
    extra=st.integers(0, 40),
    trust=st.booleans(),
    jacobian=st.sampled_from(["autograd", "callable"]),
)
def test_the_lean_step_gives_the_general_steps_iterates(
    seed: int, p: int, extra: int, trust: bool, jacobian: str
) -> None:
    fun, x0 = _problem(seed, p, p + extra)
    runs = [_run(fun, x0, TrustRegion() if trust else AdaptiveDamping(), 4, lean=lean, jacobian=jacobian)
            for lean in (True, False)]  # fmt: skip
    (lean_path, lean_infos, lean_opt), (path, infos, opt) = runs
    for a, b, ia, ib in zip(lean_path, path, lean_infos, infos):
        # the same decisions (a gain ratio at a threshold to round-off could flip one: none met in these draws)
        assert (ia.rejected, ia.retries, ia.rank) == (ib.rejected, ib.retries, ib.rank)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * (1.0 + float(b.abs().max())))
        assert ia.damping == pytest.approx(ib.damping, rel=1e-8, abs=1e-300)
        assert ia.gradient_cosine == pytest.approx(ib.gradient_cosine, rel=1e-7, abs=1e-14)
    assert lean_opt.state_dict()["sven"].keys() == opt.state_dict()["sven"].keys()
    torch.testing.assert_close(lean_opt.state[lean_opt.param_groups[0]["params"][0]]["col_scale"],
                               opt.state[opt.param_groups[0]["params"][0]]["col_scale"])  # fmt: skip


@pytest.mark.parametrize("scheme", ["2-point", "3-point"])
@pytest.mark.parametrize("trust", [False, True])
def test_a_finite_difference_step_is_the_general_one(scheme: str, trust: bool) -> None:
    # one step only: the differences divide the round-off of later iterates by h ~ 1e-8 (or 6e-6)
    fun, x0 = _problem(5, 6, 40)
    (a, ia, _), (b, ib, _) = (_run(fun, x0, TrustRegion() if trust else None, 1, lean=lean, jacobian=scheme)
                              for lean in (True, False))  # fmt: skip
    assert ia[0].jacobian_method == ib[0].jacobian_method == scheme
    torch.testing.assert_close(a[0], b[0], rtol=1e-9, atol=1e-12)
    assert not torch.equal(a[0], x0)


def test_the_lean_step_is_taken_for_tiny_problems_only(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[int] = []
    lean = tiny._descend
    monkeypatch.setattr(tiny, "_descend", lambda opt, R, M, *a: taken.append(M.shape[1]) or lean(opt, R, M, *a))
    for p in (3, tiny.TINY_COLUMNS, tiny.TINY_COLUMNS + 1):
        fun, x0 = _problem(0, p, 30)
        _run(fun, x0, None, 1, lean=True)
    assert taken == [3, tiny.TINY_COLUMNS]  # 11 columns: the general step


@pytest.mark.parametrize(
    "options",
    [{"momentum": 0.5}, {"weight_decay": 0.1}, {"rank": 2}, {"residuals": False}, {"rmsprop": True}],
)
def test_configurations_outside_the_lean_step_keep_the_general_one(options: dict) -> None:  # type: ignore[type-arg]
    x = torch.nn.Parameter(torch.ones(3, dtype=F64))
    kw = {"residuals": True, **options}
    opt = sven.Sven([x], **kw)
    assert not tiny.applies(opt)


def test_a_lean_step_that_meets_nan_skips_and_leaves_the_parameters() -> None:
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))
    opt = sven.Sven([x], residuals=True)
    with pytest.warns(RuntimeWarning, match="NaN or Inf in the residuals"):
        opt.step(lambda: torch.stack([x[0] * torch.tensor(float("nan")), x[1]]))
    assert x.tolist() == [1.0, 2.0] and opt.skipped_steps == 1 and opt.last_step.skipped


def test_a_float32_problem_takes_the_lean_step_with_the_general_iterates() -> None:
    fun, x0 = _problem(3, 4, 25, torch.float32)
    (a, *_), (b, *_) = (_run(fun, x0, TrustRegion(), 3, lean=lean) for lean in (True, False))
    for u, v in zip(a, b):
        assert u.dtype == torch.float32
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def _pair(fun, x0, **options):  # type: ignore[no-untyped-def]
    """Two optimizers from ``x0``: one that takes the lean step, one kept on the general step."""
    xs = [torch.nn.Parameter(x0.clone()) for _ in range(2)]
    return xs, [sven.Sven([x], residuals=True, **options) for x in xs]


def _steps(fun, xs, opts, n: int) -> None:  # type: ignore[no-untyped-def]
    for lean, x, opt in zip((True, False), xs, opts):
        with pytest.MonkeyPatch.context() as mp:
            if not lean:
                mp.setattr(tiny, "applies", lambda opt: False)
            for _ in range(n):
                opt.step(lambda x=x: fun(x))


@pytest.mark.parametrize(
    "change",
    ["lr", "rtol", "atol", "solver", "momentum", "new group", "frozen"],
)
def test_a_change_between_steps_is_honoured_by_the_lean_step(change: str) -> None:
    # the lean step keeps what it read from the groups and options (sven.tiny.plan) until they change
    fun, x0 = _problem(11, 4, 30)
    xs, opts = _pair(fun, x0)
    _steps(fun, xs, opts, 2)
    extra = [torch.nn.Parameter(torch.ones(2, dtype=F64)) for _ in opts]
    taken: list[int] = []
    for x, opt, e in zip(xs, opts, extra):
        if change == "lr":
            opt.param_groups[0]["lr"] = 0.25
        elif change in ("rtol", "atol"):
            setattr(opt, change, 0.3 if change == "rtol" else 1e-1)  # truncates: a different step
        elif change == "solver":
            opt.solver = truncpinv.DenseSVD()  # not Auto: the general step
        elif change == "momentum":
            opt.param_groups[0]["momentum"] = 0.5  # (a scheduler's): the general step, with momentum
        elif change == "new group":  # a second parameter that the residuals do not depend on: a zero column
            opt.add_param_group({"params": [e], "lr": 0.5})
        else:
            x.requires_grad_(False)  # nothing left to optimise: the general step's error
    lean = tiny._descend
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny, "_descend", lambda opt, R, M, *a: taken.append(M.shape[1]) or lean(opt, R, M, *a))
        if change == "frozen":
            for opt, x in zip(opts, xs):
                with pytest.raises(ValueError, match="no parameter that requires grad"):
                    opt.step(lambda x=x: fun(x))
            return
        _steps(fun, xs, opts, 2)
    expected = {"momentum": [], "solver": [], "new group": [6, 6]}.get(change, [4, 4])
    assert taken == expected  # the lean step only where it applies, with the columns of the groups as they are
    torch.testing.assert_close(xs[0], xs[1], rtol=1e-9, atol=1e-12)
    assert not torch.equal(xs[0], x0)


def test_the_lean_step_records_what_step_info_record_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    # the lean step fills its StepInfo in one update: the same fields as StepInfo.record of the same outcome
    import sven.tiny_control as tiny_control
    from sven.info import StepInfo

    fun, x0 = _problem(2, 3, 20)
    x = torch.nn.Parameter(x0.clone())
    opt = sven.Sven([x], residuals=True, jacobian=lambda: torch.func.jacrev(fun)(x.detach()))
    outcomes = []
    run = tiny_control.run
    monkeypatch.setattr(tiny_control, "run", lambda policy, lean: outcomes.append(run(policy, lean)) or outcomes[-1])
    opt.step(lambda: fun(x))
    ref = StepInfo(losses=opt.last_step.losses)
    ref.record(outcomes[0], opt.last_step._lrs)
    names = ("damping", "gain_ratio", "retries", "rejected", "capped", "k_used", "substep_losses", "stalled",
             "converged", "_direction", "_lrs")  # fmt: skip
    assert all(getattr(opt.last_step, k) is getattr(ref, k) for k in names)
    assert opt.last_step._direction is not None and not torch.equal(x.detach(), x0)


@pytest.mark.parametrize("shape", ["matrix", "float32 after"])
def test_residuals_of_another_kind_after_a_try_take_the_row_checks(shape: str) -> None:
    # the tries take a plain tensor of R's shape and dtype as it is; anything else goes through RowSpec
    fun, x0 = _problem(4, 3, 24)

    def closure(x: torch.Tensor) -> torch.Tensor:
        r = fun(x)
        if shape == "matrix":
            return r.reshape(12, 2)  # flattened by RowSpec at every evaluation
        # float64 rows to linearise (autograd: x requires grad there), float32 ones after each try
        return r if x.requires_grad else r.float()

    xs, opts = _pair(fun, x0)
    _steps(lambda x: closure(x), xs, opts, 3)
    torch.testing.assert_close(xs[0], xs[1], rtol=1e-9, atol=1e-12)
    assert not torch.equal(xs[0], x0)


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_callable_jacobian_with_nan_or_inf_is_refused_before_the_step(size: str, bad: float) -> None:
    # the lean step tests a callable Jacobian's values on its column squares (torch's test where it is large):
    # the route's own error, nothing counted, the parameters and the scaling state untouched
    m = 20 if size == "small" else tiny.TINY_ENTRIES
    t = torch.linspace(0.0, 1.0, m, dtype=F64)
    x = torch.nn.Parameter(torch.tensor([1.0, 0.5], dtype=F64))

    def jac() -> torch.Tensor:
        J = torch.stack([torch.exp(-x.detach()[1] * t), -x.detach()[0] * t * torch.exp(-x.detach()[1] * t)], 1)
        J[m // 2, 1] = bad
        return J

    opt = sven.Sven([x], residuals=True, jacobian=jac)
    with pytest.raises(ValueError, match="`jacobian` returned a Jacobian with NaN or Inf entries"):
        opt.step(lambda: x[0] * torch.exp(-x[1] * t) - 1.0)
    assert x.tolist() == [1.0, 0.5] and opt.state_dict()["sven"]["steps"] == 0 and not opt.state


def test_a_callable_jacobian_whose_squares_overflow_is_taken() -> None:
    # finite entries whose squares overflow: the entries themselves are tested, and the step goes on
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))
    J = torch.tensor([[1e200, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    opt = sven.Sven([x], residuals=True, jacobian=lambda: J)
    opt.step(lambda: J @ x - torch.tensor([1.0, 1.0, 1.0], dtype=F64))
    assert opt.state_dict()["sven"]["steps"] == 1 and not opt.last_step.skipped


@pytest.mark.parametrize("case", ["used", "unused", "two outputs"])
def test_the_batched_backward_is_torch_autograd_grads_bit_for_bit(case: str) -> None:
    # sven.linearize.dense.batched_grad runs the engine call of torch.autograd.grad(is_grads_batched=True) itself
    from sven.linearize.dense import batched_grad

    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    leaf = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    A = torch.randn(6, 4, generator=g, dtype=F64)
    (gw,) = torch.autograd.grad(torch.tanh(A @ w) @ leaf, w, create_graph=True)
    outs = [gw] if case == "used" else [gw, gw.sin()]
    if case == "unused":
        outs = [w * 2.0]  # no path to ``leaf``: None
    eyes = [torch.eye(4, dtype=F64) for _ in outs]
    want = torch.autograd.grad(outs, leaf, grad_outputs=eyes, is_grads_batched=True, allow_unused=True,
                               retain_graph=True)  # fmt: skip
    got = batched_grad(outs, leaf, eyes)  # (frees the graph)
    if case == "unused":
        assert got == (None,) and want == (None,)
    else:
        assert got[0] is not None and torch.equal(got[0], want[0])


class _Logged(torch.Tensor):
    """A tensor subclass that overrides torch functions (``torch.autograd.grad`` hands such calls to it)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("kind", ["parameter", "subclass"])
def test_the_graph_vjp_is_torch_autograd_grads_bit_for_bit(kind: str) -> None:
    # sven.linearize.dense.graph_grad: J^T u with its graph, by the engine call torch.autograd.grad makes
    # (a parameter), or by torch.autograd.grad itself (a subclass that overrides torch functions)
    from sven.linearize.dense import graph_grad

    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, generator=g, dtype=F64)
    w = torch.nn.Parameter(base) if kind == "parameter" else base.as_subclass(_Logged).requires_grad_(True)
    t = torch.linspace(0.0, 1.0, 7, dtype=F64)
    out = w[0] * torch.exp(-w[1] * t) + w[2]
    leaf = torch.randn(7, generator=g, dtype=F64).requires_grad_(True)
    (want,) = torch.autograd.grad(out, [w], grad_outputs=leaf, create_graph=True, allow_unused=True)
    (got,) = graph_grad(out, [w], leaf)
    assert got is not None and got.requires_grad and torch.equal(got.detach(), want.detach())
    (second,) = torch.autograd.grad(got.sum(), leaf)  # its own graph: J 1, differentiated in u
    torch.testing.assert_close(second, torch.autograd.grad(want.sum(), leaf)[0], rtol=0, atol=0)
