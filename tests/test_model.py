"""Tests of dynstore.model.fusion (fusion + user model) and dynstore.model.metrics on planted problems."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dynstore.model.metrics import auc, ndcg_at_k, recall_at_k, top_k, user_auc
from dynstore.model.fusion import (
    FusionModel,
    ModelConfig,
    TrainingData,
    build_histories,
    evaluate,
)

D = 16
# the defaults are sized for real catalogues; the planted problems are ~100x smaller
SMALL = dict(batch_size=256, lr=0.01, sample_pool=256)


def assert_same_fit(a, b):
    """Two ``(stats, model)`` fits are the same bit for bit: losses, parameters, residuals."""
    (stats_a, ma), (stats_b, mb) = a, b
    assert stats_a["epoch_losses"] == stats_b["epoch_losses"]
    assert ma.params.keys() == mb.params.keys()
    for k in ma.params:
        np.testing.assert_array_equal(ma.params[k], mb.params[k])
    for ra, rb in zip(ma.residuals, mb.residuals):
        np.testing.assert_array_equal(ra, rb)


def planted(seed=0, n_users=200, n_items=300, n_pairs=4, events_per_user=36):
    """Topics come in similar pairs (2k, 2k+1): each user likes one topic and dislikes its
    twin, which is close in text space -- content similarity alone recommends both."""
    rng = np.random.default_rng(seed)
    n_topics = 2 * n_pairs
    base = rng.normal(size=(n_pairs, D))
    centers = np.repeat(base, 2, axis=0) + 0.35 * rng.normal(size=(n_topics, D))
    topic = rng.integers(0, n_topics, n_items)
    V = centers[topic] + 0.5 * rng.normal(size=(n_items, D))
    V = (V / np.linalg.norm(V, axis=1, keepdims=True)).astype(np.float32)
    quality = rng.normal(size=n_items)
    A = np.zeros((n_items, n_topics + 1), np.float32)
    A[np.arange(n_items), topic] = 1.0
    A[:, -1] = quality + 0.3 * rng.normal(size=n_items)
    like = rng.integers(0, n_topics, n_users)
    dislike = like ^ 1
    # the user segment is a noisy hint of the liked pair: history has to do the rest
    seg = np.where(rng.random(n_users) < 0.5, like // 2, rng.integers(0, n_pairs, n_users))
    UA = np.zeros((n_users, n_pairs), np.float32)
    UA[np.arange(n_users), seg] = 1.0
    users, items, ts, labels = [], [], [], []
    for u in range(n_users):
        t0 = int(rng.integers(0, 10**6))
        logits = 1.5 * quality + 3.0 * (topic == like[u]) + 2.0 * (topic == dislike[u])
        p = np.exp(logits - logits.max())
        chosen = rng.choice(n_items, size=events_per_user, replace=False, p=p / p.sum())
        for j, i in enumerate(chosen):
            if topic[i] == like[u] or (topic[i] != dislike[u] and rng.random() < 0.3):
                lab = 1
            elif topic[i] == dislike[u]:
                lab = -1
            else:
                lab = 0
            users.append(u)
            items.append(i)
            ts.append(t0 + 1000 * j)
            labels.append(lab)
    ev = {k: np.asarray(v) for k, v in
          dict(user=users, item=items, ts=ts, label=labels).items()}
    # hold out the last 25 % of each user's events
    n = events_per_user
    held = np.tile(np.arange(n) >= int(0.75 * n), n_users)
    train = TrainingData(V, A, UA, ev["user"][~held], ev["item"][~held], ev["ts"][~held],
                         ev["label"][~held].astype(np.int8))
    hold = (ev["user"][held], ev["item"][held], ev["label"][held])
    return dict(train=train, hold=hold, topic=topic, like=like, dislike=dislike)


@pytest.fixture(scope="module")
def problem():
    return planted()


@pytest.fixture(scope="module")
def trained(problem):
    tr = problem["train"]
    m = FusionModel(D, tr.A.shape[1], tr.UA.shape[1], ModelConfig(epochs=8, seed=0, **SMALL))
    stats = m.fit(tr)
    return m, stats


@pytest.fixture(scope="module")
def ablation(problem):
    tr = problem["train"]
    m = FusionModel(D, tr.A.shape[1], tr.UA.shape[1],
                    ModelConfig(epochs=8, seed=0, use_negatives=False, **SMALL))
    m.fit(tr)
    return m


def _popularity(tr):
    return np.bincount(tr.item[tr.label == 1], minlength=tr.V.shape[0])


# ----------------------------------------------------------------------- quality
def test_evaluation_does_not_depend_on_its_batch_size(problem, trained, monkeypatch):
    """Batches are bounded by score cells (a million items: a few users each); the
    figures must be the same however the users are cut."""
    from dynstore.model import evaluation as ev

    tr, (hu, hi, hl) = problem["train"], problem["hold"]
    whole = evaluate(trained[0], tr, hu, hi, hl, k=10, per_user=True)
    monkeypatch.setattr(ev, "EVAL_CELLS", 3 * tr.V.shape[0])  # 3 users per batch
    cut = evaluate(trained[0], tr, hu, hi, hl, k=10, per_user=True)
    np.testing.assert_allclose(cut["ndcg_per_user"], whole["ndcg_per_user"])
    assert cut["recall@10"] == pytest.approx(whole["recall@10"]) and cut["auc"] == pytest.approx(whole["auc"])


def test_fit_beats_untrained_and_popularity(problem, trained):
    tr, (hu, hi, hl) = problem["train"], problem["hold"]
    model, stats = trained
    assert stats["n_positive"] == int((tr.label == 1).sum())
    assert stats["n_negative"] > 0 and stats["n_impression"] > 0
    fitted = evaluate(model, tr, hu, hi, hl, k=10)
    pop = _popularity(tr)
    untrained = FusionModel.untrained(tr.V, tr.A, tr.UA.shape[1], pop)
    base = evaluate(untrained, tr, hu, hi, hl, k=10)
    popular = FusionModel.untrained(tr.V, tr.A, tr.UA.shape[1], pop)
    popular.params["g_pos"][:] = 0.0  # bias only = popularity ranking
    popular.params["g_neg"][:] = 0.0
    popr = evaluate(popular, tr, hu, hi, hl, k=10)
    assert fitted["n_users"] == base["n_users"] > 100
    assert fitted["recall@10"] > 1.5 * base["recall@10"]
    assert fitted["recall@10"] > 1.5 * popr["recall@10"]
    assert fitted["ndcg@10"] > popr["ndcg@10"] and fitted["auc"] > popr["auc"]


def test_negatives_push_disliked_twin_topic_down(problem, trained, ablation):
    """The disliked topic is the liked topic's text twin: only negatives can separate them."""
    tr = problem["train"]
    users = np.arange(tr.UA.shape[0])
    topic, dislike = problem["topic"], problem["dislike"]

    def disliked_share(model):
        S = model.score(tr, users, model.residuals)
        seen = build_histories(users, tr.user, tr.item, tr.label, tr.ts)
        excl = [seen[1][seen[0][u]: seen[0][u + 1]] for u in users]
        top = top_k(S, 10, excl)
        return float(np.mean(topic[top] == dislike[users][:, None]))

    with_neg, without = disliked_share(trained[0]), disliked_share(ablation)
    assert with_neg < 0.5 * without, (with_neg, without)
    assert trained[0].params["g_neg"][0] < 0 and ablation.params["g_neg"][0] == 0


