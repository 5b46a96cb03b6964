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
import sys
import time

import numpy as np

from .bootstrap import ensure_first_version
from .catalog import Catalog
from .encoder import HFEncoder, probe_device
from .errors import ConfigError, DynstoreError
from .evaluation import evaluate
from .finetune import finetune_encoder
from .freshness import refresh_plan
from .lock import writer_lock
from .model import FusionModel, ModelConfig
from .registry import is_rule, list_versions, rule_window
from .semantic import encode, item_docs, semantic_vectors
from .semcache import snapshot, store_encoder
from .versions import build_version, load_version
from .views import views_connection
from .window import TrainingWindow, WindowData, newest_event, parse_since, time_decay_days

__all__ = ["refresh"]

TOLERANCE = 0.01   # relative NDCG@10 drop still promoted
HOLDOUT = 0.10
MIN_EVAL_USERS = 30  # users with a positive needed to judge on the events current never saw


def refresh(catalog: Catalog, *, since: str | None = "30d", epochs: int | None = None, promote: bool = True,
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
    if finetune_encoder:
        if not isinstance(store_encoder(catalog), HFEncoder):
            raise ConfigError("--finetune-encoder needs a Hugging Face encoder; this store uses "
                              f"{catalog.config.model!r} (see `dynstore config --model`)")
    parse_since(since, _dt.datetime.now())  # a bad --since fails before any work
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    snap = snapshot(catalog)
    plan = refresh_plan(catalog, since=since, force=force, snapshot=snap)
    if not plan["needed"]:
        return {"status": "noop", "reason": plan["reason"],
                **({"version": plan["version"]} if plan["version"] is not None else {})}
    say(f"retraining: {plan['reason']}")
    say("encoding stale items ...")
    with writer_lock(catalog.path, "encode", wait=60):
        enc = encode(catalog, progress=progress)
    ensure_first_version(catalog)
    timings["encode_s"] = enc["seconds"]
    lv = load_version(catalog)
    con = views_connection(catalog)
    try:
        newest = newest_event(con)
        cutoff = parse_since(since, newest)
        t1 = time.perf_counter()
        prep = WindowData(catalog, lv, con, cutoff)
    finally:
        con.close()
    train, (hu, hi, hl) = prep.split()
    timings["prepare_s"] = round(time.perf_counter() - t1, 3)
    span_days = (train.ts.max() - train.ts.min()) / 86400.0 if len(train.ts) else 0.0
    config = ModelConfig(seed=seed, use_negatives=use_negatives, time_decay_days=time_decay_days(span_days))
    lv_row = next((r for r in list_versions(catalog) if r["version"] == lv.version), {})
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
        dev = probe_device(None)
    # early stopping on the holdout: how many epochs help depends on the data
    # (impressions multiply the steps of an epoch; a drift shortens what is
    # worth learning), and the refit below reuses the best count
    stats = model.fit(train, epochs=epochs, device=dev, init_residuals=(R0, rb0), holdout=(hu, hi, hl))
    timings["train_s"] = round(time.perf_counter() - t2, 3)
    ft = None
    cand_train = train
    old_model = catalog.config.model
    if finetune_encoder:
        ft, cand_train = _finetune(catalog, prep, train, model, steps=finetune_steps,
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
        number = build_version(catalog, model, lv.item_spec, lv.user_spec, parent=lv.version, status=status,
                               train_window=window, counts=counts,
                               metrics={"candidate": m_cand, "current": m_cur, "train": stats, "holdout": judged,
                                        **({"finetune": ft} if ft else {})},
                               residuals=residuals, snapshot=snap, items=prep.items,
                               switch_encoder=ft is not None and status == "current")
    finally:
        if ft is not None and status != "current":
            catalog.config.model = old_model  # not promoted: the store keeps its encoder
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
        published = build_version(catalog, rule, lv.item_spec, lv.user_spec, parent=lv.version,
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


def _finetune(catalog: Catalog, prep, train, model, *, steps, seed, device, progress, say, timings):
    """Fine-tune the encoder and re-encode every item; return the training data on the new vectors.

    Switches ``store.config.model`` in memory to the new encoder (saved to the
    config file only on promotion, in the version's registry commit); on failure the
    old encoder is restored and the half-made encoder directory stays out of use.
    """
    from dataclasses import replace

    docs_of = item_docs(catalog)
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
        ft = finetune_encoder(store_encoder(catalog, device=device), docs, train, model, model.residuals,
                              catalog.path / "encoders", steps=steps, seed=seed, device=device,
                              progress=step if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    timings["finetune_s"] = round(time.perf_counter() - t, 3)
    old_model = catalog.config.model
    catalog.config.model = _rel(catalog, ft["path"])
    try:
        say("re-encoding every item with the fine-tuned encoder ...")
        t = time.perf_counter()
        with writer_lock(catalog.path, "encode", wait=60):
            enc = encode(catalog, progress=progress, device=device)
        timings["reencode_s"] = round(time.perf_counter() - t, 3)
        ft["encoder"] = enc.get("encoder")
        prep.V, _ = semantic_vectors(catalog, prep.ids)
        new_train = replace(train, V=prep.V)
    except BaseException:
        catalog.config.model = old_model
        raise
    return ft, new_train


def _rel(catalog: Catalog, path: str) -> str:
    from pathlib import Path

    return Path(path).resolve().relative_to(catalog.path.resolve()).as_posix()


