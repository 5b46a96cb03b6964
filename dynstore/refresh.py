"""``refresh``: retrain from recent positives and negatives, publish a version.

Steps: pin a snapshot; encode stale items; build training events from the
window (the ``labelled_events`` view: positives and explicit negatives by the
labelling rules, plus shown-but-ignored impressions); hold out the most recent
10% by time; warm-start from the current version (the popularity rule for a
store's first refresh) and train -- the behaviour weights first, then
everything -- keeping the start unless a trained state is clearly better on the
holdout (:meth:`dynstore.training.Trainer.fit`); evaluate candidate, current
and the popularity rule on the holdout (only on its events newer than what a
trained current version learned from, when there are enough of them: see
:func:`_unseen_by_current`); write version N+1 and promote it unless its
NDCG@10 is worse than current's beyond a tolerance, then refit it on the
whole window for the epochs that were best. A rejected candidate stays
queryable; when the rule beats a trained current version on the holdout, the
store publishes the rule as the next version (the rule reads behaviour as of
every query, so it follows a drift that made trained weights stale).

A refresh that finds no interaction or item commit since the version it
would replace is a no-op (``status: "noop"``), so cron can run it often.
"""
from __future__ import annotations

import datetime as _dt
import re
import sys
import time

import numpy as np

from .errors import ConfigError, DynstoreError

__all__ = ["refresh", "evaluate_version", "parse_since", "newest_event"]

TOLERANCE = 0.01   # relative NDCG@10 drop still promoted
HOLDOUT = 0.10
MIN_EVAL_USERS = 30  # users with a positive needed to judge on the events current never saw


def parse_since(since: str | None, newest: _dt.datetime) -> _dt.datetime | None:
    """Start of the training window; relative windows count back from ``newest``.

    Examples
    --------
    >>> import datetime as dt
    >>> parse_since("7d", dt.datetime(2025, 1, 8))
    datetime.datetime(2025, 1, 1, 0, 0)
    >>> parse_since("all", dt.datetime(2025, 1, 8)) is None
    True
    """
    if since is None or str(since).lower() == "all":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([hdw])\s*", str(since))
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return newest - _dt.timedelta(hours=n) if unit == "h" else newest - _dt.timedelta(days=n * (7 if unit == "w" else 1))
    try:
        return _dt.datetime.fromisoformat(str(since))
    except ValueError:
        raise ConfigError(f"--since {since!r}: use e.g. 30d, 12w, 48h, a date like 2025-01-31, or 'all'") from None


def newest_event(con) -> _dt.datetime | None:
    """What relative windows (``--since 30d``) count back from: the newest interaction
    that is not in the future (a day of clock skew allowed), so one stray timestamp
    from year 2999 (``ingest --allow-future``) cannot empty every window; the newest
    of all when every event is in the future.
    """
    from .ingest import FUTURE_TOLERANCE_S

    limit = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None) + _dt.timedelta(seconds=FUTURE_TOLERANCE_S)
    return con.execute("SELECT coalesce(max(ts) FILTER (WHERE ts <= ?), max(ts)) FROM interactions",
                       [limit]).fetchall()[0][0]


def time_decay_days(span_days: float) -> float:
    """Half-life of event weights for a window of ``span_days``.

    Recent behaviour matters most: events a quarter of the window old count
    half (a year at most, a week at least).

    >>> time_decay_days(120.0), time_decay_days(10_000.0)
    (30.0, 365.0)
    """
    return float(np.clip(span_days / 4, 7, 365))


def _events(con, cutoff: _dt.datetime | None):
    """Training events as Arrow: user_id, item_id, ts (epoch s), label (1/-1/0), as the
    ``labelled_events`` view decides them -- the same events serving reads."""
    where = "" if cutoff is None else "WHERE ts >= ?"
    params = [] if cutoff is None else [cutoff]
    return con.sql(f"""
        SELECT user_id, item_id, epoch(ts)::BIGINT AS ts, label FROM labelled_events {where}
        ORDER BY ts, user_id, item_id, label
    """, params=params or None).to_arrow_table()


