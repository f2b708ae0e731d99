"""Matrix-free Jacobian operators agree with the dense per-sample Jacobian, and solvers accept them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import truncpinv as tp
from sven.jacobian import autograd_jacobian
from sven.matfree import ClosureJacobian, FunctionalJacobian, gram_from_operator

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # small models: threads only compete
    # torch.func.jvp loads decompositions through torch.jit.script (PyTorch's own deprecation warning)
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

F64 = torch.float64
N = 12
#: Relative agreement with the dense float64 Jacobian (products are exact up to rounding).
RTOL = 1e-10


class RawParameterModel(nn.Module):
    """A custom forward on raw parameters (no Linear), plus one parameter it never uses."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(5, 4, generator=g, dtype=F64))
        self.s = nn.Parameter(torch.randn(4, generator=g, dtype=F64))
        self.unused = nn.Parameter(torch.randn(2, generator=g, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sin(x @ self.w) * self.s
        return h.sum(dim=1) + 0.1 * (self.w**2).sum()


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "gelu_mlp":
        model: nn.Module = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1))
    elif name == "raw_parameter":
        model = RawParameterModel()
    elif name == "batchnorm_train":
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        model.train()
    else:  # pragma: no cover - test bug
        raise KeyError(name)
    return model.double()


def _case(name: str, n: int = N) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """A closure returning ``(n,)`` per-sample squared residuals, and the parameters."""
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)

    def closure() -> torch.Tensor:
        return (model(x).reshape(n) - y) ** 2

    return closure, list(model.parameters())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


