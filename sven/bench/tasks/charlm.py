r"""``charlm``: a nanoGPT-style character transformer on the Python standard library's own source.

**Corpus** (:func:`corpus`): the source files of the 36 modules of
:data:`CORPUS_MODULES` (sorted names), read as UTF-8 from the running
interpreter's standard library directory (``sysconfig.get_path("stdlib")``,
not through ``sys.path``, so a same-named file in the working directory cannot
replace one) and concatenated, each followed by one newline: 1,022,637
characters on Python 3.11, so no download is needed and every machine has it.

**Vocabulary** (:data:`VOCAB`): 97 ids, fixed and independent of the text:
``0`` for every character outside the set, ``1`` for the newline, ``2 .. 96``
for the printable ASCII characters ``" "`` to ``"~"``. A non-ASCII
character (68 in the corpus on Python 3.11, most in ``shlex``) or a tab is the
unknown id.

**What can differ between machines**: only the text, when CPython changes
one of these files. The modules were chosen for stability among the
single-file modules of CPython 3.10 to 3.13: each file is the same on 3.11.2
(Debian's build) and 3.11.7, and 32 of them have at most three versions among
3.10.13, 3.11, 3.12.1 and 3.13.0 (``_pydecimal``, ``functools``, ``random``
and ``statistics``, four, bring the size to 1 MB). :func:`corpus` has 1,016,770
characters on 3.10.13, 1,022,637 on 3.11, 1,023,583 on 3.12.1 and 1,061,026
on 3.13.0. The vocabulary and the recipe do not change. The corpus's SHA-256,
length and the Python version are recorded in the task's data info, so two
results can be compared only when those agree.

**Data**: the encoded corpus is cut into consecutive, non-overlapping blocks
of ``T + 1 = 65`` ids (the rest is dropped); block ``i`` validates if
``i % 32 == 31`` (about 3 %, a fixed and evenly spread sample of every module)
and trains otherwise. A block gives a ``(T,)`` input and its ``(T,)`` next-id
targets.

**Batches**: nanoGPT samples random windows with replacement; here each step
draws ``B = 32`` training blocks uniformly with replacement
(``torch.randint`` on the task's loader generator). An "epoch" is an
evaluation interval of :data:`STEPS_PER_EPOCH` = 50 steps (fewer if the
training set holds fewer than 50 batches, as under ``--quick``), and the
recipe runs 6 of them: **300 steps**.

**Model** (:class:`CharTransformer`, nanoGPT's ``GPT`` at a small size):
token embedding plus the position embedding ``pos(torch.arange(T))``; 2
pre-LayerNorm blocks of causal self-attention (4 heads, ``d = 64``; queries,
keys, values and the output projection are ``nn.Linear`` layers) and an MLP
``d - 4d - d`` with GELU; a final LayerNorm and an ``nn.Linear`` head to the
97 logits. No dropout. The head is *not* tied to the token embedding (unlike
nanoGPT), so that every parameter belongs to one layer. Initialisation as
nanoGPT: normal(0, 0.02) weights, zero biases, the residual projections with
standard deviation :math:`0.02 / \sqrt{2 L}`. 116,705 parameters.

**Loss**: next-character cross-entropy. The per-sample loss, the residual that
Sven sees, is **per sequence**: the mean over its ``T`` positions of the
token cross-entropy, so a batch has ``B = 32`` rows (per-token rows would be
``B T = 2,048`` rows, a 64 times larger Sven system). The mean over the batch
is the usual mean token loss, so every optimizer minimises the same objective.
The validation loss is the mean token cross-entropy in nats (divide by
:math:`\ln 2` for bits per character).

**Optimizers**: AdamW is this task's usual baseline (``adamw``); Sven
``k=16, lr=0.5, rtol=1e-4, kappa=2`` (half the batch; not tuned). The
position embedding on ``arange(T)`` has no batch dimension; the Gram route of
:class:`sven.Sven` serves it as a shared input (every sample's rows see the
same positions), so a step costs about twice an AdamW step here, not the
seconds per step of the materialised Jacobian.

Time-to-target uses a validation cross-entropy of ``2.2`` nats per character.
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Task, TaskData

__all__ = [
    "CONTEXT",
    "CORPUS_MODULES",
    "STEPS_PER_EPOCH",
    "VOCAB",
    "CharLMTask",
    "CharTransformer",
    "corpus",
    "decode",
    "encode",
]

#: The standard-library modules of the corpus, sorted (``<name>.py`` in the stdlib directory).
CORPUS_MODULES = (
    "_pydecimal",
    "bisect",
    "cmd",
    "copy",
    "csv",
    "difflib",
    "fnmatch",
    "ftplib",
    "functools",
    "getopt",
    "glob",
    "heapq",
    "hmac",
    "imaplib",
    "keyword",
    "linecache",
    "mailbox",
    "numbers",
    "operator",
    "optparse",
    "pickle",
    "poplib",
    "queue",
    "random",
    "sched",
    "secrets",
    "shlex",
    "smtplib",
    "stat",
    "statistics",
    "string",
    "tabnanny",
    "textwrap",
    "token",
    "weakref",
    "zipapp",
)
#: The known characters: the newline and printable ASCII; id ``0`` is the unknown character.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = 0
N_TOKENS = len(VOCAB) + 1
#: Context length ``T``.
CONTEXT = 64
#: Training steps per "epoch" (evaluation interval).
STEPS_PER_EPOCH = 50
#: Every ``VAL_EVERY``-th block validates.
VAL_EVERY = 32
#: Seed of the generator that draws the training blocks.
LOADER_SEED = 0

_IDS = {ch: i + 1 for i, ch in enumerate(VOCAB)}


def encode(text: str) -> torch.Tensor:
    """``(len(text),)`` int64 ids: :data:`VOCAB` position + 1, or ``0`` for any other character."""
    return torch.tensor([_IDS.get(ch, UNKNOWN) for ch in text], dtype=torch.int64)


def decode(ids: torch.Tensor) -> str:
    """The text of ``ids`` (the unknown id reads ``"?"``, which is ambiguous with a real ``"?"``)."""
    return "".join(VOCAB[i - 1] if i > 0 else "?" for i in ids.tolist())


@functools.lru_cache(maxsize=1)
def corpus() -> str:
    """The concatenated source of :data:`CORPUS_MODULES` (each followed by ``"\\n"``), from the stdlib directory.

    Raises:
        FileNotFoundError: naming the module, if this Python's standard library lacks one of them.
    """
    root = Path(sysconfig.get_path("stdlib"))
    parts = []
    for name in CORPUS_MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(
                f"the charlm corpus needs the standard-library module {name!r}, not found at {path}"
            )
        parts.append(path.read_text(encoding="utf-8") + "\n")
    return "".join(parts)


def _init(module: nn.Linear | nn.Embedding, std: float) -> None:
    """nanoGPT's initialisation: normal(0, std) weights, zero biases."""
    nn.init.normal_(module.weight, 0.0, std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with ``nn.Linear`` queries, keys, values and output projection."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"`d` must be a multiple of `heads`, got d={d}, heads={heads}")
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d_head) + causal mask) v`` per head, then the projection; ``x`` is ``(B, T, d)``."""
        b, t, d = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block on ``(B, T, d)``."""
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """nanoGPT's ``GPT`` at a small size (module docstring), initialised from ``seed``; ``(B, T)`` ids to logits.

    Args:
        seed: seed of the initialisation (the global RNG is untouched).
        vocab: number of ids.
        d: embedding width.
        context: the longest input, ``T``.
        layers: transformer blocks.
        heads: attention heads.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        vocab: int = N_TOKENS,
        d: int = 64,
        context: int = CONTEXT,
        layers: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        blocks: list[Block] = [b for b in self.blocks if isinstance(b, Block)]
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    _init(m, 0.02)
            for block in blocks:
                for proj in (block.attn.proj, block.out):  # nanoGPT's c_proj: scaled for the residual sum
                    _init(proj, 0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` int64 ids, ``T <= context``, to ``(B, T, vocab)`` logits."""
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"the input has {t} positions, more than the context of {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class CharLMTask(Task):
    """The ``charlm`` task (see the module docstring for the recipe)."""

    name = "charlm"
    summary = (
        "character transformer (nanoGPT style, 2 layers, d 64, 4 heads, context 64, 116,705 params) on ~1 MB of "
        "Python stdlib source, per-sequence mean next-char cross-entropy, batch 32, 300 steps"
    )
    batch_size = 32
    loader_seed = LOADER_SEED
    target = 2.2
    sven_defaults: ClassVar[Mapping[str, float | int]] = {"lr": 0.5, "rank": 16, "rtol": 1e-4, "kappa": 2.0}
    loss_label = "mean next-character cross-entropy (nats)"
    quick_n_train = 32
    epochs = 6
    sven_reference = False  # its step takes seconds on this model (base.Task.sven_reference)

    def build_data(self) -> TaskData:
        """The blocks of the encoded :func:`corpus` (module docstring), ``(N, 64)`` int64 inputs and targets."""
        text = corpus()
        ids = encode(text)
        n_blocks = len(ids) // (CONTEXT + 1)
        blocks = ids[: n_blocks * (CONTEXT + 1)].view(n_blocks, CONTEXT + 1)
        val = torch.arange(n_blocks) % VAL_EVERY == VAL_EVERY - 1
        train, held = blocks[~val], blocks[val]
        return TaskData(
            train[:, :-1].contiguous(),
            train[:, 1:].contiguous(),
            held[:, :-1].contiguous(),
            held[:, 1:].contiguous(),
            {
                "corpus_chars": len(text),
                "corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "unknown_chars": int((ids == UNKNOWN).sum()),
                "python": platform.python_version(),
                "modules": list(CORPUS_MODULES),
                "vocab": N_TOKENS,
                "context": CONTEXT,
            },
        )

    def model(self, seed: int) -> nn.Module:
        """:class:`CharTransformer` with the task's sizes, 116,705 parameters."""
        return CharTransformer(seed=seed)

    def per_sample_loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per sequence: the mean over its positions of the token cross-entropy, shape ``(B,)``."""
        return F.cross_entropy(pred.transpose(1, 2), y, reduction="none").mean(dim=-1)

    def batches(self, data: TaskData, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One evaluation interval: ``min(50, N // B)`` batches of ``B`` blocks drawn uniformly with replacement."""
        n = data.n_train
        for _ in range(max(1, min(STEPS_PER_EPOCH, n // self.batch_size))):
            idx = torch.randint(n, (self.batch_size,), generator=generator)
            yield data.x_train[idx], data.y_train[idx]
