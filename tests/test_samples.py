"""Tests for the synthetic shop generator (dynstore.samples.shop)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from dynstore.samples import shop

POSITIVE = ["click", "purchase"]


@pytest.fixture(scope="module")
def tiny() -> dict[str, pl.DataFrame]:
    return shop.generate("tiny", seed=0)


@pytest.fixture(scope="module")
def small() -> dict[str, pl.DataFrame]:
    return shop.generate("small", seed=0)


def _with_segments(users: pl.DataFrame) -> pl.DataFrame:
    return users.with_columns(
        band=pl.Series(shop.age_band(users["age"]), dtype=pl.Int64),
        g=pl.col("gender").replace_strict({g: i for i, g in enumerate(shop.GENDERS)}, return_dtype=pl.Int64),
        r=pl.col("region").replace_strict({r: i for i, r in enumerate(shop.REGIONS)}, return_dtype=pl.Int64),
    )


def _enriched(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Interactions joined with item category and user segment."""
    return (
        frames["interactions"]
        .join(frames["items"].select("item_id", "category"), on="item_id")
        .join(_with_segments(frames["users"]).select("user_id", "band", "g", "r", "gender", "region"), on="user_id")
    )


# ---------------------------------------------------------------------------
# determinism, schema, integrity
# ---------------------------------------------------------------------------


def test_same_seed_identical_different_seed_differs(tiny):
    again = shop.generate("tiny", seed=0)
    assert set(again) == {"users", "items", "interactions"}
    for name in again:
        assert again[name].equals(tiny[name]), name
    other = shop.generate("tiny", seed=1)
    for name in ("users", "items", "interactions"):
        assert not other[name].equals(tiny[name]), name


def test_schema(tiny):
    dt = pl.Datetime("us")
    assert tiny["users"].schema == pl.Schema(
        {"user_id": pl.Int64, "age": pl.Int64, "gender": pl.String, "region": pl.String, "signup_ts": dt}
    )
    assert tiny["items"].schema == pl.Schema({
        "item_id": pl.Int64, "title": pl.String, "category": pl.String, "brand": pl.String,
        "price": pl.Float64, "tags": pl.String, "description": pl.String, "created_ts": dt,
    })
    assert tiny["interactions"].schema == pl.Schema(
        {"user_id": pl.Int64, "item_id": pl.Int64, "ts": dt, "event": pl.String, "value": pl.Float64}
    )
    for df in tiny.values():
        assert df.null_count().sum_horizontal().item() == 0
        for col, dtype in df.schema.items():
            if dtype == dt:
                assert df[col].dtype.time_zone is None


def test_sizes(tiny):
    assert tiny["users"].height == 60
    assert tiny["items"].height == 80
    assert 1_500 <= tiny["interactions"].height <= 2_500
    n = shop.generate(8_000, seed=0)["interactions"].height
    assert 6_800 <= n <= 9_200
    with pytest.raises(ValueError):
        shop.generate("huge")
    with pytest.raises(ValueError):
        shop.generate(10)


def test_ids_unique_and_referenced(tiny):
    users, items, inter = tiny["users"], tiny["items"], tiny["interactions"]
    assert users["user_id"].to_list() == list(range(1, users.height + 1))
    assert items["item_id"].to_list() == list(range(1, items.height + 1))
    assert inter["user_id"].is_in(users["user_id"].implode()).all()
    assert inter["item_id"].is_in(items["item_id"].implode()).all()
    assert inter["user_id"].min() >= 1 and inter["item_id"].min() >= 1


def test_time_order_and_existence(tiny):
    inter = tiny["interactions"]
    assert inter["ts"].is_sorted()
    assert inter["ts"].min() >= shop.START and inter["ts"].max() < shop.END
    j = inter.join(tiny["items"].select("item_id", "created_ts"), on="item_id").join(
        tiny["users"].select("user_id", "signup_ts"), on="user_id"
    )
    assert (j["created_ts"] <= j["ts"]).all()
    assert (j["signup_ts"] <= j["ts"]).all()


def test_event_value_consistency(tiny):
    inter = tiny["interactions"]
    assert set(inter["event"].unique()) == {"impression", "click", "purchase", "skip"}
    expected = inter["event"].replace_strict(shop.EVENTS, return_dtype=pl.Float64)
    assert (inter["value"] == expected).all()
    # every outcome follows an impression of the same user/item, shortly before
    imp = inter.filter(pl.col("event") == "impression").select("user_id", "item_id", imp_ts="ts")
    out = inter.filter(pl.col("event") != "impression").with_row_index("k")
    m = out.join(imp, on=["user_id", "item_id"]).filter(
        (pl.col("imp_ts") <= pl.col("ts")) & (pl.col("ts") - pl.col("imp_ts") <= timedelta(minutes=31))
    )
    assert m["k"].n_unique() == out.height
    # at most one outcome per impression
    n_out = out.group_by("user_id", "item_id").len()
    n_imp = imp.group_by("user_id", "item_id").len()
    both = n_out.join(n_imp, on=["user_id", "item_id"], suffix="_imp")
    assert both.height == n_out.height and (both["len"] <= both["len_imp"]).all()


