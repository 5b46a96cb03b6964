"""One score equation: a trained model scores the same at training time and at serving time.

A model is trained on the tiny sample shop (fake encoder) and written as a version; for a
few users (returning ones and a user with attributes and no events) every term of the
logit is computed three ways and compared to float tolerance:

* serving -- :func:`dynstore.serving.recommend.score_terms` on the version's serving state;
* the trainer (torch) -- :class:`~dynstore.model.training.Trainer`'s user, item and
  segment terms, for a probe event of each user just after their history (the closed-form
  terms, content prior and item-item, are fitted in numpy after the SGD and added here as
  :mod:`dynstore.model.score` adds them);
* evaluation -- :func:`dynstore.model.evaluation.scorer`, which judges early stopping, the
  closed-form weights and ``dynstore eval``.
"""
from __future__ import annotations

import numpy as np
import pytest

import dynstore
from dynstore.data.views import views_connection
from dynstore.demo import DEMO_RULES
from dynstore.model import training
from dynstore.model.evaluation import scorer
from dynstore.model.fusion import FusionModel, ModelConfig, TrainingData
from dynstore.serving.recommend import score_terms, user_logits
from dynstore.serving.state import serving_state
from dynstore.versions.embeddings import build_version, load_version
from dynstore.versions.window import WindowData

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shop_files, shop_frames):
    """``(store, version, data, users)``: the tiny shop with a trained version (every term
    weighted: the closed-form weights, chosen on a holdout by refresh, are set here)."""
    store = dynstore.init(tmp_path_factory.mktemp("score") / "s", model="fake", **DEMO_RULES)
    store.ingest("users", shop_files / "users.parquet")
    users = shop_frames["users"]
    store.ingest("users", users.head(1).with_columns(users["user_id"].head(1) * 0 + 10_000))  # no events
    store.ingest("items", shop_files / "items.csv")
    store.ingest("interactions", shop_files / "interactions.parquet")
    store.encode()
    cat = store.catalog
    lv = load_version(cat)
    con = views_connection(cat)
    try:
        window = WindowData(cat, lv, con, None)
    finally:
        con.close()
    data = window.all_events()
    tensors, meta = lv.model.state()
    model = FusionModel.from_state(tensors, dict(meta, config=ModelConfig(epochs=3, seed=3, max_history=12,
                                                                           half_life=4.0).to_dict()))
    model.fit(data)
    assert model.item_item is not None and model.prior is not None and model.segments
    model.params["gamma"] = np.array([0.7], np.float32)
    model.params["beta"] = np.array([0.4], np.float32)
    model.params["delta"] = np.array([0.6], np.float32)
    model.params["eta"] = np.array([0.5], np.float32)
    assert model.cold_items is not None  # the fit's items without events, and every fourth one
    model.cold_items = model.cold_items | (np.arange(model.cold_items.size) % 4 == 0)
    version = build_version(cat, model, lv.item_spec, lv.user_spec, parent=lv.version, status="candidate",
                            items=window.items, residuals=model.residuals)
    served = load_version(cat, version).model
    for name in ("U", "M", "u0", "theta", "theta_seg"):  # trained: every term carries weight
        assert np.abs(served.params[name]).sum() > 0, name
    now = int(data.ts.max())
    last = np.full(len(window.user_ids), -1, np.int64)
    np.maximum.at(last, data.user, data.ts)
    # the busiest users: their histories are cut at max_history (impressions) and short_history (positives)
    busiest = np.argsort(-np.bincount(data.user, minlength=len(last)), kind="stable")
    returning = [int(u) for u in busiest if 0 <= last[u] < now][:4]
    assert min(np.bincount(data.user)[returning]) > 12
    silent = [u for u in range(len(last)) if last[u] < 0 and window.UA[u].any()][:1]
    assert len(returning) == 4 and len(silent) == 1
    yield store, version, window, data, returning + silent
    store.close()


def _probe_trainer(model: FusionModel, data: TrainingData, users: list[int], residuals: tuple):
    """A trainer over ``data`` plus one probe event per user at the newest event's time:
    with bags of one event, a probe's bag scores the user from their whole history, as
    serving does now. The dynamic features are the data's own (the probes count nothing)."""
    probe = TrainingData(V=data.V, A=data.A, UA=data.UA, UK=data.UK,
                         user=np.r_[data.user, users], item=np.r_[data.item, np.zeros(len(users), np.int64)],
                         ts=np.r_[data.ts, np.full(len(users), data.ts.max())],
                         label=np.r_[data.label, np.zeros(len(users), np.int8)])
    model = FusionModel.from_state(*model.state())
    model.config.history_stride = 1
    act = model.activity_of(data)
    t = training.Trainer(model, probe, act, init_residuals=residuals)
    first = t.bags.ev[t.bags.ptr[:-1]]
    bags = np.flatnonzero(first >= data.user.size)
    assert t.bags.user[bags].tolist() == sorted(users)
    return t, bags, act


