"""``refresh``: retrain from recent positives and negatives, publish a version.

Steps: pin a snapshot; encode stale items; build training events from the
window (the ``labelled_events`` view: positives and explicit negatives by the
labelling rules, plus shown-but-ignored impressions); hold out the most recent
10% by time; warm-start from the current version (the popularity rule for a
store's first refresh) and train -- the behaviour weights first, then
everything -- keeping the start unless a trained state is clearly better on the
holdout (:meth:`dynstore.model.training.Trainer.fit`), and the closed-form terms'
weights (item-item ``gamma``, content prior ``beta``) chosen on the holdout and
four earlier forward-chained cuts pooled, each judged on the users it affects
(:mod:`dynstore.model.selection`; ``--json`` reports each choice's gain, standard
error and users under ``training.selection``); evaluate candidate, current
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

import sys
import time
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dynstore.versions.bootstrap import ensure_first_version
from dynstore.storage.catalog import Catalog
from dynstore.encoders import HFEncoder, probe_device
from dynstore.errors import ConfigError, DynstoreError
from dynstore.model.evaluation import evaluate
from dynstore.model.finetune import finetune_encoder
from dynstore.versions.freshness import refresh_plan
from dynstore.model.fusion import FusionModel, ModelConfig, TrainingData
from dynstore.storage.registry import is_rule, list_versions, rule_window
from dynstore.results import RefreshMetrics, RefreshResult
from dynstore.data.semantic import encode, item_docs, semantic_vectors
from dynstore.encoders.cache import snapshot, store_encoder
from dynstore.versions.embeddings import LoadedVersion, build_version, load_version
from dynstore.data.views import views_connection
from dynstore.versions.window import DEFAULT_SINCE, TrainingWindow, WindowData, newest_event, time_decay_days

__all__ = ["refresh", "RefreshOptions"]

TOLERANCE = 0.01   # relative NDCG@10 drop still promoted
MIN_EVAL_USERS = 30  # users with a positive needed to judge on the events current never saw
#: weights chosen on the pooled cuts (:mod:`dynstore.model.selection`) that the refit keeps
CHOSEN = ("gamma", "beta", "delta", "eta")


@dataclass(frozen=True)
class RefreshOptions:
    """What a refresh was asked for: the keyword arguments of :func:`refresh`.

    ``since``: the training window (``30d``, ``12w``, ``48h``, a date, ``all``);
    ``epochs``: a fixed count instead of early stopping; ``promote``: make a
    version that is not worse current (else it stays a candidate);
    ``finetune_encoder``/``finetune_steps``: fine-tune the text encoder too;
    ``tolerance``: the relative NDCG@10 drop still promoted; ``force``:
    retrain although nothing changed; ``refit``: learn the published model
    from the holdout too, for the epochs that were best.
    """

    since: str | None = DEFAULT_SINCE
    epochs: int | None = None
    promote: bool = True
    finetune_encoder: bool = False
    finetune_steps: int | None = None
    seed: int = 0
    progress: bool = False
    device: str | None = None
    tolerance: float = TOLERANCE
    use_negatives: bool = True
    force: bool = False
    refit: bool = True


#: The fields of :class:`RefreshOptions`: ``Store.refresh``'s keyword arguments.
REFRESH_FIELDS = frozenset(f.name for f in fields(RefreshOptions))


@dataclass
class Prepared:
    """Stage 1, the window: current version, events as rows, the train/holdout split,
    and the models every candidate is compared with."""

    current_version: LoadedVersion
    current_row: dict
    data: WindowData
    train: TrainingData
    holdout: tuple          # (users, items, labels) judged on
    judged: dict            # which holdout events were used, and why
    rule: FusionModel       # the popularity rule as of the end of train
    current: FusionModel    # what the store serves (or the rule standing in for it)
    residuals: tuple        # current's per-item residuals (R, rb)
    start: tuple            # (tensors, meta) every training starts from
    window_label: str

    @cached_property
    def counts(self) -> dict:
        """Events (train, holdout, by label), items and users of the window: what a version records."""
        data = self.data
        return {"events": int(len(data.label)), "train": int(len(self.train.label)),
                "holdout": int(len(self.holdout[2])), "positives": int((data.label == 1).sum()),
                "negatives": int((data.label == -1).sum()), "impressions": int((data.label == 0).sum()),
                "items": len(data.ids), "users": len(data.user_ids)}

    def fresh(self) -> FusionModel:
        """The candidate before training: current's parameters (or the rule's), today's settings."""
        return FusionModel.from_state(*self.start)