def test_value_domains(small):
    users, items = small["users"], small["items"]
    assert users["age"].min() >= 18 and users["age"].max() <= 75
    assert set(users["gender"].unique()) == set(shop.GENDERS)
    assert set(users["region"].unique()) == set(shop.REGIONS)
    assert set(items["category"].unique()) == set(shop.CATEGORIES)
    assert items.group_by("category").agg(pl.col("brand").n_unique())["brand"].max() <= 5
    assert (items["price"] > 0).all()
    tags = items["tags"].str.split("|")
    assert tags.list.len().is_between(1, 3).all()
    assert set(tags.explode().unique()) <= set(shop.TAGS)
    assert not (items["tags"].str.contains("premium") & items["tags"].str.contains("budget")).any()
    # premium items cost more than budget items of the same category
    rel = items.with_columns(lp=pl.col("price").log() - pl.col("price").log().mean().over("category"))
    assert rel.filter(pl.col("tags").str.contains("premium"))["lp"].mean() > rel.filter(
        pl.col("tags").str.contains("budget")
    )["lp"].mean() + 0.5
    n_sent = items["description"].str.count_matches(r"\.(\s|$)")
    assert n_sent.is_between(1, 3).all() and n_sent.n_unique() == 3
    assert items["title"].str.len_chars().max() < 60


def test_new_items_and_new_users(small):
    items, inter = small["items"], small["interactions"]
    new_items = (items["created_ts"] >= shop.DRIFT_START).mean()
    assert 0.10 <= new_items <= 0.20
    t80 = shop.START + (shop.END - shop.START) * 0.8
    first_seen = inter.group_by("user_id").agg(pl.col("ts").min())["ts"]
    assert 0.14 <= (first_seen >= t80).mean() <= 0.26
    # heavy-tailed activity: the most active decile does far more than the median user
    per_user = inter.group_by("user_id").len()["len"]
    assert per_user.quantile(0.9) > 2.5 * per_user.median()


def test_descriptions_carry_category_signal(small):
    # a bag-of-words nearest-class classifier fitted on half the items must
    # recognise the category of the other half from the text alone
    items = small["items"]
    words = items["description"].str.to_lowercase().str.extract_all(r"[a-z\-]+").to_list()
    cats = items["category"].to_list()
    half = len(cats) // 2
    counts: dict[str, Counter] = defaultdict(Counter)
    for ws, c in zip(words[:half], cats[:half]):
        counts[c].update(set(ws))
    hits = 0
    for ws, c in zip(words[half:], cats[half:]):
        scores = {k: sum(cnt[w] / (1 + sum(counts[o][w] for o in counts)) for w in set(ws)) for k, cnt in counts.items()}
        hits += max(scores, key=scores.get) == c
    assert hits / (len(cats) - half) > 0.8


# ---------------------------------------------------------------------------
# planted signal and drift
# ---------------------------------------------------------------------------


def test_planted_favourite_category_has_higher_ctr(small):
    truth = shop.planted_truth(0)
    fav = truth["affinity_before"].argmax(-1)  # (band, gender, region)
    y = _enriched(small).filter(pl.col("ts") < shop.DRIFT_START)
    y = y.with_columns(
        fav=pl.Series(np.array(shop.CATEGORIES)[fav[y["band"].to_numpy(), y["g"].to_numpy(), y["r"].to_numpy()]])
    )
    ctr = y.group_by(is_fav=pl.col("category") == pl.col("fav")).agg(
        ctr=pl.col("event").is_in(POSITIVE).sum() / (pl.col("event") == "impression").sum()
    )
    c = dict(zip(ctr["is_fav"], ctr["ctr"]))
    assert c[True] > 1.5 * c[False]


def test_group_favourite_holds_out_of_sample(small):
    # data only: choose each (age band, gender) group's best-CTR category on odd
    # days; on even days (pre-drift) that category must do better inside the
    # group than the same category does in the other groups (this controls for
    # categories that are simply good for everybody)
    y = _enriched(small).filter(pl.col("ts") < shop.DRIFT_START).with_columns(
        fold=pl.col("ts").dt.ordinal_day() % 2,
        grp=pl.col("band") * 3 + pl.col("g"),
        pos=pl.col("event").is_in(POSITIVE).cast(pl.Int64),
        imp=(pl.col("event") == "impression").cast(pl.Int64),
    )
    ctr = y.group_by("fold", "grp", "category").agg(pl.col("pos").sum(), pl.col("imp").sum())
    best = (
        ctr.filter(pl.col("fold") == 1)
        .with_columns(c=pl.col("pos") / pl.col("imp"))
        .sort("c", "category", descending=[True, False])
        .group_by("grp", maintain_order=True)
        .first()
        .select("grp", fav="category")
    )
    held = ctr.filter(pl.col("fold") == 0)
    inside = held.join(best, left_on=["grp", "category"], right_on=["grp", "fav"])
    outside = held.join(best, left_on="category", right_on="fav").filter(pl.col("grp") != pl.col("grp_right"))
    ctr_in = inside["pos"].sum() / inside["imp"].sum()
    ctr_out = outside["pos"].sum() / outside["imp"].sum()
    assert ctr_in > 1.3 * ctr_out


