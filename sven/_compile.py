r"""``torch.compile``\ d models and closures: Sven runs its closure calls eagerly.

Sven's Jacobian needs what a compiled graph hides. The Gram route and the
hook path read each layer's input and output through a global forward hook
and differentiate with respect to those outputs; the exact fallback runs a
batched backward (``is_grads_batched=True``) through the graph. Under
``torch.compile`` (TorchDynamo + Inductor):

* the hook is traced into the graph, so the recorded outputs of hidden
  layers are extra outputs of one compiled autograd node, *siblings* of the
  loss rather than its ancestors: no gradient flows to them. The version
  counter the hook read was a constant of the trace, so the in-place check
  fails on every call and blames an in-place operation the model does not
  have;
* Inductor's compiled backward cannot run on the batched tensors of
  ``is_grads_batched`` ("Cannot access storage of BatchedTensorImpl").

:func:`eager` switches ``torch.compile`` to its ``"force_eager"`` stance
(:func:`torch.compiler.set_stance`, PyTorch >= 2.6) for the closure calls of
a step: compiled modules (``torch.compile(model)``, ``model.compile()``) and
compiled closures then run their original Python code, so the step is the
uncompiled model's step. The re-evaluations of step control run eagerly too,
so that the loss before and after a step come from the same arithmetic.
Outside ``step`` the compiled model keeps its compiled code.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["eager"]

#: The warning ``OptimizedModule.__call__`` issues whenever a global module hook is installed; Sven's
#: recorder is one, and it handles the extra call of the wrapper (it owns no parameters).
_GLOBAL_HOOK_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled code (``torch.compile``) eagerly inside the block (a no-op before PyTorch 2.6)."""
    # PyTorch < 2.6 has no stance to switch. (TorchDynamo is already imported: torch.optim.Optimizer's
    # constructor imports it, so the switch costs microseconds, not an import.)
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    # one filter entry, put in and taken out by hand: ``warnings.catch_warnings`` would reset every module's
    # record of the warnings already shown, so that "once per line" warnings would repeat at every step
    entry = ("ignore", re.compile(_GLOBAL_HOOK_WARNING), UserWarning, None, 0)
    warnings.filters.insert(0, entry)  # type: ignore[attr-defined]
    try:
        with set_stance("force_eager"):
            yield
    finally:
        warnings.filters.remove(entry)  # type: ignore[attr-defined]
