r"""A thin SVD whose backward pass is :func:`torch.linalg.svd`'s, safe at exactly equal or zero values.

The second derivatives of :mod:`truncpinv._autograd` differentiate the
first-order formula through the SVD of ``A``. That formula uses only the
numerically nonzero triplets, so the triplets of (exactly) zero singular
values receive no gradient. :func:`torch.linalg.svd`'s backward still divides
by ``s_j^2 - s_i^2`` and by ``s_j`` for them, ``0 / 0 = NaN`` when the values
are exactly zero (a matrix with zero rows or columns). Here the same formula
(Townsend 2016; torch's ``svd_backward``),

.. math::

    \bar A = U \Big[\frac{\mathrm{Sk}(U^H \bar U) S + S\, \mathrm{Sk}(V^H \bar V)}{E}
                  + \mathrm{diag}(\bar s)\Big] V^H
             + (I - U U^H) \bar U S^{-1} V^H + U S^{-1} \bar V^H (I - V V^H),
    \qquad E_{ij} = s_j^2 - s_i^2,

(``Sk(X) = X - X^H``; complex input adds ``diag(Sk(U^H \bar U)_{ii} / (2 s_i))``)
is evaluated with ``0`` where a denominator is exactly zero. That is the
limit for a gradient that does not depend on how a basis of a degenerate
singular subspace is chosen, which holds for the spectral filters here
(their derivative depends on ``U``, ``V`` only through ``u_i v_i^H``-type
products and projectors). Elsewhere it is torch's formula, which assumes
distinct nonzero values among those that carry a gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["svd"]


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, and ``0`` where ``den == 0``."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


class _SVD(torch.autograd.Function):
    generate_vmap_rule = True  # torch.func.jacrev vmaps the backward pass over cotangents

    @staticmethod
    def forward(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return U, S, Vh

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        ctx.save_for_backward(*output)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gU: torch.Tensor, gS: torch.Tensor, gVh: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        U, S, Vh = ctx.saved_tensors
        m, n = U.shape[-2], Vh.shape[-1]
        gU = torch.zeros_like(U) if gU is None else gU
        gVh = torch.zeros_like(Vh) if gVh is None else gVh
        gS = torch.zeros_like(S) if gS is None else gS
        UhgU = U.mH @ gU
        UhgU = UhgU - UhgU.mH
        VhgV = Vh @ gVh.mH
        VhgV = VhgV - VhgV.mH
        S2 = S * S
        E = S2[None, :] - S2[:, None]
        E.fill_diagonal_(1.0)
        inner = _safe_div(UhgU * S[None, :] + S[:, None] * VhgV, E) + torch.diag_embed(gS).to(U.dtype)
        if U.is_complex():
            inner = inner + torch.diag_embed(_safe_div(torch.diagonal(UhgU), (2 * S).to(U.dtype)))
        if m > n:  # (I - U U^H) gU S^{-1} V^H
            gUS = _safe_div(gU, S[None, :].to(U.dtype))
            return (U @ inner + gUS - U @ (U.mH @ gUS)) @ Vh
        if m < n:  # U S^{-1} gV^H (I - V V^H)
            SgVh = _safe_div(gVh, S[:, None].to(U.dtype))
            return U @ (inner @ Vh + SgVh - (SgVh @ Vh.mH) @ Vh)
        return U @ inner @ Vh


def svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(A, full_matrices=False)`` with the safe backward pass described above."""
    U, S, Vh = _SVD.apply(A)
    return U, S, Vh