def test_new_interaction_moves_top_list_without_retraining(problem, trained):
    model, _ = trained
    tr, topic = problem["train"], problem["topic"]
    Wf, bias = model.item_side(tr.V, tr.A, model.residuals)
    u = 0
    other = (problem["like"][u] + 2) % 8  # a topic outside the user's twin pair
    ptr, it, lab, ts = build_histories(np.array([u]), tr.user, tr.item, tr.label, tr.ts)
    before = model.user_vectors(tr.UA[[u]], ptr, it, lab, ts, Wf)[0]
    new_items = np.flatnonzero(topic == other)[:8]
    it2 = np.r_[it, new_items]
    lab2 = np.r_[lab, np.ones(new_items.size, np.int8)]
    ts2 = np.r_[ts, np.full(new_items.size, ts.max() + 10)]
    after = model.user_vectors(tr.UA[[u]], np.array([0, it2.size]), it2, lab2, ts2, Wf)[0]
    candidates = np.setdiff1d(np.flatnonzero(topic == other), it2)

    def mean_rank(x):
        s = Wf @ x + bias
        s[it2] = -np.inf
        rank = np.argsort(np.argsort(-s))
        return rank[candidates].mean()

    assert mean_rank(after) < 0.75 * mean_rank(before)
    top_before = top_k((Wf @ before + bias)[None], 30, [it2])[0]
    top_after = top_k((Wf @ after + bias)[None], 30, [it2])[0]
    assert (topic[top_after] == other).sum() > (topic[top_before] == other).sum()


