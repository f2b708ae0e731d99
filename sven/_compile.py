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
from types import TracebackType
from typing import Any

import torch

__all__ = ["eager"]

#: The warning ``OptimizedModule.__call__`` issues whenever a global module hook is installed; Sven's
#: recorder is one, and it handles the extra call of the wrapper (it owns no parameters).
_GLOBAL_HOOK_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"
# one filter entry, put in and taken out by hand: ``warnings.catch_warnings`` would reset every module's
# record of the warnings already shown, so that "once per line" warnings would repeat at every step
_FILTER = ("ignore", re.compile(_GLOBAL_HOOK_WARNING), UserWarning, None, 0)


def _stance_switch() -> tuple[Any, Any, Any] | None:
    """TorchDynamo's stance module, its ``"force_eager"`` stance and its frame-callback getter, where this torch
    has them.

    ``torch.compiler.set_stance`` is a decorator class that builds its stance object and imports its setter at
    every use (about 10 us, twice per step: a tenth of a curve fit's step, :mod:`sven.tiny`). The setter it
    calls, ``eval_frame._set_stance(stance) -> previous``, imports the callback getter at every call too (about
    4 us), refuses inside a compiled region (a frame callback is set), then swaps the module's global
    ``_stance``, which every compiled call reads on entry (``_callback_from_stance``). :func:`eager` does the
    same: the getter's test, then the swap; inside a compiled region it calls the setter, which raises its own
    error. ``None`` where the module lacks any of them: :func:`eager` then takes the public context manager.
    """
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback
        from torch._dynamo import eval_frame
    except ImportError:  # pragma: no cover - a torch without TorchDynamo
        return None
    setter, kind = getattr(eval_frame, "_set_stance", None), getattr(eval_frame, "DynamoStance", None)
    if setter is None or kind is None or not hasattr(eval_frame, "_stance"):
        return None  # pragma: no cover - another torch's internals
    return eval_frame, kind("force_eager"), get_eval_frame_callback


# PyTorch < 2.6 has no stance to switch. (TorchDynamo is already imported: torch.optim.Optimizer's
# constructor imports it, so the switch costs microseconds, not an import.)
_PUBLIC = getattr(torch.compiler, "set_stance", None)
_SWITCH = _stance_switch() if _PUBLIC is not None else None


def _swap(stance: Any) -> Any:
    """``eval_frame._set_stance(stance)`` without its import: the previous stance (:func:`_stance_switch`)."""
    module, _, callback = _SWITCH  # type: ignore[misc]
    cb = callback()
    if cb is not False and cb is not None:  # inside a compiled region: the setter's own error
        return module._set_stance(stance)
    prev = module._stance
    module._stance = stance
    return prev


class eager:  # (a lower-case name: used as a function, ``with eager():``)
    """Run compiled code (``torch.compile``) eagerly inside the block (a no-op before PyTorch 2.6).

    The previous stance is put back on exit, also when the block raises; the warning filter of
    :data:`_GLOBAL_HOOK_WARNING` is in place for the block only.
    """

    __slots__ = ("_prev",)

    def __enter__(self) -> None:
        if _PUBLIC is None:
            return
        warnings.filters.insert(0, _FILTER)  # type: ignore[attr-defined]
        try:
            if _SWITCH is not None:
                self._prev = _swap(_SWITCH[1])
            else:  # pragma: no cover - another torch's internals: the public context manager
                self._prev = _PUBLIC("force_eager")
                self._prev.__enter__()
        except BaseException:
            warnings.filters.remove(_FILTER)  # type: ignore[attr-defined]
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if _PUBLIC is None:
            return
        try:
            if _SWITCH is not None:
                _swap(self._prev)
            else:  # pragma: no cover
                self._prev.__exit__(exc_type, exc, tb)
        finally:
            warnings.filters.remove(_FILTER)  # type: ignore[attr-defined]
