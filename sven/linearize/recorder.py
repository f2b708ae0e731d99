r"""The one forward-hook recorder shared by the routes that read layer factors.

During a closure, a global module forward hook (:func:`recording`) sees every
module call. :class:`Recorder` keeps, for each call of a supported layer whose
parameters are optimised, the layer's input and output (the *factors* of its
per-sample gradients), plus the *structure* of the forward (which modules ran,
in which ``training`` mode) that keys the routes' verification caches.

Two modes:

* ``strict=True`` (the Gram route, :mod:`sven.linearize.gram`): anything the
  route cannot handle is recorded as :attr:`Recorder.problem`, a sentence
  naming the layer: an optimised parameter owned by an unsupported module,
  a configuration or input the factors do not cover.
* BatchNorm that normalises with the statistics of the batch (training mode,
  or ``track_running_stats=False``) is recorded with those statistics, and
  under ``strict=True`` its output is replaced by a :class:`StatsSwitch`
  output of the same value whose backward either follows the exact graph or
  treats the batch statistics as constants (:attr:`Recorder.switch`): the
  Gram route reads the per-sample factors in the second mode and adds the
  coupling back as an exact low-rank term (:mod:`sven.linearize.gram_bn`).
  Running statistics are updated once, by the module's own forward.
* Under ``strict=True``, :class:`~torch.nn.MultiheadAttention` is caught
  between a forward pre-hook (:meth:`Recorder.pre`) and the forward hook,
  and its four projections are recorded as Linear calls on rows of its
  parameters (:mod:`sven.linearize.attention`); an Embedding called on
  indices without the batch dimension hands back a
  :class:`~sven.linearize.broadcast.Shared` output, recorded broadcast over
  the batch where the model broadcasts it (:mod:`sven.linearize.broadcast`).
* Recurrent layers (``RNN``, ``GRU``, ``LSTM``), under ``strict=True``: a
  forward pre-hook (:meth:`Recorder.before`) runs the fused forward without a
  graph, and the output is replaced by one of the same value rebuilt around
  the two gate maps, which are recorded as Linear calls
  (:mod:`sven.linearize.gram_rnn`). The hook sees keyword arguments (``hx=``).
* ``strict=False`` (the materialised hook path, :mod:`sven.linearize.dense`):
  other modules are ignored; the route verifies its result instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from .attention import AttentionCapture, LinearSlice, attention_problem, unwrap
from .broadcast import SharedUse, maybe_shared, share
from .gram_rnn import RECURRENT, substitutable, substitute

__all__ = [
    "Call",
    "Labels",
    "Recorder",
    "StatsSwitch",
    "batch_stats",
    "layer_kind",
    "recording",
    "supported_modules",
]


def supported_modules() -> tuple[type[nn.Module], ...]:
    """The layer types whose parameters the Gram route handles (exact types, or subclasses keeping ``forward``).

    ``_BatchNorm`` covers ``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d``
    (not ``SyncBatchNorm``, whose forward communicates). ``RNN``, ``GRU`` and
    ``LSTM`` are substituted by their gate maps (:mod:`sven.linearize.gram_rnn`).
    """
    return (
        nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.RMSNorm, _BatchNorm, nn.MultiheadAttention,
        *RECURRENT,
    )  # fmt: skip


def uses_batch_stats(module: nn.Module) -> bool:
    """BatchNorm normalising with the statistics of the batch (training mode or no running statistics)."""
    return isinstance(module, _BatchNorm) and (module.training or module.running_mean is None)


def batch_stats(module: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and ``1 / sqrt(var + eps)`` (biased variance) BatchNorm normalises ``x`` with, detached."""
    dims = [0, *range(2, x.dim())]
    x = x.detach()
    mean = x.mean(dims)
    # two passes; ``torch.var_mean`` over these dimensions measured 7 times slower on the CPU
    var = ((x - mean.reshape((1, -1) + (1,) * (x.dim() - 2))) ** 2).mean(dims)
    return mean, torch.rsqrt(var + module.eps)


class StatsSwitch:
    """Which graph the backward of the recorded BatchNorm outputs follows: exact (default) or frozen statistics."""

    def __init__(self) -> None:
        self.frozen = False


class _Switched(torch.autograd.Function):
    """Value of ``exact``; the gradient goes to ``exact`` or, when ``switch.frozen``, to ``frozen``."""

    @staticmethod
    def forward(ctx: Any, exact: torch.Tensor, frozen: torch.Tensor, switch: StatsSwitch) -> torch.Tensor:
        ctx.switch = switch
        return exact.detach().clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        return (None, g, None) if ctx.switch.frozen else (g, None, None)


def _switched_output(
    module: Any, x: torch.Tensor, output: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor], switch: StatsSwitch
) -> torch.Tensor:
    """BatchNorm's ``output`` with a second graph in which the batch statistics are constants."""
    mean, invstd = stats
    shape = (1, -1) + (1,) * (x.dim() - 2)
    frozen = (x - mean.reshape(shape)) * invstd.reshape(shape)
    if module.weight is not None:
        frozen = frozen * module.weight.reshape(shape)
    if module.bias is not None:
        frozen = frozen + module.bias.reshape(shape)
    return _Switched.apply(output, frozen, switch)


