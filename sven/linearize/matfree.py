r"""Matrix-free per-sample Jacobians: products with :math:`M` without forming it.

For a model without supported layer structure Sven still needs the Jacobian
:math:`M_{\alpha i} = \partial R_\alpha / \partial \theta_i` of the ``N`` rows
(per-sample losses or residuals) with respect to the ``P`` parameters. Forming it
costs ``N * P`` numbers. The operators here only apply it:

.. math::

    X \mapsto M X \quad (P \times r \to N \times r), \qquad
    U \mapsto M^\top U \quad (N \times r \to P \times r),

a chunk of ``chunk_size`` columns at a time, so the memory is
``O(P * chunk_size)`` beyond the model's own graph. They satisfy
:class:`truncpinv.LinearOperator`, so every matrix-free solver accepts them::

    op = ClosureJacobian.from_closure(closure, params, chunk_size=16)
    F = truncpinv.pinv(op, rank=16, solver=truncpinv.Lanczos())
    step = F @ op.output

Columns follow the order of the parameters, each flattened row-major, as in
:func:`sven.linearize.dense.autograd_jacobian`.

:class:`ClosureJacobian`
    Works on the autograd graph that a closure built. ``M^T U`` is a batched
    backward pass; ``M X`` uses the *double-backward trick*: with a dummy
    :math:`u \in \mathbb{R}^N`, :math:`g(u) = M^\top u` is computed with
    ``create_graph=True``; since :math:`g` is linear in :math:`u`,

    .. math::

        \frac{\partial}{\partial u} \langle g(u), x \rangle = M x,

    so a second (batched) backward pass through the graph of ``g`` gives
    ``M X``. The graph of ``g`` is built once, on the first ``matmat``.

:class:`~sven.linearize.functional.FunctionalJacobian`
    Works on a function ``f(params) -> rows``: ``M X`` by forward-mode AD
    (:func:`torch.func.jvp`), ``M^T U`` by :func:`torch.func.vjp`, both
    batched by :func:`torch.func.vmap` with ``chunk_size``. Where an operation
    has no forward-mode derivative it falls back to the double-backward trick
    (:func:`torch.func.vjp` of the linear map ``u -> M^T u``), once and for all.

:func:`gram_from_operator`
    ``K = M M^T`` in float64 within the same memory bound (``O(P * chunk + N^2)``).
    :func:`truncpinv.solvers.gram_eigen.gram` applies an operator to the whole
    ``N x N`` identity at once, which forms the ``P x N`` matrix ``M^T``.

Batched backward passes (``is_grads_batched=True``) run on PyTorch's legacy
batching rules, which fall back to a per-column loop for operators without a
rule (``gelu_backward`` for one; the rest of the pass stays batched). Measured
on a shared 2-core CPU, one thread, a 3-layer MLP of width 128 (``N = 64``,
``P = 20865``), as the ratio of loop time to batched time in the same run:
``M^T U`` 0.53 to 1.95 with GELU and 0.71 to 2.45 with tanh (``r`` = 8 or 64
columns, three runs), ``M X`` 1.8 to 2.3 with either. Batching usually wins,
but not always, and the ranking changed between runs. ``batching="auto"``
therefore times both ways on the first chunks and keeps the faster (see
:class:`ClosureJacobian`); there, a single column always runs unbatched (the
batched call cost 4x more for one column in the same measurements).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from truncpinv import LinearOperator

from .base import Linearization, RowSpec, WithGram, strided

__all__ = ["BATCHING_MODES", "ClosureJacobian", "MatfreeRoute", "gram_from_operator"]

#: Accepted values of ``batching``.
BATCHING_MODES = ("auto", "batched", "loop")
_Kind = Literal["matmat", "rmatmat"]
_Product = Callable[[torch.Tensor], torch.Tensor]

_WARMED_UP = False
#: ``M X`` needs the backward pass to be differentiable once more.
_NO_DOUBLE_BACKWARD = (
    "M X by the double-backward trick is not available: a backward step of the closure's graph is not "
    "differentiable (e.g. a once_differentiable autograd.Function); use the materialised Jacobian "
    "(jacobian='autograd') or products with M^T only"
)


def _warm_up_batched_grad() -> None:
    """Pay the one-time cost of PyTorch's batched backward (~0.3 s per process) before timing it."""
    global _WARMED_UP
    if _WARMED_UP:
        return
    a = torch.ones(2, requires_grad=True)
    with torch.enable_grad():  # solvers call the operator under no_grad
        torch.autograd.grad((a * a).sin(), a, torch.eye(2), is_grads_batched=True)
    _WARMED_UP = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}")