def test_cold_items_scored_from_content(problem):
    """Items with no training events: zero residual, still ranked by text + attributes."""
    tr, (hu, hi, hl) = problem["train"], problem["hold"]
    cold = np.zeros(tr.V.shape[0], bool)
    cold[::5] = True
    keep = ~cold[tr.item]
    tr2 = TrainingData(tr.V, tr.A, tr.UA, tr.user[keep], tr.item[keep], tr.ts[keep],
                       tr.label[keep])
    m = FusionModel(D, tr.A.shape[1], tr.UA.shape[1], ModelConfig(epochs=6, **SMALL))
    m.fit(tr2)
    R, rb = m.residuals
    assert np.all(R[cold] == 0) and np.all(rb[cold] == 0)
    res = evaluate(m, tr2, hu, hi, hl, k=10, candidates=cold)
    assert res["n_users"] > 50
    assert res["auc"] > 0.75
    n_cold = int(cold.sum())
    assert res["recall@10"] > 2.0 * 10 / n_cold  # random picks 10 of n_cold


def test_residuals_only_for_items_with_history(problem, trained):
    tr = problem["train"]
    model, stats = trained
    R, rb = model.residuals
    n_pos = np.bincount(tr.item[tr.label == 1], minlength=tr.V.shape[0])
    few = n_pos < model.config.min_history
    assert few.any() and np.all(R[few] == 0) and np.all(rb[few] == 0)
    assert stats["n_warm_items"] == int((~few).sum())
    assert np.abs(R[~few]).sum() > 0


# ------------------------------------------------------------- training mechanics
def _small(problem):
    tr = problem["train"]
    sel = tr.user < 80
    return TrainingData(tr.V, tr.A, tr.UA, tr.user[sel], tr.item[sel], tr.ts[sel],
                        tr.label[sel])


def test_deterministic_for_a_seed(problem):
    data = _small(problem)
    runs = []
    for _ in range(2):
        m = FusionModel(D, data.A.shape[1], data.UA.shape[1],
                        ModelConfig(epochs=2, seed=3, **SMALL))
        runs.append((m.fit(data)["loss"], m.state()[0], m.residuals))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k])
    np.testing.assert_array_equal(runs[0][2][0], runs[1][2][0])
    other = FusionModel(D, data.A.shape[1], data.UA.shape[1],
                        ModelConfig(epochs=2, seed=4, **SMALL))
    assert other.fit(data)["loss"] != runs[0][0]


def test_warm_start_continues(problem):
    data = _small(problem)
    cfg = ModelConfig(epochs=4, **SMALL)
    m = FusionModel(D, data.A.shape[1], data.UA.shape[1], cfg)
    m.fit(data)
    tensors, meta = m.state()
    m2 = FusionModel.from_state(tensors, json.loads(json.dumps(meta)))
    cont = m2.fit(data, epochs=1, init_residuals=m.residuals)["loss"]
    scratch = FusionModel(D, data.A.shape[1], data.UA.shape[1], cfg).fit(data, epochs=1)["loss"]
    assert cont < scratch


def test_progress_and_dimension_check(problem):
    data = _small(problem)
    calls = []
    m = FusionModel(D, data.A.shape[1], data.UA.shape[1], ModelConfig(epochs=1, **SMALL))
    m.fit(data, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1]
    with pytest.raises(ValueError):
        FusionModel(D + 1, data.A.shape[1], data.UA.shape[1]).fit(data)


