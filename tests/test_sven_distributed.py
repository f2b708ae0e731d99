"""Data-parallel :class:`sven.Sven` on two gloo ranks matches one process on the whole batch.

Every scenario trains a float64 model for :data:`STEPS` steps on one fixed
batch. In the distributed run each of the two ranks holds a contiguous shard of
that batch (16 + 16 rows, or 20 + 12 for the uneven split) and rank 1 starts
from *different* initial weights, so the constructor's broadcast is exercised
too. The parent process then runs the same training on the whole batch without
a process group and compares the parameters (to :data:`ATOL`).

All scenarios run inside one spawn of two processes (importing torch twice per
spawn is the expensive part on a small machine); each one is reported by its
own parametrised test.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sven
from sven.tasks import per_sample_mse
from tests.dist_harness import requires_gloo, run_distributed

#: Sven steps per scenario.
STEPS = 5
#: Largest allowed difference between a distributed and the single-process parameter.
ATOL = 1e-6
#: Samples in the fixed batch.
BATCH = 32
#: Seed of rank 0's (and the reference's) initial weights; rank ``r`` uses ``INIT_SEED + 1000 * r``.
INIT_SEED = 7

#: name -> (model, rows per rank, Sven keyword arguments, ``last_step.jacobian_method`` of every run).
SCENARIOS: dict[str, tuple[str, tuple[int, int], dict[str, Any], str]] = {
    "gram": ("mlp", (16, 16), {"jacobian": "gram"}, "gram"),
    "autograd": ("mlp", (16, 16), {"jacobian": "autograd"}, "autograd"),
    "kappa1": ("mlp", (16, 16), {"jacobian": "gram", "kappa": 1.0}, "gram"),
    "adaptive_damping": ("mlp", (16, 16), {"jacobian": "gram", "adaptive_damping": True, "lr": 1.0}, "gram"),
    "adaptive_damping_autograd": (
        "mlp",
        (16, 16),
        {"jacobian": "autograd", "adaptive_damping": True, "lr": 1.0},
        "autograd",
    ),
    "variable_k": ("mlp", (16, 16), {"jacobian": "gram", "variable_k": True}, "gram"),
    "conv1d": ("conv1d", (16, 16), {"jacobian": "gram"}, "gram"),
    "embedding_layernorm": ("embedding", (16, 16), {"jacobian": "gram"}, "gram"),
    "uneven_gram": ("mlp", (20, 12), {"jacobian": "gram"}, "gram"),
    "uneven_autograd": ("mlp", (20, 12), {"jacobian": "autograd"}, "autograd"),
    # a parameter outside the supported layers: "auto" warns and falls back to the gathered Jacobian rows
    "auto_fallback": ("scaled", (20, 12), {"jacobian": "auto"}, "autograd"),
    # a process group of its own (broadcast source and collectives on a non-default group)
    "explicit_group": ("mlp", (16, 16), {"jacobian": "gram", "group": "new"}, "gram"),
    # the GGN rows of cross-entropy, judged on the cross-entropy of every rank (no floor, lr 4: tries are rejected)
    "ggn": (
        "mlp_ce",
        (20, 12),
        {"jacobian": "gram", "ggn": True, "damping": 0.0, "lr": 4.0, "max_retries": 20},
        "gram",
    ),
}


class _Scaled(nn.Module):
    """An MLP whose hidden units are scaled by a free parameter: the Gram route does not apply."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 16)
        self.scale = nn.Parameter(torch.ones(16))
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x)) * self.scale)


class _Tokens(nn.Module):
    """Embedding, LayerNorm and a Linear read-out summed over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.norm(self.emb(t)))).sum(dim=1)


def _model(kind: str, seed: int) -> nn.Module:
    """A float64 model of ``kind``, initialised from ``seed``."""
    torch.manual_seed(seed)
    if kind in ("mlp", "mlp_ce"):
        out = 3 if kind == "mlp_ce" else 1
        model: nn.Module = nn.Sequential(nn.Linear(3, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, out))
    elif kind == "conv1d":
        model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 6, 1))
    elif kind == "embedding":
        model = _Tokens()
    elif kind == "scaled":
        model = _Scaled()
    else:  # pragma: no cover - the scenarios name only these
        raise ValueError(kind)
    return model.double()


def _batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch of ``kind``'s model: inputs and ``(BATCH, 1)`` float64 targets."""
    g = torch.Generator().manual_seed(1234)
    if kind == "conv1d":
        x = torch.randn(BATCH, 2, 8, generator=g, dtype=torch.float64)
    elif kind == "embedding":
        x = torch.randint(0, 10, (BATCH, 5), generator=g)
    else:
        x = torch.randn(BATCH, 3, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 1, generator=g, dtype=torch.float64)
    if kind == "mlp_ce":
        y = torch.randint(0, 3, (BATCH,), generator=g)
    return x, y


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    """Sven's keyword arguments: the scenario's over the shared defaults."""
    return {"lr": 0.2, "rank": 12, "rtol": 1e-3, **opts}


