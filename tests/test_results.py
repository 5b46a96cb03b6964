"""The typed results of the store's methods: attribute access, ``to_dict()`` as ``--json`` prints it, and the
reads (recommend, versions, inspect, evaluate) still read as the dicts they replaced."""
from __future__ import annotations

import dataclasses
import json

import pytest

from dynstore.inspection import inspect_store
from dynstore.results import (CompactResult, DeleteResult, EncodeResult, Evaluation, Figures, IngestResult,
                              Inspection, Recommendation, RefreshMetrics, RefreshResult, RollbackResult, VersionRow)
from dynstore.serving.recommend import recommend
from dynstore.storage.registry import list_versions
from dynstore.versions.holdout import evaluate_version


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


def test_refresh_metrics_are_figures():
    figures = {"recall@10": 0.5, "ndcg@10": 0.25, "auc": 0.75, "n_users": 4}
    m = RefreshMetrics.from_dict({"candidate": figures, "current": {**figures, "n_users": 3}, "rule": figures})
    assert isinstance(m.rule, Figures) and m.candidate.ndcg == m["candidate"]["ndcg@10"] == 0.25
    assert m.current.n_users == 3 and m.current.k == 10
    out = RefreshResult(version=3, parent=2, status="current", promoted=True, metrics=m, counts={}, durations={},
                        window="all", holdout=None, reasons=[], kept_start=False, training={})
    assert out.metrics.candidate == figures
    assert out.to_dict()["metrics"] == {"candidate": figures, "current": {**figures, "n_users": 3}, "rule": figures}
    assert json.dumps(out.to_dict())  # plain dicts all the way down


def test_a_recommendation_reads_as_its_dict():
    r = Recommendation(item_id="a", score=0.25)
    assert (r.item_id, r.score) == ("a", 0.25)
    assert r["item_id"] == "a" and r.get("score") == 0.25 and r.get("rank") is None and "score" in r
    assert list(r.keys()) == ["item_id", "score"] and dict(r) == r.to_dict() == {"item_id": "a", "score": 0.25}
    assert r == {"item_id": "a", "score": 0.25} and {"item_id": "a", "score": 0.25} == r
    assert r != {"item_id": "a", "score": 0.5} and r == Recommendation("a", 0.25)
    with pytest.raises(KeyError):
        r["rank"]  # noqa: B018
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.score = 1.0  # type: ignore[misc]


def test_the_reads_are_typed_and_their_dicts_unchanged(encoded, runner):
    """Each read returns its type; ``to_dict()`` is what the layer below returns (the dict
    the method returned before), and what ``--json`` prints."""
    from dynstore.cli import main

    store = encoded
    recs = store.recommend(3, 5)
    assert recs and all(isinstance(r, Recommendation) for r in recs)
    assert recs == recommend(store.catalog, 3, 5) and [dict(r) for r in recs] == recommend(store.catalog, 3, 5)

    rows = store.versions()
    assert [type(r) for r in rows] == [VersionRow]
    assert [r.to_dict() for r in rows] == list_versions(store.catalog) == rows
    assert rows[0].version == rows[0]["version"] == 1 and rows[0].verdict == rows[0]["verdict"] == "initial"
    assert list(rows[0]) == ["version", "parent", "status", "created", "encoder", "alpha", "train_window",
                             "counts", "metrics", "snapshot", "verdict"]

    info = store.inspect()
    assert isinstance(info, Inspection) and info.to_dict() == inspect_store(store.catalog)
    assert info.tables["items"]["rows"] == info["tables"]["items"]["rows"] > 0 and "encode" not in info
    cli = runner.invoke(main, ["inspect", str(store.path), "--json"])
    assert json.loads(cli.output) == json.loads(json.dumps(info.to_dict(), default=str))

    ev = store.evaluate(k=5)
    assert isinstance(ev, Evaluation) and ev.k == 5 and ev.to_dict() == evaluate_version(store.catalog, k=5)
    assert ev.ndcg == ev["ndcg@5"] and ev.recall == ev["recall@5"] and list(ev)[:3] == ["version", "recall@5",
                                                                                         "ndcg@5"]
    cli = runner.invoke(main, ["eval", str(store.path), "-k", "5", "--json"])
    assert json.loads(cli.output) == ev.to_dict()
