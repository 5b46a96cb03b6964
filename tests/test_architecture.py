"""The house rules of the code, checked by reading it (issue 12).

* no import cycle between dynstore's modules (every ``import`` statement
  counts, those inside functions too, so the graph cannot hide one);
* no module reaches another's private names (``from .x import _y``,
  ``obj._y`` on anything but ``self``/``cls``);
* no function takes an untyped ``store`` or ``catalog``;
* the library never imports the command line;
* functions stay short (about 60 lines) unless :data:`LONG` says why.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dynstore"
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "cli").rglob("*.py"))

#: ``name._attr`` uses that reach into a *third-party* library on purpose,
#: each guarded by a test that fails when the library changes.
THIRD_PARTY_PRIVATE = {
    # DuckDB's Arrow scan of a Lance dataset: filter push-down on dictionary
    # columns and row estimates (dynstore/lancescan.py explains both)
    ("lancescan.py", "duckdb._sources"),
    ("lancescan.py", "module._serialize_expression"),
    ("lancescan.py", "serialize._dynstore"),
    ("lancescan.py", "rows._dynstore"),
    # torch has no public probe for bf16 matmul support on CPU
    ("device.py", "mkldnn._is_mkldnn_bf16_supported"),
}

#: Functions allowed beyond MAX_LINES, and why.
MAX_LINES = 60
LONG: dict[str, str] = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "cli":
        parts = ["dynstore", "cli"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names a ``from ... import`` statement may refer to: the module named,
    and its submodules when names are imported from a package (``from . import x``)."""
    if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    subs = [f"{target}.{a.name}" for a in node.names]
    return ([] if node.module is None else [target]) + subs


def _runtime_imports(tree: ast.AST):
    """Import statements that run: those under ``if TYPE_CHECKING:`` only name types."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
            yield node


def _library_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"
        for node in _runtime_imports(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, is_pkg, node)
            else:
                targets = [a.name for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_library_graph()) == []


def test_the_graph_sees_imports_inside_functions():
    graph = _library_graph()
    # store.py imports what it uses at the top; a lazy import would count the same
    assert {"dynstore.catalog", "dynstore.session", "dynstore.refresh"} <= graph["dynstore.store"]


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _imported_names(path: Path) -> set[str]:
    """Every name an import statement of ``path`` names, in the library or not."""
    name, found = _module_name(path), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found.update(_resolve(name, path.name == "__init__.py", node))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            found.update(a.value for a in node.args[:1] if isinstance(a, ast.Constant))
    return found


def test_the_library_never_imports_the_command_line():
    # the command line is not a module of the library graph: look at the import statements
    # themselves; `python -m dynstore` (dynstore/__main__.py) is the command line's entry point
    bad = {_module_name(p): sorted(t for t in _imported_names(p) if t == "dynstore.cli" or t.startswith("dynstore.cli."))
           for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"}
    assert {m: d for m, d in bad.items() if d} == {}


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dynstore")):
            found += [f"{path.name}:{node.lineno} from {node.module} import {a.name}"
                      for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            text = f"{ast.unparse(owner)}.{node.attr}"
            if (path.name, text) in THIRD_PARTY_PRIVATE:
                continue
            found.append(f"{path.name}:{node.lineno} {text}")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reaching_into_private_names(path):
    assert _private_uses(path) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_store_and_catalog_parameters_are_typed(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    untyped = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for a in args.posonlyargs + args.args + args.kwonlyargs:
                if a.arg in ("store", "catalog") and a.annotation is None:
                    untyped.append(f"{path.name}:{node.lineno} {node.name}({a.arg})")
    assert untyped == []


def _long_functions() -> dict[str, int]:
    out = {}
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        mod = _module_name(path)

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        lines = child.end_lineno - child.lineno + 1
                        if lines > MAX_LINES:
                            out[name] = lines
                    walk(child, name)
                else:
                    walk(child, prefix)

        walk(tree, mod)
    return out


def test_functions_are_short():
    long = {name: n for name, n in _long_functions().items() if name not in LONG}
    assert long == {}, f"functions over {MAX_LINES} lines (split them, or say why in LONG): {long}"


def test_long_list_has_no_stale_entries():
    assert set(LONG) <= set(_long_functions())
