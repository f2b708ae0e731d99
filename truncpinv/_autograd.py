r"""Autograd through a dense ``A``: ``tp.lstsq``, ``F @ b``, ``F.S``, ``F.to_dense()`` (issue #24).

The forward pass is the chosen solver's answer (randomized, Lanczos, LSMR...),
computed without a graph. The backward pass differentiates the function that
answer approximates, the spectral filter ``P(A) = V g(\Sigma) U^H`` at the
*fixed* truncation (see :mod:`truncpinv._spectral_grad` for the formula), from
a dense thin SVD of ``A``: the factorisation's own when it is one
(``DenseSVD``, complete), otherwise recomputed once per backward call.

Semantics of the truncation:

* the kept rank ``r`` is held fixed. The truncated pseudoinverse is
  discontinuous where a singular value crosses the cut-off; the gradient is
  the one of the fixed-``r`` branch, which is the derivative wherever the
  cut-off separates the spectrum (``sigma_r > cutoff >= sigma_{r+1}``), and
  it grows like ``1 / (sigma_r - sigma_{r+1})`` as the gap closes;
* singular values at the round-off level (at most ``max(m, n) eps sigma_1``)
  count as exactly zero: the rank of ``A`` is held constant, as in
  Golub & Pereyra (1973). A perturbation that lifts them changes the
  pseudoinverse discontinuously unless they are discarded by the cut-off;
* higher derivatives (``create_graph=True``) differentiate the same formula
  through the SVD (:mod:`truncpinv._svd_grad`: ``torch.linalg.svd``'s backward,
  safe at exactly zero values), which assumes distinct nonzero singular values
  among those that carry a gradient; third derivatives are not available.

The functions use ``setup_context`` and ``generate_vmap_rule`` so that the
reverse-mode transforms of :mod:`torch.func` (``grad``, ``jacrev``) work;
forward mode has no rule here and is refused where the inputs are validated
(:func:`truncpinv._validation.check_reverse_mode`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._spectral_grad import SpectralFilter, singular_values_vjp, solve_vjp
from ._svd_grad import svd

__all__ = ["backward_svd", "differentiable_singular_values", "differentiable_solve", "linear_in_rhs"]


def _like(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad`` in the dtype of ``x``: its real part for a real ``x`` (the gradient of ``Re <grad, dx>``)."""
    if grad.is_complex() and not x.is_complex():
        grad = grad.real
    return grad.to(x.dtype)


