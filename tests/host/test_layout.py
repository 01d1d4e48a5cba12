"""The layout of ``kvmmem.host``: no import cycle between its modules, none too long.

Every import counts, wherever it is written: at module level, inside ``if
TYPE_CHECKING:`` and inside a function (a function-local import hides a
cycle, it does not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

import kvmmem.host

HOST = Path(kvmmem.host.__file__).parent
PACKAGE = "kvmmem.host"
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(HOST.glob("*.py")):
        name = PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"
        out[name] = path
    return out


def _imports(name: str, source: str, modules: dict[str, Path]) -> set[str]:
    """The host modules ``name`` imports (anywhere in its ``source``)."""
    pkg = PACKAGE if name == PACKAGE else name.rpartition(".")[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        else:
            continue
        deps.update(t for t in targets if t in modules and t != name)
    return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_host() -> None:
    modules = _modules()
    graph = {name: _imports(name, path.read_text(), modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_cycle_detector_sees_type_checking_and_local_imports() -> None:
    modules = {f"{PACKAGE}.a": Path("a.py"), f"{PACKAGE}.b": Path("b.py")}
    src_a = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kvmmem.host.b import X\n"
    src_b = "def f():\n    from kvmmem.host import a\n"
    graph = {f"{PACKAGE}.a": _imports(f"{PACKAGE}.a", src_a, modules),
             f"{PACKAGE}.b": _imports(f"{PACKAGE}.b", src_b, modules)}
    assert graph == {f"{PACKAGE}.a": {f"{PACKAGE}.b"}, f"{PACKAGE}.b": {f"{PACKAGE}.a"}}
    assert _cycles(graph) == [[f"{PACKAGE}.a", f"{PACKAGE}.b"]]


def test_no_host_module_over_800_lines() -> None:
    lines = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}
