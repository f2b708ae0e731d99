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
    * :class:`~torch.nn.LayerNorm`, :class:`~torch.nn.RMSNorm`: the per-row
      gradients :math:`\sum_t g_{nt} \circ \hat x_{b(n)t}` (weight) and
      :math:`\sum_t g_{nt}` (bias) are small (``N x d``) and are formed.

    A parameter shared by layers of different kinds (tied embeddings) has its
    per-row gradients formed from every call and summed. ``K`` is the sum of
    the blocks, accumulated in float64 (the factors are cast for the Gram
    products); ``J^T C`` and ``J X`` are computed in the parameters' dtype.

What is *unsupported* (:class:`Unsupported`, with a reason naming the layer or parameter)
    * an optimised parameter owned by a module of another type (BatchNorm's
      affine parameters, a custom module's own ``nn.Parameter``), or used
      outside the forward of a supported layer (found in the backward: it
      receives a gradient although no supported layer used it);
    * Conv with ``groups > 1``, transposed convolutions, Conv3d, Embedding with
      ``max_norm`` or ``scale_grad_by_freq``, a supported layer applied to an
      unbatched input or to one whose leading dimension is not the batch size,
      a recorded output modified in place (``ReLU(inplace=True)``);
    * a layer that couples the samples: BatchNorm in training mode (detected
      from its type and ``training`` flag) and anything else (a loss normalised
      over the batch, attention across the batch...), detected by the
      verification below.

Verification
    As in :mod:`sven.jacobian`, the first time a forward structure is seen
    (the modules called, their ``training`` flags, the parameters and ``D``),
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
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .jacobian import _recording

__all__ = [
    "DistributedGram",
    "GramJacobian",
    "GramOperator",
    "LayerGram",
    "RowTransformed",
    "Unsupported",
    "gather_gram",
    "row_transform",
    "supported_modules",
]

#: Verification outcomes kept per instance (bounded, as in :mod:`sven.jacobian`).
_MAX_CACHED = 256
#: Columns converted to float64 at a time when the Gram matrix of formed per-row gradients is accumulated.
_CHUNK = 4096


def supported_modules() -> tuple[type[nn.Module], ...]:
    """The layer types whose parameters the Gram route handles (exact types, or subclasses keeping ``forward``)."""
    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.RMSNorm)


# --------------------------------------------------------------------------- results
class GramOperator(Protocol):
    """An ``N x P`` operator with its Gram matrix: :class:`truncpinv.LinearOperator` plus ``gram``."""

    @property
    def gram(self) -> torch.Tensor: ...

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matmat(self, X: torch.Tensor) -> torch.Tensor: ...

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Unsupported:
    """The Gram route does not apply to this closure.

    Attributes:
        reason: a sentence naming the layer or parameter, for a warning.
        output: the ``(N,)`` rows *with* their autograd graph, so that the
            caller can compute the exact Jacobian without re-running the
            closure (e.g. :func:`sven.jacobian.autograd_jacobian`).
    """

    reason: str
    output: torch.Tensor


