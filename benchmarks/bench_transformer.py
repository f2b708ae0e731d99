"""A nanoGPT-style char transformer on the Gram route: Sven step against Adam step, time and peak memory.

The model of issue #20: a character-level GPT with 2 blocks, width 64, 4
heads, context 64, vocabulary 65, learned position embeddings looked up
once for the whole batch (``pos(torch.arange(T))``), per-sample rows = the
mean cross-entropy over the positions of each sequence. Two variants of the
attention:

* ``arange``: nanoGPT's own attention (``Linear(d, 3d)``, ``F.scaled_dot_product_attention``
  with ``is_causal=True``, ``Linear(d, d)``);
* ``mha``: ``nn.MultiheadAttention(d, 4, batch_first=True)`` with a causal mask.

Time: a Sven step (``sven.Sven`` with its defaults, and with the plain step
``adaptive_damping=False``) against an Adam step, interleaved in rounds in
one process (medians; ratios only). Memory: each optimiser runs in a fresh
subprocess; after a first step, the peak resident memory of three more steps
(``VmHWM``, reset through ``/proc/self/clear_refs``; Linux) above the resident
memory before them is the *step peak* (the step's working memory), and the
peak resident memory of the process (torch, model, optimiser state and step)
the *process peak*. The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=16384``
so that freed tensors leave the resident memory at once (otherwise glibc's
heap keeps them and the step peaks vary from run to run)::

    python benchmarks/bench_transformer.py [--variants arange,mha] [--batch 32] [--rounds 10] [--fallback]

(``--fallback`` also times the plain step on the autograd Jacobian, the route these models fell back to.)

Goal (issue #20): Sven step <= 3x the Adam step, peak memory <= 1.5x Adam's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sven
from benchmarks.step_cases import adam_stepper, measure

VOCAB, WIDTH, HEADS, LAYERS, CONTEXT = 65, 64, 4, 2, 64
VARIANTS = ("arange", "mha")


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, each with a residual connection."""

    def __init__(self, d: int, heads: int, mha: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        if mha:
            self.attn: nn.Module = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.mha = mha

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        if self.mha:
            mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
            return self.attn(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """nanoGPT's layout: token + position embeddings (positions ``arange(T)``, shared by the batch), blocks, head."""

    def __init__(self, mha: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.Sequential(*(Block(WIDTH, HEADS, mha) for _ in range(LAYERS)))
        self.ln, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def batch(B: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and next-token targets (the cost does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (B, CONTEXT + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(B,)``: each sequence's mean next-token cross-entropy."""
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def steppers(variant: str, B: int, fallback: bool = False) -> dict[str, Callable[[], object]]:
    """An Adam step, a default Sven step and a plain Sven step, each on its own copy of the model.

    ``fallback``: also the plain step on the materialised autograd Jacobian (what these models fell back to).
    """
    x, y = batch(B)
    out: dict[str, Callable[[], object]] = {}
    m_adam = CharGPT(variant == "mha")
    out["adam"] = adam_stepper(m_adam, lambda: per_sample_ce(m_adam(x), y))
    runs: list[tuple[str, dict[str, object]]] = [("sven", {}), ("sven-plain", {"adaptive_damping": False})]
    if fallback:
        runs.append(("sven-autograd", {"adaptive_damping": False, "jacobian": "autograd"}))
    for name, kw in runs:
        model = CharGPT(variant == "mha")
        opt = sven.Sven(model.parameters(), **kw)  # type: ignore[arg-type]

        def step(model: nn.Module = model, opt: sven.Sven = opt) -> object:
            return opt.step(lambda: per_sample_ce(model(x), y))

        out[name] = step
    return out


def route_of(variant: str, B: int) -> str:
    """The route Sven settles on for this model (after a first step), and any warning it gave."""
    x, y = batch(B)
    model = CharGPT(variant == "mha")
    opt = sven.Sven(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.step(lambda: per_sample_ce(model(x), y))
    lin = opt.route(lambda: per_sample_ce(model(x), y), list(model.parameters()), opt.rows)
    said = "; ".join(str(w.message) for w in caught if "Gram route" in str(w.message))
    return lin.method + (f" ({said})" if said else "")


def _child(variant: str, B: int, which: str, steps: int) -> None:
    """Print the peak resident memory (bytes) of ``steps`` steps above the resident memory before them."""
    torch.set_num_threads(1)
    fns = steppers(variant, B)
    f = fns[which]
    f()  # the first step (the route's verification, lazy state)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets the peak (VmHWM) to the current resident memory
    for _ in range(steps):
        f()
    print(json.dumps({"step": _status("VmHWM") - base, "process": _status("VmHWM")}))


def _status(field: str) -> int:
    """A memory field of ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory(variant: str, B: int, which: str) -> dict[str, int]:
    """Peak memory (bytes) of ``which``'s steps in a fresh process: above the start (``step``) and in all."""
    cmd = [sys.executable, __file__, "--child", which, "--variants", variant, "--batch", str(B)]
    # allocations above 16 KiB get their own pages, returned on free: the resident memory follows the live tensors
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0")
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    out: dict[str, int] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--fallback", action="store_true", help="also time the autograd Jacobian (slow)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    variants = args.variants.split(",")
    if args.child is not None:
        _child(variants[0], args.batch, args.child, 3)
        return
    for variant in variants:
        route = route_of(variant, args.batch)
        t = measure(steppers(variant, args.batch), rounds=args.rounds, per_round=args.per_round)
        if args.fallback:
            fb = measure(
                {k: v for k, v in steppers(variant, args.batch, True).items() if k in ("adam", "sven-autograd")},
                rounds=2,
                per_round=1,
            )
        mem = {k: memory(variant, args.batch, k) for k in ("adam", "sven", "sven-plain")}
        print(f"\n{variant}, B={args.batch}, 1 thread, route {route}")
        print(f"  {'':12s} {'step':>9s} {'step peak':>10s} {'process peak':>13s}")
        for k in ("adam", "sven", "sven-plain"):
            print(
                f"  {k:12s} {t[k] * 1e3:6.1f} ms {mem[k]['step'] / 2**20:6.1f} MiB {mem[k]['process'] / 2**20:9.1f} MiB"
                + (
                    ""
                    if k == "adam"
                    else f"   time {t[k] / t['adam']:.2f}x, step peak {mem[k]['step'] / mem['adam']['step']:.2f}x, "
                    f"process peak {mem[k]['process'] / mem['adam']['process']:.2f}x"
                )
            )
        if args.fallback:
            ratio = fb["sven-autograd"] / fb["adam"]
            print(
                f"  sven-autograd {fb['sven-autograd'] * 1e3:6.0f} ms   time {ratio:.1f}x (the fallback, for reference)"
            )
        print("  goal: time <= 3x, peak memory <= 1.5x")


if __name__ == "__main__":
    main()
