r"""The layer factors of the Gram route and the blocks of ``K = J J^T`` they make.

Each supported layer call contributes *pieces* (per optimised parameter):
outer-product factors (:class:`_Outer`: Linear, Conv), an index table
(:class:`_Index`: Embedding) or formed per-row gradients (:class:`_Rows`:
LayerNorm, RMSNorm, BatchNorm). Pieces are grouped into *blocks*, each able to add its
part of ``K`` and to apply its columns of ``J`` (``J^T C`` and ``J X``).
:class:`GramJacobian` is the sum of the blocks. The maths of each block is in
the docstring of :mod:`sven.linearize.gram`; the float64 products are in :mod:`sven.linearize.gram_products`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .attention import LinearSlice
from .gram_products import expand_rows as _expand_rows
from .gram_products import gram64 as _gram64  # (one name here: benchmarks/ce_step_ab.py perturbs the products)
from .gram_products import rows_times_samples

__all__ = ["GramJacobian", "Piece", "bn_xhat", "call_pieces", "layer_input", "make_blocks"]


# --------------------------------------------------------------------------- factors of one call
@dataclass
class _Outer:
    """Row ``n``'s gradient of a ``(d_out, d_in)`` matrix is ``sum_t g[n, t] a[b(n), t]^T``.

    ``ones``: ``a`` is all ones (a bias, ``d_in = 1``): the gradient is ``sum_t g[n, t]``.
    """

    a: torch.Tensor  # (B, T, d_in)
    g: torch.Tensor  # (N, T, d_out)
    ones: bool = False

    def rows(self, D: int) -> torch.Tensor:
        """The formed ``(N, d_out d_in)`` per-row gradients (row-major ``(d_out, d_in)``).

        The ``D`` rows of a sample share its ``a``: one ``(D d_out, T) @ (T, d_in)`` product per sample
        instead of a copy of ``a`` for each row (the same sums).
        """
        g = self.g
        N, T, do = g.shape
        if self.ones:
            return g.sum(1)
        a = self.a.to(g.dtype)
        if D == 1:
            return torch.bmm(g.transpose(1, 2), a).reshape(N, -1)
        B = a.shape[0]
        gb = g.reshape(B, D, T, do).transpose(2, 3).reshape(B, D * do, T)
        return torch.bmm(gb, a).reshape(N, -1)


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


Piece = _Outer | _Index | _Rows


def bn_xhat(module: Any, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """BatchNorm's normalised input: with the batch ``stats`` (mean, ``1/sqrt(var+eps)``) or the running ones."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if stats is None:
        mean, invstd = module.running_mean, torch.rsqrt(module.running_var + module.eps)
    else:
        mean, invstd = stats
    return (x - mean.reshape(shape)) * invstd.reshape(shape).to(x.dtype)


def layer_input(module: Any, kind: type[nn.Module], x: torch.Tensor, B: int) -> torch.Tensor:
    """The input factor ``a`` ``(B, T, d_in)`` of a Linear or Conv call: its input, or the unfolded patches.

    The patches are those of :func:`torch.nn.functional.unfold` (``(B, C_in k, L)``, channel, then kernel
    offsets, then positions, each row-major), gathered by one copy of a strided view of the padded input
    (:func:`_patches`): the same values, several times faster than ``unfold`` for few channels.
    """
    if kind is nn.Linear:
        return x.reshape(B, -1, module.in_features)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pads = module._reversed_padding_repeated_twice
    xp = F.pad(x, pads, mode=mode) if any(pads) else x
    if kind is nn.Conv1d:
        xp = xp[..., None]
        ks, dil, st = (module.kernel_size[0], 1), (module.dilation[0], 1), (module.stride[0], 1)
    else:
        ks, dil, st = module.kernel_size, module.dilation, module.stride
    if xp.dim() != 4:  # (an unbatched input: unfold's own path)
        return F.unfold(xp, ks, dilation=dil, stride=st).transpose(-2, -1)
    return _patches(xp, ks, dil, st).transpose(1, 2)  # (B, L, C_in k)