class _Prepared:
    """Items, users and events of one snapshot mapped to matrix rows."""

    def __init__(self, store, lv, con, cutoff):
        from .semantic import semantic_vectors
        from .versions import items_table, users_table

        items = items_table(store)
        self.items = items
        self.ids = items.column("item_id").to_pylist()
        self.item_row = {i: n for n, i in enumerate(self.ids)}
        self.V, _ = semantic_vectors(store, self.ids)
        self.A = np.asarray(lv.item_spec.transform(items), np.float32)
        users = users_table(store)
        self.user_ids = users.column("user_id").to_pylist()
        self.user_row = {u: n for n, u in enumerate(self.user_ids)}
        ev = _events(con, cutoff)
        u = ev.column("user_id").to_pylist()
        for x in u:
            if x not in self.user_row:
                self.user_row[x] = len(self.user_ids)
                self.user_ids.append(x)
        UA = np.asarray(lv.user_spec.transform(users), np.float32) if lv.user_spec.width else np.zeros((len(users), 0), np.float32)
        extra = len(self.user_ids) - len(UA)  # users with events but no attributes
        self.UA = np.vstack([UA, np.zeros((extra, UA.shape[1]), np.float32)])
        UK = lv.user_spec.segments(users)
        self.UK = np.vstack([UK, np.full((extra, UK.shape[1]), -1, np.int64)])
        it = np.fromiter((self.item_row.get(i, -1) for i in ev.column("item_id").to_pylist()), np.int64)
        us = np.fromiter((self.user_row[x] for x in u), np.int64, len(u))
        keep = it >= 0
        self.user, self.item = us[keep], it[keep]
        self.ts = ev.column("ts").to_numpy(zero_copy_only=False)[keep].astype(np.int64)
        self.label = ev.column("label").to_numpy(zero_copy_only=False)[keep].astype(np.int8)

    def split(self, holdout: float = HOLDOUT):
        """Train on all but the most recent ``holdout`` share of events."""
        from .model import TrainingData

        if len(self.ts) == 0:
            cut = 0
        else:
            cut = np.quantile(self.ts, 1.0 - holdout, method="lower")
        tr = self.ts < cut if len(self.ts) else np.zeros(0, bool)
        if tr.sum() == 0 or (~tr).sum() == 0:
            raise DynstoreError("not enough interactions in the window to train and evaluate; widen --since")
        train = TrainingData(V=self.V, A=self.A, UA=self.UA, user=self.user[tr], item=self.item[tr],
                             ts=self.ts[tr], label=self.label[tr], UK=self.UK)
        self.hold_ts = self.ts[~tr]
        return train, (self.user[~tr], self.item[~tr], self.label[~tr])

    def rule(self, data, lv):
        """The popularity rule (an untrained model: decayed positives with the half-life
        fitted to the span of ``data``), scored as of the end of ``data``."""
        from .dynamics import DynamicSpec, rule_half_life
        from .model import FusionModel, ModelConfig

        spec = lv.model.dynamic or DynamicSpec()
        span = (float(data.ts.max()) - float(data.ts.min())) / 86400.0 if len(data.ts) else 0.0
        return FusionModel.untrained(data.V, self.A, self.UA.shape[1], None, ModelConfig(),
                                     rule=rule_half_life(spec, span), dynamic=spec,
                                     segments=tuple(n for _, n in lv.user_spec.segment_columns()))

    def all_events(self):
        """Every event of the window (train and holdout) as training data."""
        from .model import TrainingData

        return TrainingData(V=self.V, A=self.A, UA=self.UA, user=self.user, item=self.item,
                            ts=self.ts, label=self.label, UK=self.UK)

    def residuals_of(self, lv) -> tuple[np.ndarray, np.ndarray]:
        """The current version's per-item residuals, recovered from its rows."""
        base_w, base_b = lv.model.item_side(self.V, self.A, None)
        R = np.zeros_like(base_w)
        rb = np.zeros(len(self.ids), np.float32)
        for n, i in enumerate(self.ids):
            r = lv.row.get(i)
            if r is not None:
                R[n] = lv.Wf[r] - base_w[n]
                rb[n] = lv.bias[r] - base_b[n]
        return R, rb


