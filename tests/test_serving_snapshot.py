"""Serving snapshots: a new reader serves from the file a writer keeps beside the version,
bit for bit as from a build, and never trusts one that does not fit or does not read whole."""
from __future__ import annotations

import datetime as dt
import os

import polars as pl
import pytest

import dynstore
from dynstore.serving import state as serving
from dynstore.serving.snapshot import snapshot_name


@pytest.fixture
def trained(encoded):
    """The tiny shop with a trained version (dynamic and segment terms) and its snapshot."""
    encoded.refresh(since="all", epochs=1, force=True)
    return encoded


def _users(store) -> list:
    ids = [r[0] for r in store.sql("SELECT DISTINCT user_id FROM interactions ORDER BY 1").fetchall()]
    return ids[:: max(1, len(ids) // 12)] + [424242]  # and an unknown user: the cold-start list


def _lists(path, users, *, builds: list | None = None, monkeypatch=None) -> list:
    """Every user's top 10 (ids and scores) from a new reader; ``builds`` counts state builds."""
    if builds is not None:
        monkeypatch.setattr(serving, "_build", lambda *a, _f=serving._build: builds.append(1) or _f(*a))
    with dynstore.connect(path, read_only=True) as reader:
        out = [[(r["item_id"], r["score"]) for r in reader.recommend(u, 10)] for u in users]
    if builds is not None:
        monkeypatch.undo()
    return out


def _built(path, users) -> list:
    """The lists of a reader that builds the state (the snapshot set aside, then put back)."""
    snap = os.path.join(path, snapshot_name(_current(path)))
    os.rename(snap, snap + ".aside")
    try:
        return _lists(path, users)
    finally:
        os.rename(snap + ".aside", snap)


def _current(path) -> int:
    with dynstore.connect(path, read_only=True) as reader:
        return next(r["version"] for r in reader.versions() if r["status"] == "current")


def test_writers_keep_a_snapshot_and_readers_serve_from_it_as_from_a_build(trained, monkeypatch):
    path, users = trained.path, _users(trained)
    version = _current(path)
    assert os.path.exists(os.path.join(path, snapshot_name(version)))
    assert not any(n.endswith(".serving.arrow") and n != f"v{version}.serving.arrow"
                   for n in os.listdir(path / "models"))  # only the current version's is kept
    builds: list = []
    from_snapshot = _lists(path, users, builds=builds, monkeypatch=monkeypatch)
    assert builds == []
    assert from_snapshot == _built(path, users)  # the same items and the same score bits
    # SQL functions read the same state
    with dynstore.connect(path, read_only=True) as reader:
        sql = reader.sql(f"SELECT recommend({users[0]}, 10)").fetchall()[0][0]
    assert [(r["item_id"], r["score"]) for r in sql] == from_snapshot[0]


def test_appended_interactions_are_folded_into_the_snapshot(trained, monkeypatch):
    path, users = trained.path, _users(trained)
    t = dt.datetime(2025, 6, 1)
    trained.ingest("interactions", pl.DataFrame({"user_id": [users[0], users[1], 999],
                                                 "item_id": [1, 2, 3], "ts": [t, t, t],
                                                 "event": ["purchase", "click", "click"]}))
    builds: list = []
    got = _lists(path, users + [999], builds=builds, monkeypatch=monkeypatch)
    assert builds == []  # advanced from the snapshot, not rebuilt
    assert got == _built(path, users + [999])


def test_a_snapshot_that_no_longer_fits_is_not_used(trained, monkeypatch):
    """New items (or users, a new cache, other rules) since the snapshot: the reader builds."""
    path, users = trained.path, _users(trained)
    trained.ingest("items", pl.DataFrame({"item_id": [900001], "title": ["a new lamp"], "category": ["home"]}))
    trained.encode()  # a writer: the snapshot is written again, for the new items
    builds: list = []
    assert _lists(path, users, builds=builds, monkeypatch=monkeypatch) == _built(path, users)
    assert builds == []
    trained.ingest("users", pl.DataFrame({"user_id": [777777]}))  # no writer since: stale
    builds = []
    assert _lists(path, users, builds=builds, monkeypatch=monkeypatch) == _built(path, users)
    assert builds == [1]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_snapshot_is_ignored(trained, monkeypatch, damage):
    """A file that does not read back whole (never left by a writer: it renames a synced
    file into place) is ignored; a killed writer's temporary file is never read."""
    path, users = trained.path, _users(trained)
    expected = _built(path, users)
    snap = os.path.join(path, snapshot_name(_current(path)))
    data = open(snap, "rb").read()
    with open(snap + ".0123456789ab.tmp", "wb") as fh:  # what a kill mid-write leaves
        fh.write(data[: len(data) // 3])
    with open(snap, "wb") as fh:
        fh.write({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 100, "empty": b""}[damage])
    builds: list = []
    assert _lists(path, users, builds=builds, monkeypatch=monkeypatch) == expected
    assert builds == [1]


def test_readers_never_write_a_snapshot(trained):
    path, users = trained.path, _users(trained)
    snap = os.path.join(path, snapshot_name(_current(path)))
    os.remove(snap)
    _lists(path, users)
    assert not os.path.exists(snap)
    trained.refresh(since="all", epochs=1)  # a writer puts one back (a new version or the same)
    assert os.path.exists(os.path.join(path, snapshot_name(_current(path))))