MODELS = ["gelu_mlp", "raw_parameter", "batchnorm_train"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("chunk_size", [1, 3, N])
@pytest.mark.parametrize("batching", ["auto", "batched", "loop"])
def test_closure_jacobian_products_match_dense(name: str, chunk_size: int, batching: Any) -> None:
    closure, params = _case(name)
    J = autograd_jacobian(closure(), params)
    op = ClosureJacobian.from_closure(closure, params, chunk_size=chunk_size, batching=batching)
    assert op.shape == tuple(J.shape) and op.dtype == F64 and op.device == J.device
    assert isinstance(op, tp.LinearOperator)
    g = torch.Generator().manual_seed(2)
    for r in (1, 5):  # auto times the batched and the looped way on these calls, then decides
        X = torch.randn(op.shape[1], r, generator=g, dtype=F64)
        U = torch.randn(N, r, generator=g, dtype=F64)
        assert _rel(op.matmat(X), J @ X) < RTOL
        assert _rel(op.rmatmat(U), J.T @ U) < RTOL
    assert op.stats == {**op.stats, "matvecs": 12, "forward": 6, "adjoint": 6}
    if name == "raw_parameter":  # the unused parameter gives zero columns
        assert bool((J[:, -2:] == 0).all())


def test_edge_cases_no_columns_and_rows_independent_of_params() -> None:
    closure, params = _case("raw_parameter")
    op = ClosureJacobian.from_closure(closure, params)
    assert op.matmat(torch.zeros(op.shape[1], 0, dtype=F64)).shape == (N, 0)
    assert op.rmatmat(torch.zeros(N, 0, dtype=F64)).shape == (op.shape[1], 0)
    f, fparams = _functional_case("raw_parameter")
    fop = FunctionalJacobian(f, fparams)
    assert fop.matmat(torch.zeros(fop.shape[1], 0, dtype=F64)).shape == (N, 0)
    assert fop.rmatmat(torch.zeros(N, 0, dtype=F64)).shape == (fop.shape[1], 0)
    q = torch.randn(N, dtype=F64, requires_grad=True)
    p = torch.randn(3, dtype=F64, requires_grad=True)
    zero = ClosureJacobian(q.sin(), [p])  # rows with a graph, but not through p: M = 0
    assert bool((zero.matmat(torch.ones(3, 2, dtype=F64)) == 0).all())
    assert bool((zero.rmatmat(torch.ones(N, 2, dtype=F64)) == 0).all())


def test_auto_batching_decides_and_explicit_modes_are_reported() -> None:
    closure, params = _case("gelu_mlp")
    op = ClosureJacobian.from_closure(closure, params, chunk_size=4)
    X = torch.randn(op.shape[1], 12, dtype=F64)
    op.matmat(X)  # three chunks: batched, loop timed, then the faster
    op.rmatmat(torch.randn(N, 12, dtype=F64))
    assert op.stats["batching"]["matmat"] in ("batched", "loop")
    assert op.stats["batching"]["rmatmat"] in ("batched", "loop")
    fixed = ClosureJacobian.from_closure(closure, params, batching="loop")
    assert fixed.stats["batching"] == {"matmat": "loop", "rmatmat": "loop"}


class _ItemInBackward(torch.autograd.Function):
    """``y = 2 x`` whose backward reads a Python number: it cannot be batched."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * (2.0 + 0.0 * float(g.sum()))


def test_auto_batching_falls_back_to_a_loop_when_batching_fails() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=F64, requires_grad=True)
    x = torch.randn(N, 4, dtype=F64)

    def closure() -> torch.Tensor:
        return torch.tanh(_ItemInBackward.apply(x @ w)).sum(dim=1)

    J = autograd_jacobian_loop(closure, [w])
    op = ClosureJacobian.from_closure(closure, [w])
    U = torch.randn(N, 3, dtype=F64)
    assert _rel(op.rmatmat(U), J.T @ U) < RTOL
    assert op.stats["batching"]["rmatmat"] == "loop"
    with pytest.raises(RuntimeError):
        ClosureJacobian.from_closure(closure, [w], batching="batched").rmatmat(U)


def autograd_jacobian_loop(closure: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """Row by row: one backward pass per row (slow, obviously right)."""
    out = closure()
    rows = [
        torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(out[i], params, retain_graph=True)])
        for i in range(out.shape[0])
    ]
    return torch.stack(rows)


# --------------------------------------------------------------------------- memory: no (N, P) tensor
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any ATen operation (forward or backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_products_never_form_an_n_by_p_tensor() -> None:
    closure, params = _case("gelu_mlp")
    op = ClosureJacobian.from_closure(closure, params, chunk_size=3)
    n, p = op.shape
    X = torch.randn(p, 4, dtype=F64)
    U = torch.randn(n, 4, dtype=F64)
    with _LargestTensor() as seen:
        op.matmat(X)
        op.rmatmat(U)
        gram_from_operator(op, chunk_size=3)
    assert seen.largest < n * p, f"a tensor of {seen.largest} >= N*P = {n * p} entries was formed"
    with _LargestTensor() as control:  # the check does see the dense Jacobian
        autograd_jacobian(closure(), params)
    assert control.largest >= n * p


# --------------------------------------------------------------------------- FunctionalJacobian
def _functional_case(name: str) -> tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], dict[str, torch.Tensor]]:
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=g, dtype=F64)
    y = torch.randn(N, generator=g, dtype=F64)

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (functional_call(model, p, (x,)).reshape(N) - y) ** 2

    return f, {k: v.detach() for k, v in model.named_parameters()}


def _dense(f: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    jac = jacrev(f)(params)
    return torch.cat([jac[k].reshape(N, -1) for k in params], dim=1)


@pytest.mark.parametrize("name", ["gelu_mlp", "raw_parameter"])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("via", ["jvp", "double_vjp"])
def test_functional_jacobian_products_match_dense(name: str, chunk_size: int | None, via: Any) -> None:
    f, params = _functional_case(name)
    J = _dense(f, params)
    op = FunctionalJacobian(f, params, chunk_size=chunk_size, matmat_via=via)
    assert op.shape == tuple(J.shape)
    X = torch.randn(op.shape[1], 5, dtype=F64)
    U = torch.randn(N, 5, dtype=F64)
    assert _rel(op.matmat(X), J @ X) < RTOL
    assert _rel(op.rmatmat(U), J.T @ U) < RTOL
    assert op.stats == {"matvecs": 10, "forward": 5, "adjoint": 5, "matmat_via": via}


class _ExpNoJvp(torch.autograd.Function):
    """``exp`` with a backward but no forward-mode derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.exp()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: torch.Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return g * y


def test_functional_jacobian_falls_back_when_forward_mode_is_missing() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g, dtype=F64)
    params = {"w": 0.3 * torch.randn(4, 3, generator=g, dtype=F64), "b": torch.randn(3, generator=g, dtype=F64)}

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return _ExpNoJvp.apply(x @ p["w"] + p["b"]).sum(dim=1)  # type: ignore[no-any-return]

    J = _dense(f, params)
    X = torch.randn(15, 4, dtype=F64)
    with pytest.raises(NotImplementedError, match="jvp"):
        FunctionalJacobian(f, params, matmat_via="jvp").matmat(X)
    op = FunctionalJacobian(f, params, chunk_size=2)
    with pytest.warns(RuntimeWarning, match="double-backward"):
        assert _rel(op.matmat(X), J @ X) < RTOL
    assert op.stats["matmat_via"] == "double_vjp"
    assert _rel(op.matmat(X), J @ X) < RTOL  # no second warning: the choice is remembered


