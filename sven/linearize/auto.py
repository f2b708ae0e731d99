r"""Route choice: :func:`choose_route` (a pure rule) and :class:`Linearizer` (the routes, the fallback, the state).

The rule behind ``jacobian="auto"``:

0. A :class:`sven.pinn.Residuals` closure (residuals that differentiate the
   network with respect to its inputs): the pointwise route
   (:mod:`.pointwise`), a ``vmap`` over points of ``jacrev``.
1. RMSProp on the Jacobian rescales the columns of the materialised ``M``:
   the dense route (``"gram"`` is then an error).
2. A truncpinv solver other than ``Auto`` was chosen: the dense route, where
   the solver applies.
3. A model the Gram route could not handle (remembered after the first try):
   the dense route.
4. More rows than parameters (``N > TALL_RATIO * P``), on one process: the
   dense route. The Gram matrix ``K = M M^T`` is ``N x N`` and its
   factorisation costs ``O(N^3)``, while the materialised ``M`` costs
   ``N x P`` memory and its factorisation ``O(N P^2)``. The previous step's
   ``N`` decides; on the first step the Gram route itself declines such a
   closure after the forward pass (:class:`~sven.linearize.base.Declined`)
   and the Jacobian comes from the same evaluation. Measured per step on
   ``1-w-w-1`` tanh MLPs (one thread, ``benchmarks/bench_route_crossover.py``):
   the two routes cost the same near ``N = P`` and the Gram route is 2-9x
   slower at ``N = 2P`` to ``4P`` (30x for ``P = 673``, ``N = 4P``).
5. A tiny problem, ``N * P < GRAM_MIN_ENTRIES`` for the previous step's
   ``N`` rows, on one process: the dense route, as fast when Python overhead
   dominates both.
6. Otherwise the Gram route.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._validation import user_stacklevel
from .base import Declined, Linearization, RowSpec, Unsupported
from .dense import DenseRoute, autograd_jacobian
from .gram import GramRoute
from .matfree import MatfreeRoute
from .pointwise import PointwiseRoute, Residuals

__all__ = ["GRAM_MIN_ENTRIES", "ROUTES", "TALL_RATIO", "Linearizer", "choose_route"]

#: Accepted route names (the ``jacobian`` option of :class:`sven.Sven`).
ROUTES = ("auto", "gram", "hooks", "autograd", "matfree", "pointwise")
#: Under ``"auto"`` the Gram route is used from this many Jacobian entries (``N * P``) on; below it the
#: materialised hook path is as fast (Python overhead dominates both).
GRAM_MIN_ENTRIES = 1 << 16
#: Under ``"auto"`` a closure with more than ``TALL_RATIO * P`` rows takes the materialised route: its
#: ``N x N`` Gram matrix costs more than ``M`` itself (measured crossover between ``N = P`` and ``N = 2P``).
TALL_RATIO = 1.0


def choose_route(
    requested: str,
    *,
    gram_allowed: bool,
    rmsprop_on_jacobian: bool,
    entries: int | None,
    gram_failed: bool,
    distributed: bool,
    pointwise: bool = False,
    rows: int | None = None,
    cols: int | None = None,
) -> str:
    """The route to run: ``"gram"``, ``"dense"``, ``"matfree"`` or ``"pointwise"`` (the rule in the module docstring).

    Args:
        requested: one of :data:`ROUTES`.
        gram_allowed: the solver is truncpinv's ``Auto`` (the Gram route factorises ``K`` itself).
        rmsprop_on_jacobian: RMSProp rescales the materialised Jacobian.
        entries: ``N * P`` of the previous step (``None`` on the first).
        gram_failed: the Gram route was found not to apply to this model.
        distributed: data-parallel (the tiny-problem shortcut is off).
        pointwise: the closure is a :class:`~sven.linearize.pointwise.Residuals` object.
        rows: ``N`` of the previous step (``None`` on the first).
        cols: ``P``, the number of parameters (``None``: not weighed).
    """
    if requested == "pointwise" or (requested == "auto" and pointwise):
        return "pointwise"
    if requested in ("hooks", "autograd"):
        return "dense"
    if requested == "matfree":
        return "matfree"
    if rmsprop_on_jacobian:
        if requested == "gram":
            raise ValueError(
                "`jacobian='gram'` cannot be combined with RMSProp on the Jacobian (rmsprop_post=False), which "
                "rescales the columns of the materialised M; use rmsprop_post=True or jacobian='auto'"
            )
        return "dense"
    if requested == "gram":
        return "gram"
    tall = rows is not None and cols is not None and rows > TALL_RATIO * cols and not distributed
    tiny = entries is not None and entries < GRAM_MIN_ENTRIES and not distributed
    return "gram" if (not gram_failed and gram_allowed and not tiny and not tall) else "dense"


class Linearizer:
    """The routes of one optimizer, chosen by :func:`choose_route`, with the fallback from the Gram route.

    When the Gram route does not apply under ``"auto"``, one warning names
    the layer (none for a closure of bare parameters, with no layer the route
    could use: the materialised Jacobian is its natural route); the exact
    Jacobian is then computed from the same closure evaluation, and the dense
    route is used from then on.

    Args:
        requested: one of :data:`ROUTES`.
        gram_allowed: see :func:`choose_route`.
        rmsprop_on_jacobian: see :func:`choose_route`.
        chunk_size: columns per batched product of the matrix-free route.
        seed: seed of the verification probes.

    Attributes:
        gram, dense, matfree, pointwise: the four routes (each a :class:`~sven.linearize.base.Route`).
        gram_failed: why the Gram route does not apply (``None``: not seen to fail).
    """

    #: :class:`~sven.linearize.parallel.DataParallel` passes its ``agree`` callback.
    handles_agreement = True

    def __init__(
        self,
        requested: str = "auto",
        *,
        gram_allowed: bool = True,
        rmsprop_on_jacobian: bool = False,
        chunk_size: int = 64,
        seed: int = 0,
    ) -> None:
        if requested not in ROUTES:
            raise ValueError(f"`jacobian` must be one of {list(ROUTES)}, got {requested!r}")
        self.requested = requested
        self.gram_allowed = gram_allowed
        self.rmsprop_on_jacobian = rmsprop_on_jacobian
        self.gram = GramRoute(seed=seed)
        self.dense = DenseRoute(requested if requested in ("hooks", "autograd") else "auto")
        self.matfree = MatfreeRoute(chunk_size)
        self.pointwise = PointwiseRoute()
        self.gram_failed: str | None = None
        self._last_rows: int | None = None

    def __call__(
        self,
        closure: Callable[[], Any],
        params: Sequence[torch.Tensor],
        rows: RowSpec,
        *,
        agree: Callable[[bool], bool] | None = None,
    ) -> Linearization:
        """Linearise the closure on the chosen route; a bfloat16/float16 Jacobian is handed on in float32."""
        return _at_least_float32(self._linearize(closure, params, rows, agree))

    def _linearize(
        self,
        closure: Callable[[], Any],
        params: Sequence[torch.Tensor],
        rows: RowSpec,
        agree: Callable[[bool], bool] | None,
    ) -> Linearization:
        n_cols = sum(p.numel() for p in params)
        route = choose_route(
            self.requested,
            gram_allowed=self.gram_allowed,
            rmsprop_on_jacobian=self.rmsprop_on_jacobian,
            entries=None if self._last_rows is None else self._last_rows * n_cols,
            gram_failed=self.gram_failed is not None,
            distributed=agree is not None,
            pointwise=isinstance(closure, Residuals),
            rows=self._last_rows,
            cols=n_cols,
        )
        if route == "pointwise":
            res = self.pointwise(closure, params, rows)
            if isinstance(res, Linearization):
                return res
            if self.requested == "pointwise":
                raise ValueError(f"`jacobian='pointwise'` does not apply: {res.reason}")
            with torch.enable_grad():  # exact: autograd through the input derivatives
                return _materialised(rows(closure()), params)
        if route == "matfree":
            return self.matfree(closure, params, rows)
        if route == "gram":
            # under "auto" on one process, the Gram route declines a closure with more rows than parameters (rule 4)
            self.gram.tall_ratio = TALL_RATIO if self.requested == "auto" and agree is None else None
            res = self.gram(closure, params, rows)
            if isinstance(res, Declined):
                # more rows than parameters: M itself, from the same closure evaluation; dense from now on
                self._last_rows = int(res.output.shape[0])
                with torch.enable_grad():
                    return _materialised(res.output, params)
            ok = not isinstance(res, Unsupported)
            if agree is not None:
                ok = agree(ok)
            if ok and isinstance(res, Linearization):
                self._last_rows = int(res.local.shape[0])
                return res
            reason = res.reason if isinstance(res, Unsupported) else "another rank could not use the Gram route"
            if self.requested == "gram":
                raise ValueError(f"`jacobian='gram'` does not apply to this model: {reason}")
            self.gram_failed = reason
            if not (isinstance(res, Unsupported) and res.quiet):  # bare parameters: no layer to use, nothing lost
                warnings.warn(
                    f"Sven: the Gram route does not apply ({reason}); using the materialised Jacobian instead "
                    f"(memory B x P). Pass jacobian='hooks' or 'autograd' to silence this warning.",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
            if isinstance(res, Unsupported) and res.output is not None:
                return _materialised(res.output, params)
        lin = self.dense(closure, params, rows)
        self._last_rows = int(lin.local.shape[0])
        return lin


def _materialised(out: torch.Tensor, params: Sequence[torch.Tensor]) -> Linearization:
    """The exact Jacobian of rows that still hold their graph (a route's fallback without running the closure again)."""
    return Linearization(out.detach(), out.detach(), autograd_jacobian(out, list(params)), "autograd")


class _Float32:
    """A bfloat16/float16 operator's products, returned in float32 (the solvers factorise in float32 or float64)."""

    def __init__(self, op: Any) -> None:
        self.op = op
        self.shape, self.device, self.dtype = op.shape, op.device, torch.float32
        if hasattr(op, "gram"):  # a GramOperator: K is already float64
            self.gram = op.gram

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.op.matmat(X.to(self.op.dtype)).float()

    def rmatmat(self, C: torch.Tensor) -> torch.Tensor:
        return self.op.rmatmat(C.to(self.op.dtype)).float()


def _at_least_float32(lin: Linearization) -> Linearization:
    """``lin`` with a half-precision Jacobian (bfloat16/float16 models) and rows in float32; ``local`` unchanged.

    The materialised Jacobian is cast (its entries are exact in float32); a matrix-free operator keeps computing
    in the model's dtype and returns float32 products.
    """
    J = lin.jacobian
    if J.dtype not in (torch.float16, torch.bfloat16):
        return lin
    Jf: Any = J.float() if isinstance(J, torch.Tensor) else _Float32(J)
    return Linearization(lin.local, lin.rows.float(), Jf, lin.method)