def test_state_round_trip_through_safetensors(tmp_path, problem, trained):
    from safetensors.numpy import load_file, save_file

    model, _ = trained
    tr = problem["train"]
    tensors, meta = model.state()
    assert "R" not in tensors
    # parameters are float32; the item-item component adds its sparse index arrays
    assert all(v.dtype == np.float32 for k, v in tensors.items() if k not in ("ii_ptr", "ii_col"))
    assert tensors["ii_val"].size > 0
    path = tmp_path / "v1.safetensors"
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta2 = json.loads(f.metadata()["meta"])
    again = FusionModel.from_state(load_file(str(path)), meta2)
    assert again.config == model.config
    users = np.arange(20)
    np.testing.assert_array_equal(again.score(tr, users, model.residuals),
                                  model.score(tr, users, model.residuals))


def test_untrained_version_one():
    """The static form of the untrained model (``dynamic=False``: popularity as a
    per-item bias); the dynamic rule is tested in test_dynamics.py."""
    rng = np.random.default_rng(1)
    V = rng.normal(size=(40, D)).astype(np.float32)
    A = rng.normal(size=(40, 3)).astype(np.float32)
    pop = rng.integers(0, 100, 40)
    m = FusionModel.untrained(V, A, 2, pop, ModelConfig(seed=7, dynamic=False))
    assert m.params["alpha"][0] == pytest.approx(0.1)
    assert m.params["g_pos"][0] == 1 and m.params["g_neg"][0] == -0.5
    assert not m.params["U"].any() and not m.params["u0"].any()
    Wf, bias = m.item_side(V, A, m.residuals)
    empty = np.zeros(0, np.int64)
    X = m.user_vectors(np.ones((1, 2), np.float32), np.array([0, 0]), empty,
                       empty.astype(np.int8), empty, Wf)
    order = np.argsort(-(Wf @ X[0] + bias), kind="stable")
    np.testing.assert_array_equal(order[:5], np.argsort(-pop, kind="stable")[:5])
    # a user who liked item 3 gets items like item 3 above equally popular ones
    X3 = m.user_vectors(None, np.array([0, 1]), np.array([3]), np.array([1], np.int8),
                        np.array([0]), Wf)
    sim = Wf @ Wf[3]
    s = Wf @ X3[0]
    assert np.corrcoef(sim, s)[0, 1] > 0.99
    # seeded projection
    m2 = FusionModel.untrained(V, A, 2, pop, ModelConfig(seed=7, dynamic=False))
    np.testing.assert_array_equal(m.params["W"], m2.params["W"])


def test_user_vectors_weights_and_truncation():
    cfg = ModelConfig(half_life=1.0, max_history=2)
    m = FusionModel(3, 0, 0, cfg)
    m.params["g_short"][:] = 0.0  # the long-memory mean alone (the short one is tested below)
    Wf = np.eye(3, dtype=np.float32)
    # user 0: positives 0 (oldest), 1, 2 (newest) -> only 1 and 2 count, 2 weighs e x 1
    # user 1: no history; user 2: one explicit negative on item 0
    ptr = np.array([0, 3, 3, 4])
    items = np.array([0, 1, 2, 0])
    labels = np.array([1, 1, 1, -1], np.int8)
    ts = np.array([10, 20, 30, 5])
    X = m.user_vectors(None, ptr, items, labels, ts, Wf)
    e = np.e
    np.testing.assert_allclose(X[0], [0, 1 / (1 + e), e / (1 + e)], rtol=1e-6)
    np.testing.assert_allclose(X[1], 0)
    np.testing.assert_allclose(X[2], [-0.5, 0, 0])
    # ties in time: the later event in the input is the more recent
    X = m.user_vectors(None, np.array([0, 2]), np.array([0, 1]), np.array([1, 1], np.int8),
                       np.array([7, 7]), Wf)
    assert X[0, 1] > X[0, 0]
    # the short memory: the newest likes weigh most, whatever the long history says
    m.params["g_short"][:] = 1.0
    m.params["g_pos"][:] = 0.0
    m.config.short_half_life = 1.0
    X = m.user_vectors(None, np.array([0, 3]), np.array([0, 1, 2]), np.array([1, 1, 1], np.int8),
                       np.array([10, 20, 30]), Wf)
    np.testing.assert_allclose(X[0], np.array([1, e, e * e]) / (1 + e + e * e), rtol=1e-6)
    # the ablation ignores negatives at serving time too
    abl = FusionModel(3, 0, 0, ModelConfig(use_negatives=False))
    X = abl.user_vectors(None, np.array([0, 1]), np.array([0]), np.array([-1], np.int8),
                         np.array([0]), Wf)
    np.testing.assert_allclose(X, 0)


