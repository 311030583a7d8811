"""One registered version of the retriever, loaded for the retrieval server.

The server does not call the pyfunc's ``predict``: that takes and returns pandas DataFrames,
which cost more than the search itself. It reads the very files the version was logged with
(the MLmodel's artifacts: user vectors, item index, seen pairs, popular items, settings and,
when logged, item attributes) through :class:`TwoTowerRetriever`'s own loader, and answers
plain dicts with the same checks, the same search and the same fallbacks, so an answer
equals the pyfunc's for the same request. On top of that it applies a request's filters
(:mod:`twotower_assets.serving.candidates`) and chooses exact search or the ANN index by
catalogue size.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from twotower_assets.serving.candidates import (
    FILTER_FIELDS,
    CandidateFilter,
    ItemAttributes,
    allowed_mask,
    check_filter,
)
from twotower_assets.serving.retriever import (
    FEATURE_CONFIG,
    ITEM_ATTRIBUTES,
    USER_TOWER,
    REQUEST_COLUMNS,
    TwoTowerRetriever,
    check_request,
    problems_message,
)

FRESH_FIELDS = ("recent_item_ids", "user_features")
"""A request with either gets its user vector from the user tower at request time (user_encoder.py)."""
REQUEST_FIELDS = REQUEST_COLUMNS + FILTER_FIELDS + FRESH_FIELDS

DEFAULT_EXACT_MAX_ELEMENTS = 8_000_000
"""Exact search while items x dimensions is at most this (125,000 items at 64 dimensions).

