"""The README documents the command line that `dynstore --help` describes (as sqlite-utils' test_docs.py).

Every command has a ``#### `dynstore COMMAND` `` section in the README that
names each of its options and shows an example, and every command's own
``--help`` has examples.
"""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dynstore.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
COMMANDS = sorted(main.commands)


def _section(name: str) -> str:
    m = re.search(rf"^#### `dynstore {re.escape(name)}`\n(.*?)(?=^#{{2,4}} )", README, re.M | re.S)
    assert m, f"README has no '#### `dynstore {name}`' section"
    return m.group(1)


def test_every_command_in_help_is_in_the_readme():
    listed = CliRunner().invoke(main, ["--help"]).output
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", listed, re.M), f"{name} missing from dynstore --help"
        _section(name)
    documented = set(re.findall(r"^#### `dynstore (\S+)`", README, re.M))
    assert documented == set(COMMANDS), documented ^ set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_documented(name):
    section = _section(name)
    cmd = main.commands[name]
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        for flag in param.opts + param.secondary_opts:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", section), \
                f"README's dynstore {name} section does not mention {flag}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_an_example(name):
    section = _section(name)
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert any(line.startswith(f"dynstore {name}") for b in blocks for line in b.splitlines()), \
        f"README's dynstore {name} section has no example"
    help_text = CliRunner().invoke(main, [name, "--help"]).output
    assert "Examples:" in help_text and f"dynstore {name}" in help_text.split("Examples:")[1]


def test_code_map_lists_every_module_in_dependency_order():
    """The README's code map names each library module once, and no module imports one listed below it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_architecture import _library_graph

    section = README.split("### Code map", 1)[1].split("\n## ", 1)[0]
    listed = [f"dynstore.{n}"
              for n in re.findall(r"^\| `([\w.]+)` \|", section, re.M)]
    graph = _library_graph()
    modules = {m for m in graph if m not in ("dynstore", "dynstore.__main__")}
    assert sorted(set(listed)) == sorted(modules), set(listed) ^ modules
    assert len(listed) == len(set(listed))
    position = {m: n for n, m in enumerate(listed)}
    later = [(m, d) for m in listed for d in graph[m] if d in position and position[d] > position[m]]
    assert later == [], f"imports of modules listed further down: {later}"