def test_user_vectors_vectorised_many_users():
    rng = np.random.default_rng(0)
    n_items, m = 500, 20000
    Wf = rng.normal(size=(n_items, 8)).astype(np.float32)
    lens = rng.integers(0, 30, m)
    ptr = np.r_[0, np.cumsum(lens)]
    nnz = int(ptr[-1])
    model = FusionModel(8, 0, 0)
    X = model.user_vectors(None, ptr, rng.integers(0, n_items, nnz),
                           rng.choice(np.array([1, 0, -1], np.int8), nnz),
                           rng.integers(0, 10**9, nnz), Wf)
    assert X.shape == (m, 8) and np.isfinite(X).all()
    assert np.all(X[lens == 0] == 0)


# ----------------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    ranked = np.array([[3, 1, 2, 0], [0, 1, 2, 3], [5, 6, -1, -1]])
    rel = [{1, 9}, {3}, set()]
    # user 0: hit at rank 2 of 2 relevant; user 1: hit at rank 4 (outside k=3); user 2 ignored
    assert recall_at_k(ranked, rel, 3) == pytest.approx((0.5 + 0.0) / 2)
    # ndcg user 0: (1/log2(3)) / (1 + 1/log2(3)); user 1: 0
    ideal = 1 + 1 / np.log2(3)
    assert ndcg_at_k(ranked, rel, 3) == pytest.approx((1 / np.log2(3)) / ideal / 2)
    assert ndcg_at_k(ranked, rel, 4) == pytest.approx(
        ((1 / np.log2(3)) / ideal + 1 / np.log2(5)) / 2)
    assert recall_at_k(ranked, [set(), set(), set()], 3) != recall_at_k(ranked, rel, 3)
    assert auc(np.array([3.0, 1.0]), np.array([2.0, 0.0, 1.0])) == pytest.approx(
        (3 + 1.5) / 6)
    S = np.array([[0.9, 0.1, 0.5, 0.3]])
    assert user_auc(S, [{2}], exclude=[{0}]) == pytest.approx(1.0)
    assert user_auc(S, [{2}]) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(top_k(S, 3, exclude=[{0}]), [[2, 3, 1]])
    np.testing.assert_array_equal(top_k(S, 6), [[0, 2, 3, 1, -1, -1]])


def test_early_stopping_keeps_the_best_epoch(problem):
    tr, (hu, hi, hl) = problem["train"], problem["hold"]
    # a learning rate far too high for the last epochs to keep improving
    m = FusionModel(D, tr.A.shape[1], tr.UA.shape[1],
                    ModelConfig(epochs=12, seed=0, item_item=False, user_knn=0, **dict(SMALL, lr=0.2)))
    stats = m.fit(tr, holdout=(hu, hi, hl), patience=2)
    # [the start, after the behaviour weights alone, epoch 1, 2, ...]
    curve = stats["epoch_ndcg@10"]
    best = int(np.argmax(curve)) - 1  # -1: the start, 0: the first phase only
    assert stats["best_epoch"] == best
    # stopped `patience` epochs after the best one (or at the end)
    assert len(curve) - 2 == min(12, best + 2) == stats["epochs"]
    # the parameters kept are the best epoch's, not the last one's
    assert evaluate(m, tr, hu, hi, hl, k=10)["ndcg@10"] == pytest.approx(curve[best + 1])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, 9), st.integers(0, n - 1)), max_size=60))))
