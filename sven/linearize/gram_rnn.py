r"""Recurrent layers (:class:`~torch.nn.RNN`, :class:`~torch.nn.GRU`, :class:`~torch.nn.LSTM`) on the Gram route.

A recurrent layer applies, at every step ``t``, two affine maps onto its gate
pre-activations and a pointwise cell:

.. math::

    z^i_t = W_{ih} x_t + b_{ih}, \qquad z^h_t = W_{hh} h_{t-1} + b_{hh}, \qquad
    (h_t, c_t) = \text{cell}(z^i_t, z^h_t, h_{t-1}, c_{t-1}).

So sample ``n``'s gradients are sums over time of outer products, exactly as for
a Linear layer applied to a sequence (:mod:`sven.linearize.gram`):

.. math::

    \frac{\partial \ell_n}{\partial W_{ih}} = \sum_t g^i_{nt} x_{nt}^\top, \qquad
    \frac{\partial \ell_n}{\partial W_{hh}} = \sum_t g^h_{nt} h_{n,t-1}^\top, \qquad
    g^{i}_{nt} = \frac{\partial \ell_n}{\partial z^i_{nt}}, \;
    g^{h}_{nt} = \frac{\partial \ell_n}{\partial z^h_{nt}},

with the biases summing ``g`` over time. The fused recurrent operator (ATen,
cuDNN) does not expose ``g``. When the recorder sees a call in strict mode it
substitutes the module's outputs by outputs of the same value whose graph is

* ``z^i = F.linear(x, W_ih, b_ih)`` for all steps at once, and
  ``z^h = F.linear(H_prev, W_hh, b_hh)`` with ``H_prev = [h_0, h_1, ..., h_{T-1}]``
  the hidden states the module computed (constants in this graph): two Linear
  calls that the Gram route records like any other (:class:`GateLinear`);
* :class:`_Recurrence`, whose backward is back-propagation through time from
  coefficients of the gate activations computed once in the forward
  (:func:`_coefficients`): it returns ``g^i`` and ``g^h`` and the gradient
  of ``h_0`` (and ``c_0``), and carries :math:`\partial/\partial h_{t-1}` through
  :math:`W_{hh}^\top g^h_t` itself.

The gradients of the parameters and of the input ``x`` then flow through the
two Linear maps as usual, and one backward pass gives every ``g``. The cells,
in PyTorch's gate order:

* RNN: :math:`h_t = \phi(z^i_t + z^h_t)` (``tanh`` or ``relu``); ``g^i = g^h = \delta h_t \phi'``.
* LSTM (gates ``i, f, g, o``): :math:`c_t = f c_{t-1} + i g`, :math:`h_t = o \tanh c_t`; ``g^i = g^h``.
* GRU (gates ``r, z, n``): :math:`n = \tanh(z^i_n + r \circ z^h_n)`,
  :math:`h_t = (1 - z) n + z h_{t-1}`. The hidden pre-activation of the ``n``
  gate is the term :math:`W_{hn} h + b_{hn}` itself, so
  :math:`g^h_n = r \circ g^i_n` while the ``r`` and ``z`` parts of ``g^i`` and ``g^h`` are equal.

Stacked layers are handled layer by layer (the hidden states of the layers
below the top one are recomputed without a graph by the fused operator, one
layer at a time), and the reverse direction of a bidirectional layer is the
same recurrence over the reversed sequence. Before substituting, the gate
activations recomputed from ``z^i + z^h`` are checked to reproduce the
module's hidden states (to ``sqrt(eps)`` of their scale); a mismatch, a
``PackedSequence``, ``proj_size > 0``, dropout between layers in training
mode or an unbatched input make the Gram route report the layer unsupported,
with a sentence that says how to make it supported.

Cost: the fused forward, run without a graph (the recorder's forward
pre-hook turns autograd off for a call it will substitute), two GEMMs over all
steps, the gate activations (elementwise, all steps at once) and, in the
backward, ``T`` steps of a few ``(B, H)`` elementwise products and one
``(B, G H) x (G H, H)`` GEMM (``G`` gates) instead of the fused operator's
backward. Memory: the coefficients (``(B, T, H)`` each: 5 for the GRU, 6 for
the LSTM, 1 for the RNN) and ``H_prev`` replace the fused graph; the storage
of ``z^i`` and ``z^h`` is released once the coefficients are formed (the
recorded calls need them only as graph handles).

The Gram route's one-time verification compares ``J^T u`` with autograd
through this same substituted graph: it checks the rest of the model, not
this backward, which ``tests/test_gram_rnn.py`` compares with autograd
through the fused operator; the value check above guards the forward.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["RECURRENT", "GateLinear", "Substitution", "bind", "substitutable", "substitute"]

#: The recurrent layer types the Gram route handles (each defines its own ``forward``).
RECURRENT: tuple[type[nn.Module], ...] = (nn.RNN, nn.GRU, nn.LSTM)

_FUSED = {"GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}


class GateLinear(nn.Module):
    r"""One affine map of a recurrent layer onto its gate pre-activations, ``z = a W^T + b``, seen as a Linear layer.

    Only a carrier of ``weight``, ``bias``, ``in_features`` and
    ``out_features`` for the Gram route's factors (:func:`~sven.linearize.gram_factors.call_pieces`
    reads it like an :class:`~torch.nn.Linear`); it is never called.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])