@dataclass
class Candidate:
    """Stage 2: the trained model, its training statistics and the data it was judged with."""

    model: FusionModel
    stats: dict
    train: TrainingData
    finetune: dict | None = None


@dataclass
class Verdict:
    """Stage 3: holdout figures of candidate, current and the rule, and the status they give."""

    candidate: dict
    current: dict
    rule: dict
    status: str


@dataclass
class _Run:
    """One refresh: its options, clock and the stages below, in order."""

    catalog: Catalog
    options: RefreshOptions
    window: TrainingWindow
    snap: dict
    plan: dict
    timings: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    device: str | None = None
    #: the store's encoder before a fine-tune switched the in-memory config to the new one
    store_model: str = ""

    def say(self, message: str) -> None:
        if self.options.progress:
            print(message, file=sys.stderr)

    def prepare(self) -> Prepared:
        """Encode stale items, read the window of the snapshot and split it."""
        cat, opts = self.catalog, self.options
        self.say(f"retraining: {self.plan['reason']}")
        self.say("encoding stale items ...")
        with cat.lock("encode", wait=60):
            enc = encode(cat, progress=opts.progress)
        ensure_first_version(cat)
        self.timings["encode_s"] = enc.seconds
        lv = load_version(cat)
        con = views_connection(cat)
        try:
            newest = newest_event(con)
            t1 = time.perf_counter()
            data = WindowData(cat, lv, con, self.window.start(newest))
        finally:
            con.close()
        train, (hu, hi, hl) = data.split()
        self.timings["prepare_s"] = round(time.perf_counter() - t1, 3)
        row = next((r for r in list_versions(cat) if r["version"] == lv.version), {})
        hu, hi, hl, judged = _unseen_by_current(data, hu, hi, hl, None if is_rule(row)
                                                else row.get("snapshot", {}).get("trained_until"))
        # Every model here reads behaviour as of the end of `train` when it is judged,
        # so the rule and current are scored on the holdout without having counted it.
        rule = data.rule(train, lv)
        if lv.model.dynamic is None or lv.model.d != data.V.shape[1]:
            # a version from before dynamic features: its popularity is a static bias
            # counted over all data (the holdout included), so the rule stands in for it;
            # so it does for a version of another encoder (other vectors, another width)
            current, residuals = rule, rule.residuals
        else:
            current, residuals = data.model_of(lv), data.residuals_of(lv)  # its item terms by id
        span_days = (train.ts.max() - train.ts.min()) / 86400.0 if len(train.ts) else 0.0
        config = ModelConfig(seed=opts.seed, use_negatives=opts.use_negatives,
                             time_decay_days=time_decay_days(span_days))
        tensors, meta = current.state()
        return Prepared(lv, row, data, train, (hu, hi, hl), judged, rule, current, residuals,
                        (tensors, dict(meta, config=config.to_dict())), self.window.describe(newest))

    def train(self, p: Prepared) -> Candidate:
        """Train the candidate from current's parameters; with fine-tuning, train again on the new vectors."""
        opts = self.options
        self.device = opts.device if opts.device is not None else probe_device(None)
        self.say(f"training on {len(p.train.label)} events ({int((p.train.label == 1).sum())} positives) ...")
        t = time.perf_counter()
        model, stats = self._fit(p, p.train)
        self.timings["train_s"] = round(time.perf_counter() - t, 3)
        if not opts.finetune_encoder:
            return Candidate(model, stats, p.train)
        self.store_model = self.catalog.config.model
        ft, ft_train = _finetune(self, p.data, p.train, model)
        # The same training as above, from the same start, on the fine-tuned
        # vectors: the comparison with current then measures the encoder.
        self.say("training the fusion on the fine-tuned vectors ...")
        t = time.perf_counter()
        model, stats = self._fit(p, ft_train)
        self.timings["train_s"] = round(self.timings["train_s"] + time.perf_counter() - t, 3)
        return Candidate(model, stats, ft_train, ft)

    def _fit(self, p: Prepared, data: TrainingData) -> tuple[FusionModel, dict]:
        # early stopping on the holdout: how many epochs help depends on the data
        # (impressions multiply the steps of an epoch; a drift shortens what is
        # worth learning), and the refit reuses the best count
        model = p.fresh()
        stats = model.fit(data, epochs=self.options.epochs, device=self.device, init_residuals=p.residuals,
                          holdout=p.holdout)
        return model, stats

    def judge(self, p: Prepared, cand: Candidate) -> Verdict:
        """Candidate, current and the rule on the same holdout; promote unless worse beyond the tolerance."""
        hu, hi, hl = p.holdout
        t = time.perf_counter()
        m_cand = evaluate(cand.model, cand.train, hu, hi, hl, k=10)
        m_cur = evaluate(p.current, p.train, hu, hi, hl, residuals=p.residuals, k=10)
        m_rule = evaluate(p.rule, p.train, hu, hi, hl, residuals=p.rule.residuals, k=10)
        self.timings["eval_s"] = round(time.perf_counter() - t, 3)
        better = m_cand["ndcg@10"] >= m_cur["ndcg@10"] * (1.0 - self.options.tolerance)
        status = "current" if (self.options.promote and better) else ("candidate" if better else "rejected")
        return Verdict(m_cand, m_cur, m_rule, status)

    def refit(self, p: Prepared, cand: Candidate, verdict: Verdict) -> FusionModel:
        """The published model: refitted on every event of the window when it is kept,
        so the newest events (the most telling ones) are not left out."""
        if verdict.status == "rejected" or not self.options.refit:
            return cand.model
        self.say(f"refitting on all {len(p.data.label)} events ...")
        t = time.perf_counter()
        chosen = {k: cand.model.params[k] for k in CHOSEN if k in cand.model.params}
        model = p.fresh()
        model.fit(p.data.all_events(), epochs=cand.stats["best_epoch"], device=self.device,
                  init_residuals=p.residuals)
        model.params.update(chosen)  # the closed-form terms' weights, chosen on the cuts
        model.config.item_item_recency = cand.model.config.item_item_recency  # chosen with gamma
        model.theta_new = cand.model.theta_new  # the new users' bias, chosen on the cuts too
        self.timings["refit_s"] = round(time.perf_counter() - t, 3)
        return model

    def publish(self, p: Prepared, cand: Candidate, verdict: Verdict, model: FusionModel) -> RefreshResult:
        """Write the version (and the rule after it, when the rule beat what is served)."""
        data, lv = p.data, p.current_version
        refitted = verdict.status != "rejected" and self.options.refit
        snap = dict(self.snap, since=self.options.since, rules=self.plan["rules"],
                    trained_until=int(data.ts.max() if refitted else p.train.ts.max()))
        try:
            # a promoted fine-tuned encoder becomes the store's in the registry commit itself
            number = build_version(
                self.catalog, model, lv.item_spec, lv.user_spec, parent=lv.version, status=verdict.status,
                train_window=p.window_label, counts=p.counts, items=data.items, snapshot=snap,
                metrics={"candidate": verdict.candidate, "current": verdict.current, "train": cand.stats,
                         "holdout": p.judged, **({"finetune": cand.finetune} if cand.finetune else {})},
                residuals=model.residuals if model.residuals is not None else p.residuals,
                switch_encoder=cand.finetune is not None and verdict.status == "current")
        finally:
            if cand.finetune is not None and verdict.status != "current":
                self.catalog.config.model = self.store_model  # not promoted: the store keeps its encoder
        published = self._publish_rule(p, verdict, number, snap) if self._rule_wins(p, verdict) else None
        return self._result(p, cand, verdict, model, number, published)

    def unchanged(self, p: Prepared, cand: Candidate, verdict: Verdict, model: FusionModel) -> RefreshResult:
        """The result of a retrain that ended where it started: nothing published (status
        ``"unchanged"``, the figures of the run, ``version`` the current one)."""
        v = p.current_version.version
        out = self._result(p, cand, verdict, model, v, None)
        return replace(out, status="unchanged", promoted=False, reason=(
            f"the result is version {v} again (same weights, closed-form terms and item rows): no new version "
            "published; --force publishes one anyway"))

    def _rule_wins(self, p: Prepared, verdict: Verdict) -> bool:
        """The trained model lost, but the rule it was compared with beat what the store
        serves (or what is served is an old rule whose counts froze at its creation)."""
        current_is_rule = is_rule(p.current_row)
        stale_rule = current_is_rule and p.current_version.model.dynamic is None
        return verdict.status == "rejected" and self.options.promote and (
            stale_rule or (not current_is_rule and verdict.rule["ndcg@10"] > verdict.current["ndcg@10"]))

    def _publish_rule(self, p: Prepared, verdict: Verdict, rejected: int, snap: dict) -> int:
        # the rule reads behaviour as of every query, so it follows a drift that
        # made current's weights stale
        self.say("publishing the popularity rule ...")
        data, lv = p.data, p.current_version
        events = data.all_events()
        events.V = p.train.V  # the store's encoder (a rejected fine-tune is not used)
        rule = data.rule(events, lv)
        return build_version(self.catalog, rule, lv.item_spec, lv.user_spec, parent=lv.version,
                             status="current", counts=p.counts,
                             train_window=rule_window(float(data.ts.min()), float(data.ts.max())),
                             metrics={"current": verdict.current, "rule": verdict.rule, "rejected": rejected},
                             residuals=rule.residuals, snapshot=dict(snap, trained_until=int(data.ts.max())),
                             items=data.items, verdict="rule")

    def _result(self, p: Prepared, cand: Candidate, verdict: Verdict, model: FusionModel, number: int,
                published: int | None) -> RefreshResult:
        self.timings["total_s"] = round(time.perf_counter() - self.started, 3)
        out = {"version": number, "parent": p.current_version.version, "status": verdict.status,
               "promoted": verdict.status == "current",
               "metrics": RefreshMetrics.from_dict({"candidate": verdict.candidate, "current": verdict.current,
                                                    "rule": verdict.rule}),
               "counts": p.counts, "durations": self.timings, "window": p.window_label, "holdout": p.judged,
               "reasons": self.plan["reasons"],
               # training never clearly beat its start on the holdout and no closed-form
               # term's weight changed: the version carries the start's parameters
               "kept_start": cand.stats.get("best_epoch") == -1 and all(
                   _weight(model.params, k) == _weight(p.start[0], k) for k in CHOSEN)
               and _same_new_users(model, p.start[0]),
               "training": {k: cand.stats[k] for k in ("best_epoch", "epochs", "epoch_ndcg@10", "gamma", "selection")
                            if k in cand.stats}}
        if published is not None:
            out["published"] = {"version": published, "status": "current", "kind": "popularity rule"}
        if cand.finetune is not None:
            out["finetune"] = cand.finetune
        return RefreshResult(**out)


