"""Deterministic synthetic click-event generator.

Produces click events with the production schema of the culture-offer
recommender (``CLICK_EVENT_SCHEMA``), with learnable structure:

* users prefer 1-3 categories (Dirichlet weights) and, within each preferred
  category, one favourite subcategory;
* item popularity is long-tailed (Zipf-like over a random permutation);
* item text (names, descriptions, shelf labels), authors/performers and the
  pretrained vectors all correlate with the item category;
* user-level features (queries, qpi subcategories, counters) are stable per
  user and reflect the user's preferences;
* sequential structure, which a history of the user's latest items can learn:
  each user has an interest per week (a subcategory, drawn like an event's from the user's
  preferences, from ``(seed, week)`` alone, so it drifts week to week) and a session per day
  (that interest at ``WEEKLY_INTEREST_RATE``, else a fresh draw); ``SESSION_RATE`` of the
  user's events of the day are in the session's subcategory. Sessions are drawn like events,
  so each user's overall mix of categories is what it was; only the order carries more. What a
  model that knew the generator could gain (measured at quickstart sizes, ``docs/benchmarks.md``):
  the category of a user's next event is the previous event's for 71.9% of events (51.6%
  without sessions) against 66.5% for the user's overall top category; for the subcategory
  58.4% (28.6% without) against 48.6%.

Everything is derived from ``spec.seed``: the user and item universes depend
only on the seed and the universe sizes (users, items, categories,
subcategories, pretrained dimension), never on ``days``/``end_date``/
``num_events``.  The events of one calendar date depend only on the universe,
that date and that day's event count (the day's draws use
``np.random.default_rng([seed, date.toordinal()])``; the count, ``events_on``, is the
daily volume ``num_events / days`` and depends on the date alone), so any range of days
can be generated, and a day is the same alone or inside any range (``generate_days``).

Events are generated one day at a time (``generate_click_events`` yields one
``pa.Table`` per day), so 10M events / 1M users / 200k items fit comfortably
in a couple of GB.  Only numpy and pyarrow are used.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Annotated, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydantic
from pydantic import Field

__all__ = [
    "CLICK_EVENT_SCHEMA",
    "SyntheticParams",
    "SyntheticSpec",
    "Universe",
    "build_universe",
    "category_vocabularies",
    "event_dates",
    "events_on",
    "events_per_day",
    "generate_click_events",
    "generate_days",
    "generate_all",
]

CLICK_EVENT_SCHEMA: pa.Schema = pa.schema(
    [
        ("event_date", pa.date32()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_hour", pa.int64()),
        ("event_day", pa.int64()),
        ("event_month", pa.string()),
        ("consult_offer", pa.int64()),
        ("booking_cnt", pa.int64()),
        ("user_theoretical_remaining_credit", pa.float64()),
        ("has_added_offer_to_favorites", pa.int64()),
        ("user_queries", pa.string()),
        ("qpi_subcategory_ids", pa.string()),
        ("user_engagement", pa.int64()),
        ("user_age", pa.int64()),
        ("click_book_offer", pa.int64()),
        ("offer_category_id", pa.string()),
        ("offer_subcategory_id", pa.string()),
        ("item_image_embedding", pa.string()),
        ("item_semantic_content_hybrid_embedding", pa.string()),
        ("item_names", pa.string()),
        ("item_descriptions", pa.string()),
        ("item_rayons", pa.string()),
        ("item_author", pa.string()),
        ("item_performer", pa.string()),
        ("item_mean_stock_price", pa.float64()),
        ("item_booking_cnt", pa.int64()),
        ("item_favourite_cnt", pa.int64()),
    ]
)

# --- generation constants -------------------------------------------------
WORDS_PER_CATEGORY = 30
AUTHORS_PER_CATEGORY = 40
PERFORMERS_PER_CATEGORY = 25
MAX_PREFERRED_CATEGORIES = 3
PREFERENCE_CONCENTRATION = 0.5  # Dirichlet alpha over a user's preferred categories
EXPLORATION_RATE = 0.10  # share of events on a uniformly random category
FAVOURITE_SUBCATEGORY_RATE = 0.65  # within a preferred category, share on the favourite subcategory
ITEM_POPULARITY_EXPONENT = 1.1
USER_ACTIVITY_SIGMA = 1.3  # lognormal sigma of user activity weights
NULL_AUTHOR_RATE = 0.10
NULL_PERFORMER_RATE = 0.10
INVALID_VECTOR_RATE = 0.01
NULL_VECTOR_RATE = 0.01
NULL_QPI_RATE = 0.20
INVALID_VECTOR_VALUE = "not-a-vector"
# Sequential structure (what a history feature can learn). Each user has an interest
# per (user, week) and a session per (user, day), each a subcategory drawn like one event's.
SESSION_RATE = 0.8  # share of a user's events of a day that are in the day's session subcategory
WEEKLY_INTEREST_RATE = 0.8  # share of a user's day sessions that follow the week's interest
DAYS_PER_INTEREST = 7  # an interest lasts the week of date.toordinal() // 7

# Hour-of-day profile: quiet nights, lunch bump, evening peak.
_HOUR_WEIGHTS = np.array(
    [0.3, 0.2, 0.1, 0.1, 0.1, 0.2, 0.5, 1.0, 1.5, 1.8, 2.0, 2.3,
     2.8, 2.6, 2.2, 2.2, 2.5, 3.0, 3.6, 4.0, 4.0, 3.4, 2.2, 1.0]
)
_HOUR_CUM = np.cumsum(_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
_HOUR_CUM[-1] = 1.0

_CONSONANTS = list("bcdfghjklmnprstvz") + ["ch", "sh", "tr", "br", "gr"]
_VOWELS = ["a", "e", "i", "o", "u", "ou", "ai", "y"]

# Stream tags (kept far below date ordinals, which are ~7e5).
_TAG_VOCAB = 1
_TAG_ITEMS = 2
_TAG_USERS = 3
_TAG_INTEREST = 4  # with the week number: the users' interests of a week
_TAG_SESSION = 5  # with the date ordinal: the sessions of a day


def _whole_number(value: object) -> int:
    """An int or numpy integer as an int; True, 8.0 or "8" as a size is a mistake, not a coercion."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"must be an int, got {value!r}")
    return int(value)


