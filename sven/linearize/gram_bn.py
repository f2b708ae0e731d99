r"""BatchNorm with batch statistics on the Gram route: per-sample factors plus an exact low-rank coupling term.

In training mode BatchNorm normalises channel ``c`` with the mean
:math:`\mu_c` and standard deviation :math:`\sigma_c` of the batch, so each
output depends on every sample and the per-sample factors of
:mod:`sven.linearize.gram` alone are wrong. The exact backward of one such
layer, for a cotangent :math:`h` at its output (:math:`m` entries per channel:
batch times positions, :math:`\hat x` the normalised input), is

.. math::

    \frac{\partial}{\partial x} = \frac{\gamma_c}{\sigma_c}\Big(h - \frac{1}{m}\sum h
        - \hat x \,\frac{1}{m}\sum h \hat x\Big).

Row ``n`` of ``J`` reaches the layer with a cotangent that is non-zero only on
its own sample (all other layers act per sample). Its first term is the
backward of the layer with the statistics held constant, a per-sample affine
map; the other two are, whatever ``n``, a combination of ``2C`` fixed vectors
at the layer's input, :math:`e_c` (ones on channel ``c``) and
:math:`\hat x_c` (``x_hat`` on channel ``c``), with the coefficients

.. math::

    C_{n,c} = -\frac{\gamma_c}{m \sigma_c} \sum_t h_{nct}, \qquad
    C_{n,C+c} = -\frac{\gamma_c}{m \sigma_c} \sum_t h_{nct} \hat x_{b(n)ct}.

Applying this at every such layer, from the output back (the same argument
holds for the cotangents the later layers' terms send through the earlier
ones), gives

.. math::

    J = J_0 + C W^\top,

where :math:`J_0` is the Jacobian with every batch statistic held constant
(the per-sample factors, read from one backward pass in which the recorded
layers' statistics are constants: :class:`~sven.linearize.recorder.StatsSwitch`),
``C`` (``N x r``, ``r = 2 sum C``) comes from those factors, and the column
``W_{:,j}`` is the exact vector-Jacobian product of the ``j``-th fixed vector at
the layer's input, through the exact graph (one backward pass per vector).
``K = J J^T`` is then

.. math::

    K = K_0 + (J_0 W) C^\top + C (J_0 W)^\top + C (W^\top W) C^\top .

``W`` is ``P x r``: the term is used while ``r < N`` (otherwise the materialised
Jacobian, ``N x P``, is the smaller one and the route reports the layer as
unsupported). ``batchnorm="frozen"`` on the route drops the term: the step
then linearises with the batch statistics held constant, an approximation
(measured in ``docs/sven.md``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from .base import strided
from .gram_factors import GramJacobian, bn_xhat, layer_input
from .recorder import Call, StatsSwitch

__all__ = ["BATCHNORM_MODES", "add_coupling", "coupling"]

#: Accepted values of the ``batchnorm`` option of the Gram route.
BATCHNORM_MODES = ("exact", "frozen")


def _vectors(x: torch.Tensor, xhat: torch.Tensor) -> Iterator[torch.Tensor]:
    """The ``2C`` fixed cotangents at a BatchNorm input ``(B, C, ...)``: ones, then ``x_hat``, on one channel each."""
    for kind in range(2):
        for c in range(x.shape[1]):
            v = torch.zeros_like(x)
            v[:, c] = 1 if kind == 0 else xhat[:, c]
            yield v


def _from_producer(
    calls: Sequence[Call], x: torch.Tensor, xhat: torch.Tensor, params: Sequence[torch.Tensor], B: int
) -> torch.Tensor | None:
    r"""``W``'s ``2C`` columns without a backward pass, when ``x`` is the output of a Linear or Conv call on data.

    Then only that layer's weight and bias depend on ``x``, and the product of
    the fixed vector of channel ``c`` is non-zero in row ``c`` only:
    :math:`\sum_{b,t} a_{bt}` (ones) or :math:`\sum_{b,t} \hat x_{bct} a_{bt}`
    for the weight, :math:`m` or :math:`\sum \hat x_{c}` for the bias.
    """
    prod = next((c for c in calls if c.out is x and c.kind in (nn.Linear, nn.Conv1d, nn.Conv2d)), None)
    if prod is None or prod.inp.requires_grad:
        return None
    module: Any = prod.module
    a = layer_input(module, prod.kind, prod.inp.detach(), B).to(x.dtype)  # (B, T, d_in)
    C = x.shape[1]
    xr = xhat.reshape(B, C, -1)
    if xr.shape[2] != a.shape[1] or C != module.weight.shape[0]:
        return None  # pragma: no cover - a Linear on (B, T, d) feeds BatchNorm only through a reshape
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    where = {id(p): o for p, o in zip(params, offsets)}
    W = torch.zeros(offsets[-1], 2, C, dtype=x.dtype, device=x.device)
    d_in = a.shape[2]
    rows = torch.arange(C, device=x.device)
    if id(module.weight) in where:
        o = where[id(module.weight)]
        Wv = W[o : o + C * d_in].view(C, d_in, 2, C)
        Wv[rows, :, 0, rows] = a.sum((0, 1))
        Wv[rows, :, 1, rows] = torch.einsum("bct,bti->ci", xr, a)
    if module.bias is not None and id(module.bias) in where:
        o = where[id(module.bias)]
        W[o + rows, 0, rows] = float(a.shape[0] * a.shape[1])
        W[o + rows, 1, rows] = xr.sum((0, 2))
    return W.reshape(-1, 2 * C)


def coupling(
    calls: Sequence[Call],
    gs: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    B: int,
    D: int,
    switch: StatsSwitch,
) -> tuple[torch.Tensor, torch.Tensor] | str | None:
    """``(C, W)`` of the coupling term ``J - J_0 = C W^T`` (module docstring), a reason, or ``None`` (no term).

    Args:
        calls: the recorded calls; those with batch statistics whose input has a graph contribute.
        gs: the per-row gradients at the calls' outputs with the statistics held constant.
        params: the optimised parameters (columns of ``W``).
        B, D: batch size and rows per sample.
        switch: set to the exact graph for the products of the fixed vectors.
    """
    todo = [(c, g) for c, g in zip(calls, gs) if c.stats is not None and g is not None and c.inp.requires_grad]
    if not todo:
        return None
    N = B * D
    r = sum(2 * c.inp.shape[1] for c, _ in todo)
    if r >= N:
        names = ", ".join(sorted({type(c.module).__name__ for c, _ in todo}))
        return (
            f"{names} normalises with batch statistics (training mode), which couples the samples; the exact "
            f"coupling term has rank {r} (2 x channels), not below the {N} rows, so the materialised Jacobian is "
            f"the smaller (or pass batchnorm='frozen' to the Gram route to hold the statistics constant)"
        )
    coefs: list[torch.Tensor] = []
    cols: list[torch.Tensor] = []
    frozen = switch.frozen
    switch.frozen = False
    try:
        for c, g in todo:
            x, module = c.inp, cast(Any, c.module)
            stats = c.stats
            assert stats is not None  # filtered above
            Cn = x.shape[1]
            xhat = bn_xhat(module, x.detach(), stats)
            m = x.numel() // Cn
            gamma = module.weight.detach() if module.weight is not None else torch.ones_like(stats[1])
            scale = -(gamma * stats[1]).to(g.dtype) / m
            h = g.reshape(N, Cn, -1)
            xr = xhat.reshape(B, Cn, -1).to(g.dtype)
            xr = xr.repeat_interleave(D, 0) if D > 1 else xr
            coefs.append(torch.cat([h.sum(2) * scale, (h * xr).sum(2) * scale], dim=1))
            direct = _from_producer(calls, x, xhat, params, B)
            if direct is not None:
                cols.extend(direct.unbind(1))
                continue
            # one backward pass per fixed vector: measured twice as fast as a batched
            # (is_grads_batched) pass through a convolution on the CPU
            for v in _vectors(x, xhat):
                vjp = torch.autograd.grad(x, list(params), grad_outputs=v, retain_graph=True, allow_unused=True)
                flat = [torch.zeros_like(p) if d is None else strided(d) for p, d in zip(params, vjp)]
                cols.append(torch.cat([f.reshape(-1) for f in flat]))
    finally:
        switch.frozen = frozen
    return torch.cat(coefs, dim=1), torch.stack(cols, dim=1)


def add_coupling(G: GramJacobian, C: torch.Tensor, W: torch.Tensor) -> GramJacobian:
    """``G`` (``J_0``) turned into ``J_0 + C W^T``: ``K`` updated in float64, the term kept for the products."""
    W = W.to(G.dtype)
    C = C.to(G.dtype)
    JW = G.matmat(W).double()
    Cd, Wd = C.double(), W.double()
    cross = JW @ Cd.T
    G.gram = G.gram + cross + cross.T + Cd @ (Wd.T @ Wd) @ Cd.T
    G.low_rank = (C, W)
    return G
