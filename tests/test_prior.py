"""The closed-form terms of issue 22: the content prior, the text-regularised item-item
model, and the pooled choice of their weights."""

import numpy as np

from dynstore.model.dynamics import DynamicSpec
from dynstore.model.histories import normalise
from dynstore.model.itemitem import ItemItem, text_neighbours
from dynstore.model.fusion import FusionModel, ModelConfig, TrainingData
from dynstore.model.prior import ContentPrior
from dynstore.model.selection import choose_terms, forward_cuts


def _blocks(V, A, rows):
    """The standardised, equally weighted blocks the prior regresses on (written out)."""
    out = []
    for M in (normalise(V.astype(np.float32))[rows].astype(np.float64), A[rows].astype(np.float64)):
        out.append((M - M.mean(0)) / (M.std(0) * np.sqrt(M.shape[1])))
    return np.concatenate(out, axis=1)


def test_prior_is_the_direct_ridge_solution():
    rng = np.random.default_rng(1)
    V, A = rng.normal(size=(120, 6)), rng.normal(size=(120, 3)) * 50.0  # blocks on different scales
    target = rng.gamma(2.0, size=120)
    warm = np.arange(120) < 90
    lam = 3.0
    p = ContentPrior.fit(V, A, target, warm, lams=(lam,))
    X = _blocks(V, A, np.flatnonzero(warm))
    Xc, yc = X - X.mean(0), target[warm] - target[warm].mean()
    w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ yc)
    direct = Xc @ w
    direct -= direct.max()  # offset: the highest warm item reaches 0
    assert np.allclose(p.values(V, A)[warm], direct, atol=1e-4)
    # standardised blocks: rescaling the attributes changes nothing
    again = ContentPrior.fit(V, A / 50.0, target, warm, lams=(lam,))
    assert np.allclose(again.values(V, A / 50.0), p.values(V, A), atol=1e-4)


def _prior_model(n: int = 6):
    rng = np.random.default_rng(0)
    V, A = rng.normal(size=(n, 4)).astype(np.float32), np.zeros((n, 0), np.float32)
    m = FusionModel.popularity_rule(4, 0, 0, ModelConfig(prior_k=10.0), dynamic=DynamicSpec())  # a slow shrinkage
    m.prior = ContentPrior(np.array([1.0, 0, 0, 0], np.float32), np.zeros(0, np.float32), 0.5)
    m.prior_item = m.prior.values(V, A)
    m.params["beta"] = np.array([2.0], np.float32)
    return m, V, A


def test_prior_shrinks_from_prior_to_counts_as_events_accrue():
    m, V, A = _prior_model()
    static = m.item_side(V, A)[1]
    col = m.prior_column()
    prior_part = []
    for n in (0, 1, 10, 100, 10_000):
        F = np.zeros((V.shape[0], m.dynamic.width), np.float32)
        F[:, col] = np.log1p(n)
        without = F @ m.params["theta"]  # the counts' own part
        part = static + m.dynamic_bias(F) - without - (m.params["b0"][0])
        assert np.allclose(part, 2.0 * m.prior_item * 10.0 / (n + 10.0), atol=1e-4)
        prior_part.append(np.abs(part).max())
    assert prior_part[0] > prior_part[2] > prior_part[-1] and prior_part[-1] < 0.01 * prior_part[0]
    # weight 0: the model is the rule it was
    m.params["beta"] = np.zeros(1, np.float32)
    assert np.allclose(m.item_side(V, A)[1], m.params["b0"][0])


def test_prior_round_trips_through_the_state():
    m, V, A = _prior_model()
    back = FusionModel.from_state(*m.state())
    assert back.prior_weight() == 2.0
    assert np.allclose(back.item_side(V, A)[1], m.item_side(V, A)[1])
    assert np.allclose(back.prior_item, m.prior_item)


def _ease(X: np.ndarray, lam: float) -> np.ndarray:
    G = X.T @ X + lam * np.eye(X.shape[1])
    P = np.linalg.inv(G)
    B = -P / np.diag(P)
    np.fill_diagonal(B, 0.0)
    return B


