"""The documentation describes what the code does (as sqlite-utils' test_docs.py).

README.md is the short user guide; docs/*.md the reference. Every command has a
``## `dynstore COMMAND` `` section (docs/cli.md) with an example, every option is
named in its command's section (or in a docs paragraph that names the command),
every command's ``--help`` has examples, docs/internals.md's code map lists every
module, and every SQL example of the README runs on a store with integer ids and
on one with string ids.
"""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dynstore.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))}
ALL_DOCS = "\n\n".join([README, *DOCS.values()])
COMMANDS = sorted(main.commands)


def _section(name: str) -> str:
    m = re.search(rf"^(#{{2,4}}) `dynstore {re.escape(name)}`\n(.*?)(?=^#{{1,4}} |\Z)", ALL_DOCS, re.M | re.S)
    assert m, f"docs have no '## `dynstore {name}`' section"
    return m.group(2)


def _mentions(name: str) -> str:
    """The command's section and every docs paragraph that names `dynstore NAME`."""
    paragraphs = [p for p in re.split(r"\n\s*\n", ALL_DOCS) if re.search(rf"dynstore {re.escape(name)}(?![\w-])", p)]
    return "\n\n".join([_section(name), *paragraphs])


def test_readme_is_short_and_links_the_docs():
    assert len(README.splitlines()) <= 350
    for name in DOCS:
        assert f"docs/{name}" in README, f"README does not link docs/{name}"


def test_every_command_in_help_is_documented():
    listed = CliRunner().invoke(main, ["--help"]).output
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", listed, re.M), f"{name} missing from dynstore --help"
        _section(name)
        assert f"dynstore {name}" in README, f"README does not mention dynstore {name}"
    documented = set(re.findall(r"^#{2,4} `dynstore (\S+)`", ALL_DOCS, re.M))
    assert documented == set(COMMANDS), documented ^ set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_documented(name):
    text = _mentions(name)
    cmd = main.commands[name]
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        for flag in param.opts + param.secondary_opts:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                f"the docs' dynstore {name} section does not mention {flag}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_an_example(name):
    section = _section(name)
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert any(line.startswith(f"dynstore {name}") for b in blocks for line in b.splitlines()), \
        f"the docs' dynstore {name} section has no example"
    help_text = CliRunner().invoke(main, [name, "--help"]).output
    assert "Examples:" in help_text and f"dynstore {name}" in help_text.split("Examples:")[1]


def test_code_map_lists_every_module_in_dependency_order():
    """docs/internals.md's code map names each library module once, and no module imports one listed below it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_architecture import _library_graph

    section = DOCS["internals.md"].split("## Code map", 1)[1].split("\n## ", 1)[0]
    listed = [f"dynstore.{n}"
              for n in re.findall(r"^\| `([\w.]+)` \|", section, re.M)]
    graph = _library_graph()
    modules = {m for m in graph if m not in ("dynstore", "dynstore.__main__")}
    assert sorted(set(listed)) == sorted(modules), set(listed) ^ modules
    assert len(listed) == len(set(listed))
    position = {m: n for n, m in enumerate(listed)}
    later = [(m, d) for m in listed for d in graph[m] if d in position and position[d] > position[m]]
    assert later == [], f"imports of modules listed further down: {later}"


# --- the README's SQL examples, on integer ids and on string ids -----------------------
# The README writes a user as 42 (or 'u-42' where it shows string ids) and an item as 7
# (or 'sku-7'); each example is run on both stores with the ids written the store's way.
_USER_FUNCS = r"recommend|recommendations|recommend_among|user_vector|log_impressions|score"
_ITEM_FUNCS = r"similar_items|item_vector|semantic_vector"


def _as_int_ids(sql: str) -> str:
    return re.sub(r"'(?:u|sku)-(\d+)'", r"\1", sql)


def _as_string_ids(sql: str) -> str:
    sql = _as_int_ids(sql)
    sql = re.sub(rf"\b({_USER_FUNCS})\((\d+)\b", r"\1('u-\2'", sql)
    sql = re.sub(r"\bscore\(('u-\d+'), (\d+)\)", r"score(\1, 'sku-\2')", sql)
    sql = re.sub(rf"\b({_ITEM_FUNCS})\((\d+)\b", r"\1('sku-\2'", sql)
    return re.sub(r"\[(\d+(?:, \d+)*)\]", lambda m: "[" + ", ".join(f"'sku-{i}'" for i in m.group(1).split(", ")) + "]", sql)


def _readme_sql() -> list[str]:
    from dynstore.sqltext import statements

    found = [s for block in re.findall(r"```sql\n(.*?)```", README, re.S) for s in statements(block)]
    found += re.findall(r'dynstore sql \S+ "([^"$]+)"', README)
    return found


def test_readme_has_sql_examples():
    examples = _readme_sql()
    assert len(examples) >= 8
    assert any("recommend(" in s for s in examples) and any("'u-42'" in s for s in examples)


@pytest.fixture(scope="module")
def id_stores(tmp_path_factory, shop_frames):
    import polars as pl

    import dynstore
    from dynstore.demo import DEMO_RULES

    def string_ids(frame: pl.DataFrame) -> pl.DataFrame:
        cols = [(pl.lit(p) + pl.col(c).cast(pl.Utf8)).alias(c)
                for c, p in (("user_id", "u-"), ("item_id", "sku-")) if c in frame.columns]
        return frame.with_columns(cols)

    stores = {}
    for kind, convert in (("int", lambda f: f), ("string", string_ids)):
        s = dynstore.init(tmp_path_factory.mktemp(kind) / "shop", model="fake:32", **DEMO_RULES)
        for table in ("users", "items", "interactions"):
            s.ingest(table, convert(shop_frames[table]))
        s.encode()
        stores[kind] = s
    yield stores
    for s in stores.values():
        s.close()


@pytest.mark.parametrize("kind", ["int", "string"])
def test_every_readme_sql_example_runs(id_stores, kind):
    from dynstore.sql.session import SqlSession

    convert = _as_int_ids if kind == "int" else _as_string_ids
    with SqlSession(id_stores[kind]) as session:
        for example in _readme_sql():
            sql = convert(example)
            results = list(session.run_all(sql))
            assert results, sql
            if "recommend" in sql and "LIMIT" not in sql and "versions" not in sql:
                assert results[-1].rows, f"no rows from {sql!r} on the {kind}-id store"
