"""Smoke test of ``benchmarks/bench_scale.py``: the ``--quick`` run and its output structure."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_scale", mod)
    spec.loader.exec_module(mod)
    return mod


bs = _load()


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## Peak memory of one step" in proc.stdout and "## Targets" in proc.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"meta", "memory", "mlp_time", "toy1d_time", "targets"}
    assert res["meta"]["preset"] == "quick" and res["meta"]["device"] == "cpu"

    mem = res["memory"]
    rows = {(r["config"], r["batch"]): r for r in mem["rows"]}
    B = mem["batch"]
    for config in bs.MEM_CONFIGS:  # each in a fresh process, all fit at the quick sizes
        r = rows[(config, B)]
        assert r["status"] == "ok", r
        assert r["peak_mib"] > 0 and r["increment_mib"] is not None
    assert rows[("gram", B)]["route"] == "gram" and rows[("dense", B)]["route"] == "hooks"
    assert mem["dense_fits"] and mem["dense_basis"].startswith("measured")
    assert mem["ratios"]["gram_over_dense_peak"] > 0

    mt = res["mlp_time"]
    (run,) = mt["runs"]
    assert run["status"] == "ok" and set(run["seconds"]) == {"gram", "adam", "dense"}
    assert run["route"] == {"gram": "gram", "adam": "backward", "dense": "hooks"}
    assert mt["gram_over_adam"] > 0 and mt["dense_over_gram"] > 0

    toy = res["toy1d_time"]
    assert toy["threads"] == 1 and [r["batch"] for r in toy["results"]] == list(bs.QUICK.toy_batches)
    for r in toy["results"]:
        assert set(r["seconds"]) == set(bs.TOY_METHODS) and all(v > 0 for v in r["seconds"].values())
        assert r["route"]["gram"] == "gram" and r["route"]["hooks"] == "hooks"
        assert r["route"]["auto"] == "hooks"  # tiny B * P: auto leaves the Gram route after its first step
        assert r["over_adam"]["adam"] == 1.0
        assert not any(r["skipped"].values())

    assert len(res["targets"]) == 3 + len(bs.QUICK.toy_batches)
    for t in res["targets"]:
        assert t["op"] in ("<=", ">=") and isinstance(t["met"], bool) and t["basis"]


def _fake_runner(fail_dense_above: int) -> Any:
    """A child runner with made-up peaks: dense grows 100 MiB per sample and fails above a batch size."""

    def run(kind: str, config: str, batch: int) -> dict[str, Any]:
        assert kind == "mem"
        base = 500 * bs.MiB
        extra = {"baseline": 0, "gram": 50 * bs.MiB, "adam": 120 * bs.MiB, "dense": 100 * bs.MiB * batch}[config]
        if config == "dense" and batch > fail_dense_above:
            return {"child": kind, "config": config, "batch": batch, "status": "oom", "error": "MemoryError: "}
        return {"child": kind, "config": config, "batch": batch, "status": "ok", "peak_rss_bytes": base + extra}

    return run


def test_dense_that_does_not_fit_is_extrapolated_and_labelled() -> None:
    mem = bs.memory_section(_fake_runner(fail_dense_above=64), bs.FULL, "cpu")
    assert not mem["dense_fits"]
    assert "EXTRAPOLATED" in mem["dense_basis"]
    rows = {(r["config"], r["batch"], r.get("extrapolated")): r for r in mem["rows"]}
    assert rows[("dense", 256, False)]["status"] == "oom"
    for b in bs.FULL.fallback:  # dense and gram measured at the smaller batches
        assert rows[("dense", b, False)]["status"] == "ok" and rows[("gram", b, False)]["status"] == "ok"
    extra = rows[("dense", 256, True)]
    assert extra["status"] == "extrapolated"
    assert extra["peak_mib"] == pytest.approx(500 + 100 * 256)
    assert mem["ratios"]["gram_over_dense_peak"] == pytest.approx(550 / (500 + 100 * 256))
    assert mem["ratios"]["gram_over_dense_increment"] == pytest.approx(50 / (100 * 256))
    assert mem["ratios"]["gram_over_dense_peak_B64"] == pytest.approx(550 / (500 + 100 * 64))


def test_extrapolate_is_linear() -> None:
    assert bs.extrapolate([(32, 1.0), (64, 2.0)], 256) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        bs.extrapolate([(32, 1.0), (32, 2.0)], 256)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_a_gpu_fails_clearly() -> None:
    with pytest.raises(SystemExit, match="sees no CUDA GPU"):
        bs.main(["--device", "cuda", "--quick"])


def test_dense_that_does_not_fit_next_to_the_others_is_timed_at_the_fallback_batch() -> None:
    calls: list[tuple[str, int]] = []

    def run(kind: str, config: str, batch: int) -> dict[str, Any]:
        calls.append((config, batch))
        if "dense" in config and "gram" in config and batch == bs.FULL.batch:
            return {"child": kind, "config": config, "batch": batch, "status": "oom", "error": "RuntimeError: alloc"}
        per_sample = {"gram": 1e-3, "adam": 5e-4, "dense": 3e-2}
        secs = {m: per_sample[m] * batch for m in config.split(",")}
        return {"child": kind, "config": config, "batch": batch, "status": "ok", "seconds": secs}

    mt = bs.mlp_time_section(run, bs.FULL, dense_fits=True)
    B, Bf = bs.FULL.batch, bs.FULL.time_fallback
    assert calls == [("gram,adam,dense", B), ("gram,adam", B), ("gram,adam,dense", Bf), ("gram,adam", Bf), ("dense", B)]
    assert mt["gram_over_adam"] == pytest.approx(2.0)
    assert mt["dense_batch"] == Bf and mt["dense_over_gram"] == pytest.approx(30.0)
    assert f"B={Bf}" in mt["dense_basis"] and "oom" in mt["dense_basis"]
    assert mt["dense_over_clean_gram"] == pytest.approx(30.0)
    assert mt["dense_alone_over_gram"] == pytest.approx(30.0)