def test_training_and_serving_scores_agree_on_every_term(trained):
    store, version, window, data, users = trained
    cat = store.catalog
    state = serving_state(cat, version)
    model = state.model
    users = sorted(users)
    ids = [window.user_ids[u] for u in users]
    cols = np.array([state.row[i] for i in window.ids], np.int64)  # serving's column of each window item
    n = len(window.ids)

    # serving: the terms of the score equation
    X_s, B_s = score_terms(state, ids)
    L_s = user_logits(state, ids)[:, cols]
    seg_s = state.segment_bias(ids)[:, cols]
    hist = state.histories(state.user_rows(ids)[0])
    ii_s = model.item_item_bias(hist[0], hist[1], hist[2], len(state.ids))[:, cols]
    # the user-kNN term: neighbours from the serving state's positives (the window's, in
    # evaluation: the same users in another order)
    knn_s = model.user_knn_bias(hist[0], hist[1], hist[2], len(state.ids), state.knn_pool(),
                                state.user_rows(ids)[0])[:, cols]
    cn_s = model.cold_neighbour_bias(hist[0], hist[1], hist[2], state.Wf)[:, cols]
    assert np.abs(seg_s).max() > 0 and np.abs(ii_s).max() > 0 and np.abs(knn_s).max() > 0  # every term is there
    assert np.abs(cn_s).max() > 0 and (cn_s <= 0).all()

    # training time (torch): user, item and segment terms of the probes' bags
    residuals = window.residuals_of(load_version(cat, version))
    t, bags, act = _probe_trainer(model, data, users, residuals)
    Rx, rbx = t.padded_residuals()
    X_t, X0_t = t.user_terms(Rx, bags)
    now = act.now()
    feats = act.items.features(np.arange(n), now)
    w_t, b_t = t.item_terms(Rx, rbx, np.arange(n), feats)
    dr = t.draw(bags)
    dr.pool = np.arange(n)
    dr.seg_pool = np.ascontiguousarray(act.segments.key_features(dr.pool, now, dr.seg_keys))
    _, seg_t = t.segment_terms(dr)
    X_t, X0_t, w_t, b_t, seg_t = (x.detach().numpy() for x in (X_t, X0_t, w_t, b_t, seg_t))

    np.testing.assert_allclose(X_t, X_s, **TOL)  # user vectors: history, attributes, u0, M
    assert not np.allclose(X_t, X0_t)  # the returning users' histories count
    np.testing.assert_allclose(w_t, state.Wf[cols], **TOL)
    # the closed-form content prior is added after the SGD: numpy, as the item side adds it
    prior = model.prior_shrink(feats, model.prior_weight() * model.prior.values(window.V, window.A))
    assert np.abs(prior).max() > 0
    np.testing.assert_allclose(b_t + prior, state.bias[cols], **TOL)
    np.testing.assert_allclose(seg_t, seg_s, **TOL)
    np.testing.assert_allclose(B_s[:, cols], state.bias[cols] + seg_s + ii_s + knn_s + cn_s, **TOL)
    L_t = X_t @ w_t.T + b_t + prior + seg_t + ii_s + knn_s + cn_s
    np.testing.assert_allclose(L_t, L_s, **TOL)

    # evaluation: the same equation over the window's events
    L_e = scorer(model, data, residuals)(np.array(users))
    np.testing.assert_allclose(L_e, L_s, **TOL)



def test_the_new_users_bias_goes_through_the_same_equation(trained):
    """A version with a new-user bias (``theta_new``, refresh's choice on the pooled cuts):
    serving and evaluation give the user without events its logits, and returning users
    theirs as without it."""
    store, version, window, data, users = trained
    cat = store.catalog
    lv = load_version(cat, version)
    model = lv.model
    model.theta_new = model.new_user_rule(None)  # positives of all time
    residuals = window.residuals_of(lv)
    v2 = build_version(cat, model, lv.item_spec, lv.user_spec, parent=version, status="candidate",
                       items=window.items, residuals=residuals)
    served = load_version(cat, v2).model
    np.testing.assert_array_equal(served.theta_new, model.theta_new)
    users = sorted(users)
    ids = [window.user_ids[u] for u in users]
    cols = np.array([serving_state(cat, v2).row[i] for i in window.ids], np.int64)
    L_s = user_logits(serving_state(cat, v2), ids)[:, cols]
    L_e = scorer(served, data, residuals)(np.array(users))
    np.testing.assert_allclose(L_e, L_s, **TOL)
    L_0 = user_logits(serving_state(cat, version), ids)[:, cols]
    silent = np.array([not (data.label[data.user == u] == 1).any() for u in users])
    assert silent.sum() == 1
    np.testing.assert_allclose(L_s[~silent], L_0[~silent], **TOL)  # returning users: as before
    assert not np.allclose(L_s[silent], L_0[silent], **TOL)  # the new user: the long column


