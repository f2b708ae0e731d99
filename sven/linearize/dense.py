r"""Per-sample Jacobians: the ``(N, P)`` matrix of the gradients of each output row.

Sven needs the Jacobian :math:`J_{\alpha i} = \partial \ell_\alpha / \partial \theta_i`
of the ``N`` rows that a closure returns (per-sample losses or residuals).
Three ways to compute it are provided; :class:`PerSampleJacobian` picks one.

``"hooks"`` (fast path)
    During the closure a global forward hook records, for every
    :class:`torch.nn.Linear` call whose weight or bias is being optimised,
    the input :math:`a` and the output :math:`z = a W^\top + b`. One backward
    pass of :math:`\sum_\alpha \ell_\alpha` gives :math:`g = \partial(\sum\ell)/\partial z`,
    and, *if sample* :math:`\alpha` *only influences row* :math:`\alpha`,

    .. math::

        \frac{\partial \ell_\alpha}{\partial W} = g_\alpha^\top a_\alpha, \qquad
        \frac{\partial \ell_\alpha}{\partial b} = g_\alpha

    (summed over extra dimensions and over repeated calls). Cost: about one
    forward and one backward pass (Goodfellow 2015, "Efficient per-example
    gradient computations").

    The independence assumption fails for layers that mix samples (BatchNorm
    in training mode, a loss normalised over the batch, ...). It is therefore
    *verified*: the first time a forward structure is seen (the sequence of
    modules called and their ``training`` flags, and the types of the first
    autograd nodes behind the closure's output, :func:`~sven.linearize.base.graph_head`:
    the loss's own arithmetic), one extra
    backward pass computes the exact :math:`J^\top u` for a random ``u`` and
    compares it with the hook result. If they disagree, or if some optimised
    parameter is used outside a ``Linear`` module, the exact fallback is used
    for that structure from then on.

``"autograd"``
    ``torch.autograd.grad(out, params, grad_outputs=I_N, is_grads_batched=True)``
    on the graph the closure built. Works for any graph, but runs on
    PyTorch's legacy batching and falls back to a slow per-sample loop for
    operators without a batching rule (``gelu_backward``, for one).

``torch.func`` (for a model given as a module, see :func:`func_jacobian`)
    ``jacrev`` of ``functional_call``; used by :class:`sven.nn.SvenWrapper`
    when the fast path does not apply.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.overrides import has_torch_function

from .._arrays import vector_norm
from ..functional import host
from .base import Linearization, RowSpec, graph_head, strided
from .matfree import ClosureJacobian
from .recorder import Call, Labels, Recorder, recording

__all__ = [
    "COLUMN_CHUNK",
    "JACOBIAN_METHODS",
    "DenseRoute",
    "JacobianResult",
    "PerSampleJacobian",
    "autograd_jacobian",
    "func_jacobian",
]

#: Accepted values of the ``jacobian`` option.
JACOBIAN_METHODS = ("auto", "hooks", "autograd")
#: Verification outcomes kept per instance (a model whose structure changes every step
#: would otherwise grow the cache without bound).
_MAX_CACHED = 256


@dataclass
class JacobianResult:
    """A per-sample Jacobian.

    Attributes:
        output: ``(N,)`` the closure's rows, detached.
        jacobian: ``(N, P)`` with columns in the order of the parameters
            (each flattened row-major).
        method: ``"hooks"``, ``"autograd"`` or ``"fallback"`` (the caller's exact method).
    """

    output: torch.Tensor
    jacobian: torch.Tensor
    method: str


def agrees_with_a_vjp(out: torch.Tensor, params: Sequence[torch.Tensor], J: torch.Tensor, *, seed: int = 0) -> bool:
    r"""Whether ``J`` is the Jacobian of ``out``, probed once: ``J^T u`` against the exact vector-Jacobian product.

    ``u`` is Gaussian from ``seed`` (:func:`probe_vector`); the comparison is :func:`vjp_agrees`. The graph
    of ``out`` is kept.
    """
    u = probe_vector(out, seed=seed)
    exact = torch.autograd.grad(out, list(params), grad_outputs=u, retain_graph=True, allow_unused=True)
    ref = torch.cat(
        [
            torch.zeros(p.numel(), dtype=J.dtype, device=J.device) if g is None else strided(g).reshape(-1).to(J.dtype)
            for p, g in zip(params, exact)
        ]
    )
    return vjp_agrees(J, u, ref)


def probe_vector(out: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """The Gaussian probe ``u`` (shaped like ``out``) of :func:`agrees_with_a_vjp`, from ``seed``.

    The same arguments always give the same vector; a 1-D probe is kept (a few per process, never modified:
    callers wrap it in a new leaf), since a generator and its draw cost more than a small Jacobian's products.
    """
    if out.dim() == 1:
        return _probe_1d(int(out.shape[0]), out.dtype, out.device, seed)
    return _draw(tuple(out.shape), out.dtype, out.device, seed)


def _draw(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype, device=device)


@functools.lru_cache(maxsize=8)
def _probe_1d(n: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    return _draw((n,), dtype, device, seed)


def vjp_agrees(J: torch.Tensor, u: torch.Tensor, exact: torch.Tensor) -> bool:
    r"""``J^T u`` equals the exact product ``exact`` within ``1e3 eps`` of :math:`\| |J|^T |u| \|`.

    Non-finite values never agree.
    """
    u = u if u.dtype == J.dtype else u.to(J.dtype)
    exact = exact if exact.dtype == J.dtype else exact.to(J.dtype)
    j, v, e = host(J), host(u), host(exact)
    if j is not None and v is not None and e is not None:  # a small CPU Jacobian: the same test in NumPy
        err: Any
        ref: Any
        if j.dtype == np.float64:  # (np.linalg.norm of a float64 vector, without its dispatch: the same value)
            err, ref = vector_norm(v @ j - e), vector_norm(np.abs(v) @ np.abs(j))
        else:
            err, ref = np.linalg.norm(v @ j - e), np.linalg.norm(np.abs(v) @ np.abs(j))
        return bool(err <= 1e3 * float(np.finfo(j.dtype).eps) * ref)
    scale = (J.abs().T @ u.abs()).norm()
    return bool((J.T @ u - exact).norm() <= 1e3 * torch.finfo(J.dtype).eps * scale)


#: Columns per batched double-backward product of :func:`autograd_jacobian` for a tall Jacobian.
COLUMN_CHUNK = 256


def autograd_jacobian(out: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""``(N, P)`` Jacobian of the 1-D ``out`` from its autograd graph.

    A wide Jacobian (``N <= P`` rows) comes row by row: one batched backward
    pass with the ``N x N`` identity as cotangents. A tall one (more rows than
    parameters, e.g. the residuals of many collocation points of a PINN) comes
    column by column, ``P`` products :math:`J e_j` by the double-backward trick
    (:class:`sven.linearize.matfree.ClosureJacobian`, :data:`COLUMN_CHUNK`
    columns per batched pass): fewer passes, and no per-row loop where a
    backward operation has no batching rule (the double backward of residuals
    that differentiate the network with respect to its inputs: 0.28 s against
    5.6 s for the 1020 x 129 Jacobian of the 2-D Poisson problem of
    ``docs/pinn.md``, one thread). The columns are checked against one exact
    vector-Jacobian product (a random ``u``: ``J^T u``); if an operation has no
    double backward (it raises, or a ``once_differentiable`` backward silently
    drops the dependence), the rows are used.
    """
    params = list(params)
    n = out.shape[0]
    p_total = sum(p.numel() for p in params)
    if n > p_total:
        try:
            # the double graph is recorded at the probe u, so its value is the exact J^T u: the check is free
            u = probe_vector(out)
            if p_total <= COLUMN_CHUNK:
                J, vjp = _columns(out, params, u)
            else:
                op = ClosureJacobian(out, params, chunk_size=COLUMN_CHUNK, batching="batched", probe=u)
                J = op.matmat(torch.eye(p_total, dtype=op.dtype, device=out.device))
                vjp = op.probe_vjp()
            if vjp_agrees(J, u, vjp):
                return J
        except RuntimeError:
            pass  # an operation without a double backward: the rows
    eye = torch.eye(n, dtype=out.dtype, device=out.device)
    grads: Sequence[torch.Tensor | None]
    try:
        grads = torch.autograd.grad(
            out, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
    except RuntimeError:  # a backward without a batching rule that raises (a sparse gradient): row by row
        rows = [torch.autograd.grad(out, params, grad_outputs=e, retain_graph=True, allow_unused=True) for e in eye]
        grads = [
            None if r[0] is None else torch.stack([torch.zeros_like(p) if g is None else strided(g) for g in r])
            for p, r in zip(params, zip(*rows))
        ]
    cols = [
        torch.zeros(n, p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(n, -1)
        for p, g in zip(params, grads)
    ]
    return torch.cat(cols, dim=1)


def _columns(out: torch.Tensor, params: Sequence[torch.Tensor], u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""All ``P`` columns :math:`J e_j` in one batched pass of the double-backward trick, and :math:`J^\top u`.

    :math:`g(u) = J^\top u` is recorded with ``create_graph`` at the probe ``u``; one backward pass of
    :math:`g` batched over the ``P x P`` identity gives :math:`J^\top` (the products of
    :class:`~sven.linearize.matfree.ClosureJacobian`, without its chunking, for ``P <= COLUMN_CHUNK``).
    Raises ``RuntimeError`` when a backward step does not record its own derivative.
    """
    leaf = u.detach().requires_grad_(True)
    gs = graph_grad(out, params, leaf)
    numels = [p.numel() for p in params]
    p_total = sum(numels)
    eye = torch.eye(p_total, dtype=out.dtype, device=out.device)
    pieces = torch.split(eye, numels, dim=1) if len(numels) > 1 else (eye,)  # (one parameter: the identity itself)
    used = [(g, _as(piece.reshape(p_total, *g.shape), g.dtype)) for g, piece in zip(gs, pieces) if g is not None]
    if not used or any(not g.requires_grad for g, _ in used):
        raise RuntimeError("a backward step without a derivative")  # a once_differentiable step: the rows
    (Jt,) = batched_grad([g for g, _ in used], leaf, [x for _, x in used])
    if Jt is None:
        raise RuntimeError("a backward step without a derivative")
    flat = [
        torch.zeros(k, dtype=out.dtype, device=out.device) if g is None else g.detach().reshape(-1).to(out.dtype)
        for g, k in zip(gs, numels)
    ]
    return Jt.T, flat[0] if len(flat) == 1 else torch.cat(flat)


# torch's legacy batching (vmap mode) and its engine call, which ``torch.autograd.grad(is_grads_batched=True)`` uses
_VMAP_LEVEL = getattr(torch._C, "_vmapmode_increment_nesting", None)
_VMAP_DONE = getattr(torch._C, "_vmapmode_decrement_nesting", None)
_ENGINE = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _engine_applies(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether :func:`graph_grad` and :func:`batched_grad` may call the engine themselves: this torch has the
    internals, and no tensor overrides torch functions (``torch.autograd.grad``'s own test, which then hands the
    call to the override)."""
    return _ENGINE is not None and not has_torch_function(tensors)


def graph_grad(
    out: torch.Tensor, params: Sequence[torch.Tensor], leaf: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(out, params, grad_outputs=leaf, create_graph=True, allow_unused=True)``: the
    vector-Jacobian product :math:`J^\\top u` with its own graph (``u = leaf``), the graph of ``out`` kept.

    ``leaf`` has ``out``'s shape and dtype. The same engine call as ``torch.autograd.grad`` makes, without the
    Python that prepares it (about 50 us of a tiny problem's Jacobian, :mod:`sven.tiny`); with ``torch``'s own
    function where a tensor overrides torch functions or this torch lacks the internals.
    """
    inputs = tuple(params)
    if not _engine_applies((out, *inputs)):
        return torch.autograd.grad(out, list(inputs), grad_outputs=leaf, create_graph=True, allow_unused=True)
    return _ENGINE((out,), (leaf,), True, True, inputs, True, accumulate_grad=False)  # type: ignore[misc, no-any-return]


def batched_grad(
    outputs: Sequence[torch.Tensor], leaf: torch.Tensor, grad_outputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None]:
    """``torch.autograd.grad(outputs, leaf, grad_outputs, is_grads_batched=True, allow_unused=True)``: one backward
    pass batched over the first dimension of the ``grad_outputs``, the graph freed.

    The same engine call on the same batched tensors as ``torch.autograd.grad`` makes (so the same values, bit for
    bit), without the Python around it: its legacy ``vmap`` flattens and checks the arguments as pytrees at every
    call, about 0.15 ms of a tiny problem's 0.5 ms Jacobian (:mod:`sven.tiny`). Where a tensor overrides torch
    functions, or this torch lacks those internals, ``torch.autograd.grad`` itself (:func:`_engine_applies`).
    """
    if _VMAP_LEVEL is None or _VMAP_DONE is None or not _engine_applies((*outputs, leaf)):
        return torch.autograd.grad(  # type: ignore[return-value]
            list(outputs), leaf, grad_outputs=list(grad_outputs), is_grads_batched=True, allow_unused=True
        )
    size = grad_outputs[0].shape[0]
    level = _VMAP_LEVEL()
    try:
        batched = tuple(torch._add_batch_dim(g, 0, level) for g in grad_outputs)  # type: ignore[attr-defined]
        (res,) = _ENGINE(tuple(outputs), batched, False, False, (leaf,), True, accumulate_grad=False)  # type: ignore[misc]
        return (None if res is None else torch._remove_batch_dim(res, level, size, 0),)  # type: ignore[attr-defined]
    finally:
        _VMAP_DONE()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def func_jacobian(
    module: nn.Module,
    active: Sequence[str],
    rows_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: tuple[Any, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jacobian of ``rows_fn(module(*inputs))`` w.r.t. the named parameters by ``torch.func.jacrev``.

    Buffers are passed as (non-differentiated) inputs of the transform so that
    modules that update them in place (BatchNorm running statistics) work. A module with a
    sparse gradient (``nn.Embedding(sparse=True)``, which ``torch.func`` cannot batch) is run
    once as it is and differentiated through its graph (:func:`autograd_jacobian`).

    Returns:
        ``(rows, J, pred)``: the ``(N,)`` rows, the ``(N, P_active)`` Jacobian in
        the order of ``active``, and the module output.
    """
    named = dict(module.named_parameters())
    if any(getattr(m, "sparse", False) is True for m in module.modules()):
        # nn.Embedding(sparse=True): its sparse gradient has no batching rule in torch.func; the graph's rows
        with torch.enable_grad():
            pred = module(*inputs)
            rows = rows_fn(pred)
        return rows.detach(), autograd_jacobian(rows, [named[n] for n in active]), pred.detach()
    act = {n: named[n].detach() for n in active}
    frozen = {n: p.detach() for n, p in named.items() if n not in act}
    buffers = dict(module.named_buffers())

    def f(
        act_: dict[str, torch.Tensor], frozen_: dict[str, torch.Tensor], buffers_: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        pred = functional_call(module, ({**frozen_, **act_}, buffers_), inputs)
        rows = rows_fn(pred)
        return rows, (rows, pred)

    jac, (rows, pred) = jacrev(f, argnums=0, has_aux=True)(act, frozen, buffers)
    n = rows.shape[0]
    J = torch.cat([jac[name].reshape(n, -1) for name in active], dim=1)
    return rows.detach(), J, pred.detach()


# --------------------------------------------------------------------------- the hook path
def _per_sample_linear(call: Call, g: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, out*in)`` weight rows and ``(n, out)`` bias rows of one Linear call."""
    a = call.inp
    lin: nn.Linear = call.module  # type: ignore[assignment]  # the recorder keeps Linear calls only
    out_f, in_f = lin.out_features, lin.in_features
    g2 = g.reshape(n, -1, out_f)
    a2 = a.reshape(n, -1, in_f)
    if a2.dtype != g2.dtype:
        a2 = a2.to(g2.dtype)
    if g2.shape[1] == 1:
        jw = (g2[:, 0, :, None] * a2[:, 0, None, :]).reshape(n, -1)
        jb = g2[:, 0, :]
    else:
        jw = torch.bmm(g2.transpose(1, 2), a2).reshape(n, -1)
        jb = g2.sum(dim=1)
    return jw, jb


class PerSampleJacobian:
    """Computes per-sample Jacobians of a closure's rows, choosing the method.

    Args:
        method: ``"auto"`` (hook fast path, verified once per forward
            structure, exact fallback otherwise), ``"hooks"`` (fast path
            without the coupling check: only for models known to treat samples
            independently; a parameter used outside ``nn.Linear`` still gets the
            exact fallback), or ``"autograd"`` (always the batched backward).
        seed: seed of the random probe vector used for verification.

    The instance keeps the verification outcomes, so keep one per optimizer.
    """

    def __init__(self, method: str = "auto", *, seed: int = 0) -> None:
        if method not in JACOBIAN_METHODS:
            raise ValueError(f"`jacobian` must be one of {list(JACOBIAN_METHODS)}, got {method!r}")
        self.method = method
        self.seed = seed
        self._verified: dict[tuple[Any, ...], bool] = {}

    def __getstate__(self) -> dict[str, Any]:
        # verification outcomes are keyed by object ids: not meaningful elsewhere
        return {"method": self.method, "seed": self.seed, "_verified": {}}

    def _remember(self, key: tuple[Any, ...], ok: bool) -> None:
        if len(self._verified) >= _MAX_CACHED:
            self._verified.clear()
        self._verified[key] = ok

    def __call__(
        self,
        closure: Callable[[], Any],
        params: Sequence[torch.Tensor],
        *,
        rows: Callable[[Any], torch.Tensor],
        fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> JacobianResult:
        """Run ``closure`` (with grad enabled) and return its rows and their Jacobian.

        Args:
            closure: re-evaluates the model; its return value goes through ``rows``.
            params: the parameters (columns of the Jacobian, in this order).
            rows: turns the closure's return value into a 1-D tensor with a graph
                (and validates it).
            fallback: computes the Jacobian from the rows' graph when the fast
                path does not apply (default :func:`autograd_jacobian`).
        """
        exact = fallback if fallback is not None else (lambda out: autograd_jacobian(out, params))
        exact_name = "autograd" if fallback is None else "fallback"
        if self.method == "autograd":
            with torch.enable_grad():
                out = rows(closure())
            return JacobianResult(out.detach(), exact(out), exact_name)

        param_ids = {id(p) for p in params}
        rec = Recorder({id(p): i for i, p in enumerate(params)}, Labels(params), kinds=(nn.Linear,), strict=False)
        with torch.enable_grad(), recording(rec):
            raw = closure()
        with torch.enable_grad():  # a reshape under no_grad would cut the graph
            out = rows(raw)
        n = out.shape[0]
        if not out.requires_grad:
            raise ValueError(
                "the closure's output does not depend on the optimised parameters (it has no autograd graph); "
                "do not compute it under torch.no_grad() or from detached tensors, "
                "nor call the step inside torch.inference_mode()"
            )
        calls = rec.calls
        if not calls or any(c.inp.dim() < 2 or c.inp.shape[0] != n for c in calls):
            return JacobianResult(out.detach(), exact(out), exact_name)
        # the forward structure: which modules ran, in which mode, on which parameters, and the closure's own
        # arithmetic after them (graph_head); not the shapes: a shorter last batch or another sequence length
        # couples nothing new
        key = (
            tuple(rec.structure),
            tuple(id(p) for p in params),
            graph_head(raw if isinstance(raw, torch.Tensor) else out),
        )
        known = self._verified.get(key)
        if known is False:
            return JacobianResult(out.detach(), exact(out), exact_name)
        verify = known is None and self.method == "auto"

        outs = [c.out for c in calls]
        # the coverage test (also under "hooks", which skips only the coupling check): an optimised parameter
        # that no recorded Linear call owns but the rows reach (a convolution's, an embedding's) has no hook
        # formula; a zero column would freeze it and bend the step of the others. Structurally reachable: used.
        uncovered = [p for p in params if id(p) not in rec.covered] if known is None else []
        gs = torch.autograd.grad(out.sum(), outs + uncovered, retain_graph=verify or bool(uncovered), allow_unused=True)
        if any(g is not None for g in gs[len(outs) :]):
            self._remember(key, False)
            return JacobianResult(out.detach(), exact(out), exact_name)
        pieces: dict[int, torch.Tensor] = {}
        for c, g in zip(calls, gs):
            if g is None:
                continue
            jw, jb = _per_sample_linear(c, g, n)
            for p, piece in ((c.module.weight, jw), (getattr(c.module, "bias", None), jb)):
                if p is None or id(p) not in param_ids:
                    continue
                prev = pieces.get(id(p))
                pieces[id(p)] = piece if prev is None else prev + piece
        cols = [
            pieces[id(p)] if id(p) in pieces else torch.zeros(n, p.numel(), dtype=p.dtype, device=p.device)
            for p in params
        ]
        J = torch.cat(cols, dim=1)

        if verify:
            ok = agrees_with_a_vjp(out, params, J, seed=self.seed)
            self._remember(key, ok)
            if not ok:
                return JacobianResult(out.detach(), exact(out), exact_name)
        return JacobianResult(out.detach(), J, "hooks")


class DenseRoute:
    """The materialised route: the ``(N, P)`` Jacobian by the verified hook path or by autograd.

    A :class:`~sven.linearize.base.Route` over :class:`PerSampleJacobian`
    (``method`` ``"auto"``, ``"hooks"`` or ``"autograd"``).
    """

    name = "dense"

    def __init__(self, method: str = "auto", *, seed: int = 0) -> None:
        self.per_sample = PerSampleJacobian(method, seed=seed)

    def __call__(self, closure: Callable[[], Any], params: Sequence[torch.Tensor], rows: RowSpec) -> Linearization:
        res = self.per_sample(closure, params, rows=rows)
        return Linearization(res.output, res.output, res.jacobian, res.method)