def _patches(xp: torch.Tensor, ks: tuple[int, int], dil: tuple[int, int], st: tuple[int, int]) -> torch.Tensor:
    """``F.unfold(xp, ks, dilation=dil, stride=st)`` of a padded ``(B, C, H, W)`` input, ``(B, C kh kw, L)``.

    ``Tensor.unfold`` windows each spatial dimension (a view: ``(B, C, H', W', kh, kw)``, every ``dil``-th
    entry of a window of ``dil (k - 1) + 1``); one reshape of its permutation copies the patches out.
    """
    B, C = xp.shape[:2]
    v = xp.unfold(2, dil[0] * (ks[0] - 1) + 1, st[0]).unfold(3, dil[1] * (ks[1] - 1) + 1, st[1])
    v = v[..., :: dil[0], :: dil[1]]  # (B, C, H', W', kh, kw)
    L = v.shape[2] * v.shape[3]
    return v.permute(0, 1, 4, 5, 2, 3).reshape(B, C * ks[0] * ks[1], L)


def call_pieces(
    module: Any,
    kind: type[nn.Module],
    x: torch.Tensor,
    g: torch.Tensor,
    B: int,
    D: int,
    index: dict[int, int],
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    linear: LinearSlice | None = None,
) -> list[tuple[int, Piece]]:
    """The factors of one call, per optimised parameter (index into the parameter list).

    ``stats``: the batch statistics a BatchNorm call normalised with (``None``: its running statistics).
    ``linear``: a Linear-kind call on rows of other parameters (MultiheadAttention's projections).
    """
    N = B * D
    x = x.detach()
    out: list[tuple[int, Piece]] = []

    def owned(p: torch.Tensor | None) -> int | None:
        return None if p is None else index.get(id(p))

    if linear is not None:  # rows [w0, w0 + n) of the weight, [b0, b0 + n) of the bias; the other rows get 0
        a = x.reshape(B, -1, x.shape[-1])
        gg = g.reshape(N, -1, g.shape[-1])
        w, b = owned(linear.weight), owned(linear.bias)
        gw = _in_rows(gg, linear.w0, linear.weight.shape[0])
        if w is not None:
            out.append((w, _Outer(a, gw)))
        if b is not None and linear.bias is not None:
            same = linear.b0 == linear.w0 and linear.bias.shape[0] == linear.weight.shape[0]
            gb = gw if same else _in_rows(gg, linear.b0, linear.bias.shape[0])
            out.append((b, _Outer(torch.ones(B, a.shape[1], 1, dtype=a.dtype, device=a.device), gb, ones=True)))
        return out
    w, b = owned(module.weight), owned(getattr(module, "bias", None))
    if kind in (nn.Linear, nn.Conv1d, nn.Conv2d):
        a = layer_input(module, kind, x, B)
        if kind is nn.Linear:
            gg = g.reshape(N, -1, module.out_features)
        else:
            gg = g.reshape(N, module.out_channels, -1).transpose(1, 2)  # (N, L, C_out)
        if w is not None:
            out.append((w, _Outer(a, gg)))
        if b is not None:
            out.append((b, _Outer(torch.ones(B, a.shape[1], 1, dtype=a.dtype, device=a.device), gg, ones=True)))
    elif kind is nn.Embedding:
        idx = x.reshape(B, -1)
        gg = g.reshape(N, idx.shape[1], module.embedding_dim)
        if module.padding_idx is not None:
            keep = (idx != module.padding_idx).to(gg.dtype)
            gg = (gg.reshape(B, D, *gg.shape[1:]) * keep[:, None, :, None]).reshape(gg.shape)
        if w is not None:
            out.append((w, _Index(idx, gg, module.num_embeddings)))
    elif kind is _BatchNorm:  # a per-channel affine map of xhat: per-row gradients (N, C) formed
        C = x.shape[1]
        gg = g.reshape(N, C, -1)
        if w is not None:
            xhat = bn_xhat(module, x, stats).reshape(B, C, -1)
            xhat = xhat.repeat_interleave(D, 0) if D > 1 else xhat
            out.append((w, _Rows((gg * xhat.to(gg.dtype)).sum(2))))
        if b is not None:
            out.append((b, _Rows(gg.sum(2))))
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