# --------------------------------------------------------------------------- solvers on the operator
@pytest.mark.parametrize(
    "solver",
    [tp.Lanczos(block_size=4), tp.RandomizedSVD(power_iters=4), tp.GramEigen()],
    ids=["lanczos", "randomized", "gram"],
)
@pytest.mark.parametrize("name", ["gelu_mlp", "batchnorm_train"])
def test_solvers_on_the_operator_match_the_dense_truncated_pinv(solver: tp.Solver, name: str) -> None:
    closure, params = _case(name, n=48)  # N large enough that neither solver spans all of R^N
    J = autograd_jacobian(closure(), params)
    S = torch.linalg.svdvals(J)
    k = int(torch.argmax(S[2:9] / S[3:10])) + 3  # a rank at a clear gap, so the truncation is well posed
    op = ClosureJacobian.from_closure(closure, params, chunk_size=8)
    b = op.output
    x = tp.pinv(op, rank=k, solver=solver) @ b
    ref = tp.pinv(J, rank=k, solver="svd") @ b
    assert float(S[k - 1] / S[k]) > 1.3
    # exact solvers reach ~1e-14; the sketch (40 of 48 dimensions, 4 Krylov steps) ~1e-11
    assert _rel(x, ref) < 1e-9
    assert op.stats["matvecs"] > 0


# --------------------------------------------------------------------------- Gram matrix
@pytest.mark.parametrize("method", ["auto", "pairs", "matmat"])
@pytest.mark.parametrize("chunk_size", [1, 5, N])
def test_gram_from_operator_matches_dense(method: Any, chunk_size: int) -> None:
    closure, params = _case("raw_parameter")
    J = autograd_jacobian(closure(), params)
    op = ClosureJacobian.from_closure(closure, params)
    K = gram_from_operator(op, chunk_size=chunk_size, method=method)
    assert K.dtype == F64 and bool((K == K.T).all())
    assert _rel(K, J @ J.T) < RTOL


def test_gram_from_operator_accumulates_float32_products_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 300, generator=g)
    K = gram_from_operator(tp.TensorOperator(A), chunk_size=3)  # auto: pairs, float32 operator
    torch.testing.assert_close(K, A.double() @ A.double().T, rtol=1e-14, atol=1e-12)


# --------------------------------------------------------------------------- input validation
def test_bad_input_is_rejected_with_a_message() -> None:
    closure, params = _case("raw_parameter")
    out = closure()
    with pytest.raises(ValueError, match="`out` must be 1-D"):
        ClosureJacobian(out[:, None], params)
    with pytest.raises(ValueError, match="`out` has no autograd graph"):
        ClosureJacobian(out.detach(), params)
    with pytest.raises(ValueError, match="`params` must contain at least one tensor"):
        ClosureJacobian(out, [])
    with pytest.raises(
        ValueError, match=r"`params\[0\]` must be a tensor that requires grad, got a tensor with requires_grad=False"
    ):
        ClosureJacobian(out, [torch.zeros(2)])
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer or None, got 0"):
        ClosureJacobian(out, params, chunk_size=0)
    with pytest.raises(ValueError, match="`batching` must be one of"):
        ClosureJacobian(out, params, batching="vmap")  # type: ignore[arg-type]
    op = ClosureJacobian(out, params)
    with pytest.raises(ValueError, match=r"`X` must have shape \(26, r\), got \(25, 2\)"):
        op.matmat(torch.zeros(25, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"`Y` must have shape \(12, r\), got \(12,\)"):
        op.rmatmat(torch.zeros(12, dtype=F64))
    with pytest.raises(TypeError, match=r"`X` must be a torch\.Tensor"):
        op.matmat([[0.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`op` must implement the truncpinv\.LinearOperator protocol"):
        gram_from_operator(torch.zeros(2, 3), chunk_size=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`method` must be"):
        gram_from_operator(op, chunk_size=1, method="eig")  # type: ignore[arg-type]
    f, fparams = _functional_case("raw_parameter")
    with pytest.raises(ValueError, match="`params` must be a non-empty mapping"):
        FunctionalJacobian(f, {})
    with pytest.raises(ValueError, match=r"`params\['w'\]` must be a floating-point tensor, got torch.int64"):
        FunctionalJacobian(f, {**fparams, "w": torch.zeros(5, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="`matmat_via` must be"):
        FunctionalJacobian(f, fparams, matmat_via="fwd")  # type: ignore[arg-type]
