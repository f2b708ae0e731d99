r"""The Gram route: ``K = J J^T`` and ``J^T C`` from per-layer factors, never forming ``J``.

Sven's step needs the truncated pseudoinverse of the per-sample Jacobian
:math:`J \in \mathbb{R}^{N \times P}` of the ``N`` rows a closure returns. With
``N`` in the hundreds and ``P`` in the millions, the short side is all that
matters: ``K = J J^\top`` (``N x N``) gives the singular values and left
vectors (:func:`truncpinv.pinv_from_gram`), and one product ``J^\top C``
applies the pseudoinverse. Both come from the factors a single forward and a
single backward pass already compute (Goodfellow 2015; Dangel et al. 2020,
"BackPACK"; Bu et al. 2022, "ghost norm" clipping).

Factors
    During the closure a global forward hook records each call of a supported
    layer whose parameters are optimised: its input and its output ``z``. One
    backward pass of :math:`\sum_n \ell_n` gives :math:`g = \partial(\sum \ell)/\partial z`;
    if sample ``i`` only influences its own rows, :math:`g_i = \partial \ell_i / \partial z_i`.
    With ``D > 1`` rows per sample (``residuals=True``: rows shaped ``(B, D)``
    and flattened, row ``n = i D + d``) the backward is run once per column
    ``d`` with the cotangent :math:`e_d` in every sample (``D`` backward passes,
    the cost of a reverse-mode Jacobian of ``D`` outputs; a batched
    ``is_grads_batched`` backward measured no faster and falls back to slow
    loops for operators without a batching rule).
    Rows that are a fixed linear map of a tensor with a graph
    (:meth:`~sven.linearize.base.RowSpec.linear`: the loss rule's GGN rows,
    linear in :math:`\log p`) start each pass at that tensor with the
    cotangent ``coef[:, d]`` (:class:`~sven.linearize.base.LinearRows`): the
    same gradients, without the rows' own autograd nodes, which are built only
    for a fallback or the verification.

Per-layer Gram blocks (``t, s`` run over the extra dimensions of a call, e.g. a
sequence, and over repeated calls of a shared layer; :math:`b(n)` is the sample of row ``n``)
    * :class:`~torch.nn.Linear`: row ``n``'s weight gradient is
      :math:`\sum_t g_{nt} a_{b(n)t}^\top`, so

      .. math::

          K^W_{nm} = \sum_{t,s} (a_{b(n)t} \cdot a_{b(m)s})(g_{nt} \cdot g_{ms}),
          \qquad K^W = (A A^\top) \circ (G G^\top) \text{ without extra dimensions},

      and :math:`(J^\top c)_W = \sum_{n,t} c_n g_{nt} a_{b(n)t}^\top` (:math:`G^\top \mathrm{diag}(c) A`).
      The bias is the same with :math:`a = 1`; weight and bias of one layer share
      one block (``a`` gets a column of ones). The pair sum costs
      :math:`\sim (BT)^2 d_{in} + (NT)^2 d_{out}`; materialising the per-row
      gradients (``N x d_out d_in``) and their Gram matrix costs
      :math:`\sim N T d_{in} d_{out} + N^2 d_{in} d_{out}`. Each layer takes the
      cheaper of the two (for ``T = 1`` always the pair sum).
    * :class:`~torch.nn.Conv1d`, :class:`~torch.nn.Conv2d` (``groups=1``, any
      stride, padding, dilation and ``padding_mode``): the input is padded and
      unfolded into patches, then it is a Linear layer with ``T`` = output positions
      and weight ``(C_out, C_in k)``.
    * :class:`~torch.nn.Embedding`: row ``n``'s gradient is
      :math:`\sum_t e_{idx_{b(n)t}} g_{nt}^\top`, so
      :math:`K_{nm} = \sum_{t,s} [idx_{b(n)t} = idx_{b(m)s}] (g_{nt} \cdot g_{ms})`;
      for long sequences the per-row gradients restricted to the ``U`` distinct
      indices of the batch are formed instead (whichever is cheaper).
      ``J^T c`` is an ``index_add``. Positions at ``padding_idx`` get no gradient.
      Indices without the batch dimension (shared positions, ``pos(arange(T))``)
      are recorded where the output is broadcast over the batch, with the
      indices expanded alike (:mod:`sven.linearize.broadcast`).
    * :class:`~torch.nn.MultiheadAttention`: its four projections are Linear
      calls; an input projection by rows ``[r_0, r_1)`` of the packed
      ``in_proj_weight`` contributes ``g`` placed in those rows (zero in the
      others) (:mod:`sven.linearize.attention`).
    * :class:`~torch.nn.LayerNorm`, :class:`~torch.nn.RMSNorm`: the per-row
      gradients :math:`\sum_t g_{nt} \circ \hat x_{b(n)t}` (weight) and
      :math:`\sum_t g_{nt}` (bias) are small (``N x d``) and are formed.
    * :class:`~torch.nn.RNN`, :class:`~torch.nn.GRU`, :class:`~torch.nn.LSTM`:
      two Linear layers over the sequence, ``(W_ih, b_ih)`` on the inputs and
      ``(W_hh, b_hh)`` on the previous hidden states, with ``g`` the gradients
      of the gate pre-activations (:mod:`sven.linearize.gram_rnn` rebuilds the
      outputs so that one backward pass gives them).

    A parameter shared by layers of different kinds (tied embeddings) has its
    per-row gradients formed from every call and summed. ``K`` is the sum of
    the blocks, accumulated in float64 (the factors are cast for the Gram
    products); ``J^T C`` and ``J X`` are computed in the parameters' dtype, at
    least float32 (bfloat16/float16 models and ``torch.autocast``: the
    half-precision factors are cast).

What is *unsupported* (:class:`Unsupported`, with a reason naming the layer or parameter)
    * an optimised parameter owned by a module of another type (BatchNorm's
      affine parameters, a custom module's own ``nn.Parameter``), or used
      outside the forward of a supported layer (found in the backward: it
      receives a gradient although no supported layer used it);
    * Conv with ``groups > 1``, transposed convolutions, Conv3d, Embedding with
      ``max_norm`` or ``scale_grad_by_freq``, a recurrent layer with dropout
      between layers in training mode, ``proj_size > 0`` or a
      ``PackedSequence``, a supported layer applied to an
      unbatched input or to one whose leading dimension is not the batch size,
      a recorded output modified in place (``ReLU(inplace=True)``),
      MultiheadAttention with ``add_bias_kv=True`` (``bias_k``/``bias_v`` optimised),
      shared positions used other than broadcast over the batch by ``+ - * /``;
    * a layer that couples the samples: BatchNorm in training mode (detected
      from its type and ``training`` flag) and anything else (a loss normalised
      over the batch, attention across the batch...), detected by the
      verification below.

Verification
    As in :mod:`sven.linearize.dense`, the first time a forward structure is seen
    (the modules called, their ``training`` flags, the parameters, ``D`` and the closure's own
    arithmetic after the model, :func:`~sven.linearize.base.graph_head`),
    :math:`J^\top u` from the factors is compared with the exact
    vector-Jacobian product for a random ``u`` (seeded); a mismatch marks the
    structure unsupported from then on.

For the optimizer: rows scaled by ``s`` (``M = diag(s) J``) and microbatch
averages (``M = S J``) are :func:`row_transform`\ s, whose ``gram`` is
:math:`S K S^\top` and whose products go through ``J``; hand them to
:func:`truncpinv.pinv_from_gram`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._validation import _is_real
from .base import Declined, Linearization, LinearRows, RowSpec, Unsupported, graph_head, strided
from .gram_bn import BATCHNORM_MODES, add_coupling, coupling
from .gram_factors import GramJacobian, Piece, call_pieces, make_blocks
from .recorder import Labels, Recorder, recording, supported_modules

__all__ = ["GramJacobian", "GramRoute", "LayerGram", "supported_modules"]

#: Verification outcomes kept per instance (bounded, as in :mod:`sven.linearize.dense`).
_MAX_CACHED = 256


def _batch_size(raw: Any, n: int, rec: Recorder) -> int | str:
    """The batch size ``B`` (``N = B D``): the closure output's, or the calls' common, leading dimension."""
    leads = [c.inp.shape[0] for c in rec.calls]
    cands = [int(raw.shape[0])] if isinstance(raw, torch.Tensor) and raw.dim() >= 1 and raw.shape[0] > 0 else []
    cands += leads[:1]
    for b in cands:
        if n % b == 0 and all(lead == b for lead in leads):
            return b
    if not rec.calls:
        return cands[0] if cands and n % cands[0] == 0 else n
    b = cands[0]
    bad = next((c for c in rec.calls if c.inp.shape[0] != b), rec.calls[0])
    hint = ""
    if bad.kind is nn.Embedding and (bad.inp.dim() == 1 or bad.inp.shape[0] == 1):
        hint = (
            "; an Embedding on indices without the batch dimension (shared positions) is served when its output is "
            "broadcast over the batch by +, -, * or / directly (e.g. `tok(idx) + pos(torch.arange(T))`)"
        )
    return (
        f"{rec.describe(bad.module)} was called on an input of shape {tuple(bad.inp.shape)} whose leading "
        f"dimension is not the batch size {b} of the {n} rows{hint}"
    )


# --------------------------------------------------------------------------- the entry point
class LayerGram:
    """Computes :class:`GramJacobian`\\ s of a closure's rows from per-layer factors.

    Args:
        seed: seed of the random probe vector used for verification.
        verify: verify each new forward structure against an exact
            vector-Jacobian product (one extra backward pass, first sight
            only). ``False`` trusts that every layer treats samples independently.
        batchnorm: BatchNorm with batch statistics (training mode). ``"exact"``
            (default): the per-sample factors plus the exact low-rank coupling
            term of :mod:`sven.linearize.gram_bn` (``J`` is the autograd
            Jacobian). ``"frozen"``: the batch statistics are held constant
            in the linearisation (an approximation; the verification then
            compares with the same approximation).

    The instance keeps the verification outcomes: keep one per optimizer.

    Example:
        >>> import torch, truncpinv
        >>> from sven.linearize import LayerGram
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        >>> x, y = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> G = LayerGram()(lambda: ((model(x) - y) ** 2).sum(-1), list(model.parameters()), rows=lambda t: t)
        >>> G.gram.shape, G.shape
        (torch.Size([16, 16]), (16, 33))
        >>> F = truncpinv.pinv_from_gram(G.gram, G, rank=8)
    """

    def __init__(self, *, seed: int = 0, verify: bool = True, batchnorm: str = "exact") -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
        if not isinstance(verify, bool):
            raise TypeError(f"`verify` must be a bool, got {verify!r}")
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"`batchnorm` must be one of {list(BATCHNORM_MODES)}, got {batchnorm!r}")
        self.seed = seed
        self.verify = verify
        self.batchnorm = batchnorm
        # structure -> None (verified) or the reason it is unsupported
        self._verified: dict[tuple[Any, ...], str | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        # outcomes are keyed by object ids: not meaningful elsewhere
        return {"seed": self.seed, "verify": self.verify, "batchnorm": self.batchnorm, "_verified": {}}

    def _remember(self, key: tuple[Any, ...], reason: str | None) -> None:
        if len(self._verified) >= _MAX_CACHED:
            self._verified.clear()
        self._verified[key] = reason

    def __call__(
        self,
        closure: Callable[[], Any],
        params: Sequence[torch.Tensor],
        *,
        rows: Callable[[Any], torch.Tensor],
        names: Sequence[str] | None = None,
        max_rows: int | None = None,
    ) -> GramJacobian | Unsupported:
        """Run ``closure`` (with grad enabled) and return ``K = J J^T`` and the products with ``J``.

        Args:
            closure: re-evaluates the model; its return value goes through ``rows``.
            params: the parameters (columns of ``J``, in this order).
            rows: turns the closure's return value into the 1-D rows with a graph
                (``(B,)`` losses, or ``(B, D)`` residuals flattened row-major).
            names: optional parameter names, for the reasons of :class:`Unsupported`.
            max_rows: decline (:class:`~sven.linearize.base.Declined`) when the closure returns more rows:
                the ``N x N`` Gram matrix would cost more than the materialised Jacobian. ``None``: never.

        Returns:
            A :class:`GramJacobian`, or :class:`Unsupported` (or :class:`Declined`) with the reason and the
            rows (graph kept) for an exact fallback.
        """
        params = list(params)
        if not params:
            raise ValueError("`params` must hold at least one parameter (the columns of J)")
        if names is not None and len(names) != len(params):
            raise ValueError(f"`names` must name each of the {len(params)} parameters, got {len(names)} names")
        labels = Labels(params, names)
        index = {id(p): i for i, p in enumerate(params)}
        rec = Recorder(index, labels)
        with torch.enable_grad():
            with recording(rec):
                raw = closure()
            head = _linear(rows, raw)  # rows linear in a tensor with a graph: no graph of their own (below)
            out = rows(raw) if head is None else head.detached().reshape(-1)  # (rows(raw) under no_grad: no graph)
        if not isinstance(out, torch.Tensor) or out.dim() != 1:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"`rows` must return the rows as a 1-D tensor, got {got}")
        graph = _graph_of(out, head)  # the rows with their graph, for a fallback and the verification
        if not (out if head is None else head.base).requires_grad:
            raise ValueError(
                "the closure's output does not depend on the optimised parameters (it has no autograd graph); "
                "do not compute it under torch.no_grad() or from detached tensors, "
                "nor call the step inside torch.inference_mode()"
            )
        n = int(out.shape[0])
        if max_rows is not None and n > max_rows:
            return Declined(f"{n} rows outnumber the {max_rows} the Gram route takes here", graph())
        if rec.problem is not None:
            return Unsupported(rec.problem, graph())
        for c in rec.calls:
            if c.out._version != c.version:
                return Unsupported(
                    f"the output of {rec.describe(c.module)} was modified in place (e.g. by ReLU(inplace=True)); "
                    f"use the out-of-place operation",
                    graph(),
                )
        B = _batch_size(raw, n, rec)
        if isinstance(B, str):
            return Unsupported(B, graph())
        D = n // B
        if head is not None and tuple(head.coef.shape[:2]) != (B, D):
            head = None  # (not one row per column of the coefficients: the rows' own graph)
            out = graph()
        key = (tuple(rec.structure), tuple(index), D, graph_head(raw if isinstance(raw, torch.Tensor) else out))
        seen = key in self._verified
        known = self._verified.get(key)
        if known is not None:
            return Unsupported(known, graph())
        verify = self.verify and not seen
        uncovered = [p for p in params if id(p) not in rec.covered]
        coupled = any(c.stats is not None for c in rec.calls)
        # the least precise dtype of the computation (bfloat16 models, torch.autocast): the verification's tolerance
        low = (
            max((*(p.dtype for p in params), *(c.out.dtype for c in rec.calls)), key=lambda t: torch.finfo(t).eps)
            if verify
            else torch.float32  # (unused: nothing to verify)
        )
        outs: list[Any] = [c.out for c in rec.calls]
        like = [(c.out.shape, c.out.dtype) for c in rec.calls]
        if not coupled:
            # the backward reaches the recorded outputs through their graph edges: holding no reference to
            # them, autograd frees each as soon as its own backward has run (the BatchNorm term needs them)
            outs = [torch.autograd.graph.get_gradient_edge(z) for z in outs]
            for c in rec.calls:
                c.release_output()
        rec.switch.frozen = True  # the per-sample factors: batch statistics held constant
        try:
            gs, used = _backward(
                out if head is None else head, outs, like, uncovered, B, D, retain=verify or bool(uncovered) or coupled
            )
        finally:
            rec.switch.frozen = False
        del outs
        if used:
            which = ", ".join(labels[index[id(p)]] for p in used)
            outside = f"parameter(s) {which} are used outside the forward of a supported layer"
            self._remember(key, outside)
            return Unsupported(outside, graph(), quiet=not rec.calls)

        # the products in the parameters' dtype, at least float32 (bfloat16/float16 models: the factors are cast)
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
        pieces: dict[int, list[tuple[int, Piece]]] = {}
        with torch.no_grad():
            for ci, (c, g) in enumerate(zip(rec.calls, gs)):
                if g is None:
                    continue
                for i, piece in call_pieces(c.module, c.kind, c.inp, g, B, D, index, c.stats, c.linear):
                    pieces.setdefault(i, []).append((ci, piece))
            if not coupled:  # the pieces hold what is needed: the recorded outputs and whole gradients can go
                rec.calls.clear()
                gs = []
            blocks = make_blocks(pieces, D, dtype)
            del pieces
            K = _sum_of_blocks(blocks, n, out.device)
        G = GramJacobian(out.detach(), K, blocks, [p.numel() for p in params], dtype=dtype, rows_per_sample=D)
        if coupled and self.batchnorm == "exact":
            term = coupling(rec.calls, gs, params, B, D, rec.switch)
            if isinstance(term, str):
                self._remember(key, term)
                return Unsupported(term, graph())
            if term is not None:
                with torch.no_grad():
                    add_coupling(G, *term)
        if verify:
            rec.switch.frozen = coupled and self.batchnorm == "frozen"  # compare with the same linearisation
            try:
                decided, reason = self._check(graph(), params, G, labels, low)
            finally:
                rec.switch.frozen = False
            if decided:
                self._remember(key, reason)
            if reason is not None:
                return Unsupported(reason, graph())
        return G

    def _check(
        self, out: torch.Tensor, params: list[torch.Tensor], G: GramJacobian, labels: Labels, low: torch.dtype
    ) -> tuple[bool, str | None]:
        """Compare ``J^T u`` with the exact vector-Jacobian product for a random ``u``.

        ``low``: the least precise dtype of the computation (parameters and recorded outputs: bfloat16 models,
        ``torch.autocast``), which sets the tolerance.

        Returns ``(decided, reason)``: ``reason`` is ``None`` when they agree;
        with non-finite rows nothing is decided (checked again next time).
        """
        gen = torch.Generator(device=out.device)
        gen.manual_seed(self.seed)
        u = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
        exact = [
            None if e is None else strided(e)
            for e in torch.autograd.grad(out, params, grad_outputs=u, retain_graph=True, allow_unused=True)
        ]
        with torch.no_grad():
            mine = torch.split(G.rmatmat(u[:, None].to(G.dtype))[:, 0].double(), [p.numel() for p in params])
            scale = math.sqrt(max(float(G.gram.diagonal().sum()), 0.0)) * float(u.double().norm())
            if not math.isfinite(scale) or not all(e is None or bool(torch.isfinite(e).all()) for e in exact):
                return False, None
            eps = max(torch.finfo(G.dtype).eps, torch.finfo(out.dtype).eps, torch.finfo(low).eps)
            # 1e3 eps of the scale bound |J^T u| <= sqrt(tr K) |u|, and at most 2% of it: with bfloat16/float16
            # layers autograd's own products are rounded to ~eps, and a coupling still shows as an O(1) error
            tol = min(1e3 * eps, 0.02) * scale
            bad = []
            for i, (e, m) in enumerate(zip(exact, mine)):
                ref = torch.zeros_like(m) if e is None else e.reshape(-1).double()
                if not float((m - ref).norm()) <= tol:
                    bad.append(labels[i])
        if not bad:
            return True, None
        return True, (
            f"the layer-factor J^T u disagrees with autograd for parameter(s) {', '.join(bad)}: a layer couples "
            f"the samples of the batch (BatchNorm in training mode, a loss normalised over the batch, ...) or the "
            f"parameter is also used outside a supported layer"
        )


def _linear(rows: Callable[[Any], torch.Tensor], raw: Any) -> LinearRows | None:
    """``rows.linear(raw)`` where ``rows`` is a :class:`~sven.linearize.base.RowSpec` that gives the rows as
    :class:`~sven.linearize.base.LinearRows` of a ``(B, C)`` tensor with a graph, else ``None``."""
    head = rows.linear(raw) if isinstance(rows, RowSpec) else None
    return head if isinstance(head, LinearRows) and head.base.dim() == 2 and head.coef.dim() == 3 else None


def _graph_of(out: torch.Tensor, head: LinearRows | None) -> Callable[[], torch.Tensor]:
    """The flattened rows with their graph: ``out`` itself, or built from ``head`` once, on first use."""
    if head is None:
        return lambda: out
    built: list[torch.Tensor] = []

    def graph() -> torch.Tensor:
        if not built:
            with torch.enable_grad():
                built.append(head.graph().reshape(-1))
        return built[0]

    return graph


def _sum_of_blocks(blocks: Sequence[Any], n: int, device: torch.device) -> torch.Tensor:
    """``K``: the sum of the blocks' ``n x n`` float64 Gram matrices, in block order (the first one is the start of
    the sum, as ``0 + K_0`` is ``K_0``: no zero matrix and no extra pass)."""
    K: torch.Tensor | None = None
    for blk in blocks:
        part = blk.gram()
        if K is None:
            K = part if part.dtype == torch.float64 and part.is_contiguous() else part.to(torch.float64).contiguous()
        else:
            K += part
    return torch.zeros(n, n, dtype=torch.float64, device=device) if K is None else K


def _backward(
    out: torch.Tensor | LinearRows,
    outs: list[Any],
    like: list[tuple[torch.Size, torch.dtype]],
    uncovered: list[torch.Tensor],
    B: int,
    D: int,
    *,
    retain: bool,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    """Per-row gradients at the recorded outputs, ``(N, ...)``, and the uncovered parameters that are used.

    One backward pass of ``sum(rows)`` when ``D = 1``; otherwise one per
    column ``d`` of the ``(B, D)`` rows (cotangent ``e_d`` in every sample).
    ``outs``: the recorded outputs or their gradient edges; ``like``: their shapes and dtypes.
    Rows given as :class:`~sven.linearize.base.LinearRows` (``coef`` of shape ``(B, D, C)``): each pass starts at
    their ``base`` with the cotangent ``coef[:, d]``, what the rows' own backward would hand it.
    """
    inputs = outs + uncovered
    if not inputs:
        return [], []
    like_device = (out.base if isinstance(out, LinearRows) else out).device
    per_d: list[tuple[torch.Tensor | None, ...]] = []
    used: list[torch.Tensor] = []
    for d in range(D):
        if isinstance(out, LinearRows):
            src, go = out.base, out.coef[:, d]
        elif D == 1:
            src, go = out, torch.ones_like(out)
        else:
            go = torch.zeros(B, D, dtype=out.dtype, device=out.device)
            go[:, d] = 1
            src, go = out, go.reshape(-1)
        ins = inputs if d == 0 else outs
        gs = torch.autograd.grad(src, ins, grad_outputs=go, retain_graph=retain or d < D - 1, allow_unused=True)
        if d == 0:
            # structurally reachable from the rows: used, whatever the value of the gradient
            used = [p for p, g in zip(uncovered, gs[len(outs) :]) if g is not None]
            if used:
                return [], used
        per_d.append(tuple(gs[: len(outs)]))
    if D == 1:
        return list(per_d[0]), []
    result: list[torch.Tensor | None] = []
    for j, (shape, dtype) in enumerate(like):
        col = [gd[j] for gd in per_d]
        if all(g is None for g in col):
            result.append(None)
            continue
        full = [torch.zeros(shape, dtype=dtype, device=like_device) if g is None else g for g in col]
        result.append(torch.stack(full, dim=1).reshape(B * D, *shape[1:]))
    return result, []


class GramRoute:
    """The layer-factor Gram route as a :class:`~sven.linearize.base.Route`: :class:`LayerGram` on the closure.

    Returns a :class:`~sven.linearize.base.Linearization` whose ``jacobian`` is
    the :class:`GramJacobian` (``K`` in float64 plus the products), or
    :class:`~sven.linearize.base.Unsupported` naming the layer it cannot handle.

    ``tall_ratio``: decline (:class:`~sven.linearize.base.Declined`) a closure
    with more than ``tall_ratio * P`` rows, before the backward pass (``None``:
    never; :class:`~sven.linearize.auto.Linearizer` sets
    :data:`~sven.linearize.auto.TALL_RATIO` under ``jacobian="auto"``).
    """

    name = "gram"

    def __init__(
        self, *, seed: int = 0, verify: bool = True, batchnorm: str = "exact", tall_ratio: float | None = None
    ) -> None:
        if tall_ratio is not None and not (_is_real(tall_ratio) and math.isfinite(tall_ratio) and tall_ratio > 0):
            raise ValueError(f"`tall_ratio` must be a positive finite number or None, got {tall_ratio!r}")
        self.layer_gram = LayerGram(seed=seed, verify=verify, batchnorm=batchnorm)
        self.tall_ratio = None if tall_ratio is None else float(tall_ratio)

    def __call__(
        self, closure: Callable[[], Any], params: Sequence[torch.Tensor], rows: RowSpec
    ) -> Linearization | Unsupported:
        max_rows = None
        if self.tall_ratio is not None:
            max_rows = int(self.tall_ratio * sum(p.numel() for p in params))
        # (the keyword only when set: a stand-in for LayerGram without it keeps working)
        extra: dict[str, Any] = {} if max_rows is None else {"max_rows": max_rows}
        res = self.layer_gram(closure, params, rows=rows, **extra)
        if isinstance(res, Unsupported):
            return res
        return Linearization(res.output, res.output, res, "gram")