def _check_block(X: Any, name: str, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``X`` as a ``(rows, r)`` tensor of the operator's dtype, or a ValueError/TypeError."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() != 2 or X.shape[0] != rows:
        raise ValueError(f"`{name}` must have shape ({rows}, r), got {tuple(X.shape)}")
    if not (X.is_floating_point()):
        raise TypeError(f"`{name}` must have a floating dtype, got {X.dtype}")
    return X.to(dtype=dtype, device=device)


class _Batching:
    """Chooses, per product, between one batched call per chunk and a loop over its columns.

    ``"auto"`` starts undecided: a chunk of one column runs the loop; the first
    chunk of two or more columns runs batched, the next one the loop, each timed
    per column (their results are used, nothing is computed twice). From then
    on the faster way is used. If the batched call raises a ``RuntimeError`` (an
    operation whose backward cannot be batched) the loop is used from then on.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.device = device
        fixed = None if mode == "auto" else mode
        self.choice: dict[str, str | None] = {"matmat": fixed, "rmatmat": fixed}
        self.per_column: dict[str, dict[str, float]] = {"matmat": {}, "rmatmat": {}}

    def run(self, kind: _Kind, block: torch.Tensor, batched: _Product, single: _Product) -> torch.Tensor:
        """Rows of ``block`` (``(c, k)``) through the product: ``(c, m)``."""
        times = self.per_column[kind]
        if self.mode == "batched":
            return batched(block)
        if self.mode == "loop" or block.shape[0] == 1:  # auto: one column is not worth batching
            if self.choice[kind] is None and "loop" not in times:
                return self._timed(kind, "loop", block, lambda b: _loop(single, b))
            return _loop(single, block)
        if self.choice[kind] == "batched":
            return batched(block)
        if self.choice[kind] == "loop":
            return _loop(single, block)
        # undecided, two or more columns
        if "batched" not in times:
            _warm_up_batched_grad()
            try:
                return self._timed(kind, "batched", block, batched)
            except RuntimeError:
                self.choice[kind] = "loop"
                return _loop(single, block)
        return self._timed(kind, "loop", block, lambda b: _loop(single, b))

    def _timed(self, kind: _Kind, way: str, block: torch.Tensor, fn: _Product) -> torch.Tensor:
        _sync(self.device)
        t0 = time.perf_counter()
        res = fn(block)
        _sync(self.device)
        times = self.per_column[kind]
        times[way] = (time.perf_counter() - t0) / block.shape[0]
        if len(times) == 2:
            self.choice[kind] = min(times, key=times.__getitem__)
        return res


def _loop(single: _Product, block: torch.Tensor) -> torch.Tensor:
    return torch.stack([single(row) for row in block])


def _chunks(r: int, chunk_size: int | None) -> range:
    return range(0, r, chunk_size or max(r, 1))


class ClosureJacobian:
    r"""The per-sample Jacobian of a closure's rows as a matrix-free operator.

    ``M`` is the ``N x P`` Jacobian of the 1-D ``out`` (with its autograd graph)
    with respect to ``params``:

    * ``rmatmat(U) = M^T U``: ``torch.autograd.grad(out, params, grad_outputs=U^T,
      is_grads_batched=True)`` on ``chunk_size`` columns at a time;
    * ``matmat(X) = M X``: the double-backward trick. With ``u`` a dummy
      ``(N,)`` leaf, ``g(u) = M^T u`` is built once with ``create_graph=True``
      (a graph about the size of the backward pass); then
      ``M X = \partial_u \langle g(u), X \rangle``, one batched backward pass
      through ``g`` per chunk. The operator is the exact Jacobian for any graph,
      including ones that couple samples (BatchNorm in training mode).

    The graph of ``out`` is retained as long as the operator lives.

    Args:
        out: ``(N,)`` rows with an autograd graph (run the closure under
            :func:`torch.enable_grad`).
        params: the parameters, the columns of ``M`` in this order (each
            flattened row-major). Parameters that ``out`` does not depend on
            give zero columns.
        chunk_size: columns per batched backward pass (``None``: all at once).
            Memory ``O(P * chunk_size)``.
        batching: ``"batched"`` (``is_grads_batched=True``), ``"loop"`` (one
            backward pass per column) or ``"auto"`` (time both on the first
            chunks and keep the faster; the loop if batching fails).
        probe: the ``(N,)`` point ``u`` at which ``g(u) = M^T u`` is recorded
            (default zeros). ``M X`` does not depend on it (``g`` is linear in
            ``u``), but the value of ``g`` is then the exact first-order
            vector-Jacobian product ``M^T u`` (:meth:`probe_vjp`): a check of
            the double-backward columns that costs no further pass.

    Attributes:
        output: the rows, detached.
        stats: ``matvecs`` (columns through either product), ``forward``
            (columns of ``M X``), ``adjoint`` (columns of ``M^T U``), and the
            way chosen for each product (``batching``).

    Example:
        >>> import torch, truncpinv
        >>> from sven.linearize.matfree import ClosureJacobian
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(10, 3), torch.randn(10)
        >>> op = ClosureJacobian.from_closure(lambda: model(x).squeeze(1) - y, list(model.parameters()))
        >>> op.shape
        (10, 41)
        >>> F = truncpinv.pinv(op, rank=4, solver=truncpinv.Lanczos())
        >>> (F @ op.output).shape
        torch.Size([41])
    """

    def __init__(
        self,
        out: torch.Tensor,
        params: Sequence[torch.Tensor],
        *,
        chunk_size: int | None = None,
        batching: Literal["auto", "batched", "loop"] = "auto",
        probe: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"`out` must be a torch.Tensor, got {type(out).__name__}")
        if out.dim() != 1:
            raise ValueError(f"`out` must be 1-D (one entry per row), got shape {tuple(out.shape)}")
        if not out.is_floating_point():
            raise TypeError(f"`out` must have a floating dtype, got {out.dtype}")
        if not out.requires_grad:
            raise ValueError(
                "`out` has no autograd graph: compute it under torch.enable_grad() from parameters "
                "that require grad (not from detached tensors)"
            )
        params = list(params)
        if not params:
            raise ValueError("`params` must contain at least one tensor")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                got = "a tensor with requires_grad=False" if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"`params[{i}]` must be a tensor that requires grad, got {got}")
        _check_chunk_size(chunk_size)
        if batching not in BATCHING_MODES:
            raise ValueError(f"`batching` must be one of {list(BATCHING_MODES)}, got {batching!r}")
        self._out = out
        self._params = params
        self._numels = [p.numel() for p in params]
        self.chunk_size = chunk_size
        self.output = out.detach()
        self._batching = _Batching(batching, out.device)
        self._dual: tuple[torch.Tensor, list[tuple[int, torch.Tensor]]] | None = None
        if probe is not None and tuple(probe.shape) != (int(out.shape[0]),):
            raise ValueError(f"`probe` must have shape ({int(out.shape[0])},) like `out`, got {tuple(probe.shape)}")
        self._probe = probe
        self.stats: dict[str, Any] = {"matvecs": 0, "forward": 0, "adjoint": 0, "batching": self._batching.choice}

    @classmethod
    def from_closure(
        cls,
        closure: Callable[[], torch.Tensor],
        params: Sequence[torch.Tensor],
        *,
        chunk_size: int | None = None,
        batching: Literal["auto", "batched", "loop"] = "auto",
    ) -> ClosureJacobian:
        """Run ``closure`` under :func:`torch.enable_grad` and wrap its ``(N,)`` rows (arguments as above)."""
        with torch.enable_grad():
            out = closure()
        return cls(out, params, chunk_size=chunk_size, batching=batching)

    # ------------------------------------------------------------------ protocol
    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._out.shape[0]), sum(self._numels))

    @property
    def dtype(self) -> torch.dtype:
        return self._out.dtype

    @property
    def device(self) -> torch.device:
        return self._out.device

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """``M^T Y`` for ``Y`` of shape ``(N, r)``; returns ``(P, r)``."""
        n, p = self.shape
        Y = _check_block(Y, "Y", n, self.dtype, self.device)
        r = Y.shape[1]
        res = torch.empty(p, r, dtype=self.dtype, device=self.device)
        Yt = Y.T
        for s in _chunks(r, self.chunk_size):
            block = Yt[s : s + (self.chunk_size or r)].contiguous()
            res[:, s : s + block.shape[0]] = self._batching.run("rmatmat", block, self._vjp_batched, self._vjp).T
        self._count("adjoint", r)
        return res

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """``M X`` for ``X`` of shape ``(P, r)``; returns ``(N, r)``."""
        n, p = self.shape
        X = _check_block(X, "X", p, self.dtype, self.device)
        r = X.shape[1]
        res = torch.empty(n, r, dtype=self.dtype, device=self.device)
        _, gs = self._dual_graph()
        Xt = X.T
        for s in _chunks(r, self.chunk_size):
            block = Xt[s : s + (self.chunk_size or r)]
            if not gs:  # out does not depend on params at all
                res[:, s : s + block.shape[0]] = 0
                continue
            res[:, s : s + block.shape[0]] = self._batching.run("matmat", block, self._jvp_batched, self._jvp).T
        self._count("forward", r)
        return res

    # ------------------------------------------------------------------ products
    def _count(self, key: str, r: int) -> None:
        self.stats[key] += r
        self.stats["matvecs"] += r

    def _flatten(self, grads: Sequence[torch.Tensor | None], c: int | None) -> torch.Tensor:
        """Concatenate per-parameter gradients (with a leading batch of ``c``, or none) into rows."""
        lead = () if c is None else (c,)
        cols = [
            torch.zeros(*lead, k, dtype=self.dtype, device=self.device)
            if g is None
            else strided(g).reshape(*lead, k).to(self.dtype)
            for g, k in zip(grads, self._numels)
        ]
        return torch.cat(cols, dim=-1)

    def _vjp_batched(self, Ut: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(
            self._out, self._params, grad_outputs=Ut, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        return self._flatten(grads, Ut.shape[0])

    def _vjp(self, u: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(self._out, self._params, grad_outputs=u, retain_graph=True, allow_unused=True)
        return self._flatten(grads, None)

    def _dual_graph(self) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """The dummy ``u`` and the pieces ``(index, g_i(u))`` of ``g(u) = M^T u`` that depend on ``u``."""
        if self._dual is None:
            if self._probe is None:
                u = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device, requires_grad=True)
            else:
                u = self._probe.detach().to(self.dtype).clone().requires_grad_(True)
            with torch.enable_grad():
                gs = torch.autograd.grad(
                    self._out, self._params, grad_outputs=u, create_graph=True, retain_graph=True, allow_unused=True
                )
            # A parameter that the rows use has a piece J_i^T u that is linear in u and recorded with
            # create_graph. A piece without a graph means a backward step did not record itself (a
            # ``once_differentiable`` autograd.Function, a backward without a derivative): M X would
            # silently miss those columns, so it is refused.
            lost = [i for i, g in enumerate(gs) if g is not None and not g.requires_grad]
            if lost:
                raise RuntimeError(f"{_NO_DOUBLE_BACKWARD} (parameter(s) {lost})")
            self._dual = (u, [(i, g) for i, g in enumerate(gs) if g is not None])
        return self._dual

    def probe_vjp(self) -> torch.Tensor:
        """``M^T u`` at the ``probe`` ``u`` (``(P,)``): the value of the recorded ``g(u)``, exact to first order."""
        _, gs = self._dual_graph()
        pieces = dict(gs)
        return torch.cat(
            [
                pieces[i].detach().reshape(-1) if i in pieces else torch.zeros(n, dtype=self.dtype, device=self.device)
                for i, n in enumerate(self._numels)
            ]
        )

    def _split(self, Xt: torch.Tensor, lead: tuple[int, ...]) -> list[torch.Tensor]:
        """Per-parameter pieces of the rows ``Xt`` (``lead + (P,)``), shaped like the parameters."""
        _, gs = self._dual_graph()
        pieces = torch.split(Xt, self._numels, dim=-1)
        return [pieces[i].reshape(*lead, *g.shape).to(g.dtype) for i, g in gs]

    def _jvp_batched(self, Xt: torch.Tensor) -> torch.Tensor:
        u, gs = self._dual_graph()
        (res,) = torch.autograd.grad(
            [g for _, g in gs],
            u,
            grad_outputs=self._split(Xt, (Xt.shape[0],)),
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
        if res is None:
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        return res

    def _jvp(self, x: torch.Tensor) -> torch.Tensor:
        u, gs = self._dual_graph()
        (res,) = torch.autograd.grad(
            [g for _, g in gs], u, grad_outputs=self._split(x, ()), retain_graph=True, allow_unused=True
        )
        if res is None:
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        return res


def gram_from_operator(
    op: LinearOperator,
    chunk_size: int,
    *,
    method: Literal["auto", "pairs", "matmat"] = "auto",
    accumulate: torch.dtype = torch.float64,
) -> torch.Tensor:
    r"""``K = A A^T`` (``N x N``) of a wide operator ``A`` in ``accumulate``, in memory ``O(P * chunk + N^2)``.

    With ``E_i`` the ``i``-th block of ``chunk_size`` columns of the identity
    and ``W_i = A^T E_i`` (``P x chunk``, the rows of block ``i`` of ``A``):

    * ``"pairs"``: ``K_{ij} = W_i^T W_j`` for ``i <= j``, products accumulated
      in ``accumulate`` (exact products of float32 data). ``W_i`` is recomputed
      for every pair: ``c (c + 1) / 2`` blocks of ``A^T`` products for
      ``c = ceil(N / chunk)`` (two blocks held at a time).
    * ``"matmat"``: ``K_{:, i} = A W_i``: ``c`` blocks of ``A^T`` and ``c`` of
      ``A`` products, rounded in the operator's dtype (float32 operators:
      eigenvalue errors ``~ eps_{32} \sigma_{max}^2``, as for a float32 Gram
      matrix), then symmetrised.
    * ``"auto"``: ``"pairs"`` when ``c <= 4`` (no more products than
      ``"matmat"``, since a ``ClosureJacobian`` ``matmat`` costs about two
      backward passes) or when the operator's dtype is less precise than
      ``accumulate``; ``"matmat"`` otherwise.

    Args:
        op: an ``N x P`` operator (any :class:`truncpinv.LinearOperator`).
        chunk_size: identity columns per product.
        method: see above.
        accumulate: dtype of ``K``.

    Returns:
        The symmetric ``(N, N)`` Gram matrix.
    """
    if not all(hasattr(op, a) for a in ("shape", "dtype", "device", "matmat", "rmatmat")):
        raise TypeError(
            f"`op` must implement the truncpinv.LinearOperator protocol (shape, dtype, device, matmat, rmatmat), "
            f"got {type(op).__name__}"
        )
    _check_chunk_size(chunk_size)
    if chunk_size is None:
        raise ValueError("`chunk_size` must be a positive integer, got None")
    if method not in ("auto", "pairs", "matmat"):
        raise ValueError(f"`method` must be 'auto', 'pairs' or 'matmat', got {method!r}")
    n = op.shape[0]
    starts = list(range(0, n, chunk_size))
    if method == "auto":
        finer = torch.finfo(op.dtype).eps > torch.finfo(accumulate).eps
        method = "pairs" if len(starts) <= 4 or finer else "matmat"

    def rows(s: int) -> torch.Tensor:
        E = torch.zeros(n, min(chunk_size, n - s), dtype=op.dtype, device=op.device)
        E[s : s + E.shape[1]].fill_diagonal_(1)
        return op.rmatmat(E)

    K = torch.empty(n, n, dtype=accumulate, device=op.device)
    for i, si in enumerate(starts):
        Wi = rows(si)
        ei = si + Wi.shape[1]
        if method == "matmat":
            K[:, si:ei] = op.matmat(Wi).to(accumulate)
            continue
        Wi64 = Wi.to(accumulate)
        for sj in starts[i:]:
            Wj64 = Wi64 if sj == si else rows(sj).to(accumulate)
            Kij = Wi64.T @ Wj64
            if sj == si:  # a GEMM of W with itself need not be bit-symmetric
                Kij = 0.5 * (Kij + Kij.T)
            K[si:ei, sj : sj + Wj64.shape[1]] = Kij
            K[sj : sj + Wj64.shape[1], si:ei] = Kij.T
    if method == "matmat":
        K = 0.5 * (K + K.T)
    return K


class MatfreeRoute:
    """The matrix-free route: a :class:`ClosureJacobian` and its Gram matrix from :func:`gram_from_operator`.

    Any model; memory ``O(P * chunk_size + N^2)``. Not data-parallel.
    """

    name = "matfree"

    def __init__(self, chunk_size: int = 64) -> None:
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size

    def __call__(self, closure: Callable[[], Any], params: Sequence[torch.Tensor], rows: RowSpec) -> Linearization:
        op = ClosureJacobian.from_closure(lambda: rows(closure()), list(params), chunk_size=self.chunk_size)
        K = gram_from_operator(op, int(self.chunk_size or 64))
        out = op.output
        return Linearization(out, out, WithGram(op, K, out), "matfree")
