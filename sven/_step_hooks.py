r"""``torch.optim``'s step wrapper, skipped where nothing observes the step.

:class:`torch.optim.Optimizer` wraps every subclass's ``step`` (``Optimizer.profile_hook_step``) in a
``torch.autograd.profiler.record_function`` block and runs the step hooks
(``register_step_pre_hook``, ``register_step_post_hook`` and their global forms) around it. The
``record_function`` block costs about 50 us per call even when no profiler runs: a sixth of a Sven step on a
3-parameter curve fit (:mod:`sven.tiny`), where the arithmetic takes microseconds.

:func:`observed_step` wraps ``Sven.step`` instead, marked ``hooked`` so that the constructor does not wrap it
again: while a profiler runs or any step hook is registered it calls ``torch.optim``'s own wrapper (the same
profile entry and hooks, in the same order); otherwise the step itself, then ``_optimizer_step_code`` (the
entry point ``torch.profiler``'s Python tracer looks for), as the wrapper does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _optimizer

__all__ = ["observed_step"]

# torch's registries of the global step hooks and its profiler switch (``None`` where a torch version lacks
# them: every step then takes torch's wrapper)
_PRE_HOOKS = getattr(_optimizer, "_global_optimizer_pre_hooks", None)
_POST_HOOKS = getattr(_optimizer, "_global_optimizer_post_hooks", None)
_profiling = getattr(torch._C._autograd, "_profiler_enabled", None)


def observed_step(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (an optimizer's ``step``) wrapped as ``torch.optim`` wraps it, that wrapper skipped while
    no profiler runs and no step hook is registered (module docstring)."""
    wrapped = Optimizer.profile_hook_step(func)
    if _PRE_HOOKS is None or _POST_HOOKS is None or _profiling is None:
        wrapped.hooked = True  # type: ignore[attr-defined]
        return wrapped
    pre, post, profiling = _PRE_HOOKS, _POST_HOOKS, _profiling

    @functools.wraps(func)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if pre or post or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or profiling():
            return wrapped(self, *args, **kwargs)
        out = func(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    step.hooked = True  # type: ignore[attr-defined]
    return step
