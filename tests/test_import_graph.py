"""The import graph of invcoss_core, server and site_client has no circle, not even one hidden in a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("invcoss_core", "server", "site_client")


def _module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of `packages` under `root`."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import that can run: module level and inside functions (a lazy import still closes a circle).

    Only `if TYPE_CHECKING:` blocks are left out: they never run.
    """
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))
    return found


def _ancestry(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules its import runs, including the packages Python initialises on the way.

    `import a.b.c` runs `a/__init__`, `a/b/__init__` and `a/b/c`; the packages the importer itself sits in are
    already under way and are no edge.
    """
    modules = _module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] in packages:
                    edges |= {m for m in _ancestry(target) - _ancestry(name) if m in modules}
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as a list of modules (first == last), or None."""
    on_path: set[str] = set()
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        on_path.add(node)
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_packages_have_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 50, "the walk found too few modules: is ROOT right?"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_walk_sees_the_packages_an_import_initialises() -> None:
    graph = import_graph()
    # stage.py imports the replay package; importing it runs invcoss_core/replay/__init__.py first.
    assert "invcoss_core.replay" in graph["invcoss_core.training.stage"]
    assert "invcoss_core.seeding" in graph["invcoss_core.training.stage"]
    assert "invcoss_core.training" not in graph["invcoss_core.training.stage"]


def test_a_circle_hidden_in_a_function_import_is_found(tmp_path: Path) -> None:
    # The shape this test was written against: p.a takes a helper from q.b, whose package imports p.a lazily.
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    (tmp_path / "p" / "__init__.py").write_text("")
    (tmp_path / "p" / "a.py").write_text("from q.b import helper\n")
    (tmp_path / "q" / "__init__.py").write_text("def pick():\n    from p.a import thing\n    return thing\n")
    (tmp_path / "q" / "b.py").write_text("from . import pick\n")
    graph = import_graph(tmp_path, ("p", "q"))
    assert find_cycle(graph) == ["p.a", "q", "p.a"]
    (tmp_path / "q" / "__init__.py").write_text("")
    assert find_cycle(import_graph(tmp_path, ("p", "q"))) is None


def test_type_checking_imports_are_no_edge(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "__init__.py").write_text("")
    (tmp_path / "p" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import x\n")
    (tmp_path / "p" / "b.py").write_text("from p.a import y\n")
    assert find_cycle(import_graph(tmp_path, ("p",))) is None
