r"""Sven, "Singular Value Descent" (arXiv:2604.01279), on top of :mod:`truncpinv`.

Sven replaces the averaged gradient by the minimum-norm update that best
reduces every per-sample loss at once:

.. math::

    R_\alpha = \ell_\alpha^{\kappa/2}, \qquad M = \partial R / \partial\theta, \qquad
    \delta\theta = -\eta\, M_k^{+} R.

Two ways to use it:

* ``torch.optim`` style: ``opt = sven.Sven(model.parameters())`` (defaults that need no tuning)
  and ``opt.step(closure)`` with a closure returning per-sample losses;
* the original API: ``SvenWrapper`` + ``sven.opt.Sven(wrapped, lr, k, rtol)``.

A step is a pipeline of small parts, each in its own module:

* :mod:`sven.linearize`: routes that linearise the closure (Gram, dense, matrix-free, data-parallel);
* :mod:`sven.precondition`: RMSProp scaling;
* :mod:`sven.factorize`: the truncated pseudoinverse from :mod:`truncpinv` (:mod:`sven.normal_equations`:
  from :math:`M^\top M`, certified for the damping, for a tall ``M``);
* :mod:`sven.control`: step-control policies (damping, trust radius, variable-k, ...);
* :mod:`sven.params`: applying a direction to the parameter groups;
* :mod:`sven.update`: momentum and decoupled weight decay;
* :mod:`sven.pinn`: residuals of differential equations (the pointwise route);
* :mod:`sven.least_squares`: ``least_squares`` and ``curve_fit``, scipy-like front-ends (Levenberg--Marquardt).
* :mod:`sven.losses`: Gauss--Newton rows of cross-entropy (classifiers).

The maths is in :mod:`sven.functional`; :class:`sven.Sven` (:mod:`sven.optim`)
wires the parts to ``torch.optim``; :mod:`sven.nn` and :mod:`sven.opt` are the
seed-compatible API.
"""

from . import control, functional, jacobian, linearize, losses, pinn
from .config import SvenConfig
from .info import StepInfo
from .least_squares import LeastSquaresResult, curve_fit, least_squares
from .nn import SvenWrapper
from .opt import PolyakSGD, WrappedSven, pinv
from .optim import Sven

__all__ = [
    "LeastSquaresResult",
    "PolyakSGD",
    "StepInfo",
    "Sven",
    "SvenConfig",
    "SvenWrapper",
    "WrappedSven",
    "control",
    "curve_fit",
    "functional",
    "jacobian",
    "least_squares",
    "linearize",
    "losses",
    "pinn",
    "pinv",
]

from truncpinv._version import __version__ as __version__
