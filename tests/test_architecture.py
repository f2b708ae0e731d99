"""The layout rules of the packages: no import cycle, small modules, a small optimizer class.

The import graph is read statically (module-level and function-level
imports), so a cycle hidden in a function body is caught too.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import sven

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 600
MAX_SVEN_CLASS_LINES = 300


def _modules() -> dict[str, tuple[Path, bool]]:
    mods: dict[str, tuple[Path, bool]] = {}
    for pkg in ("sven", "truncpinv"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """``module -> modules it imports`` within the two packages (a package's own ``__init__`` excluded)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, (f, is_pkg) in mods.items():
        base = m.split(".") if is_pkg else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                prefix = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join(prefix + ([node.module] if node.module else []))
                cands = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            for t in cands:
                own_package = mods.get(t, (None, False))[1] and m.startswith(t + ".")
                if t in mods and t != m and not own_package:
                    graph[m].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*stack[stack.index(w) :], w]
            if w not in state and (found := visit(w)) is not None:
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_no_module_is_over_the_size_limit() -> None:
    big = {m: n for m, (f, _) in _modules().items() if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_the_sven_class_stays_small() -> None:
    lines, _ = inspect.getsourcelines(sven.Sven)
    assert len(lines) <= MAX_SVEN_CLASS_LINES, f"sven.Sven has {len(lines)} lines"


def test_every_route_and_policy_is_in_its_package() -> None:
    from sven import control, linearize

    for name in ("GramRoute", "DenseRoute", "MatfreeRoute", "DataParallel", "Linearizer"):
        assert getattr(linearize, name).__module__.startswith("sven.linearize.")
    for name in (
        "Plain",
        "Tikhonov",
        "AdaptiveDamping",
        "CrossEntropyDamping",
        "VariableK",
        "CheckStep",
        "TrustRadius",
    ):
        assert issubclass(getattr(control, name), control.Policy)
