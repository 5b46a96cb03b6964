"""Tests of dynstore.model.features (attribute feature vectors)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynstore.model.features import FeatureSpec, stable_hash


def _table():
    return pa.table(
        {
            "item_id": [1, 2, 3, 4, 5, 6],
            "color": ["red", "blue", "red", None, "green", "red"],
            "price": [1.0, 2.0, 3.0, 1000.0, None, 5.0],
            "rating": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "in_stock": [True, False, None, True, True, False],
            "genres": ["a|b", "b", "a|c", None, "c|a", "b|a"],
            "tags": [["x", "y"], [], None, ["y"], ["z", "x"], ["x"]],
            "added": pa.array([dt.datetime(2020, 1, d) for d in range(1, 7)],
                              pa.timestamp("s")),
            "description": ["a rather long free text description of item %d, blah" % i
                            for i in range(6)],
        }
    )


def test_rules_chosen_per_column():
    spec = FeatureSpec.fit(_table(), "item_id")
    kinds = {c["name"]: c["kind"] for c in spec.columns}
    assert kinds == {
        "color": "onehot",
        "price": "numeric",
        "rating": "numeric",
        "in_stock": "bool",
        "genres": "multi_onehot",
        "tags": "multi_onehot",
        "added": "time",
    }  # id and long text skipped
    price = next(c for c in spec.columns if c["name"] == "price")
    rating = next(c for c in spec.columns if c["name"] == "rating")
    assert price["log1p"] and not rating["log1p"]  # skewed vs symmetric
    assert price["missing"] and not rating["missing"]
    assert spec.width == len(spec.feature_names())


def test_onehot_unknown_and_null():
    spec = FeatureSpec.fit(_table(), "item_id")
    names = spec.feature_names()
    X = spec.transform(pa.table({"color": ["red", "purple", None]}))
    col = {n: i for i, n in enumerate(names)}
    assert X[0, col["color=red"]] == 1 and X[0].sum() == 1
    assert X[1, col["color=<unknown>"]] == 1 and X[1].sum() == 1
    assert X[2].sum() == 0  # NULL -> zeros
    # vocabulary: most frequent first
    assert names[:3] == ["color=red", "color=blue", "color=green"]


def test_multi_hot_strings_and_lists():
    spec = FeatureSpec.fit(_table(), "item_id")
    col = {n: i for i, n in enumerate(spec.feature_names())}
    X = spec.transform(pa.table({"genres": ["a | c", "zz|a", None],
                                 "tags": pa.array([["y", "y"], ["new"], None])}))
    assert X[0, col["genres=a"]] == 1 and X[0, col["genres=c"]] == 1
    assert X[0, col["genres=b"]] == 0
    assert X[1, col["genres=<unknown>"]] == 1 and X[1, col["genres=a"]] == 1
    assert X[0, col["tags=y"]] == 1  # a repeated token lights its slot once
    assert X[1, col["tags=<unknown>"]] == 1
    assert X[2].sum() == 0


def test_numeric_standardised_logged_clipped_and_missing():
    spec = FeatureSpec.fit(_table(), "item_id")
    col = {n: i for i, n in enumerate(spec.feature_names())}
    X = spec.transform(_table())
    r = X[:, col["rating"]]
    assert abs(r.mean()) < 1e-6 and abs(r.std() - 1) < 1e-5
    assert X[4, col["price"]] == 0 and X[4, col["price<missing>"]] == 1
    assert X[0, col["price<missing>"]] == 0
    big = spec.transform(pa.table({"rating": [1e9], "price": [1e300]}))
    assert big[0, col["rating"]] == 5.0 and big[0, col["price"]] == 5.0
    # log1p: 1000 is not 200x further from the mean than 5
    p = X[:, col["price"]]
    assert p[3] < 3.0


def test_bool_and_time():
    spec = FeatureSpec.fit(_table(), "item_id")
    col = {n: i for i, n in enumerate(spec.feature_names())}
    X = spec.transform(_table())
    assert X[:, col["in_stock"]].tolist() == [1, 0, 0, 1, 1, 0]
    assert X[:, col["in_stock<missing>"]].tolist() == [0, 0, 1, 0, 0, 0]
    t = X[:, col["added"]]
    assert np.all(np.diff(t) > 0) and abs(t.mean()) < 1e-5


def test_hashing_for_high_cardinality_is_stable():
    n = 100
    brands = [f"brand{i % 40}" for i in range(n)]  # 40 > max_onehot, repeated -> not text
    t = pa.table({"id": list(range(n)), "brand": brands})
    spec = FeatureSpec.fit(t, "id", hash_width=16)
    assert spec.columns[0]["kind"] == "hash" and spec.width == 16
    X = spec.transform(pa.table({"brand": ["brand3", "never-seen"]}))
    assert X[0, stable_hash("brand3", 16)] == 1 and X[0].sum() == 1
    assert X[1, stable_hash("never-seen", 16)] == 1
    # stable across processes (Python's hash() is salted per process)
    code = "from dynstore.model.features import stable_hash; print(stable_hash('brand3', 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert int(out) == stable_hash("brand3", 16)


def test_free_text_unique_strings_skipped_and_exclude():
    n = 50
    t = pa.table({"id": list(range(n)), "name": [f"Item number {i}" for i in range(n)],
                  "cat": ["x", "y"] * (n // 2)})
    spec = FeatureSpec.fit(t, "id")
    assert [c["name"] for c in spec.columns] == ["cat"]
    assert FeatureSpec.fit(t, "id", exclude=["cat"]).width == 0


def test_missing_columns_and_empty_table():
    spec = FeatureSpec.fit(_table(), "item_id")
    X = spec.transform(pa.table({"other": [1, 2]}))
    assert X.shape == (2, spec.width) and X.sum() == 0 and X.dtype == np.float32
    assert spec.transform(_table().slice(0, 0)).shape == (0, spec.width)


def test_round_trip_and_determinism():
    t = _table()
    spec = FeatureSpec.fit(t, "item_id", max_onehot=2, hash_width=8)
    d = json.loads(json.dumps(spec.to_dict()))
    again = FeatureSpec.from_dict(d)
    assert again == spec
    np.testing.assert_array_equal(again.transform(t), spec.transform(t))
    # row order does not change the fitted rules
    perm = pa.table({c: t.column(c).take([5, 3, 1, 0, 2, 4]) for c in t.column_names})
    assert FeatureSpec.fit(perm, "item_id", max_onehot=2, hash_width=8) == spec


def test_polars_and_dictionary_input():
    pl = pytest.importorskip("polars")
    df = pl.DataFrame({"id": [1, 2, 3], "c": ["a", "b", "a"]}).with_columns(
        pl.col("c").cast(pl.Categorical))
    spec = FeatureSpec.fit(df, "id")
    assert spec.columns[0]["kind"] == "onehot"
    assert spec.transform(df)[:, 0].tolist() == [1, 0, 1]


_values = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d|e", "é"]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cats=st.lists(_values, min_size=1, max_size=30),
    nums=st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6)), min_size=30, max_size=30),
    max_onehot=st.integers(1, 5),
)
def test_random_tables_round_trip(cats, nums, max_onehot):
    n = len(cats)
    t = pa.table({"id": list(range(n)), "c": pa.array(cats, pa.string()),
                  "x": pa.array(nums[:n], pa.float64())})
    spec = FeatureSpec.fit(t, "id", max_onehot=max_onehot, hash_width=4)
    X = spec.transform(t)
    assert X.shape == (n, spec.width)
    assert np.isfinite(X).all() and np.abs(X).max(initial=0) <= 5
    again = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    np.testing.assert_array_equal(again.transform(t), X)


def test_numeric_buckets_make_non_linear_effects_learnable():
    """A release year gets quantile buckets beside its standardised value, so a model can
    prefer one band (recent films, mid prices) rather than only one slope."""
    years = pa.table({"id": list(range(100)), "year": [1950 + i % 70 for i in range(100)]})
    spec = FeatureSpec.fit(years, "id", buckets=4)
    names = spec.feature_names()
    assert names[0] == "year" and len(names) == 1 + 4
    X = spec.transform(pa.table({"year": [1951, 2018, None]}))
    assert X[0, 1] == 1 and X[1, 4] == 1          # lowest and highest band
    assert X[2].sum() == 0                       # missing: no band
    assert X[:2, 1:].sum(axis=1).tolist() == [1.0, 1.0]
    # a spec written before buckets existed reads back without them
    old = spec.to_dict()
    old.pop("buckets")
    for r in old["columns"]:
        r.pop("edges")
    old["width"] = 1
    assert FeatureSpec.from_dict(old).transform(pa.table({"year": [1951]})).shape == (1, 1)


def test_segments_of_users():
    users = pa.table({"user_id": list(range(40)), "region": ["n", "s", "e", "w"] * 10,
                      "age": list(range(20, 60)), "bio": [f"long free text about person {i}" * 3 for i in range(40)]})
    spec = FeatureSpec.fit(users, "user_id", buckets=2)
    assert spec.segment_columns() == [("region", 4), ("age", 2)]
    keys = spec.segments(pa.table({"region": ["s", "nowhere", None], "age": [21, 59, 40]}))
    assert keys.tolist() == [[2, 4], [-1, 5], [-1, 5]]  # vocabulary: e, n, s, w (ties by value)
    assert spec.n_segment_keys == 6