class GramJacobian:
    r"""The per-sample Jacobian ``J`` (``N x P``) of one closure evaluation, as its Gram matrix and products.

    Satisfies :class:`truncpinv.LinearOperator` (``shape``, ``dtype``,
    ``device``, ``matmat``, ``rmatmat``), so
    ``truncpinv.pinv_from_gram(G.gram, G)`` is the truncated pseudoinverse of ``J``.

    Attributes:
        output: ``(N,)`` the closure's rows, detached.
        gram: ``(N, N)`` float64, :math:`K = J J^\top`.
        rows_per_sample: ``D``; row ``n`` belongs to sample ``n // D``.
    """

    def __init__(
        self,
        output: torch.Tensor,
        gram: torch.Tensor,
        blocks: list[_Block],
        numels: list[int],
        *,
        dtype: torch.dtype,
        rows_per_sample: int,
    ) -> None:
        self.output = output
        self.gram = gram
        self.rows_per_sample = rows_per_sample
        self._blocks = blocks
        self._numels = numels
        self._dtype = dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, P)``: rows and parameters (the columns of :mod:`sven.jacobian`'s ``J``)."""
        return (int(self.output.shape[0]), sum(self._numels))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the products: that of the parameters (``gram`` is float64)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.output.device

    def rmatmat(self, C: torch.Tensor) -> torch.Tensor:
        r"""``J^T C`` for ``C`` of shape ``(N, r)`` (or ``(N,)``): ``(P, r)`` in :attr:`dtype`.

        Row blocks follow the parameters in the given order, each flattened row-major.
        """
        vec = C.dim() == 1
        C2 = (C[:, None] if vec else C).to(self._dtype)
        parts: dict[int, torch.Tensor] = {}
        for blk in self._blocks:
            parts.update(blk.rmatmat(C2))
        r = C2.shape[1]
        out = torch.cat(
            [
                parts[i] if i in parts else torch.zeros(n, r, dtype=self._dtype, device=self.device)
                for i, n in enumerate(self._numels)
            ]
        )
        return out[:, 0] if vec else out

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        r"""``J X`` for ``X`` of shape ``(P, r)`` (or ``(P,)``): ``(N, r)`` in :attr:`dtype`."""
        vec = X.dim() == 1
        X2 = (X[:, None] if vec else X).to(self._dtype)
        xs = list(torch.split(X2, self._numels))
        out = torch.zeros(self.shape[0], X2.shape[1], dtype=self._dtype, device=self.device)
        for blk in self._blocks:
            out += blk.matmat(xs)
        return out[:, 0] if vec else out

    def to_dense(self) -> torch.Tensor:
        """The ``(N, P)`` Jacobian itself, ``(J^T I)^T`` (for tests and small models)."""
        eye = torch.eye(self.shape[0], dtype=self._dtype, device=self.device)
        return self.rmatmat(eye).T


class RowTransformed:
    r"""``M = S J`` for a row transform ``S``: ``gram`` :math:`= S K S^\top`, products through ``J``.

    Built by :func:`row_transform`; satisfies :class:`GramOperator`, so it can
    be transformed again and handed to :func:`truncpinv.pinv_from_gram`.
    """

    def __init__(self, base: GramOperator, S: torch.Tensor) -> None:
        n = base.shape[0]
        if S.dim() not in (1, 2):
            raise ValueError(f"`S` must be a vector (diagonal) or a matrix, got shape {tuple(S.shape)}")
        if S.dim() == 1 and S.shape[0] != n:
            raise ValueError(f"`S` as a vector scales the {n} rows, so it needs {n} entries, got {S.shape[0]}")
        if S.dim() == 2 and S.shape[1] != n:
            raise ValueError(f"`S` must have {n} columns to act on the {n} rows, got shape {tuple(S.shape)}")
        self.base = base
        self.S = S
        K = base.gram
        S64 = S.to(torch.float64)
        self.gram = S64[:, None] * K * S64[None, :] if S.dim() == 1 else S64 @ K @ S64.T

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.S.shape[0]), self.base.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def _apply(self, Y: torch.Tensor, transpose: bool) -> torch.Tensor:
        S = self.S.to(Y.dtype)
        if S.dim() == 1:
            return S[:, None] * Y if Y.dim() == 2 else S * Y
        return (S.T if transpose else S) @ Y

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """``M^T Y = J^T (S^T Y)``."""
        return self.base.rmatmat(self._apply(Y.to(self.dtype), transpose=True))

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """``M X = S (J X)``."""
        return self._apply(self.base.matmat(X), transpose=False)


def row_transform(G: GramOperator, S: torch.Tensor) -> RowTransformed:
    r"""The rows of ``G`` transformed by ``S``: :math:`M = S J`, :math:`K_M = S K S^\top`.

    Products go through ``J``: :math:`M^\top c = J^\top (S^\top c)`, :math:`M x = S (J x)`.

    Args:
        G: a :class:`GramJacobian` (or another :class:`GramOperator`), ``N x P``.
        S: ``(N,)`` row scales (``M = diag(s) J``, e.g. the residual scaling of
            ``kappa``) or an ``(M, N)`` matrix (e.g. microbatch averaging).

    Example:
        >>> import torch
        >>> from sven.gram import LayerGram, row_transform
        >>> lin = torch.nn.Linear(3, 1).double()
        >>> x = torch.randn(6, 3, dtype=torch.float64)
        >>> G = LayerGram()(lambda: lin(x).squeeze(-1) ** 2, list(lin.parameters()), rows=lambda t: t)
        >>> M = row_transform(G, 0.5 * torch.ones(6, dtype=torch.float64))
        >>> bool(torch.allclose(M.gram, 0.25 * G.gram))
        True
    """
    return RowTransformed(G, S)


# --------------------------------------------------------------------------- factors of one call
def _gram64(M: torch.Tensor) -> torch.Tensor:
    """``M M^T`` in float64 for ``(N, q)`` ``M``, converting at most ``_CHUNK`` columns at a time."""
    if M.dtype == torch.float64:
        return M @ M.T
    K = torch.zeros(M.shape[0], M.shape[0], dtype=torch.float64, device=M.device)
    for j in range(0, M.shape[1], _CHUNK):
        Mc = M[:, j : j + _CHUNK].double()
        K += Mc @ Mc.T
    return K


def _expand_rows(K: torch.Tensor, D: int, dims: tuple[int, int]) -> torch.Tensor:
    """Repeat each sample's entries ``D`` times along ``dims`` (sample -> its ``D`` rows)."""
    if D == 1:
        return K
    return K.repeat_interleave(D, dim=dims[0]).repeat_interleave(D, dim=dims[1])


