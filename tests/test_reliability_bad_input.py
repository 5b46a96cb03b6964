"""Bad input, generated and hand-picked: one line naming file, row and column; nothing changes.

Every case is ingested into the same encoded store; after each, the full
contents of every table and the registry are compared with those before,
and so are the datasets' Lance versions (a refused ingest must not even
commit an empty version). Hypothesis corrupts one cell of a valid CSV with a
value its column cannot hold; the hand-picked corpus covers files that are
wrong as a whole. A sample goes through the real ``dynstore ingest`` in a
subprocess: exit 1, one ``Error:`` line, no traceback.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynstore
from dynstore.errors import DynstoreError
from store_checks import contents, shop_store


@pytest.fixture(scope="module")
def shop(tmp_path_factory, shop_files):
    return shop_store(tmp_path_factory.mktemp("bad") / "s", shop_files)


@pytest.fixture(scope="module")
def before(shop):
    return contents(shop.path), shop.snapshot()


def _refused(shop, before, kind, source, pattern, **options) -> str:
    with pytest.raises(DynstoreError) as info:
        shop.ingest(kind, source, **options)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert re.search(pattern, msg), f"{msg!r} does not match {pattern!r}"
    assert shop.snapshot() == before[1], "a refused ingest committed a dataset version"
    assert contents(shop.path) == before[0], "a refused ingest changed the store"
    return msg


HEADER = ["user_id", "item_id", "ts", "event", "value"]
#: per column: (bad cell, what the message must say)
BAD_CELLS = {
    "user_id": [("bob", r"bob is not an integer id"), ("", r"missing \(NULL\) id"),
                ("1180591620717411303424", r"outside the 64-bit integer range"), ("2.5", r"not an integer id")],
    "item_id": [("x7", r"x7 is not an integer id"), ("-99999999999999999999", r"outside the 64-bit")],
    "ts": [("yesterday", r"yesterday is not a timestamp"), ("2999-01-01", r"more than a day after the ingest"),
           ("", r"missing \(NULL\) timestamp"), ("2025-13-45", r"is not a timestamp"),
           ("99999999999", r"more than a day after the ingest")],
    "value": [("nan", r"nan is not a finite number"), ("inf", r"inf(inity)? is not a finite number"),
              ("-Infinity", r"is not a finite number"), ("lots", r"lots is not a number")],
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_one_bad_cell_names_row_and_column(shop, before, tmp_path_factory, data):
    n = data.draw(st.integers(1, 40), label="rows")
    rows = [[str(1 + i % 60), str(1 + i % 80), f"2025-05-{1 + i % 28:02d} 10:{i % 60:02d}:00", "click", "1"]
            for i in range(n)]
    col = data.draw(st.sampled_from(HEADER[:3] + ["value"]), label="column")
    cell, says = data.draw(st.sampled_from(BAD_CELLS[col]), label="cell")
    row = data.draw(st.integers(1, n), label="row")
    rows[row - 1][HEADER.index(col)] = cell
    path = tmp_path_factory.mktemp("cell") / "events.csv"
    path.write_text("\n".join([",".join(HEADER)] + [",".join(r) for r in rows]) + "\n")
    _refused(shop, before, "interactions", path, rf"events\.csv: row {row}, column {col}: .*{says}")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["label", "__bad", "__x", "_dynstore_internal", "LABEL"]), kind=st.sampled_from(
    ["interactions", "items", "users"]))
def test_reserved_columns(shop, before, name, kind):
    if name.lower() == "label" and kind != "interactions":
        return  # items and users have no derived label
    base = {"interactions": {"user_id": [1], "item_id": [2], "ts": ["2025-01-01"]},
            "items": {"item_id": [1]}, "users": {"user_id": [1]}}[kind]
    msg = _refused(shop, before, kind, pa.table({**base, name: ["x"]}), rf"column {re.escape(name)} is reserved")
    assert "--map" in msg


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_ragged_rows(shop, before, tmp_path_factory, data):
    n = data.draw(st.integers(2, 30))
    rows = [f"{1 + i % 60},{1 + i % 80},2025-05-01" for i in range(n)]
    r = data.draw(st.integers(1, n))
    extra = data.draw(st.sampled_from([",extra", ",a,b", ""]))
    rows[r - 1] = rows[r - 1] + extra if extra else rows[r - 1].rsplit(",", 1)[0]
    path = tmp_path_factory.mktemp("rag") / "events.csv"
    path.write_text("user_id,item_id,ts\n" + "\n".join(rows) + "\n")
    _refused(shop, before, "interactions", path, rf"events\.csv: row {r} \(line {r + 1}\) has \d fields, the header has 3")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(min_size=1, max_size=600), ext=st.sampled_from(["csv", "parquet", "json", "tsv"]))
def test_binary_garbage(shop, before, tmp_path_factory, blob, ext):
    path = tmp_path_factory.mktemp("bin") / f"junk.{ext}"
    path.write_bytes(b"\x00\xff" + blob)
    _refused(shop, before, "interactions", path, r"junk\.\w+: ")


def _corpus(tmp):
    """(kind, source, pattern) for files wrong as a whole."""
    (tmp / "empty.csv").write_bytes(b"")
    (tmp / "header.csv").write_text("user_id,item_id,ts\n")
    (tmp / "adir").mkdir()
    (tmp / "latin1.csv").write_bytes(b"item_id,title\n1,ok\n2,caf\xe9\n")
    (tmp / "nocol.csv").write_text("user,item_id,ts\n1,2,2025-01-01\n")
    (tmp / "events.xlsx").write_bytes(b"PK\x03\x04")
    deep = ["user_id,item_id,ts"] + [f"{i % 60 + 1},{i % 80 + 1},2025-01-01" for i in range(30000)]
    deep[25001] = "7,abc,2025-01-01"
    (tmp / "deep.csv").write_text("\n".join(deep) + "\n")
    future = dt.datetime.now() + dt.timedelta(days=3)
    return [
        ("interactions", tmp / "empty.csv", r"empty\.csv: the file is empty \(0 bytes\)"),
        ("interactions", tmp / "header.csv", r"header\.csv: has a header but no rows"),
        ("interactions", tmp / "adir", r"adir: is a directory"),
        ("interactions", tmp / "nothing-*.csv", r"nothing-\*\.csv: no file matches this pattern"),
        ("interactions", tmp / "missing.csv", r"missing\.csv: no such file"),
        ("items", tmp / "latin1.csv", r"latin1\.csv: .*row 2 \(line 3\), column title: text is not UTF-8"),
        ("interactions", tmp / "nocol.csv", r"nocol\.csv: missing required column user_id"),
        ("interactions", tmp / "events.xlsx", r"events\.xlsx: cannot tell the format"),
        ("interactions", tmp / "deep.csv", r"deep\.csv: row 25001 \(line 25002\), column item_id"),
        ("interactions", pa.table({"user_id": [1], "item_id": [2], "ts": pa.array([future], pa.timestamp("us"))}),
         r"<arrow table>: row 1, column ts: .* more than a day after the ingest"),
        ("interactions", pa.table({"user_id": [1, 2], "item_id": [2, 3], "ts": ["2025-01-01"] * 2,
                                   "value": [1.0, float("nan")]}), r"row 2, column value: nan is not a finite"),
        ("users", pa.table({"user_id": pa.array([], pa.int64())}), r"<arrow table>: has no rows"),
        ("interactions", [tmp / "header.csv", tmp / "deep.csv"], r"header\.csv: has a header but no rows"),
    ]


def test_corpus_of_bad_files(shop, before, tmp_path):
    for kind, source, pattern in _corpus(tmp_path):
        _refused(shop, before, kind, source, pattern)


def test_pandas_mixed_types(shop, before):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"user_id": [1, 2, "u3"], "item_id": [1, 2, 3], "ts": ["2025-01-01"] * 3})
    _refused(shop, before, "interactions", df, r"<pandas DataFrame>: row 3, column user_id: 'u3' is a str")


def test_future_timestamps_kept_on_request(tmp_path):
    s = dynstore.init(tmp_path / "s", model="fake")
    out = s.ingest("interactions", pa.table({"user_id": [1, 1], "item_id": [2, 3],
                                             "ts": ["2025-01-01", "2999-01-01"]}), allow_future=True)
    assert out.rows == 2


def test_cli_refuses_in_one_line(shop, before, tmp_path):
    """The same refusals through the real command line: exit 1, one line, no traceback."""
    corpus = [c for c in _corpus(tmp_path) if not isinstance(c[1], (pa.Table, list))]
    (tmp_path / "label.csv").write_text("user_id,item_id,ts,label\n1,2,2025-01-01,good\n")
    corpus.append(("interactions", tmp_path / "label.csv", r"column label is reserved.*--map user_label=label"))
    env = dict(os.environ, LANCE_LOG="error")
    for kind, source, pattern in corpus[:8] + corpus[-1:]:
        proc = subprocess.run([sys.executable, "-m", "dynstore", "ingest", str(shop.path), kind, str(source)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 1, (source, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
        assert "Traceback" not in proc.stderr and re.search(pattern, lines[0]), lines[0]
    assert contents(shop.path) == before[0] and shop.snapshot() == before[1]


@pytest.mark.parametrize("cell", ["inf", "-inf", "infinity"])
def test_a_lone_infinite_value_is_judged_as_a_number(shop, before, tmp_path, cell):
    """DuckDB's sniffer reads a column holding only "inf" as DATE 'infinity'."""
    path = tmp_path / "events.csv"
    path.write_text(",".join(HEADER) + f"\n1,1,2025-05-01 10:00:00,click,{cell}\n")
    _refused(shop, before, "interactions", path, r"events\.csv: row 1, column value: .*is not a finite number")
