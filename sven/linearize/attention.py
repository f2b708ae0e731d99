r""":class:`~torch.nn.MultiheadAttention` on the Gram route: its projections recorded as Linear calls.

``nn.MultiheadAttention`` keeps its parameters outside any ``nn.Linear``
call: the packed ``in_proj_weight`` (``3E x E``, or ``q/k/v_proj_weight``
when ``kdim``/``vdim`` differ) with ``in_proj_bias``, and ``out_proj``, whose
weight ``F.multi_head_attention_forward`` applies with ``F.linear`` without
calling the module. The parameters only enter through these four linear
maps; everything between them (scaled dot products, masks, softmax,
dropout) has no parameters and acts on each sample separately. So each
projection is a Linear call of the Gram route: for the input projection of
rows ``[r_0, r_1)`` of the packed weight, row ``n``'s gradient is

.. math::

    \nabla_{W[r_0:r_1]} \ell_n = \sum_t g_{nt}\, x_{b(n)t}^\top, \qquad
    \nabla_{W[\text{other rows}]} \ell_n = 0,

with ``x`` the query (or key, or value) and ``g`` the gradient at the
projection's output; the output projection is an ordinary Linear call on the
attention output.

How the calls are seen: while a MultiheadAttention with optimised
parameters runs (between a forward pre-hook and the forward hook of the
recorder), a :class:`~torch.overrides.TorchFunctionMode` catches its call of
``F.multi_head_attention_forward`` and runs torch's own function with the
projection weights passed separately (``use_separate_proj_weight=True``,
views of the packed weight) and wrapped in :class:`_Weight`, so that its
``F.linear`` calls come back here. :class:`_Capture` computes each
projection batch-first (one call per distinct input: ``x W^T`` for the whole
packed weight in self-attention), records it, and hands torch the
sequence-first result; the results are :class:`_Traced`, which follow the
computation to the output projection, recorded the same way. The module's
value is unchanged (the same operations, with the projections by rows of
``W`` instead of all of ``W`` at once); torch's eval-mode fast path never
runs while gradients are recorded.

Not served (the recorder reports the module): ``add_bias_kv=True`` with
``bias_k``/``bias_v`` optimised (parameters used outside a projection) and
unbatched inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionCapture", "LinearSlice", "attention_problem"]

#: The parameters of ``F.multi_head_attention_forward`` in order, with their defaults, to rebind its arguments.
_MHA_PARAMETERS = [(p.name, p.default) for p in inspect.signature(F.multi_head_attention_forward).parameters.values()]


@dataclass(frozen=True)
class LinearSlice:
    """``F.linear(x, weight[w0 : w0 + n], bias[b0 : b0 + n])``: a call using ``n`` rows of its parameters."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    w0: int
    b0: int


#: ``record(module, inp, out, linear)``: the recorder's entry for one projection (batch-first ``inp``/``out``).
Record = Callable[[nn.Module, torch.Tensor, torch.Tensor, LinearSlice], None]


def attention_problem(module: Any, owned: set[int]) -> str | None:
    """Why the Gram route cannot serve this MultiheadAttention (``owned``: ids of its optimised parameters)."""
    if any(p is not None and id(p) in owned for p in (module.bias_k, module.bias_v)):
        return (
            "add_bias_kv=True: bias_k and bias_v are used outside the projections; construct it with "
            "add_bias_kv=False (or exclude bias_k and bias_v from the optimised parameters)"
        )
    return None


class _Weight(torch.Tensor):
    """A projection weight (a view of a parameter) whose ``F.linear`` calls go to :meth:`_Capture.project`."""

    _capture: _Capture
    _part: int

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if isinstance(w, _Weight) and not isinstance(x, _Weight):
                return w._capture.project(w._part, x)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


class _Traced(torch.Tensor):
    """A tensor computed from the projections: its ``F.linear`` by the output weight is recorded, the rest followed."""

    _capture: _Capture

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        capture: _Capture | None = None
        for a in (*args, *kwargs.values()):
            if isinstance(a, _Traced):
                capture = a._capture
                break
        if func is F.linear and capture is not None and isinstance(args[0], _Traced):
            w = args[1] if len(args) > 1 else kwargs["weight"]
            if w is capture.out_weight:
                return capture.out_project(args[0])
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return _wrap(out, capture) if capture is not None else out


def _wrap(out: Any, capture: _Capture) -> Any:
    if isinstance(out, torch.Tensor) and not isinstance(out, _Traced):
        with torch._C.DisableTorchFunctionSubclass():
            t = out.as_subclass(_Traced)
        t._capture = capture
        return t
    if isinstance(out, (tuple, list)):
        return type(out)(_wrap(o, capture) for o in out)
    return out


def unwrap(out: Any) -> Any:
    """``out`` (a tensor, or a tuple of them) with :class:`_Traced` tensors turned back into plain ones."""
    if isinstance(out, _Traced):
        with torch._C.DisableTorchFunctionSubclass():
            return out.as_subclass(torch.Tensor)
    if isinstance(out, tuple):
        return tuple(unwrap(o) for o in out)
    return out