_WholeNumber = Annotated[int, pydantic.BeforeValidator(_whole_number)]


class SyntheticParams(pydantic.BaseModel):
    """Size and seed of a synthetic data set, with the quickstart defaults (2,000 users, 1,000
    items, 100,000 events over 120 days: the whole graph in a few minutes on 2 CPU cores).

    The one place these defaults live: :class:`SyntheticSpec` adds the dates and the shape of
    the universe, and the Dagster run config of ``click_events`` inherits these fields (a
    ``datetime.date`` cannot be Dagster config, so ``end_date`` is not one of them).
    """

    # Unknown names are refused: a misspelt size must not silently generate the default.
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    num_users: _WholeNumber = Field(default=2000, gt=0, description="Users in the universe.")
    num_items: _WholeNumber = Field(default=1000, gt=0, description="Items in the universe.")
    num_events: _WholeNumber = Field(default=100_000, gt=0, description="Click events over `days` days.")
    days: _WholeNumber = Field(
        default=120, gt=0,
        description="Days that hold num_events: the daily volume is num_events / days, on any day generated.",
    )
    seed: _WholeNumber = Field(default=7, ge=0, description="Everything generated is derived from it.")


class SyntheticSpec(SyntheticParams):
    """Sizes, seed and dates of a synthetic data set.

    ``end_date`` is the last day of the default range: the ``days`` dates ending at
    ``end_date`` (inclusive) hold ``num_events`` events, ``num_events // days`` a day plus
    one on the dates :func:`events_on` gives the remainder to. Any other date can be
    generated too (:func:`generate_days`), at the same daily volume.
    """

    # Strict: a date, or a datetime (its date is used); "2024-03-31" is not converted.
    end_date: Annotated[datetime.date, Field(strict=True)]
    num_categories: _WholeNumber = Field(default=8, gt=0)
    subcategories_per_category: _WholeNumber = Field(default=4, gt=0)
    pretrained_dim: _WholeNumber = Field(default=16, gt=0)

    @pydantic.field_validator("end_date", mode="before")
    @classmethod
    def _date_of_datetime(cls, value: object) -> object:
        return value.date() if isinstance(value, datetime.datetime) else value

    @pydantic.model_validator(mode="after")
    def _every_subcategory_has_an_item(self) -> SyntheticSpec:
        n_sub = self.num_categories * self.subcategories_per_category
        if self.num_items < n_sub:
            raise ValueError(
                "num_items must be >= num_categories * subcategories_per_category "
                f"({self.num_categories} * {self.subcategories_per_category} = {n_sub}) "
                f"so that every subcategory has an item, got num_items={self.num_items}"
            )
        return self

    @property
    def num_subcategories(self) -> int:
        return self.num_categories * self.subcategories_per_category


