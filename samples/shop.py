"""Deterministic synthetic shop: users, items and a logged interaction stream.

The data is generated from a *planted* preference model so that recommenders
trained on it have something real to find, and evaluations can be checked
against the truth (see :func:`planted_truth`):

* a segment (age band x gender x region) -> category affinity matrix,
* user-specific taste in a latent space spanned by the items' style tags,
* price sensitivity that depends on the age band,
* item quality / popularity,
* a **drift** at ``DRIFT_START``: for about half of the segments the favourite
  category swaps with a mid-ranked one, and one style tag starts trending.

Time range: ``START`` (2025-01-01) to ``END = START + DAYS`` (120 days).  The
drift starts at ``START + DRIFT_FRACTION * (END - START)`` (= 2025-04-01).

Interactions are sessions in which a logging policy (half popularity, half
segment-targeted) shows a slate of items that exist at that time.  Every shown
item is logged as an ``impression`` row (value 0).  At most one outcome row
follows a few seconds/minutes later: ``click`` (1), ``purchase`` (1, the
strongest outcome; a purchase implies the click, which is not logged
separately) or ``skip`` (-1, explicit negative).  Impressions without outcome
are "shown but ignored".

Everything is vectorised with numpy; ``generate("medium")`` (~1M rows) takes a
few seconds.

Examples
--------
>>> from dynstore.samples.shop import generate, DRIFT_START
>>> frames = generate("tiny", seed=0)
>>> sorted(frames)
['interactions', 'items', 'users']
>>> frames["interactions"].columns
['user_id', 'item_id', 'ts', 'event', 'value']

Command line::

    python -m dynstore.samples.shop OUT_DIR --size small --seed 0 --format parquet
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Union

import numpy as np
import polars as pl

__all__ = [
    "generate",
    "write",
    "planted_truth",
    "time_range",
    "drift_start",
    "age_band",
    "SIZES",
    "START",
    "END",
    "DAYS",
    "DRIFT_FRACTION",
    "DRIFT_START",
    "CATEGORIES",
    "TAGS",
    "GENDERS",
    "REGIONS",
    "AGE_BAND_EDGES",
    "EVENTS",
]

SizeLike = Union[str, int]

# ---------------------------------------------------------------------------
# Public constants
# ---------------------------------------------------------------------------

#: name -> (n_users, n_items, approx n_interactions)
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (60, 80, 2_000),
    "small": (2_000, 1_500, 50_000),
    "medium": (20_000, 10_000, 1_000_000),
    "large": (50_000, 50_000, 3_000_000),
}

START = datetime(2025, 1, 1)
DAYS = 120
END = START + timedelta(days=DAYS)
DRIFT_FRACTION = 0.75
DRIFT_START = START + (END - START) * DRIFT_FRACTION

CATEGORIES: tuple[str, ...] = (
    "electronics", "books", "shoes", "outdoor", "toys", "beauty",
    "kitchen", "garden", "music", "sports", "fashion", "games",
)
TAGS: tuple[str, ...] = (
    "eco", "premium", "budget", "classic", "sport",
    "vintage", "minimal", "kids", "smart", "handmade",
)
GENDERS: tuple[str, ...] = ("f", "m", "x")
REGIONS: tuple[str, ...] = ("north", "south", "east", "west", "city")
#: age band i covers ages ``[AGE_BAND_EDGES[i], AGE_BAND_EDGES[i + 1])``
AGE_BAND_EDGES: tuple[int, ...] = (18, 30, 45, 60, 76)
#: event -> value
EVENTS: dict[str, float] = {"impression": 0.0, "click": 1.0, "purchase": 1.0, "skip": -1.0}

# ---------------------------------------------------------------------------
# Vocabulary (fixed, so descriptions carry category / style signal)
# ---------------------------------------------------------------------------

_US = 1_000_000  # microseconds per second
_DAY_US = 86_400 * _US
_EPOCH = datetime(1970, 1, 1)


def _to_us(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(microseconds=1)


_START_US = _to_us(START)
_END_US = _to_us(END)
_DRIFT_US = _to_us(DRIFT_START)
_RANGE_US = _END_US - _START_US

# per category: (brands[5], nouns[6], features[8], uses[4], median price, log-sd, catalogue weight)
_CAT_SPEC: dict[str, tuple[list[str], list[str], list[str], list[str], float, float, float]] = {
    "electronics": (
        ["Voltix", "Nexaro", "Lumatek", "Ohmera", "Pixelon"],
        ["Headphones", "Speaker", "Charger", "Tablet", "Smartwatch", "Camera"],
        ["bluetooth pairing", "long battery life", "usb-c charging", "a bright display",
         "noise cancelling", "a fast processor", "wireless connectivity", "a motion sensor"],
        ["streaming music", "the home office", "video calls", "travel"],
        120.0, 0.8, 1.3,
    ),
    "books": (
        ["Inkwell Press", "Paperleaf", "Northpage", "Quillhouse", "Storyloft"],
        ["Novel", "Cookbook", "Biography", "Atlas", "Anthology", "Guide"],
        ["a gripping plot", "vivid characters", "a hardcover binding", "illustrated chapters",
         "a bestselling author", "an annotated edition", "short stories", "a foreword"],
        ["bedtime reading", "a book club", "long commutes", "rainy weekends"],
        15.0, 0.4, 1.5,
    ),
    "shoes": (
        ["Stridex", "Solemate", "Kickwell", "Pacewalk", "Heelcraft"],
        ["Sneakers", "Boots", "Sandals", "Loafers", "Trainers", "Slippers"],
        ["a cushioned sole", "breathable mesh", "a leather upper", "non-slip grip",
         "arch support", "waterproof lining", "memory foam insoles", "reinforced toes"],
        ["daily walks", "the office", "long runs", "city strolls"],
        70.0, 0.4, 1.1,
    ),
    "outdoor": (
        ["Summitry", "Wildtrail", "Campora", "Ridgeline", "Pinecrest"],
        ["Tent", "Backpack", "Sleeping Bag", "Lantern", "Hammock", "Water Filter"],
        ["ripstop nylon", "a waterproof shell", "lightweight aluminium poles", "a compact pack size",
         "thermal insulation", "adjustable straps", "a weatherproof zipper", "uv protection"],
        ["camping trips", "mountain hikes", "backcountry trekking", "festival weekends"],
        60.0, 0.7, 0.9,
    ),
    "toys": (
        ["Playvio", "Tinkertot", "Jollybox", "Funforge", "Kidora"],
        ["Building Set", "Puzzle", "Plush Bear", "Race Car", "Doll House", "Robot Kit"],
        ["colourful pieces", "soft plush fabric", "rounded safe edges", "educational play",
         "a storage box", "easy assembly", "sound effects", "friction motors"],
        ["toddlers", "family game night", "creative play", "birthday parties"],
        25.0, 0.6, 1.0,
    ),
    "beauty": (
        ["Glowé", "Verdance", "Silkora", "Purelle", "Auralis"],
        ["Face Serum", "Moisturizer", "Lipstick", "Shampoo", "Perfume", "Face Mask"],
        ["hyaluronic acid", "vitamin c", "a floral fragrance", "shea butter",
         "a matte finish", "aloe vera", "gentle cleansing foam", "spf protection"],
        ["a daily skincare routine", "dry skin", "evening makeup", "sensitive skin"],
        20.0, 0.6, 1.1,
    ),
    "kitchen": (
        ["Cookwell", "Panora", "Chefline", "Brewster", "Slicemaster"],
        ["Frying Pan", "Knife Set", "Blender", "Coffee Maker", "Cutting Board", "Stock Pot"],
        ["a non-stick coating", "stainless steel", "a dishwasher-safe body", "a sharp blade",
         "a cast iron base", "a glass lid", "a heat-resistant handle", "programmable brewing"],
        ["weeknight dinners", "baking", "meal prep", "morning espresso"],
        35.0, 0.7, 1.0,
    ),
    "garden": (
        ["Greenthumb", "Bloomwise", "Soilcraft", "Leafline", "Yardly"],
        ["Planter", "Pruning Shears", "Garden Hose", "Seed Kit", "Wheelbarrow", "Compost Bin"],
        ["frost-hardy seeds", "drainage holes", "a rust-proof blade", "organic compost",
         "a kink-free hose", "raised beds", "a sturdy steel frame", "drip irrigation"],
        ["balcony gardens", "vegetable patches", "lawn care", "spring planting"],
        40.0, 0.8, 0.8,
    ),
    "music": (
        ["Tonehaus", "Chordia", "Vinylux", "Resonar", "Melodyne Co"],
        ["Acoustic Guitar", "Vinyl Record", "Keyboard", "Drum Pad", "Ukulele", "Microphone"],
        ["a spruce top", "steel strings", "a warm analog sound", "weighted keys",
         "a remastered album", "a condenser capsule", "velocity-sensitive pads", "a gig bag"],
        ["home recording", "live gigs", "practising scales", "late-night listening"],
        25.0, 0.9, 0.9,
    ),
    "sports": (
        ["Fitnova", "Sprintco", "Goalpost", "Reppo", "Athletica"],
        ["Yoga Mat", "Dumbbells", "Football", "Tennis Racket", "Jump Rope", "Resistance Bands"],
        ["a non-slip surface", "adjustable weights", "a carbon frame", "sweat-wicking fabric",
         "a reinforced stitching", "ergonomic grips", "a shock-absorbing core", "interval timers"],
        ["home workouts", "the gym", "team training", "marathon prep"],
        45.0, 0.7, 1.0,
    ),
    "fashion": (
        ["Modavia", "Threadly", "Couture Lane", "Urbanweave", "Silhouette"],
        ["Denim Jacket", "Summer Dress", "Wool Sweater", "Leather Belt", "Silk Scarf", "Chinos"],
        ["organic cotton", "a slim fit", "merino wool", "a relaxed cut",
         "hand-stitched seams", "silk lining", "stretch denim", "a tailored collar"],
        ["date nights", "the office", "weekend brunch", "layering in autumn"],
        40.0, 0.6, 1.4,
    ),
    "games": (
        ["Pixelforge", "Dicewise", "Questline", "Boardly", "Arcadia"],
        ["Board Game", "Card Game", "Video Game", "Puzzle Cube", "Controller", "Strategy Game"],
        ["a co-op campaign", "an open world", "strategy cards", "multiplayer modes",
         "a collectible deck", "haptic feedback", "a modular board", "retro pixel art"],
        ["game night", "online multiplayer", "solo puzzling", "party evenings"],
        45.0, 0.5, 1.0,
    ),
}

# shared pools for product-line names ("Trail Runner 3 Sneakers")
_SERIES = np.array(["Trail", "Urban", "Cloud", "Swift", "Peak", "Metro", "Aero", "Nova",
                    "Terra", "Luna", "Echo", "Prime", "Zen", "Atlas", "Bolt", "Coast"])
_MODELS = np.array(["Runner", "Walker", "Glide", "Flex", "Motion", "Dash", "Pro", "Lite",
                    "Max", "Air", "One", "Edge", "Core", "Wave", "Spark", "Origin"])

# per tag: style adjectives (in descriptions) and catalogue propensity per category
_TAG_WORDS: dict[str, list[str]] = {
    "eco": ["recycled", "sustainable", "plant-based", "eco-friendly"],
    "premium": ["luxurious", "high-end", "refined", "exclusive"],
    "budget": ["affordable", "great-value", "no-frills", "wallet-friendly"],
    "classic": ["timeless", "classic", "traditional", "iconic"],
    "sport": ["performance", "athletic", "high-energy", "competition-ready"],
    "vintage": ["retro", "vintage-inspired", "nostalgic", "old-school"],
    "minimal": ["minimalist", "sleek", "clean-lined", "understated"],
    "kids": ["kid-friendly", "playful", "child-safe", "family-sized"],
    "smart": ["smart", "app-connected", "sensor-driven", "voice-controlled"],
    "handmade": ["handmade", "artisan", "hand-finished", "small-batch"],
}
_TAG_PROPENSITY: dict[str, dict[str, float]] = {
    "electronics": {"smart": 4, "premium": 2, "budget": 2, "minimal": 1.5},
    "books": {"classic": 3, "kids": 2, "vintage": 1.5},
    "shoes": {"sport": 3, "classic": 2, "premium": 1.5},
    "outdoor": {"eco": 2.5, "sport": 2},
    "toys": {"kids": 5, "eco": 1.5, "smart": 1.5},
    "beauty": {"eco": 2.5, "premium": 2.5, "handmade": 1.5},
    "kitchen": {"minimal": 2, "premium": 1.5, "smart": 1.5},
    "garden": {"eco": 3, "handmade": 2},
    "music": {"vintage": 3, "classic": 2, "premium": 1.5},
    "sports": {"sport": 5},
    "fashion": {"vintage": 2, "premium": 2, "minimal": 2, "eco": 1.5},
    "games": {"kids": 2, "smart": 2, "classic": 1.5},
}
_TAG_PRICE = {"premium": 1.7, "budget": 0.55, "handmade": 1.2}

_FILLERS = np.array([
    "Easy to care for", "A thoughtful gift", "Built to last", "Loved by our customers",
    "Ships in recyclable packaging", "Backed by a two-year warranty", "Simple to use",
    "Designed in-house", "Available while stocks last", "A customer favourite",
])

# hand-planted (readable) main effects on the segment -> category affinity
_BAND_EFFECT = {
    0: {"games": 1.0, "music": 0.8, "fashion": 0.6, "electronics": 0.4, "garden": -0.9, "kitchen": -0.3},
    1: {"toys": 0.9, "kitchen": 0.6, "electronics": 0.4, "sports": 0.3, "music": -0.3},
    2: {"garden": 0.7, "outdoor": 0.6, "kitchen": 0.4, "books": 0.3, "games": -0.5},
    3: {"books": 1.0, "garden": 0.9, "kitchen": 0.3, "games": -1.0, "fashion": -0.4, "electronics": -0.4},
}
_GENDER_EFFECT = {
    0: {"beauty": 1.0, "fashion": 0.5, "books": 0.2, "electronics": -0.2},
    1: {"electronics": 0.5, "sports": 0.5, "games": 0.3, "beauty": -0.8},
    2: {"music": 0.5, "books": 0.3, "fashion": 0.3},
}
_REGION_EFFECT = {
    0: {"outdoor": 0.6, "sports": 0.2},
    1: {"garden": 0.5, "sports": 0.4},
    2: {"books": 0.4, "kitchen": 0.3},
    3: {"outdoor": 0.5, "shoes": 0.3},
    4: {"fashion": 0.5, "electronics": 0.4, "garden": -0.5, "outdoor": -0.3},
}
_BAND_PRICE_BETA = np.array([0.9, 0.5, 0.3, 0.6])  # young and retired shoppers are thriftiest

_N_CAT = len(CATEGORIES)
_N_TAG = len(TAGS)
_LATENT = 6
_ROWS_PER_IMPRESSION = 1.19  # impression + ~19% outcome rows; keeps sizes on target

# ---------------------------------------------------------------------------
# Small public helpers
# ---------------------------------------------------------------------------


def time_range(size: SizeLike | None = None) -> tuple[datetime, datetime]:
    """Return ``(START, END)`` of the generated time range.

    The range is the same for every size; ``size`` is accepted so callers can
    pass what they passed to :func:`generate`.

    Examples
    --------
    >>> time_range("small")
    (datetime.datetime(2025, 1, 1, 0, 0), datetime.datetime(2025, 5, 1, 0, 0))
    """
    if size is not None:
        _dims(size)  # validate
    return START, END


def drift_start(df_interactions: pl.DataFrame | None = None) -> datetime:
    """Timestamp at which the planted drift starts (``DRIFT_START``).

    Equal to ``START + DRIFT_FRACTION * (END - START)``, i.e. 2025-04-01; it
    does not depend on the data, the frame argument is accepted for symmetry.

    Examples
    --------
    >>> drift_start()
    datetime.datetime(2025, 4, 1, 0, 0)
    """
    return DRIFT_START


def age_band(age: np.ndarray | pl.Series | int) -> np.ndarray:
    """Map ages to age-band indices 0..3 (see ``AGE_BAND_EDGES``).

    Examples
    --------
    >>> age_band(np.array([18, 29, 30, 75])).tolist()
    [0, 0, 1, 3]
    """
    a = np.asarray(age.to_numpy() if isinstance(age, pl.Series) else age)
    return np.searchsorted(np.asarray(AGE_BAND_EDGES[1:-1]), a, side="right")


def _dims(size: SizeLike) -> tuple[int, int, int]:
    """(n_users, n_items, n_interactions) for a size name or an interaction count."""
    if isinstance(size, str):
        if size.isdigit():
            size = int(size)
        elif size in SIZES:
            return SIZES[size]
        else:
            raise ValueError(f"unknown size {size!r}; use one of {list(SIZES)} or an int")
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"size must be a size name or an int, got {type(size).__name__}")
    n = int(size)
    if n < 100:
        raise ValueError("size as an int is a target number of interactions and must be >= 100")
    # log-log interpolation between the named anchors, linear extrapolation beyond
    anchors = sorted(SIZES.values(), key=lambda t: t[2])
    x = np.log([a[2] for a in anchors])
    lx = math.log(n)

    def interp(col: int) -> int:
        y = np.log([a[col] for a in anchors])
        if lx <= x[0]:
            v = y[0] + (lx - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
        elif lx >= x[-1]:
            v = y[-1] + (lx - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
        else:
            v = float(np.interp(lx, x, y))
        return int(round(math.exp(v)))

    return max(10, interp(0)), max(2 * _N_CAT, interp(1)), n


# ---------------------------------------------------------------------------
# Planted world (depends on the seed only, never on the size)
# ---------------------------------------------------------------------------


def _effect_matrix(spec: dict[int, dict[str, float]], rows: int) -> np.ndarray:
    m = np.zeros((rows, _N_CAT))
    for r, eff in spec.items():
        for cat, v in eff.items():
            m[r, CATEGORIES.index(cat)] = v
    return m


def _world(seed: int) -> dict[str, object]:
    rng = np.random.default_rng([seed, 0])
    band = _effect_matrix(_BAND_EFFECT, 4)
    gender = _effect_matrix(_GENDER_EFFECT, 3)
    region = _effect_matrix(_REGION_EFFECT, 5)
    # seed-specific wiggle keeps the hand-planted structure but varies the details
    before = (
        band[:, None, None, :] + gender[None, :, None, :] + region[None, None, :, :]
        + rng.normal(0.0, 0.35, size=(4, 3, 5, _N_CAT))
    )
    before -= before.mean(axis=-1, keepdims=True)

    # drift: in ~half of the segments (all of the youngest band) the favourite
    # category swaps with the one ranked 6th, so "what worked" stops working
    drift_seg = rng.random((4, 3, 5)) < 0.5
    drift_seg[0] = True
    after = before.copy()
    ranks = np.argsort(-before, axis=-1)
    idx = np.argwhere(drift_seg)
    for b, g, r in idx:  # <= 60 segments
        top, mid = ranks[b, g, r, 0], ranks[b, g, r, 5]
        after[b, g, r, top], after[b, g, r, mid] = before[b, g, r, mid], before[b, g, r, top]
    trend_tag = int(rng.integers(_N_TAG))

    tag_vec = rng.normal(0.0, 1.0, size=(_N_TAG, _LATENT))
    return {
        "before": before,
        "after": after,
        "drift_seg": drift_seg,
        "trend_tag": trend_tag,
        "trend_bonus": 0.8,
        "tag_vec": tag_vec,
    }


def planted_truth(seed: int = 0) -> dict[str, object]:
    """The planted preference model behind ``generate(..., seed=seed)``.

    Useful to check that a recommender recovers the truth and to locate the
    drift.  The world depends on the seed only (not on the size).

    Returns
    -------
    dict
        ``affinity_before`` / ``affinity_after``: float arrays of shape
        (4 age bands, 3 genders, 5 regions, 12 categories), indexed in the
        order of ``AGE_BAND_EDGES``, ``GENDERS``, ``REGIONS``, ``CATEGORIES``;
        ``drift_segments``: bool (4, 3, 5), segments whose favourite category
        swapped at the drift; ``trend_tag``: the tag boosted after the drift;
        ``drift_start``: ``DRIFT_START``; plus the label tuples.

    Examples
    --------
    >>> t = planted_truth(0)
    >>> t["affinity_before"].shape
    (4, 3, 5, 12)
    >>> bool(t["drift_segments"][0].all())   # the youngest band always drifts
    True
    """
    w = _world(seed)
    return {
        "affinity_before": w["before"].copy(),
        "affinity_after": w["after"].copy(),
        "drift_segments": w["drift_seg"].copy(),
        "trend_tag": TAGS[w["trend_tag"]],
        "drift_start": DRIFT_START,
        "categories": CATEGORIES,
        "tags": TAGS,
        "genders": GENDERS,
        "regions": REGIONS,
        "age_band_edges": AGE_BAND_EDGES,
    }


# ---------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------


def _gumbel_topk_order(rng: np.random.Generator, logw: np.ndarray) -> np.ndarray:
    """Row-wise random order ~ sampling without replacement with weights exp(logw)."""
    keys = logw + rng.gumbel(size=logw.shape)
    return np.argsort(-keys, axis=1)


def _users(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    # age: a broad adult mixture, clipped to the supported range
    young = rng.random(n) < 0.45
    age = np.where(young, rng.normal(28, 6, n), rng.normal(48, 13, n))
    age = np.clip(np.round(age), 18, 75).astype(np.int64)
    gender = rng.choice(3, size=n, p=[0.48, 0.47, 0.05])
    region = rng.choice(5, size=n, p=[0.17, 0.17, 0.17, 0.17, 0.32])

    # 60% signed up before the range, 20% during the first 80%, 20% are "new"
    # (sign up in the last 20%) so temporal splits contain unseen users
    t80 = _START_US + int(0.8 * _RANGE_US)
    kind = rng.choice(3, size=n, p=[0.6, 0.2, 0.2])
    signup = np.empty(n, dtype=np.int64)
    k0, k1, k2 = kind == 0, kind == 1, kind == 2
    signup[k0] = rng.integers(_START_US - 730 * _DAY_US, _START_US, k0.sum())
    signup[k1] = rng.integers(_START_US, t80, k1.sum())
    signup[k2] = rng.integers(t80, _END_US - 2 * _DAY_US, k2.sum())
    return {
        "age": age,
        "band": age_band(age),
        "gender": gender,
        "region": region,
        "signup": signup,
        "new": k2,
    }


def _items(rng: np.random.Generator, n: int, world: dict) -> dict[str, np.ndarray]:
    specs = [_CAT_SPEC[c] for c in CATEGORIES]
    cat_w = np.array([s[6] for s in specs])
    cat = rng.choice(_N_CAT, size=n, p=cat_w / cat_w.sum())

    # tags: 1-3 without replacement, category-dependent propensities;
    # premium and budget exclude each other
    prop = np.ones((_N_CAT, _N_TAG))
    for ci, c in enumerate(CATEGORIES):
        for t, v in _TAG_PROPENSITY[c].items():
            prop[ci, TAGS.index(t)] = v
    logw = np.log(prop[cat])
    ip, ib = TAGS.index("premium"), TAGS.index("budget")
    drop_budget = rng.random(n) < prop[cat, ip] / (prop[cat, ip] + prop[cat, ib])
    logw[drop_budget, ib] = -np.inf
    logw[~drop_budget, ip] = -np.inf
    order = _gumbel_topk_order(rng, logw)[:, :3]
    n_tags = rng.choice([1, 2, 3], size=n, p=[0.35, 0.45, 0.2])
    has = np.zeros((n, _N_TAG), dtype=bool)
    for j in range(3):
        sel = n_tags > j
        has[np.nonzero(sel)[0], order[sel, j]] = True

    # price: log-normal per category, shifted by premium/budget/handmade
    mu = np.log([s[4] for s in specs])
    sd = np.array([s[5] for s in specs])
    z_price = rng.normal(size=n)
    logp = mu[cat] + sd[cat] * z_price
    for t, f in _TAG_PRICE.items():
        logp += np.log(f) * has[:, TAGS.index(t)]
    price = np.maximum(np.round(np.exp(logp)), 1.0) - 0.01  # shop-style x.99 prices
    rel_price = (np.log(price + 0.01) - mu[cat]) / sd[cat]

    # latent style vector is driven by the tags, so taste is learnable from tags
    v = has @ world["tag_vec"] / np.sqrt(np.maximum(has.sum(1, keepdims=True), 1))
    v = v + rng.normal(0.0, 0.35, size=v.shape)
    quality = rng.normal(size=n)
    # exposure popularity: heavy-tailed, correlated with quality
    pop = np.exp(1.0 * (0.5 * quality + 0.85 * rng.normal(size=n)))

    # creation: 60% before the range, 25% in its first 3/4, 15% in the last quarter
    q3 = _START_US + int(0.75 * _RANGE_US)
    kind = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])
    created = np.empty(n, dtype=np.int64)
    k0, k1, k2 = kind == 0, kind == 1, kind == 2
    created[k0] = rng.integers(_START_US - 365 * _DAY_US, _START_US, k0.sum())
    created[k1] = rng.integers(_START_US, q3, k1.sum())
    created[k2] = rng.integers(q3, _END_US - 2 * _DAY_US, k2.sum())
    # at least one item per category exists from the start so slates never run dry
    first = np.unique(cat, return_index=True)[1]
    created[first] = np.minimum(created[first], _START_US - rng.integers(_DAY_US, 60 * _DAY_US, len(first)))
    pop = pop * np.where(created >= _START_US, 1.5, 1.0)  # new arrivals get promoted

    return {
        "cat": cat,
        "has": has,
        "tag_order": order,
        "n_tags": n_tags,
        "price": price,
        "rel_price": rel_price,
        "v": np.asfortranarray(v),
        "quality": quality,
        "pop": pop,
        "created": created,
    }


def _item_text(rng: np.random.Generator, it: dict) -> tuple[pl.Series, pl.Series, pl.Series, pl.Series]:
    """Titles, brands, tag strings and descriptions (vectorised via polars)."""
    n = len(it["cat"])
    cat = it["cat"]
    specs = [_CAT_SPEC[c] for c in CATEGORIES]
    brands = np.array([s[0] for s in specs])  # (12, 5)
    nouns = np.array([s[1] for s in specs])  # (12, 6)
    feats = np.array([s[2] for s in specs])  # (12, 8)
    uses = np.array([s[3] for s in specs])  # (12, 4)
    tags = np.array(TAGS)
    words = np.array([_TAG_WORDS[t] for t in TAGS])  # (10, 4)

    brand = brands[cat, rng.integers(5, size=n)]
    noun = nouns[cat, rng.integers(6, size=n)]
    num = rng.integers(1, 10, size=n).astype(str)
    num = np.where(rng.random(n) < 0.4, "", np.char.add(num, " "))
    series = _SERIES[rng.integers(len(_SERIES), size=n)]
    model = _MODELS[rng.integers(len(_MODELS), size=n)]

    order, n_tags = it["tag_order"], it["n_tags"]
    t0 = tags[order[:, 0]]
    t1 = tags[order[:, 1]]
    t2 = tags[order[:, 2]]
    # style words come from the item's own tags -> style signal in the text
    style1 = words[order[:, 0], rng.integers(4, size=n)]
    second = np.where(n_tags > 1, order[:, 1], order[:, 0])
    style2 = words[second, rng.integers(4, size=n)]
    f3 = np.argsort(rng.random((n, feats.shape[1])), axis=1)[:, :3]
    feat = feats[cat[:, None], f3]
    use = uses[cat, rng.integers(4, size=n)]
    filler = _FILLERS[rng.integers(len(_FILLERS), size=n)]
    n_sent = rng.choice([1, 2, 3], size=n, p=[0.3, 0.45, 0.25])
    variant = rng.random(n) < 0.5

    df = pl.DataFrame({
        "series": series, "model": model, "num": num, "noun": noun, "brand": brand,
        "t0": t0, "t1": t1, "t2": t2,
        "style1": style1, "style2": style2, "f1": feat[:, 0], "f2": feat[:, 1], "f3": feat[:, 2],
        "use": use, "filler": filler, "n_sent": n_sent, "variant": variant, "n_tags": n_tags,
    })
    cap = lambda e: e.str.slice(0, 1).str.to_uppercase() + e.str.slice(1)  # noqa: E731
    noun_l = pl.col("noun").str.to_lowercase()
    s1 = (
        pl.when(pl.col("variant"))
        .then(pl.concat_str([cap(pl.col("style1")), pl.lit(" "), noun_l, pl.lit(" from "),
                             pl.col("brand"), pl.lit(" with "), pl.col("f1"), pl.lit(" and "),
                             pl.col("f2"), pl.lit(".")]))
        .otherwise(pl.concat_str([pl.lit("This "), pl.col("style1"), pl.lit(" "), noun_l,
                                  pl.lit(" by "), pl.col("brand"), pl.lit(" combines "),
                                  pl.col("f1"), pl.lit(" with "), pl.col("f2"), pl.lit(".")]))
    )
    s2 = pl.concat_str([pl.lit(" "), pl.col("filler"), pl.lit(", ideal for "), pl.col("use"), pl.lit(".")])
    s3 = pl.concat_str([pl.lit(" "), cap(pl.col("style2")), pl.lit(" look with "), pl.col("f3"), pl.lit(".")])
    out = df.select(
        title=pl.concat_str([pl.col("series"), pl.lit(" "), pl.col("model"), pl.lit(" "),
                             pl.col("num"), pl.col("noun")]),
        brand=pl.col("brand"),
        tags=pl.concat_str(
            [pl.col("t0"),
             pl.when(pl.col("n_tags") > 1).then(pl.col("t1")),
             pl.when(pl.col("n_tags") > 2).then(pl.col("t2"))],
            separator="|", ignore_nulls=True,
        ),
        description=pl.concat_str([
            s1,
            pl.when(pl.col("n_sent") >= 2).then(s2).otherwise(pl.lit("")),
            pl.when(pl.col("n_sent") >= 3).then(s3).otherwise(pl.lit("")),
        ]),
    )
    return out["title"], out["brand"], out["tags"], out["description"]


def _segmented_arange(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for a vector of counts."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - starts


def _sessions(rng: np.random.Generator, us: dict, n_target: int, n_users: int) -> tuple[np.ndarray, ...]:
    """Session owner and start time (us); heavy-tailed activity per user."""
    mean_slate = 8.0
    n_sess = max(n_users, int(round(n_target / _ROWS_PER_IMPRESSION / mean_slate)))
    t80 = _START_US + int(0.8 * _RANGE_US)
    start_u = np.maximum(us["signup"], _START_US)
    stop = _END_US - 3600 * _US
    window = (stop - start_u) / _RANGE_US
    activity = rng.lognormal(0.0, 1.1, size=n_users) * window
    # every user has >= 1 session; the rest follow the heavy-tailed activity
    per_user = 1 + rng.multinomial(n_sess - n_users, activity / activity.sum())
    owner = np.repeat(np.arange(n_users), per_user)
    first = _segmented_arange(per_user) == 0
    lo = start_u[owner]
    # an existing user's first session falls before the last 20%, so only the
    # planted "new" users first appear late
    hi = np.where(first & ~us["new"][owner], np.maximum(t80, lo + 1), stop)
    t = lo + (rng.random(len(owner)) * (hi - lo)).astype(np.int64)
    # diurnal rhythm: keep the day, redraw the time of day (evening peak)
    hour_w = np.array([1, .6, .4, .3, .3, .5, 1, 2, 3, 3, 3, 3, 4, 4, 3, 3, 3, 4, 5, 6, 7, 7, 5, 3], float)
    hour = np.searchsorted(np.cumsum(hour_w) / hour_w.sum(), rng.random(len(t)), side="right")
    day0 = t - (t - _START_US) % _DAY_US
    t2 = day0 + hour * 3600 * _US + rng.integers(0, 3600 * _US, len(t))
    t = np.clip(t2, lo, hi - 1)
    return owner, t


def _draw_items(
    rng: np.random.Generator, ts: np.ndarray, want_cat: np.ndarray, it: dict
) -> np.ndarray:
    """Popularity-weighted item draw among items created at or before ``ts``.

    ``want_cat`` < 0 means any category.  Inverse-CDF sampling on cumulative
    popularity over items sorted by (category, created) keeps this O(N log M).
    """
    created, cat, pop = it["created"], it["cat"], it["pop"]
    n = len(ts)
    out = np.empty(n, dtype=np.int64)

    # global: items sorted by creation time
    o = np.argsort(created, kind="stable")
    w0 = np.concatenate([[0.0], np.cumsum(pop[o])])
    k = np.searchsorted(created[o], ts, side="right")  # eligible prefix length (>=1)
    # category-targeted: items sorted by (category, created)
    oc = np.lexsort((created, cat))
    base = created.min()
    span = int(_END_US - base) + 1
    key = cat[oc].astype(np.int64) * span + (created[oc] - base)
    wc = np.concatenate([[0.0], np.cumsum(pop[oc])])
    cat_lo = np.searchsorted(cat[oc], np.arange(_N_CAT), side="left")
    c = np.maximum(want_cat, 0)
    hi_c = np.searchsorted(key, c.astype(np.int64) * span + (ts - base), side="right")
    lo_c = cat_lo[c]
    targeted = (want_cat >= 0) & (hi_c > lo_c)  # fall back to global if none exist yet

    u = rng.random(n)
    g = ~targeted
    ug = u[g] * w0[k[g]]
    out[g] = o[np.minimum(np.searchsorted(w0, ug, side="right") - 1, k[g] - 1)]
    t = targeted
    a, b = wc[lo_c[t]], wc[hi_c[t]]
    ut = a + u[t] * (b - a)
    j = np.clip(np.searchsorted(wc, ut, side="right") - 1, lo_c[t], hi_c[t] - 1)
    out[t] = oc[j]
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _interactions(
    rng: np.random.Generator, us: dict, it: dict, world: dict, n_target: int
) -> dict[str, np.ndarray]:
    n_users = len(us["age"])
    owner, s_ts = _sessions(rng, us, n_target, n_users)
    n_sess = len(owner)
    slate = np.minimum(2 + rng.poisson(6.0, n_sess), 20)
    # draw more candidates than slots and keep the first distinct ones: a slate
    # never repeats an item, and small catalogues still fill their slates
    n_cand = slate + slate // 2 + 2
    sess = np.repeat(np.arange(n_sess), n_cand)
    user = owner[sess]

    # logging policy: half popularity, half segment-targeted (softened pre-drift
    # affinities: the deployed recommender never learns about the drift)
    seg = (us["band"] * 3 + us["gender"]) * 5 + us["region"]
    pol = np.exp(world["before"].reshape(-1, _N_CAT) / 1.5)
    pol_cdf = np.cumsum(pol / pol.sum(1, keepdims=True), axis=1)
    pol_cdf[:, -1] = 1.0
    targeted = rng.random(len(sess)) < 0.5
    useg = seg[user]
    want = np.full(len(sess), -1, dtype=np.int64)
    ti = np.nonzero(targeted)[0]
    r = rng.random(len(ti))
    want[ti] = (r[:, None] >= pol_cdf[useg[ti]]).sum(1)
    # eligibility at session start also holds for the (later) impression times
    item = _draw_items(rng, s_ts[sess], want, it)
    del want, targeted, ti, r

    n_items = len(it["cat"])
    key = sess.astype(np.int64) * n_items + item
    o = np.argsort(key, kind="stable")
    dup = np.zeros(len(key), dtype=bool)
    dup[o[1:]] = key[o[1:]] == key[o[:-1]]
    keep = np.nonzero(~dup)[0]
    del key, o, dup
    kept_per_sess = np.bincount(sess[keep], minlength=n_sess)
    rank = _segmented_arange(kept_per_sess)
    keep = keep[rank < slate[sess[keep]]]
    sess, user, item, useg = sess[keep], user[keep], item[keep], useg[keep]
    shown = np.bincount(sess, minlength=n_sess)
    del keep, rank, kept_per_sess

    # impressions of one slate are a few seconds apart (scrolling)
    gap = rng.integers(1 * _US, 6 * _US, len(sess))
    csum = np.cumsum(gap)
    ts = s_ts[sess] + csum - (csum - gap)[np.repeat(np.cumsum(shown) - shown, shown)]
    del csum, gap

    # planted preference score
    n_imp = len(user)
    icat = it["cat"][item]
    post = ts >= _DRIFT_US
    ucat_noise = rng.normal(0.0, 0.5, size=(n_users, _N_CAT))
    a_before = world["before"].reshape(-1, _N_CAT)[useg, icat]
    a_after = world["after"].reshape(-1, _N_CAT)[useg, icat]
    score = np.where(post, a_after, a_before) + ucat_noise[user, icat]
    del a_before, a_after
    taste = np.asfortranarray(rng.normal(0.0, 0.6, size=(n_users, _LATENT)))
    for d in range(_LATENT):  # K gathers of N floats instead of an (N, K) temporary
        score += taste[user, d] * it["v"][item, d] * (1.0 / np.sqrt(_LATENT))
    beta = _BAND_PRICE_BETA[us["band"]] * rng.lognormal(0.0, 0.3, n_users)
    rp = it["rel_price"][item]
    score -= beta[user] * rp
    score += 0.4 * it["quality"][item]
    score += world["trend_bonus"] * (post & it["has"][item, world["trend_tag"]])

    # outcomes: engage (click-like) vs. explicit skip vs. ignore; purchases are
    # engaged items that also convert (rarer, extra price-sensitive)
    u1, u2, u3 = rng.random(n_imp), rng.random(n_imp), rng.random(n_imp)
    engaged = u1 < _sigmoid(1.1 * score - 2.9)
    buy = engaged & (u3 < _sigmoid(score - 3.2 - 0.5 * beta[user] * rp))
    skip = ~engaged & (u2 < _sigmoid(-0.9 * score - 2.9))
    code = np.zeros(n_imp, dtype=np.int8)  # 0 impression, 1 click, 2 purchase, 3 skip
    code[engaged] = 1
    code[buy] = 2
    code[skip] = 3
    has_out = code > 0
    oc = code[has_out]
    delay = np.where(
        oc == 2, 60 * _US + rng.exponential(240 * _US, len(oc)),
        np.where(oc == 1, 1 * _US + rng.exponential(15 * _US, len(oc)),
                 rng.integers(_US // 2, 5 * _US, len(oc))),
    )
    # capped so every row stays inside the time range
    delay = np.minimum(delay, 30 * 60 * _US).astype(np.int64)

    users = np.concatenate([user, user[has_out]])
    items = np.concatenate([item, item[has_out]])
    tss = np.concatenate([ts, ts[has_out] + delay])
    codes = np.concatenate([np.zeros(n_imp, dtype=np.int8), oc])
    order = np.lexsort((codes, items, users, tss))
    return {
        "user": users[order] + 1,
        "item": items[order] + 1,
        "ts": tss[order],
        "code": codes[order],
    }


def generate(size: SizeLike = "tiny", seed: int = 0) -> dict[str, pl.DataFrame]:
    """Generate a synthetic shop.

    Parameters
    ----------
    size
        ``"tiny"`` (60 users, 80 items, ~2k interactions), ``"small"``
        (2k, 1.5k, ~50k), ``"medium"`` (20k, 10k, ~1M), ``"large"``
        (50k, 50k, ~3M), or an int: the target number of interaction rows
        (users/items are interpolated between the named sizes).
    seed
        Same seed -> identical frames.

    Returns
    -------
    dict[str, polars.DataFrame]
        ``users``: user_id, age, gender, region, signup_ts;
        ``items``: item_id, title, category, brand, price, tags, description,
        created_ts; ``interactions`` (sorted by ts): user_id, item_id, ts,
        event, value.  Ids are int64 starting at 1, timestamps are naive
        ``Datetime("us")``.

    Examples
    --------
    >>> d = generate("tiny", seed=1)
    >>> d["users"].height, d["items"].height
    (60, 80)
    >>> d["interactions"]["event"].unique().sort().to_list()
    ['click', 'impression', 'purchase', 'skip']
    """
    n_users, n_items, n_target = _dims(size)
    seed = int(seed)
    world = _world(seed)
    us = _users(np.random.default_rng([seed, 1]), n_users)
    it = _items(np.random.default_rng([seed, 2]), n_items, world)
    title, brand, tags, desc = _item_text(np.random.default_rng([seed, 3]), it)
    ia = _interactions(np.random.default_rng([seed, 4]), us, it, world, n_target)

    dt = pl.Datetime("us")
    users = pl.DataFrame({
        "user_id": np.arange(1, n_users + 1, dtype=np.int64),
        "age": us["age"],
        "gender": np.array(GENDERS)[us["gender"]],
        "region": np.array(REGIONS)[us["region"]],
        "signup_ts": pl.Series(us["signup"]).cast(dt),
    })
    items = pl.DataFrame({
        "item_id": np.arange(1, n_items + 1, dtype=np.int64),
        "title": title,
        "category": np.array(CATEGORIES)[it["cat"]],
        "brand": brand,
        "price": it["price"].astype(np.float64),
        "tags": tags,
        "description": desc,
        "created_ts": pl.Series(it["created"]).cast(dt),
    })
    names = ["impression", "click", "purchase", "skip"]
    values = np.array([EVENTS[e] for e in names])
    inter = pl.DataFrame({
        "user_id": ia["user"].astype(np.int64),
        "item_id": ia["item"].astype(np.int64),
        "ts": pl.Series(ia["ts"]).cast(dt),
        "code": ia["code"],
        "value": values[ia["code"]],
    }).select(
        "user_id", "item_id", "ts",
        pl.col("code").replace_strict(dict(enumerate(names)), return_dtype=pl.String).alias("event"),
        "value",
    )
    return {"users": users, "items": items, "interactions": inter}


def write(
    out_dir: str | Path, size: SizeLike = "small", seed: int = 0, fmt: str = "parquet"
) -> dict[str, Path]:
    """Generate a shop and write ``users``, ``items``, ``interactions`` files.

    Parameters
    ----------
    out_dir
        Directory (created if missing).
    size, seed
        As for :func:`generate`.
    fmt
        ``"parquet"`` or ``"csv"`` (timestamps as ISO strings in csv).

    Returns
    -------
    dict[str, pathlib.Path]
        name -> written file, e.g. ``{"users": out_dir/"users.parquet", ...}``.

    Examples
    --------
    >>> import tempfile
    >>> paths = write(tempfile.mkdtemp(), size="tiny", fmt="csv")
    >>> sorted(p.name for p in paths.values())
    ['interactions.csv', 'items.csv', 'users.csv']
    """
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = generate(size, seed)
    paths: dict[str, Path] = {}
    for name, df in frames.items():
        p = out / f"{name}.{fmt}"
        if fmt == "parquet":
            df.write_parquet(p)
        else:
            df.write_csv(p)
        paths[name] = p
    return paths


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dynstore.samples.shop",
        description="Write a deterministic synthetic shop (users, items, interactions).",
    )
    ap.add_argument("out_dir", help="output directory")
    ap.add_argument("--size", default="small",
                    help=f"one of {', '.join(SIZES)} or a target number of interactions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", dest="fmt", choices=("parquet", "csv"), default="parquet")
    args = ap.parse_args(argv)
    size: SizeLike = int(args.size) if args.size.isdigit() else args.size
    try:
        paths = write(args.out_dir, size=size, seed=args.seed, fmt=args.fmt)
    except (ValueError, TypeError) as e:
        ap.error(str(e))
    for name, p in paths.items():
        n = (pl.scan_parquet(p) if args.fmt == "parquet" else pl.scan_csv(p)).select(pl.len()).collect().item()
        print(f"{name}: {n} rows -> {p}")
    print(f"drift starts at {DRIFT_START.isoformat()} (range {START.isoformat()} .. {END.isoformat()})")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