def refresh(store, *, since: str | None = "30d", epochs: int | None = None, promote: bool = True,
            finetune_encoder: bool = False, finetune_steps: int | None = None, seed: int = 0,
            progress: bool = False, device: str | None = None, tolerance: float = TOLERANCE,
            use_negatives: bool = True, force: bool = False, refit: bool = True) -> dict:
    """Retrain, evaluate and publish a new embedding version (see module doc).

    With ``finetune_encoder`` the last layers of the text encoder are also
    fine-tuned on the training events (:mod:`dynstore.finetune`), every item
    is re-encoded with the result (a new encoder id and cache), and the fusion
    is trained again on the new vectors before the evaluation. The store
    switches to the fine-tuned encoder only if the version is promoted.

    Returns ``{"version", "status", "metrics": {"candidate", "current"}, "counts", "durations"}``
    (plus ``"finetune"`` when fine-tuning) or ``{"status": "noop", "reason"}``.
    """
    from .freshness import refresh_plan
    from .model import FusionModel, ModelConfig, evaluate
    from .semantic import encode
    from .versions import build_version, is_rule, list_versions, load_version, rule_window
    from .lock import writer_lock

    if finetune_encoder:
        from .encoders import HFEncoder
        from .semantic import store_encoder

        if not isinstance(store_encoder(store), HFEncoder):
            raise ConfigError("--finetune-encoder needs a Hugging Face encoder; this store uses "
                              f"{store.config.model!r} (see `dynstore config --model`)")
    parse_since(since, _dt.datetime.now())  # a bad --since fails before any work
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    snap = store.snapshot()
    plan = refresh_plan(store, since=since, force=force, snapshot=snap)
    if not plan["needed"]:
        return {"status": "noop", "reason": plan["reason"],
                **({"version": plan["version"]} if plan["version"] is not None else {})}
    say(f"retraining: {plan['reason']}")
    say("encoding stale items ...")
    with writer_lock(store.path, "encode", wait=60):
        enc = encode(store, progress=progress)
    timings["encode_s"] = enc["seconds"]
    lv = load_version(store)
    con = store.connection()
    try:
        newest = newest_event(con)
        cutoff = parse_since(since, newest)
        t1 = time.perf_counter()
        prep = _Prepared(store, lv, con, cutoff)
    finally:
        con.close()
    train, (hu, hi, hl) = prep.split()
    timings["prepare_s"] = round(time.perf_counter() - t1, 3)
    span_days = (train.ts.max() - train.ts.min()) / 86400.0 if len(train.ts) else 0.0
    config = ModelConfig(seed=seed, use_negatives=use_negatives, time_decay_days=time_decay_days(span_days))
    lv_row = next((r for r in list_versions(store) if r["version"] == lv.version), {})
    current_is_rule = is_rule(lv_row)
    hu, hi, hl, judged = _unseen_by_current(prep, hu, hi, hl, None if current_is_rule
                                            else lv_row.get("snapshot", {}).get("trained_until"))
    # Every model here reads behaviour as of the end of `train` when it is judged,
    # so the rule and current are scored on the holdout without having counted it.
    rule_at_cut = prep.rule(train, lv)
    if lv.model.dynamic is None:
        # a version from before dynamic features: its popularity is a static bias
        # counted over all data (the holdout included), so the rule stands in for it
        start = current = rule_at_cut
        R0, rb0 = rule_at_cut.residuals
    else:
        start = current = lv.model
        R0, rb0 = prep.residuals_of(lv)
    tensors, meta = start.state()
    meta = dict(meta, config=config.to_dict())

    def fresh() -> FusionModel:
        """The candidate before training: current's parameters (or the rule's), today's settings."""
        return FusionModel.from_state(tensors, meta)

    model = fresh()
    say(f"training on {len(train.label)} events ({int((train.label == 1).sum())} positives) ...")
    t2 = time.perf_counter()
    dev = device
    if dev is None:
        from .encoders import probe_device

        dev = probe_device(None)
    # early stopping on the holdout: how many epochs help depends on the data
    # (impressions multiply the steps of an epoch; a drift shortens what is
    # worth learning), and the refit below reuses the best count
    stats = model.fit(train, epochs=epochs, device=dev, init_residuals=(R0, rb0), holdout=(hu, hi, hl))
    timings["train_s"] = round(time.perf_counter() - t2, 3)
    ft = None
    cand_train = train
    old_model = store.config.model
    if finetune_encoder:
        ft, cand_train = _finetune(store, prep, train, model, steps=finetune_steps,
                                   seed=seed, device=dev, progress=progress, say=say, timings=timings)
        # The same training as above, from the same start, on the fine-tuned
        # vectors: the comparison with current then measures the encoder.
        say("training the fusion on the fine-tuned vectors ...")
        t = time.perf_counter()
        model = fresh()
        stats = model.fit(cand_train, epochs=epochs, device=dev, init_residuals=(R0, rb0), holdout=(hu, hi, hl))
        timings["train_s"] = round(timings["train_s"] + time.perf_counter() - t, 3)
    t3 = time.perf_counter()
    m_cand = evaluate(model, cand_train, hu, hi, hl, k=10)
    m_cur = evaluate(current, train, hu, hi, hl, residuals=(R0, rb0), k=10)
    m_rule = evaluate(rule_at_cut, train, hu, hi, hl, residuals=rule_at_cut.residuals, k=10)
    timings["eval_s"] = round(time.perf_counter() - t3, 3)
    better = m_cand["ndcg@10"] >= m_cur["ndcg@10"] * (1.0 - tolerance)
    status = "current" if (promote and better) else ("candidate" if better else "rejected")
    if status != "rejected" and refit:
        # The holdout decided; the published model also learns from it, so
        # the newest events (the most telling ones) are not left out.
        say(f"refitting on all {len(prep.label)} events ...")
        t4 = time.perf_counter()
        gamma = model.params.get("gamma")
        model = fresh()
        model.fit(prep.all_events(), epochs=stats["best_epoch"], device=dev, init_residuals=(R0, rb0))
        if gamma is not None:  # chosen on the holdout; the refit keeps it
            model.params["gamma"] = gamma
        timings["refit_s"] = round(time.perf_counter() - t4, 3)
    residuals = model.residuals if model.residuals is not None else (R0, rb0)
    counts = {"events": int(len(prep.label)), "train": int(len(train.label)), "holdout": int(len(hl)),
              "positives": int((prep.label == 1).sum()), "negatives": int((prep.label == -1).sum()),
              "impressions": int((prep.label == 0).sum()), "items": len(prep.ids), "users": len(prep.user_ids)}
    window = "all" if cutoff is None else f"{cutoff:%Y-%m-%d %H:%M} .. {newest:%Y-%m-%d %H:%M}"
    trained_until = int(prep.ts.max() if status != "rejected" and refit else train.ts.max())
    snap = dict(snap, since=since, trained_until=trained_until, rules=plan["rules"])
    try:
        # a promoted fine-tuned encoder becomes the store's in the registry commit itself
        number = build_version(store, model, lv.item_spec, lv.user_spec, parent=lv.version, status=status,
                               train_window=window, counts=counts,
                               metrics={"candidate": m_cand, "current": m_cur, "train": stats, "holdout": judged,
                                        **({"finetune": ft} if ft else {})},
                               residuals=residuals, snapshot=snap, items=prep.items,
                               switch_encoder=ft is not None and status == "current")
    finally:
        if ft is not None and status != "current":
            store.config.model = old_model  # not promoted: the store keeps its encoder
            store._con_state = None
    published = None
    stale_rule = current_is_rule and lv.model.dynamic is None  # counts frozen at its creation
    if status == "rejected" and promote and (stale_rule or (not current_is_rule
                                                            and m_rule["ndcg@10"] > m_cur["ndcg@10"])):
        # The trained model lost, but the popularity rule it was compared with
        # beat what the store serves: serve the rule (it reads behaviour as of
        # every query, so it follows a drift that made current's weights stale).
        say("publishing the popularity rule ...")
        data = prep.all_events()
        data.V = train.V  # the store's encoder (a rejected fine-tune is not used)
        rule = prep.rule(data, lv)
        published = build_version(store, rule, lv.item_spec, lv.user_spec, parent=lv.version,
                                  status="current", counts=counts,
                                  train_window=rule_window(float(prep.ts.min()), float(prep.ts.max())),
                                  metrics={"current": m_cur, "rule": m_rule, "rejected": number},
                                  residuals=rule.residuals, snapshot=dict(snap, trained_until=int(prep.ts.max())),
                                  items=prep.items, verdict="rule")
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    out = {"version": number, "parent": lv.version, "status": status,
           "promoted": status == "current", "metrics": {"candidate": m_cand, "current": m_cur, "rule": m_rule},
           "counts": counts, "durations": timings, "window": window, "holdout": judged,
           "reasons": plan["reasons"],
           # training never clearly beat its start on the holdout: the version
           # carries the start's parameters (plus, maybe, an item-item weight)
           "kept_start": stats.get("best_epoch") == -1 and _gamma(model.params) == _gamma(tensors),
           "training": {k: stats[k] for k in ("best_epoch", "epochs", "epoch_ndcg@10", "gamma") if k in stats}}
    if published is not None:
        out["published"] = {"version": published, "status": "current", "kind": "popularity rule"}
    if ft is not None:
        out["finetune"] = ft
    return out


