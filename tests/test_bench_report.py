"""``benchmarks/report.py`` (the second half of ``make bench``) on a pytest-benchmark export of every group kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report


def _bench(group: str, name: str, t: float, err: float | None = None) -> dict:
    extra = {"method": name} if err is None else {"method": name, "rel_err": err}
    return {"group": group, "name": f"test_{name}", "stats": {"min": t}, "extra_info": extra}


def _export(tmp_path: Path, benches: list[dict]) -> str:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine_info": {"bench_threads": 1}, "benchmarks": benches}))
    return str(path)


def test_a_step_cost_group_without_errors_gets_a_ratio_table_and_no_panel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    benches = [
        _bench("dense 200x100", report.BASE, 0.02, 1e-15),
        _bench("dense 200x100", "truncpinv-auto", 0.01, 0.0),  # an exact zero error: drawn at the floor
        _bench("dense 200x100", "scipy-svds", 0.04, float("nan")),  # no error measured for this one
        _bench("sven_step_toy1d_B128", "test_adam_step", 0.001),
        _bench("sven_step_toy1d_B128", "test_sven_step_torch_optim_api", 0.004),
    ]
    png = tmp_path / "errors.png"
    report.main([_export(tmp_path, benches), "--plot", str(png)])
    out = capsys.readouterr().out
    assert png.exists() and png.stat().st_size > 0
    assert "1 thread(s)" in out
    step_table = out[out.index("**sven_step_toy1d_B128**") :]
    assert "time / test_adam_step" in step_table and "rel. error" not in step_table
    assert "| test_sven_step_torch_optim_api | 0.004 | 4.000 |" in step_table
    solver_table = out[: out.index("**sven_step_toy1d_B128**")]
    assert f"time / {report.BASE}" in solver_table and "| truncpinv-auto | 0.010 | 0.500 | 0.0e+00 |" in solver_table
    assert "| scipy-svds | 0.040 | 2.000 | - |" in solver_table
    assert "nan" not in out.lower()


def test_only_step_cost_groups_write_no_plot_and_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    benches = [_bench("sven_step", "adam", 0.002), _bench("sven_step", "sven", 0.006)]
    png = tmp_path / "errors.png"
    report.main([_export(tmp_path, benches), "--plot", str(png)])
    out = capsys.readouterr().out
    assert not png.exists() and "not written" in out
    assert "| sven | 0.006 | 3.000 |" in out
