"""The fusion + user model: fused item vectors and biases, history-based user vectors.

Every term, and why it is there
-------------------------------
Item side (computed once per version and stored with the item rows)::

    w_i = v_i + alpha * W a_i + r_i
    b_i = b0 + bv . v_i + ba . a_i + rb_i

* ``v_i`` -- the L2-normalised semantic vector of the item's document (MiniLM: d=384).
  It is fixed (never trained here), so a new item is recommendable as soon as it is
  encoded, and two items with similar documents score alike.
* ``alpha * W a_i`` -- attribute features (:mod:`dynstore.model.features`) projected into the
  semantic space; ``alpha`` is a learned scalar started at ``config.alpha_init`` so the
  attribute term begins as a small correction of the text.
* ``r_i`` -- learned collaborative residual, **only** for items with at least
  ``config.min_history`` training positives; zero otherwise, so cold items are scored
  from content alone and a residual never memorises two clicks.
* ``b_i`` -- item bias ("liked in general"). On temporal splits most test users are new
  and only this prior carries them; it is predicted from text (``bv``) and attributes
  (``ba``) so a *cold* item gets a sensible prior, plus a residual ``rb_i`` for warm items.
  ``config.residual_dropout`` hides the residuals of random warm targets during training
  so ``bv``/``ba`` learn to stand in for them (the cold-item case).

User side (computed at query time from the user's latest history -- no retraining)::

    x_u = u0 + U a_u + (I + M) (g_pos * agg_pos(w_j) + g_neg * agg_neg(w_j))

* ``u0`` -- global taste direction; with the biases it is the new-user recommendation.
* ``U a_u`` -- user-attribute (segment) term: popularity *within a segment* for new users.
* ``agg_pos`` -- recency-weighted mean of the fused vectors of the user's positives:
  weight ``exp(-rank / half_life)`` with rank 0 the most recent, over the most recent
  ``max_history`` positives (ties in time: later in the input is more recent).
* ``agg_neg`` -- the same over explicit negatives and shown-but-ignored impressions;
  ``g_neg`` is learned (negative when dislikes predict dislikes). The ablation
  ``use_negatives=False`` drops these events entirely (``g_neg = 0``).
* ``M`` -- a learned d x d correction (zero-initialised; ``config.user_transform``) that
  turns the fixed cosine geometry of the text space into a learned bilinear similarity
  between history and candidates; chosen on the temporal validation slice of the
  MovieLens benchmark (NDCG@10 0.336 vs 0.328 without).

Score: ``p_ui = sigmoid(w_i . x_u + b_i)`` plus the segment and item-item terms; the one
equation, every term of it, is :mod:`dynstore.model.score`.

Layout
------
This module holds the parameters and the scoring (item side, user side, state); the
trainer (``fit -> epoch -> step``, the objective) is :mod:`dynstore.model.training`, ranking
metrics on later events :mod:`dynstore.model.evaluation`, CSR histories
:mod:`dynstore.model.histories`; hyper-parameters and training data :mod:`dynstore.model.spec`.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> V = rng.normal(size=(50, 8)).astype(np.float32); A = np.zeros((50, 0), np.float32)
>>> m = FusionModel.untrained(V, A, fu=0, popularity=np.arange(50.0),
...                            config=ModelConfig(dynamic=False))
>>> Wf, bias = m.item_side(V, A, m.residuals)
>>> X = m.user_vectors(None, np.array([0, 0]), np.zeros(0, np.int64), np.zeros(0, np.int8),
...                    np.zeros(0, np.int64), Wf)
>>> int(np.argmax(Wf @ X[0] + bias))      # a new user gets the most popular item
49
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from dynstore.model.coldtext import neighbour_scores
from dynstore.model.dynamics import (SEGMENT_SPEC, Activity, DynamicSpec, ItemActivity, SegmentActivity,
                       popularity_prior)
from dynstore.model.evaluation import evaluate, scorer
from dynstore.model.histories import add_into, build_histories, entry_rows, history_groups, most_recent_first, normalise, recency_sum
from dynstore.model.itemitem import ItemItem
from dynstore.model.spec import ModelConfig, TrainingData
from dynstore.model.prior import ContentPrior
from dynstore.model.userknn import user_knn_scores

#: rows of :meth:`FusionModel.item_side` computed at once (a divisor of the 65,536-row
#: batches a version is written in, so its rows and a recomputed item side agree)
ITEM_SIDE_ROWS = 16384

__all__ = ["ModelConfig", "TrainingData", "FusionModel", "build_histories", "evaluate"]

_FORMAT = "dynstore.fusion/1"


class FusionModel:
    """Fused item embeddings + history-based user vectors (see the module docstring).

    Parameters
    ----------
    d : int
        Semantic vector width.
    fa, fu : int
        Item and user attribute feature widths (0 allowed).
    config : ModelConfig, optional

    Examples
    --------
    >>> m = FusionModel(d=4, fa=2, fu=0)
    >>> sorted(m.state()[0])
    ['M', 'U', 'W', 'alpha', 'b0', 'ba', 'beta', 'bv', 'delta', 'eta', 'g_imp', 'g_neg', 'g_pos', 'g_short', 'gamma', 'theta', 'u0']
    """

    def __init__(self, d: int, fa: int, fu: int, config: ModelConfig | None = None,
                 dynamic: DynamicSpec | None = None, segments: tuple[int, ...] = ()):
        self.d, self.fa, self.fu = int(d), int(fa), int(fu)
        #: keys per user segment column (see FeatureSpec.segment_columns)
        self.segments = tuple(int(n) for n in segments)
        self.config = config or ModelConfig()
        if dynamic is None and self.config.dynamic:
            dynamic = DynamicSpec()
        self.dynamic = dynamic if self.config.dynamic else None
        rng = np.random.default_rng(self.config.seed)
        # each attribute starts as a random unit direction: a small, seeded projection
        W = rng.normal(size=(self.fa, self.d))
        W /= np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
        self.params: dict[str, np.ndarray] = {
            "W": W.astype(np.float32),
            "alpha": np.array([self.config.alpha_init], np.float32),
            "b0": np.zeros(1, np.float32),
            "bv": np.zeros(self.d, np.float32),
            "ba": np.zeros(self.fa, np.float32),
            "u0": np.zeros(self.d, np.float32),
            "U": np.zeros((self.fu, self.d), np.float32),
            "g_pos": np.ones(1, np.float32),
            # the last few likes weigh as much as the whole history: a new like moves
            # the list at once (measured neutral to +1 % NDCG@10 on both benchmarks)
            "g_short": np.ones(1, np.float32),
            "g_neg": np.array([-0.5 if self.config.use_negatives else 0.0], np.float32),
            "g_imp": np.array([-0.5 if self.config.use_negatives else 0.0], np.float32),
            "M": np.zeros((self.d, self.d), np.float32),
        }
        if self.config.item_item:
            self.params["gamma"] = np.zeros(1, np.float32)
        if self.config.user_knn > 0:  # the user-kNN term's weight (dynstore.model.userknn)
            self.params["delta"] = np.zeros(1, np.float32)
        #: the closed-form item-item component (set by :meth:`fit`), or None
        self.item_item: ItemItem | None = None
        if self.config.content_prior and self.dynamic is not None:
            self.params["beta"] = np.zeros(1, np.float32)
            # the cold items' text-neighbour term's weight (dynstore.model.coldtext)
            self.params["eta"] = np.zeros(1, np.float32)
        #: items without events in the last closed-form fit (bool ``[n]``; items past it count
        #: as cold): the columns of the text-neighbour term; None before any fit
        self.cold_items: np.ndarray | None = None
        #: the closed-form content prior (:mod:`dynstore.model.prior`, set by :meth:`fit`), or
        #: None; ``prior_item`` is its value for each item of that fit, in their order
        self.prior: ContentPrior | None = None
        self.prior_item: np.ndarray | None = None
        if self.dynamic is not None:
            self.params["theta"] = np.zeros(self.dynamic.width, np.float32)
            if self.segments:
                self.params["theta_seg"] = np.zeros((len(self.segments), SEGMENT_SPEC.width), np.float32)
        #: the new users' weights on the dynamic features (users with no positive in their
        #: history, :func:`dynstore.model.score.new_users`): the popularity column refresh
        #: chose for them on the pooled cuts (:func:`dynstore.model.selection.choose_new_users`);
        #: None: they use ``theta`` as everyone does. Not trained, so kept out of ``params``.
        self.theta_new: np.ndarray | None = None
        #: ``(R [n_items, d], rb [n_items])`` of the last fit (zero rows for items below
        #: ``min_history``), aligned with that fit's items; None before any fit
        self.residuals: tuple[np.ndarray, np.ndarray] | None = None

    # ----------------------------------------------------------- construction
    @classmethod
    def untrained(
        cls,
        V: np.ndarray,
        A: np.ndarray,
        fu: int,
        popularity: np.ndarray | None = None,
        config: ModelConfig | None = None,
        *,
        rule: float | None = 30.0,
        dynamic: DynamicSpec | None = None,
        segments: tuple[int, ...] = (),
    ) -> "FusionModel":
        """The documented version-1 model, before any training: the popularity rule.

        Seeded random ``W``, ``alpha = alpha_init``, ``u0 = 0``, ``U = 0``, ``g_pos = 1``,
        ``g_neg = -0.5``. With dynamic features (the default) the bias is
        ``log(1 + positives decayed with half-life rule days)`` as of scoring time
        (``theta`` = 1 on that feature, 0 elsewhere): recent popularity, recounted at
        every query. Without (``config.dynamic=False``) it is the standardised
        ``log(1 + popularity)``, carried as the residual bias ``rb`` (``.residuals`` =
        ``(zeros, bias)``; pass them to :meth:`item_side`). A new user gets the
        popular items; a user with history gets items similar to what they liked, plus
        the prior.

        >>> import numpy as np
        >>> m = FusionModel.untrained(np.eye(3, dtype=np.float32), np.zeros((3, 0)), 0)
        >>> m.dynamic.names()[int(np.argmax(m.params["theta"]))]
        'pos@30d'
        """
        V = np.asarray(V, dtype=np.float32)
        A = np.asarray(A, dtype=np.float32).reshape(V.shape[0], -1)
        m = cls.popularity_rule(V.shape[1], A.shape[1], fu, config, rule=rule, dynamic=dynamic, segments=segments)
        n = V.shape[0]
        m.residuals = (np.zeros((n, m.d), np.float32), m.start_bias(popularity, n))
        return m

    @classmethod
    def popularity_rule(cls, d: int, fa: int, fu: int, config: ModelConfig | None = None, *,
                        rule: float | None = 30.0, dynamic: DynamicSpec | None = None,
                        segments: tuple[int, ...] = ()) -> "FusionModel":
        """:meth:`untrained`'s parameters without its residuals: what version 1 needs
        when the popularity is dynamic (its residuals are all zero), with no item matrix
        in memory.

        >>> m = FusionModel.popularity_rule(3, 0, 0)
        >>> m.residuals is None, m.dynamic.names()[int(np.argmax(m.params["theta"]))]
        (True, 'pos@30d')
        """
        m = cls(d, fa, fu, config, dynamic, segments)
        if m.dynamic is not None:
            m.params["theta"][m.dynamic.index("pos", rule)] = 1.0
        return m

    def start_bias(self, popularity: np.ndarray | None, n: int) -> np.ndarray:
        """``float32 [n]``: the residual bias ``rb`` a model starts from. Without dynamic
        features (which carry popularity at scoring time) it is the standardised
        ``log(1 + popularity)``; otherwise, or without counts, zero.

        >>> m = FusionModel(d=2, fa=0, fu=0, config=ModelConfig(dynamic=False))
        >>> m.start_bias(np.array([0, 0, 3, 3]), 4).tolist()
        [-1.0, -1.0, 1.0, 1.0]
        """
        if self.dynamic is not None or popularity is None or not n:
            return np.zeros(n, np.float32)
        return popularity_prior(popularity)

    # ----------------------------------------------------------------- serving
    def item_side(
        self,
        V: np.ndarray,
        A: np.ndarray,
        residuals: tuple[np.ndarray, np.ndarray] | None = None,
        *,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fused item matrix ``Wf [n, d]`` and bias ``[n]`` (float32).

        ``residuals=None`` means no residuals (every item scored as cold). ``out``
        (float32 ``[n, d]``) receives ``Wf``; it may be ``V`` itself, when the caller
        is done with the vectors: each block of rows is read before it is written.

        >>> import numpy as np
        >>> m = FusionModel(d=2, fa=0, fu=0)
        >>> m.item_side(np.array([[3.0, 4.0]]), np.zeros((1, 0)))[0].tolist()
        [[0.6000000238418579, 0.800000011920929]]
        """
        V = np.asarray(V)
        n = V.shape[0]
        A = np.asarray(A, dtype=np.float32).reshape(n, -1)
        if A.shape[1] != self.fa or V.ndim != 2 or V.shape[1] != self.d:
            raise ValueError(f"expected V [n, {self.d}] and A [n, {self.fa}]")
        R, rb = (None, None) if residuals is None else (np.asarray(r, np.float32) for r in residuals)
        Wf, bias = np.empty((n, self.d), np.float32) if out is None else out, np.empty(n, np.float32)
        if Wf.shape != (n, self.d) or Wf.dtype != np.float32:
            raise ValueError(f"out must be float32 [{n}, {self.d}]")
        # a block of rows at a time into the result: every row is computed on its own,
        # so the numbers are the same, and the temporaries follow a block, not the catalogue
        for a in range(0, n, ITEM_SIDE_ROWS):
            b = min(a + ITEM_SIDE_ROWS, n)
            Wf[a:b], bias[a:b] = self._item_block(V[a:b], A[a:b], None if R is None else (R[a:b], rb[a:b]))
        return Wf, bias

    def _item_block(self, V: np.ndarray, A: np.ndarray, residuals) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`item_side` of one block of rows."""
        p = self.params
        V = normalise(V)
        bias = p["b0"][0] + V @ p["bv"] + A @ p["ba"]
        beta = self.prior_weight()
        if beta:  # the content prior at full weight: dynamic_bias shrinks it as events accrue
            bias = bias + beta * (self.prior.b + V @ self.prior.wv + A @ self.prior.wa)
        # summed into the normalised copy of V (float32 throughout, so the sums
        # round as ``V + alpha * (A @ W)`` does)
        AW = A @ p["W"]
        AW *= p["alpha"][0]
        Wf = add_into(V, AW)
        if residuals is not None:
            Wf = add_into(Wf, residuals[0])
            bias = bias + residuals[1]
        return Wf, bias.astype(np.float32)

    def activity(self, item, ts, label, n_items: int, keys=None) -> "Activity | None":
        """Index an event log for the dynamic features (None when the model has none).

        ``keys`` are the segment keys of each event's user (``[n_events, columns]``).
        """
        if self.dynamic is None:
            return None
        seg = None
        if self.segments and keys is not None and np.asarray(keys).size:
            seg = SegmentActivity(SEGMENT_SPEC, item, ts, label, keys, n_items, sum(self.segments))
        return Activity(ItemActivity(self.dynamic, item, ts, label, n_items), seg)

    def activity_of(self, data: "TrainingData") -> "Activity | None":
        """:meth:`activity` of ``data``'s events, built once per data object (early
        stopping scores the same data after every epoch)."""
        if self.dynamic is None:
            return None
        key = (self.dynamic, self.segments)
        memo = data.__dict__.setdefault("_activity", {})
        if key not in memo:
            memo[key] = self.activity(data.item, data.ts, data.label, data.V.shape[0], data.UK[data.user])
        return memo[key]

    def dynamic_bias(self, features: np.ndarray | None, new_users: bool = False) -> np.ndarray | float:
        """``theta . f_i(t)``: the part of the bias that moves with behaviour.

        ``features`` is :meth:`ItemActivity.features` of the items at scoring time
        (0.0 when the model has no dynamic features). ``new_users``: the bias of users
        with no positive yet, ``theta_new . f_i(t)`` (``theta`` when the model has no
        ``theta_new``); the content prior is shrunk alike for everyone.
        """
        if self.dynamic is None or features is None:
            return 0.0
        F = np.asarray(features, np.float32)
        theta = self.theta_new if new_users and self.theta_new is not None else self.params["theta"]
        out = (F @ theta).astype(np.float32)
        return self.prior_shrink(F, out)

    def new_user_rule(self, half_life: float | None) -> np.ndarray:
        """``theta_new`` of the popularity rule on positives decayed with ``half_life``
        (days; None: all time): 1 on that column, 0 elsewhere."""
        theta = np.zeros(self.dynamic.width, np.float32)
        theta[self.dynamic.index("pos", half_life)] = 1.0
        return theta

    def prior_weight(self) -> float:
        """``beta``, the content prior's weight (0.0 without a fitted prior)."""
        if self.prior is None or "beta" not in self.params:
            return 0.0
        return float(self.params["beta"][0])

    def prior_column(self) -> int | None:
        """The behaviour feature whose count shrinks the prior: positives of all time."""
        if self.dynamic is None or "pos" not in self.dynamic.kinds or None not in self.dynamic.half_lives:
            return None
        return self.dynamic.index("pos", None)

    def prior_shrink(self, F: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out`` less ``beta * prior_i * n_i / (n_i + k)`` for the items of the prior's fit
        (rows of ``F``, the features of every item in order): the item side adds the prior
        at full weight, so item ``i`` keeps ``beta * prior_i * k / (n_i + k)`` of it, with
        ``n_i`` its positives so far (``config.prior_k``). Items added after the fit keep
        all of it."""
        beta, col = self.prior_weight(), self.prior_column()
        if not beta or col is None or self.prior_item is None or F.ndim != 2:
            return out
        m = min(F.shape[0], self.prior_item.size)
        n = np.expm1(F[:m, col].astype(np.float64))
        out = np.array(out, np.float32)
        out[:m] -= (beta * self.prior_item[:m] * (n / (n + self.config.prior_k))).astype(np.float32)
        return out

    def key_columns(self) -> np.ndarray:
        """Segment column of every segment key."""
        return np.repeat(np.arange(len(self.segments)), self.segments).astype(np.int64)

    def segment_table(self, activity: "Activity | None", items, t) -> np.ndarray | None:
        """``float32 [n_keys, len(items)]``: what each user segment adds to each item's
        score at time ``t`` (``theta_seg`` of the key's column on the key's features)."""
        if activity is None or activity.segments is None or "theta_seg" not in self.params:
            return None
        F = activity.segments.key_features(items, t)  # [n_keys, n, width]
        theta = self.params["theta_seg"][self.key_columns()]  # [n_keys, width]
        return np.einsum("knf,kf->kn", F, theta).astype(np.float32)

    def item_item_bias(self, hist_ptr, hist_item, hist_label, n_items: int,
                       hist_ts=None) -> np.ndarray | float:
        """``gamma`` times the users' standardised item-item scores from their positives
        (0.0 without the component), each positive weighted ``0.5 ** (rank / h)`` by its
        rank among the user's positives, most recent first (``h``: the config's
        ``item_item_recency``; 0 or no ``hist_ts``: all alike)."""
        gamma = float(self.params.get("gamma", np.zeros(1))[0])
        if self.item_item is None or gamma == 0.0:
            return 0.0
        ptr, items, weight = recent_positives(hist_ptr, hist_item, hist_label, hist_ts,
                                              float(self.config.item_item_recency or 0.0))
        return gamma * self.item_item.scores(ptr, items, n_items, weight)

    def cold_neighbour_bias(self, hist_ptr, hist_item, hist_label, Wf: np.ndarray) -> np.ndarray | float:
        """``eta`` times the users' text-neighbour scores of the cold items
        (:func:`dynstore.model.coldtext.neighbour_scores` on the fused vectors ``Wf``; 0.0
        without the term or before a fit)."""
        eta = float(self.params.get("eta", np.zeros(1))[0])
        if eta == 0.0 or self.cold_items is None:
            return 0.0
        return eta * neighbour_scores(Wf, self.cold_items, hist_ptr, hist_item, hist_label)

    def user_knn_bias(self, hist_ptr, hist_item, hist_label, n_items: int, pool: Any = None,
                      self_rows: np.ndarray | None = None, hist_ts=None) -> np.ndarray | float:
        """``delta`` times the users' standardised user-kNN scores (:mod:`dynstore.model.userknn`)
        from their positives, neighbours drawn from ``pool`` (a :class:`Pool`, or a callable
        giving one: built only when the term is on); 0.0 without the term or a pool. With
        the config's ``user_knn_recency`` ``h`` > 0 (and ``hist_ts``) a positive weighs
        ``0.5 ** (rank / h)`` in finding the neighbours, rank 0 the most recent."""
        delta = float(self.params.get("delta", np.zeros(1))[0])
        if delta == 0.0 or pool is None:
            return 0.0
        pool = pool() if callable(pool) else pool
        ptr, items, weight = recent_positives(hist_ptr, hist_item, hist_label, hist_ts,
                                              float(getattr(self.config, "user_knn_recency", 0.0) or 0.0))
        S = user_knn_scores(pool, ptr, items, self.config.user_knn, self_rows, weight)
        if S.shape[1] < n_items:  # items the pool does not know yet
            S = np.pad(S, ((0, 0), (0, n_items - S.shape[1])))
        return delta * S[:, :n_items]

    @staticmethod
    def segment_bias(table: np.ndarray | None, keys: np.ndarray) -> np.ndarray | float:
        """Per-user sum of ``table`` rows over the users' keys ``[m, columns]`` -> ``[m, n]``."""
        if table is None:
            return 0.0
        keys = np.asarray(keys, np.int64)
        out = np.zeros((keys.shape[0], table.shape[1]), np.float32)
        for c in range(keys.shape[1]):
            ok = keys[:, c] >= 0
            out[ok] += table[keys[ok, c]]
        return out

    def user_vectors(
        self,
        UA_rows: np.ndarray | None,
        hist_ptr: np.ndarray,
        hist_item: np.ndarray,
        hist_label: np.ndarray,
        hist_ts: np.ndarray,
        Wf: np.ndarray,
    ) -> np.ndarray:
        """User vectors ``X [m, d]`` from CSR histories (see :func:`build_histories`).

        Parameters
        ----------
        UA_rows : float32 [m, fu] or None
            User attribute rows (None or zeros for unknown users).
        hist_ptr : int64 [m+1]
            User ``u``'s events are ``hist_*[hist_ptr[u]:hist_ptr[u+1]]``.
        hist_item : int64
            Row indices into ``Wf``.
        hist_label : int8
            1 positive, -1 explicit negative, 0 impression.
        hist_ts : int64
            Event times; the most recent ``max_history`` of each kind count, recency-weighted.
        Wf : float32 [n_items, d]
            Fused item matrix from :meth:`item_side`.

        Examples
        --------
        >>> import numpy as np
        >>> m = FusionModel(d=2, fa=0, fu=0)
        >>> Wf = np.eye(2, dtype=np.float32)
        >>> m.user_vectors(None, np.array([0, 1]), np.array([1]), np.array([1]),
        ...                np.array([0]), Wf).tolist()      # g_pos and g_short both see the like
        [[0.0, 2.0]]
        """
        p = self.params
        m = np.asarray(hist_ptr).size - 1
        user_of, items, labels = most_recent_first(hist_ptr, hist_item, hist_label, hist_ts)
        Xh = self.history_term(user_of, items, labels, m, Wf)
        X = p["u0"][None, :] + Xh + Xh @ p["M"]
        if UA_rows is not None and self.fu:
            X = X + np.asarray(UA_rows, dtype=np.float32).reshape(m, self.fu) @ p["U"]
        return np.ascontiguousarray(X, dtype=np.float32)

    def history_term(self, user_of: np.ndarray, items: np.ndarray, labels: np.ndarray, m: int,
                     Wf: np.ndarray) -> np.ndarray:
        """``sum g_k * agg_k(w_j)`` over the history aggregates (:func:`history_groups`),
        ``float32 [m, d]``, from entries sorted by :func:`most_recent_first`."""
        W = np.ascontiguousarray(Wf, dtype=np.float32)
        Xh = np.zeros((m, self.d), np.float32)
        for name, label, max_history, half_life in history_groups(self.config):
            sel = labels == label
            H = recency_sum(W, user_of[sel], items[sel], m, max_history, half_life)
            Xh += self.params[f"g_{name}"][0] * H
        return Xh

    def score(
        self,
        data: TrainingData,
        users: np.ndarray,
        residuals: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Logits ``[len(users), n_items]`` for users of ``data`` from their events in it
        (:func:`dynstore.model.evaluation.scorer`)."""
        return scorer(self, data, residuals)(np.asarray(users))

    def scorer(self, data: TrainingData,
               residuals: tuple[np.ndarray, np.ndarray] | None = None) -> Callable:
        """:func:`dynstore.model.evaluation.scorer` of this model."""
        return scorer(self, data, residuals)

    # ---------------------------------------------------------------- training
    def check_data(self, data: TrainingData) -> None:
        """Raise ValueError unless ``data``'s widths are the model's (d, fa, fu)."""
        V = data.V
        if V.shape[1] != self.d or data.A.shape[1] != self.fa or data.UA.shape[1] != self.fu:
            raise ValueError(
                f"data dims (d={V.shape[1]}, fa={data.A.shape[1]}, fu={data.UA.shape[1]}) do not "
                f"match the model (d={self.d}, fa={self.fa}, fu={self.fu})"
            )

    def fit(self, data: TrainingData, **options: Any) -> dict:
        """Train from the model's current parameters (warm start) on ``data``: see
        :func:`dynstore.model.training.train` for the parameters, the result and the objective.

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> data = TrainingData(V=rng.normal(size=(20, 4)), A=np.zeros((20, 0)),
        ...     UA=np.zeros((5, 0)), user=rng.integers(0, 5, 100), item=rng.integers(0, 20, 100),
        ...     ts=np.arange(100), label=np.ones(100, np.int8))
        >>> stats = FusionModel(4, 0, 0, ModelConfig(epochs=2)).fit(data)
        >>> stats["n_positive"]
        100
        """
        from dynstore.model.training import train  # the write path's (torch): serving never imports it

        return train(self, data, **options)

    # ------------------------------------------------------------- persistence
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """``(tensors, meta)``: float32 arrays for safetensors and JSON-able metadata.

        Residuals are per item and not included (the store keeps them with the items).

        >>> t, meta = FusionModel(d=3, fa=1, fu=2).state()
        >>> t["U"].shape, meta["d"]
        ((2, 3), 3)
        """
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.params.items()}
        if self.item_item is not None:
            tensors.update(self.item_item.tensors())
        if self.cold_items is not None:
            tensors["cn_cold"] = np.ascontiguousarray(self.cold_items, dtype=np.float32)
        if self.prior is not None:
            tensors.update(self.prior.tensors())
            if self.prior_item is not None:
                tensors["cp_item"] = np.ascontiguousarray(self.prior_item, dtype=np.float32)
        if self.theta_new is not None:
            tensors["theta_new"] = np.ascontiguousarray(self.theta_new, dtype=np.float32)
        meta = {
            "format": _FORMAT,
            "d": self.d,
            "fa": self.fa,
            "fu": self.fu,
            "config": self.config.to_dict(),
            "dynamic": self.dynamic.to_dict() if self.dynamic is not None else None,
            "segments": list(self.segments),
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, np.ndarray], meta: dict) -> "FusionModel":
        """Inverse of :meth:`state`."""
        if meta.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"unsupported model format {meta.get('format')!r}")
        config = ModelConfig.from_dict(meta.get("config", {}))
        dyn = meta.get("dynamic")
        if dyn is None:  # states before dynamic features carry their popularity in rb
            config.dynamic = False
        m = cls(int(meta["d"]), int(meta["fa"]), int(meta["fu"]), config,
                DynamicSpec.from_dict(dyn) if dyn else None, tuple(meta.get("segments", ())))
        tensors = dict(tensors)
        if "g_imp" not in tensors and "g_neg" in tensors:
            # earlier states pooled ignored impressions with the dislikes
            tensors["g_imp"] = tensors["g_neg"]
        m.item_item = ItemItem.from_tensors(tensors)
        m.prior = ContentPrior.from_tensors(tensors)
        if m.prior is not None and "cp_item" in tensors:
            m.prior_item = np.asarray(tensors["cp_item"], np.float32).copy()
        m.theta_new = cls.theta_new_of(tensors, m.dynamic)
        if "cn_cold" in tensors:
            m.cold_items = np.asarray(tensors["cn_cold"]) > 0.5
        for k, v in m.params.items():
            if k not in tensors:
                if k in ("M", "g_short", "gamma", "beta", "delta", "eta"):  # optional: earlier states had no such term
                    m.params[k] = np.zeros_like(v)
                    continue
                raise ValueError(f"model state lacks tensor {k!r}")
            arr = np.asarray(tensors[k], dtype=np.float32)
            if arr.size != v.size:
                raise ValueError(f"tensor {k!r} has shape {arr.shape}, expected {v.shape}")
            m.params[k] = arr.reshape(v.shape).copy()
        return m

    @staticmethod
    def theta_new_of(tensors: dict, dynamic: DynamicSpec | None) -> np.ndarray | None:
        """The state's ``theta_new`` (None when it has none: versions before the term)."""
        if "theta_new" not in tensors:
            return None
        arr = np.asarray(tensors["theta_new"], dtype=np.float32).reshape(-1)
        if dynamic is None or arr.size != dynamic.width:
            raise ValueError(f"tensor 'theta_new' has shape {arr.shape}, expected "
                             f"({0 if dynamic is None else dynamic.width},)")
        return arr.copy()


def recent_positives(hist_ptr, hist_item, hist_label, hist_ts, h: float):
    """``(ptr, items, weight)``: the users' positives as a CSR and, with a half-life ``h`` > 0
    (in positives) and ``hist_ts``, each one's weight ``0.5 ** (rank / h)``, rank 0 the most
    recent (listed first); else in history order with ``weight`` None. What the item-item
    and user-kNN terms read from a history."""
    recent = h > 0 and hist_ts is not None
    if recent:
        user_of, items, labels = most_recent_first(hist_ptr, hist_item, hist_label, hist_ts)
    else:
        user_of, items, labels = entry_rows(hist_ptr), np.asarray(hist_item), np.asarray(hist_label)
    keep = labels == 1
    user_of, items = user_of[keep], np.asarray(items, np.int64)[keep]
    ptr = np.concatenate([[0], np.cumsum(np.bincount(user_of, minlength=len(hist_ptr) - 1))])
    if not recent:
        return ptr, items, None
    return ptr, items, np.power(0.5, (np.arange(user_of.size) - ptr[user_of]) / h).astype(np.float32)