def _gamma(params: dict) -> float:
    """The item-item weight in a parameter dict (0 without one)."""
    return float(np.ravel(params.get("gamma", [0.0]))[0])


def _unseen_by_current(prep, hu, hi, hl, trained_until):
    """The holdout events to judge on, and how they were chosen.

    A trained current version was refitted on its whole window, so part of
    this holdout may be events it learned from (a daily refresh over 30 days
    adds ~3% new events, the holdout is the newest 10%). Judged on those, the
    current version would look better than it is and a better candidate could
    never win; so the comparison uses only the events newer than what current
    saw, when they hold at least ``MIN_EVAL_USERS`` users with a positive.
    """
    info = {"events": int(len(hl)), "seen_by_current": 0.0, "judged_on": "all"}
    if trained_until is None or not len(hl):
        return hu, hi, hl, info
    unseen = prep.hold_ts > int(trained_until)
    info["seen_by_current"] = round(float(1.0 - unseen.mean()), 4)
    if unseen.all():
        return hu, hi, hl, info
    if len(np.unique(hu[unseen & (hl == 1)])) >= MIN_EVAL_USERS:
        info.update(judged_on="unseen by current", events=int(unseen.sum()))
        return hu[unseen], hi[unseen], hl[unseen], info
    info["judged_on"] = "all (too few unseen events; biased towards current)"
    return hu, hi, hl, info


