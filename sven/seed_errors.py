"""The seed API's exceptions: each is an instance of this package's type *and* of the original code's.

The seed-compatible API (:class:`sven.nn.SvenWrapper`, ``sven.opt.Sven(wrapped, ...)``)
keeps this package's messages, which name the argument and the fix, but an
``except`` clause written against the original code must still catch them:

=============================  ====================  ==========================================
exception                      this package's type   the original's type
=============================  ====================  ==========================================
:class:`MissingJacobianError`  ``RuntimeError``      ``AttributeError`` (``step()`` read the
                                                     deleted ``wrapped.grads``)
:class:`BatchShapeError`       ``ValueError``        ``RuntimeError`` (``view`` of a batch not
                                                     divisible by ``microbatch_size``; a scalar loss)
:class:`NonFiniteStepError`    ``FloatingPointError`` ``torch.linalg.LinAlgError`` (``linalg.svd``
                                                     of a non-finite Jacobian)
=============================  ====================  ==========================================
"""

from __future__ import annotations

import torch

__all__ = ["BatchShapeError", "MissingJacobianError", "NonFiniteStepError"]


class MissingJacobianError(RuntimeError, AttributeError):
    """No Jacobian is stored: ``step()`` before ``loss_and_grad(batch)``, or a second ``step()``."""


class BatchShapeError(ValueError, RuntimeError):
    """The losses do not have the shape Sven needs (a scalar loss; a batch not divisible by ``microbatch_size``)."""


class NonFiniteStepError(FloatingPointError, torch.linalg.LinAlgError):
    """NaN or Inf in the residuals or the Jacobian (or a solver failure); the parameters are unchanged."""