def _in_rows(g: torch.Tensor, start: int, total: int) -> torch.Tensor:
    """``g`` ``(N, T, n)`` at rows ``[start, start + n)`` of ``(N, T, total)`` zeros (itself if it fills them)."""
    n = g.shape[-1]
    if start == 0 and n == total:
        return g
    full = g.new_zeros(*g.shape[:-1], total)
    full[..., start : start + n] = g
    return full


def _combine(pieces: list[Piece], D: int, dtype: torch.dtype) -> Piece:
    """One piece for one parameter from its calls: concatenated over calls, or formed and summed."""
    if len(pieces) == 1 and not isinstance(pieces[0], _Index):
        p = pieces[0]
        if isinstance(p, _Outer):
            return p if p.a.dtype == dtype and p.g.dtype == dtype else _Outer(p.a.to(dtype), p.g.to(dtype), p.ones)
        return _Rows(p.m.to(dtype))
    if all(isinstance(p, _Outer) for p in pieces):
        outer = [p for p in pieces if isinstance(p, _Outer)]
        a, g = torch.cat([p.a.to(dtype) for p in outer], 1), torch.cat([p.g.to(dtype) for p in outer], 1)
        return _Outer(a, g, all(p.ones for p in outer))
    if all(isinstance(p, _Index) for p in pieces):
        index = [p for p in pieces if isinstance(p, _Index)]
        return _Index(torch.cat([p.idx for p in index], 1), torch.cat([p.g.to(dtype) for p in index], 1), index[0].num)
    return _Rows(functools.reduce(torch.add, (p.rows(D).to(dtype) for p in pieces)))


# --------------------------------------------------------------------------- blocks of K
def _formed_cheaper(B: int, T: int, di: int, N: int, do: int) -> bool:
    """Whether forming the ``(N, d_out d_in)`` per-row gradients costs less than the pair sum over positions
    (the multiplications of each way to ``K``; module docstring of :mod:`sven.linearize.gram`)."""
    pairs = (B * T) ** 2 * di + (N * T) ** 2 * (do + 1)
    formed = N * T * di * do + N * N * di * do
    return pairs > formed


class _Block(Protocol):
    params: list[int]

    def gram(self) -> torch.Tensor: ...

    def rmatmat(self, C: torch.Tensor) -> dict[int, torch.Tensor]: ...

    def matmat(self, xs: list[torch.Tensor]) -> torch.Tensor: ...


