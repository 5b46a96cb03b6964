"""The house rules of the code, checked by reading it (issues 12 and 25).

* no import cycle between dynstore's modules (every ``import`` statement
  counts, those inside functions and under ``if TYPE_CHECKING:`` too, so the
  graph cannot hide one);
* arrows between the wings point down only (:data:`WINGS`), and the top level
  holds at most :data:`MAX_TOP_LEVEL` modules;
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
SQL = ROOT / "sql"  # installed as dynstore.sql: the SQL wing
LIBRARY = sorted(PACKAGE.rglob("*.py")) + sorted(SQL.rglob("*.py"))
SOURCES = LIBRARY + sorted((ROOT / "cli").rglob("*.py"))

#: The wings, bottom first: a module may import its own wing, the wings below
#: it and the top-level helpers (:data:`HELPERS`); nothing above.
WINGS = ["storage", "engines", "encoders", "data", "model", "versions", "serving", "sql"]
#: Top-level modules every wing may use: they import no wing themselves.
HELPERS = {"errors", "lazy", "memory", "formatting", "results", "sqltext"}
MAX_TOP_LEVEL = 12

#: ``name._attr`` uses that reach into a *third-party* library on purpose,
#: each guarded by a test that fails when the library changes.
THIRD_PARTY_PRIVATE = {
    # DuckDB's Arrow scan of a Lance dataset: filter push-down on dictionary
    # columns and row estimates (dynstore/storage/lancescan.py explains both)
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
    if parts[0] in ("cli", "sql"):
        parts = ["dynstore", parts[0]] + parts[1:]
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


def _imports(tree: ast.AST):
    """Every import statement, type-only ones (``if TYPE_CHECKING:``) included:
    a type names a dependency as much as a call does."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _library_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in LIBRARY}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"
        for node in _imports(tree):
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
    assert {"dynstore.storage.catalog", "dynstore.sql.session", "dynstore.versions.refresh"} <= graph["dynstore.store"]


def _wing(module: str) -> str | None:
    """The wing of ``dynstore.<wing>.x``; None for the top level (helpers and the façade)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS) else None


def _arrows_against_the_wings(graph: dict[str, set[str]]) -> list[str]:
    rank = {w: i for i, w in enumerate(WINGS)}
    bad = []
    for src, targets in graph.items():
        ws = _wing(src)
        top_name = src.split(".")[1] if src.count(".") == 1 else None
        for dst in sorted(targets):
            wd = _wing(dst)
            if wd is None:
                if dst.split(".")[-1] in HELPERS or dst == "dynstore":
                    if dst == "dynstore" and ws is not None:
                        bad.append(f"{src} -> {dst}")  # the package's façade sits on top
                    continue
                if ws is not None or top_name in HELPERS:
                    bad.append(f"{src} -> {dst}")  # a wing or a helper reaching the façade layer
            elif ws is None:
                if top_name in HELPERS:
                    bad.append(f"{src} -> {dst}")  # helpers import no wing
            elif rank[wd] > rank[ws]:
                bad.append(f"{src} -> {dst}")
    return bad


def test_arrows_between_wings_point_down():
    assert _arrows_against_the_wings(_library_graph()) == []


def test_the_wing_check_finds_an_upward_arrow():
    graph = {"dynstore.storage.catalog": {"dynstore.serving.state"}, "dynstore.serving.state": {"dynstore.storage.catalog"},
             "dynstore.errors": {"dynstore.storage.catalog"}, "dynstore.store": {"dynstore.serving.state"}}
    assert _arrows_against_the_wings(graph) == ["dynstore.storage.catalog -> dynstore.serving.state",
                                               "dynstore.errors -> dynstore.storage.catalog"]


def test_every_wing_says_what_it_owns_and_may_import():
    for wing in WINGS:
        init = (SQL if wing == "sql" else PACKAGE / wing) / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "May import" in doc or "may import" in doc, f"{init}: say what the wing may import"


def test_the_top_level_is_small():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top
    wings = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert wings == set(WINGS) - {"sql"}


def test_type_only_imports_count():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dynstore.store import Store\n")
    assert [ast.unparse(n) for n in _imports(tree)][-1] == "from dynstore.store import Store"


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
           for p in LIBRARY if p.name != "__main__.py"}
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