@dataclass
class _Outer:
    """Row ``n``'s gradient of a ``(d_out, d_in)`` matrix is ``sum_t g[n, t] a[b(n), t]^T``."""

    a: torch.Tensor  # (B, T, d_in)
    g: torch.Tensor  # (N, T, d_out)

    def rows(self, D: int) -> torch.Tensor:
        a = self.a.repeat_interleave(D, 0) if D > 1 else self.a
        return torch.bmm(self.g.transpose(1, 2), a.to(self.g.dtype)).reshape(self.g.shape[0], -1)


@dataclass
class _Index:
    """Row ``n``'s gradient of a ``(num, d)`` table is ``sum_t e_{idx[b(n), t]} g[n, t]^T``."""

    idx: torch.Tensor  # (B, T) int64
    g: torch.Tensor  # (N, T, d), zero where the index is padding_idx
    num: int

    def rows(self, D: int) -> torch.Tensor:
        N, _, d = self.g.shape
        idx = self.idx.repeat_interleave(D, 0) if D > 1 else self.idx
        flat = torch.zeros(N * self.num, d, dtype=self.g.dtype, device=self.g.device)
        pos = torch.arange(N, device=idx.device)[:, None] * self.num + idx
        flat.index_add_(0, pos.reshape(-1), self.g.reshape(-1, d))
        return flat.reshape(N, -1)


@dataclass
class _Rows:
    """Per-row gradients, formed: ``(N, numel)``."""

    m: torch.Tensor

    def rows(self, D: int) -> torch.Tensor:
        return self.m


_Piece = _Outer | _Index | _Rows


def _kind(module: nn.Module) -> type[nn.Module] | None:
    for cls in supported_modules():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return cls
    return None


def _config_problem(module: Any, kind: type[nn.Module]) -> str | None:
    if kind in (nn.Conv1d, nn.Conv2d) and module.groups != 1:
        return f"groups={module.groups} (only groups=1 is supported)"
    if kind is nn.Embedding and module.max_norm is not None:
        return "max_norm renormalises the table inside the forward"
    if kind is nn.Embedding and module.scale_grad_by_freq:
        return "scale_grad_by_freq scales the gradient by frequencies in the batch (couples the samples)"
    return None


def _input_problem(module: Any, kind: type[nn.Module], x: torch.Tensor) -> str | None:
    if kind is nn.Linear:
        ok = x.dim() >= 2
    elif kind is nn.Conv1d:
        ok = x.dim() == 3
    elif kind is nn.Conv2d:
        ok = x.dim() == 4
    elif kind is nn.Embedding:
        ok = x.dim() >= 1
    else:  # LayerNorm, RMSNorm
        ok = x.dim() >= len(module.normalized_shape) + 1
    return None if ok else f"was called on an unbatched input of shape {tuple(x.shape)}"


def _call_pieces(
    module: Any, kind: type[nn.Module], x: torch.Tensor, g: torch.Tensor, B: int, D: int, index: dict[int, int]
) -> list[tuple[int, _Piece]]:
    """The factors of one call, per optimised parameter (index into the parameter list)."""
    N = B * D
    x = x.detach()
    out: list[tuple[int, _Piece]] = []

    def owned(p: torch.Tensor | None) -> int | None:
        return None if p is None else index.get(id(p))

    w, b = owned(module.weight), owned(getattr(module, "bias", None))
    if kind in (nn.Linear, nn.Conv1d, nn.Conv2d):
        if kind is nn.Linear:
            a = x.reshape(B, -1, module.in_features)
            gg = g.reshape(N, -1, module.out_features)
        else:
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            pads = module._reversed_padding_repeated_twice
            xp = F.pad(x, pads, mode=mode) if any(pads) else x
            if kind is nn.Conv1d:
                xp = xp[..., None]
                ks, dil, st = (module.kernel_size[0], 1), (module.dilation[0], 1), (module.stride[0], 1)
            else:
                ks, dil, st = module.kernel_size, module.dilation, module.stride
            a = F.unfold(xp, ks, dilation=dil, stride=st).transpose(1, 2)  # (B, L, C_in k)
            gg = g.reshape(N, module.out_channels, -1).transpose(1, 2)  # (N, L, C_out)
        if w is not None:
            out.append((w, _Outer(a, gg)))
        if b is not None:
            out.append((b, _Outer(torch.ones(B, a.shape[1], 1, dtype=a.dtype, device=a.device), gg)))
    elif kind is nn.Embedding:
        idx = x.reshape(B, -1)
        gg = g.reshape(N, idx.shape[1], module.embedding_dim)
        if module.padding_idx is not None:
            keep = (idx != module.padding_idx).to(gg.dtype)
            gg = (gg.reshape(B, D, *gg.shape[1:]) * keep[:, None, :, None]).reshape(gg.shape)
        if w is not None:
            out.append((w, _Index(idx, gg, module.num_embeddings)))
    else:  # LayerNorm, RMSNorm: xhat per position, per-row gradients formed
        d = math.prod(module.normalized_shape)
        xs = x.reshape(B, -1, d)
        gg = g.reshape(B, D, xs.shape[1], d)
        if w is not None:
            if kind is nn.LayerNorm:
                xhat = F.layer_norm(xs, (d,), eps=module.eps)
            else:
                xhat = F.rms_norm(xs, (d,), eps=module.eps)
            out.append((w, _Rows((gg * xhat[:, None].to(gg.dtype)).sum(2).reshape(N, d))))
        if b is not None:
            out.append((b, _Rows(gg.sum(2).reshape(N, d))))
    return out