# --------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------


def event_dates(spec: SyntheticSpec) -> list[datetime.date]:
    """The ``spec.days`` dates ending at ``spec.end_date`` inclusive, ascending."""
    return [
        spec.end_date - datetime.timedelta(days=spec.days - 1 - i)
        for i in range(spec.days)
    ]


def events_on(spec: SyntheticSpec, date: datetime.date) -> int:
    """Event count of one calendar date: ``num_events / days`` is the daily volume.

    The remainder of the division goes to the dates whose ordinal modulo ``days`` is below
    it, so the count depends on the date alone (not on which range is generated) and any
    ``days`` consecutive dates hold exactly ``num_events`` events.
    """
    base, rem = divmod(spec.num_events, spec.days)
    return base + (1 if date.toordinal() % spec.days < rem else 0)


def events_per_day(spec: SyntheticSpec) -> list[int]:
    """Event count of each date of :func:`event_dates` (sums to num_events)."""
    return [events_on(spec, date) for date in event_dates(spec)]


# --------------------------------------------------------------------------
# Universe (users and items) — depends on the seed and sizes only
# --------------------------------------------------------------------------


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([seed, tag])


def category_vocabularies(spec: SyntheticSpec) -> list[list[str]]:
    """Per-category word lists (disjoint across categories).

    Depends only on ``seed`` and ``num_categories``.
    """
    rng = _rng(spec.seed, _TAG_VOCAB)
    total = spec.num_categories * WORDS_PER_CATEGORY
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < total:
        n_syll = int(rng.integers(2, 4))
        cons = rng.integers(0, len(_CONSONANTS), size=n_syll)
        vows = rng.integers(0, len(_VOWELS), size=n_syll)
        word = "".join(_CONSONANTS[c] + _VOWELS[v] for c, v in zip(cons, vows))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return [
        words[c * WORDS_PER_CATEGORY : (c + 1) * WORDS_PER_CATEGORY]
        for c in range(spec.num_categories)
    ]


