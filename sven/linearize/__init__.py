r"""Linearisation: run the closure once and get its rows and their Jacobian.

Every route has one job and one interface (:class:`~sven.linearize.base.Route`):
``route(closure, params, rows) -> Linearization | Unsupported``.

=====================  ==================================================================
module                 route
=====================  ==================================================================
:mod:`.gram`           the layer-factor Gram route: ``K = J J^T`` from one forward and one
                       backward pass, ``J`` never formed (Linear, Conv, Embedding, norms)
:mod:`.dense`          the materialised ``(N, P)`` Jacobian: verified hooks or autograd
:mod:`.matfree`        matrix-free products with ``J`` by autograd, any model
:mod:`.functional`     the ``torch.func`` operator of a pure function of the parameters
:mod:`.pointwise`      residuals that differentiate the network w.r.t. its inputs (PINNs):
                       ``vmap`` over points of ``jacrev``, for a :class:`Residuals` closure
:mod:`.parallel`       :class:`DataParallel`: any route over a batch sharded across ranks
:mod:`.auto`           :func:`choose_route` and :class:`Linearizer` (the ``"auto"`` rule)
:mod:`.recorder`       the forward-hook recorder shared by the routes that read layer factors
:mod:`.base`           :class:`Linearization`, :class:`RowSpec`, :class:`GramOperator`, row transforms
=====================  ==================================================================

A new route is a new file here with a class implementing the protocol; add
its name to :data:`~sven.linearize.auto.ROUTES` and to :func:`choose_route`.
"""

from .auto import GRAM_MIN_ENTRIES, ROUTES, TALL_RATIO, Linearizer, choose_route
from .base import (
    Declined,
    GramOperator,
    Linearization,
    LinearRows,
    Route,
    RowSpec,
    RowTransformed,
    Unsupported,
    WithGram,
    row_transform,
)
from .dense import JACOBIAN_METHODS, DenseRoute, JacobianResult, PerSampleJacobian, autograd_jacobian, func_jacobian
from .functional import FunctionalJacobian
from .gram import GramJacobian, GramRoute, LayerGram, supported_modules
from .matfree import ClosureJacobian, MatfreeRoute, gram_from_operator
from .parallel import DataParallel, DistributedGram, gather_gram
from .pointwise import PointwiseRoute, Residuals, Term

__all__ = [
    "GRAM_MIN_ENTRIES",
    "JACOBIAN_METHODS",
    "ROUTES",
    "TALL_RATIO",
    "ClosureJacobian",
    "DataParallel",
    "Declined",
    "DenseRoute",
    "DistributedGram",
    "FunctionalJacobian",
    "GramJacobian",
    "GramOperator",
    "GramRoute",
    "JacobianResult",
    "LayerGram",
    "LinearRows",
    "Linearization",
    "Linearizer",
    "MatfreeRoute",
    "PerSampleJacobian",
    "PointwiseRoute",
    "Residuals",
    "Route",
    "RowSpec",
    "RowTransformed",
    "Term",
    "Unsupported",
    "WithGram",
    "autograd_jacobian",
    "choose_route",
    "func_jacobian",
    "gather_gram",
    "gram_from_operator",
    "row_transform",
    "supported_modules",
]