def _combine(pieces: list[_Piece], D: int, dtype: torch.dtype) -> _Piece:
    """One piece for one parameter from its calls: concatenated over calls, or formed and summed."""
    if len(pieces) == 1 and not isinstance(pieces[0], _Index):
        p = pieces[0]
        return _Outer(p.a.to(dtype), p.g.to(dtype)) if isinstance(p, _Outer) else _Rows(p.m.to(dtype))
    if all(isinstance(p, _Outer) for p in pieces):
        outer = [p for p in pieces if isinstance(p, _Outer)]
        return _Outer(torch.cat([p.a.to(dtype) for p in outer], 1), torch.cat([p.g.to(dtype) for p in outer], 1))
    if all(isinstance(p, _Index) for p in pieces):
        index = [p for p in pieces if isinstance(p, _Index)]
        return _Index(torch.cat([p.idx for p in index], 1), torch.cat([p.g.to(dtype) for p in index], 1), index[0].num)
    return _Rows(functools.reduce(torch.add, (p.rows(D).to(dtype) for p in pieces)))


# --------------------------------------------------------------------------- blocks of K
class _Block(Protocol):
    params: list[int]

    def gram(self) -> torch.Tensor: ...

    def rmatmat(self, C: torch.Tensor) -> dict[int, torch.Tensor]: ...

    def matmat(self, xs: list[torch.Tensor]) -> torch.Tensor: ...


class _OuterBlock:
    """Parameters whose per-row gradients are the column blocks of ``sum_t g_{nt} a_{b(n)t}^T``."""

    def __init__(self, params: list[int], widths: list[int], a: torch.Tensor, g: torch.Tensor, D: int) -> None:
        self.params, self.widths, self.a, self.g, self.D = params, widths, a, g, D
        B, T, di = a.shape
        N, do = g.shape[0], g.shape[2]
        pairs = (B * T) ** 2 * di + (N * T) ** 2 * (do + 1)
        formed = N * T * di * do + N * N * di * do
        # the cheaper of the pair sum over positions and the formed per-row gradients (module docstring)
        self.m = None if pairs <= formed else _Outer(a, g).rows(D).reshape(N, do, di)

    def gram(self) -> torch.Tensor:
        if self.m is not None:
            return _gram64(self.m.reshape(self.m.shape[0], -1))
        a, g = self.a.double(), self.g.double()
        B, T, di = a.shape
        N = g.shape[0]
        if T == 1:
            return _expand_rows(a[:, 0] @ a[:, 0].T, self.D, (0, 1)) * (g[:, 0] @ g[:, 0].T)
        Ka = _expand_rows((a.reshape(B * T, di) @ a.reshape(B * T, di).T).reshape(B, T, B, T), self.D, (0, 2))
        Kg = (g.reshape(N * T, -1) @ g.reshape(N * T, -1).T).reshape(N, T, N, T)
        return (Ka * Kg).sum((1, 3))

    def _split(self, R: torch.Tensor) -> dict[int, torch.Tensor]:
        """``(d_out, d_in, r)`` -> each parameter's ``(d_out * width, r)`` rows."""
        r = R.shape[-1]
        parts = torch.split(R, self.widths, dim=1)
        return {i: p.reshape(-1, r) for i, p in zip(self.params, parts)}

    def rmatmat(self, C: torch.Tensor) -> dict[int, torch.Tensor]:
        B, T, di = self.a.shape
        N, do, r = self.g.shape[0], self.g.shape[2], C.shape[1]
        if self.m is not None:
            return self._split((self.m.reshape(N, -1).T @ C).reshape(do, di, r))
        if self.D == 1:
            gC = self.g[..., None] * C[:, None, None, :]
        else:
            gC = torch.einsum("bdto,bdr->btor", self.g.reshape(B, self.D, T, do), C.reshape(B, self.D, r))
        # one GEMM over (sample, position): (do r, B T) @ (B T, di)
        R = gC.reshape(B * T, do * r).T @ self.a.reshape(B * T, di)
        return self._split(R.reshape(do, r, di).permute(0, 2, 1))

    def matmat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        B, T, di = self.a.shape
        N, do = self.g.shape[0], self.g.shape[2]
        X = torch.cat([xs[i].reshape(do, w, -1) for i, w in zip(self.params, self.widths)], dim=1)
        if self.m is not None:
            return self.m.reshape(N, -1) @ X.reshape(do * di, -1)
        r = X.shape[2]
        aX = (self.a.reshape(B * T, di) @ X.permute(1, 0, 2).reshape(di, do * r)).reshape(B, T, do, r)
        if self.D == 1:
            return (self.g[..., None] * aX).sum((1, 2))
        return torch.einsum("bdto,btor->bdr", self.g.reshape(B, self.D, T, do), aX).reshape(N, r)


