"""The layout's rules (docs/architecture.md), measured on the source: no import cycle among the library's modules
(lazy imports included), no function body over 80 lines, at most 12 modules directly in capmerge/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"capmerge": ROOT / "capmerge", "capmerge.kernels": ROOT / "kernels", "capmerge.recipes": ROOT / "recipes"}
MAX_BODY = 80
MAX_ROOT_MODULES = 12


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, base in PACKAGES.items():
        for p in base.rglob("*.py"):
            rel = p.relative_to(base)
            if pkg == "capmerge" and rel.parts[0] in ("kernels", "recipes"):
                continue  # the symlinks: counted under their own names
            parts = [x for x in rel.with_suffix("").parts if x != "__init__"]
            mods[".".join([pkg, *parts])] = p
    return mods


def _target(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module → the library modules it imports anywhere in its body (a package's ``__init__`` counts as itself)."""
    mods = _modules()
    known = {**mods, "capmerge._native": Path()}  # the C extension: a leaf
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = m if is_pkg else m.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for n in names:
                t = _target(n, known)
                if t and t != m and t in mods:
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def long_functions() -> list[tuple[int, str]]:
    """(body lines without the docstring, qualified name) of every function over MAX_BODY lines."""
    found = []
    for m, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
                n = node.end_lineno - body[0].lineno + 1  # type: ignore[operator]
                if n > MAX_BODY:
                    found.append((n, f"{m}.{node.name}"))
    return sorted(found, reverse=True)


def test_the_graph_sees_known_edges() -> None:
    """The scanner finds edges that exist (a lazy import included): an empty cycle list means something."""
    g = import_graph()
    assert "capmerge.io.checkpoint" in g["capmerge.io.open"]
    assert "capmerge.io.lora" in g["capmerge.io.open"]  # imported inside a function
    assert "capmerge.merge.compute" in g["capmerge.kernels.dispatch"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_dispatch_depends_on_compute_never_the_reverse() -> None:
    g = import_graph()
    assert not any(m.startswith("capmerge.kernels") for m in g["capmerge.merge.compute"])


def test_no_function_over_80_lines() -> None:
    assert long_functions() == []


def test_at_most_12_modules_directly_in_capmerge() -> None:
    root = sorted(p.name for p in (ROOT / "capmerge").glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root