def test_text_regularised_item_item_without_pull_is_ease():
    rng = np.random.default_rng(2)
    X = (rng.random((40, 8)) < 0.4).astype(np.float64)
    G = X.T @ X
    S = text_neighbours(rng.normal(size=(8, 5)), 3)
    assert np.allclose(ItemItem.solve(G, 5.0, 0.0, S), _ease(X, 5.0), atol=1e-5)
    assert np.allclose(ItemItem.solve(G, 5.0), _ease(X, 5.0), atol=1e-5)
    B = ItemItem.solve(G, 5.0, 4.0, S)
    assert np.allclose(np.diag(B), 0.0)


def test_an_item_without_co_occurrence_borrows_its_text_neighbours():
    # items 0-3 are liked together; item 4 was liked once, by a user who liked nothing
    # else; its text is close to item 2's
    users = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4])
    items = np.array([0, 1, 2, 0, 1, 3, 2, 3, 1, 2, 4])
    V = np.eye(5, 6, dtype=np.float32)
    V[4] = V[2] + 0.1 * np.eye(1, 6, 5, dtype=np.float32)[0]
    plain = ItemItem.fit(users, items, 5, lam=1.0, min_positives=1)
    pulled = ItemItem.fit(users, items, 5, lam=1.0, min_positives=1, V=V, mu=5.0)
    liked_4 = (np.array([0, 1]), np.array([4]))
    assert not plain.scores(*liked_4, n_items=5).any()  # no co-occurrence: nothing
    s = pulled.scores(*liked_4, n_items=5)[0]
    assert int(np.argmax(s)) == 2  # its text neighbour comes first
    # and the item itself is reached from its neighbour's likes
    assert pulled.scores(np.array([0, 1]), np.array([2]), n_items=5)[0, 4] > 0


def test_time_decay_weighs_recent_co_occurrences_more():
    users, items = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 2])
    old_first = ItemItem.fit(users, items, 3, lam=0.5, min_positives=1, weight=np.array([0.1, 0.1, 1.0, 1.0]))
    s = old_first.scores(np.array([0, 1]), np.array([0]), n_items=3)[0]
    assert s[2] > s[1]  # item 0's recent partner beats its old one


def test_item_item_history_weighs_recent_likes_more_when_chosen():
    # items 0-1 and 2-3 are liked together; a user liked 0 long ago, 2 just now
    users, items = np.array([0, 0, 1, 1, 2, 2, 3, 3]), np.array([0, 1, 0, 1, 2, 3, 2, 3])
    m = FusionModel.untrained(np.eye(4, 3, dtype=np.float32), np.zeros((4, 0), np.float32), 0, None,
                              ModelConfig(), dynamic=DynamicSpec())
    m.item_item = ItemItem.fit(users, items, 4, lam=0.5, min_positives=1)
    m.params["gamma"] = np.ones(1, np.float32)
    hist = (np.array([0, 2]), np.array([2, 0]), np.array([1, 1]), np.array([100, 1]))
    alike = m.item_item_bias(*hist[:3], 4, hist[3])[0]
    assert np.isclose(alike[1], alike[3])  # the whole history alike (the default)
    m.config.item_item_recency = 1.0
    recent = m.item_item_bias(*hist[:3], 4, hist[3])[0]
    assert recent[3] > recent[1]  # the newest like's partner first
    assert np.allclose(m.item_item_bias(*hist[:3], 4)[0], alike)  # no times: all alike