class _IndexBlock:
    """An embedding table: row ``n``'s gradient ``sum_t e_{idx_{b(n)t}} g_{nt}^T``."""

    def __init__(self, param: int, piece: _Index, D: int) -> None:
        self.params, self.piece, self.D = [param], piece, D

    def gram(self) -> torch.Tensor:
        idx, g = self.piece.idx, self.piece.g.double()
        N, T, d = g.shape
        B = idx.shape[0]
        uniq, inv = torch.unique(idx, return_inverse=True)
        U = uniq.numel()
        if N * N * U * d <= (N * T) ** 2 * (d + 1):  # the rows restricted to the U indices in the batch
            return _gram64(_Index(inv, g, U).rows(self.D))
        flat = idx.reshape(-1)
        eq = _expand_rows((flat[:, None] == flat[None, :]).to(g.dtype).reshape(B, T, B, T), self.D, (0, 2))
        Kg = (g.reshape(N * T, d) @ g.reshape(N * T, d).T).reshape(N, T, N, T)
        return (eq * Kg).sum((1, 3))

    def rmatmat(self, C: torch.Tensor) -> dict[int, torch.Tensor]:
        idx, g, num = self.piece.idx, self.piece.g, self.piece.num
        B, T = idx.shape
        d, r = g.shape[2], C.shape[1]
        gC = torch.einsum("bDtd,bDr->btdr", g.reshape(B, self.D, T, d), C.reshape(B, self.D, r))
        out = torch.zeros(num, d, r, dtype=C.dtype, device=C.device)
        out.index_add_(0, idx.reshape(-1), gC.reshape(B * T, d, r))
        return {self.params[0]: out.reshape(num * d, r)}

    def matmat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        idx, g, num = self.piece.idx, self.piece.g, self.piece.num
        B, T = idx.shape
        d = g.shape[2]
        Xg = xs[self.params[0]].reshape(num, d, -1)[idx]  # (B, T, d, r)
        return torch.einsum("bDtd,btdr->bDr", g.reshape(B, self.D, T, d), Xg).reshape(B * self.D, -1)


class _RowsBlock:
    """Parameters whose per-row gradients are formed, side by side: ``M`` is ``(N, sum numel)``."""

    def __init__(self, params: list[int], ms: list[torch.Tensor]) -> None:
        self.params = params
        self.widths = [m.shape[1] for m in ms]
        self.m = torch.cat(ms, dim=1)

    def gram(self) -> torch.Tensor:
        return _gram64(self.m)

    def rmatmat(self, C: torch.Tensor) -> dict[int, torch.Tensor]:
        return dict(zip(self.params, torch.split(self.m.T @ C, self.widths)))

    def matmat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.m @ torch.cat([xs[i] for i in self.params])


def _blocks(pieces: dict[int, list[tuple[int, _Piece]]], D: int, dtype: torch.dtype) -> list[_Block]:
    """Group the parameters' combined pieces into blocks of ``K``.

    Outer pieces of parameters used by exactly the same calls (a layer's weight
    and bias) share one block; formed rows go into one block.
    """
    blocks: list[_Block] = []
    outer: dict[tuple[int, ...], list[tuple[int, _Outer]]] = {}
    rows: list[tuple[int, torch.Tensor]] = []
    for i, lst in pieces.items():
        piece = _combine([p for _, p in lst], D, dtype)
        if isinstance(piece, _Outer):
            outer.setdefault(tuple(c for c, _ in lst), []).append((i, piece))
        elif isinstance(piece, _Index):
            blocks.append(_IndexBlock(i, piece, D))
        else:
            rows.append((i, piece.m.to(dtype)))
    for group in outer.values():
        a = torch.cat([p.a for _, p in group], dim=2)
        blocks.append(_OuterBlock([i for i, _ in group], [p.a.shape[2] for _, p in group], a, group[0][1].g, D))
    if rows:
        blocks.append(_RowsBlock([i for i, _ in rows], [m for _, m in rows]))
    return blocks