class _OuterBlock:
    """Parameters whose per-row gradients are the column blocks of ``sum_t g_{nt} a_{b(n)t}^T``.

    When forming the per-row gradients is the cheaper way to ``K``, the block keeps them
    (``m``, ``N x d_out d_in``) instead of its factors ``a`` and ``g`` (``None`` then); a
    block built from gathered rows passes ``m`` (and ``None`` factors) directly.
    """

    def __init__(
        self,
        params: list[int],
        widths: list[int],
        a: torch.Tensor | None,
        g: torch.Tensor | None,
        D: int,
        m: torch.Tensor | None = None,
        d_out: int | None = None,
    ) -> None:
        self.params, self.widths, self.a, self.g, self.D = params, widths, a, g, D
        self.m = m
        if m is not None:
            assert d_out is not None  # given with m
            self.d_out = d_out
            return
        assert a is not None and g is not None  # given without m
        B, T, di = a.shape
        N, do = g.shape[0], g.shape[2]
        self.d_out = do
        if _formed_cheaper(B, T, di, N, do):
            self.m = _Outer(a, g).rows(D)
            self.a = self.g = None  # the rows are all the block needs (and here smaller than a and g)

    def gram(self) -> torch.Tensor:
        if self.m is not None:
            return _gram64(self.m)
        assert self.a is not None and self.g is not None
        a, g = self.a, self.g
        B, T, di = a.shape
        N = g.shape[0]
        if T == 1:  # (K_a with each sample's entries repeated for its D rows)
            return rows_times_samples(_gram64(g[:, 0]), _gram64(a[:, 0]), self.D)
        Ka = _expand_rows(_gram64(a.reshape(B * T, di)).reshape(B, T, B, T), self.D, (0, 2))
        Kg = _gram64(g.reshape(N * T, -1)).reshape(N, T, N, T)
        return (Ka * Kg).sum((1, 3))

    def _split(self, R: torch.Tensor) -> dict[int, torch.Tensor]:
        """``(d_out, d_in, r)`` -> each parameter's ``(d_out, width, r)`` part (its ``d_out * width`` rows,
        row-major; a view: :meth:`GramJacobian.rmatmat` copies it into place once)."""
        parts, start = {}, 0
        for i, w in zip(self.params, self.widths):
            parts[i] = R[:, start : start + w]
            start += w
        return parts

    def rmatmat(self, C: torch.Tensor) -> dict[int, torch.Tensor]:
        r = C.shape[1]
        if self.m is not None:
            return self._split((self.m.T @ C).reshape(self.d_out, -1, r))
        assert self.a is not None
        B, T, di = self.a.shape
        # one GEMM over (sample, position): (do r, B T) @ (B T, di)
        R = self._combined(C).T @ self.a.reshape(B * T, di)
        return self._split(R.reshape(self.d_out, r, di).permute(0, 2, 1))

    def rmatvec_into(self, C: torch.Tensor, dest: list[torch.Tensor]) -> bool:
        """:meth:`rmatmat` of one column ``C`` ``(N, 1)``, written into each parameter's rows ``dest[i]`` (its
        ``(numel, 1)`` view of the result): one product per parameter, ``(do, B T) @ (B T, width)``, the columns
        of the GEMM of :meth:`rmatmat` without its result's copy into place. ``False`` (nothing written) for a
        block of formed rows."""
        if self.m is not None or self.a is None:
            return False
        B, T, di = self.a.shape
        gC, a, start = self._combined(C).T, self.a.reshape(B * T, di), 0
        for i, w in zip(self.params, self.widths):
            torch.mm(gC, a[:, start : start + w], out=dest[i].view(self.d_out, w))
            start += w
        return True

    def _combined(self, C: torch.Tensor) -> torch.Tensor:
        """``g`` with each row scaled by its coefficients in ``C`` ``(N, r)``, each sample's ``D`` rows summed:
        ``(B T, d_out r)``."""
        assert self.a is not None and self.g is not None
        B, T, _ = self.a.shape
        do, r = self.d_out, C.shape[1]
        if self.D == 1:
            gC = self.g[..., None] * C[:, None, None, :]
        elif T == 1 and r == 1:  # each sample's D rows combined: sum_d g[b, d, :] C[b, d] (a product, one sum)
            gC = (self.g.reshape(B, self.D, do) * C.reshape(B, self.D, 1)).sum(1)  # (4x faster than bmm's)
        elif T == 1:  # (B, do, D) @ (B, D, r): each sample's rows combined
            gC = torch.bmm(self.g.reshape(B, self.D, do).transpose(1, 2), C.reshape(B, self.D, r))
        else:
            gC = torch.einsum("bdto,bdr->btor", self.g.reshape(B, self.D, T, do), C.reshape(B, self.D, r))
        return gC.reshape(B * T, do * r)

    def matmat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        do = self.d_out
        X = torch.cat([xs[i].reshape(do, w, -1) for i, w in zip(self.params, self.widths)], dim=1)
        if self.m is not None:
            return self.m @ X.reshape(self.m.shape[1], -1)
        assert self.a is not None and self.g is not None
        B, T, di = self.a.shape
        N, r = self.g.shape[0], X.shape[2]
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


