"""Packaging: one version, a lean core, clear errors for missing extras, and a wheel that works on its own.

The core install (torch, numpy, scipy) must give ``truncpinv`` and ``sven.Sven``
without importing an extra's package (matplotlib, tqdm, scikit-learn). A
feature whose extra is missing raises one :class:`MissingExtraError` that names
the extra; the tests simulate the missing package with ``sys.modules[name] = None``.

:func:`test_wheel_installs_and_works_in_a_fresh_venv` (markers ``slow`` and
``wheel``) builds the wheel, installs it with the core dependencies only in a
new virtual environment and uses it there. ``make test`` deselects it
(``-m "not wheel"``); ``.ci/run`` runs it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import sven
import truncpinv
from truncpinv._optional import EXTRAS, MissingExtraError, require, require_extra

ROOT = Path(__file__).resolve().parents[1]
EXTRA_MODULES = ("matplotlib", "tqdm", "sklearn")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _run(args: list[str], *, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command with no ``PYTHONPATH``, so that only what is installed is importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


# --------------------------------------------------------------------------- version and metadata
def test_one_version_for_both_packages() -> None:
    from truncpinv._version import __version__

    assert truncpinv.__version__ == sven.__version__ == __version__
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "truncpinv._version.__version__"}


def test_core_dependencies_and_extras() -> None:
    project = _pyproject()["project"]
    core = {req.split(">")[0].split("=")[0] for req in project["dependencies"]}
    assert core == {"torch", "numpy", "scipy"}
    extras = project["optional-dependencies"]
    names = {extra: {req.split(">")[0] for req in reqs} for extra, reqs in extras.items()}
    assert names["sklearn"] == {"scikit-learn"}
    assert names["bench"] == {"matplotlib", "tqdm", "scikit-learn", "mlxtend"}
    assert names["dev"] >= names["sklearn"] | names["bench"] | {"pytest", "hypothesis", "pytest-benchmark"}
    # truncpinv/_optional.py names the same extras, by import name
    assert set(EXTRAS) == {"sklearn", "bench"}
    assert project["license"] == "MIT"  # SPDX string: no setuptools deprecation warning


# --------------------------------------------------------------------------- imports stay lean
def test_core_imports_load_no_extra() -> None:
    """``import truncpinv, sven`` and ``from sven import Sven`` add none of the extras' modules.

    ``import torch`` alone loads tqdm when it is installed (``torch.hub`` tries
    it), so the check counts only what our imports add after torch.
    """
    code = textwrap.dedent(f"""
        import sys, torch
        before = set(sys.modules)
        import truncpinv, sven
        from sven import Sven
        added = {{m.partition(".")[0] for m in set(sys.modules) - before}}
        print(sorted(added & set({EXTRA_MODULES!r})))
    """)
    proc = _run([sys.executable, "-c", code], cwd=ROOT)
    assert proc.stdout.strip() == "[]"


def test_core_works_with_the_extras_missing() -> None:
    """With matplotlib, tqdm and scikit-learn unimportable, the core still solves and steps."""
    code = textwrap.dedent(f"""
        import sys
        for name in {EXTRA_MODULES!r}:
            sys.modules[name] = None  # as if not installed
        import numpy as np, torch, truncpinv as tp, sven
        import sven.tasks, sven.bench.cli  # the toy task and the benchmark's modules import nothing optional
        x = tp.lstsq(np.eye(3), np.ones(3))
        assert isinstance(x, np.ndarray) and np.allclose(x, 1.0)
        model = torch.nn.Linear(2, 1)
        opt = sven.Sven(model.parameters(), lr=0.1, rank=4)
        X, y = torch.randn(8, 2), torch.randn(8, 1)
        opt.step(lambda: ((model(X) - y) ** 2).sum(dim=-1))
        print("ok")
    """)
    proc = _run([sys.executable, "-c", code], cwd=ROOT)
    assert proc.stdout.strip() == "ok"


# --------------------------------------------------------------------------- missing extras: one clear error
@pytest.mark.parametrize("module", ["sklearn", "sklearn.datasets"])
def test_require_names_the_extra(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    message = "truncpinv.sklearn needs the `sklearn` extra (missing: sklearn): pip install 'truncpinv-sven[sklearn]'"
    with pytest.raises(MissingExtraError) as e:
        require(module, "sklearn", "truncpinv.sklearn")
    assert str(e.value) == message
    assert isinstance(e.value, ImportError)


def test_require_returns_the_module() -> None:
    assert require("math", "bench", "test") is importlib.import_module("math")


def test_require_keeps_an_installed_module_s_own_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module that is installed but fails on one of its own imports is not reported as a missing extra."""
    (tmp_path / "broken_extra_pkg.py").write_text("import no_such_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        require("broken_extra_pkg", "bench", "test")
    assert not isinstance(e.value, MissingExtraError) and e.value.name == "no_such_module_anywhere"


def test_require_extra_lists_every_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(MissingExtraError) as e:
        require_extra("bench", "sven-bench")
    assert str(e.value) == (
        "sven-bench needs the `bench` extra (missing: matplotlib, tqdm): pip install 'truncpinv-sven[bench]'"
    )


def test_sklearn_estimator_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.delitem(sys.modules, "truncpinv.sklearn", raising=False)
    with pytest.raises(MissingExtraError, match=r"truncpinv\.sklearn needs the `sklearn` extra"):
        importlib.import_module("truncpinv.sklearn")


def test_sven_bench_without_its_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sven.bench.cli import main

    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--task", "toy1d", "--optimizers", "adam", "--out", str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.strip() == "sven-bench needs the `bench` extra (missing: tqdm): pip install 'truncpinv-sven[bench]'"
    assert not (tmp_path / "results.json").exists()


def test_digits_task_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    from sven.bench.tasks.digits import load_digits_split

    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtraError, match=r"the digits benchmark tasks needs the `bench` extra"):
        load_digits_split()