# --------------------------------------------------------------------------- recording
@dataclass
class _Call:
    module: nn.Module
    kind: type[nn.Module]
    inp: torch.Tensor
    out: torch.Tensor
    version: int


class _Recorder:
    """Global forward hook: records supported calls on optimised parameters and the first problem seen."""

    def __init__(self, index: dict[int, int], labels: list[str]) -> None:
        self.index = index
        self.labels = labels
        self.calls: list[_Call] = []
        self.structure: list[tuple[int, bool]] = []
        self.covered: set[int] = set()
        self.problem: str | None = None

    def describe(self, module: nn.Module) -> str:
        own = [self.labels[self.index[id(p)]] for p in module._parameters.values() if id(p) in self.index]
        return type(module).__name__ + (f" (parameters {', '.join(own)})" if own else "")

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.structure.append((id(module), module.training))
        if self.problem is not None:
            return
        owned = [p for p in module._parameters.values() if p is not None and id(p) in self.index]
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
            if owned or (x is not None and x.requires_grad):
                self.problem = (
                    f"{self.describe(module)} normalises with batch statistics (training mode), "
                    f"which couples the samples"
                )
                return
        if not owned:
            return
        kind = _kind(module)
        if kind is None:
            names = ", ".join(c.__name__ for c in supported_modules())
            self.problem = (
                f"{self.describe(module)} has optimised parameters but is not a layer the Gram route supports ({names})"
            )
            return
        problem = _config_problem(module, kind)
        if problem is None and (x is None or not isinstance(output, torch.Tensor)):
            problem = "was called without a tensor input or output"
        if problem is None and x is not None:
            problem = _input_problem(module, kind, x)
        if problem is not None or x is None or not isinstance(output, torch.Tensor):
            self.problem = f"{self.describe(module)}: {problem}"
            return
        if output.requires_grad:
            self.calls.append(_Call(module, kind, x, output, output._version))
            self.covered.update(id(p) for p in owned)


def _batch_size(raw: Any, n: int, rec: _Recorder) -> int | str:
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
    return (
        f"{rec.describe(bad.module)} was called on an input of shape {tuple(bad.inp.shape)} whose leading "
        f"dimension is not the batch size {b} of the {n} rows"
    )