Measured through the server at 200,000 x 64 (bench/serving_server.py, docs/benchmarks-serving.md):
an exact request cost 2.7-2.9 server CPU ms, one through the LanceDB index 1.6-2.3 ms at
recall@10 1.000, nearly all of it LanceDB's fixed cost per call. Exact search grows with the
catalogue and that fixed cost does not, so they cross near 9M elements; below it exact costs
no more and has recall 1 by construction. At the quickstart's 1,000 x 64 an exact request is
0.02 ms of search."""

PROBE_USERS = 64
"""Users the probe asks for (evenly spread over the user file), besides one item and one
unknown user."""


class BadRequest(ValueError):
    """A request the client got wrong; the server answers 400 with this message."""


class ProbeFailed(RuntimeError):
    """A loaded version that gives wrong answers; it is not served."""


class Retrieval:
    """Answers retrieval requests from one model version's data; safe for concurrent callers."""

    def __init__(self, version: str, model: TwoTowerRetriever, attributes: ItemAttributes, *, exact: bool,
                 encoder=None):
        self.encoder = encoder  # the user tower (UserEncoder), when the version carries it
        self.version = version
        self.model = model
        self.attributes = attributes
        self.exact = exact
        self.item_position = {item_id: i for i, item_id in enumerate(model.index.item_ids.tolist())}
        self.popular_positions = np.array([self.item_position[i] for i in model.popular_item_ids], np.int64)

    @classmethod
    def load(cls, model_dir: str | Path, version: str, *, exact_max_elements: int = DEFAULT_EXACT_MAX_ELEMENTS) -> Retrieval:
        """Read the downloaded model version in ``model_dir`` (its MLmodel and artifacts)."""
        import mlflow

        model_dir = Path(model_dir)
        flavor = mlflow.models.Model.load(str(model_dir)).flavors.get("python_function", {})
        listed = flavor.get("artifacts") or {}
        if not listed:
            raise ValueError(f"{model_dir}: the MLmodel lists no artifacts; this is not a retriever version")
        artifacts = {name: str(model_dir / entry["path"]) for name, entry in listed.items()}
        model = TwoTowerRetriever()
        model.load_context(SimpleNamespace(artifacts=artifacts))
        table = pq.read_table(artifacts[ITEM_ATTRIBUTES]) if ITEM_ATTRIBUTES in artifacts else None
        item_position = {item_id: i for i, item_id in enumerate(model.index.item_ids.tolist())}
        exact = len(model.index) * model.index.dimension <= exact_max_elements
        encoder = None
        if USER_TOWER in artifacts and FEATURE_CONFIG in artifacts:
            from twotower_assets.serving.user_encoder import UserEncoder

            encoder = UserEncoder(artifacts[USER_TOWER], artifacts[FEATURE_CONFIG], model.catalogue)
        return cls(version, model, ItemAttributes(item_position, table), exact=exact, encoder=encoder)

    # ---------------------------------------------------------------- facts

    def describe(self) -> dict[str, Any]:
        """What /health reports about this version."""
        index = self.model.index.info()
        return {
            "version": self.version,
            "users": len(self.model.user_rows),
            "items": self.model.catalogue_size,
            "dimension": self.model.index.dimension,
            "search": "exact" if self.exact or index["index_type"] == "FLAT" else index["index_type"],
            "item_attributes": self.attributes.names,
            "max_k": self.model.max_k,
            "max_batch": self.model.max_batch,
        }

    # ---------------------------------------------------------------- requests

    def check(self, rows: list[dict]) -> list[tuple[dict, CandidateFilter]]:
        """Every request of the batch checked, or one BadRequest naming each bad one."""
        model = self.model
        if len(rows) > model.max_batch:
            raise BadRequest(
                f"a batch of {len(rows)} requests is above the limit of {model.max_batch} "
                "requests per call; send smaller batches"
            )
        problems: list[str] = []
        checked = []
        for position, row in enumerate(rows):
            fresh = {name: row.get(name) for name in FRESH_FIELDS if row.get(name) is not None}
            if fresh and self.encoder is None:
                request, problem = {}, (f"{' and '.join(fresh)}: this version has no user tower to run at request "
                                        "time; send user_id alone")
            elif fresh and row.get("item_id") is not None:
                request, problem = {}, f"{' and '.join(fresh)} go with a user, not with item_id"
            elif fresh:
                problem = self.encoder.check(fresh.get("user_features"), fresh.get("recent_item_ids"))
                request, checked_problem = check_request({**row, "user_id": row.get("user_id") or "(request)"},
                                                         model.max_k, model.catalogue_size)
                problem = problem or checked_problem
                if problem is None:
                    request = {**request, "user_id": row.get("user_id"), "fresh": fresh}
            else:
                request, problem = check_request(row, model.max_k, model.catalogue_size)
            if problem is None:
                candidate_filter, problem = check_filter(row, self.attributes)
            if problem:
                problems.append(f"requests[{position}]: {problem}")
            else:
                checked.append((request, candidate_filter))
        if problems:
            raise BadRequest(problems_message(problems))
        return checked

    def answer(self, checked: list[tuple[dict, CandidateFilter]]) -> list[dict]:
        """One ``{item_ids, scores, source}`` per checked request, in order."""
        model = self.model
        results: list[dict | None] = [None] * len(checked)
        masks = [allowed_mask(f, self.item_position, self.attributes) for _, f in checked]

        by_request = [i for i, (r, _) in enumerate(checked) if "fresh" in r]
        if by_request:
            encoded = [self.encoder.vector(checked[i][0]["user_id"], checked[i][0]["fresh"].get("user_features"),
                                           checked[i][0]["fresh"].get("recent_item_ids")) for i in by_request]
            exclude = [self._excluded(*checked[i]) | (frozenset(checked[i][0]["fresh"].get("recent_item_ids") or ())
                                                      if checked[i][0]["exclude_seen"] else frozenset())
                       for i in by_request]
            self._search(by_request, checked, np.stack([v for v, _ in encoded]), exclude, masks, "request", results)
            for i, (_, ignored) in zip(by_request, encoded, strict=True):
                if ignored:
                    results[i]["ignored_item_ids"] = ignored

        by_user = [i for i, (r, _) in enumerate(checked) if "fresh" not in r and r["user_id"] in model.user_rows]
        if by_user:
            vectors = model.user_vectors[[model.user_rows[checked[i][0]["user_id"]] for i in by_user]]
            exclude = [self._excluded(*checked[i]) for i in by_user]
            self._search(by_user, checked, vectors, exclude, masks, "user", results)

        by_item = [i for i, (r, _) in enumerate(checked) if "fresh" not in r and r["item_id"] in model.catalogue]
        if by_item:
            vectors = model.index.vectors_of([checked[i][0]["item_id"] for i in by_item])
            exclude = [self._excluded(*checked[i]) | {checked[i][0]["item_id"]} for i in by_item]
            self._search(by_item, checked, vectors, exclude, masks, "item", results)

        for i, (request, candidate_filter) in enumerate(checked):
            if results[i] is None:
                results[i] = self._popular(request["k"], self._excluded(request, candidate_filter), masks[i])
        return results

    def _excluded(self, request: dict, candidate_filter: CandidateFilter) -> frozenset[str]:
        seen = self.model._excluded_seen(request)
        if candidate_filter.excluded_item_ids:
            return seen | frozenset(candidate_filter.excluded_item_ids)
        return seen

    def _search(self, batch, checked, vectors, exclude, masks, source, results) -> None:
        index = self.model.index
        if self.exact and len(batch) == 1:
            # One request (the common call): the index's lean single-query path.
            (i,) = batch
            item_ids, scores = index.exact_one(
                np.asarray(vectors[0], dtype=np.float32), checked[i][0]["k"], index.positions_of(exclude[0]), masks[i]
            )
            results[i] = {"item_ids": item_ids, "scores": scores, "source": source}
            return
        # One index call for the batch: the top max(k) per query, each cut to its own k.
        largest_k = max(checked[i][0]["k"] for i in batch)
        allowed = [masks[i] for i in batch]
        found = self.model.index.search(
            np.asarray(vectors, dtype=np.float32), largest_k, exclude,
            allowed=allowed if any(m is not None for m in allowed) else None, exact=self.exact,
        )
        for i, (item_ids, scores) in zip(batch, found, strict=True):
            k = checked[i][0]["k"]
            results[i] = {"item_ids": item_ids[:k], "scores": scores[:k], "source": source}

    def _popular(self, k: int, exclude: frozenset[str], mask: np.ndarray | None) -> dict:
        model = self.model
        order = range(len(self.popular_positions)) if mask is None else np.flatnonzero(mask[self.popular_positions])
        item_ids, shares = [], []
        for rank in order:
            item_id = model.popular_item_ids[rank]
            if item_id in exclude:
                continue
            item_ids.append(item_id)
            shares.append(model.popular_shares[rank])
            if len(item_ids) == k:
                break
        return {"item_ids": item_ids, "scores": shares, "source": "popular"}

    # ---------------------------------------------------------------- probe

    def probe(self) -> None:
        """Raise ProbeFailed unless this version's vectors are finite and sample requests are
        answered well: a spread of users, one item and one unknown user, each with
        min(k, what exists) items from the catalogue and finite scores."""
        model = self.model
        bad_users = int((~np.isfinite(model.user_vectors).all(axis=1)).sum())
        if bad_users:
            raise ProbeFailed(f"{bad_users} of {len(model.user_vectors)} user vectors hold NaN or infinite values")
        k = min(10, model.max_k)
        user_ids = list(model.user_rows)
        step = max(1, len(user_ids) // PROBE_USERS)
        rows = [{"user_id": u, "k": k, "exclude_seen": False} for u in user_ids[::step][:PROBE_USERS]]
        rows.append({"item_id": str(model.index.item_ids[0]), "k": k})
        unknown = "\x00probe-unknown-user"
        rows.append({"user_id": unknown, "k": k, "exclude_seen": False})
        try:
            answers = self.answer(self.check(rows))
        except Exception as error:  # noqa: BLE001 (any failure refuses the version)
            raise ProbeFailed(f"a probe request failed: {type(error).__name__}: {error}") from error
        expected = [("user", k)] * (len(rows) - 2) + [("item", min(k, model.catalogue_size - 1)), ("popular", k)]
        for row, answer, (source, length) in zip(rows, answers, expected, strict=True):
            asked = row.get("user_id", row.get("item_id"))
            if answer["source"] != source or len(answer["item_ids"]) != length:
                raise ProbeFailed(
                    f"probe {asked!r}: expected {length} items from {source!r}, got "
                    f"{len(answer['item_ids'])} from {answer['source']!r}"
                )
            if not all(math.isfinite(s) for s in answer["scores"]):
                raise ProbeFailed(f"probe {asked!r}: scores that are not finite: {answer['scores']}")
            if any(i not in self.item_position for i in answer["item_ids"]):
                raise ProbeFailed(f"probe {asked!r}: items outside the catalogue: {answer['item_ids']}")