def layer_kind(module: nn.Module, kinds: Sequence[type[nn.Module]]) -> type[nn.Module] | None:
    """The supported type ``module`` is (its ``forward`` unchanged), or ``None``."""
    for cls in kinds:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return cls
    return None


def _config_problem(module: Any, kind: type[nn.Module]) -> str | None:
    if kind in (nn.Conv1d, nn.Conv2d) and module.groups != 1:
        return f"groups={module.groups} (only groups=1 is supported)"
    if kind is nn.Embedding and module.max_norm is not None:
        return "max_norm renormalises the table inside the forward"
    if kind is nn.Embedding and module.scale_grad_by_freq:
        return "scale_grad_by_freq scales the gradient by frequencies in the batch (couples the samples)"
    return None


def _input_problem(module: Any, kind: type[nn.Module], x: torch.Tensor) -> str | None:
    if kind is nn.Linear:
        ok = x.dim() >= 2
    elif kind is nn.Conv1d:
        ok = x.dim() == 3
    elif kind is nn.Conv2d:
        ok = x.dim() == 4
    elif kind is nn.Embedding:
        ok = x.dim() >= 1
    elif kind is _BatchNorm:
        ok = x.dim() >= 2
    else:  # LayerNorm, RMSNorm
        ok = x.dim() >= len(module.normalized_shape) + 1
    return None if ok else f"was called on an unbatched input of shape {tuple(x.shape)}"


class Labels:
    """Printable names of the parameters, made only when a message needs one (``'name'`` or ``#i of shape (..)``)."""

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> None:
        self.params, self.names = params, names

    def __getitem__(self, i: int) -> str:
        if self.names is not None:
            return repr(self.names[i])
        return f"#{i} of shape {tuple(self.params[i].shape)}"


@dataclass
class Call:
    """One recorded call of a supported layer: its input, its output and the output's version counter.

    ``stats``: BatchNorm's batch mean and ``1/sqrt(var + eps)`` when it normalises with the batch statistics.
    ``linear``: for a Linear-kind call not made by an ``nn.Linear`` (MultiheadAttention's projections), the
    parameters and the rows of them it used.
    """

    module: nn.Module
    kind: type[nn.Module]
    inp: torch.Tensor
    out: torch.Tensor
    version: int
    stats: tuple[torch.Tensor, torch.Tensor] | None = None
    linear: LinearSlice | None = None

    def release_output(self) -> None:
        """Drop the reference to the output (its dtype kept): the backward then frees it when it can."""
        self.out = self.out.detach().new_empty(0)


