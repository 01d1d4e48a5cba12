"""The layout of ``kvmmem``: no import cycle between its modules, none too long
(issue 12: "No import cycle in src/kvmmem; no module over 800 lines").

Every import counts, wherever it is written: at module level, inside ``if
TYPE_CHECKING:`` and inside a function (a function-local import hides a cycle, it
does not remove it).  The graph is the one ``tests/host/test_layout.py`` draws for
``kvmmem.host``, over every package: an edge goes to the module an import names
(``from kvmmem.realkvm import libc`` -> ``kvmmem.realkvm.libc``; ``from kvmmem.cli
import main`` -> the package ``kvmmem.cli``), relative imports resolved.

The offenders still being fixed are listed in :data:`KNOWN_CYCLES` and
:data:`KNOWN_LONG`.  Those lists can only shrink: an offender not listed fails, and
so does a listed one that is no longer an offender (delete its entry).
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvmmem

SRC = Path(kvmmem.__file__).parent
MAX_LINES = 800

KNOWN_CYCLES: list[list[str]] = [
    # Empty: the arch cycle (pgtable -> validate -> arm64 -> pgtable) and the kvm one
    # (vm -> arches -> arm64/riscv/x86 -> vm ...) issue 12 named are gone (cf5b856,
    # 3b031ce).  An entry is a sorted strongly connected component.
]
"""Import cycles (strongly connected components, sorted) tolerated while they are
being taken apart; each must still be exactly a component of the graph."""

# Empty: kvm/memslot.py (a7986d2), arch/pgtable.py (cf5b856) and explore/search.py were
# split under the limit.  An entry is a module name, e.g. "kvmmem.kvm.memslot".
KNOWN_LONG: frozenset[str] = frozenset()
"""Modules over :data:`MAX_LINES` lines tolerated while they are being split."""


def _modules(root: Path = SRC) -> dict[str, bool]:
    """Every module under ``root`` (the ``kvmmem`` package) -> whether it is a package."""
    out: dict[str, bool] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            out[".".join(parts[:-1])] = True
        else:
            out[".".join(parts)] = False
    return out


def _path(name: str, is_package: bool) -> Path:
    rel = Path(*name.split(".")[1:])
    return SRC / rel / "__init__.py" if is_package else (SRC / rel).with_suffix(".py")


def _imports(name: str, is_package: bool, source: str, modules: dict[str, bool]) -> set[str]:
    """The kvmmem modules ``name`` imports (anywhere in its ``source``)."""
    pkg = name if is_package else name.rpartition(".")[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                # ``import a.b.c`` names the module a.b.c (its longest known prefix)
                known = [".".join(parts[:i]) for i in range(len(parts), 0, -1)
                         if ".".join(parts[:i]) in modules]
                targets.extend(known[:1])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        deps.update(t for t in targets if t in modules and t != name)
    return deps


def _graph(modules: dict[str, bool]) -> dict[str, set[str]]:
    return {name: _imports(name, pkg, _path(name, pkg).read_text(), modules)
            for name, pkg in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each
    sorted, in order of their first module."""
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
    return sorted(out)


def test_no_import_cycle() -> None:
    found = _cycles(_graph(_modules()))
    new = [c for c in found if not any(set(c) <= set(k) for k in KNOWN_CYCLES)]
    assert not new, f"import cycles not in KNOWN_CYCLES (break them): {new}"
    # a known cycle that is gone, or only part of it left: the list must follow
    assert found == sorted(KNOWN_CYCLES), (
        f"KNOWN_CYCLES is out of date (it may only shrink): the cycles are now {found}")


def test_no_module_over_800_lines() -> None:
    lines = {name: len(_path(name, pkg).read_text().splitlines())
             for name, pkg in _modules().items()}
    over = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not over.keys() - KNOWN_LONG, (
        f"modules over {MAX_LINES} lines: {dict(sorted(over.items()))}")
    fixed = sorted(KNOWN_LONG - over.keys())
    assert not fixed, f"KNOWN_LONG entries no longer over {MAX_LINES} lines (delete them): {fixed}"


def test_every_module_is_found() -> None:
    """The walk sees subpackages and their modules (and nothing outside kvmmem)."""
    modules = _modules()
    for name in ("kvmmem", "kvmmem.cli", "kvmmem.host.mm", "kvmmem.scenario.loader",
                 "kvmmem.realkvm.harness"):
        assert name in modules
    assert all(n == "kvmmem" or n.startswith("kvmmem.") for n in modules)
    assert all(_path(n, p).is_file() for n, p in modules.items())


def test_cycle_detector_sees_type_checking_local_and_relative_imports() -> None:
    modules = {"kvmmem.p": True, "kvmmem.p.a": False, "kvmmem.p.b": False,
               "kvmmem.p.c": False, "kvmmem.q": False}
    sources = {
        "kvmmem.p": "from . import a\n",
        "kvmmem.p.a": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from kvmmem.p.b import X\n"),
        "kvmmem.p.b": "def f():\n    import kvmmem.p.c\n",
        "kvmmem.p.c": "from .. import q\nfrom . import a as _\nfrom .a import Y\n",
        "kvmmem.q": "from kvmmem.p import thing\n",
    }
    graph = {n: _imports(n, modules[n], src, modules) for n, src in sources.items()}
    assert graph == {"kvmmem.p": {"kvmmem.p.a"}, "kvmmem.p.a": {"kvmmem.p.b"},
                     "kvmmem.p.b": {"kvmmem.p.c"}, "kvmmem.p.c": {"kvmmem.q", "kvmmem.p.a"},
                     "kvmmem.q": {"kvmmem.p"}}
    assert _cycles(graph) == [["kvmmem.p", "kvmmem.p.a", "kvmmem.p.b", "kvmmem.p.c",
                               "kvmmem.q"]]
    assert _cycles({"kvmmem.a": {"kvmmem.b"}, "kvmmem.b": set()}) == []