def _drifting_data(seed: int = 0):
    """Users who like items of one text cluster, over time; cold items in each cluster."""
    rng = np.random.default_rng(seed)
    n_items, n_users, d = 60, 80, 8
    centres = rng.normal(size=(3, d))
    cluster = np.arange(n_items) % 3
    V = (centres[cluster] + 0.3 * rng.normal(size=(n_items, d))).astype(np.float32)
    user_cluster = rng.integers(0, 3, n_users)
    users, items = [], []
    for t in range(1500):
        u = rng.integers(0, n_users)
        choices = np.flatnonzero(cluster == user_cluster[u])
        users.append(u)
        items.append(rng.choice(choices[: len(choices) * (1 + t // 500) // 3 + 1]))
    ts = np.arange(1500, dtype=np.int64) * 3600
    return TrainingData(V=V, A=np.zeros((n_items, 0), np.float32), UA=np.zeros((n_users, 0), np.float32),
                        user=np.array(users), item=np.array(items), ts=ts, label=np.ones(1500, np.int8))


def test_choices_report_gain_standard_error_and_users_over_pooled_cuts():
    data = _drifting_data()
    tr = data.ts < data.ts[1300]
    from dynstore.model.selection import sub

    train = sub(data, tr)
    holdout = (data.user[~tr], data.item[~tr], data.label[~tr])
    assert len(forward_cuts(train, holdout)) == 5
    m = FusionModel.untrained(data.V, data.A, 0, None, ModelConfig(), dynamic=DynamicSpec())
    out = choose_terms(m, train, holdout, 1.64)
    for name in ("gamma", "prior"):
        r = out[name]
        assert r["cuts"] == 5 and r["users"] > 0 and set(r) >= {"chosen", "gain", "se", "users", "grid"}
        # a weight is kept only with a gain beyond z standard errors
        assert r["chosen"] == 0.0 or r["gain"] > 1.64 * r["se"]
    assert out["gamma"]["judged_on"] == "returning users" and out["prior"]["judged_on"] == "cold items"
    assert abs(float(m.params["gamma"][0]) - out["gamma"]["chosen"]) < 1e-5
    # users who like one cluster: co-liked items of that cluster help them
    assert out["gamma"]["chosen"] > 0


def test_refresh_reports_each_choice_with_gain_error_and_users(encoded):
    from dynstore.storage.registry import choices

    out = encoded.refresh(since="all", epochs=1)
    sel = out.training["selection"]
    assert set(sel) == {"gamma", "recency", "prior", "cold_neighbours", "user_knn", "new_users", "start"}
    for c in sel.values():
        assert {"chosen", "gain", "se", "users", "cuts"} <= set(c)
    assert sel["gamma"]["cuts"] == 5 and sel["gamma"]["users"] > 0
    assert sel["new_users"]["judged_on"].startswith("new users") and sel["new_users"]["cuts"] > 5
    assert sel["user_knn"]["judged_on"] == "returning users" and sel["user_knn"]["users"] > 0
    assert sel["cold_neighbours"]["judged_on"] == "cold items" and "all_items" in sel["cold_neighbours"]
    row = next(r for r in encoded.versions() if r["version"] == out.version)
    assert row["metrics"]["train"]["selection"]["prior"]["judged_on"] == "cold items"
    assert choices(row).startswith("gamma ")


def test_the_shortest_history_half_life_within_one_error_of_the_best_is_chosen():
    from dynstore.model import selection

    def chosen(gain_50: float) -> float:
        m = FusionModel(d=4, fa=2, fu=0)
        grids = {0.0: {0.5: (0.0133, 0.0018, 900)}, 50.0: {1.0: (gain_50, 0.0018, 900)}}
        out = selection.choose_gamma(m, grids, {0.0: 1.0, 50.0: 1.0}, 1.64, 5)
        assert out["recency"]["chosen"] == m.config.item_item_recency
        return m.config.item_item_recency

    assert chosen(0.0130) == 50.0  # as good within one SE: the list follows new likes
    assert chosen(0.0110) == 0.0   # worse by more than one SE: the whole history
    assert chosen(0.0150) == 50.0  # better: chosen either way


def test_user_knn_is_not_tried_above_its_user_bound():
    """Above ``user_knn_max_users`` users with a positive, refresh leaves ``delta`` at 0 and
    says why (the term's cost grows with users x users); at or below it, the term is judged."""
    data = _drifting_data()
    tr = data.ts < data.ts[1300]
    from dynstore.model.selection import knn_users, sub

    train = sub(data, tr)
    holdout = (data.user[~tr], data.item[~tr], data.label[~tr])
    n = knn_users(train)
    capped = FusionModel.untrained(data.V, data.A, 0, None, ModelConfig(user_knn_max_users=n - 1),
                                   dynamic=DynamicSpec())
    capped.params["delta"][:] = 1.0  # a weight left from an earlier version is reset
    out = choose_terms(capped, train, holdout, 1.64)["user_knn"]
    assert out["chosen"] == 0.0 and float(capped.params["delta"][0]) == 0.0
    assert out["skipped"].startswith(f"{n} users") and out["grid"] == {}
    free = FusionModel.untrained(data.V, data.A, 0, None, ModelConfig(user_knn_max_users=n), dynamic=DynamicSpec())
    judged = choose_terms(free, train, holdout, 1.64)["user_knn"]
    assert "skipped" not in judged and judged["grid"] and judged["users"] > 0
