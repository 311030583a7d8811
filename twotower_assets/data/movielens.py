"""MovieLens 100K as the pipeline's click events.

MovieLens 100K (100,000 ratings of 1,682 movies by 943 users, GroupLens Research; download
``ml-100k.zip`` from https://grouplens.org/datasets/movielens/100k/) is the public data set
the retrieval model is measured on. Two layouts of the same data are read:

* GroupLens's original files: ``u.data`` (tab-separated user, item, rating, timestamp),
  ``u.user`` and ``u.item`` (``|``-separated, latin-1, 19 genre flags per movie);
* RecBole's atomic files: ``<name>.inter``, ``<name>.user``, ``<name>.item``
  (tab-separated, a typed header such as ``user_id:token``).

Both become one :class:`MovieLens` (ratings, users, items as Arrow tables, ids as strings),
and :func:`click_event_table` maps it to the click-event table the asset graph splits and
trains on: every rating is one event (the TFRS tutorials treat every rating as a positive),
dated by its timestamp, with the user's and the movie's attributes as feature columns.

``user_recent_items`` is the user's most recent earlier ratings (movie ids, newest first,
strictly before the event's second): a causal feature, known when the event happens, which
lets the user tower describe *what the user is watching lately*; see
docs/benchmarks-movielens.md for what it does to retrieval quality.

Ids are kept exactly as written; an empty id, one with whitespace, or one repeated in the
users or items file is refused naming the id and its line(s).

Errors: every problem with the files (missing file, wrong header, malformed line, unknown
id, no ratings) raises :class:`MovieLensFormatError` naming the file and, where there is
one, the line.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydantic
from pydantic import Field

from twotower_assets.data.synthetic import CLICK_EVENT_SCHEMA

__all__ = [
    "GROUPLENS_GENRES",
    "MOVIELENS_EVENT_SCHEMA",
    "MovieLens",
    "MovieLensFormatError",
    "click_event_table",
    "detect_format",
    "load_movielens",
    "recent_items",
]

DOWNLOAD_URL = "https://grouplens.org/datasets/movielens/100k/"

# The genre flags of u.item, in column order (GroupLens's README and u.genre).
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)

RATING_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("item_id", pa.string()), ("rating", pa.int64()), ("timestamp", pa.int64())]
)
USER_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("age", pa.int64()), ("gender", pa.string()),
     ("occupation", pa.string()), ("zip_code", pa.string())]
)
ITEM_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("title", pa.string()), ("genres", pa.string()),
     ("release_year", pa.int64())]
)

MOVIELENS_EVENT_SCHEMA = pa.schema(
    [
        # The pipeline's own event columns, exactly as the synthetic source declares them.
        *(CLICK_EVENT_SCHEMA.field(name) for name in
          ("event_date", "user_id", "item_id", "event_hour", "event_day", "event_month")),
        ("event_timestamp", pa.int64()),
        ("rating", pa.int64()),
        ("user_age", pa.int64()),
        ("user_gender", pa.string()),
        ("user_occupation", pa.string()),
        ("user_zip_prefix", pa.string()),
        ("user_recent_items", pa.string()),
        ("item_title", pa.string()),
        ("item_genres", pa.string()),
        ("item_release_year", pa.int64()),
        ("offer_category_id", pa.string()),
    ]
)
"""The click-event table of MovieLens. The first six columns are the pipeline's own (the
split reads user_id, item_id, event_date, event_hour); ``offer_category_id`` is the movie's
first genre, so what colours items by category (plots) works unchanged."""

ZIP_PREFIX_LENGTH = 2
"""First two characters of the zip code: a coarse region (US 3-digit prefixes are too sparse
for 943 users)."""

DEFAULT_RECENT_ITEMS = 10


class MovieLensOptions(pydantic.BaseModel):
    """How MovieLens 100K is read as click events (the run config of ``click_events`` inherits these)."""

    movielens_path: str | None = Field(
        default=None,
        description="Directory of GroupLens's u.data/u.user/u.item or RecBole's ml-100k.inter/.user/.item "
        "(unset: TWOTOWER_MOVIELENS_PATH).",
    )
    movielens_recent_items: int = Field(
        default=10, ge=0, description="Length of the user_recent_items feature (earlier ratings, newest first)."
    )


class MovieLensFormatError(ValueError):
    """MovieLens files that cannot be read; the message names the file (and line)."""


@dataclass(frozen=True)
class MovieLens:
    """Ratings, users and items; every id is a string, every rating's ids are known."""

    ratings: pa.Table
    users: pa.Table
    items: pa.Table
    source: str = ""

    @property
    def num_ratings(self) -> int:
        return self.ratings.num_rows


