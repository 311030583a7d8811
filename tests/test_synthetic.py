import datetime
import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pytest

from twotower_assets.data.synthetic import (
    CLICK_EVENT_SCHEMA,
    SyntheticSpec,
    category_vocabularies,
    event_dates,
    events_on,
    events_per_day,
    generate_days,
    generate_all,
    generate_click_events,
)

END = datetime.date(2024, 3, 31)

EXPECTED_COLUMNS = [
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

SPEC = SyntheticSpec(end_date=END, num_users=2000, num_items=1000, num_events=40_000, days=30)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_all(SPEC)


@pytest.fixture(scope="module")
def rows(table):
    return table.to_pydict()


def test_schema_exact(table):
    assert CLICK_EVENT_SCHEMA.names == [n for n, _ in EXPECTED_COLUMNS]
    assert [f.type for f in CLICK_EVENT_SCHEMA] == [t for _, t in EXPECTED_COLUMNS]
    assert table.schema.equals(CLICK_EVENT_SCHEMA)
    for day_table in generate_click_events(
        SyntheticSpec(end_date=END, num_users=50, num_items=40, num_events=7, days=3)
    ):
        assert day_table.schema.equals(CLICK_EVENT_SCHEMA)


def test_row_counts():
    spec = SyntheticSpec(end_date=END, num_users=100, num_items=50, num_events=1003, days=10)
    counts = [t.num_rows for t in generate_click_events(spec)]
    assert counts == events_per_day(spec)
    # 100 a day; the 3 left over go to the dates whose ordinal % 10 is 0, 1 or 2.
    extra = [1 if date.toordinal() % 10 < 3 else 0 for date in event_dates(spec)]
    assert sum(extra) == 3
    assert counts == [100 + e for e in extra]
    assert sum(counts) == spec.num_events
    # fewer events than days: empty tables on the other days, still typed
    small = SyntheticSpec(end_date=END, num_users=10, num_items=40, num_events=3, days=5)
    tables = list(generate_click_events(small))
    assert [t.num_rows for t in tables] == [1 if d.toordinal() % 5 < 3 else 0 for d in event_dates(small)]
    assert generate_all(small).num_rows == 3


def test_any_days_consecutive_days_hold_num_events():
    spec = SyntheticSpec(end_date=END, num_users=100, num_items=50, num_events=1003, days=10)
    for shift in range(12):
        dates = [END - datetime.timedelta(days=shift + i) for i in range(10)]
        assert sum(events_on(spec, d) for d in dates) == 1003


def test_a_day_is_the_same_alone_or_inside_any_range():
    # Backfilling one day must write exactly the rows a backfill of a longer range writes for it.
    spec = SyntheticSpec(end_date=END, num_users=300, num_items=100, num_events=1003, days=10)
    day = END - datetime.timedelta(days=4)
    alone = dict(generate_days(spec, [day]))[day]
    week = dict(generate_days(spec, [END - datetime.timedelta(days=i) for i in range(7)]))
    later = dict(generate_days(spec, [day + datetime.timedelta(days=400), day]))
    assert alone.num_rows == events_on(spec, day) > 0
    assert alone.equals(week[day]) and alone.equals(later[day])
    # outside the spec's own range too: the generator fills any day
    far = END + datetime.timedelta(days=100)
    first, second = dict(generate_days(spec, [far])), dict(generate_days(spec, [far, day]))
    assert first[far].num_rows == events_on(spec, far) and first[far].equals(second[far])
    assert set(first[far].column("event_date").to_pylist()) == {far}


def test_total_row_count(table):
    assert table.num_rows == SPEC.num_events


def test_event_dates():
    spec = SyntheticSpec(end_date=END, days=3)
    assert event_dates(spec) == [
        datetime.date(2024, 3, 29),
        datetime.date(2024, 3, 30),
        datetime.date(2024, 3, 31),
    ]


def test_days_in_order_and_within_range(table):
    dates = table.column("event_date").to_pylist()
    assert dates == sorted(dates)
    assert set(dates) == set(event_dates(SPEC))
    assert min(dates) == END - datetime.timedelta(days=SPEC.days - 1)
    assert max(dates) == END


def test_deterministic_same_spec(table):
    again = generate_all(SPEC)
    assert again.equals(table)


def test_different_seed_differs(table):
    other = generate_all(
        SyntheticSpec(
            end_date=END, num_users=2000, num_items=1000, num_events=40_000, days=30, seed=8
        )
    )
    assert other.num_rows == table.num_rows
    assert not other.equals(table)
    assert other.column("item_id").to_pylist() != table.column("item_id").to_pylist()


def test_day_events_independent_of_days_and_end_date():
    # 100 events/day in all three specs; the shared dates must be identical.
    long = SyntheticSpec(end_date=END, num_users=300, num_items=100, num_events=1000, days=10)
    short = SyntheticSpec(end_date=END, num_users=300, num_items=100, num_events=500, days=5)
    shifted = SyntheticSpec(
        end_date=END + datetime.timedelta(days=3),
        num_users=300,
        num_items=100,
        num_events=1000,
        days=10,
    )
    by_date = lambda spec: dict(zip(event_dates(spec), generate_click_events(spec)))
    long_days, short_days, shifted_days = by_date(long), by_date(short), by_date(shifted)
    assert len(short_days) == 5
    for date, t in short_days.items():
        assert t.num_rows == 100
        assert t.equals(long_days[date]), date
    shared = set(long_days) & set(shifted_days)
    assert len(shared) == 7
    for date in shared:
        assert shifted_days[date].equals(long_days[date]), date


def test_ids_within_ranges(rows):
    users = {int(u[1:]) for u in rows["user_id"]}
    items = {int(i[1:]) for i in rows["item_id"]}
    assert all(u.startswith("u") for u in rows["user_id"][:100])
    assert all(i.startswith("i") for i in rows["item_id"][:100])
    assert min(users) >= 0 and max(users) < SPEC.num_users
    assert min(items) >= 0 and max(items) < SPEC.num_items
    cats = set(rows["offer_category_id"])
    assert cats <= {f"CAT_{c}" for c in range(SPEC.num_categories)}
    assert len(cats) == SPEC.num_categories
    for cat, sub in zip(rows["offer_category_id"], rows["offer_subcategory_id"]):
        assert sub.startswith(cat + "_SUB_")
        assert 0 <= int(sub.rsplit("_", 1)[1]) < SPEC.subcategories_per_category
    assert set(rows["event_hour"]) <= set(range(24))
    assert min(rows["user_age"]) >= 15 and max(rows["user_age"]) <= 70
    credit = np.array(rows["user_theoretical_remaining_credit"])
    assert credit.min() >= 0 and credit.max() <= 500
    for name in (
        "consult_offer",
        "booking_cnt",
        "has_added_offer_to_favorites",
        "user_engagement",
        "click_book_offer",
        "item_booking_cnt",
        "item_favourite_cnt",
    ):
        assert min(rows[name]) >= 0, name
    assert min(rows["item_mean_stock_price"]) > 0


def test_event_day_and_month_consistent(rows):
    for d, day, month in zip(rows["event_date"], rows["event_day"], rows["event_month"]):
        assert day == d.isoweekday()
        assert month == str(d.month)


def _item_rows(rows):
    """One dict per distinct item."""
    seen = {}
    names = list(rows)
    for k, item in enumerate(rows["item_id"]):
        if item not in seen:
            seen[item] = {n: rows[n][k] for n in names if not n.startswith("user") and n not in (
                "event_date", "event_hour", "event_day", "event_month", "consult_offer",
                "booking_cnt", "has_added_offer_to_favorites", "qpi_subcategory_ids",
                "click_book_offer")}
    return seen


def test_item_attributes_stable_per_item(rows):
    cols = [
        "offer_category_id",
        "offer_subcategory_id",
        "item_names",
        "item_image_embedding",
        "item_author",
        "item_mean_stock_price",
        "item_booking_cnt",
    ]
    first = {}
    for k, item in enumerate(rows["item_id"]):
        values = tuple(rows[c][k] for c in cols)
        assert first.setdefault(item, values) == values


def test_category_text_correlation(rows):
    vocab = category_vocabularies(SPEC)
    vocab_sets = [set(words) for words in vocab]
    all_words = [w for words in vocab for w in words]
    assert len(all_words) == len(set(all_words)), "category vocabularies must be disjoint"
    items = _item_rows(rows)
    for item in items.values():
        c = int(item["offer_category_id"].split("_")[1])
        name_words = item["item_names"].split(" ")
        assert 2 <= len(name_words) <= 3
        assert set(name_words) <= vocab_sets[c]
        assert set(item["item_descriptions"].split(" ")) <= vocab_sets[c]
        assert 1 <= len(item["item_rayons"].split(" ")) <= 2
        assert set(item["item_rayons"].split(" ")) <= vocab_sets[c]
        if item["item_author"] is not None:
            assert item["item_author"].startswith(f"author_c{c}_")
        if item["item_performer"] is not None:
            assert item["item_performer"].startswith(f"performer_c{c}_")
    n_null_author = sum(i["item_author"] is None for i in items.values())
    assert 0.03 < n_null_author / len(items) < 0.2


def test_user_queries_from_preferred_categories(rows):
    vocab = category_vocabularies(SPEC)
    word_cat = {w: c for c, words in enumerate(vocab) for w in words}
    user_cats = defaultdict(Counter)
    queries = {}
    for u, cat, q in zip(rows["user_id"], rows["offer_category_id"], rows["user_queries"]):
        user_cats[u][int(cat.split("_")[1])] += 1
        assert queries.setdefault(u, q) == q  # stable per user
    hits = total = 0
    for u, q in queries.items():
        words = q.split(" ")
        assert 2 <= len(words) <= 4
        if sum(user_cats[u].values()) < 20:
            continue
        top3 = {c for c, _ in user_cats[u].most_common(3)}
        hits += sum(word_cat[w] in top3 for w in words)
        total += len(words)
    assert total > 0
    assert hits / total > 0.8


def test_users_concentrate_on_few_categories(rows):
    per_user = defaultdict(Counter)
    for u, cat in zip(rows["user_id"], rows["offer_category_id"]):
        per_user[u][cat] += 1
    shares = [
        max(c.values()) / sum(c.values()) for c in per_user.values() if sum(c.values()) >= 10
    ]
    assert len(shares) > 100
    uniform = 1.0 / SPEC.num_categories
    assert np.mean(shares) > 0.5 > 3 * uniform


def test_user_activity_long_tailed(rows):
    counts = np.array(sorted(Counter(rows["user_id"]).values(), reverse=True))
    top = counts[: max(1, len(counts) // 10)].sum() / counts.sum()
    assert top > 0.3
    assert np.median(counts) < counts.mean()


def test_item_popularity_long_tail(rows):
    counts = np.array(sorted(Counter(rows["item_id"]).values(), reverse=True))
    top_items = SPEC.num_items // 10
    assert counts[:top_items].sum() / counts.sum() > 0.4


def test_qpi_subcategories(rows):
    qpi = {}
    for u, q in zip(rows["user_id"], rows["qpi_subcategory_ids"]):
        assert qpi.setdefault(u, q) == q
    values = list(qpi.values())
    null_share = sum(v is None for v in values) / len(values)
    assert 0.1 < null_share < 0.3
    for v in values:
        if v is None:
            continue
        parts = v.split(" ")
        assert 1 <= len(parts) <= 2
        assert parts == sorted(parts)
        assert all(p.startswith("CAT_") and "_SUB_" in p for p in parts)


def test_pretrained_vectors_parse(rows):
    items = _item_rows(rows)
    for col in ("item_image_embedding", "item_semantic_content_hybrid_embedding"):
        ok = bad = null = 0
        for item in items.values():
            value = item[col]
            if value is None:
                null += 1
                continue
            try:
                vec = json.loads(value)
            except json.JSONDecodeError:
                bad += 1
                continue
            assert isinstance(vec, list) and len(vec) == SPEC.pretrained_dim
            assert all(isinstance(x, float) for x in vec)
            ok += 1
        n = len(items)
        assert ok / n > 0.9, col
        assert bad + null < 0.1 * n


def test_pretrained_vectors_correlate_with_category(rows):
    items = _item_rows(rows)
    by_cat = defaultdict(list)
    for item in items.values():
        try:
            vec = json.loads(item["item_image_embedding"])
        except (TypeError, json.JSONDecodeError):
            continue
        by_cat[item["offer_category_id"]].append(vec)
    centroids = {c: np.mean(v, axis=0) for c, v in by_cat.items()}
    correct = total = 0
    for c, vecs in by_cat.items():
        for v in vecs:
            nearest = min(centroids, key=lambda k: np.sum((centroids[k] - v) ** 2))
            correct += nearest == c
            total += 1
    assert correct / total > 0.8


def test_universe_independent_of_days():
    a = generate_all(SyntheticSpec(end_date=END, num_users=300, num_items=100, num_events=2000, days=4))
    b = generate_all(
        SyntheticSpec(
            end_date=datetime.date(2023, 1, 15), num_users=300, num_items=100, num_events=900, days=9
        )
    )
    def user_attrs(t):
        d = t.select(["user_id", "user_queries", "qpi_subcategory_ids", "user_age"]).to_pylist()
        return {r["user_id"]: r for r in d}
    def item_attrs(t):
        d = t.select(["item_id", "item_names", "item_image_embedding", "item_author"]).to_pylist()
        return {r["item_id"]: r for r in d}
    for fa, fb in ((user_attrs(a), user_attrs(b)), (item_attrs(a), item_attrs(b))):
        shared = set(fa) & set(fb)
        assert len(shared) > 10
        for k in shared:
            assert fa[k] == fb[k]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_users=0),
        dict(num_items=-1),
        dict(num_events=0),
        dict(days=0),
        dict(num_categories=0),
        dict(subcategories_per_category=0),
        dict(pretrained_dim=0),
        dict(seed=-1),
        dict(num_items=31, num_categories=8, subcategories_per_category=4),
    ],
)
def test_invalid_spec_raises(kwargs):
    with pytest.raises(ValueError):
        SyntheticSpec(end_date=END, **kwargs)


def test_minimal_universe_has_every_subcategory():
    # 20,000 events: with sessions 80% of a user's day is one subcategory, so 5 users
    # explore the 32 subcategories with a fifth of their events (5,000 left one out).
    spec = SyntheticSpec(end_date=END, num_users=5, num_items=32, num_events=20_000, days=2)
    t = generate_all(spec)
    assert len(set(t.column("offer_subcategory_id").to_pylist())) == 32
    assert len(set(t.column("item_id").to_pylist())) <= 32