def make_blocks(pieces: dict[int, list[tuple[int, Piece]]], D: int, dtype: torch.dtype) -> list[_Block]:
    """Group the parameters' combined pieces into blocks of ``K``.

    Outer pieces of parameters used by exactly the same calls with the same
    output factors (a layer's weight and bias) share one block; formed rows go
    into one block. The pieces are taken out of ``pieces`` as they are used.
    """
    blocks: list[_Block] = []
    outer: dict[tuple[tuple[int, int], ...], list[tuple[int, _Outer]]] = {}
    rows: list[tuple[int, torch.Tensor]] = []
    for i in list(pieces):
        lst = pieces.pop(i)  # taken out of ``pieces``: a block's factors go once it is built
        piece = _combine([p for _, p in lst], D, dtype)
        if isinstance(piece, _Outer):
            outer.setdefault(tuple((c, id(p.g)) for c, p in lst if isinstance(p, _Outer)), []).append((i, piece))
        elif isinstance(piece, _Index):
            blocks.append(_IndexBlock(i, piece, D))
        else:
            rows.append((i, piece.m.to(dtype)))
    for key in list(outer):
        group = outer.pop(key)
        params, widths, g = [i for i, _ in group], [p.a.shape[2] for _, p in group], group[0][1].g
        B, T = group[0][1].a.shape[:2]
        N, do = g.shape[0], g.shape[2]
        if _formed_cheaper(B, T, sum(widths), N, do):  # each piece's rows, side by side: no concatenated a
            parts = [p.rows(D).reshape(N, do, w) for (_, p), w in zip(group, widths)]
            m = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            blocks.append(_OuterBlock(params, widths, None, None, D, m=m.reshape(N, -1), d_out=do))
        else:
            a = group[0][1].a if len(group) == 1 else torch.cat([p.a for _, p in group], dim=2)
            blocks.append(_OuterBlock(params, widths, a, g, D))
        del group
    if rows:
        blocks.append(_RowsBlock([i for i, _ in rows], [m for _, m in rows]))
    return blocks


class GramJacobian:
    r"""The per-sample Jacobian ``J`` (``N x P``) of one closure evaluation, as its Gram matrix and products.

    Satisfies :class:`truncpinv.LinearOperator` (``shape``, ``dtype``,
    ``device``, ``matmat``, ``rmatmat``), so
    ``truncpinv.pinv_from_gram(G.gram, G)`` is the truncated pseudoinverse of ``J``.

    Attributes:
        output: ``(N,)`` the closure's rows, detached.
        gram: ``(N, N)`` float64, :math:`K = J J^\top`.
        rows_per_sample: ``D``; row ``n`` belongs to sample ``n // D``.
        low_rank: ``(C, W)`` with ``J = J_0 + C W^T`` (``C``: ``N x r``, ``W``: ``P x r``), where
            ``J_0`` is the sum of the blocks (the coupling term of BatchNorm, :mod:`sven.linearize.gram_bn`);
            ``None`` when ``J`` is the sum of the blocks.
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
        self.low_rank: tuple[torch.Tensor, torch.Tensor] | None = None
        self._shape = (int(output.shape[0]), sum(numels))  # (read many times a step)

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, P)``: rows and parameters (the columns of :mod:`sven.linearize.dense`'s ``J``)."""
        return self._shape

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
        r = C2.shape[1]
        out = torch.empty(self._shape[1], r, dtype=self._dtype, device=self.device)
        rows = list(torch.split(out, self._numels))  # each parameter's rows
        parts: dict[int, torch.Tensor] = {}
        done: list[int] = []
        for blk in self._blocks:
            # one column (a direction) from factors: written in place; else each part copied into place once
            if r == 1 and isinstance(blk, _OuterBlock) and blk.rmatvec_into(C2, rows):
                done += blk.params
            else:
                parts.update(blk.rmatmat(C2))
        for i, dst in enumerate(rows):
            part = parts.get(i)
            if part is not None:
                dst.view(part.shape).copy_(part)  # (a block's part may be a strided view)
            elif i not in done:
                dst.zero_()
        if self.low_rank is not None:
            Cl, W = self.low_rank
            out += W @ (Cl.T @ C2)
        return out[:, 0] if vec else out

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        r"""``J X`` for ``X`` of shape ``(P, r)`` (or ``(P,)``): ``(N, r)`` in :attr:`dtype`."""
        vec = X.dim() == 1
        X2 = (X[:, None] if vec else X).to(self._dtype)
        xs = list(torch.split(X2, self._numels))
        out = torch.zeros(self.shape[0], X2.shape[1], dtype=self._dtype, device=self.device)
        for blk in self._blocks:
            out += blk.matmat(xs)
        if self.low_rank is not None:
            Cl, W = self.low_rank
            out += Cl @ (W.T @ X2)
        return out[:, 0] if vec else out

    def to_dense(self) -> torch.Tensor:
        """The ``(N, P)`` Jacobian itself, ``(J^T I)^T`` (for tests and small models)."""
        eye = torch.eye(self.shape[0], dtype=self._dtype, device=self.device)
        return self.rmatmat(eye).T