class _Capture(TorchFunctionMode):
    """One call of a MultiheadAttention: catches ``F.multi_head_attention_forward`` and records its projections."""

    def __init__(self, module: Any, record: Record) -> None:
        super().__init__()
        self.module = module
        self.record = record
        self.out_weight: torch.Tensor | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.slices: list[LinearSlice] = []
        self.done: dict[int, torch.Tensor] = {}
        self.computed: set[int] = set()
        self.out_done = False
        self.caught = False
        self.problem: str | None = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and not self.caught:
            self.caught = True
            return self._forward(args, kwargs)
        return func(*args, **kwargs)

    def _forward(self, args: Any, kwargs: Any) -> Any:
        a = {name: default for name, default in _MHA_PARAMETERS}
        a.update(zip((name for name, _ in _MHA_PARAMETERS), args))
        a.update(kwargs)
        query, key, value = a["query"], a["key"], a["value"]
        if query.dim() != 3:
            self.problem = f"was called on an unbatched input of shape {tuple(query.shape)}"
            return F.multi_head_attention_forward(*args, **kwargs)
        E = int(a["embed_dim_to_check"])
        b = a["in_proj_bias"]
        if a["use_separate_proj_weight"]:
            ws = [(a["q_proj_weight"], 0), (a["k_proj_weight"], 0), (a["v_proj_weight"], 0)]
        else:
            ws = [(a["in_proj_weight"], i * E) for i in range(3)]
        self.slices = [LinearSlice(w, b, w0, i * E) for i, (w, w0) in enumerate(ws)]
        self.inputs = (query, key, value)
        self.out_weight = a["out_proj_weight"]
        self.out_bias = a["out_proj_bias"]
        self.tgt_len, self.bsz = int(query.shape[0]), int(query.shape[1])
        parts = []
        for i, s in enumerate(self.slices):
            part = s.weight[s.w0 : s.w0 + E] if s.w0 or s.weight.shape[0] != E else s.weight
            t = part.as_subclass(_Weight)
            t._capture, t._part = self, i
            parts.append(t)
        a["use_separate_proj_weight"] = True
        a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"] = parts
        return F.multi_head_attention_forward(**a)

    def project(self, part: int, x: torch.Tensor) -> torch.Tensor:
        """Projection ``part`` (0: q, 1: k, 2: v) of ``x`` ``(L, B, E_in)``, with every part sharing ``x`` at once."""
        if part in self.done:
            return self.done.pop(part)
        group = [i for i in range(3) if self.inputs[i] is x and i not in self.computed]
        s = self.slices[part]
        if part not in group or any(self.slices[i].weight is not s.weight for i in group):
            group = [part]  # separate weights, or an input not among query, key and value
        s = self.slices[group[0]]  # the rows of the parts sharing ``x`` are contiguous: q, k, v in order
        E = int(self.module.embed_dim)
        n = E * len(group)
        x_bf = x.transpose(0, 1)
        w = s.weight[s.w0 : s.w0 + n]
        bias = None if s.bias is None else s.bias[s.b0 : s.b0 + n]
        out = F.linear(x_bf, w, bias)  # (B, L, n)
        self.record(self.module, x_bf, out, s)
        self.computed.update(group)
        seq = out.transpose(0, 1)
        for j, i in enumerate(group):
            self.done[i] = _wrap(seq[..., j * E : (j + 1) * E].contiguous(), self)
        return self.done.pop(part)

    def out_project(self, y: torch.Tensor) -> torch.Tensor:
        """The output projection of the attention output ``y`` (``(L B, E)``, rows ordered by position, then sample)."""
        assert self.out_weight is not None  # set with the call
        with torch._C.DisableTorchFunctionSubclass():
            yp = y.as_subclass(torch.Tensor)
            y_bf = yp.reshape(self.tgt_len, self.bsz, -1).transpose(0, 1)
            out = F.linear(y_bf, self.out_weight, self.out_bias)  # (B, L, E)
        self.record(self.module.out_proj, y_bf, out, LinearSlice(self.out_weight, self.out_bias, 0, 0))
        self.out_done = True
        return out.transpose(0, 1).reshape(yp.shape[0], -1)

    def finish(self) -> str | None:
        """After the module's forward: why its projections were not all recorded (``None``: they were)."""
        if self.problem is not None:
            return self.problem
        if not self.caught or self.done or len(self.computed) != 3 or not self.out_done:
            return "its forward did not go through F.multi_head_attention_forward's projections as expected"
        return None


class AttentionCapture:
    """The :class:`_Capture` of each MultiheadAttention call in progress (entered in the pre-hook, left after)."""

    def __init__(self) -> None:
        self.active: dict[int, _Capture] = {}

    def enter(self, module: nn.Module, record: Record) -> None:
        """Start catching ``module``'s call (forward pre-hook)."""
        cap = _Capture(module, record)
        cap.__enter__()
        self.active[id(module)] = cap

    def leave(self, module: nn.Module) -> str | bool | None:
        """Stop catching ``module``'s call (forward hook): ``False`` if not caught, else :meth:`_Capture.finish`."""
        cap = self.active.pop(id(module), None)
        if cap is None:
            return False
        cap.__exit__(None, None, None)
        return cap.finish()

    def close(self) -> None:
        """Leave every capture still active (a forward that raised), innermost first."""
        for cap in reversed(list(self.active.values())):
            cap.__exit__(None, None, None)
        self.active.clear()