@dataclass
class Recorder:
    """Global forward hook: records supported calls on optimised parameters (and, if strict, the first problem).

    Args:
        index: ``id(parameter) -> column-block index`` of the optimised parameters.
        labels: a printable name per parameter, for the problem sentences.
        kinds: the layer types to record.
        strict: record problems (see the module docstring) instead of ignoring other modules.
    """

    index: dict[int, int]
    labels: Labels | Sequence[str]
    kinds: tuple[type[nn.Module], ...] = field(default_factory=supported_modules)
    strict: bool = True
    calls: list[Call] = field(default_factory=list)
    structure: list[tuple[int, bool]] = field(default_factory=list)
    covered: set[int] = field(default_factory=set)
    problem: str | None = None
    switch: StatsSwitch = field(default_factory=StatsSwitch)
    attention: AttentionCapture = field(default_factory=AttentionCapture)
    paused: list[nn.Module] = field(default_factory=list)

    def describe(self, module: nn.Module) -> str:
        """The module's type and its optimised parameters, for messages."""
        own = [self.labels[self.index[id(p)]] for p in module._parameters.values() if id(p) in self.index]
        return type(module).__name__ + (f" (parameters {', '.join(own)})" if own else "")

    def _fail(self, module: nn.Module, problem: str) -> None:
        if self.problem is None:
            self.problem = f"{self.describe(module)}: {problem}"

    def _record_linear(self, module: nn.Module, inp: torch.Tensor, out: torch.Tensor, linear: LinearSlice) -> None:
        """Record a projection of MultiheadAttention (batch-first ``inp`` and ``out``)."""
        if out.requires_grad:
            self.calls.append(Call(module, nn.Linear, inp, out, out._version, None, linear))
            self.covered.update(id(p) for p in (linear.weight, linear.bias) if p is not None and id(p) in self.index)

    def pre(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """Forward pre-hook (strict mode): a recurrent call to substitute runs without a graph (:meth:`before`);
        a MultiheadAttention call with optimised parameters starts being caught."""
        if not self.strict or self.problem is not None:
            return
        self.before(module, inputs)
        if layer_kind(module, (nn.MultiheadAttention,)) is None:
            return
        owned = {id(p) for p in module.parameters() if id(p) in self.index}
        if not owned:
            return
        problem = attention_problem(module, owned)
        if problem is not None:
            self._fail(module, problem)
            return
        self.attention.enter(module, self._record_linear)

    def close(self) -> None:
        """End the calls still being caught (after a forward that raised)."""
        self.attention.close()

    def _shared(self, module: nn.Module, call: Call) -> SharedUse:
        """How an Embedding output without the batch dimension is recorded when broadcast (``broadcast``)."""
        first = [True]

        def expand(idx: torch.Tensor, out: torch.Tensor) -> None:
            if first[0]:
                call.inp, call.out, call.version = idx, out, out._version
                first[0] = False
            else:
                self.calls.append(Call(module, nn.Embedding, idx, out, out._version))

        return SharedUse(call.inp, expand, lambda problem: self._fail(module, problem))

    def before(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """A recurrent call to be substituted runs its fused forward without a graph (part of :meth:`pre`)."""
        if self.problem is None and layer_kind(module, RECURRENT) and substitutable(module, inputs, self.index):
            torch.set_grad_enabled(False)  # back on in __call__ (or by the route's enable_grad if forward raises)
            self.paused.append(module)

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        self.structure.append((id(module), module.training))
        if self.paused and self.paused[-1] is module:
            self.paused.pop()
            torch.set_grad_enabled(True)
            return self._recurrent(module, inputs, kwargs, output, paused=True)
        if self.strict and self.attention.active:
            caught = self.attention.leave(module)
            if caught is not False:
                if isinstance(caught, str):
                    self._fail(module, caught)
                return unwrap(output)
        if self.problem is not None:
            return None
        kind = None
        if not self.strict:
            kind = layer_kind(module, self.kinds)
            if kind is None:
                return None  # the fast exit of the lenient mode: most calls are activations and containers
        owned = [p for p in module._parameters.values() if p is not None and id(p) in self.index]
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        batch_normed = self.strict and uses_batch_stats(module)
        coupled = batch_normed and x is not None and x.requires_grad
        if not owned and not coupled:
            return None
        if kind is None:
            kind = layer_kind(module, self.kinds)
        if kind is None:
            if self.strict:
                names = ", ".join(c.__name__ for c in self.kinds)
                what = "has optimised parameters" if owned else "couples the samples (batch statistics)"
                self.problem = f"{self.describe(module)} {what} but is not a layer the Gram route supports ({names})"
            return None
        if self.strict and kind in RECURRENT:
            return self._recurrent(module, inputs, kwargs, output, paused=False)
        if self.strict:
            problem = _config_problem(module, kind)
            if problem is None and (x is None or not isinstance(output, torch.Tensor)):
                problem = "was called without a tensor input or output"
            if problem is None and x is not None:
                problem = _input_problem(module, kind, x)
            if problem is not None:
                self.problem = f"{self.describe(module)}: {problem}"
                return None
        if x is None or not isinstance(output, torch.Tensor):
            return None
        stats = None
        if batch_normed:
            stats = batch_stats(module, x)
            output = _switched_output(module, x, output, stats, self.switch)
        if not output.requires_grad:
            return None
        call = Call(module, kind, x, output, output._version, stats)
        self.calls.append(call)
        # covered: the parameters the layer's factors give rows for, its ``weight`` and ``bias`` (a parameter it
        # owns besides, as ``weight_g``/``weight_v`` of the hook-based ``weight_norm``, is used elsewhere)
        self.covered.update(
            id(p) for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if id(p) in self.index
        )
        if stats is not None:
            return output
        if self.strict and kind is nn.Embedding and maybe_shared(x):
            return share(output, self._shared(module, call))
        return None

    def _recurrent(
        self, module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], output: Any, *, paused: bool
    ) -> Any:
        """A recurrent call: its outputs rebuilt around its two gate maps, recorded as Linear calls (``gram_rnn``)."""
        if not torch.is_grad_enabled():
            return None
        sub = substitute(module, inputs, kwargs, output, self.index)
        if isinstance(sub, str):
            self.problem = f"{self.describe(module)}: {sub}"
            # without a graph after before(): run the forward again with one, for the exact fallback
            return module.forward(*inputs, **kwargs) if paused else None
        for proxy, a, z in sub.calls:
            self.calls.append(Call(proxy, nn.Linear, a, z, z._version))
        self.covered.update(id(p) for p in module._parameters.values() if p is not None and id(p) in self.index)
        return sub.output


@contextmanager
def recording(recorder: Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]) -> Iterator[None]:
    """Install ``recorder`` as a global module forward hook (with keyword arguments) for the duration of the block.

    A :class:`Recorder` is also installed as a forward pre-hook (:meth:`Recorder.pre`: recurrent layers and
    MultiheadAttention, strict mode only), and closed at the end.
    """
    handles = [register_module_forward_hook(recorder, with_kwargs=True)]
    if isinstance(recorder, Recorder):
        handles.append(register_module_forward_pre_hook(recorder.pre))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if isinstance(recorder, Recorder):
            recorder.close()
