"""Which items a request may be answered with: its filters, checked, and turned into a mask.

A request to the retrieval server may narrow its candidates with three optional fields:

===========================  ===============================================================
``allowed_item_ids`` (list)  only these items (ids outside the catalogue are ignored)
``excluded_item_ids`` (list) never these items
``filters`` (object)         item attributes: ``{"offer_category_id": "c1"}`` keeps the items
                             whose attribute is ``"c1"``; a list (``["c1", "c2"]``) keeps
                             either; several attributes must all match
===========================  ===============================================================

They are applied before the top k is cut, so a filtered answer has k items whenever k
allowed items exist. The attributes are the ones the model version was logged with
(``item_attributes``); a version without them refuses ``filters``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

FILTER_FIELDS = ("allowed_item_ids", "excluded_item_ids", "filters")
MAX_IDS_PER_LIST = 10_000
"""Ids one request may list in allowed_item_ids or excluded_item_ids: bounds the work a request
can ask for (a longer list is a catalogue subset worth an attribute)."""


@dataclass(frozen=True)
class CandidateFilter:
    """What a request's filter fields say, checked; None where the field was not given."""

    allowed_item_ids: tuple[str, ...] | None = None
    excluded_item_ids: tuple[str, ...] = ()
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def narrows(self) -> bool:
        """True when only some items are allowed (a mask is needed)."""
        return self.allowed_item_ids is not None or bool(self.attributes)


NO_FILTER = CandidateFilter()


class ItemAttributes:
    """Each attribute's values and the catalogue positions of the items that have them."""

    def __init__(self, item_position: Mapping[str, int], table: pa.Table | None):
        self.catalogue_size = len(item_position)
        self._positions: dict[str, dict[str, np.ndarray]] = {}
        if table is None:
            return
        rows = np.array([item_position[i] for i in table.column("item_id").to_pylist()], np.int64)
        for name in table.column_names:
            if name == "item_id":
                continue
            by_value: dict[str, list[int]] = {}
            for position, value in zip(rows.tolist(), table.column(name).to_pylist()):
                if value is not None:
                    by_value.setdefault(value, []).append(position)
            self._positions[name] = {v: np.asarray(p, np.int64) for v, p in by_value.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self._positions)

    def values(self, name: str) -> list[str]:
        return sorted(self._positions[name])

    def positions(self, name: str, values: tuple[str, ...]) -> np.ndarray:
        """Positions of the items whose ``name`` is one of ``values`` (unknown values: none)."""
        found = [self._positions[name][v] for v in values if v in self._positions[name]]
        return np.concatenate(found) if found else np.empty(0, np.int64)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _id_list(field: str, value: Any) -> tuple[tuple[str, ...] | None, str | None]:
    if _is_missing(value):
        return None, None
    if not isinstance(value, list):
        return None, f"{field} must be a list of item ids, got {type(value).__name__} {value!r}"
    if len(value) > MAX_IDS_PER_LIST:
        return None, f"{field} lists {len(value)} ids, more than the limit of {MAX_IDS_PER_LIST}"
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        return None, f"{field} must hold non-empty strings, got {type(bad[0]).__name__} {bad[0]!r}"
    return tuple(value), None


def check_filter(row: Mapping[str, Any], attributes: ItemAttributes) -> tuple[CandidateFilter, str | None]:
    """(the request's checked filter, None), or (NO_FILTER, what is wrong with it)."""
    allowed, problem = _id_list("allowed_item_ids", row.get("allowed_item_ids"))
    if problem:
        return NO_FILTER, problem
    excluded, problem = _id_list("excluded_item_ids", row.get("excluded_item_ids"))
    if problem:
        return NO_FILTER, problem

    raw = row.get("filters")
    conditions: list[tuple[str, tuple[str, ...]]] = []
    if not _is_missing(raw):
        if not isinstance(raw, dict):
            return NO_FILTER, f"filters must be an object of attribute: value(s), got {type(raw).__name__} {raw!r}"
        for name, wanted in raw.items():
            if name not in attributes.names:
                known = ", ".join(attributes.names) or "none: this model version carries no item attributes"
                return NO_FILTER, f"filters: unknown item attribute {name!r}; the attributes are {known}"
            values = [wanted] if isinstance(wanted, str) else wanted
            if not isinstance(values, list) or not values or any(not isinstance(v, str) for v in values):
                return NO_FILTER, (
                    f"filters: {name} must be a string or a non-empty list of strings, "
                    f"got {type(wanted).__name__} {wanted!r}"
                )
            conditions.append((name, tuple(values)))
    return CandidateFilter(allowed, excluded or (), tuple(conditions)), None


def allowed_mask(
    candidate_filter: CandidateFilter, item_position: Mapping[str, int], attributes: ItemAttributes
) -> np.ndarray | None:
    """Boolean mask over the catalogue of the items the filter allows; None when it allows all."""
    if not candidate_filter.narrows:
        return None
    mask = np.ones(attributes.catalogue_size, bool)
    if candidate_filter.allowed_item_ids is not None:
        mask[:] = False
        found = [item_position[i] for i in candidate_filter.allowed_item_ids if i in item_position]
        mask[np.asarray(found, np.int64)] = True
    for name, values in candidate_filter.attributes:
        matching = np.zeros(attributes.catalogue_size, bool)
        matching[attributes.positions(name, values)] = True
        mask &= matching
    return mask