def refresh(catalog: Catalog, opts: RefreshOptions | None = None) -> RefreshResult:
    """Retrain, evaluate and publish a new embedding version (see module doc).

    ``opts`` (default: :class:`RefreshOptions`'s defaults) says what was asked for. The work
    runs as named stages: the window (:meth:`_Run.prepare`), the candidate
    (:meth:`_Run.train`), the verdict (:meth:`_Run.judge`), and publishing
    (:meth:`_Run.refit`, :meth:`_Run.publish`).

    With ``finetune_encoder`` the last layers of the text encoder are also
    fine-tuned on the training events (:mod:`dynstore.model.finetune`), every item
    is re-encoded with the result (a new encoder id and cache), and the fusion
    is trained again on the new vectors before the evaluation. The store
    switches to the fine-tuned encoder only if the version is promoted.

    Returns a :class:`~dynstore.results.RefreshResult`: the new version, its
    status and holdout metrics, counts and durations (plus ``finetune`` when
    fine-tuning), or ``status == "noop"`` and the ``reason``.
    """
    opts = opts or RefreshOptions()
    window = TrainingWindow.parse(opts.since)  # a bad --since fails before any work
    if opts.finetune_encoder and catalog.storage.local_dir("encoders") is None:
        raise ConfigError(f"{catalog.path}: --finetune-encoder needs a store in a local directory (fine-tuned "
                          "encoders are model directories); this store is on object storage")
    if opts.finetune_encoder and not isinstance(store_encoder(catalog), HFEncoder):
        raise ConfigError("--finetune-encoder needs a Hugging Face encoder; this store uses "
                          f"{catalog.config.model!r} (see `dynstore config --model`)")
    snap = snapshot(catalog)
    plan = refresh_plan(catalog, since=opts.since, force=opts.force, snapshot=snap)
    if not plan["needed"]:
        return RefreshResult(status="noop", reason=plan["reason"], version=plan["version"])
    _check_window(catalog, window, opts.since)  # an empty window fails before anything is encoded
    run = _Run(catalog, opts, window, snap, plan)
    prepared = run.prepare()
    candidate = run.train(prepared)
    verdict = run.judge(prepared, candidate)
    model = run.refit(prepared, candidate, verdict)
    if not opts.force and _same_as_current(prepared, verdict, model, plan["rules"], opts.since):
        return run.unchanged(prepared, candidate, verdict, model)
    return run.publish(prepared, candidate, verdict, model)


