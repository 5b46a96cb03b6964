"""refresh: training events, holdout evaluation, promotion, no-op, determinism."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import dynstore
from dynstore.errors import ConfigError
from dynstore.versions.window import labelled_events, parse_since


def test_parse_since_counts_back_from_newest():
    newest = dt.datetime(2025, 3, 31, 12)
    assert parse_since("30d", newest) == dt.datetime(2025, 3, 1, 12)
    assert parse_since("2w", newest) == dt.datetime(2025, 3, 17, 12)
    assert parse_since("6h", newest) == dt.datetime(2025, 3, 31, 6)
    assert parse_since("2025-02-01", newest) == dt.datetime(2025, 2, 1)
    assert parse_since("all", newest) is None
    with pytest.raises(ConfigError, match="--since"):
        parse_since("last tuesday", newest)


def test_training_events_mark_shown_but_ignored(store):
    t = lambda h: dt.datetime(2025, 1, 1, h)  # noqa: E731
    rows = [
        (1, 10, t(1), "impression"), (1, 10, t(2), "click"),       # shown then clicked: not a negative
        (1, 11, t(1), "impression"),                               # shown, ignored: hard negative
        (1, 12, t(3), "skip"),                                     # explicit negative
        (2, 10, t(4), "purchase"), (2, 13, t(5), "impression"),
        (2, 13, t(1), "click"),                                    # clicked before the impression: still ignored
    ]
    store.ingest("interactions", pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                                           "ts": pa.array([r[2] for r in rows], pa.timestamp("us")),
                                           "event": [r[3] for r in rows]}))
    con = store.connection()
    ev = labelled_events(con, None).to_pylist()
    got = sorted((e["user_id"], e["item_id"], e["label"]) for e in ev)
    assert got == [(1, 10, 1), (1, 11, 0), (1, 12, -1), (2, 10, 1), (2, 13, 0), (2, 13, 1)]
    recent = labelled_events(con, dt.datetime(2025, 1, 1, 3)).to_pylist()
    assert sorted((e["user_id"], e["item_id"]) for e in recent) == [(1, 12), (2, 10), (2, 13)]


def test_refresh_publishes_evaluated_version(encoded):
    out = encoded.refresh(since="all", epochs=3)
    assert out.version == 2 and out.parent == 1
    assert out.status in ("current", "rejected")
    for side in ("candidate", "current"):
        m = out.metrics[side]
        assert set(m) >= {"recall@10", "ndcg@10", "auc"} and 0 <= m["ndcg@10"] <= 1
    assert out.counts["impressions"] > 0 and out.counts["negatives"] > 0
    row = encoded.sql("SELECT status, metrics, parent FROM versions WHERE version = 2").fetchall()[0]
    assert json.loads(row[1])["candidate"]["ndcg@10"] == pytest.approx(out.metrics["candidate"]["ndcg@10"])
    assert (encoded.path / "models" / "v2.safetensors").exists()


def test_second_refresh_without_new_data_is_noop(encoded, runner=None):
    encoded.refresh(since="all", epochs=1)
    again = encoded.refresh(since="all", epochs=1)
    assert again.status == "noop" and "no new data" in again.reason
    encoded.ingest("interactions", pa.table({"user_id": [1], "item_id": [2], "ts": ["2025-06-01"],
                                             "event": ["click"]}))
    third = encoded.refresh(since="all", epochs=1)
    # it retrains; a result equal to the current version publishes nothing (issue 23)
    if third.status == "unchanged":
        assert third.reasons == ["interactions changed since version 2"] and third.version == again.version
    else:
        assert third.version == again.version + 1


def test_refresh_publishes_no_version_identical_to_current(encoded, runner):
    """After an item change a retrain that ends where it started (same weights, rows and
    figures) says so and publishes nothing; --force publishes it anyway (issue 23)."""
    from dynstore.cli import main

    first = encoded.refresh(since="all", epochs=1)
    encoded.ingest("items", pl.DataFrame({"item_id": [9001], "title": ["a brand new thing"]}))
    encoded.encode()
    result = runner.invoke(main, ["refresh", str(encoded.path), "--since", "all", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("retrained: items changed since version 2\nno new version: the result is "
                                    f"version {first.version} again")
    assert [r["version"] for r in encoded.versions()] == [2, 1]
    assert encoded.recommend(1, 5)  # the new item is served by version 2's parameters meanwhile
    out = json.loads(runner.invoke(main, ["refresh", str(encoded.path), "--since", "all", "--epochs", "1",
                                          "--json"]).output)
    assert out["status"] == "unchanged" and out["version"] == 2 and not out["promoted"] and "again" in out["reason"]
    forced = encoded.refresh(since="all", epochs=1, force=True)
    assert forced.status != "noop" and forced.version == 3


def test_no_version_identical_to_current_with_the_content_prior_on(encoded, monkeypatch):
    """With the content prior's weight on, the prior's per-item rows are compared by item id:
    an item added since (no events) is served its whole prior by either version."""
    import dynstore.model.training as training

    choose = training.choose_terms

    def with_prior(model, *args):
        out = choose(model, *args)
        if model.prior is not None:
            model.params["beta"] = np.array([0.5], np.float32)
        return out

    monkeypatch.setattr(training, "choose_terms", with_prior)
    first = encoded.refresh(since="all", epochs=1)
    assert first.status == "current"
    encoded.ingest("items", pl.DataFrame({"item_id": [9003], "title": ["another new thing"]}))
    encoded.encode()
    again = encoded.refresh(since="all", epochs=1)
    assert again.status == "unchanged" and again.version == first.version
    assert encoded.versions()[0]["version"] == first.version


def test_an_empty_window_fails_before_encoding(encoded, runner):
    """`refresh --since 2030-01-01` says the window is empty before it encodes anything."""
    from dynstore.cli import main

    encoded.ingest("items", pl.DataFrame({"item_id": [9002], "title": ["still stale"]}))
    result = runner.invoke(main, ["refresh", str(encoded.path), "--since", "2030-01-01"])
    assert result.exit_code == 1
    assert "--since 2030-01-01: 0 distinct event time(s) from 2030-01-01 00:00" in result.output
    assert "widen --since" in result.output
    assert encoded.sql("SELECT count(*) FROM stale_items").fetchall() == [(1,)]  # nothing was encoded


def test_no_promote_keeps_candidate_and_current(encoded):
    out = encoded.refresh(since="all", epochs=1, promote=False)
    assert out.status in ("candidate", "rejected")
    assert encoded.sql("SELECT version FROM versions WHERE status = 'current'").fetchall() == [(1,)]
    # a candidate stays queryable by number
    assert encoded.recommend(1, 3, version=out.version)


def test_refresh_is_deterministic_for_a_seed(shop_files, tmp_path):
    from dynstore.demo import DEMO_RULES

    results = []
    for name in ("a", "b"):
        s = dynstore.init(tmp_path / name, model="fake", **DEMO_RULES)
        s.ingest("items", shop_files / "items.csv")
        s.ingest("interactions", shop_files / "interactions.parquet")
        s.encode()
        s.refresh(since="all", epochs=2, seed=7)
        results.append(s.sql("SELECT item_id, vector FROM item_embeddings_all WHERE version = 2 ORDER BY item_id").fetchall())
        s.close()
    assert results[0] == results[1]


def test_refresh_without_interactions_is_noop(store):
    assert store.refresh().status == "noop"


def test_refresh_promotes_only_when_not_worse(tmp_path):
    """The registry follows the holdout comparison; a rejected version stays queryable."""
    from dynstore.demo import DEMO_RULES
    from dynstore.versions.refresh import TOLERANCE
    from dynstore.samples import shop

    frames = shop.generate("small", seed=1)
    s = dynstore.init(tmp_path / "s", model="fake", **DEMO_RULES)
    s.ingest("users", frames["users"])
    s.ingest("items", frames["items"])
    s.ingest("interactions", frames["interactions"].filter(pl.col("ts") < shop.DRIFT_START))
    s.encode()
    out = s.refresh(since="all", epochs=2)
    cand, cur = out.metrics["candidate"], out.metrics["current"]
    assert 0.0 < cur["ndcg@10"] < 1.0 and 0.5 < cur["auc"] < 1.0  # the honest popularity rule, not a leak
    not_worse = cand["ndcg@10"] >= cur["ndcg@10"] * (1 - TOLERANCE)
    assert out.status == ("current" if not_worse else "rejected")
    current = s.sql("SELECT version FROM versions WHERE status = 'current'").fetchall()[0][0]
    # a rejected candidate leaves the popularity rule, recounted on the window, serving
    assert current == (2 if not_worse else 3)
    assert (out.published is not None) == (not not_worse)
    assert len(s.recommend(1, 5, version=2)) == 5
    s.close()


def _burst(store, item, n=40):
    newest = store.sql("SELECT max(ts) FROM interactions").fetchall()[0][0]
    ts = [newest + dt.timedelta(hours=1, minutes=m) for m in range(n)]
    store.ingest("interactions", pa.table({"user_id": list(range(1000, 1000 + n)), "item_id": [item] * n,
                                           "ts": pa.array(ts, pa.timestamp("us")), "event": ["purchase"] * n}))


def test_popularity_rule_follows_a_burst_without_refresh(encoded):
    """Version 1 is the popularity rule read as of every query: a burst of
    purchases on a rare item puts it on top at once, with no refresh."""
    top_v1 = encoded.recommend("nobody", 1)[0]["item_id"]
    rare = encoded.sql("SELECT item_id FROM items WHERE item_id <> ? ORDER BY item_id DESC LIMIT 1",
                       params=[top_v1]).fetchall()[0][0]
    _burst(encoded, rare)
    assert encoded.recommend("nobody", 1)[0]["item_id"] == rare
    assert encoded.recommend("nobody", 1, version=1)[0]["item_id"] == rare
    assert len(encoded.versions()) == 1


def test_rejected_refresh_publishes_the_rule_over_a_stale_trained_version(encoded):
    """When the trained candidate loses and the rule beats what the store serves
    (here a trained version that learned to avoid popular items), the rule is
    published as the next version; a rejected refresh over the rule itself adds nothing."""
    from dynstore.versions.embeddings import build_version, load_version

    lv = load_version(encoded.catalog)
    bad = type(lv.model).from_state(*lv.model.state())
    bad.params["theta"] = -np.abs(bad.params["theta"]) - 1.0  # popularity counts against an item
    build_version(encoded.catalog, bad, lv.item_spec, lv.user_spec, parent=1, status="current",
                  train_window="test", residuals=(np.zeros_like(lv.Wf), np.zeros_like(lv.bias)),
                  snapshot={"trained_until": 0})
    out = encoded.refresh(since="all", epochs=1, tolerance=-10.0)  # force the candidate out
    assert out.status == "rejected"
    assert out.metrics["rule"]["ndcg@10"] > out.metrics["current"]["ndcg@10"]
    pub = out.published
    assert pub["version"] == out.version + 1 and pub["kind"] == "popularity rule"
    rows = dict(encoded.sql("SELECT version, status FROM versions").fetchall())
    assert rows[out.version] == "rejected" and rows[pub["version"]] == "current"
    verdict, window, metrics = encoded.sql("SELECT verdict, train_window, metrics FROM versions WHERE version = ?",
                                           params=[pub["version"]]).fetchall()[0]
    assert verdict == "rule" and " .. " in window and "ndcg@10" in metrics
    # the rule is current now: rejecting the next candidate publishes nothing more
    _burst(encoded, 1)
    again = encoded.refresh(since="all", epochs=1, tolerance=-10.0)
    assert again.status == "rejected" and again.published is None


def test_no_promote_never_publishes_the_rule(encoded):
    out = encoded.refresh(since="all", epochs=1, tolerance=-10.0, promote=False)
    assert out.status == "rejected" and out.published is None
    assert encoded.sql("SELECT version FROM versions WHERE status = 'current'").fetchall() == [(1,)]


def test_trained_current_is_judged_on_events_it_never_saw(encoded):
    """A promoted version learned from its whole window; the next refresh's holdout
    overlaps that window, so the comparison uses only the newer events."""
    first = encoded.refresh(since="all", epochs=1, tolerance=1.0)  # force a trained current
    assert first.status == "current"
    until = encoded.versions()[0]["snapshot"]["trained_until"]
    newest = encoded.sql("SELECT max(ts) FROM interactions").fetchall()[0][0]
    assert until == encoded.sql("SELECT epoch(max(ts))::BIGINT FROM interactions").fetchall()[0][0]
    # too few new events: judged on the whole holdout, and the output says so
    encoded.ingest("interactions", pa.table({"user_id": [1], "item_id": [2], "ts": [newest + dt.timedelta(hours=1)],
                                             "event": ["click"]}))
    out = encoded.refresh(since="all", epochs=1)
    assert out.holdout["judged_on"].startswith("all (too few") and 0 < out.holdout["seen_by_current"] < 1
    # enough new events from enough users: judged on those only
    rows = [(u, 1 + (u * 7) % 20, newest + dt.timedelta(days=2, minutes=u)) for u in range(1, 61)]
    encoded.ingest("interactions", pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                                             "ts": pa.array([r[2] for r in rows], pa.timestamp("us")),
                                             "event": ["purchase"] * len(rows)}))
    current = next(v for v in encoded.versions() if v["status"] == "current")
    unseen = encoded.sql("SELECT count(*), count(DISTINCT user_id) FROM interactions WHERE epoch(ts)::BIGINT > ?",
                         params=[current["snapshot"]["trained_until"]]).fetchall()[0]
    assert len(rows) <= unseen[0] <= len(rows) + 1  # + the click above unless a version learned it
    out = encoded.refresh(since="all", epochs=1)
    judged = out.holdout
    assert judged["judged_on"] == "unseen by current" and judged["events"] == unseen[0]
    assert out.metrics["current"]["n_users"] == unseen[1]


# -------------------------------------------------------------------------- the no-op decision


def test_force_retrains_without_new_data(encoded):
    first = encoded.refresh(since="all", epochs=1)
    assert encoded.refresh(since="all", epochs=1).status == "noop"
    forced = encoded.refresh(since="all", epochs=1, force=True)
    assert forced.status != "noop" and forced.reasons == ["--force"]
    assert forced.version > first.version


@pytest.mark.parametrize("change, named", [
    ({"positive": "event = 'purchase'"}, "positive rule changed: \"event IN ('click', 'purchase')\" -> "
                                         "\"event = 'purchase'\""),
    ({"negative": "event IN ('skip', 'impression')"}, "negative rule changed"),
    ({"item_text": "title"}, "item document changed"),
    ({"model": "other-fake"}, "encoder changed: 'fake:32:v1' -> 'other:32'"),
])
def test_a_rules_or_encoder_change_needs_a_refresh_and_says_so(encoded, change, named):
    from dynstore.encoders import FakeEncoder, register_encoder

    class Other(FakeEncoder):  # another encoder of the same dimension
        def __init__(self, **kw):
            super().__init__(32)
            self.id = "other:32"

    register_encoder("other-fake", Other)
    encoded.refresh(since="all", epochs=1)
    assert encoded.refresh(since="all", epochs=1).status == "noop"
    encoded.configure(**change)
    assert encoded.inspect()["refresh"]["needed"]
    out = encoded.refresh(since="all", epochs=1)
    assert out.status != "noop" and any(named in r for r in out.reasons), out.reasons
    again = encoded.refresh(since="all", epochs=1)
    assert again.status == "noop" and "rules and encoder unchanged" in again.reason


def test_refresh_cli_force_and_reasons(runner, encoded):
    from dynstore.cli import main

    p = str(encoded.path)
    assert runner.invoke(main, ["refresh", p, "--since", "all", "--epochs", "1", "-q"]).output == ""
    r = runner.invoke(main, ["refresh", p, "--since", "all"])
    assert r.exit_code == 0 and r.output.startswith("nothing to do: no new data since version")
    assert "--force" in r.output
    r = runner.invoke(main, ["config", p, "--positive", "event = 'purchase'", "-q"])
    assert r.exit_code == 0 and r.output == ""
    r = runner.invoke(main, ["refresh", p, "--since", "all", "--epochs", "1"])
    assert r.exit_code == 0 and "retrained: positive rule changed" in r.output
    r = runner.invoke(main, ["refresh", p, "--since", "all", "--epochs", "1", "--force", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["reasons"] == ["--force"]


# -------------------------------------------------------------------------- verdicts


def test_verdict_survives_rollbacks_and_a_rejected_rollback_warns(encoded, runner):
    from dynstore.cli import main

    out = encoded.refresh(since="all", epochs=1, tolerance=-10.0)  # force the candidate out
    rejected = out.version
    rows = {r["version"]: (r["status"], r["verdict"]) for r in encoded.versions()}
    assert rows[rejected] == ("rejected", "rejected")
    back = encoded.rollback(rejected)
    assert back.verdict == "rejected" and "was rejected by refresh" in back.warning
    encoded.rollback(1)
    rows = {r["version"]: (r["status"], r["verdict"]) for r in encoded.versions()}
    assert rows[rejected] == ("retired", "rejected") and rows[1] == ("current", "initial")
    r = runner.invoke(main, ["rollback", str(encoded.path), str(rejected)])
    assert r.exit_code == 0 and f"version {rejected} is current" in r.output
    assert "warning: version" in r.output and "rejected by refresh" in r.output
    assert encoded.sql("SELECT verdict FROM versions WHERE version = ?", [rejected]).fetchall() == [("rejected",)]


def test_registry_written_before_verdicts_still_reads(encoded):
    """A registry from before the verdict column: verdicts are inferred, the view works."""
    import lance

    from dynstore.storage.registry import registry_table

    table = registry_table(encoded.catalog)
    old = table.drop_columns(["verdict"])
    old = old.set_column(old.schema.get_field_index("train_window"), "train_window",
                         pa.array(["untrained"] * old.num_rows))
    lance.write_dataset(old, encoded.catalog.uri("versions"), mode="overwrite")
    assert encoded.sql("SELECT version, verdict FROM versions").fetchall() == [(1, "initial")]
    assert encoded.versions()[0]["verdict"] == "initial"


def test_eval_says_which_slice(encoded, runner):
    from dynstore.cli import main

    out = dynstore.connect(encoded.path).refresh(since="all", epochs=1)
    from dynstore.versions.holdout import evaluate_version

    ev = evaluate_version(encoded.catalog, version=out.version)
    sl = ev["slice"]
    assert sl["of"] == "all interactions" and sl["share"] == 0.1 and sl["events"] > 0
    assert 0.0 <= sl["trained_on_share"] <= 1.0 and sl["from"] <= sl["to"]
    with pytest.raises(dynstore.DynstoreError, match="k must be between 1"):
        evaluate_version(encoded.catalog, k=0)
    r = runner.invoke(main, ["eval", str(encoded.path)])
    assert r.exit_code == 0 and "slice.events" in r.output and "note: judged on" in r.output
    assert "refresh uses its own window" in r.output
    for k in ("0", "-1"):
        r = runner.invoke(main, ["eval", str(encoded.path), "-k", k])
        assert r.exit_code == 2 and "not in the range" in r.output and "nan" not in r.output


def test_eval_since_reads_only_the_window(encoded, runner):
    """``eval --since`` judges the newest 10% of the window, from the window's events alone;
    the first version's figures are those of the default refresh window."""
    from dynstore.cli import main

    whole, recent = encoded.evaluate(), encoded.evaluate(since="14d")
    assert recent["slice"]["of"] == "the interactions since 14d" and whole["slice"]["of"] == "all interactions"
    assert 0 < recent["slice"]["events"] < whole["slice"]["events"]
    assert recent["slice"]["from"] >= whole["slice"]["from"]
    v1 = json.loads(encoded.sql("SELECT metrics FROM versions WHERE version = 1").fetchall()[0][0])
    assert v1["slice"]["of"] == "the interactions since 30d"
    assert v1["slice"]["events"] == encoded.evaluate(version=1, since="30d")["slice"]["events"]
    r = runner.invoke(main, ["eval", str(encoded.path), "--since", "14d"])
    assert r.exit_code == 0 and "of the interactions since 14d" in r.output
    r = runner.invoke(main, ["eval", str(encoded.path), "--since", "last week"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--since 'last week'" in r.output


def test_store_methods_name_every_option_explicitly():
    """Store.refresh and Store.configure take explicit keyword arguments that match what
    refresh and the config accept: a new option cannot be forgotten in the façade."""
    import inspect

    from dynstore.versions.refresh import REFRESH_FIELDS
    from dynstore.store import SETTABLE, Store

    for method, names in ((Store.refresh, REFRESH_FIELDS), (Store.configure, SETTABLE)):
        params = inspect.signature(method).parameters
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for n, p in params.items() if n != "self")
        assert set(params) - {"self"} == set(names)


def test_current_model_over_the_window_matches_item_terms_by_id():
    """The current version's item-item weights and prior rows follow the window's item order
    (an ingest may reorder the items table); an item added since gets neither."""
    from types import SimpleNamespace

    from dynstore.model.fusion import FusionModel
    from dynstore.model.itemitem import ItemItem
    from dynstore.versions.window import WindowData

    model = FusionModel(d=2, fa=0, fu=0)
    model.item_item = ItemItem(np.array([0, 1, 2]), np.array([1, 0]), np.array([0.5, 0.25], np.float32))
    model.prior_item = np.array([0.1, 0.2], np.float32)
    lv = SimpleNamespace(model=model, ids=[1, 2], row={1: 0, 2: 1})
    out = WindowData.model_of(SimpleNamespace(ids=[9001, 2, 1]), lv)
    assert out.prior_item.tolist() == pytest.approx([0.0, 0.2, 0.1])
    assert out.item_item.ptr.tolist() == [0, 0, 1, 2]
    assert out.item_item.col.tolist() == [2, 1] and out.item_item.val.tolist() == [0.25, 0.5]
    assert model.prior_item.tolist() == pytest.approx([0.1, 0.2]) and model.item_item.ptr.tolist() == [0, 1, 2]
    assert WindowData.model_of(SimpleNamespace(ids=[1, 2, 9001]), lv) is model  # positions already match
