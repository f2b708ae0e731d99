r"""The functional Jacobian operator: ``f(params) -> rows`` through :mod:`torch.func`.

Where a model is available as a pure function of its parameters (e.g. built on
:func:`torch.func.functional_call`), ``M X`` is a batched forward-mode product
(:func:`torch.func.jvp` under :func:`torch.func.vmap`) and ``M^T U`` a batched
:func:`torch.func.vjp`. It is the building block of functional routes (residuals
that differentiate the network with respect to its inputs, for instance).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch.func import jvp, vjp, vmap

from .matfree import _check_block, _check_chunk_size

__all__ = ["FunctionalJacobian"]


class FunctionalJacobian:
    r"""The Jacobian of a function of parameters, ``f(params) -> rows``, as a matrix-free operator.

    ``params`` is a mapping of names to tensors (for a module,
    ``dict(module.named_parameters())`` with ``f`` built on
    :func:`torch.func.functional_call`); ``f`` must return a 1-D ``(N,)``
    tensor and be a pure function of ``params`` (no in-place updates of
    captured state, so no BatchNorm in training mode). Columns follow the order
    of ``params``, each flattened row-major.

    * ``matmat(X) = M X``: ``torch.func.vmap`` over the columns of
      ``torch.func.jvp(f, (params,), (x,))`` (forward mode, one batched
      forward pass per chunk). If an operation has no forward-mode derivative
      (``NotImplementedError``, e.g. a custom ``autograd.Function`` without
      ``jvp``), the operator switches for good to the double-backward trick:
      with ``h(u) = M^T u`` (the ``vjp`` below, linear in ``u``), ``M x`` is the
      ``vjp`` of ``h`` at ``u = 0`` applied to ``x``.
    * ``rmatmat(U) = M^T U``: ``torch.func.vmap`` over the columns of the
      ``vjp`` function, built once at construction (one forward pass).

    Args:
        f: the function; called with a dict of tensors.
        params: the point at which ``M`` is taken (detached internally).
        chunk_size: columns per vmapped call (``None``: all at once).
        matmat_via: ``"auto"`` (forward mode, falling back as above),
            ``"jvp"`` (forward mode, errors propagate) or ``"double_vjp"``.

    Attributes:
        output: ``f(params)``, detached.
        stats: ``matvecs``, ``forward``, ``adjoint`` as in
            :class:`ClosureJacobian`, and ``matmat_via``, the way in use.
    """

    def __init__(
        self,
        f: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: Mapping[str, torch.Tensor],
        *,
        chunk_size: int | None = None,
        matmat_via: Literal["auto", "jvp", "double_vjp"] = "auto",
    ) -> None:
        if not callable(f):
            raise TypeError(f"`f` must be callable, got {type(f).__name__}")
        if not isinstance(params, Mapping) or not params:
            raise ValueError("`params` must be a non-empty mapping of names to tensors")
        for k, p in params.items():
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                got = p.dtype if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"`params[{k!r}]` must be a floating-point tensor, got {got}")
        _check_chunk_size(chunk_size)
        if matmat_via not in ("auto", "jvp", "double_vjp"):
            raise ValueError(f"`matmat_via` must be 'auto', 'jvp' or 'double_vjp', got {matmat_via!r}")
        self._f = f
        self._params = {k: p.detach() for k, p in params.items()}
        self._numels = [p.numel() for p in self._params.values()]
        self.chunk_size = chunk_size
        primal = vjp(f, self._params)
        out, self._vjp_fn = primal[0], primal[1]
        if not isinstance(out, torch.Tensor) or out.dim() != 1:
            raise ValueError(f"`f` must return a 1-D tensor (one entry per row), got {getattr(out, 'shape', out)!r}")
        self.output = out.detach()
        self._via = matmat_via
        self._transposed_vjp: Callable[..., Any] | None = None
        self.stats: dict[str, Any] = {"matvecs": 0, "forward": 0, "adjoint": 0, "matmat_via": matmat_via}

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.output.shape[0]), sum(self._numels))

    @property
    def dtype(self) -> torch.dtype:
        return self.output.dtype

    @property
    def device(self) -> torch.device:
        return self.output.device

    def _as_dict(self, Xt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``Xt`` (``(r, P)``) as a dict of ``(r, *shape)`` tangents."""
        pieces = torch.split(Xt, self._numels, dim=1)
        return {
            k: piece.reshape(Xt.shape[0], *p.shape).to(p.dtype) for (k, p), piece in zip(self._params.items(), pieces)
        }

    def _flatten(self, d: Mapping[str, torch.Tensor], r: int) -> torch.Tensor:
        return torch.cat([d[k].reshape(r, -1).to(self.dtype) for k in self._params], dim=1)

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """``M^T Y`` for ``Y`` of shape ``(N, r)``; returns ``(P, r)``."""
        Y = _check_block(Y, "Y", self.shape[0], self.dtype, self.device)
        r = Y.shape[1]
        if r == 0:
            return Y.new_zeros(self.shape[1], 0)
        (grads,) = vmap(self._vjp_fn, chunk_size=self.chunk_size)(Y.T.contiguous())
        self._count("adjoint", r)
        return self._flatten(grads, r).T

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """``M X`` for ``X`` of shape ``(P, r)``; returns ``(N, r)``."""
        X = _check_block(X, "X", self.shape[1], self.dtype, self.device)
        r = X.shape[1]
        if r == 0:
            return X.new_zeros(self.shape[0], 0)
        V = self._as_dict(X.T.contiguous())
        if self._via in ("auto", "jvp"):
            try:
                res = vmap(self._jvp_one, chunk_size=self.chunk_size)(V)
                self._via = self.stats["matmat_via"] = "jvp"
            except NotImplementedError as e:
                if self._via == "jvp":
                    raise
                warnings.warn(
                    f"forward-mode AD is not available for this model ({e}); FunctionalJacobian uses the "
                    "double-backward trick for M X from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._via = self.stats["matmat_via"] = "double_vjp"
        if self._via == "double_vjp":
            res = vmap(self._double_vjp_one, chunk_size=self.chunk_size)(V)
        self._count("forward", r)
        return res.T.to(self.dtype)

    def _jvp_one(self, v: dict[str, torch.Tensor]) -> torch.Tensor:
        return jvp(self._f, (self._params,), (v,))[1]  # type: ignore[no-any-return]

    def _double_vjp_one(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._transposed_vjp is None:
            u0 = torch.zeros_like(self.output)
            self._transposed_vjp = vjp(lambda u: self._vjp_fn(u)[0], u0)[1]
        return self._transposed_vjp(x)[0]  # type: ignore[no-any-return]

    def _count(self, key: str, r: int) -> None:
        self.stats[key] += r
        self.stats["matvecs"] += r