def backward_svd(
    A: torch.Tensor, reuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``(U, S, V)`` of ``A`` over its numerically nonzero values (at least ``keep`` of them).

    Differentiable (through ``torch.linalg.svd``) when the backward pass itself
    is recorded (``create_graph=True``); otherwise the factorisation's own
    complete SVD ``reuse`` when there is one, or a fresh one.
    """
    if torch.is_grad_enabled() and A.requires_grad:
        U, S, Vh = svd(A)  # torch.linalg.svd's backward, safe where values are exactly zero
        V = Vh.mH
    elif reuse is not None:
        U, S, V = reuse
    else:
        with torch.no_grad():
            U, S, Vh = torch.linalg.svd(A.detach(), full_matrices=False)
        V = Vh.mH
    s = S.detach()
    # round-off level: the default cut-off of torch.linalg.pinv, max(m, n) eps sigma_1 (strictly above it counts)
    floor = max(A.shape[-2:]) * torch.finfo(s.dtype).eps * float(s[0]) if s.numel() else 0.0
    q = max(int((s > floor).sum()), int(keep))
    return U[:, :q], S[:q], V[:, :q]


class _Solve(torch.autograd.Function):
    """``x = P(A) b`` with the solver's forward and the spectral filter's derivative."""

    generate_vmap_rule = True  # torch.func.jacrev vmaps the backward pass over cotangents

    @staticmethod
    def forward(  # type: ignore[override]
        A: torch.Tensor,
        b: torch.Tensor,
        compute: Callable[[], torch.Tensor],
        filt: SpectralFilter,
        reuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        return compute()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        A, b, _, filt, reuse = inputs
        ctx.save_for_backward(A, b)
        ctx.filt, ctx.reuse = filt, reuse

    @staticmethod
    def backward(ctx: Any, xbar: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        A, b = ctx.saved_tensors
        filt: SpectralFilter = ctx.filt
        U, S, V = backward_svd(A, ctx.reuse, filt.min_values)
        dt = torch.promote_types(xbar.dtype, A.dtype)
        rest = None
        if torch.is_grad_enabled() and A.requires_grad and S.shape[0] < min(A.shape):
            rest = (A - (U * S) @ V.mH).to(dt)  # ~0, but its derivative enters the second derivatives
        Abar, bbar = solve_vjp(
            U.to(dt),
            S.to(dt.to_real() if dt.is_complex else dt),
            V.to(dt),
            filt,
            b.to(dt),
            xbar.to(dt),
            need_A=ctx.needs_input_grad[0],
            need_b=ctx.needs_input_grad[1],
            rest=rest,
        )
        return (
            None if Abar is None else _like(Abar, A),
            None if bbar is None else _like(bbar, b),
            None,
            None,
            None,
        )


class _SingularValues(torch.autograd.Function):
    """The ``count`` leading singular values, as the solver computed them; ``d s_i = Re u_i^H dA v_i``."""

    generate_vmap_rule = True  # torch.func.jacrev vmaps the backward pass over cotangents

    @staticmethod
    def forward(  # type: ignore[override]
        A: torch.Tensor,
        values: torch.Tensor,
        reuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        return values.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        A, values, reuse = inputs
        ctx.save_for_backward(A)
        ctx.count, ctx.reuse = values.shape[0], reuse

    @staticmethod
    def backward(ctx: Any, Sbar: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (A,) = ctx.saved_tensors
        U, _, V = backward_svd(A, ctx.reuse, ctx.count)
        k = ctx.count
        return _like(singular_values_vjp(U[:, :k], V[:, :k], Sbar), A), None, None


class _LinearInRhs(torch.autograd.Function):
    """``x = P b`` for a fixed ``P`` that is only applied (matrix-free LSMR): ``bbar = P^H xbar`` by ``adjoint``."""

    generate_vmap_rule = True  # torch.func.jacrev vmaps the backward pass over cotangents

    @staticmethod
    def forward(  # type: ignore[override]
        b: torch.Tensor,
        compute: Callable[[], torch.Tensor],
        adjoint: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        return compute()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        b, _, adjoint = inputs
        ctx.adjoint, ctx.dtype = adjoint, b.dtype

    @staticmethod
    def backward(ctx: Any, xbar: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        # recorded when create_graph=True: the adjoint solve is itself differentiable in xbar
        return ctx.adjoint(xbar).to(ctx.dtype), None, None


def linear_in_rhs(
    b: torch.Tensor, compute: Callable[[], torch.Tensor], adjoint: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``compute()`` (``x = P b``, ``P`` fixed) with the gradient ``adjoint(xbar) = P^H xbar`` to ``b``."""
    out: torch.Tensor = _LinearInRhs.apply(b, compute, adjoint)
    return out


def differentiable_solve(
    A: torch.Tensor,
    b: torch.Tensor,
    compute: Callable[[], torch.Tensor],
    filt: SpectralFilter,
    reuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``compute()`` (the solver's ``x = P(A) b``, ``(n, k)``) with gradients to ``A`` and ``b`` ``(m, k)``."""
    out: torch.Tensor = _Solve.apply(A, b, compute, filt, reuse)
    return out


def differentiable_singular_values(
    A: torch.Tensor, values: torch.Tensor, reuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``values`` (the solver's leading singular values of ``A``) with gradients to ``A``."""
    out: torch.Tensor = _SingularValues.apply(A, values, reuse)
    return out
