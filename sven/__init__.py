r"""Sven, "Singular Value Descent" (arXiv:2604.01279), on top of :mod:`truncpinv`.

Sven replaces the averaged gradient by the minimum-norm update that best
reduces every per-sample loss at once:

.. math::

    R_\alpha = \ell_\alpha^{\kappa/2}, \qquad M = \partial R / \partial\theta, \qquad
    \delta\theta = -\eta\, M_k^{+} R.

Two ways to use it:

* ``torch.optim`` style: ``opt = sven.Sven(model.parameters(), lr=0.1, rank=16)``
  and ``opt.step(closure)`` with a closure returning per-sample losses;
* the original API: ``SvenWrapper`` + ``sven.opt.Sven(wrapped, lr, k, rtol)``.

The maths is in :mod:`sven.functional`; per-sample Jacobians in
:mod:`sven.jacobian`.
"""

from . import functional, jacobian
from .nn import SvenWrapper
from .opt import PolyakSGD, WrappedSven, pinv
from .optim import StepInfo, Sven

__all__ = ["PolyakSGD", "StepInfo", "Sven", "SvenWrapper", "WrappedSven", "functional", "jacobian", "pinv"]

from truncpinv._version import __version__ as __version__
