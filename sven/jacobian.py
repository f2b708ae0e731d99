"""Compatibility module: the materialised per-sample Jacobians now live in :mod:`sven.linearize.dense`."""

from .linearize.dense import JACOBIAN_METHODS, JacobianResult, PerSampleJacobian, autograd_jacobian, func_jacobian

__all__ = ["JACOBIAN_METHODS", "JacobianResult", "PerSampleJacobian", "autograd_jacobian", "func_jacobian"]
