"""Scoring a stored version on the newest events (``dynstore eval``).

The slice is the newest share of every interaction (or of a ``since`` window),
whatever window the version was trained on; each version reads behaviour as of
the slice's start. With ``since`` only the window is read (as ``refresh``
reads it), so memory follows the window, not the history.
"""
from __future__ import annotations

import datetime as _dt

import numpy as np

from dynstore.storage.catalog import Catalog
from dynstore.model.evaluation import evaluate
from dynstore.model.metrics import check_k
from dynstore.storage.registry import is_rule, list_versions
from dynstore.versions.embeddings import load_parameters, load_version
from dynstore.data.views import views_connection
from dynstore.versions.window import HOLDOUT, TrainingWindow, WindowData, newest_event

__all__ = ["evaluate_version"]


def evaluate_version(catalog: Catalog, *, version: int | None = None, k: int = 10, holdout: float = HOLDOUT,
                     since: str | None = None, as_built: bool = False) -> dict:
    """Recall@k, NDCG@k and AUC of a version on the newest ``holdout`` share of all interactions
    (of those in the ``since`` window: ``30d``, a date, ``all``/None for every one).

    The slice is the newest 10% of *every* interaction (of the window),
    whatever window the version was trained on, and the version may have
    learned from part of it; ``refresh`` instead judges on the newest 10% of
    its ``--since`` window, and only on events the current version never saw.
    So the two disagree; ``"slice"`` in the result says which events were used
    and how many of them the version was trained on. Every version reads
    behaviour as of the slice's start (from the window's events only, with
    ``since``), so none counts the events it is judged on.

    ``as_built`` says the items are as they were when the version was built
    (``encode`` scoring the version 1 it just wrote): a popularity rule's rows are
    then its content fused with zero residuals, so they are recomputed, not read,
    and the semantic cache's copy in memory is let go once the window has its own.
    """
    k = check_k(k)
    window = TrainingWindow.parse(since)  # a bad --since fails before any work
    lv = load_parameters(catalog, version)
    row = next((r for r in list_versions(catalog) if r["version"] == lv.version), {})
    # a rule version's item side is its content (a static rule recomputes it from the
    # window); only a trained one, or a rule whose items may have changed, is read back
    from_content = is_rule(row) and (as_built or lv.model.dynamic is None)
    if not from_content:
        lv = load_version(catalog, lv.version)
    con = views_connection(catalog)
    try:
        newest = newest_event(con)
        prep = WindowData(catalog, lv, con, window.start(newest), row.get("encoder") and (row["encoder"], lv.model.d))
    finally:
        con.close()
    if as_built:
        # the window holds its own copy of the vectors: encode drops the cache's and the
        # item documents (read again on their next use) rather than hold them under the scoring
        catalog.memo.invalidate("semantic", "docs")
    train, (hu, hi, hl) = prep.split(holdout)
    if is_rule(row) and lv.model.dynamic is None:
        # an early rule version kept its counts as a static bias (over all data)
        model = prep.rule(train, lv)
        out = evaluate(model, train, hu, hi, hl, residuals=model.residuals, k=k)
        scored = "the popularity rule on the events before the slice"
    else:
        # scored once, then dropped: the fused items overwrite the window's vectors (one matrix, not two)
        out = evaluate(lv.model, train, hu, hi, hl, residuals=None if from_content else prep.residuals_of(lv),
                       k=k, reuse_vectors=True)
        scored = f"version {lv.version} as stored"
    ts = prep.hold_ts
    trained_until = (row.get("snapshot") or {}).get("trained_until")
    seen = float(np.mean(ts <= int(trained_until))) if trained_until is not None and len(ts) else 0.0

    def iso(t) -> str:
        return _dt.datetime.fromtimestamp(int(t), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")

    slice_ = {"events": int(len(hl)), "users": int(len(np.unique(hu))), "from": iso(ts.min()), "to": iso(ts.max()),
              "share": holdout,
              "of": "all interactions" if window.start(newest) is None else f"the interactions since {since}", "trained_on_share": round(seen, 4), "scored": scored}
    return {"version": lv.version, **out, "slice": slice_}