def test_user_knn_weight_is_kept_in_the_version_and_old_states_load_without_it(trained):
    store, version, *_ = trained
    served = load_version(store.catalog, version).model
    assert float(served.params["delta"][0]) == pytest.approx(0.6)
    tensors, meta = served.state()
    tensors.pop("delta")  # a version written before the term
    old = FusionModel.from_state(tensors, meta)
    assert float(old.params["delta"][0]) == 0.0
    hist = (np.array([0, 2]), np.array([0, 1]), np.array([1, 1], np.int8), np.zeros(2, np.int64))
    assert old.user_knn_bias(*hist[:3], 5, lambda: pytest.fail("no pool needed at weight 0")) == 0.0


def test_cold_neighbour_term_is_kept_in_the_version_and_old_states_load_without_it(trained):
    store, version, *_ = trained
    served = load_version(store.catalog, version).model
    assert float(served.params["eta"][0]) == pytest.approx(0.5)
    assert served.cold_items is not None and served.cold_items[::4].all()
    tensors, meta = served.state()
    for k in ("eta", "cn_cold"):  # a version written before the term
        tensors.pop(k)
    old = FusionModel.from_state(tensors, meta)
    assert float(old.params["eta"][0]) == 0.0 and old.cold_items is None
    hist = (np.array([0, 2]), np.array([0, 1]), np.array([1, 1], np.int8))
    assert old.cold_neighbour_bias(*hist, np.eye(5, dtype=np.float32)) == 0.0


def test_cold_neighbour_scores_rank_cold_items_by_their_nearest_like():
    """A cold item near one of the user's likes comes first among the cold items (score 0,
    the others below); warm items and a user without likes get nothing; a new like near
    another cold item moves that one up."""
    from dynstore.model.coldtext import neighbour_scores

    Wf = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1],  # warm: 0, 1, 2
                   [0.1, 1, 0], [0, 0.2, 1], [1, 1, 1]], np.float32)  # cold: 3, 4, 5 (and 6: added later)
    Wf = np.vstack([Wf, [[1, 0.1, 0]]]).astype(np.float32)
    cold = np.array([False, False, False, True, True, True])
    ptr, item, label = np.array([0, 2, 3, 3]), np.array([1, 0, 2]), np.array([1, -1, 1])
    S = neighbour_scores(Wf, cold, ptr, item, label)
    assert S.shape == (3, 7) and (S[:, :3] == 0).all() and (S[2] == 0).all()  # user 2: no likes
    assert S[0, 3] == 0 and (S[0, 4:] < 0).all()  # likes item 1 (the dislike of 0 does not count)
    assert S[1, 4] == 0 and S[1, 3] < 0  # likes item 2
    S2 = neighbour_scores(Wf, cold, np.array([0, 3]), np.array([1, 0, 0]), np.array([1, -1, 1]))
    assert S2[0, 6] == 0 and S[0, 6] < 0  # a new like of item 0: item 6 (added after the mask) on top


def test_user_knn_scores_follow_similar_users_and_a_new_like():
    from dynstore.model.userknn import Pool, user_knn_scores

    # users 0-2 like items 0 and 1, user 0 also 2; users 3-4 like items 3 and 4, user 3 also 5
    user = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4])
    item = np.array([0, 1, 2, 0, 1, 0, 1, 3, 4, 5, 3, 4])
    pool = Pool.of_events(user, item, np.ones(user.size, np.int8), 5, 6)
    # user 1 (row 1 of the pool, left out of their own neighbours): item 2 from user 0, none of 3-5
    s = user_knn_scores(pool, np.array([0, 2]), np.array([0, 1]), k=2, self_rows=np.array([1]))[0]
    assert s[2] > 0 and np.all(s[3:] == 0)
    # a new like of item 3 brings in the other group's item 5
    s2 = user_knn_scores(pool, np.array([0, 3]), np.array([0, 1, 3]), k=4, self_rows=np.array([1]))[0]
    assert s2[5] > 0
    # a user with no positives scores 0 everywhere
    assert not user_knn_scores(pool, np.array([0, 0]), np.zeros(0, np.int64), k=2).any()


