"""The shape of the code: no import circles between bespoke's modules, no module too long, no
function of the distillation package too long (issue 35, "Keep the house livable").

The import graph is read from the source with :mod:`ast` (nothing is imported): every
``import bespoke.x``, ``from bespoke.x import y``, ``from bespoke import x`` and relative import,
at module level or inside a function, is an edge; imports under ``if TYPE_CHECKING:`` are not
(they never run). ``from bespoke.pkg import name`` points at ``bespoke.pkg.name`` when that is a
module, else at the package ``bespoke.pkg`` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bespoke"
MAX_MODULE_LINES = 650
MAX_FUNCTION_LINES = 80  # in bespoke/distill/: def line to the last line of the body, docstring included
SHORT_FUNCTIONS = PACKAGE / "distill"


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module under ``package``, by dotted name (a package by its ``__init__.py``)."""
    return {_module_name(p): p for p in sorted(package.rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """The Import / ImportFrom nodes of ``tree``, at any depth, skipping ``if TYPE_CHECKING:`` bodies."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The innermost module of ours that ``name`` (dotted) names or lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(known: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """``{module: modules of bespoke it imports}``."""
    known = modules() if known is None else known
    graph: dict[str, set[str]] = {}
    for mod, path in known.items():
        is_package = path.name == "__init__.py"
        here = mod if is_package else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1
                    anchor = here.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                         for alias in node.names]
            targets |= {t for t in (_resolve(n, known) for n in names) if t is not None and t != mod}
        graph[mod] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _path_in(component: list[str], graph: dict[str, set[str]]) -> str:
    """One circle through ``component``, spelled ``a -> b -> a``."""
    members, start = set(component), component[0]
    # breadth first from start's successors back to start, inside the component
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [start]
                    while node != start:
                        path.append(node)
                        node = prev[node]
                    return " -> ".join([start, *reversed(path[1:]), start])
                if child not in prev:
                    prev[child] = node
                    nxt.append(child)
        frontier = nxt
    return " -> ".join(component)


def test_the_graph_reader_sees_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "bespoke"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bespoke import c\n"
                              "import bespoke.sub.b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from bespoke.a import g\n")
    (pkg / "c.py").write_text("from bespoke import a\n")
    known = {_module_name(p, tmp_path): p for p in pkg.rglob("*.py")}
    graph = import_graph(known)
    assert graph["bespoke.a"] == {"bespoke.sub.b"}  # the TYPE_CHECKING import is not an edge
    assert graph["bespoke.sub"] == {"bespoke.sub.b"}
    assert cycles(graph) == [["bespoke.a", "bespoke.sub.b"]]
    assert _path_in(cycles(graph)[0], graph) == "bespoke.a -> bespoke.sub.b -> bespoke.a"


def test_no_module_of_bespoke_imports_itself_round_a_circle():
    graph = import_graph()
    assert "bespoke.pipeline" in graph and graph["bespoke.pipeline"]  # the reader found the package
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(_path_in(c, graph) for c in found)


def test_no_module_of_bespoke_is_over_650_lines():
    long = {mod: n for mod, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_of_bespoke_distill_is_over_80_lines():
    assert SHORT_FUNCTIONS.is_dir(), "bespoke/distill/ is a package"
    long = {}
    for path in sorted(SHORT_FUNCTIONS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
