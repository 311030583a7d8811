"""How much a user's latest event says about the next one in the synthetic data (issue 16).

A history feature can only help if the order of a user's events carries information its
overall mix does not. For every event after a user's first (events ordered by date, hour and
item id), this prints the share whose category (and subcategory) equals the previous event's,
beside the share equal to the user's overall top category (subcategory) counted over all the
user's events, the best a model without history could guess from the user alone. Each number
is printed for the generator as it is and with its sessions switched off (SESSION_RATE = 0),
computed over the same sizes, so the difference is the sessions' doing.

    python bench/history_signal.py                         # quickstart sizes (2,000 users, 100k events)
    python bench/history_signal.py --users 300 --items 200 --events 20000 --days 40
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twotower_assets.data import synthetic  # noqa: E402


def _shares(user: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """(share of non-first events whose label is the previous event's, share whose label is the
    user's most frequent one); rows are in each user's time order."""
    same_user = user[1:] == user[:-1]
    previous = float(np.mean(label[1:][same_user] == label[:-1][same_user]))
    pairs = user.astype(np.int64) * (label.max() + 1) + label
    values, counts = np.unique(pairs, return_counts=True)
    pair_user = values // (label.max() + 1)
    # Most frequent label per user (ties: the smallest label).
    order = np.lexsort((values % (label.max() + 1), -counts, pair_user))
    first = np.concatenate([[True], pair_user[order][1:] != pair_user[order][:-1]])
    top = dict(zip(pair_user[order][first], (values % (label.max() + 1))[order][first]))
    top_of_row = np.array([top[u] for u in user[1:][same_user]])
    return previous, float(np.mean(label[1:][same_user] == top_of_row))


def history_signal(events: pa.Table) -> dict[str, float]:
    """The four shares for one events table (schema ``CLICK_EVENT_SCHEMA``)."""
    ordered = events.sort_by([("user_id", "ascending"), ("event_date", "ascending"),
                              ("event_hour", "ascending"), ("item_id", "ascending")])
    user = pc.dictionary_encode(ordered["user_id"]).combine_chunks().indices.to_numpy()
    category = pc.dictionary_encode(ordered["offer_category_id"]).combine_chunks().indices.to_numpy()
    subcategory = pc.dictionary_encode(ordered["offer_subcategory_id"]).combine_chunks().indices.to_numpy()
    previous_category, top_category = _shares(user, category)
    previous_subcategory, top_subcategory = _shares(user, subcategory)
    return {"previous_category": previous_category, "top_category": top_category,
            "previous_subcategory": previous_subcategory, "top_subcategory": top_subcategory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    spec = synthetic.SyntheticSpec(end_date=dt.date(2026, 5, 31), num_users=args.users, num_items=args.items,
                                   num_events=args.events, days=args.days, seed=args.seed)
    with_sessions = history_signal(synthetic.generate_all(spec))
    with mock.patch.object(synthetic, "SESSION_RATE", 0.0):
        without = history_signal(synthetic.generate_all(spec))
    print(f"{args.users} users, {args.items} items, {args.events} events over {args.days} days, seed {args.seed}")
    print("| share of next events equal to | with sessions | without (SESSION_RATE = 0) |")
    print("|---|---:|---:|")
    for name in with_sessions:
        print(f"| {name.replace('_', ' ')} | {with_sessions[name]:.3f} | {without[name]:.3f} |")


if __name__ == "__main__":
    main()
