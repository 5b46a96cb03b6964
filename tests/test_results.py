"""The typed results of the store's write methods: attribute access, and ``to_dict()`` as ``--json`` prints it."""
from __future__ import annotations

import dataclasses

import pytest

from dynstore.results import (CompactResult, DeleteResult, EncodeResult, IngestResult, RefreshResult,
                              RollbackResult)


def test_results_are_frozen_and_not_subscriptable():
    r = IngestResult(kind="items", rows=2, total=2, version=1)
    with pytest.raises(TypeError):
        r["rows"]  # noqa: B018
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.rows = 3  # type: ignore[misc]


def test_optional_parts_are_left_out_of_to_dict_when_absent():
    assert IngestResult(kind="items", rows=2, total=2, version=1).to_dict() == \
        {"kind": "items", "rows": 2, "total": 2, "version": 1}
    deduped = IngestResult(kind="interactions", rows=0, total=4, version=2, duplicates_skipped=4, key=None)
    assert list(deduped.to_dict()) == ["kind", "rows", "total", "version", "duplicates_skipped", "key"]
    assert "dry_run" not in DeleteResult(kind="users", deleted=1, total=1, version=2).to_dict()
    assert DeleteResult(kind="users", deleted=1, total=2, version=1, dry_run=True).to_dict()["dry_run"] is True
    enc = EncodeResult(items=3, stale=0, encoded=0, reused=3, encoder="fake:32:v1", device="cpu", seconds=0.1,
                       items_per_s=None)
    assert list(enc.to_dict())[-1] == "items_per_s" and enc.version is None
    assert list(EncodeResult(**{**enc.to_dict(), "version": 1}).to_dict())[-1] == "version"
    back = RollbackResult(version=1, previous=2, status="current", verdict="initial")
    assert back.to_dict() == {"version": 1, "previous": 2, "status": "current", "verdict": "initial"}
    out = CompactResult(datasets={}, orphans={}, encoders_removed=[], skipped={}, retain_seconds=0.0)
    assert list(out.to_dict()) == ["datasets", "orphans", "encoders_removed", "skipped", "retain_seconds", "kept",
                                   "bytes", "reclaimed"]


def test_a_noop_refresh_and_a_trained_one():
    noop = RefreshResult(status="noop", reason="no new data since version 2", version=2)
    assert noop.noop and noop.to_dict() == {"status": "noop", "reason": "no new data since version 2", "version": 2}
    assert RefreshResult(status="noop", reason="x").to_dict() == {"status": "noop", "reason": "x"}
    trained = RefreshResult(version=3, parent=2, status="current", promoted=True, metrics={}, counts={},
                            durations={}, window="all", holdout=None, reasons=["--force"], kept_start=False,
                            training={})
    assert list(trained.to_dict()) == ["version", "parent", "status", "promoted", "metrics", "counts", "durations",
                                       "window", "holdout", "reasons", "kept_start", "training"]
    published = dataclasses.replace(trained, published={"version": 4, "status": "current", "kind": "popularity rule"})
    assert list(published.to_dict())[-1] == "published" and not published.noop