def _finetune(store, prep, train, model, *, steps, seed, device, progress, say, timings):
    """Fine-tune the encoder and re-encode every item; return the training data on the new vectors.

    Switches ``store.config.model`` in memory to the new encoder (saved to the
    config file only on promotion, in the version's registry commit); on failure the
    old encoder is restored and the half-made encoder directory stays out of use.
    """
    from dataclasses import replace

    from .encoders import finetune_encoder
    from .lock import writer_lock
    from .semantic import encode, item_docs, semantic_vectors, store_encoder

    docs_of = item_docs(store)
    docs = [docs_of.get(i, (None, None))[1] for i in prep.ids]
    say("fine-tuning the encoder ...")
    t = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="fine-tuning", unit="step", file=sys.stderr, dynamic_ncols=True)

    def step(done: int, total: int) -> None:
        bar.total = total
        bar.update(1)

    try:
        ft = finetune_encoder(store_encoder(store, device=device), docs, train, model, model.residuals,
                              store.path / "encoders", steps=steps, seed=seed, device=device,
                              progress=step if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    timings["finetune_s"] = round(time.perf_counter() - t, 3)
    old_model = store.config.model
    store.config.model = _rel(store, ft["path"])
    store._con_state = None
    try:
        say("re-encoding every item with the fine-tuned encoder ...")
        t = time.perf_counter()
        with writer_lock(store.path, "encode", wait=60):
            enc = encode(store, progress=progress, device=device)
        timings["reencode_s"] = round(time.perf_counter() - t, 3)
        ft["encoder"] = enc.get("encoder")
        prep.V, _ = semantic_vectors(store, prep.ids)
        new_train = replace(train, V=prep.V)
    except BaseException:
        store.config.model = old_model
        store._con_state = None
        raise
    return ft, new_train


def _rel(store, path: str) -> str:
    from pathlib import Path

    return Path(path).resolve().relative_to(store.path.resolve()).as_posix()


def evaluate_version(store, *, version: int | None = None, k: int = 10, holdout: float = HOLDOUT) -> dict:
    """Recall@k, NDCG@k and AUC of a version on the newest ``holdout`` share of all interactions.

    The slice is the newest 10% of *every* interaction, whatever window the
    version was trained on, and the version may have learned from part of
    it; ``refresh`` instead judges on the newest 10% of its ``--since``
    window, and only on events the current version never saw. So the two
    disagree; ``"slice"`` in the result says which events were used and how
    many of them the version was trained on. Every version reads behaviour as
    of the slice's start, so none counts the events it is judged on.
    """
    from .model import evaluate
    from .recommend import check_k
    from .versions import is_rule, list_versions, load_version

    k = check_k(k)
    lv = load_version(store, version)
    row = next((r for r in list_versions(store) if r["version"] == lv.version), {})
    con = store.connection()
    try:
        prep = _Prepared(store, lv, con, None)
    finally:
        con.close()
    train, (hu, hi, hl) = prep.split(holdout)
    if is_rule(row) and lv.model.dynamic is None:
        # an early rule version kept its counts as a static bias (over all data)
        model = prep.rule(train, lv)
        out = evaluate(model, train, hu, hi, hl, residuals=model.residuals, k=k)
        scored = "the popularity rule on the events before the slice"
    else:
        out = evaluate(lv.model, train, hu, hi, hl, residuals=prep.residuals_of(lv), k=k)
        scored = f"version {lv.version} as stored"
    ts = prep.hold_ts
    trained_until = (row.get("snapshot") or {}).get("trained_until")
    seen = float(np.mean(ts <= int(trained_until))) if trained_until is not None and len(ts) else 0.0

    def iso(t) -> str:
        return _dt.datetime.fromtimestamp(int(t), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")

    slice_ = {"events": int(len(hl)), "users": int(len(np.unique(hu))), "from": iso(ts.min()), "to": iso(ts.max()),
              "share": holdout, "of": "all interactions", "trained_on_share": round(seen, 4), "scored": scored}
    return {"version": lv.version, **out, "slice": slice_}
