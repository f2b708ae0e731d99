"""Collectives of :mod:`sven.distributed`: no-ops alone, correct on two gloo ranks."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist

from sven import distributed as sd
from tests.dist_harness import requires_gloo, run_distributed

#: Rows held by each rank in the unequal gathers (rank 1 may hold none).
ROWS = {"f32": (3, 1), "f64": (2, 5), "i64": (2, 0), "bool": (1, 2)}


def _rows(kind: str, r: int) -> torch.Tensor:
    """Rank ``r``'s rows of the gather ``kind``: distinct values, so order and padding errors show."""
    n = ROWS[kind][r]
    base = torch.arange(n * 4).reshape(n, 2, 2) + 100 * r
    if kind == "f32":
        return base.reshape(n, 4).float() + 0.5
    if kind == "f64":
        return base.reshape(-1)[:n].double() / 3
    if kind == "i64":
        return base.long() * 7
    return base[:, 0, 0] % 2 == 0


def _collectives(r: int, ws: int) -> dict[str, Any]:
    """Runs on every rank; returns what it saw."""
    out: dict[str, Any] = {
        "group_is_world": sd.resolve_group() is dist.group.WORLD,
        "explicit_group": sd.resolve_group(dist.group.WORLD) is dist.group.WORLD,
        "world_size": sd.world_size(),
        "rank": sd.rank(),
    }
    out["gathered"] = {kind: sd.all_gather_rows(_rows(kind, r)) for kind in ROWS}
    try:  # trailing shapes disagree: every rank raises, none waits
        sd.all_gather_rows(torch.zeros(2, 3 + r))
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)

    t = torch.full((2, 3), float(r + 1), dtype=torch.float64)
    out["sum_returns_input"] = sd.all_reduce_sum_(t) is t
    out["sum"] = t
    nc = (torch.arange(6.0).reshape(2, 3) * (r + 1)).T  # not contiguous
    sd.all_reduce_sum_(nc)
    out["sum_noncontiguous"] = nc
    out["mean"] = sd.all_reduce_mean_scalar(2.0 * r + 1.0)

    torch.manual_seed(10 + r)  # different initialisations on the two ranks
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sd.broadcast_parameters_(model.parameters(), src=1)
    out["params"] = [p.detach().clone() for p in model.parameters()]
    out["params_require_grad"] = all(p.requires_grad for p in model.parameters())

    out["agree"] = (sd.all_agree(True), sd.all_agree(r == 0), sd.all_agree(False))
    return out


@requires_gloo
def test_collectives_on_two_ranks() -> None:
    res = run_distributed(_collectives, world_size=2, timeout=60)
    torch.manual_seed(11)
    src = [p.detach() for p in torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).parameters()]
    for r, got in enumerate(res):
        assert got["group_is_world"] and got["explicit_group"]
        assert (got["world_size"], got["rank"]) == (2, r)
        for kind in ROWS:
            expected = torch.cat([_rows(kind, 0), _rows(kind, 1)])
            assert got["gathered"][kind].dtype == expected.dtype
            assert torch.equal(got["gathered"][kind], expected), kind
        assert got["mismatch"] is not None and "same trailing shape and dtype on every rank" in got["mismatch"]
        assert "[(2, 3), (2, 4)]" in got["mismatch"]
        assert got["sum_returns_input"]
        assert torch.equal(got["sum"], torch.full((2, 3), 3.0, dtype=torch.float64))
        assert torch.equal(got["sum_noncontiguous"], (torch.arange(6.0).reshape(2, 3) * 3).T)
        assert got["mean"] == 2.0
        assert all(torch.equal(a, b) for a, b in zip(got["params"], src))
        assert got["params_require_grad"]
        assert got["agree"] == (True, False, False)


def _misbehaves(r: int, ws: int) -> int:
    """Rank 1 raises, rank 2 exits without a word, rank 0 returns."""
    if r == 1:
        raise ValueError("rank one is unhappy")
    if r == 2:
        os._exit(3)
    return r


@requires_gloo
def test_harness_reports_failing_and_vanished_ranks() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 raised:.*rank one is unhappy.*no result from ranks \[2\]") as e:
        run_distributed(_misbehaves, world_size=3, timeout=60)
    assert "exit codes {2: 3}" in str(e.value)


def test_single_process_calls_are_no_ops() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    assert sd.resolve_group() is None
    assert sd.resolve_group(object()) is None  # type: ignore[arg-type]
    assert (sd.world_size(), sd.rank()) == (1, 0)
    t = torch.arange(6.0).reshape(3, 2)
    assert sd.all_gather_rows(t) is t
    assert sd.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(6.0).reshape(3, 2))
    assert sd.all_reduce_mean_scalar(2.5) == 2.5
    p = torch.nn.Parameter(torch.ones(2))
    sd.broadcast_parameters_([p], src=0)
    assert torch.equal(p.detach(), torch.ones(2))
    assert sd.all_agree(True) is True and sd.all_agree(False) is False


def test_bad_input_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"`t` must be a torch\.Tensor, got list"):
        sd.all_gather_rows([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`t` must have at least one dimension"):
        sd.all_gather_rows(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"`t` must be a torch\.Tensor"):
        sd.all_reduce_sum_(3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`params\[1\]` must be a torch\.Tensor"):
        sd.broadcast_parameters_([torch.zeros(1), 2.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="`world_size` must be a positive integer"):
        run_distributed(_misbehaves, world_size=0)