def _check_window(catalog: Catalog, window: TrainingWindow, since: str | None) -> None:
    """Refuse a window with too few events to train and evaluate (the split's own check),
    before a refresh encodes anything."""
    con = views_connection(catalog)
    try:
        newest = newest_event(con)
        start = window.start(newest)
        n_ts = con.execute("SELECT count(DISTINCT ts) FROM interactions WHERE ?::TIMESTAMP IS NULL OR ts >= ?",
                           [start, start]).fetchall()[0][0]
    finally:
        con.close()
    if n_ts < 2:
        since_when = "the first event" if start is None else f"{start:%Y-%m-%d %H:%M}"
        raise DynstoreError(f"--since {since}: {n_ts} distinct event time(s) from {since_when} (the newest event is "
                            f"{newest:%Y-%m-%d %H:%M}): not enough interactions in the window to train and "
                            "evaluate; widen --since")


def _item_pairs(tensors: dict, ids: list) -> set | None:
    """The item-item weights of ``tensors`` as ``{(item, neighbour, weight)}`` (rows mapped to
    ``ids``), so that two versions over different item rows compare; None without them."""
    if "ii_ptr" not in tensors:
        return None
    ptr, col, val = tensors["ii_ptr"], tensors["ii_col"], tensors["ii_val"]
    if len(ptr) != len(ids) + 1:
        return {object()}  # not over these items: equal to nothing
    rows = np.repeat(np.arange(len(ids)), np.diff(ptr))
    return {(ids[r], ids[c], float(v)) for r, c, v in zip(rows.tolist(), col.tolist(), val.tolist())}