def test_drift_constants():
    assert shop.DRIFT_FRACTION == 0.75 and shop.DAYS == 120
    assert shop.START == datetime(2025, 1, 1)
    assert shop.time_range("tiny") == (shop.START, shop.END)
    assert shop.DRIFT_START == shop.START + 0.75 * (shop.END - shop.START) == datetime(2025, 4, 1)
    assert shop.drift_start() == shop.DRIFT_START
    t = shop.planted_truth(0)
    assert t["drift_segments"].any() and not t["drift_segments"].all()
    assert not np.allclose(t["affinity_before"], t["affinity_after"])
    assert t["trend_tag"] in shop.TAGS


def test_drift_changes_positive_shares_in_drifting_segments(small):
    truth = shop.planted_truth(0)
    fav = truth["affinity_before"].argmax(-1)
    y = _enriched(small).filter(pl.col("event").is_in(POSITIVE))
    b, g, r = y["band"].to_numpy(), y["g"].to_numpy(), y["r"].to_numpy()
    y = y.with_columns(
        fav=pl.Series(np.array(shop.CATEGORIES)[fav[b, g, r]]),
        drifts=pl.Series(truth["drift_segments"][b, g, r]),
        post=pl.col("ts") >= shop.DRIFT_START,
    )
    share = y.group_by("drifts", "post").agg(s=(pl.col("category") == pl.col("fav")).mean())
    s = {(d, p): v for d, p, v in share.iter_rows()}
    drop_drift = s[(True, False)] - s[(True, True)]
    change_stable = abs(s[(False, False)] - s[(False, True)])
    assert drop_drift > 0.07
    assert drop_drift > change_stable + 0.05


def test_model_trained_before_drift_gets_worse_after(small):
    # data only: the youngest band always drifts.  Per (gender, region) take the
    # most-clicked category in the first half of the pre-drift period; its share
    # of positives must fall after the drift compared with the held-out
    # second pre-drift half (so the drop is drift, not regression to the mean)
    mid = shop.START + (shop.DRIFT_START - shop.START) / 2
    y = (
        _enriched(small)
        .filter(pl.col("event").is_in(POSITIVE) & (pl.col("band") == 0))
        .with_columns(
            period=pl.when(pl.col("ts") < mid).then(0).when(pl.col("ts") < shop.DRIFT_START).then(1).otherwise(2)
        )
    )
    fav = (
        y.filter(pl.col("period") == 0)
        .group_by("gender", "region", "category")
        .len()
        .sort("len", "category", descending=[True, False])
        .group_by("gender", "region", maintain_order=True)
        .first()
        .select("gender", "region", fav="category")
    )
    share = y.join(fav, on=["gender", "region"]).group_by("period").agg(s=(pl.col("category") == pl.col("fav")).mean())
    s = dict(zip(share["period"], share["s"]))
    assert s[2] < 0.85 * s[1]


def test_trending_tag_gains_after_drift(small):
    tag = shop.planted_truth(0)["trend_tag"]
    y = small["interactions"].join(small["items"].select("item_id", "tags"), on="item_id").with_columns(
        has=pl.col("tags").str.split("|").list.contains(tag), post=pl.col("ts") >= shop.DRIFT_START
    )
    ctr = y.filter(pl.col("has")).group_by("post").agg(
        c=pl.col("event").is_in(POSITIVE).sum() / (pl.col("event") == "impression").sum()
    )
    c = dict(zip(ctr["post"], ctr["c"]))
    assert c[True] > 1.2 * c[False]


# ---------------------------------------------------------------------------
# files and command line
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_write_roundtrip(tmp_path, tiny, fmt):
    paths = shop.write(tmp_path / "out", size="tiny", seed=0, fmt=fmt)
    assert set(paths) == {"users", "items", "interactions"}
    for name, p in paths.items():
        assert p == tmp_path / "out" / f"{name}.{fmt}" and p.exists()
        df = pl.read_parquet(p) if fmt == "parquet" else pl.read_csv(p, try_parse_dates=True)
        assert df.height == tiny[name].height
        assert df.columns == tiny[name].columns
        if fmt == "parquet":
            assert df.equals(tiny[name])
    with pytest.raises(ValueError):
        shop.write(tmp_path / "bad", size="tiny", fmt="json")


def test_cli(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run(
        [sys.executable, "-m", "dynstore.samples.shop", str(out), "--size", "tiny", "--seed", "3", "--format", "csv"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "users: 60 rows" in res.stdout and "items: 80 rows" in res.stdout
    n = pl.read_csv(out / "interactions.csv").height
    assert f"interactions: {n} rows" in res.stdout
    assert n == shop.generate("tiny", seed=3)["interactions"].height
