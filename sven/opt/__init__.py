"""The seed-compatible optimizers: ``Sven``, ``PolyakSGD`` and ``pinv``.

``sven.opt.Sven`` is :class:`sven.Sven`: called with a
:class:`sven.nn.SvenWrapper` as first argument (the original form
``Sven(wrapped, lr, k, rtol, ...)``) it builds a :class:`WrappedSven`.
"""

from ..optim import Sven
from .pinv import SVD_MODES, VALID_MODES, SVDMode, pinv, solver_for_mode
from .polyak import PolyakSGD
from .sven import WrappedSven

__all__ = ["SVD_MODES", "VALID_MODES", "PolyakSGD", "SVDMode", "Sven", "WrappedSven", "pinv", "solver_for_mode"]