# --------------------------------------------------------------------------- the entry point
class LayerGram:
    """Computes :class:`GramJacobian`\\ s of a closure's rows from per-layer factors.

    Args:
        seed: seed of the random probe vector used for verification.
        verify: verify each new forward structure against an exact
            vector-Jacobian product (one extra backward pass, first sight
            only). ``False`` trusts that every layer treats samples independently.

    The instance keeps the verification outcomes: keep one per optimizer.

    Example:
        >>> import torch, truncpinv
        >>> from sven.gram import LayerGram
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        >>> x, y = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> G = LayerGram()(lambda: ((model(x) - y) ** 2).sum(-1), list(model.parameters()), rows=lambda t: t)
        >>> G.gram.shape, G.shape
        (torch.Size([16, 16]), (16, 33))
        >>> F = truncpinv.pinv_from_gram(G.gram, G, rank=8)
    """

    def __init__(self, *, seed: int = 0, verify: bool = True) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
        if not isinstance(verify, bool):
            raise TypeError(f"`verify` must be a bool, got {verify!r}")
        self.seed = seed
        self.verify = verify
        # structure -> None (verified) or the reason it is unsupported
        self._verified: dict[tuple[Any, ...], str | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        # outcomes are keyed by object ids: not meaningful elsewhere
        return {"seed": self.seed, "verify": self.verify, "_verified": {}}

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
    ) -> GramJacobian | Unsupported:
        """Run ``closure`` (with grad enabled) and return ``K = J J^T`` and the products with ``J``.

        Args:
            closure: re-evaluates the model; its return value goes through ``rows``.
            params: the parameters (columns of ``J``, in this order).
            rows: turns the closure's return value into the 1-D rows with a graph
                (``(B,)`` losses, or ``(B, D)`` residuals flattened row-major).
            names: optional parameter names, for the reasons of :class:`Unsupported`.

        Returns:
            A :class:`GramJacobian`, or :class:`Unsupported` with the reason and the
            rows (graph kept) for an exact fallback.
        """
        params = list(params)
        if not params:
            raise ValueError("`params` must hold at least one parameter (the columns of J)")
        if names is not None and len(names) != len(params):
            raise ValueError(f"`names` must name each of the {len(params)} parameters, got {len(names)} names")
        labels = [
            repr(names[i]) if names is not None else f"#{i} of shape {tuple(p.shape)}" for i, p in enumerate(params)
        ]
        index = {id(p): i for i, p in enumerate(params)}
        rec = _Recorder(index, labels)
        with torch.enable_grad():
            with _recording(rec):
                raw = closure()
            out = rows(raw)  # (a reshape under no_grad would cut the graph)
        if not isinstance(out, torch.Tensor) or out.dim() != 1:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"`rows` must return the rows as a 1-D tensor, got {got}")
        if not out.requires_grad:
            raise ValueError(
                "the closure's output does not depend on the optimised parameters (it has no autograd graph); "
                "do not compute it under torch.no_grad() or from detached tensors"
            )
        n = int(out.shape[0])
        if rec.problem is not None:
            return Unsupported(rec.problem, out)
        for c in rec.calls:
            if c.out._version != c.version:
                return Unsupported(
                    f"the output of {rec.describe(c.module)} was modified in place (e.g. by ReLU(inplace=True)); "
                    f"use the out-of-place operation",
                    out,
                )
        B = _batch_size(raw, n, rec)
        if isinstance(B, str):
            return Unsupported(B, out)
        D = n // B
        key = (tuple(rec.structure), tuple(index), D)
        seen = key in self._verified
        known = self._verified.get(key)
        if known is not None:
            return Unsupported(known, out)
        verify = self.verify and not seen
        uncovered = [p for p in params if id(p) not in rec.covered]
        gs, used = _backward(out, [c.out for c in rec.calls], uncovered, B, D, retain=verify or bool(uncovered))
        if used:
            which = ", ".join(labels[index[id(p)]] for p in used)
            outside = f"parameter(s) {which} are used outside the forward of a supported layer"
            self._remember(key, outside)
            return Unsupported(outside, out)

        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
        pieces: dict[int, list[tuple[int, _Piece]]] = {}
        with torch.no_grad():
            for ci, (c, g) in enumerate(zip(rec.calls, gs)):
                if g is None:
                    continue
                for i, piece in _call_pieces(c.module, c.kind, c.inp, g, B, D, index):
                    pieces.setdefault(i, []).append((ci, piece))
            blocks = _blocks(pieces, D, dtype)
            K = torch.zeros(n, n, dtype=torch.float64, device=out.device)
            for blk in blocks:
                K += blk.gram()
        G = GramJacobian(out.detach(), K, blocks, [p.numel() for p in params], dtype=dtype, rows_per_sample=D)
        if verify:
            decided, reason = self._check(out, params, G, labels)
            if decided:
                self._remember(key, reason)
            if reason is not None:
                return Unsupported(reason, out)
        return G

    def _check(
        self, out: torch.Tensor, params: list[torch.Tensor], G: GramJacobian, labels: list[str]
    ) -> tuple[bool, str | None]:
        """Compare ``J^T u`` with the exact vector-Jacobian product for a random ``u``.

        Returns ``(decided, reason)``: ``reason`` is ``None`` when they agree;
        with non-finite rows nothing is decided (checked again next time).
        """
        gen = torch.Generator(device=out.device)
        gen.manual_seed(self.seed)
        u = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
        exact = torch.autograd.grad(out, params, grad_outputs=u, retain_graph=True, allow_unused=True)
        with torch.no_grad():
            mine = torch.split(G.rmatmat(u[:, None].to(G.dtype))[:, 0].double(), [p.numel() for p in params])
            scale = math.sqrt(max(float(G.gram.diagonal().sum()), 0.0)) * float(u.double().norm())
            if not math.isfinite(scale) or not all(e is None or bool(torch.isfinite(e).all()) for e in exact):
                return False, None
            eps = max(torch.finfo(G.dtype).eps, torch.finfo(out.dtype).eps)
            tol = 1e3 * eps * scale
            bad = []
            for i, (e, m) in enumerate(zip(exact, mine)):
                ref = torch.zeros_like(m) if e is None else (e.to_dense() if e.is_sparse else e).reshape(-1).double()
                if not float((m - ref).norm()) <= tol:
                    bad.append(labels[i])
        if not bad:
            return True, None
        return True, (
            f"the layer-factor J^T u disagrees with autograd for parameter(s) {', '.join(bad)}: a layer couples "
            f"the samples of the batch (BatchNorm in training mode, a loss normalised over the batch, ...) or the "
            f"parameter is also used outside a supported layer"
        )


