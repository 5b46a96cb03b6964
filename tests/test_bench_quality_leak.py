"""The quality benchmark's documents hold only what was known (issue 22, the tag leak).

A cold item is a new item when it first appears: its document must not carry tags
written after that, nor after the split's cut; a warm item's may carry tags up to the
cut. Generated data only, no encoder.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quality as bq  # noqa: E402


def _docs(cold, cut_ts=100):
    heads = [("A (2001)", "Drama"), ("B (2002)", "Comedy"), ("C (2003)", "(no genres listed)")]
    # (tag, item, ts), time-sorted: item 0 tagged early and late; item 1 tagged after
    # its first appearance (ts 50) but before the cut; item 2 tagged before it appeared
    tags = (["early0", "mid1", "pre2", "late0", "after-cut2"],
            np.array([0, 1, 2, 0, 2]), np.array([10, 60, 70, 90, 150]))
    first_seen = np.array([5, 50, 120])
    return bq.movielens_documents(heads, tags, first_seen, cut_ts, np.asarray(cold))


def test_warm_items_keep_tags_written_before_the_cut_only():
    d = _docs([False, False, False])
    assert "early0" in d[0] and "late0" in d[0]
    assert "mid1" in d[1]
    assert "after-cut2" not in d[2]


def test_cold_items_keep_only_tags_written_before_they_first_appeared():
    d = _docs([True, True, True])
    # item 0 appeared at 5, item 1 at 50: every tag came later (the leak fixed)
    assert "Tags" not in d[0] and "Tags" not in d[1]
    # item 2 first appears after the cut: tags written before the cut are known then
    assert "pre2" in d[2] and "after-cut2" not in d[2]
    assert d[2] == "C (2003). Genres: . Tags: pre2."


def test_split_records_its_cut_and_cold_items_lose_nothing_else():
    ts = np.arange(10, dtype=np.int64) * 10
    events = (np.zeros(10, np.int64), np.array([0, 1, 0, 1, 2, 0, 1, 2, 3, 2]), ts, np.ones(10, np.int8))
    sp = bq.temporal_split(events, 4, frac=0.5, cold_frac=0.5, seed=0)
    assert sp.cut_ts == 50
    assert not np.isin(sp.item, np.flatnonzero(sp.cold)).any()
