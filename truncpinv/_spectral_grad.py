r"""Derivatives of a spectral filter ``P(A) = V g(\Sigma) U^H`` of a matrix ``A = U \Sigma V^H``.

The truncated pseudoinverse keeps ``g(s) = 1/s`` on the ``r`` kept singular
values and ``g = 0`` on the others; LSMR's damped (Tikhonov) solution is
``g(s) = s / (s^2 + \lambda^2)`` on every value. Both are *generalised matrix
functions* (Noferini 2017), whose first derivative is a divided-difference
formula. With the thin SVD restricted to the ``q`` numerically nonzero values
and ``X = U^H dA V`` (``q x q``),

.. math::

    dP = V \big[\Phi_1 \circ \mathrm{He}(X) - \Phi_2 \circ \mathrm{Sk}(X)\big] U^H
         + (I - V V^H)\, dA^H\, U D U^H + V D V^H\, dA^H (I - U U^H)
         + g'(0)\, (I - V V^H)\, dA^H (I - U U^H),

where ``He(X) = (X + X^H)/2``, ``Sk(X) = (X - X^H)/2``,
``\Phi_1[i,j] = (g_i - g_j)/(s_i - s_j)`` (``g'(s_i)`` on the diagonal),
``\Phi_2[i,j] = (g_i + g_j)/(s_i + s_j)`` and ``D = diag(g_i / s_i)``. The
complement terms carry the derivative of the singular vectors out of the
span of ``U`` and ``V``; singular values at the round-off level (at most
``max(m, n) eps sigma_1``) are treated as exactly zero, which merges them into
those projectors (their pairs with a kept value have the limits
``\Phi_1 = \Phi_2 = g_i / s_i``, and zero-zero pairs have ``g'(0)``).

**Gap awareness.** For two kept values of the truncated pseudoinverse the
divided differences have the closed forms ``\Phi_1 = -1/(s_i s_j)`` and
``\Phi_2 = 1/(s_i s_j)``: nearly equal (or equal) kept values cost nothing.
Only pairs across the cut divide by a difference, ``s_i - s_j`` with
``s_i`` kept and ``s_j`` discarded, which is at least the gap
``sigma_r - sigma_{r+1}``. Two discarded values give ``0``. The ridge filter's
divided differences, ``(\lambda^2 \mp s_i s_j) / ((s_i^2 + \lambda^2)(s_j^2 + \lambda^2))``,
never divide by a difference at all.

The vector-Jacobian product is the adjoint under ``<X, Y> = Re tr(X^H Y)``
(``He``, ``Sk`` and the Hadamard product with the real symmetric ``\Phi``
are self-adjoint). For ``x = P b`` and an incoming ``\bar x``, with
``\bar P = \bar x b^H`` and ``M = (V^H \bar x)(U^H b)^H``:

.. math::

    \bar A = U \big[\Phi_1 \circ \mathrm{He}(M) - \Phi_2 \circ \mathrm{Sk}(M)\big] V^H
             + U D U^H b\, \bar x^H (I - V V^H) + (I - U U^H) b\, \bar x^H V D V^H
             + g'(0)\, (I - U U^H) b\, \bar x^H (I - V V^H),
    \qquad \bar b = U g V^H \bar x.

Everything is written in differentiable torch operations of ``(U, S, V)``,
``b`` and ``\bar x``, so when the SVD itself is differentiable (the backward
of the backward, :mod:`truncpinv._autograd`) the second derivatives follow,
but for one term: the values treated as zero do move to first order. Their
block ``N = A - U S V^H`` (round-off at ``A``, derivative
``(I - U U^H) dA (I - V V^H)``) changes the divided differences with a kept
value by ``+- alpha_i s_j`` (``alpha = g / s^2`` truncated, ``-g / \lambda^2``
ridge), which adds ``V alpha U^H dA N^H + N^H dA V alpha U^H`` to ``dP`` and
``g'(0) N^H`` to ``P``; :func:`solve_vjp` takes ``N`` as ``rest`` for that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Ridge", "SpectralFilter", "Truncated", "singular_values_vjp", "solve_vjp"]


@dataclass(frozen=True)
class SpectralFilter:
    """The function ``g`` applied to the singular values, with its divided differences."""

    def coefficients(self, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(g, D, Phi1, Phi2)`` for the descending values ``S`` (``D = g / s``)."""
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def null(self) -> float:
        """``g'(0)``: the weight of the joint null spaces of ``A`` (``0`` for the truncated pseudoinverse)."""
        return 0.0

    @property
    def min_values(self) -> int:
        """How many leading singular values the formula needs even when they are at the round-off level."""
        return 0

    def slope(self, S: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``alpha_i = d Phi_1[i, j] / d s_j`` at ``s_j = 0`` (``= -d Phi_2[i, j] / d s_j``)."""
        raise NotImplementedError  # pragma: no cover - abstract


@dataclass(frozen=True)
class Truncated(SpectralFilter):
    """``g(s) = 1/s`` on the ``rank`` largest values, ``0`` on the rest: the truncated pseudoinverse.

    ``rank=None`` keeps every numerically nonzero value (the pseudoinverse at the default cut-off).
    """

    rank: int | None

    def coefficients(self, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        kept = torch.arange(S.shape[-1], device=S.device) < (S.shape[-1] if self.rank is None else self.rank)
        one = torch.ones_like(S)
        g = torch.where(kept, one / torch.where(kept, S, one), torch.zeros_like(S))
        gi, gj = g[:, None], g[None, :]
        si, sj = S[:, None], S[None, :]
        both = gi * gj  # 1 / (s_i s_j) for two kept values, 0 otherwise: the closed forms, no difference taken
        across = kept[:, None] ^ kept[None, :]  # one kept, one discarded: s_i - s_j is at least the gap
        phi1 = torch.where(across, (gi - gj) / torch.where(across, si - sj, 1.0), -both)
        phi2 = torch.where(across, (gi + gj) / torch.where(across, si + sj, 1.0), both)
        return g, g * g, phi1, phi2

    @property
    def min_values(self) -> int:
        return 0 if self.rank is None else self.rank

    def slope(self, S: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g * g * g  # g_i / s_i^2 for a kept value, 0 for a discarded one


@dataclass(frozen=True)
class Ridge(SpectralFilter):
    """``g(s) = s / (s^2 + damp^2)``: the Tikhonov-regularised solution ``(A^H A + damp^2 I)^{-1} A^H b``."""

    damp: float

    def coefficients(self, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lam2 = float(self.damp) ** 2
        h = 1.0 / (S * S + lam2)  # D = g / s
        prod = S[:, None] * S[None, :]
        hh = h[:, None] * h[None, :]
        return S * h, h, (lam2 - prod) * hh, (lam2 + prod) * hh

    @property
    def null(self) -> float:
        return 1.0 / float(self.damp) ** 2

    def slope(self, S: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return -g * self.null


def _herm(M: torch.Tensor) -> torch.Tensor:
    return (M + M.mH) / 2


def _skew(M: torch.Tensor) -> torch.Tensor:
    return (M - M.mH) / 2


def solve_vjp(
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    filt: SpectralFilter,
    b: torch.Tensor,
    xbar: torch.Tensor,
    *,
    need_A: bool = True,
    need_b: bool = True,
    rest: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    r"""``(\bar A, \bar b)`` of ``x = V g(S) U^H b`` for the cotangent ``xbar`` (see the module docstring).

    Args:
        U, S, V: the thin SVD of ``A`` restricted to its numerically nonzero values, ``(m, q)``, ``(q,)``, ``(n, q)``.
        filt: the spectral filter ``g``.
        b: ``(m, k)`` right-hand sides; ``xbar``: ``(n, k)``.
        need_A, need_b: which of the two to compute.
        rest: ``N = A - U S V^H``, the round-off-level remainder of ``A``, when second derivatives are wanted.
            Its value is negligible, but its derivative ``(I - U U^H) dA (I - V V^H)`` is the first-order
            change of the values that were treated as zero: ``d Phi[i, j] = +-alpha_i d s_j`` adds
            ``V alpha U^H dA N^H + N^H dA V alpha U^H`` to ``dP``, and ``g'(0) N^H`` to ``P``.
    """
    g, D, phi1, phi2 = filt.coefficients(S)
    Vx = V.mH @ xbar  # (q, k)
    bbar = U @ (g[:, None] * Vx) if need_b else None
    if bbar is not None and rest is not None and filt.null:
        bbar = bbar + filt.null * (rest @ xbar)
    if not need_A:
        return None, bbar
    Ub = U.mH @ b
    M = Vx @ Ub.mH
    Z = phi1 * _herm(M) - phi2 * _skew(M)
    rb = b - U @ Ub  # the parts of b and xbar outside range(A) and range(A^H)
    rx = xbar - V @ Vx
    right = V @ (D[:, None] * Vx)
    if filt.null:
        right = right + filt.null * rx
    Abar = U @ (Z @ V.mH + (D[:, None] * Ub) @ rx.mH) + rb @ right.mH
    if rest is not None:
        alpha = filt.slope(S, g)[:, None]
        Abar = Abar + (U @ (alpha * Vx)) @ (rest.mH @ b).mH + (rest @ xbar) @ (V @ (alpha * Ub)).mH
    return Abar, bbar


def singular_values_vjp(U: torch.Tensor, V: torch.Tensor, Sbar: torch.Tensor) -> torch.Tensor:
    r"""``\bar A = U diag(\bar s) V^H`` for the leading singular values (``d s_i = Re u_i^H dA v_i``)."""
    return (U * Sbar.to(U.dtype)) @ V.mH