# ----------------------------------------------------------------------------- reading


def detect_format(path: str | Path) -> str:
    """``"grouplens"`` (u.data) or ``"recbole"`` (*.inter) for a data directory."""
    path = Path(path)
    if not path.is_dir():
        raise MovieLensFormatError(
            f"MovieLens directory {path} does not exist (download ml-100k.zip from {DOWNLOAD_URL} "
            "and unzip it, or use RecBole's ml-100k atomic files)"
        )
    if (path / "u.data").is_file():
        return "grouplens"
    if sorted(path.glob("*.inter")):
        return "recbole"
    raise MovieLensFormatError(
        f"{path} holds neither GroupLens's u.data/u.user/u.item nor RecBole's "
        f"<name>.inter/.user/.item files (download from {DOWNLOAD_URL})"
    )


def load_movielens(path: str | Path) -> MovieLens:
    """Read a MovieLens 100K directory in either layout (see the module docstring)."""
    path = Path(path)
    data = _load_grouplens(path) if detect_format(path) == "grouplens" else _load_recbole(path)
    _check_references(data)
    return data


def _read_lines(file: Path, encoding: str) -> list[tuple[int, str]]:
    if not file.is_file():
        raise MovieLensFormatError(f"missing MovieLens file {file}")
    text = file.read_text(encoding=encoding)
    return [(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _split(file: Path, number: int, line: str, separator: str, fields: int) -> list[str]:
    parts = line.split(separator)
    if len(parts) != fields:
        raise MovieLensFormatError(
            f"{file}, line {number}: expected {fields} {separator!r}-separated fields, found {len(parts)}"
        )
    return parts


def _integer(file: Path, number: int, field: str, value: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        raise MovieLensFormatError(f"{file}, line {number}: {field} {value!r} is not a number") from None


def _id(file: Path, number: int, field: str, value: str) -> str:
    """An id exactly as the file spells it, or an error naming the id and its line.

    Ids are data: one stripped here ('trail ' -> 'trail') is a different id from the one
    serving is asked about, so it would score 0. Ids with whitespace are refused rather than
    kept, because ``user_recent_items`` is a space-separated list of item ids and an id with
    a space cannot round-trip through it (docs/decisions.md, "Ids are data").
    """
    if not value or any(char.isspace() for char in value):
        raise MovieLensFormatError(
            f"{file}, line {number}: {field} {value!r} is empty or contains whitespace; ids are used "
            "exactly as written and must not (fix the id in the file)"
        )
    return value


def _unique_ids(file: Path, field: str, ids: list[tuple[int, str]]) -> None:
    """Each id once per file; a repeat names the id and both lines."""
    first_line: dict[str, int] = {}
    for number, value in ids:
        if value in first_line:
            raise MovieLensFormatError(
                f"{file}: duplicate {field} {value!r} on line {first_line[value]} and line {number}"
            )
        first_line[value] = number


def _year(value: str) -> int | None:
    """The four-digit year in a release date or year field, or None (e.g. 'unknown')."""
    found = re.search(r"(\d{4})", value or "")
    return int(found.group(1)) if found else None


def _ratings_table(file: Path, rows: list[tuple[int, list[str]]]) -> pa.Table:
    if not rows:
        raise MovieLensFormatError(f"{file} has no ratings")
    return pa.table(
        {
            "user_id": [_id(file, n, "user_id", parts[0]) for n, parts in rows],
            "item_id": [_id(file, n, "item_id", parts[1]) for n, parts in rows],
            "rating": [_integer(file, n, "rating", parts[2]) for n, parts in rows],
            "timestamp": [_integer(file, n, "timestamp", parts[3]) for n, parts in rows],
        },
        schema=RATING_SCHEMA,
    )


def _users_table(file: Path, rows: list[tuple[int, list[str]]]) -> pa.Table:
    user_ids = [(n, _id(file, n, "user_id", parts[0])) for n, parts in rows]
    _unique_ids(file, "user_id", user_ids)
    return pa.table(
        {
            "user_id": [user_id for _, user_id in user_ids],
            "age": [_integer(file, n, "age", parts[1]) for n, parts in rows],
            "gender": [parts[2].strip() for _, parts in rows],
            "occupation": [parts[3].strip() for _, parts in rows],
            "zip_code": [parts[4].strip() for _, parts in rows],
        },
        schema=USER_SCHEMA,
    )


_TITLE_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


def _title_year(title: str) -> int | None:
    """The year of a title ending in "(1995)" (not any number in it: "2001: A Space Odyssey")."""
    found = _TITLE_YEAR.search(title)
    return int(found.group(1)) if found else None


def _load_grouplens(path: Path) -> MovieLens:
    data_file, user_file, item_file = path / "u.data", path / "u.user", path / "u.item"
    ratings = _ratings_table(
        data_file, [(n, _split(data_file, n, line, "\t", 4)) for n, line in _read_lines(data_file, "utf-8")]
    )
    users = _users_table(
        user_file, [(n, _split(user_file, n, line, "|", 5)) for n, line in _read_lines(user_file, "latin-1")]
    )
    items = {"item_id": [], "title": [], "genres": [], "release_year": []}
    item_lines = []
    flags = len(GROUPLENS_GENRES)
    for number, line in _read_lines(item_file, "latin-1"):
        parts = _split(item_file, number, line, "|", 5 + flags)
        genre_flags = parts[5:]
        if any(flag not in ("0", "1") for flag in genre_flags):
            raise MovieLensFormatError(f"{item_file}, line {number}: genre flags must be 0 or 1")
        title = parts[1].strip()
        items["item_id"].append(_id(item_file, number, "item_id", parts[0]))
        item_lines.append(number)
        # RecBole's title drops the "(1995)" suffix; drop it here too so both layouts agree.
        items["title"].append(_TITLE_YEAR.sub("", title))
        items["genres"].append(" ".join(g for g, flag in zip(GROUPLENS_GENRES, genre_flags) if flag == "1"))
        # The title's year, as RecBole's release_year; the release date when the title has none.
        items["release_year"].append(_title_year(title) or _year(parts[2]))
    _unique_ids(item_file, "item_id", list(zip(item_lines, items["item_id"])))
    return MovieLens(ratings, users, pa.table(items, schema=ITEM_SCHEMA), source=str(path))


def _recbole_rows(file: Path, required: dict[str, str]) -> list[dict[str, str]]:
    """Rows of an atomic file as dicts keyed by the wanted output names.

    Attribute values are whitespace-stripped; ids (``*_id``) are kept exactly (checked by
    :func:`_id` where they are read).
    """
    lines = _read_lines(file, "utf-8")
    if not lines:
        raise MovieLensFormatError(f"{file} is empty (expected a header line)")
    header = [field.split(":", 1)[0].strip() for field in lines[0][1].split("\t")]
    missing = [name for name in required if name not in header]
    if missing:
        raise MovieLensFormatError(f"{file}: header has no field {missing} (header: {header})")
    positions = {out: header.index(name) for name, out in required.items()}
    rows = []
    for number, line in lines[1:]:
        parts = _split(file, number, line, "\t", len(header))
        rows.append(
            {"_line": number, **{out: parts[i] if out.endswith("_id") else parts[i].strip() for out, i in positions.items()}}
        )
    return rows


def _one_file(path: Path, suffix: str) -> Path:
    found = sorted(path.glob(f"*.{suffix}"))
    if len(found) != 1:
        raise MovieLensFormatError(f"{path}: expected one *.{suffix} file, found {[f.name for f in found]}")
    return found[0]


def _load_recbole(path: Path) -> MovieLens:
    inter_file = _one_file(path, "inter")
    stem = inter_file.stem
    user_file, item_file = path / f"{stem}.user", path / f"{stem}.item"
    inter = _recbole_rows(
        inter_file, {"user_id": "user_id", "item_id": "item_id", "rating": "rating", "timestamp": "timestamp"}
    )
    ratings = _ratings_table(
        inter_file,
        [(r["_line"], [r["user_id"], r["item_id"], r["rating"], r["timestamp"]]) for r in inter],
    )
    user_rows = _recbole_rows(
        user_file,
        {"user_id": "user_id", "age": "age", "gender": "gender", "occupation": "occupation", "zip_code": "zip_code"},
    )
    users = _users_table(
        user_file,
        [(r["_line"], [r["user_id"], r["age"], r["gender"], r["occupation"], r["zip_code"]]) for r in user_rows],
    )
    item_rows = _recbole_rows(
        item_file, {"item_id": "item_id", "movie_title": "title", "release_year": "release_year", "class": "genres"}
    )
    item_ids = [(r["_line"], _id(item_file, r["_line"], "item_id", r["item_id"])) for r in item_rows]
    _unique_ids(item_file, "item_id", item_ids)
    items = pa.table(
        {
            "item_id": [item_id for _, item_id in item_ids],
            "title": [_TITLE_YEAR.sub("", r["title"]) for r in item_rows],
            "genres": [r["genres"] for r in item_rows],
            # A few rows lack the year field but keep "(1995)" in the title.
            "release_year": [_year(r["release_year"]) or _title_year(r["title"]) for r in item_rows],
        },
        schema=ITEM_SCHEMA,
    )
    return MovieLens(ratings, users, items, source=str(path))


def _check_references(data: MovieLens) -> None:
    for table, key, what in ((data.users, "user_id", "users"), (data.items, "item_id", "items")):
        ids = table[key]  # unique: checked with line numbers when the file was read
        unknown = pc.filter(data.ratings[key], pc.invert(pc.is_in(data.ratings[key], value_set=ids)))
        if len(unknown):
            raise MovieLensFormatError(
                f"{data.source}: ratings refer to {pc.count_distinct(unknown).as_py()} {key} values "
                f"missing from the {what} file (first: {unknown[0].as_py()!r})"
            )


# ------------------------------------------------------------------------- click events


def recent_items(
    events_user: np.ndarray,
    events_time: np.ndarray,
    history_user: np.ndarray,
    history_item: np.ndarray,
    history_time: np.ndarray,
    k: int = DEFAULT_RECENT_ITEMS,
) -> list[str]:
    """For each event, the ``k`` items its user had in ``history`` strictly before its time.

    Newest first, space-separated (a text feature); ``""`` when there is none. Strictly
    before: ratings of the same second were submitted together, so none of them is known
    when another is made, and an event never sees itself. Events and history may be the same
    rows (the product's source) or differ (the bench: history = training ratings only).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    events_user = np.asarray(events_user).astype(str)
    history_user = np.asarray(history_user).astype(str)
    history_item = np.asarray(history_item).astype(str)
    events_time = np.asarray(events_time, dtype=np.int64)
    history_time = np.asarray(history_time, dtype=np.int64)
    if k == 0 or len(history_user) == 0:
        return [""] * len(events_user)
    users, history_codes = np.unique(history_user, return_inverse=True)
    order = np.lexsort((history_time, history_codes))
    sorted_codes, sorted_times, sorted_items = history_codes[order], history_time[order], history_item[order]
    block_start = np.searchsorted(sorted_codes, np.arange(len(users)), side="left")
    block_end = np.searchsorted(sorted_codes, np.arange(len(users)), side="right")
    event_codes = np.searchsorted(users, events_user)
    known = (event_codes < len(users)) & (users[np.minimum(event_codes, len(users) - 1)] == events_user)
    out = []
    for code, is_known, time in zip(event_codes, known, events_time):
        if not is_known:
            out.append("")
            continue
        start, end = block_start[code], block_end[code]
        stop = start + int(np.searchsorted(sorted_times[start:end], time, side="left"))
        out.append(" ".join(sorted_items[max(start, stop - k):stop][::-1]))
    return out


def _shift_days(timestamps: np.ndarray, end_date: dt.date | None) -> int:
    """Whole days to add so the last rating falls on ``end_date`` (0 keeps the real dates)."""
    if end_date is None:
        return 0
    last = dt.datetime.fromtimestamp(int(timestamps.max()), dt.UTC).date()
    return (end_date - last).days


def click_event_table(
    data: MovieLens,
    end_date: dt.date | None = None,
    recent_item_count: int = DEFAULT_RECENT_ITEMS,
) -> pa.Table:
    """Every rating as one click event (schema :data:`MOVIELENS_EVENT_SCHEMA`), time-ordered.

    Dates and hours are UTC. ``end_date`` shifts every event by the same whole number of
    days so the last rating falls on that date (MovieLens is from 1997-98; the asset graph's
    training dates are recent), keeping gaps, hours and order; weekdays and months move with
    the shift. ``user_recent_items`` is computed over all ratings (causal, see
    :func:`recent_items`).
    """
    ratings = data.ratings.sort_by([("timestamp", "ascending"), ("user_id", "ascending"), ("item_id", "ascending")])
    times = ratings["timestamp"].to_numpy()
    shifted = times + _shift_days(times, end_date) * 86_400
    stamps = pa.array(shifted * 1_000_000, pa.timestamp("us", tz="UTC"))
    user_rows = pc.index_in(ratings["user_id"], value_set=data.users["user_id"])
    item_rows = pc.index_in(ratings["item_id"], value_set=data.items["item_id"])
    users = data.users.take(user_rows)
    items = data.items.take(item_rows)
    genres = pc.fill_null(items["genres"], "")
    first_genre = pc.list_element(pc.split_pattern(genres, " ", max_splits=1), 0)
    user_ids = ratings["user_id"].to_numpy(zero_copy_only=False)
    columns = {
        "event_date": pc.cast(stamps, pa.date32()),
        "user_id": ratings["user_id"],
        "item_id": ratings["item_id"],
        "event_hour": pc.cast(pc.hour(stamps), pa.int64()),
        "event_day": pc.cast(pc.day_of_week(stamps, count_from_zero=False, week_start=1), pa.int64()),
        "event_month": pc.cast(pc.month(stamps), pa.string()),
        "event_timestamp": pa.array(shifted, pa.int64()),
        "rating": ratings["rating"],
        "user_age": users["age"],
        "user_gender": users["gender"],
        "user_occupation": users["occupation"],
        "user_zip_prefix": pc.utf8_slice_codeunits(users["zip_code"], 0, ZIP_PREFIX_LENGTH),
        "user_recent_items": pa.array(
            recent_items(
                user_ids, times, user_ids, ratings["item_id"].to_numpy(zero_copy_only=False), times,
                recent_item_count,
            ),
            pa.string(),
        ),
        "item_title": items["title"],
        "item_genres": items["genres"],
        "item_release_year": items["release_year"],
        "offer_category_id": pc.if_else(pc.equal(first_genre, ""), pa.scalar(None, pa.string()), first_genre),
    }
    return pa.table(
        [columns[name] for name in MOVIELENS_EVENT_SCHEMA.names], schema=MOVIELENS_EVENT_SCHEMA
    )