def test_user_knn_recency_is_served_as_evaluated_and_kept_in_the_version(trained):
    """The query-side recency of the user-kNN term (``user_knn_recency``) goes through the
    one equation: serving and evaluation agree with it on, and it moves the term."""
    store, version, window, data, users = trained
    state = serving_state(store.catalog, version)
    model = state.model
    ids = [window.user_ids[u] for u in sorted(users)]
    cols = np.array([state.row[i] for i in window.ids], np.int64)
    rows = state.user_rows(ids)[0]
    hist = state.histories(rows)
    n = len(state.ids)
    plain = model.user_knn_bias(hist[0], hist[1], hist[2], n, state.knn_pool(), rows, hist[3])
    model.config.user_knn_recency = 1.0
    try:
        recent = model.user_knn_bias(hist[0], hist[1], hist[2], n, state.knn_pool(), rows, hist[3])
        assert not np.allclose(recent, plain)  # the newest positives pick other neighbours
        L_s = user_logits(state, ids)[:, cols]
        residuals = window.residuals_of(load_version(store.catalog, version))
        np.testing.assert_allclose(scorer(model, data, residuals)(np.array(sorted(users))), L_s, **TOL)
        tensors, meta = model.state()
        assert FusionModel.from_state(tensors, meta).config.user_knn_recency == 1.0
        old = dict(meta, config={k: v for k, v in meta["config"].items() if k != "user_knn_recency"})
        assert FusionModel.from_state(tensors, old).config.user_knn_recency == 0.0  # versions before it
    finally:
        model.config.user_knn_recency = 0.0


def test_user_knn_query_weights_follow_the_newest_like():
    from dynstore.model.userknn import Pool, user_knn_scores

    user = np.array([0, 0, 0, 1, 1, 1])  # user 0: items 0, 1, 2; user 1: items 3, 4, 5
    item = np.array([0, 1, 2, 3, 4, 5])
    pool = Pool.of_events(user, item, np.ones(user.size, np.int8), 2, 6)
    ptr, hist = np.array([0, 3]), np.array([0, 1, 3])  # likes 0, 1, then 3 (listed newest last)
    same = user_knn_scores(pool, ptr, hist, k=1)
    np.testing.assert_array_equal(same, user_knn_scores(pool, ptr, hist, k=1, weight=np.ones(3)))
    assert same[0, 2] > 0 and same[0, 5] == 0  # unweighted: user 0 (two shared items) is the neighbour
    recent = user_knn_scores(pool, ptr, hist, k=1, weight=np.array([0.1, 0.1, 1.0]))
    assert recent[0, 5] > 0 and recent[0, 2] == 0  # the newest like weighs most: user 1


def test_the_text_neighbour_weight_is_judged_as_the_plain_equation_would():
    """Refresh's shortcut for ``eta`` (cold columns only; on all items only the users whose
    list holds a cold item) gives the per-user differences of the full score, every arm."""
    from dynstore.model import selection as sel

    rng = np.random.default_rng(0)
    m, n = 60, 80
    cold = rng.random(n) < 0.3
    base = rng.normal(size=(m, n)).astype(np.float32)
    base[:, cold] -= 1.0
    prior = np.where(cold, rng.normal(size=n), 0).astype(np.float32)
    cn = np.zeros((m, n), np.float32)
    cn[:, cold] = -np.abs(rng.normal(size=(m, cold.sum())))
    rel = [rng.choice(n, rng.integers(0, 4), replace=False) for _ in range(m)]
    seen = [rng.choice(n, 3, replace=False) for _ in range(m)]
    p = sel.Parts(np.arange(m), base, {}, prior, rel, seen, np.ones(m, bool), cold, {}, cn)
    etas = sel.Etas(p)
    etas.judge(p)
    every = np.ones(m, bool)
    moved = 0
    for b in etas.scale:
        for v in etas.cold[b].diffs:
            full_cold = sel.ndcg(p, 0, b, every, True, eta=v) - sel.ndcg(p, 0, b, every, True)
            full_all = sel.ndcg(p, 0, b, every, eta=v) - sel.ndcg(p, 0, b, every)
            np.testing.assert_allclose(etas.cold[b].diffs[v][0], full_cold)
            np.testing.assert_allclose(etas.every[b].diffs[v][0], full_all)
            moved += int(np.abs(full_cold).sum() > 0)
    assert moved > 0
