"""The package's top-level modules (``fednl.config``, ``fednl.engine``, ``fednl.eval`` ...) import each other without
a cycle.

Every ``import`` / ``from ... import`` in ``src/fednl`` is read with :mod:`ast` (module level and inside functions
alike: a lazy import is still a dependency), except those under ``if TYPE_CHECKING:``, which only name types for
annotations. Each one is an edge between the top-level modules of the importer and the imported module; the graph
must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fednl"

# Edges tolerated while a move is under way, as (importing module prefix, imported top-level). None: a client's
# metrics and the scoring function live in ``fednl.client``, below the engine, and ``fednl.eval`` (evaluation of
# finished runs) sits above it.
PENDING: tuple[tuple[str, str], ...] = ()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top(module: str) -> str:
    """``fednl.engine.wire`` -> ``engine``; ``fednl.config`` -> ``config``; ``fednl`` -> ``fednl``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """``(imported module, line)`` of every fednl import outside ``if TYPE_CHECKING:`` blocks."""
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            out.append((name, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [(m, line) for m, line in out if m == "fednl" or m.startswith("fednl.")]


def import_graph() -> dict[tuple[str, str], list[str]]:
    """``(importer top, imported top)`` -> the import sites (``module:line -> imported``)."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        module = module_name(path)
        for target, line in imports(ast.parse(path.read_text(encoding="utf-8")), module, path.name == "__init__.py"):
            a, b = top(module), top(target)
            if a == b or "fednl" in (a, b):
                continue
            if any(module.startswith(prefix) and b == dst for prefix, dst in PENDING):
                continue
            edges.setdefault((a, b), []).append(f"{module}:{line} -> {target}")
    return edges


def find_cycle(edges: dict[tuple[str, str], list[str]]) -> list[str] | None:
    """One cycle of the graph as a node list ``[a, b, ..., a]``, or ``None``."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def dfs(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in graph.get(v, []):
            if state.get(w) == 1:
                return [*path[path.index(w):], w]
            if w not in state:
                found = dfs(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = dfs(v)
            if found:
                return found
    return None


def test_top_level_modules_import_each_other_without_a_cycle() -> None:
    edges = import_graph()
    cycle = find_cycle(edges)
    if cycle:
        sites = [f"  {a} -> {b}: {', '.join(edges[(a, b)][:3])}" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle " + " -> ".join(cycle) + "\n" + "\n".join(sites))


def test_the_checker_sees_a_cycle_and_skips_type_only_imports() -> None:
    assert find_cycle({("a", "b"): ["x"], ("b", "c"): ["y"], ("c", "a"): ["z"]}) == ["a", "b", "c", "a"]
    assert find_cycle({("a", "b"): ["x"], ("a", "c"): ["y"], ("b", "c"): ["z"]}) is None
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fednl.config import RunConfig\n"
                     "def f():\n    from fednl.engine import wire\nfrom .sibling import x\nfrom ..data import bins\n")
    assert imports(tree, "fednl.eval.metrics", False) == [("fednl.engine", 5), ("fednl.eval.sibling", 6),
                                                          ("fednl.data", 7)]
    assert (top("fednl.engine.wire"), top("fednl.config"), top("fednl")) == ("engine", "config", "fednl")
