"""Training the fusion + user model (:class:`dynstore.model.fusion.FusionModel`).

The trainer runs ``fit -> epoch -> step``; the model holds parameters and scoring.

Next-events objective
---------------------
A user's events are taken in time order in runs of ``history_stride`` ("bags"); every
event of a bag is scored from the user's history strictly before the bag's first event
-- what serving does for the events to come. A user's first bag (empty history) trains
the new-user path.

Time-local batches
------------------
Bags are sorted by time and cut into batches of about ``batch_size`` events; the order
of the batches is shuffled every epoch. Each batch reads the dynamic item features
(:mod:`dynstore.model.dynamics`) as of its first bag's time -- strictly before every event in
it -- for its targets and its sampled items alike, so the model learns how recent
behaviour predicts the next events without seeing them.

Losses
------
* ``objective="softmax"`` (default): every positive is scored against a pool of
  ``sample_pool`` uniformly drawn items shared by the batch (sampled softmax: the
  positive must beat the catalogue, which is what a top-k list needs), plus weighted BCE
  on the labelled events (positives 1; explicit negatives ``neg_weight`` and ignored
  impressions ``impression_weight`` pushed down) so that ``sigmoid`` stays a probability.
* ``objective="bce"``: weighted BCE on the labelled events plus, per positive,
  ``n_sampled_negatives`` of weight spread over the pool (the earlier objective; kept as
  an ablation).

The *prior path* scores each positive a second time as if its user were new
(``x = u0 + U a_u``), weighted ``prior_weight``, so the biases and the segment term
learn what new users need, not what the history term leaves unexplained.
``time_decay_days`` halves an event's weight every so many days before the newest one.

Cost: the fixed part of each history (``v_j``, ``a_j``) is aggregated once per fit; per
step only the residual part is aggregated (``embedding_bag``, warm items only). On a CPU
training is single-threaded (small ops; one thread also makes results bit-identical
whatever the core count) and deterministic for a seed.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from dynstore.lazy import attempt_import
from dynstore.model.dynamics import Activity
from dynstore.model.evaluation import evaluate
from dynstore.model.histories import decay_weights, history_groups, normalise, ranges
from dynstore.model.metrics import clearly_better
from dynstore.model.spec import ModelConfig, TrainingData
from dynstore.model.selection import choose_terms, fit_closed_form

__all__ = ["Trainer", "SCALARS", "train", "make_bags"]

#: parameters that set the scale of a whole term: they learn faster
SCALARS = ("alpha", "b0", "g_pos", "g_short", "g_neg", "g_imp", "theta", "theta_seg")


def train(
    model: Any,
    data: TrainingData,
    *,
    epochs: int | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], Any] | None = None,
    init_residuals: tuple[np.ndarray, np.ndarray] | None = None,
    holdout: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    patience: int = 2,
) -> dict:
    """Train ``model`` (a :class:`~dynstore.model.fusion.FusionModel`, in place) from its current
    parameters (warm start) on ``data``; then fit its item-item component.

    Parameters
    ----------
    epochs : int, optional
        Defaults to ``config.epochs``.
    device : str
        Torch device ("cpu", "cuda").
    progress : callable(done_steps, total_steps), optional
    init_residuals : (R [n_items, d], rb [n_items]), optional
        Residuals to start from, aligned with ``data``'s items (e.g. the previous
        version's, re-aligned by the store). Default: :meth:`FusionModel.start_bias`
        (zero with dynamic features, else the standardised ``log(1 + positives)``).
        Rows of items below ``min_history`` are ignored (zero after the fit).
    holdout : (user, item, label), optional
        Early stopping: after every epoch NDCG@10 on these later events (users ranked
        from their events in ``data``, as :func:`~dynstore.model.evaluation.evaluate` does) is
        measured; training stops after ``patience`` epochs without a new best, and the
        best epoch's parameters are kept. Also chooses the closed-form terms' weights
        (``gamma``, ``beta``) on pooled forward-chained cuts
        (:func:`dynstore.model.selection.choose_terms`); without a holdout those terms are
        fitted and the weights kept as they are.

    Returns
    -------
    dict
        ``loss`` (last epoch's weighted mean), ``epoch_losses``, ``epochs`` (run), ``n_positive``,
        ``n_negative``, ``n_impression``, ``n_warm_items``, ``seconds``; with ``holdout``
        also ``epoch_ndcg@10``, ``best_epoch``, ``gamma`` and ``selection`` (per choice:
        the chosen value, its gain, standard error and the users that judged it).
    """
    model.check_data(data)
    epochs = model.config.epochs if epochs is None else int(epochs)
    activity = model.activity_of(data)
    with one_cpu_thread(device):
        trainer = Trainer(model, data, activity, device=device, init_residuals=init_residuals)
        stats = trainer.fit(epochs, holdout=holdout, patience=patience, progress=progress)
    if holdout is None:
        fit_closed_form(model, data)
        return stats
    t = time.perf_counter()
    stats["selection"] = choose_terms(model, data, holdout, model.config.start_z)
    stats["selection_s"] = round(time.perf_counter() - t, 3)
    stats["selection"]["start"] = judge_report(stats)
    if "gamma" in stats["selection"]:
        stats["gamma"] = {"chosen": stats["selection"]["gamma"]["chosen"]}
    return stats


def judge_report(stats: dict) -> dict:
    """Leaving the start, as :func:`~dynstore.model.selection.report` records a choice: the
    best epoch's gain over the start on the holdout, its standard error and users."""
    d = stats.pop("start_diff", None)
    n = 0 if d is None else int(d.size)
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else None
    return {"chosen": "start" if stats.get("best_epoch") == -1 else f"epoch {stats.get('best_epoch')}",
            "gain": round(float(d.mean()), 5) if n else 0.0, "se": None if se is None else round(se, 5),
            "users": n, "cuts": 1, "judged_on": "all users of the holdout"}


@contextmanager
def one_cpu_thread(device: str) -> Iterator[None]:
    """Torch on one thread while training on a CPU: the ops are small gathers and
    ~1k x d matmuls, extra threads only add sync overhead (badly so on a shared
    machine), and one thread makes CPU results bit-identical whatever the core count."""
    torch = attempt_import("torch")
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Bags:
    """Training events grouped into history snapshots, and batches of snapshots."""

    ev: np.ndarray          # event rows (into the data), grouped by bag
    label: np.ndarray       # labels of ``ev``
    weight: np.ndarray      # loss weight of each event of ``ev``
    ptr: np.ndarray         # bag b's events are ev[ptr[b]:ptr[b+1]]
    user: np.ndarray        # user row of each bag
    time: np.ndarray        # first event time of each bag
    hist: dict              # kind -> (fixed part [n_bags, d+fa], r_ptr, r_rows, r_w)
    has_history: np.ndarray  # bool per bag
    batches: list           # arrays of bag indices, time-local

    @property
    def n(self) -> int:
        return self.user.size


def make_bags(cfg: ModelConfig, data: TrainingData, n_warm: int, wmap: np.ndarray,
              VA: np.ndarray) -> Bags:
    """Sort events into bags with their histories (strictly before the bag) and batches."""
    ev, key, span = ordered_events(cfg, data)
    user, lab = data.user[ev], data.label[ev]
    first = bag_starts(user, max(1, int(cfg.history_stride)))
    ptr = np.r_[first, ev.size].astype(np.int64)
    bag_user, bag_key = user[first], key[first]
    hist: dict = {}
    has_history = np.zeros(first.size, bool)
    for name, group_label, max_history, half_life in history_groups(cfg):
        sel = lab == group_label
        hist[name], lens = group_history(key[sel], data.item[ev[sel]], bag_key, bag_user * span,
                                         max_history, half_life, n_warm, wmap, VA)
        has_history |= lens > 0
    weight = event_weights(cfg, lab, user, data.ts[ev])
    bag_time = data.ts[ev[first]]
    return Bags(ev=ev, label=lab, weight=weight.astype(np.float32), ptr=ptr, user=bag_user,
                time=bag_time, hist=hist, has_history=has_history,
                batches=time_batches(bag_time, ptr, cfg.batch_size))


def ordered_events(cfg: ModelConfig, data: TrainingData) -> tuple[np.ndarray, np.ndarray, int]:
    """``(ev, key, span)``: the rows of the events the model learns from, by user, time,
    then log position, with their sort key ``user * span + dense time rank``."""
    label = data.label
    keep = (label == 1) | (cfg.use_negatives & (label <= 0))
    idx = np.flatnonzero(keep)
    # dense time rank keeps the (user, time) key inside int64 for any epoch range
    _, trank = np.unique(data.ts[idx], return_inverse=True)
    span = int(trank.max(initial=0)) + 2
    key = data.user[idx] * span + trank
    order = np.lexsort((idx, key))  # by user, time, then log position
    return idx[order], key[order], span


def bag_starts(user: np.ndarray, stride: int) -> np.ndarray:
    """First event of every bag: a user's events (``user`` sorted) in runs of ``stride``.

    >>> bag_starts(np.array([0, 0, 0, 1]), 2).tolist()
    [0, 2, 3]
    """
    n = user.size
    new_user = np.r_[True, user[1:] != user[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    return np.flatnonzero(new_user | ((np.arange(n) - user_start) % stride == 0))


def group_history(key: np.ndarray, items: np.ndarray, bag_key: np.ndarray, bag_lo: np.ndarray,
                  max_history: int, half_life: float, n_warm: int, wmap: np.ndarray,
                  VA: np.ndarray) -> tuple[tuple, np.ndarray]:
    """One history aggregate of every bag from the events of one kind (sort ``key``,
    ``items``): entries strictly before the bag's key and from the bag's user (key at
    least ``bag_lo``), the most recent ``max_history``, recency-weighted.

    Returns ``((fixed [n_bags, d+fa], r_ptr, r_rows, r_w), lens)``: the text/attribute
    part summed once, the warm items' residual rows and weights as CSR per bag, and the
    number of entries of each bag."""
    torch = attempt_import("torch")
    end = np.searchsorted(key, bag_key, side="left")  # strictly before the bag
    lo = np.searchsorted(key, bag_lo, side="left")
    start = np.maximum(lo, end - max_history)
    j, offsets = ranges(start, end)
    lens = np.maximum(end - start, 0)
    w = decay_weights(np.repeat(end - 1, lens) - j, np.repeat(lens, lens), half_life)
    hist_items = items[j]
    with torch.no_grad():  # the text/attribute part of a history never changes
        fixed = torch.nn.functional.embedding_bag(
            torch.from_numpy(hist_items), torch.from_numpy(VA), torch.from_numpy(offsets),
            mode="sum", per_sample_weights=torch.from_numpy(w)).numpy()
    # residual part: only warm items carry a residual, so only they are kept
    n_bags = bag_key.size
    wr = wmap[hist_items] < n_warm
    bag_of_entry = np.repeat(np.arange(n_bags), lens)[wr]
    r_ptr = np.zeros(n_bags + 1, np.int64)
    np.cumsum(np.bincount(bag_of_entry, minlength=n_bags), out=r_ptr[1:])
    return (fixed, r_ptr, wmap[hist_items[wr]], w[wr]), lens


def event_weights(cfg: ModelConfig, lab: np.ndarray, user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Loss weight of each event: by label, per user (``user_weight_power``) and by age
    (``time_decay_days``)."""
    weight = np.where(lab == 1, 1.0, np.where(lab < 0, cfg.neg_weight, cfg.impression_weight))
    if cfg.user_weight_power:
        # the metrics count every user once: a user with thousands of events must not
        # decide what the model learns for everyone
        n_user = np.bincount(user, minlength=int(user.max(initial=0)) + 1)
        weight = weight * np.power(n_user[user].astype(np.float64), -cfg.user_weight_power)
        weight = weight * (weight.size / weight.sum())
    if cfg.time_decay_days:
        age = (ts.max(initial=0) - ts) / 86400.0
        weight = weight * np.power(0.5, age / cfg.time_decay_days)
    return weight


def time_batches(bag_time: np.ndarray, ptr: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Time-local batches: consecutive bags in time, about ``batch_size`` events each.

    >>> [b.tolist() for b in time_batches(np.array([5, 1, 3]), np.array([0, 2, 4, 6]), 4)]
    [[1], [2, 0]]
    """
    by_time = np.argsort(bag_time, kind="stable")
    size = np.diff(ptr)[by_time]
    batch_of = np.cumsum(size) // max(1, int(batch_size))
    cuts = np.flatnonzero(np.r_[True, batch_of[1:] != batch_of[:-1], True])
    return [by_time[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


@dataclass
class Batch:
    """The terms of one optimiser step, shared by both objectives."""

    bags: np.ndarray        # bag indices
    e_idx: np.ndarray       # rows of ``Bags.ev`` of the batch's events
    sizes: np.ndarray       # events per bag
    e_bag: Any              # tensor: the bag (position in ``bags``) of each event
    label: np.ndarray       # labels of the events
    weight: np.ndarray      # loss weights of the events
    paths: list             # (user vectors [bags, d], loss weight, event weights)
    wt: Any                 # target vectors [events, d] and biases [events]
    bt: Any
    ws: Any                 # pool vectors [pool, d] and biases [pool]
    bs: Any
    seg_t: Any              # segment terms of the targets [events] and the pool [bags, pool]
    seg_p: Any


@dataclass
class Draw:
    """A batch's events, random draws and dynamic features (:meth:`Trainer.draw`)."""

    e_idx: np.ndarray       # rows of ``Bags.ev`` of the batch's events
    sizes: np.ndarray       # events per bag
    e_bag_np: np.ndarray    # the bag (position in ``bags``) of each event
    items: np.ndarray       # item rows of the events
    drop: np.ndarray | None  # residual dropout of the events
    pool: np.ndarray        # the sampled pool
    f_items: np.ndarray | None = None   # dynamic features of the events' items and the pool
    f_pool: np.ndarray | None = None
    seg_items: np.ndarray | None = None  # segment features of the events [columns * events, width]
    seg_keys: np.ndarray | None = None   # the batch's distinct segment keys [u]
    seg_inv: np.ndarray | None = None    # each bag's keys as positions in seg_keys [bags, columns]
    seg_pool: np.ndarray | None = None   # the pool's features in each key [u, pool, width]


class Trainer:
    """One :meth:`FusionModel.fit` run: prepared data, parameters as tensors, the loss.

    Parameters
    ----------
    model : FusionModel
        Trained in place (its ``params`` and residuals are replaced by the result).
    data : TrainingData
    activity : ItemActivity or None
        Dynamic item features of ``data``'s events (None when the model has none).
    device : str
    init_residuals : (R [n_items, d], rb [n_items]) or None
        Residuals to start from, aligned with ``data``'s items.
    """

    def __init__(self, model: Any, data: TrainingData, activity: Activity | None, *,
                 device: str = "cpu", init_residuals: tuple[np.ndarray, np.ndarray] | None = None):
        torch = attempt_import("torch")
        self.model, self.data, self.activity = model, data, activity
        cfg = self.cfg = model.config
        self.dev = torch.device(device)
        V = normalise(data.V)
        self.n_items, self.d = V.shape
        n_pos_item = np.bincount(data.item[data.label == 1], minlength=self.n_items)
        self.warm = n_pos_item >= cfg.min_history
        self.n_warm = int(self.warm.sum())
        self.wmap = np.full(self.n_items, self.n_warm, dtype=np.int64)  # n_warm = zero row
        self.wmap[self.warm] = np.arange(self.n_warm)
        VA = np.concatenate([V, data.A], axis=1).astype(np.float32)
        self.bags = make_bags(cfg, data, self.n_warm, self.wmap, VA)
        self.ev_item = data.item[self.bags.ev]
        R0, rb0 = self.start_residuals(init_residuals, n_pos_item)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        t = self.tensor
        self.VA = t(VA)
        self.UA = t(data.UA)
        self.P = {k: t(v).clone().requires_grad_(True) for k, v in model.params.items()}
        frozen = self.freeze()
        self.R = t(R0).requires_grad_(True)
        self.rb = t(rb0).requires_grad_(True)
        self.hist = {k: (t(v[0]), v[1], v[2], v[3]) for k, v in self.bags.hist.items()}
        self.UK = data.UK
        self.key_col = self.index(model.key_columns())
        self.opt = self.optimiser(frozen)

    def start_residuals(self, init_residuals: tuple[np.ndarray, np.ndarray] | None,
                        n_pos_item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The warm items' residuals ``(R0, rb0)`` to start from: ``init_residuals``, or
        zero vectors and the model's :meth:`~dynstore.model.fusion.FusionModel.start_bias`
        (per-item parameters move slowly: without dynamic features the bias starts at
        the standardised log popularity)."""
        if init_residuals is not None:
            R0 = np.asarray(init_residuals[0], np.float32)[self.warm].copy()
            rb0 = np.asarray(init_residuals[1], np.float32)[self.warm].copy()
            return R0, rb0
        R0 = np.zeros((self.n_warm, self.d), np.float32)
        return R0, self.model.start_bias(n_pos_item, self.n_items)[self.warm]

    def freeze(self) -> set[str]:
        """Stop the parameters the config switches off from learning; returns their names."""
        cfg = self.cfg
        frozen = set()
        if not cfg.use_negatives:
            frozen |= {"g_neg", "g_imp"}
            self.P["g_neg"].data.zero_()
            self.P["g_imp"].data.zero_()
        if not cfg.user_transform:
            frozen.add("M")
        for k in frozen:
            if k in self.P:
                self.P[k].requires_grad_(False)
        return frozen

    def optimiser(self, frozen: set[str]) -> Any:
        """AdamW over everything that learns, in three groups (shared, scalars, residuals)."""
        torch = attempt_import("torch")
        cfg = self.cfg
        shared = [self.P[k] for k in ("W", "bv", "ba", "u0", "U", "M") if k in self.P and k not in frozen]
        return torch.optim.AdamW(
            [
                {"params": shared, "weight_decay": cfg.weight_decay},
                # scalars and the dynamic weights set the scale of whole terms: let them move faster
                {"params": [self.P[k] for k in SCALARS if k in self.P and k not in frozen],
                 "weight_decay": 0.0, "lr": cfg.lr * cfg.scalar_lr_mult},
                {"params": [x for k, x in (("R", self.R), ("rb", self.rb)) if k not in frozen],
                 "weight_decay": cfg.residual_decay},
            ],
            lr=cfg.lr,
        )

    # ------------------------------------------------------------------ helpers
    def tensor(self, x):
        torch = attempt_import("torch")
        return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=self.dev)

    def index(self, x):
        torch = attempt_import("torch")
        return torch.as_tensor(np.asarray(x), dtype=torch.long, device=self.dev)

    def rows(self, x, idx):
        """``x[idx]`` along the first dimension (``idx``: numpy or a long tensor).

        On a CPU, ``index_select`` copies whole rows where ``x[idx]`` goes element by
        element: several times faster (one of a step's largest costs), the same values,
        and a backward (``index_add``) that sums repeated rows in the same order. On a
        GPU, ``index_add`` adds with atomics (in no fixed order) where indexing's backward
        is deterministic, so indexing stays there.
        """
        torch = attempt_import("torch")
        if not isinstance(idx, torch.Tensor):
            idx = self.index(idx)
        return x.index_select(0, idx) if self.dev.type == "cpu" else x[idx]

    def padded_residuals(self):
        """``(R, rb)`` of the warm items with a zero row appended: the row of every cold item."""
        torch = attempt_import("torch")
        return (torch.cat([self.R, torch.zeros(1, self.d, device=self.dev)]),
                torch.cat([self.rb, torch.zeros(1, device=self.dev)]))

    def item_terms(self, Rx, rbx, items: np.ndarray, feats: np.ndarray | None,
                   drop: np.ndarray | None = None):
        """Fused vectors and biases of ``items``, with their dynamic features ``feats``
        (:meth:`draw`; None: none); ``drop`` hides the residuals of some items."""
        P, d = self.P, self.d
        va = self.rows(self.VA, items)
        rows = self.wmap[items]
        rows = self.index(rows if drop is None else np.where(drop, self.n_warm, rows))
        w = va[:, :d] + P["alpha"] * (va[:, d:] @ P["W"]) + self.rows(Rx, rows)
        b = P["b0"] + va[:, :d] @ P["bv"] + va[:, d:] @ P["ba"] + self.rows(rbx, rows)
        if feats is not None:
            b = b + self.tensor(feats) @ P["theta"]
        return w, b

    def segment_terms(self, dr: "Draw"):
        """What the users' segments add to the targets ``[events]`` and to the pool
        ``[bags, pool]`` (zeros when the model has no segment term)."""
        if dr.seg_items is None or "theta_seg" not in self.P:
            return 0.0, 0.0
        P = self.P
        n_cols = dr.seg_inv.shape[1]
        f = self.tensor(dr.seg_items).reshape(n_cols, dr.items.size, -1)  # [columns, events, width]
        t_items = (f * P["theta_seg"][:, None, :]).sum(2).sum(0)
        F = self.tensor(dr.seg_pool)  # [u, pool, width]
        theta = self.rows(P["theta_seg"], self.rows(self.key_col, np.maximum(dr.seg_keys, 0)))  # [u, width]
        G = (F * theta[:, None, :]).sum(2)  # [u, pool]; zero rows for key -1
        t_pool = 0.0
        for c in range(n_cols):
            t_pool = t_pool + self.rows(G, dr.seg_inv[:, c])
        return t_items, t_pool

    def user_terms(self, Rx, bags: np.ndarray):
        """History user vectors ``X`` and new-user vectors ``X0`` of ``bags``."""
        torch = attempt_import("torch")
        P, d = self.P, self.d
        X0 = P["u0"] + self.rows(self.UA, self.bags.user[bags]) @ P["U"]
        Xh = None
        for kind, (fixed, r_ptr, r_rows, r_w) in self.hist.items():
            g = f"g_{kind}"
            hva = self.rows(fixed, bags)
            h = hva[:, :d] + P["alpha"] * (hva[:, d:] @ P["W"])
            j, offsets = ranges(r_ptr[bags], r_ptr[bags + 1])
            h = h + torch.nn.functional.embedding_bag(
                self.index(r_rows[j]), Rx, self.index(offsets), mode="sum",
                per_sample_weights=self.tensor(r_w[j]))
            Xh = P[g] * h if Xh is None else Xh + P[g] * h
        return X0 + Xh + Xh @ P["M"], X0

    # --------------------------------------------------------------------- loss
    def step(self, bags: np.ndarray, opt: Any, dr: "Draw | None" = None) -> tuple[float, float]:
        """One optimiser step on ``bags`` (its :meth:`draw`, made here when not given);
        returns (weighted loss sum, weight sum)."""
        batch = self.batch(bags, dr)
        if self.cfg.objective == "softmax":
            loss, denom = self.softmax_loss(batch)
            if loss is None:
                return 0.0, 0.0
        else:
            loss, denom = self.bce_loss(batch)
        loss = loss / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach()) * denom, denom

    def draw(self, bags: np.ndarray) -> "Draw":
        """Everything of a batch that the parameters do not change: its events, the residual
        dropout and the pool drawn (in this order, from the trainer's generator), and the
        dynamic features as of the batch's first bag. Numpy only, so :meth:`epoch` computes
        the next batch's in a second thread while torch runs this one."""
        cfg, B = self.cfg, self.bags
        t_batch = int(B.time[bags].min())
        e_idx, _ = ranges(B.ptr[bags], B.ptr[bags + 1])
        sizes = B.ptr[bags + 1] - B.ptr[bags]
        e_bag_np = np.repeat(np.arange(bags.size), sizes)
        items = self.ev_item[e_idx]
        drop = self.rng.random(items.size) < cfg.residual_dropout if cfg.residual_dropout > 0 else None
        pool = self.rng.integers(0, self.n_items, size=cfg.sample_pool)
        dr = Draw(e_idx, sizes, e_bag_np, items, drop, pool)
        act = self.activity
        if act is None:
            return dr
        dr.f_items, dr.f_pool = act.items.features(items, t_batch), act.items.features(pool, t_batch)
        seg = act.segments
        if seg is not None and "theta_seg" in self.P:
            keys = self.UK[B.user[bags]]  # [bags, columns]
            ek = keys[e_bag_np]  # [events, columns]
            dr.seg_items = seg.pair_features(ek.T.reshape(-1), np.tile(items, keys.shape[1]), t_batch)
            uniq, inv = np.unique(keys, return_inverse=True)
            dr.seg_keys, dr.seg_inv = uniq, inv.reshape(keys.shape)
            # contiguous here, in the draw's thread: the step would copy it on the critical path
            dr.seg_pool = np.ascontiguousarray(seg.key_features(pool, t_batch, uniq))  # [u, pool, width]
        return dr

    def batch(self, bags: np.ndarray, dr: "Draw | None" = None) -> Batch:
        """User vectors, targets and a sampled pool of ``bags`` (from :meth:`draw`, made
        here when not given)."""
        cfg, B = self.cfg, self.bags
        dr = self.draw(bags) if dr is None else dr
        Rx, rbx = self.padded_residuals()
        X, X0 = self.user_terms(Rx, bags)
        wt, bt = self.item_terms(Rx, rbx, dr.items, dr.f_items, dr.drop)
        label, weight = B.label[dr.e_idx], B.weight[dr.e_idx]
        wgt = self.tensor(weight)
        ws, bs = self.item_terms(Rx, rbx, dr.pool, dr.f_pool)
        seg_t, seg_p = self.segment_terms(dr)
        paths = [(X, 1.0, wgt)]
        if cfg.prior_weight > 0:
            # dislikes are about personal taste given a history: they stay out of the prior
            paths.append((X0, cfg.prior_weight, wgt * self.tensor((label == 1).astype(np.float32))))
        return Batch(bags=bags, e_idx=dr.e_idx, sizes=dr.sizes, e_bag=self.index(dr.e_bag_np), label=label,
                     weight=weight, paths=paths, wt=wt, bt=bt, ws=ws, bs=bs, seg_t=seg_t, seg_p=seg_p)

    def softmax_loss(self, b: Batch) -> tuple[Any, float]:
        """Sampled softmax of every positive against the pool and its bag's other events
        (None when the batch has no positive), and its weight sum."""
        torch = attempt_import("torch")
        cfg = self.cfg
        pos = np.flatnonzero(b.label == 1)
        if pos.size == 0:
            return None, 0.0
        wgt = b.paths[0][2]
        pos_t = self.index(pos)
        bag_of_pos = self.rows(b.e_bag, pos_t)
        # the pool stands for the whole catalogue
        pool_shift = math.log(max(self.n_items / max(cfg.sample_pool, 1), 1.0))
        loss = torch.zeros((), device=self.dev)
        for Xp, lam, _ in b.paths:
            logit = (b.wt * self.rows(Xp, b.e_bag)).sum(1) + b.bt + b.seg_t
            pool_lse = torch.logsumexp(Xp @ b.ws.T + b.bs + b.seg_p, 1) + pool_shift  # [bags]
            terms = [self.rows(logit, pos_t), self.rows(pool_lse, bag_of_pos)]
            hard = self.hard_negatives(b, logit)
            if hard is not None:
                terms.append(self.rows(hard, bag_of_pos))
            lse = torch.logsumexp(torch.stack(terms, 1), 1)
            loss = loss + lam * ((lse - self.rows(logit, pos_t)) * self.rows(wgt, pos_t)).sum()
        return loss, float(b.weight[pos].sum()) or 1.0

    def hard_negatives(self, b: Batch, logit: Any) -> Any:
        """Per bag, the log-sum-exp of its other events' logits (None without any).

        The bag's other events were shown with (or near) the positive and not chosen:
        hard negatives in its softmax, offset by their loss weight. Pairs inside a slate
        compare items that were exposed alike, so exposure itself is never penalised."""
        torch = attempt_import("torch")
        cfg = self.cfg
        hard_rows = np.flatnonzero(b.label != 1)
        if not hard_rows.size:
            return None
        slot = b.e_idx - np.repeat(self.bags.ptr[b.bags], b.sizes)
        offset = np.where(b.label < 0, math.log(max(cfg.neg_weight, 1e-12)),
                          math.log(max(cfg.impression_weight, 1e-12)))
        hard = torch.full((b.bags.size, int(b.sizes.max())), -math.inf, device=self.dev)
        hr = self.index(hard_rows)
        hard = hard.index_put((self.rows(b.e_bag, hr), self.index(slot[hard_rows])),
                              self.rows(logit, hr) + self.tensor(offset[hard_rows]))
        return torch.logsumexp(hard, 1)

    def bce_loss(self, b: Batch) -> tuple[Any, float]:
        """Weighted BCE on the events plus ``n_sampled_negatives`` per positive spread
        over the pool, and its weight sum."""
        torch = attempt_import("torch")
        F = torch.nn.functional
        cfg = self.cfg
        y = self.tensor((b.label == 1).astype(np.float32))
        loss = torch.zeros((), device=self.dev)
        for Xp, lam, wp in b.paths:
            logit = (b.wt * self.rows(Xp, b.e_bag)).sum(1) + b.bt + b.seg_t
            part = F.binary_cross_entropy_with_logits(logit, y, weight=wp, reduction="sum")
            bag_pos = torch.zeros(b.bags.size, device=self.dev).index_add(0, b.e_bag, wp * y)
            scale = cfg.n_sampled_negatives / max(1, cfg.sample_pool)
            pool_logits = Xp @ b.ws.T + b.bs + b.seg_p  # [bags, pool]
            part = part + scale * (F.softplus(pool_logits).sum(1) * bag_pos).sum()
            loss = loss + lam * part
        return loss, float(b.weight.sum()) or 1.0

    # ---------------------------------------------------------------- the loop
    def export(self) -> None:
        """Copy the parameters back into the model (numpy) and set its residuals."""
        torch = attempt_import("torch")
        m = self.model
        with torch.no_grad():
            for k in m.params:
                m.params[k] = self.P[k].detach().cpu().numpy().astype(np.float32).reshape(
                    m.params[k].shape)
            R = np.zeros((self.n_items, self.d), np.float32)
            rb = np.zeros(self.n_items, np.float32)
            R[self.warm] = self.R.detach().cpu().numpy()
            rb[self.warm] = self.rb.detach().cpu().numpy()
        m.residuals = (R, rb)

    def epoch(self, opt: Any) -> float:
        """One pass over the batches in a random order; the weighted mean loss.

        The next batch's :meth:`draw` (numpy: the point-in-time features, about half of a
        step's work) runs in a second thread while torch runs this one. The draws still
        happen one after another in the batches' order, so the generator's sequence, and
        the result, are those of a single thread."""
        tot = cnt = 0.0
        batches = self.bags.batches
        order = self.rng.permutation(len(batches))
        with ThreadPoolExecutor(1, thread_name_prefix="dynstore-draw") as ahead:
            nxt = ahead.submit(self.draw, batches[order[0]]) if len(order) else None
            for i, b in enumerate(order):
                dr = nxt.result()
                if i + 1 < len(order):
                    nxt = ahead.submit(self.draw, batches[order[i + 1]])
                s, n = self.step(batches[b], opt, dr)
                tot, cnt = tot + s, cnt + n
                self.steps_done += 1
                if self.progress is not None:
                    self.progress(self.steps_done, self.steps_total)
        return tot / max(cnt, 1e-12)

    def dynamics_optimiser(self) -> Any:
        """AdamW over the weights of the behaviour features only (and ``b0``)."""
        torch = attempt_import("torch")
        names = [k for k in self.cfg.first_phase if k in self.P and self.P[k].requires_grad]
        return torch.optim.AdamW([self.P[k] for k in names], lr=self.cfg.dynamics_lr, weight_decay=0.0)

    def _only(self, names: set | None):
        """Let only ``names`` learn (None: everything that may learn); returns the undo."""
        saved = {k: p.requires_grad for k, p in self.P.items()}
        saved["R"], saved["rb"] = self.R.requires_grad, self.rb.requires_grad
        if names is not None:
            for k, p in self.P.items():
                p.requires_grad_(saved[k] and k in names)
            self.R.requires_grad_(False)
            self.rb.requires_grad_(False)

        def undo():
            for k, p in self.P.items():
                p.requires_grad_(saved[k])
            self.R.requires_grad_(saved["R"])
            self.rb.requires_grad_(saved["rb"])
        return undo

    def fit(self, epochs: int, *, holdout: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
            patience: int = 2, progress: Callable[[int, int], Any] | None = None) -> dict:
        """Two phases. First the weights of the behaviour features alone learn, for
        ``config.dynamics_epochs`` epochs: the popularity rule becomes the best mix of
        recent behaviour. Then everything learns for up to ``epochs`` epochs; with a
        ``holdout`` the best of (first phase, each epoch) is kept, so a trained version
        is never worse on the holdout than its behaviour weights alone."""
        t_start = time.perf_counter()
        # epochs = -1: keep the start (what early stopping chose when nothing helped)
        n_dyn = int(self.cfg.dynamics_epochs) if self.activity is not None and epochs >= 0 else 0
        epochs = max(int(epochs), 0)
        self.progress, self.steps_done = progress, 0
        self.steps_total = (n_dyn + epochs) * len(self.bags.batches)
        judge = BestOnHoldout(self, holdout, patience) if holdout is not None else None
        if judge is not None:
            judge(-1)  # the start (the rule, or the current version) is a candidate too
        losses = self.first_phase(n_dyn)
        if judge is not None:
            judge(0)
        for epoch in range(epochs):
            losses.append(self.epoch(self.opt))
            if judge is not None and not judge(epoch + 1):
                break
        if judge is not None:
            judge.restore()
        else:
            self.export()
        return self.summary(losses, n_dyn, judge, t_start)

    def first_phase(self, n_dyn: int) -> list[float]:
        """``n_dyn`` epochs in which only ``config.first_phase`` learns; their losses."""
        losses: list[float] = []
        if not n_dyn:
            return losses
        undo = self._only(set(self.cfg.first_phase))
        opt = self.dynamics_optimiser()
        try:
            for _ in range(n_dyn):
                losses.append(self.epoch(opt))
        finally:
            undo()
        return losses

    def summary(self, losses: list[float], n_dyn: int, judge: "BestOnHoldout | None",
                t_start: float) -> dict:
        """The statistics :func:`train` returns."""
        lab = self.bags.label
        return {
            "loss": float(losses[-1]) if losses else float("nan"),
            "epoch_losses": [float(x) for x in losses],
            **({"epoch_ndcg@10": judge.scores, "best_epoch": judge.best[1], "start_diff": judge.diff}
               if judge is not None else {}),
            "dynamics_epochs": n_dyn,
            "epochs": len(losses) - n_dyn,
            "n_positive": int((lab == 1).sum()),
            "n_negative": int((lab < 0).sum()),
            "n_impression": int((lab == 0).sum()),
            "n_warm_items": self.n_warm,
            "seconds": time.perf_counter() - t_start,
        }


class BestOnHoldout:
    """Early stopping: the best parameters so far by NDCG@10 on a holdout.

    Leaving the start (the rule, or what the store serves) takes a gain larger than
    ``start_z`` standard errors over the holdout's users: a small holdout is noisy, and
    the start is known to work."""

    def __init__(self, trainer: Trainer, holdout: tuple[np.ndarray, np.ndarray, np.ndarray],
                 patience: int):
        self.trainer, self.holdout, self.patience = trainer, holdout, patience
        self.scores: list[float] = []
        #: (score, full epochs, params, residuals) of the best candidate
        self.best: tuple | None = None
        self.start: np.ndarray | None = None  # per-user NDCG of the start

    def __call__(self, full_epochs: int) -> bool:
        """Keep the trainer's parameters if they are the best so far; False = stop."""
        t = self.trainer
        t.export()
        res = evaluate(t.model, t.data, *self.holdout, k=10, per_user=True, with_auc=False)
        score = float(res["ndcg@10"])
        self.scores.append(score)
        if self.start is None:
            self.start = res["ndcg_per_user"]
        ok = full_epochs == -1 or clearly_better(res["ndcg_per_user"], self.start, t.cfg.start_z)
        if self.best is None or (ok and score > self.best[0]):
            self.best = (score, full_epochs, {k: v.copy() for k, v in t.model.params.items()},
                         t.model.residuals)
            self.diff = res["ndcg_per_user"] - self.start
        return full_epochs - self.best[1] < self.patience

    def restore(self) -> None:
        """Put the best candidate's parameters and residuals into the model."""
        self.trainer.model.params, self.trainer.model.residuals = self.best[2], self.best[3]
