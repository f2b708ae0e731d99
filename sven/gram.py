"""Compatibility module: the Gram route now lives in :mod:`sven.linearize.gram` (same names)."""

from .linearize.base import GramOperator, RowTransformed, Unsupported, row_transform
from .linearize.gram import GramJacobian, LayerGram, supported_modules
from .linearize.parallel import DistributedGram, gather_gram

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
