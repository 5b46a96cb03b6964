"""``score-all --precision fp16|bf16`` (issue 14): a half-precision prefilter whose
candidates are rescored in float32, so the lists are the float32 lists."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

import dynstore
from dynstore.serving import precision as P
from dynstore.serving.score_all import all_users
from dynstore.cli import main
from dynstore.errors import DynstoreError
from dynstore.serving.recommend import all_items_lists, score_terms, serving_state

LOW = ["fp16", "bf16"]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """1,500 items in 40 topics, 150 users with 8 positives each and 20 cold users."""
    rng = np.random.default_rng(1)
    s = dynstore.init(tmp_path_factory.mktemp("p") / "s", model="fake")
    n_items, n_users = 1500, 150
    topic = rng.integers(0, 40, n_items)
    titles = [f"t{t} w{t * 7 + a} w{t * 7 + b} v{c}" for t, a, b, c in
              zip(topic, rng.integers(0, 7, n_items), rng.integers(0, 7, n_items), rng.integers(0, 500, n_items))]
    s.ingest("items", pl.DataFrame({"item_id": np.arange(1, n_items + 1), "title": titles}))
    n = n_users * 8
    s.ingest("interactions", pl.DataFrame({
        "user_id": np.repeat(np.arange(1, n_users + 1), 8), "item_id": rng.integers(1, n_items + 1, n),
        "ts": np.datetime64("2025-01-01T00:00:00", "us")
        + (rng.integers(0, 86400 * 30, n) * 1_000_000).astype("timedelta64[us]"), "value": np.ones(n)}))
    s.ingest("users", pl.DataFrame({"user_id": np.arange(1, n_users + 21)}))
    s.encode()
    yield s
    s.close()


def _lists(store, precision, k):
    state = serving_state(store.catalog)
    P.COUNTS.update(rescored=0, fallback=0)
    return all_items_lists(state, all_users(store.catalog), k, precision=precision)


@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("k", [1, 10, 100])
def test_lists_identical_to_fp32_and_prefilter_taken(big, precision, k):
    ref = _lists(big, "fp32", k)
    assert P.COUNTS == {"rescored": 0, "fallback": 0}
    got = _lists(big, precision, k)
    assert got == ref  # item ids, scores (bit for bit) and order
    assert P.COUNTS["rescored"] == len(ref) and P.COUNTS["fallback"] == 0


@pytest.mark.parametrize("precision", LOW)
def test_dense_terms_and_exclusions_match_fp32(encoded, precision):
    # the tiny shop with segments: the per-user terms B are dense [users, items]
    encoded.refresh(since="all", force=True)
    users = all_users(encoded.catalog)
    assert score_terms(serving_state(encoded.catalog), users)[1].ndim == 2
    for k in (5, 30):
        ref = _lists(encoded, "fp32", k)
        got = _lists(encoded, precision, k)
        assert got == ref and P.COUNTS["rescored"] + P.COUNTS["fallback"] == len(users)
    assert P.COUNTS["rescored"] > 0


@pytest.mark.parametrize("precision", LOW)
def test_bound_holds_and_is_needed(big, precision):
    # the half-precision logits differ from float32 ones (else the test below proves nothing),
    # always by less than the bound
    state = serving_state(big.catalog)
    users = all_users(big.catalog)
    X, B = score_terms(state, users)
    exact = X @ state.Wf.T + B
    Y, T = P.low_scores(P.low_matrix(state.Wf, precision), X, B, np.zeros(0, np.int64), np.zeros(0, np.int64))
    Y, T = Y.numpy(), T.numpy()[:, None]
    assert (Y != exact).mean() > 0.5
    assert (np.abs(Y - exact) <= T).all()
    assert float(np.median(T)) < 0.1 * float(exact.std())  # tight enough to prefilter


def test_fallback_users_get_fp32_lists(big, monkeypatch):
    ref = _lists(big, "fp32", 10)
    real = P.prefiltered_topk

    def half_fail(*args):
        V, I, ok = real(*args)
        ok[::2] = False  # every other user "could not be bounded"
        return V, I, ok

    monkeypatch.setattr("dynstore.serving.recommend.prefiltered_topk", half_fail)
    assert _lists(big, "fp16", 10) == ref


def test_store_score_all_records_precision(big):
    a = big.score_all(k=5)
    rows = big.sql("SELECT user_id, rank, item_id, score FROM batch_recommendations ORDER BY 1, 2").fetchall()
    b = big.score_all(k=5, precision="bf16")
    assert (a.precision, b.precision) == ("fp32", "bf16") and b.to_dict()["precision"] == "bf16"
    assert big.sql("SELECT user_id, rank, item_id, score FROM batch_recommendations ORDER BY 1, 2").fetchall() == rows
    with pytest.raises(DynstoreError, match="precision must be one of fp32, fp16, bf16, got 'fp8'") as e:
        big.score_all(k=5, precision="fp8")
    assert "\n" not in str(e.value)


def test_cli_precision(runner, big):
    r = runner.invoke(main, ["score-all", str(big.path), "-k", "3", "--precision", "fp16"], catch_exceptions=False)
    assert r.exit_code == 0 and "precision fp16" in r.output, r.output
    r = runner.invoke(main, ["score-all", str(big.path), "-k", "3", "--precision", "bf16", "--json"],
                      catch_exceptions=False)
    assert r.exit_code == 0 and json.loads(r.output)["precision"] == "bf16"
    r = runner.invoke(main, ["score-all", str(big.path), "--precision", "fp8"], catch_exceptions=False)
    errors = [x for x in r.output.splitlines() if x.startswith("Error")]
    assert r.exit_code == 2 and len(errors) == 1 and "'fp8' is not one of 'fp32', 'fp16', 'bf16'" in errors[0], r.output


def test_ray_actor_carries_precision(big):
    # the actor class runs as is outside Ray: what each actor does with its kwargs
    import pyarrow as pa

    from dynstore.serving.score_all import UserScorer, score_users
    from dynstore.storage.registry import current_version
    from dynstore.encoders.cache import snapshot

    view = big.catalog.pinned()
    version, users = current_version(view), all_users(view)
    actor = UserScorer(str(view.path), snapshot(view), 7, version, precision="bf16")
    assert actor.precision == "bf16"
    P.COUNTS.update(rescored=0, fallback=0)
    got = actor(pa.table({"user_id": pa.array(users, pa.int64())}))
    assert P.COUNTS["rescored"] == len(users)
    assert got.equals(score_users(view, users, 7, version))


def test_candidates_found_retried_or_left_out():
    import torch

    n, k = 1000, 5  # first topk 2k + 16 = 26 rows, the retry max(4k, n / 8) = 125
    i = torch.arange(n, dtype=torch.float32)
    Y = torch.stack([-i, -i * 1e-3, -i * 1e-5, -i])
    Y[3, 7] = float("nan")
    t = torch.tensor([0.1, 0.05, 0.05, 0.1])
    ok, rows, keep = P.candidates(Y, t, k)
    assert ok.tolist() == [True, True, False, False]  # 5 candidates; 105 (the retry); all 1000; a NaN
    assert sorted(rows[0][keep[0]].tolist()) == list(range(5))
    assert sorted(rows[1][keep[1]].tolist()) == list(range(105))