@dataclass
class _Cell:
    """What the backward of one layer and direction needs: ``W_hh`` and the coefficients of :func:`_coefficients`."""

    mode: str
    w_hh: torch.Tensor
    acts: dict[str, torch.Tensor]


@dataclass
class Substitution:
    """The replacement output of a recurrent call and its gate maps ``(GateLinear, input a, pre-activation z)``."""

    output: Any
    calls: list[tuple[GateLinear, torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- checks
def config_problem(module: Any) -> str | None:
    """Why the configuration of a recurrent ``module`` is not supported (how to fix it), or ``None``."""
    if getattr(module, "proj_size", 0) > 0:
        return (
            f"proj_size={module.proj_size} (LSTM projections) is not supported; use proj_size=0 (a smaller "
            f"hidden_size, or an nn.Linear on the outputs) to keep the Gram route"
        )
    if module.training and module.dropout > 0 and module.num_layers > 1:
        return (
            f"dropout={module.dropout} between its {module.num_layers} layers in training mode draws masks the "
            f"Gram route cannot see; stack single-layer {type(module).__name__}s with nn.Dropout between them "
            f"(the same model) to keep the Gram route"
        )
    return None


def input_problem(inputs: tuple[Any, ...]) -> str | None:
    """Why the input of a recurrent call is not supported (how to fix it), or ``None``."""
    x = inputs[0] if inputs else None
    if isinstance(x, PackedSequence):
        return (
            "was called on a PackedSequence, which the Gram route does not unpack; pass the padded batch instead "
            "(for a one-directional layer, mask the loss of the padded steps: the result is the same)"
        )
    if not isinstance(x, torch.Tensor):
        return f"was called without a tensor input (got {type(x).__name__})"
    if x.dim() != 3:
        return f"was called on an unbatched input of shape {tuple(x.shape)}; add a batch dimension"
    return None


# --------------------------------------------------------------------------- gate activations
def _coefficients(
    mode: str, zi: torch.Tensor, zh: torch.Tensor, hprev: torch.Tensor, hs: torch.Tensor, c0: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], float | None, torch.Tensor | None]:
    """What the backward of the cell needs, the mismatch with the module's states ``hs``, and ``c_T`` (LSTM).

    ``zi`` and ``zh`` are ``(B, T, G H)`` (no graph). The gate activations
    and the coefficients are computed in place in one new ``(B, T, G H)``
    buffer where possible, so that the substitution holds about as much
    memory as the fused graph would once the caller frees ``zi`` and ``zh``.
    Returns ``(coefficients, mismatch, c_T)`` with ``mismatch`` the largest
    difference between the hidden states recomputed from the gates and ``hs``
    when it exceeds ``sqrt(eps)`` of their scale (else ``None``). The
    coefficients are time-major, ``(T, B, H)``, so that each step of the
    backward reads contiguous rows.
    """
    zi, zh, hprev, hs = (t.transpose(0, 1) for t in (zi, zh, hprev, hs))
    T, B, H = hprev.shape

    def new(width: int) -> torch.Tensor:
        return torch.empty(T, B, width, dtype=zi.dtype, device=zi.device)

    if mode == "GRU":
        buf = new(3 * H)
        rz = torch.add(zi[..., : 2 * H], zh[..., : 2 * H], out=buf[..., : 2 * H]).sigmoid_()
        r, z = rz[..., :H], rz[..., H:]
        zh_n = zh[..., 2 * H :]
        n = torch.addcmul(zi[..., 2 * H :], r, zh_n, out=buf[..., 2 * H :]).tanh_()
        d = hprev - n
        err = _mismatch(torch.addcmul(n, z, d), hs)  # h_t = n + z (h_{t-1} - n)
        dz_of = d.mul_(z).addcmul_(d, z, value=-1)  # (h_{t-1} - n) z (1 - z)
        dn_of = n.mul_(n).neg_().add_(1)
        dn_of.addcmul_(dn_of, z, value=-1)  # (1 - n^2)(1 - z), in n's place
        dr_of = zh_n * r
        dr_of.addcmul_(dr_of, r, value=-1)  # (W_hn h + b_hn) r (1 - r), per unit of the n gate's gradient
        return {"r": r, "z": z, "dn_of": dn_of, "dz_of": dz_of, "dr_of": dr_of}, err, None
    pre = torch.add(zi, zh, out=new(zi.shape[2]))
    if mode == "LSTM":
        assert c0 is not None
        i, f, o = pre[..., :H].sigmoid_(), pre[..., H : 2 * H].sigmoid_(), pre[..., 3 * H :].sigmoid_()
        g = pre[..., 2 * H : 3 * H].tanh_()
        cs = torch.empty(T + 1, B, H, dtype=pre.dtype, device=pre.device)
        cs[0] = c0
        torch.mul(i, g, out=cs[1:])
        for t in range(T):  # the cell state: a linear recurrence, one fused op per step
            cs[t + 1].addcmul_(f[t], cs[t])
        c_last = cs[-1].clone()
        tc = torch.tanh(cs[1:])
        err = _mismatch(o * tc, hs)  # h_t = o tanh(c_t)
        cf = cs[:-1].mul_(f)
        cf.addcmul_(cf, f, value=-1)  # c_{t-1} f (1 - f), in c's place
        co = tc * o
        co.addcmul_(co, o, value=-1)  # tanh(c_t) o (1 - o)
        tc.mul_(tc).neg_().add_(1).mul_(o)  # o (1 - tanh^2 c_t): d c_t / d h_t, in o's place below
        o.copy_(tc)
        del tc
        ci = g * i
        ci.addcmul_(ci, i, value=-1)  # g i (1 - i)
        i.mul_(g.mul(g).neg_().add_(1))  # i (1 - g^2), in i's place
        g.copy_(ci)  # g i (1 - i), in g's place
        del ci
        return {"f": f, "dc_of_h": o, "ci": g, "cf": cf, "cg": i, "co": co}, err, c_last
    err = _mismatch(pre.tanh_() if mode == "RNN_TANH" else pre.relu_(), hs)
    # the derivative of the cell from the module's own states, in the pre-activations' place
    d_of = torch.mul(hs, hs, out=pre).neg_().add_(1) if mode == "RNN_TANH" else pre.copy_(hs.gt(0))
    return {"d_of": d_of}, err, None


def _mismatch(ours: torch.Tensor, exact: torch.Tensor) -> float | None:
    """The largest difference when ``ours`` is not ``exact`` to ``sqrt(eps)`` of its scale, else ``None``.

    ``ours`` is overwritten. On CUDA, float32 with ``torch.backends.cudnn.allow_tf32``
    (PyTorch's default) lets cuDNN multiply in TF32: ``eps`` is then TF32's, ``2^-10``.
    """
    if ours.numel() == 0:
        return None
    err = float(ours.sub_(exact).abs_().amax())
    scale = max(float(exact.amax()), -float(exact.amin()))
    eps = torch.finfo(exact.dtype).eps
    if exact.is_cuda and exact.dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        eps = 2.0**-10
    tol = eps**0.5 * (1.0 + scale)
    return None if err <= tol else err


# --------------------------------------------------------------------------- back-propagation through time
def _bptt(cell: _Cell, dy: torch.Tensor, dc_last: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    r"""``(g^i, g^h, dh_0, dc_0)`` from the gradient ``dy`` ``(B, T, H)`` of the hidden states (and of ``c_T``).

    Step ``t`` from the last: :math:`\delta h_t = dy_t + W_{hh}^\top g^h_{t+1}` (plus the
    cell's direct term), the gate gradients from the saved coefficients
    (:func:`_coefficients`), then the carry. Gradients of the sequence are
    collected in lists and stacked once (no ``out=`` writes: the backward also
    runs under ``vmap`` when a fallback forms the Jacobian with batched gradients).
    """
    a, w, mode = cell.acts, cell.w_hh, cell.mode
    dy = dy.transpose(0, 1)  # time-major, like the coefficients
    T = dy.shape[0]
    gh: list[torch.Tensor] = []
    carry: torch.Tensor | None = None
    if mode == "GRU":
        r, z, dn_of, dz_of, dr_of = a["r"], a["z"], a["dn_of"], a["dz_of"], a["dr_of"]
        gn: list[torch.Tensor] = []
        for t in range(T - 1, -1, -1):
            dh = dy[t] if carry is None else dy[t] + carry
            dn = dh * dn_of[t]
            g = torch.cat([dn * dr_of[t], dh * dz_of[t], dn * r[t]], 1)
            gn.append(dn)
            gh.append(g)
            carry = torch.addmm(dh * z[t], g, w)
        Gh = _stacked(gh)
        H = z.shape[2]
        Gi = torch.cat([Gh[..., : 2 * H], _stacked(gn)], 2)
        return Gi, Gh, carry, None  # type: ignore[return-value]
    if mode == "LSTM":
        f, dc_of_h, ci, cf, cg, co = a["f"], a["dc_of_h"], a["ci"], a["cf"], a["cg"], a["co"]
        cc = dc_last
        for t in range(T - 1, -1, -1):
            dh = dy[t] if carry is None else dy[t] + carry
            dc = dh * dc_of_h[t] if cc is None else torch.addcmul(cc, dh, dc_of_h[t])
            g = torch.cat([dc * ci[t], dc * cf[t], dc * cg[t], dh * co[t]], 1)
            gh.append(g)
            cc = dc * f[t]
            carry = g @ w
        G = _stacked(gh)
        return G, G, carry, cc  # type: ignore[return-value]
    d_of = a["d_of"]
    for t in range(T - 1, -1, -1):
        dh = dy[t] if carry is None else dy[t] + carry
        g = dh * d_of[t]
        gh.append(g)
        carry = g @ w
    G = _stacked(gh)
    return G, G, carry, None  # type: ignore[return-value]


def _stacked(steps: list[torch.Tensor]) -> torch.Tensor:
    """The per-step tensors, collected from the last step, as ``(B, T, ...)`` (the list is emptied)."""
    steps.reverse()
    out = torch.stack(steps, 1)
    steps.clear()
    return out


class _Recurrence(torch.autograd.Function):
    """The hidden states (and ``c_T``) of one layer and direction, with the value of the module's own outputs.

    Inputs with a graph: the pre-activations ``zi``, ``zh`` and the initial
    states ``h0``, ``c0``; the backward is :func:`_bptt` on the saved activations.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        zi: torch.Tensor,
        zh: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor | None,
        hs: torch.Tensor,
        c_last: torch.Tensor | None,
        cell: _Cell,
    ) -> Any:
        ctx.mode, ctx.keys, ctx.lstm = cell.mode, tuple(cell.acts), c_last is not None
        ctx.save_for_backward(cell.w_hh, *cell.acts.values())  # released after a backward without retain_graph
        if c_last is None:
            return hs.clone()
        return hs.clone(), c_last.clone()

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, dc: torch.Tensor | None = None) -> tuple[Any, ...]:
        w, *acts = ctx.saved_tensors
        gi, gh, dh0, dc0 = _bptt(_Cell(ctx.mode, w, dict(zip(ctx.keys, acts))), dy, dc if ctx.lstm else None)
        need = ctx.needs_input_grad
        return (
            gi if need[0] else None,
            gh if need[1] else None,
            dh0 if need[2] else None,
            dc0 if ctx.lstm and need[3] else None,
            None,
            None,
            None,
        )


class _Value(torch.autograd.Function):
    """The value of ``exact``, the gradient to ``ours`` (equal up to rounding)."""

    @staticmethod
    def forward(ctx: Any, ours: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return exact.detach().clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


# --------------------------------------------------------------------------- the substitution
def _fused_layer(module: Any, layer: int, inp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None) -> torch.Tensor:
    """The hidden states ``(B, T, dirs H)`` of one layer by the fused operator, batch first, without a graph."""
    dirs = 2 if module.bidirectional else 1
    weights = [getattr(module, name) for k in range(dirs) for name in module._all_weights[layer * dirs + k]]
    if module.mode == "LSTM":
        assert c0 is not None
        return _VF.lstm(inp, (h0, c0), weights, module.bias, 1, 0.0, False, module.bidirectional, True)[0]
    return _FUSED[module.mode](inp, h0, weights, module.bias, 1, 0.0, False, module.bidirectional, True)[0]


def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``(input, hx)`` of a recurrent call, passed by position or by name."""
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    return x, hx


def substitutable(module: nn.Module, args: tuple[Any, ...], optimised: Container[int]) -> bool:
    """Whether a recurrent call with these positional ``args`` will be substituted (grad mode on, parameters optimised).

    The recorder then runs the module's fused forward without a graph
    (:meth:`~sven.linearize.recorder.Recorder.before`): the substitution replaces it.
    """
    return (
        torch.is_grad_enabled()
        and any(id(p) in optimised for p in module._parameters.values())
        and config_problem(module) is None
        and input_problem(args) is None
    )


def substitute(
    module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, optimised: Container[int]
) -> Substitution | str:
    """The outputs of a recurrent call, rebuilt to expose the gate pre-activations (module docstring), or a reason.

    Args:
        module: an :class:`~torch.nn.RNN`, :class:`~torch.nn.GRU` or :class:`~torch.nn.LSTM`.
        args, kwargs, output: the call's arguments and its outputs (the values kept).
        optimised: ids of the optimised parameters; only gate maps owning one are returned.
    """
    x, hx = bind(args, kwargs)
    problem = config_problem(module) or input_problem((x,))
    if problem is not None:
        return problem
    lstm = module.mode == "LSTM"
    out, states = output
    hn, cn = states if lstm else (states, None)
    L, dirs, H = module.num_layers, 2 if module.bidirectional else 1, module.hidden_size
    xb = x if module.batch_first else x.transpose(0, 1)
    B = xb.shape[0]
    h0s, c0s = (hx if lstm else (hx, None)) if hx is not None else (None, None)
    if h0s is None:
        h0s = x.new_zeros(L * dirs, B, H)
    if lstm and c0s is None:
        c0s = x.new_zeros(L * dirs, B, H)
    with torch.no_grad():
        values: list[torch.Tensor] = []
        below = xb.detach()
        for layer in range(L - 1):
            sl = slice(layer * dirs, (layer + 1) * dirs)
            below = _fused_layer(module, layer, below, h0s[sl].detach(), None if c0s is None else c0s[sl].detach())
            values.append(below)
        values.append((out if module.batch_first else out.transpose(0, 1)).detach())
    calls: list[tuple[GateLinear, torch.Tensor, torch.Tensor]] = []
    h_last: list[torch.Tensor] = []
    c_last: list[torch.Tensor] = []
    inp = xb
    for layer in range(L):
        seqs = []
        for k in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if k else "")
            w_ih, w_hh = getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx)
            b_ih = getattr(module, "bias_ih" + sfx) if module.bias else None
            b_hh = getattr(module, "bias_hh" + sfx) if module.bias else None
            j = layer * dirs + k
            h0, c0 = h0s[j], None if c0s is None else c0s[j]
            hs = values[layer][..., k * H : (k + 1) * H]
            a = inp.flip(1) if k else inp
            hs = hs.flip(1) if k else hs
            hprev = torch.cat([h0.detach()[:, None], hs[:, :-1]], 1)
            zi = F.linear(a, w_ih, b_ih)
            zh = F.linear(hprev, w_hh, b_hh)
            with torch.no_grad():
                acts, err, c_end = _coefficients(
                    module.mode, zi.detach(), zh.detach(), hprev, hs, None if c0 is None else c0.detach()
                )
                if err is None and c_end is not None and cn is not None:
                    err = _mismatch(c_end.clone(), cn[j].detach())
            if err is not None:
                where = f"layer {layer}" + (" (reverse)" if k else "")
                return (
                    f"recomputing {where} from its gate pre-activations differs from the module's output by {err:.3g}; "
                    f"the Gram route does not know this {type(module).__name__}'s cell"
                )
            # the values of zi and zh are not read again: the recorded calls need them only as graph handles
            # (their backward saves the inputs), so their memory goes, as the fused graph's would
            for pre in (zi, zh):
                pre.untyped_storage().resize_(0)
            res = _Recurrence.apply(zi, zh, h0, c0, hs, c_end, _Cell(module.mode, w_hh.detach(), acts))
            seq = res[0] if lstm else res
            h_last.append(seq[:, -1])
            if lstm:
                c_last.append(res[1])
            seqs.append(seq.flip(1) if k else seq)
            for proxy, arg, pre in ((GateLinear(w_ih, b_ih), a, zi), (GateLinear(w_hh, b_hh), hprev, zh)):
                if pre.requires_grad and any(p is not None and id(p) in optimised for p in (proxy.weight, proxy.bias)):
                    calls.append((proxy, arg, pre))
        inp = torch.cat(seqs, 2) if dirs > 1 else seqs[0]
    new_out = inp if module.batch_first else inp.transpose(0, 1).contiguous()
    new_hn = _Value.apply(torch.stack(h_last), hn)
    if lstm:
        return Substitution((new_out, (new_hn, _Value.apply(torch.stack(c_last), cn))), calls)
    return Substitution((new_out, new_hn), calls)
