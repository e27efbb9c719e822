"""The shape of the code, checked: no import cycle between the product's modules (counting the
imports inside functions too, which run later but still tie two modules together), and no
module of the pure work over 400 lines without the reason written at its top."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "service", "infra")
MAX_LINES = 400
# A long module says why at its top, in a line that starts with this.
LONG_REASON = "Longer than 400 lines because"
# Being split up now; this list only shrinks.
BEING_SPLIT: set[str] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The product modules that ``path`` imports anywhere (top level or inside a function);
    ``from pkg import name`` counts as ``pkg.name`` where that is a module."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _type_checking_only(node)
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in modules:
                    found.add(sub)
                elif node.module in modules:
                    found.add(node.module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path: Path) -> None:
    """The check itself can fail: a function-level import closing a loop is a cycle."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "a.py").write_text("import p.b\n")
    (pkg / "b.py").write_text("def f():\n    from p import a\n    return a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.a\n"
    )
    modules = {"p.a": pkg / "a.py", "p.b": pkg / "b.py", "p.c": pkg / "c.py"}
    graph = {name: imports_of(path, modules) for name, path in modules.items()}
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": set()}  # type-only: not an edge
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set()}) is None


def test_no_import_cycle_eager_or_lazy() -> None:
    modules = product_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    assert find_cycle(graph) is None


def test_long_modules_say_why() -> None:
    too_long = []
    for name, path in product_modules().items():
        if not name.startswith("tasks") or name in BEING_SPLIT:
            continue
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(
            line.strip().startswith(LONG_REASON) for line in lines[:40]
        ):
            too_long.append(f"{name}: {len(lines)} lines")
    assert too_long == []