def _same_prior_rows(p: Prepared, beta: float, new_t: dict, cur_t: dict) -> bool:
    """Whether the per-item content prior (``cp_item``: one value per item row of the fit,
    shrunk by the item's own positives when scored) serves as current's does, compared by
    item id. Items of both must have equal values. An item added since current was built
    has no value there, so current serves its whole prior (the same ``cp_`` weights, so the
    same value: the item rows' check covers it); the new version shrinks it by the item's
    positives, which is the same while it has none in the window, or where ``beta`` is 0."""
    if ("cp_item" in new_t) != ("cp_item" in cur_t):
        return False
    if "cp_item" not in new_t:
        return True
    lv, data = p.current_version, p.data
    new, cur = new_t["cp_item"], cur_t["cp_item"]
    if len(new) != len(data.ids) or len(cur) != len(lv.ids):
        return False  # not over these items: equal to nothing
    rows = data.rows_in(lv)
    old = rows >= 0
    if not np.array_equal(new[old], cur[rows[old]]):
        return False
    added = np.flatnonzero(~old)
    return not beta or not np.isin(added, data.item[data.label == 1]).any()


def _same_cold_rows(p: Prepared, eta: float, new_t: dict, cur_t: dict) -> bool:
    """Whether the text-neighbour term's cold items (``cn_cold``, one flag per item row of the
    fit) serve as current's do, compared by item id: items of both must agree, and an item
    added since current was built is cold there (past its mask), so it must be cold here.
    With ``eta`` 0 the flags change nothing."""
    if ("cn_cold" in new_t) != ("cn_cold" in cur_t):
        return False
    if "cn_cold" not in new_t or not eta:
        return True
    lv, new, cur = p.current_version, new_t["cn_cold"], cur_t["cn_cold"]
    if len(new) != len(p.data.ids) or len(cur) != len(lv.ids):
        return False  # not over these items: equal to nothing
    rows = p.data.rows_in(lv)
    old = rows >= 0
    return bool(np.array_equal(new[old], cur[rows[old]]) and (new[~old] > 0.5).all())