def test_cooccurrence_equals_the_dense_product(case):
    """Item-item counts from each user's pairs equal ``X^T X`` of the binary matrix,
    repeated pairs included (they are one 1 in ``X``)."""
    from dynstore.model.itemitem import cooccurrence

    n, pairs = case
    u = np.array([p[0] for p in pairs], np.int64)
    c = np.array([p[1] for p in pairs], np.int64)
    X = np.zeros((10, n), np.float32)
    X[u, c] = 1.0
    assert np.array_equal(cooccurrence(u, c, n), X.T @ X)


def test_draw_ahead_thread_changes_nothing(problem, monkeypatch):
    """``Trainer.epoch`` computes the next batch's draws and point-in-time features in a
    second thread: the result is bit for bit that of drawing each batch in its step."""
    from dynstore.model import training
    from dynstore.model.dynamics import DynamicSpec

    data = _small(problem)
    data.UK = (np.arange(data.UA.shape[0]) % 3)[:, None]  # one segment column, 3 segments

    def fit():
        m = FusionModel(D, data.A.shape[1], data.UA.shape[1], ModelConfig(epochs=2, seed=5, **SMALL),
                        DynamicSpec(), (3,))
        return m.fit(data), m

    stats, ahead = fit()
    assert "theta_seg" in ahead.params and "theta" in ahead.params

    def in_step(self, opt):  # the loop as it was: each step draws its own batch
        tot = cnt = 0.0
        for b in self.rng.permutation(len(self.bags.batches)):
            s, n = self.step(self.bags.batches[b], opt)
            tot, cnt = tot + s, cnt + n
        return tot / max(cnt, 1e-12)

    monkeypatch.setattr(training.Trainer, "epoch", in_step)
    stats2, single = fit()
    assert_same_fit((stats, ahead), (stats2, single))
    # and the segment features took part: another segment assignment trains differently
    data.UK = (np.arange(data.UA.shape[0]) % 2)[:, None]
    assert fit()[0]["epoch_losses"] != stats2["epoch_losses"]


def test_trainer_rows_is_indexing_bit_for_bit(problem):
    """``Trainer.rows`` (``index_select``) gives ``x[idx]``'s values and, with repeated
    rows, its gradient bit for bit."""
    import torch
    from dynstore.model import training

    data = _small(problem)
    m = FusionModel(D, data.A.shape[1], data.UA.shape[1], ModelConfig(epochs=0, **SMALL))
    t = training.Trainer(m, data, None)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(30, 7)).astype(np.float32), requires_grad=True)
    idx = rng.integers(0, 30, 200)  # many repeats
    up = torch.tensor(rng.normal(size=(200, 7)).astype(np.float32))
    grads = []
    for take in (lambda: x[t.index(idx)], lambda: t.rows(x, idx), lambda: t.rows(x, t.index(idx))):
        x.grad = None
        y = take()
        (y * up).sum().backward()
        grads.append((y.detach(), x.grad.clone()))
    for y, g in grads[1:]:
        assert torch.equal(y, grads[0][0]) and torch.equal(g, grads[0][1])
    assert torch.equal(t.rows(x, np.array([3, 3, 0])).detach(), x.detach()[[3, 3, 0]])


def test_training_with_rows_equals_training_with_indexing(problem, monkeypatch):
    """The trainer gathers rows with :meth:`Trainer.rows`; training with plain indexing
    instead (what it did before) gives the same parameters bit for bit, the segment and
    dynamic terms included."""
    from dynstore.model import training
    from dynstore.model.dynamics import DynamicSpec

    data = _small(problem)
    data.UK = (np.arange(data.UA.shape[0]) % 3)[:, None]
    seen = []
    draw = training.Trainer.draw

    def checked_draw(self, bags):
        dr = draw(self, bags)
        seen.append(dr.seg_pool.flags.c_contiguous)
        return dr

    monkeypatch.setattr(training.Trainer, "draw", checked_draw)

    def fit():
        m = FusionModel(D, data.A.shape[1], data.UA.shape[1], ModelConfig(epochs=2, seed=3, **SMALL),
                        DynamicSpec(), (3,))
        return m.fit(data), m

    stats, fast = fit()
    assert seen and all(seen)  # the step gets the pool's segment features ready to use

    def indexing(self, x, idx):
        import torch
        return x[idx if isinstance(idx, torch.Tensor) else self.index(idx)]

    monkeypatch.setattr(training.Trainer, "rows", indexing)
    stats2, plain = fit()
    assert_same_fit((stats, fast), (stats2, plain))


