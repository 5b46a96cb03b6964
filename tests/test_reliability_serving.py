"""Serving through damage and change: corrupt files named, encoder changes, memory, small cases.

Each test is one promise of docs/reliability-serving.md: a damaged manifest, data
file or config gives one line naming the file and the way out (never a
traceback, never a silent fall-back); serving goes on through an encoder change;
running out of memory names the setting that bounds it; and the smaller cases
of issue 24 (subquery deletes, Ctrl-C in a deduplicating ingest, error
locations, duplicate headers, serving without reading item texts).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import dynstore
from dynstore.catalog import manifest_versions
from dynstore.cli import main
from dynstore.errors import StoreCorrupt
from store_checks import shop_store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, shop_files):
    """An encoded shop store with two item commits (so a previous commit exists)."""
    path = tmp_path_factory.mktemp("pristine") / "s"
    s = shop_store(path, shop_files)
    s.ingest("items", shop_files / "items.csv")
    s.close()
    return path


@pytest.fixture
def copy(pristine, tmp_path):
    path = tmp_path / "s"
    shutil.copytree(pristine, path)
    return path


def _cli(runner, *args):
    return runner.invoke(main, [str(a) for a in args])


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _latest_manifest(path: Path, dataset: str) -> Path:
    from dynstore.storage import open_storage

    found = manifest_versions(open_storage(path), dataset)
    return path / found[max(found)]


# ---------------------------------------------------------------------------------- damage

@pytest.mark.parametrize("dataset", ["tables/items.lance", "tables/interactions.lance", "versions.lance"])
def test_truncated_manifest_is_named_with_the_way_out(runner, copy, dataset):
    manifest = _latest_manifest(copy, dataset)
    with open(manifest, "r+b") as fh:
        fh.truncate(10)
    line = _one_line_error(_cli(runner, "sql", copy, "SELECT count(*) FROM items"), manifest.name, "damaged")
    assert "backup" in line
    with pytest.raises(StoreCorrupt, match=manifest.name):
        with dynstore.connect(copy) as s:
            s.sql("SELECT count(*) FROM items").fetchall()


def test_the_named_way_out_reopens_the_previous_commit(runner, copy):
    manifest = _latest_manifest(copy, "tables/items.lance")
    manifest.write_bytes(manifest.read_bytes()[:10])
    line = _one_line_error(_cli(runner, "recommend", copy, 1), manifest.name)
    assert "move that file out of _versions/" in line and "version 1" in line
    manifest.rename(copy / "damaged.manifest")  # what the message says to do
    r = _cli(runner, "sql", copy, "SELECT count(*) FROM items", "--format", "csv")
    assert r.exit_code == 0, r.output


def test_damaged_data_file_is_named(runner, copy):
    import lance

    fragment = lance.dataset(copy / "tables/items.lance").get_fragments()[0]
    data = copy / "tables/items.lance/data" / fragment.metadata.files[0].path
    with open(data, "r+b") as fh:
        fh.truncate(100)
    _one_line_error(_cli(runner, "sql", copy, "SELECT max(title) FROM items"), data.name, "damaged data file")
    data.unlink()
    _one_line_error(_cli(runner, "recommend", copy, 1), data.name, "missing")


@pytest.mark.parametrize("text", ["", "format_version = 1\n[rules\n"])
def test_damaged_config_is_named(runner, copy, text):
    (copy / "dynstore.toml").write_text(text)
    _one_line_error(_cli(runner, "sql", copy, "SELECT 1"), "dynstore.toml", "damaged store config", "backup")