def _same_as_current(p: Prepared, verdict: Verdict, model: FusionModel, rules: dict, since: str | None) -> bool:
    """Whether publishing ``model`` would repeat the current version: built under the same
    rules, encoder and window, not rejected, with equal parameters and metadata, equal
    closed-form terms and equal item rows (what serving uses now: the version's rows, and
    items added since fused with its parameters). The holdout figures are not compared:
    the verdict judged the candidate before its refit, its closed-form terms fitted on the
    training part only, while current's were refitted on its whole window; with a prior or
    item-item weight on, the figures differ although the refit ends where current is."""
    lv, snap = p.current_version, p.current_row.get("snapshot") or {}
    if snap.get("rules") != rules or snap.get("since") != since or verdict.status == "rejected":
        return False
    (new_t, new_meta), (cur_t, cur_meta) = model.state(), lv.model.state()
    if new_meta != cur_meta or new_t.keys() != cur_t.keys():
        return False
    if not all(np.array_equal(new_t[k], cur_t[k]) for k in new_t
               if not k.startswith("ii_") and k not in ("cp_item", "cn_cold")):
        return False
    if not _same_cold_rows(p, _weight(new_t, "eta"), new_t, cur_t):
        return False
    if _item_pairs(new_t, p.data.ids) != _item_pairs(cur_t, lv.ids):  # rows are items: compare by id
        return False
    if not _same_prior_rows(p, model.prior_weight(), new_t, cur_t):
        return False
    residuals = model.residuals if model.residuals is not None else p.residuals
    W, b = model.item_side(p.data.V, p.data.A, residuals)
    rows = p.data.rows_in(lv)
    old = rows >= 0
    served_w, served_b = np.empty_like(W), np.empty_like(b)
    served_w[old], served_b[old] = lv.Wf[rows[old]], lv.bias[rows[old]]
    if not old.all():  # items added since: served fused with the version's parameters, no residual
        served_w[~old], served_b[~old] = lv.model.item_side(p.data.V[~old], p.data.A[~old], None)
    return bool(np.allclose(W, served_w, rtol=0, atol=1e-6) and np.allclose(b, served_b, rtol=0, atol=1e-6))


def _same_new_users(model: FusionModel, start: dict) -> bool:
    """Whether ``model``'s new-user bias (``theta_new``) is the start's (tensors)."""
    before = start.get("theta_new")
    if model.theta_new is None or before is None:
        return model.theta_new is None and before is None
    return bool(np.array_equal(model.theta_new, np.ravel(before)))


def _weight(params: dict, name: str) -> float:
    """A closed-form term's weight (``gamma``, ``beta``, ``delta``, ``eta``) in a parameter dict (0 without one)."""
    return float(np.ravel(params.get(name, [0.0]))[0])


def _unseen_by_current(prep: WindowData, hu, hi, hl, trained_until):
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


def _finetune(run: _Run, data: WindowData, train: TrainingData, model: FusionModel) -> tuple[dict, TrainingData]:
    """Fine-tune the encoder and re-encode every item; return the training data on the new vectors.

    Switches ``catalog.config.model`` in memory to the new encoder (saved to the
    config file only on promotion, in the version's registry commit); on failure the
    old encoder is restored and the half-made encoder directory stays out of use.
    """
    catalog, opts = run.catalog, run.options
    docs_of = item_docs(catalog)
    docs = [docs_of.get(i, (None, None))[1] for i in data.ids]
    run.say("fine-tuning the encoder ...")
    t = time.perf_counter()
    with _step_bar(opts.progress) as step:
        ft = finetune_encoder(store_encoder(catalog, device=run.device), docs, train, model, model.residuals,
                              catalog.storage.local_dir("encoders"), steps=opts.finetune_steps, seed=opts.seed,
                              device=run.device, progress=step)
    run.timings["finetune_s"] = round(time.perf_counter() - t, 3)
    old_model = catalog.config.model
    catalog.config.model = f"encoders/{Path(ft['path']).name}"
    try:
        run.say("re-encoding every item with the fine-tuned encoder ...")
        t = time.perf_counter()
        with catalog.lock("encode", wait=60):
            enc = encode(catalog, progress=opts.progress, device=run.device)
        run.timings["reencode_s"] = round(time.perf_counter() - t, 3)
        ft["encoder"] = enc.encoder
        data.V, _ = semantic_vectors(catalog, data.ids)
        return ft, replace(train, V=data.V)
    except BaseException:
        catalog.config.model = old_model
        raise


class _step_bar:
    """A tqdm bar of fine-tuning steps (or nothing): ``with _step_bar(progress) as step``."""

    def __init__(self, progress: bool):
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(desc="fine-tuning", unit="step", file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> Callable[[int, int], None] | None:
        if self.bar is None:
            return None

        def step(done: int, total: int) -> None:
            self.bar.total = total
            self.bar.update(1)

        return step

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