def test_evaluation_may_fuse_into_the_vectors(problem, trained):
    """``reuse_vectors`` (the holdout of a freshly built version) writes the fused item
    matrix over ``train.V`` instead of beside it: the same figures, to the bit."""
    import dataclasses

    m = trained[0]
    tr, (hu, hi, hl) = problem["train"], problem["hold"]
    want = evaluate(m, tr, hu, hi, hl, k=10, per_user=True)
    copy = dataclasses.replace(tr, V=tr.V.copy())
    got = evaluate(m, copy, hu, hi, hl, k=10, per_user=True, reuse_vectors=True)
    assert np.array_equal(got.pop("ndcg_per_user"), want.pop("ndcg_per_user")) and got == want
    Wf, _ = m.item_side(tr.V, tr.A, m.residuals)
    assert np.array_equal(copy.V, Wf) and not np.array_equal(tr.V, Wf)
    with pytest.raises(ValueError, match="out must be"):
        m.item_side(tr.V, tr.A, out=np.zeros((2, D), np.float32))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([3, 12, 250]), st.sampled_from([5, 64, 1 << 15]),
       st.sampled_from([np.float32, np.float64]))
def test_weighted_bag_sum_adds_each_bag_left_to_right(seed, longest, chunk, wtype):
    """The serving path's segment sum equals the plain loop over entries, bag by bag, in
    entry order: bit for bit, whatever the bags' lengths (empty bags included) and however
    the entries fall into chunks (a bag split by a chunk adds its two partial sums)."""
    from dynstore.model.histories import weighted_bag_sum

    rng = np.random.default_rng(seed)
    n_items, d, n_bags = int(rng.integers(1, 200)), int(rng.integers(1, 40)), int(rng.integers(1, 300))
    W = rng.standard_normal((n_items, d)).astype(np.float32)
    bag = np.repeat(np.arange(n_bags), rng.integers(0, longest, n_bags))
    items = rng.integers(0, n_items, bag.size)
    w = rng.random(bag.size).astype(wtype)
    want = np.zeros((n_bags, d), np.float32)
    for a in range(0, bag.size, chunk):
        part = np.zeros((n_bags, d), np.float32)
        seen = np.zeros(n_bags, bool)
        for e in range(a, min(a + chunk, bag.size)):
            term = W[items[e]] * np.float32(w[e])
            part[bag[e]] = part[bag[e]] + term if seen[bag[e]] else term
            seen[bag[e]] = True
        want += part
    got = weighted_bag_sum(W, items, w, bag, n_bags, chunk)
    assert got.dtype == np.float32 and got.shape == (n_bags, d)
    assert got.tobytes() == want.tobytes()


def test_training_and_serving_compute_the_same_item_terms(problem):
    """The trainer (torch) and serving (numpy, ``FusionModel.item_side`` and
    ``dynamic_bias``) compute the item side of one score equation: the fused vectors,
    the static bias with residuals, and the dynamic bias agree to float tolerance for a
    trained model with dynamic and segment terms."""
    from dynstore.model import training
    from dynstore.model.dynamics import DynamicSpec

    data = _small(problem)
    data.UK = (np.arange(data.UA.shape[0]) % 3)[:, None]
    m = FusionModel(D, data.A.shape[1], data.UA.shape[1], ModelConfig(epochs=2, seed=5, **SMALL),
                    DynamicSpec(), (3,))
    m.fit(data)
    assert np.abs(m.params["theta"]).sum() > 0 and np.abs(m.residuals[1]).sum() > 0
    act = m.activity_of(data)
    t = training.Trainer(m, data, act, init_residuals=m.residuals)
    n = data.V.shape[0]
    feats = act.items.features(np.arange(n), act.now())
    w_t, b_t = t.item_terms(*t.padded_residuals(), np.arange(n), feats)
    Wf, bias = m.item_side(data.V, data.A, m.residuals)
    bias = bias + m.dynamic_bias(feats)
    np.testing.assert_allclose(w_t.detach().numpy(), Wf, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b_t.detach().numpy(), bias, rtol=1e-5, atol=1e-5)