# --------------------------------------------------------------------------- the wheel, on its own
SMOKE = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np
    import torch

    import sven
    import truncpinv as tp
    from sven import Sven

    prefix = Path(sys.prefix).resolve()
    for mod in (tp, sven):
        assert prefix in Path(mod.__file__).resolve().parents, f"{mod.__name__} from {mod.__file__}, not {prefix}"
    assert tp.__version__ == sven.__version__

    rng = np.random.default_rng(0)
    A, b = rng.standard_normal((20, 5)), rng.standard_normal(20)
    x = tp.lstsq(A, b)
    assert isinstance(x, np.ndarray) and np.allclose(x, np.linalg.lstsq(A, b, rcond=None)[0])

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    X = torch.linspace(-1, 1, 16).unsqueeze(1)
    y = torch.sin(3 * X)
    opt = Sven(model.parameters(), lr=0.1, rank=8, rtol=1e-3)
    closure = lambda: ((model(X) - y) ** 2).sum(dim=-1)
    before = float(closure().mean())
    losses = opt.step(closure)
    assert losses.shape == (16,) and float(closure().mean()) < before

    loaded = [m for m in ("matplotlib", "tqdm", "sklearn") if m in sys.modules]
    assert not loaded, loaded

    try:
        import truncpinv.sklearn
    except ImportError as e:
        assert "pip install 'truncpinv-sven[sklearn]'" in str(e), e
    else:
        raise AssertionError("truncpinv.sklearn imported without scikit-learn")
    print("smoke ok", tp.__version__)
""")


@pytest.mark.slow
@pytest.mark.wheel
def test_wheel_installs_and_works_in_a_fresh_venv(tmp_path: Path) -> None:
    """Build the wheel, install it with its core dependencies in a new venv, and use it there.

    The venv does not see this environment's packages (no ``--system-site-packages``);
    torch is pinned to the version running the tests, so that pip takes it from
    its cache or the local wheels instead of downloading another build. About
    a minute, most of it installing torch.
    """
    # Build from a copy holding only what the wheel is made of: no build/ or *.egg-info left in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("truncpinv", "sven"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    t0 = time.perf_counter()
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        cwd=tmp_path,
    )
    assert "deprecat" not in (build.stdout + build.stderr).lower(), build.stderr
    (wheel,) = dist.glob("truncpinv_sven-*.whl")
    assert wheel.name == f"truncpinv_sven-{truncpinv.__version__}-py3-none-any.whl"
    t_build = time.perf_counter() - t0

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(wheel), f"torch=={torch.__version__}"], cwd=tmp_path)
    t_install = time.perf_counter() - t0 - t_build

    freeze = _run([str(python), "-m", "pip", "freeze", "--exclude-editable"], cwd=tmp_path).stdout
    installed = {line.split("==")[0].split(" @ ")[0].lower() for line in freeze.splitlines()}
    assert not installed & {"matplotlib", "tqdm", "scikit-learn"}, freeze
    assert {"truncpinv-sven", "torch", "numpy", "scipy"} <= installed, freeze

    smoke = _run([str(python), "-c", SMOKE], cwd=tmp_path)
    assert smoke.stdout.startswith("smoke ok"), smoke.stdout

    script = venv / "bin" / "sven-bench"
    proc = subprocess.run([str(script), "--quick"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "pip install 'truncpinv-sven[bench]'" in proc.stderr, proc.stderr
    print(f"wheel build {t_build:.1f} s, venv + install {t_install:.1f} s; fresh venv holds:\n{freeze}")