def _backward(
    out: torch.Tensor,
    outs: list[torch.Tensor],
    uncovered: list[torch.Tensor],
    B: int,
    D: int,
    *,
    retain: bool,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    """Per-row gradients at the recorded outputs, ``(N, ...)``, and the uncovered parameters that are used.

    One backward pass of ``sum(rows)`` when ``D = 1``; otherwise one per
    column ``d`` of the ``(B, D)`` rows (cotangent ``e_d`` in every sample).
    """
    inputs = outs + uncovered
    if not inputs:
        return [], []
    per_d: list[tuple[torch.Tensor | None, ...]] = []
    used: list[torch.Tensor] = []
    for d in range(D):
        if D == 1:
            go = torch.ones_like(out)
        else:
            go = torch.zeros(B, D, dtype=out.dtype, device=out.device)
            go[:, d] = 1
            go = go.reshape(-1)
        ins = inputs if d == 0 else outs
        gs = torch.autograd.grad(out, ins, grad_outputs=go, retain_graph=retain or d < D - 1, allow_unused=True)
        if d == 0:
            # structurally reachable from the rows: used, whatever the value of the gradient
            used = [p for p, g in zip(uncovered, gs[len(outs) :]) if g is not None]
            if used:
                return [], used
        per_d.append(tuple(gs[: len(outs)]))
    if D == 1:
        return list(per_d[0]), []
    result: list[torch.Tensor | None] = []
    for j, z in enumerate(outs):
        col = [gd[j] for gd in per_d]
        if all(g is None for g in col):
            result.append(None)
            continue
        full = [torch.zeros_like(z) if g is None else g for g in col]
        result.append(torch.stack(full, dim=1).reshape(B * D, *z.shape[1:]))
    return result, []


# --------------------------------------------------------------------------- data parallel
class DistributedGram:
    r"""The Gram route over a batch sharded across the ranks of a process group.

    Rank ``r`` holds rows ``o_r .. o_r + N_r`` of the global ``J``
    (``N = \sum_r N_r``). Every rank all-gathers the per-layer factors of
    :class:`GramJacobian` (inputs ``a`` and output gradients ``g``: ``N x d``
    numbers per layer, never ``N x P``) and builds the same global
    :math:`K = J J^\top`. The products keep the data local:

    .. math::

        J^\top C = \sum_r J_r^\top C_{[o_r, o_r + N_r)} \quad \text{(one all-reduce of } P \times r\text{)},
        \qquad J X = \big[J_r X\big]_r \quad \text{(an all-gather of } N \times r\text{)}.

    Built by :func:`gather_gram`; satisfies :class:`GramOperator`.
    """

    def __init__(self, local: GramJacobian, gram: torch.Tensor, output: torch.Tensor, offset: int, group: Any) -> None:
        self.local = local
        self.gram = gram
        self.output = output
        self.offset = offset
        self.group = group
        self.rows_per_sample = local.rows_per_sample

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.output.shape[0]), self.local.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    def rmatmat(self, C: torch.Tensor) -> torch.Tensor:
        from .distributed import all_reduce_sum_

        n = self.local.shape[0]
        part = self.local.rmatmat(C[self.offset : self.offset + n]).contiguous()
        return all_reduce_sum_(part, self.group)

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        from .distributed import all_gather_rows

        return all_gather_rows(self.local.matmat(X).contiguous(), self.group)


def _gather_block(blk: _Block, D: int, group: Any) -> _Block:
    """The same block over the global batch: its row-indexed factors all-gathered in rank order."""
    from .distributed import all_gather_rows

    if isinstance(blk, _OuterBlock):
        a = all_gather_rows(blk.a.contiguous(), group)
        g = all_gather_rows(blk.g.contiguous(), group)
        return _OuterBlock(blk.params, blk.widths, a, g, D)
    if isinstance(blk, _IndexBlock):
        p = blk.piece
        idx = all_gather_rows(p.idx.contiguous(), group)
        g = all_gather_rows(p.g.contiguous(), group)
        return _IndexBlock(blk.params[0], _Index(idx, g, p.num), D)
    if isinstance(blk, _RowsBlock):
        m = all_gather_rows(blk.m.contiguous(), group)
        return _RowsBlock(blk.params, list(torch.split(m, blk.widths, dim=1)))
    raise TypeError(f"unknown Gram block {type(blk).__name__}")  # pragma: no cover - all kinds listed


def gather_gram(G: GramJacobian, group: Any) -> DistributedGram:
    """Assemble the global Gram route from each rank's :class:`GramJacobian` (a collective: every rank calls it).

    Every rank must have built its ``G`` from the same model structure (the
    same blocks in the same order), which holds when all ranks run the same
    code; the caller checks with :func:`sven.distributed.all_agree` that the
    route was supported on every rank before calling.

    Communication: the factors (``N x d_in`` and ``N x d_out`` per layer) and
    the rows, all-gathered; nothing of size ``P`` until a product.
    """
    from .distributed import all_gather_rows, rank

    sizes = all_gather_rows(torch.tensor([G.shape[0]], dtype=torch.int64, device=G.device), group)
    offset = int(sizes[: rank(group)].sum())
    output = all_gather_rows(G.output.contiguous(), group)
    blocks = [_gather_block(b, G.rows_per_sample, group) for b in G._blocks]
    K = torch.zeros(output.shape[0], output.shape[0], dtype=torch.float64, device=G.device)
    for blk in blocks:
        K += blk.gram()
    return DistributedGram(G, K, output, offset, group)