def _prefixed_ints(prefix: str, values: np.ndarray) -> pa.Array:
    """Vectorised ``f"{prefix}{v}"`` as an arrow string array."""
    as_str = pc.cast(pa.array(np.asarray(values, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(prefix, as_str, "")


def _join_words(vocab: pa.Array, idx: np.ndarray, n_words: np.ndarray) -> pa.Array:
    """Join ``vocab[idx[:, j]]`` for j < n_words (per row) with spaces."""
    cols = []
    for j in range(idx.shape[1]):
        col = vocab.take(pa.array(idx[:, j]))
        if j > 0:
            col = pc.if_else(pa.array(n_words > j), col, pa.scalar(None, pa.string()))
        cols.append(col)
    if len(cols) == 1:
        return cols[0]
    return pc.binary_join_element_wise(*cols, " ", null_handling="skip")


def _vector_strings(values: np.ndarray) -> pa.Array:
    """JSON list strings like ``"[0.12, -0.5, 1.0]"`` (4 decimals) per row."""
    values = np.round(values, 4) + 0.0  # + 0.0 turns -0.0 into 0.0
    parts = []
    for j in range(values.shape[1]):
        s = pc.cast(pa.array(values[:, j]), pa.string())
        # Keep a decimal point so every element parses as a JSON float.
        has_point = pc.match_substring(s, ".")
        s = pc.if_else(has_point, s, pc.binary_join_element_wise(s, ".0", ""))
        parts.append(s)
    body = pc.binary_join_element_wise(*parts, ", ")
    return pc.binary_join_element_wise("[", body, "]", "")


def _with_corruption(
    strings: pa.Array, rng: np.random.Generator, invalid_rate: float, null_rate: float
) -> pa.Array:
    n = len(strings)
    r = rng.random(n)
    invalid = r < invalid_rate
    null = (r >= invalid_rate) & (r < invalid_rate + null_rate)
    out = pc.if_else(pa.array(invalid), pa.scalar(INVALID_VECTOR_VALUE), strings)
    return pc.if_else(pa.array(null), pa.scalar(None, pa.string()), out)


def _null_where(arr: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.scalar(None, arr.type), arr)


@dataclass
class Universe:
    """Users and items of a spec, plus the sampling structures."""

    # items
    item_category: np.ndarray  # (I,) int
    item_subcategory: np.ndarray  # (I,) global subcategory index
    item_popularity: np.ndarray  # (I,) positive weights
    items_by_subcategory: np.ndarray  # item indices sorted by subcategory
    sub_start: np.ndarray  # (n_sub,) start offsets into items_by_subcategory
    sub_end: np.ndarray  # (n_sub,) end offsets (exclusive)
    sub_cum: np.ndarray  # shifted cumulative weights: segment s in (s, s+1]
    item_columns: dict[str, pa.Array]
    # users
    user_activity_cum: np.ndarray  # (U,) cumulative activity, last == 1
    user_categories: np.ndarray  # (U, K) preferred categories
    user_category_cum: np.ndarray  # (U, K) cumulative preference weights
    user_favourite_sub: np.ndarray  # (U, K) favourite local subcategory per slot
    user_columns: dict[str, pa.Array]
    user_base: dict[str, np.ndarray]


def _build_items(spec: SyntheticSpec, vocab: pa.Array) -> dict:
    rng = _rng(spec.seed, _TAG_ITEMS)
    n_items = spec.num_items
    C = spec.num_categories
    S = spec.subcategories_per_category
    n_sub = spec.num_subcategories
    V = WORDS_PER_CATEGORY
    D = spec.pretrained_dim

    # Subcategory of each item: every subcategory gets at least one item, the
    # rest are spread with uneven (Dirichlet) subcategory sizes.
    sub_sizes = rng.dirichlet(np.full(n_sub, 2.0))
    extra = rng.choice(n_sub, size=n_items - n_sub, p=sub_sizes)
    item_sub = rng.permutation(np.concatenate([np.arange(n_sub), extra]))
    item_cat = item_sub // S

    # Zipf-like popularity over a random permutation of items.
    rank = rng.permutation(n_items)
    popularity = 1.0 / np.power(rank + 1.0, ITEM_POPULARITY_EXPONENT)

    # Sampling structure: items grouped by subcategory, cumulative weights
    # normalised within each group and shifted by the subcategory index, so a
    # single searchsorted of (sub + u) picks an item inside subcategory sub.
    order = np.argsort(item_sub, kind="stable")
    sorted_sub = item_sub[order]
    counts = np.bincount(item_sub, minlength=n_sub)
    sub_end = np.cumsum(counts)
    sub_start = sub_end - counts
    w = popularity[order]
    cum = np.cumsum(w)
    seg_before = np.concatenate([[0.0], cum[sub_end[:-1] - 1]])
    seg_total = cum[sub_end - 1] - seg_before
    within = (cum - seg_before[sorted_sub]) / seg_total[sorted_sub]
    within[sub_end - 1] = 1.0
    sub_cum = sorted_sub + within

    # --- item attribute columns (arrow arrays) ---
    cat_ids = _prefixed_ints("CAT_", np.arange(C))
    sub_ids = pc.binary_join_element_wise(
        _prefixed_ints("CAT_", np.arange(n_sub) // S),
        _prefixed_ints("SUB_", np.arange(n_sub) % S),
        "_",
    )

    # Names: first word from the subcategory's slice of the category
    # vocabulary, then 1-2 words from the category vocabulary.
    slice_len = max(1, V // S)
    local_sub = item_sub % S
    first = (local_sub * slice_len + rng.integers(0, slice_len, n_items)) % V
    name_idx = item_cat[:, None] * V + np.column_stack(
        [first, rng.integers(0, V, (n_items, 2))]
    )
    names = _join_words(vocab, name_idx, rng.integers(2, 4, n_items))

    desc_idx = item_cat[:, None] * V + rng.integers(0, V, (n_items, 8))
    descriptions = _join_words(vocab, desc_idx, rng.integers(5, 9, n_items))

    # Rayons: a shelf label (1-2 category words) per subcategory.
    sub_cat = np.arange(n_sub) // S
    rayon_idx = sub_cat[:, None] * V + rng.integers(0, V, (n_sub, 2))
    rayon_per_sub = _join_words(vocab, rayon_idx, rng.integers(1, 3, n_sub))
    rayons = rayon_per_sub.take(pa.array(item_sub))

    # Authors / performers from per-category pools (skewed within the pool).
    def pool_member(pool_size: int) -> np.ndarray:
        k = np.minimum(
            (rng.pareto(1.2, n_items) * pool_size / 4).astype(np.int64), pool_size - 1
        )
        return k

    authors = pc.binary_join_element_wise(
        _prefixed_ints("author_c", item_cat),
        _prefixed_ints("", pool_member(AUTHORS_PER_CATEGORY)),
        "_",
    )
    authors = _null_where(authors, rng.random(n_items) < NULL_AUTHOR_RATE)
    performers = pc.binary_join_element_wise(
        _prefixed_ints("performer_c", item_cat),
        _prefixed_ints("", pool_member(PERFORMERS_PER_CATEGORY)),
        "_",
    )
    performers = _null_where(performers, rng.random(n_items) < NULL_PERFORMER_RATE)

    # Pretrained vectors: category (+ subcategory) centroid + noise.
    cat_centroid = rng.normal(0.0, 1.0, (C, D))
    sub_offset = rng.normal(0.0, 0.35, (n_sub, D))
    image = cat_centroid[item_cat] + sub_offset[item_sub] + rng.normal(0.0, 0.5, (n_items, D))
    sem_centroid = rng.normal(0.0, 1.0, (C, D))
    semantic = sem_centroid[item_cat] + sub_offset[item_sub][:, ::-1] + rng.normal(
        0.0, 0.4, (n_items, D)
    )
    image_s = _with_corruption(_vector_strings(image), rng, INVALID_VECTOR_RATE, NULL_VECTOR_RATE)
    semantic_s = _with_corruption(
        _vector_strings(semantic), rng, INVALID_VECTOR_RATE, NULL_VECTOR_RATE
    )
    del image, semantic

    # Numbers: price per category level, counts correlated with popularity.
    cat_price = rng.lognormal(np.log(15.0), 0.6, C)
    price = np.round(cat_price[item_cat] * rng.lognormal(0.0, 0.4, n_items), 2)
    price = np.maximum(price, 0.5)
    pop_scaled = popularity / popularity.max()
    booking_cnt = rng.poisson(2.0 + 3000.0 * pop_scaled * rng.lognormal(0.0, 0.3, n_items))
    favourite_cnt = rng.poisson(0.5 + 600.0 * pop_scaled * rng.lognormal(0.0, 0.3, n_items))

    columns = {
        "item_id": _prefixed_ints("i", np.arange(n_items)),
        "offer_category_id": cat_ids.take(pa.array(item_cat)),
        "offer_subcategory_id": sub_ids.take(pa.array(item_sub)),
        "item_image_embedding": image_s,
        "item_semantic_content_hybrid_embedding": semantic_s,
        "item_names": names,
        "item_descriptions": descriptions,
        "item_rayons": rayons,
        "item_author": authors,
        "item_performer": performers,
        "item_mean_stock_price": pa.array(price, pa.float64()),
        "item_booking_cnt": pa.array(booking_cnt.astype(np.int64)),
        "item_favourite_cnt": pa.array(favourite_cnt.astype(np.int64)),
    }
    return dict(
        item_category=item_cat,
        item_subcategory=item_sub,
        item_popularity=popularity,
        items_by_subcategory=order,
        sub_start=sub_start,
        sub_end=sub_end,
        sub_cum=sub_cum,
        item_columns=columns,
        sub_ids=sub_ids,
    )


def _distinct_categories(rng: np.random.Generator, n: int, C: int, k: int) -> np.ndarray:
    """(n, k) distinct random categories per row (vectorised)."""
    out = np.empty((n, k), dtype=np.int64)
    for j in range(k):
        x = rng.integers(0, C - j, n)
        # Skip the already chosen values, in ascending order.
        if j > 0:
            chosen = np.sort(out[:, :j], axis=1)
            for t in range(j):
                x = x + (x >= chosen[:, t])
        out[:, j] = x
    return out


def _build_users(spec: SyntheticSpec, vocab: pa.Array, sub_ids: pa.Array) -> dict:
    rng = _rng(spec.seed, _TAG_USERS)
    U = spec.num_users
    C = spec.num_categories
    S = spec.subcategories_per_category
    V = WORDS_PER_CATEGORY
    K = min(MAX_PREFERRED_CATEGORIES, C)

    activity = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, U)
    activity_cum = np.cumsum(activity)
    activity_cum /= activity_cum[-1]
    activity_cum[-1] = 1.0
    del activity

    cats = _distinct_categories(rng, U, C, K)
    weights = rng.dirichlet(np.full(K, PREFERENCE_CONCENTRATION), U)
    # Put the strongest preference first (slot 0 = top category).
    order = np.argsort(-weights, axis=1)
    weights = np.take_along_axis(weights, order, axis=1)
    cats = np.take_along_axis(cats, order, axis=1)
    cat_cum = np.cumsum(weights, axis=1)
    cat_cum[:, -1] = 1.0
    fav_sub = rng.integers(0, S, (U, K))

    # user_queries: 2-4 words from the user's preferred categories' vocabularies.
    n_q = rng.integers(2, 5, U)
    q_slot_r = rng.random((U, 4))
    q_slot = np.zeros((U, 4), dtype=np.int64)
    for s in range(K - 1):
        q_slot += q_slot_r > cat_cum[:, s : s + 1]
    q_cat = np.take_along_axis(cats, q_slot, axis=1)
    queries = _join_words(vocab, q_cat * V + rng.integers(0, V, (U, 4)), n_q)
    del q_slot_r, q_slot, q_cat

    # qpi_subcategory_ids: favourite subcategory of the top category, plus that
    # of the second category when it has a real weight; sorted, ~20% null.
    top_sub = cats[:, 0] * S + fav_sub[:, 0]
    if K > 1:
        second_sub = cats[:, 1] * S + fav_sub[:, 1]
        has_second = weights[:, 1] > 0.2
    else:
        second_sub = top_sub
        has_second = np.zeros(U, dtype=bool)
    a = sub_ids.take(pa.array(top_sub))
    b = sub_ids.take(pa.array(second_sub))
    lo = pc.if_else(pc.less_equal(a, b), a, b)
    hi = pc.if_else(pc.less_equal(a, b), b, a)
    pair = pc.binary_join_element_wise(lo, hi, " ")
    qpi = pc.if_else(pa.array(has_second), pair, a)
    qpi = _null_where(qpi, rng.random(U) < NULL_QPI_RATE)
    del a, b, lo, hi, pair

    engagement_level = rng.gamma(1.5, 1.0, U)  # drives all counters jointly
    base = {
        "consult_offer": rng.poisson(1.0 + 2.0 * engagement_level).astype(np.int32),
        "booking_cnt": rng.poisson(0.3 + 0.8 * engagement_level).astype(np.int32),
        "has_added_offer_to_favorites": rng.poisson(0.2 + 0.5 * engagement_level).astype(
            np.int32
        ),
        "user_engagement": np.minimum(
            np.round(2.0 * engagement_level), 10
        ).astype(np.int32),
        "click_book_offer": rng.poisson(0.1 + 0.4 * engagement_level).astype(np.int32),
        "credit": rng.uniform(0.0, 500.0, U).astype(np.float32),
    }
    columns = {
        "user_id": _prefixed_ints("u", np.arange(U)),
        "user_queries": queries,
        "qpi_subcategory_ids": qpi,
        "user_age": pa.array(rng.integers(15, 71, U).astype(np.int64)),
    }
    return dict(
        user_activity_cum=activity_cum,
        user_categories=cats.astype(np.int32),
        user_category_cum=cat_cum,
        user_favourite_sub=fav_sub.astype(np.int32),
        user_columns=columns,
        user_base=base,
    )


def build_universe(spec: SyntheticSpec) -> Universe:
    """Build users and items (depends on seed and universe sizes only)."""
    vocab = pa.array([w for words in category_vocabularies(spec) for w in words])
    items = _build_items(spec, vocab)
    sub_ids = items.pop("sub_ids")
    users = _build_users(spec, vocab, sub_ids)
    return Universe(**items, **users)


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------


def _preferred_subcategories(
    spec: SyntheticSpec, uni: Universe, user: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One subcategory per entry of ``user``, drawn as an event's is without sessions: a preferred
    category by the user's weights (or, at EXPLORATION_RATE, any), then the slot's favourite
    subcategory at FAVOURITE_SUBCATEGORY_RATE, else any of the category's."""
    C, S = spec.num_categories, spec.subcategories_per_category
    K = uni.user_categories.shape[1]
    n = len(user)
    r = rng.random(n)
    cum = uni.user_category_cum[user]
    slot = np.zeros(n, dtype=np.int64)
    for s in range(K - 1):
        slot += r > cum[:, s]
    cat = uni.user_categories[user, slot].astype(np.int64)
    fav = uni.user_favourite_sub[user, slot].astype(np.int64)
    explore = rng.random(n) < EXPLORATION_RATE
    cat = np.where(explore, rng.integers(0, C, n), cat)
    use_fav = (rng.random(n) < FAVOURITE_SUBCATEGORY_RATE) & ~explore
    return cat * S + np.where(use_fav, fav, rng.integers(0, S, n))


def weekly_interests(spec: SyntheticSpec, uni: Universe, week: int) -> np.ndarray:
    """Every user's interest (a subcategory) in week ``week`` (``date.toordinal() // 7``).

    Drawn from the seed and the week alone, for all users at once, so every day of the week
    (generated in any range) sees the same interests, and they drift from week to week.
    """
    rng = np.random.default_rng([spec.seed, _TAG_INTEREST, week])
    return _preferred_subcategories(spec, uni, np.arange(spec.num_users), rng)


def _session_subcategories(
    spec: SyntheticSpec, uni: Universe, date: datetime.date, user: np.ndarray, sub: np.ndarray,
    interests: np.ndarray,
) -> np.ndarray:
    """``sub`` with SESSION_RATE of each user's events moved to the user's session of the day.

    The session is the week's interest (WEEKLY_INTEREST_RATE) or a fresh draw; both are drawn
    like an event's subcategory, so a user's overall mix of subcategories is unchanged and
    only its order gains structure. Its own stream (seed, tag, date): the day's other columns
    are what they were without sessions.
    """
    rng = np.random.default_rng([spec.seed, _TAG_SESSION, date.toordinal()])
    active, position = np.unique(user, return_inverse=True)
    fresh = _preferred_subcategories(spec, uni, active, rng)
    session = np.where(rng.random(len(active)) < WEEKLY_INTEREST_RATE, interests[active], fresh)
    in_session = rng.random(len(user)) < SESSION_RATE
    return np.where(in_session, session[position], sub)


def _day_table(
    spec: SyntheticSpec, uni: Universe, date: datetime.date, n: int, interests: np.ndarray | None = None
) -> pa.Table:
    if interests is None:
        interests = weekly_interests(spec, uni, date.toordinal() // DAYS_PER_INTEREST)
    rng = np.random.default_rng([spec.seed, date.toordinal()])
    C = spec.num_categories
    S = spec.subcategories_per_category
    K = uni.user_categories.shape[1]

    user = np.searchsorted(uni.user_activity_cum, rng.random(n), side="right")
    np.minimum(user, spec.num_users - 1, out=user)

    r = rng.random(n)
    cum = uni.user_category_cum[user]
    slot = np.zeros(n, dtype=np.int64)
    for s in range(K - 1):
        slot += r > cum[:, s]
    del cum
    cat = uni.user_categories[user, slot].astype(np.int64)
    fav = uni.user_favourite_sub[user, slot].astype(np.int64)

    explore = rng.random(n) < EXPLORATION_RATE
    random_cat = rng.integers(0, C, n)
    cat = np.where(explore, random_cat, cat)
    use_fav = (rng.random(n) < FAVOURITE_SUBCATEGORY_RATE) & ~explore
    local = np.where(use_fav, fav, rng.integers(0, S, n))
    sub = _session_subcategories(spec, uni, date, user, cat * S + local, interests)

    pos = np.searchsorted(uni.sub_cum, sub + rng.random(n), side="right")
    pos = np.clip(pos, uni.sub_start[sub], uni.sub_end[sub] - 1)
    item = uni.items_by_subcategory[pos]

    hour = np.searchsorted(_HOUR_CUM, rng.random(n), side="right")
    np.minimum(hour, 23, out=hour)

    def noisy_count(base: np.ndarray) -> pa.Array:
        noise = rng.integers(-1, 2, n) * (rng.random(n) < 0.3)
        return pa.array(np.maximum(base[user].astype(np.int64) + noise, 0))

    credit = uni.user_base["credit"][user].astype(np.float64) + rng.normal(0.0, 5.0, n)
    credit = np.round(np.clip(credit, 0.0, 500.0), 2)

    user_idx = pa.array(user)
    item_idx = pa.array(item)
    epoch_days = (date - datetime.date(1970, 1, 1)).days
    uc = uni.user_columns
    ic = uni.item_columns
    columns = {
        "event_date": pa.array(np.full(n, epoch_days, dtype=np.int32), pa.date32()),
        "user_id": uc["user_id"].take(user_idx),
        "item_id": ic["item_id"].take(item_idx),
        "event_hour": pa.array(hour.astype(np.int64)),
        "event_day": pa.array(np.full(n, date.isoweekday(), dtype=np.int64)),
        "event_month": pa.repeat(pa.scalar(str(date.month), pa.string()), n),
        "consult_offer": noisy_count(uni.user_base["consult_offer"]),
        "booking_cnt": noisy_count(uni.user_base["booking_cnt"]),
        "user_theoretical_remaining_credit": pa.array(credit, pa.float64()),
        "has_added_offer_to_favorites": noisy_count(
            uni.user_base["has_added_offer_to_favorites"]
        ),
        "user_queries": uc["user_queries"].take(user_idx),
        "qpi_subcategory_ids": uc["qpi_subcategory_ids"].take(user_idx),
        "user_engagement": noisy_count(uni.user_base["user_engagement"]),
        "user_age": uc["user_age"].take(user_idx),
        "click_book_offer": noisy_count(uni.user_base["click_book_offer"]),
    }
    for name in CLICK_EVENT_SCHEMA.names[15:]:
        columns[name] = ic[name].take(item_idx)
    arrays = [columns[name] for name in CLICK_EVENT_SCHEMA.names]
    return pa.Table.from_arrays(arrays, schema=CLICK_EVENT_SCHEMA)


def generate_click_events(spec: SyntheticSpec) -> Iterator[pa.Table]:
    """Yield one table (schema ``CLICK_EVENT_SCHEMA``) per date, ascending.

    Days whose event count is zero (num_events < days) yield empty tables.
    """
    for _, table in generate_days(spec, event_dates(spec)):
        yield table


def generate_days(
    spec: SyntheticSpec, dates: Iterable[datetime.date]
) -> Iterator[tuple[datetime.date, pa.Table]]:
    """Yield ``(date, events of that date)`` for any dates, in the order given.

    A date's events depend only on the universe (seed and sizes), the date and the daily
    volume (:func:`events_on`), never on the other dates generated with it: one day generated
    alone equals that day inside any range, so days can be backfilled one at a time.
    ``spec.end_date`` and ``spec.days`` bound nothing here.
    """
    uni = build_universe(spec)
    interests: dict[int, np.ndarray] = {}  # the week's interests, drawn once per week met
    for date in dates:
        week = date.toordinal() // DAYS_PER_INTEREST
        if week not in interests:
            interests = {week: weekly_interests(spec, uni, week)}
        yield date, _day_table(spec, uni, date, events_on(spec, date), interests[week])


def generate_all(spec: SyntheticSpec) -> pa.Table:
    """All events as one table (for small sizes and tests)."""
    tables = list(generate_click_events(spec))
    return pa.concat_tables(tables).combine_chunks()