def _train(name: str, rank: int | None) -> dict[str, Any]:
    """Run scenario ``name``; ``rank=None``: one process on the whole batch, else this rank's shard."""
    kind, split, opts, _ = SCENARIOS[name]
    opts = dict(opts)
    if opts.pop("group", None) == "new" and rank is not None:  # a group of its own, not the default one
        opts["process_group"] = dist.new_group([0, 1])
    x, y = _batch(kind)
    if rank is not None:
        start = sum(split[:rank])
        x, y = x[start : start + split[rank]], y[start : start + split[rank]]
    model = _model(kind, INIT_SEED + 1000 * (rank or 0))
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = sven.Sven(model.parameters(), **_options(opts))
        start_params = [p.detach().clone() for p in model.parameters()]
        closure: Callable[[], torch.Tensor] = (
            (lambda: F.cross_entropy(model(x), y, reduction="none"))
            if kind == "mlp_ce"
            else (lambda: per_sample_mse(model(x), y))
        )
        local_rows = []
        for _ in range(STEPS):
            local_rows.append(opt.step(closure).shape[0])
    info = opt.last_step
    assert info is not None
    return {
        "before": before,
        "start": start_params,
        "params": [p.detach().clone() for p in model.parameters()],
        "method": info.jacobian_method,
        "rows_seen": int(info.losses.shape[0]),
        "local_rows": local_rows,
        "rejected": opt.rejected_steps,
        "skipped": opt.skipped_steps,
        "damping": info.damping,
        "k_used": info.k_used,
        "warnings": [str(w.message) for w in caught],
    }


def _broadcast(rank: int) -> dict[str, list[torch.Tensor]]:
    """Rank-dependent weights in two parameter groups (one tensor frozen, one not contiguous), then the constructor."""
    model = _model("mlp", INIT_SEED + 1000 * rank)
    strided = torch.empty(16, 16, dtype=torch.float64).T  # column-major
    strided.copy_(model[2].weight.detach())
    model[2].weight = nn.Parameter(strided)
    model[2].bias.requires_grad_(False)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    sven.Sven([{"params": params[:2], "lr": 0.1}, {"params": params[2:]}], lr=0.2, rank=4)
    return {"before": before, "after": [p.detach().clone() for p in params]}


def _all_scenarios(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    """Runs on every rank: each scenario in turn (stops at the first failure, which would desynchronise)."""
    out: dict[str, Any] = {"broadcast": _broadcast(rank)}
    for name in names:
        try:
            out[name] = _train(name, rank)
        except Exception:  # reported by that scenario's test
            out[name] = traceback.format_exc()
            break
    return out


@pytest.fixture(scope="module")
def distributed_runs() -> list[dict[str, Any]]:
    """The two ranks' results of every scenario (one spawn for the whole module)."""
    return run_distributed(_all_scenarios, world_size=2, args=(list(SCENARIOS),), timeout=120)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest absolute entry-wise difference between two lists of tensors."""
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


@requires_gloo
def test_constructor_broadcasts_rank0_parameters(distributed_runs: list[dict[str, Any]]) -> None:
    """Weights that differ on the two ranks are rank 0's on both after ``Sven(...)``, in place."""
    b0, b1 = (r["broadcast"] for r in distributed_runs)
    assert not b1["after"][2].is_contiguous()  # updated in place, layout kept
    assert all(_max_diff([a], [b]) > 1e-3 for a, b in zip(b0["before"], b1["before"]))  # every tensor differed
    for res in (b0, b1):
        assert all(torch.equal(a, b) for a, b in zip(res["after"], b0["before"]))


@requires_gloo
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_process(name: str, distributed_runs: list[dict[str, Any]]) -> None:
    """After :data:`STEPS` steps on two shards the weights equal one process's on the whole batch."""
    runs = [r.get(name, "not run: an earlier scenario failed") for r in distributed_runs]
    for r, res in enumerate(runs):
        assert isinstance(res, dict), f"rank {r}:\n{res}"
    ref = _train(name, None)
    _, split, _, method = SCENARIOS[name]
    # rank 1 started elsewhere; the constructor gave it rank 0's weights
    assert _max_diff(runs[1]["before"], runs[0]["before"]) > 1e-2
    for res in runs:
        assert all(torch.equal(a, b) for a, b in zip(res["start"], runs[0]["before"]))
    # training moved the weights, far more than the tolerance
    assert _max_diff(ref["params"], ref["start"]) > 1e-2
    # the ranks stay bit-identical, and match the single process on the whole batch
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["params"], runs[1]["params"]))
    assert _max_diff(runs[0]["params"], ref["params"]) <= ATOL
    for r, res in enumerate(runs):
        assert res["local_rows"] == [split[r]] * STEPS  # step() returns this rank's rows
        assert res["rows_seen"] == BATCH  # the step used the whole batch
        assert res["method"] == ref["method"] == method
        assert (res["rejected"], res["skipped"], res["k_used"]) == (ref["rejected"], ref["skipped"], ref["k_used"])
        assert res["damping"] == pytest.approx(ref["damping"], rel=1e-9)
    if name.startswith("adaptive_damping") or name == "ggn":
        assert ref["rejected"] > 0, "the scenario should exercise a rejected try"
    if name == "variable_k":
        assert ref["k_used"] is not None
    if name == "auto_fallback":
        for res in (*runs, ref):
            assert any("Gram route does not apply" in w for w in res["warnings"])
