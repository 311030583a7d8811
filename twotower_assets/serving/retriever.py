"""The two-tower retriever as an MLflow pyfunc model, served by ``mlflow models serve``.

One model version holds everything a request needs: the user vectors, the item index
(:class:`~twotower_assets.serving.ann_index.ItemIndex`), the items each user saw in training,
the items ranked by training popularity and the request limits. :func:`log_retriever` logs it
into a training run, registers a version and tags it; promotion (the ``champion`` alias) is done
elsewhere, and the server follows the alias: ``models:/two_tower_retriever@champion``.

Requests are rows of a table (``dataframe_records`` / ``dataframe_split`` / ``inputs`` over
HTTP), at most ``max_batch`` (default 1,000) per call:

=========================  ==================================================================
``user_id`` (string)       top ``k`` items for this user, or
``item_id`` (string)       the ``k`` items most similar to this item (exactly one of the two)
``k`` (integer, required)  how many items, 1 to ``max_k`` (default: the catalogue size);
                           a whole float (3.0) counts as that integer
``exclude_seen`` (bool)    user requests: drop the items the user saw in training (default
                           true)
=========================  ==================================================================

Each request gets one row: ``item_ids`` (best first), ``scores`` and ``source``:

* ``"user"``: a user with a vector. Items are ranked by the dot product with the user vector
  (exact scores); with ``exclude_seen`` the user's training items are left out, so the list
  is shorter than ``k`` only when fewer unseen items exist.
* ``"item"``: an item of the catalogue. Items are ranked by the dot product with the item's
  vector, the item itself always left out (so at most catalogue size - 1 items).
  ``exclude_seen`` has no meaning without a user and is ignored.
* ``"popular"``: a user with no vector, or an item that is not in the catalogue (a new item
  has no vector either). The items with the most training interactions, scored by their
  share of all training interactions (so scores sum to at most 1 and say how popular the
  item is, not how well it matches). For a user that has seen items but no vector, the seen
  items are still left out when ``exclude_seen`` is true.

A bad request is an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``; the scoring server
answers it with HTTP 400 and the message. MLflow's signature check runs before
:meth:`TwoTowerRetriever.predict` and refuses a batch with no ``k`` column itself (also 400);
``predict`` checks everything else, per request, and names each bad request by its position
(``requests[3]``). docs/serving.md lists what the server answers to each bad request.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import AnyType, Array

from twotower_assets.serving.registry import log_registered_pyfunc, requirements

REGISTERED_MODEL_NAME = "two_tower_retriever"
LOGGED_MODEL_NAME = "retriever"
DESCRIPTION = (
    "The retriever of the two-tower retrieval model (TensorFlow Recommenders): the user vectors, an "
    "ANN index of the item vectors, each user's training items and the popular items of one training "
    "date. One version per training date, logged by the twotower-assets Dagster graph; served by "
    "`python -m twotower_assets.serving` or `mlflow models serve`.\n\n"
    "Input: rows of `user_id` or `item_id` (strings), `k` (integer) and optionally `exclude_seen`. "
    "Output per row: `item_ids` (best first), `scores` and `source` (`user`: the user's vector; "
    "`item`: the item's neighbours; `popular`: the most popular items, for an id the model does not "
    "know).\n\n"
    "The alias `champion` names the version served; only the graph's quality gate moves it (with the "
    "`two_tower_match` version of the same training run), or the `rollback_champion` job. Each "
    "version's model page carries the evaluation of the vectors it serves (`recall_at_50`, `ndcg_at_10`)."
)
"""The registered model's description in the registry."""
DEFAULT_MAX_BATCH = 1_000
# Bad requests listed in one error message; the rest are counted.
MAX_PROBLEMS_SHOWN = 10

REQUEST_COLUMNS = ("user_id", "item_id", "k", "exclude_seen")
RESULT_COLUMNS = ("item_ids", "scores", "source")

# The keys of ``context.artifacts``.
USER_VECTORS = "user_vectors"
ITEM_INDEX = "item_index"
SEEN_PAIRS = "seen_pairs"
POPULAR_ITEMS = "popular_items"
SETTINGS = "settings"
ITEM_ATTRIBUTES = "item_attributes"
"""Optional: item attributes (category, subcategory, ...) the retrieval server filters on."""
USER_TOWER = "user_tower"
"""Optional: the user tower (SavedModel) the retrieval server runs on a request's features and recent items."""
FEATURE_CONFIG = "feature_config"
"""Optional, with the user tower: the feature config it was trained with."""
CHECKSUMS = "checksums"
"""SHA-256 of every other artifact file, recorded at registration and verified by every load."""

# The models-from-code entry point logged with the model; MLflow runs it to get the model.
MODEL_ENTRY_CODE = """\
import mlflow

from twotower_assets.serving.retriever import TwoTowerRetriever

mlflow.models.set_model(TwoTowerRetriever())
"""

# What the model imports when it is served. TensorFlow is not among them: serving reads
# vectors, never the Keras towers.
SERVING_REQUIREMENTS = ("mlflow", "lancedb", "pandas", "numpy", "pyarrow")

# k and exclude_seen are declared Any, not long and boolean: before predict the scoring server
# casts each JSON column to its declared type with pandas' astype, which turns k=2.5 into 2,
# k=true into 1, exclude_seen="false" into true and a missing exclude_seen into true or false
# depending on the JSON (NaN or null). As Any they arrive as sent and predict checks them.
# The id columns are cast to object, which changes nothing, so they keep their string type.
INPUT_SCHEMA = Schema([
    ColSpec(DataType.string, "user_id", required=False),
    ColSpec(DataType.string, "item_id", required=False),
    ColSpec(AnyType(), "k"),
    ColSpec(AnyType(), "exclude_seen", required=False),
])
OUTPUT_SCHEMA = Schema([
    ColSpec(Array(DataType.string), "item_ids"),
    ColSpec(Array(DataType.double), "scores"),
    ColSpec(DataType.string, "source"),
])
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA)


def bad_request(message: str) -> MlflowException:
    """The error a client caused; the scoring server answers it with HTTP 400 and ``message``."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _is_missing(value: Any) -> bool:
    # A record without the key arrives as None (object columns) or NaN (numeric columns).
    if value is None or value is pd.NA:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _is_integer(value: Any) -> bool:
    # bool is an int subclass in Python and numpy; a true/false k is a type error, not k=1.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (3 or 3.0), else None.

    3.0 counts: JSON does not tell 3 from 3.0 apart once pandas has read it, and a batch where
    one request leaves k out turns the whole column into floats (2 becomes 2.0).
    """
    if _is_integer(value):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


class TwoTowerRetriever(mlflow.pyfunc.PythonModel):
    """Top-k items for users and similar items for items, from the two-tower vectors."""

    def load_context(self, context) -> None:
        from twotower_assets.lib.checksums import verify_artifacts
        from twotower_assets.serving.ann_index import ItemIndex

        if CHECKSUMS in context.artifacts:  # versions registered with their checksums
            listed = json.loads(Path(context.artifacts[CHECKSUMS]).read_text())
            verify_artifacts(context.artifacts, listed, "the retriever's files")
        settings = json.loads(Path(context.artifacts[SETTINGS]).read_text())
        self.max_batch = int(settings["max_batch"])
        self.index = ItemIndex.open(context.artifacts[ITEM_INDEX])
        self.catalogue_size = len(self.index)
        self.max_k = int(settings.get("max_k") or self.catalogue_size)
        self.catalogue = set(self.index.item_ids.tolist())

        user_ids, self.user_vectors = read_user_vectors(context.artifacts[USER_VECTORS])
        if self.user_vectors.shape[1] != self.index.dimension:
            raise MlflowException(
                f"the user vectors have {self.user_vectors.shape[1]} dimensions and the item "
                f"index {self.index.dimension}; they must come from the same model"
            )
        self.user_rows = {user_id: row for row, user_id in enumerate(user_ids)}

        seen = pq.read_table(context.artifacts[SEEN_PAIRS], columns=["user_id", "item_id"]).to_pandas()
        self.seen_items: dict[str, frozenset[str]] = {
            user_id: frozenset(items)
            for user_id, items in seen.groupby("user_id", sort=False)["item_id"]
        }

        popular = json.loads(Path(context.artifacts[POPULAR_ITEMS]).read_text())
        self.popular_item_ids: list[str] = popular["item_ids"]
        self.popular_shares: list[float] = popular["shares"]

    # --- requests -----------------------------------------------------------------------

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        requests = self._checked_requests(model_input)
        results: list[tuple[list[str], list[float], str] | None] = [None] * len(requests)

        by_user = [(i, r) for i, r in enumerate(requests) if r["user_id"] in self.user_rows]
        if by_user:
            vectors = self.user_vectors[[self.user_rows[r["user_id"]] for _, r in by_user]]
            self._search(by_user, vectors, [self._excluded_seen(r) for _, r in by_user], "user", results)

        by_item = [(i, r) for i, r in enumerate(requests) if r["item_id"] in self.catalogue]
        if by_item:
            vectors = self.index.vectors_of([r["item_id"] for _, r in by_item])
            itself = [frozenset([r["item_id"]]) for _, r in by_item]
            self._search(by_item, vectors, itself, "item", results)

        for i, request in enumerate(requests):
            if results[i] is None:
                results[i] = self._popular(request)

        return pd.DataFrame(results, columns=list(RESULT_COLUMNS))

    def _excluded_seen(self, request: dict) -> frozenset[str]:
        if request["user_id"] is None or not request["exclude_seen"]:
            return frozenset()
        return self.seen_items.get(request["user_id"], frozenset())

    def _search(self, batch, vectors, exclude, source, results) -> None:
        # One index call for the whole batch: the top max(k) per query, each cut to its own k
        # (the top k of a ranking is the first k of the top max(k)).
        largest_k = max(r["k"] for _, r in batch)
        found = self.index.search(np.asarray(vectors, dtype=np.float32), largest_k, exclude)
        for (i, request), (item_ids, scores) in zip(batch, found, strict=True):
            k = request["k"]
            results[i] = ([str(x) for x in item_ids[:k]], [float(s) for s in scores[:k]], source)

    def _popular(self, request: dict) -> tuple[list[str], list[float], str]:
        seen = self._excluded_seen(request)
        item_ids, shares = [], []
        for item_id, share in zip(self.popular_item_ids, self.popular_shares):
            if item_id in seen:
                continue
            item_ids.append(item_id)
            shares.append(share)
            if len(item_ids) == request["k"]:
                break
        return item_ids, shares, "popular"

    def _checked_requests(self, model_input) -> list[dict]:
        """The requests as dicts with every field filled in, or one error listing what is wrong."""
        if not isinstance(model_input, pd.DataFrame):
            raise bad_request(
                f"expected a table of requests with columns {', '.join(REQUEST_COLUMNS)}; "
                f"got {type(model_input).__name__}"
            )
        if len(model_input) > self.max_batch:
            raise bad_request(
                f"a batch of {len(model_input)} requests is above the limit of {self.max_batch} "
                "requests per call; send smaller batches"
            )
        unknown = [str(c) for c in model_input.columns if c not in REQUEST_COLUMNS]
        if unknown:
            # The scoring server's signature check drops unknown columns before predict; this
            # catches them when the model is called in-process without the signature.
            raise bad_request(
                f"unknown request fields {unknown}; the fields are {', '.join(REQUEST_COLUMNS)}"
            )
        if "k" not in model_input.columns:
            raise bad_request("the field 'k' is missing; every request needs k, the number of items")

        problems: list[str] = []
        requests = []
        for position, row in enumerate(model_input.to_dict(orient="records")):
            request, problem = check_request(row, self.max_k, self.catalogue_size)
            if problem:
                problems.append(f"requests[{position}]: {problem}")
            requests.append(request)
        if problems:
            raise bad_request(problems_message(problems))
        return requests


def problems_message(problems: Sequence[str]) -> str:
    """One message for the bad requests of a batch: the first few, then a count."""
    if len(problems) == 1:
        return problems[0]
    shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    hidden = len(problems) - MAX_PROBLEMS_SHOWN
    more = f" (and {hidden} more)" if hidden > 0 else ""
    return f"{len(problems)} bad requests: {shown}{more}"


def check_request(row: Mapping[str, Any], max_k: int, catalogue_size: int) -> tuple[dict, str | None]:
    """(the request with every field filled in, None), or ({}, what is wrong with it).

    ``row`` is one request as sent: a missing field is absent, None or NaN. The retrieval
    server checks its requests with this too, so both answer a bad request alike.
    """
    ids = {}
    for field in ("user_id", "item_id"):
        value = row.get(field)
        if _is_missing(value):
            ids[field] = None
        elif not isinstance(value, str):
            return {}, f"{field} must be a string, got {type(value).__name__} {value!r}"
        elif not value.strip():
            blank = "an empty string" if not value else f"only whitespace ({value!r})"
            return {}, f"{field} is {blank}"
        else:
            ids[field] = value
    if ids["user_id"] is not None and ids["item_id"] is not None:
        return {}, (
            f"both user_id ({ids['user_id']!r}) and item_id ({ids['item_id']!r}) are given; "
            "give exactly one"
        )
    if ids["user_id"] is None and ids["item_id"] is None:
        return {}, "neither user_id nor item_id is given; give exactly one"

    raw_k = row.get("k")
    if _is_missing(raw_k):
        return {}, "k is missing"
    k = _as_whole_number(raw_k)
    if k is None:
        return {}, f"k must be an integer, got {type(raw_k).__name__} {raw_k!r}"
    if k < 1:
        return {}, f"k={k} is below 1"
    if k > max_k:
        if max_k == catalogue_size:
            limit = f"the catalogue size ({catalogue_size} items)"
        else:
            limit = f"max_k ({max_k})"
        return {}, f"k={k} is above {limit}"

    exclude_seen = row.get("exclude_seen")
    if _is_missing(exclude_seen):
        exclude_seen = True
    elif not isinstance(exclude_seen, (bool, np.bool_)):
        got = f"{type(exclude_seen).__name__} {exclude_seen!r}"
        return {}, f"exclude_seen must be true or false, got {got}"
    return {**ids, "k": k, "exclude_seen": bool(exclude_seen)}, None


# --- artifacts --------------------------------------------------------------------------------


def read_user_vectors(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(user ids, float32 matrix of their vectors) from a ``user_id`` / ``embedding`` Parquet file."""
    check_user_vectors_schema(pq.read_schema(path), path)
    table = pq.read_table(path, columns=["user_id", "embedding"])
    user_ids = table.column("user_id").to_pylist()
    check_user_ids(user_ids, path)
    embedding = table.column("embedding").combine_chunks()
    if embedding.null_count:
        raise MlflowException(f"{path}: {embedding.null_count} user(s) have no embedding")
    vectors = embedding.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return user_ids, vectors.reshape(len(table), embedding.type.list_size)


def check_user_ids(user_ids: list, path) -> None:
    """No null, empty or repeated user id: each must name exactly one vector."""
    bad = [u for u in user_ids if u is None or not str(u).strip()]
    if bad:
        raise MlflowException(f"{path}: {len(bad)} user id(s) are null or empty")
    counts = Counter(user_ids)
    repeated = [u for u, n in counts.items() if n > 1]
    if repeated:
        raise MlflowException(
            f"{path}: {len(repeated)} user id(s) appear more than once, e.g. {repeated[0]!r}"
        )


def check_user_vectors_schema(schema: pa.Schema, path) -> None:
    problems = []
    if schema.get_field_index("user_id") < 0 or not pa.types.is_string(schema.field("user_id").type):
        problems.append("a string column 'user_id'")
    if (schema.get_field_index("embedding") < 0
            or not pa.types.is_fixed_size_list(schema.field("embedding").type)
            or schema.field("embedding").type.value_type != pa.float32()):
        problems.append("a fixed-size list<float32> column 'embedding'")
    if problems:
        raise MlflowException(
            f"{path}: the user vectors need {' and '.join(problems)}; the file has {schema}"
        )


def check_seen_pairs_schema(schema: pa.Schema, path) -> None:
    missing = [c for c in ("user_id", "item_id")
               if schema.get_field_index(c) < 0 or not pa.types.is_string(schema.field(c).type)]
    if missing:
        raise MlflowException(
            f"{path}: the seen pairs need string columns {missing}; the file has {schema}"
        )


def check_item_attributes(table: pa.Table, catalogue: set[str], path) -> None:
    """A string ``item_id`` column naming catalogue items once each, and string attributes."""
    schema = table.schema
    if schema.get_field_index("item_id") < 0 or not pa.types.is_string(schema.field("item_id").type):
        raise MlflowException(f"{path}: the item attributes need a string column 'item_id'; the file has {schema}")
    not_strings = [f.name for f in schema if f.name != "item_id" and not pa.types.is_string(f.type)]
    if not_strings or len(schema) < 2:
        raise MlflowException(
            f"{path}: item attributes must be string columns beside item_id; "
            f"{'not strings: ' + str(not_strings) if not_strings else 'there are none'}"
        )
    item_ids = table.column("item_id").to_pylist()
    unknown = sorted({i for i in item_ids if i not in catalogue}, key=str)
    if unknown:
        raise MlflowException(f"{path}: items not in the item index: {unknown[:10]}")
    if len(set(item_ids)) != len(item_ids):
        raise MlflowException(f"{path}: an item id appears more than once")


def popular_ranking(interactions: Mapping[str, int], catalogue: Sequence[str]) -> dict[str, list]:
    """Every catalogue item, most training interactions first (ties by id), with its share.

    Items nobody interacted with come last with share 0, so the fallback can fill any k up to
    the catalogue size.
    """
    unknown = sorted(set(interactions) - set(catalogue))
    if unknown:
        raise MlflowException(f"popular items not in the item index: {unknown[:10]}")
    bad = {item: count for item, count in interactions.items()
           if not _is_integer(count) or count < 0}
    if bad:
        raise MlflowException(
            f"interaction counts must be integers >= 0; got {dict(list(bad.items())[:10])}"
        )
    total = sum(int(c) for c in interactions.values())
    ranked = sorted(catalogue, key=lambda item: (-int(interactions.get(item, 0)), item))
    return {
        "item_ids": [str(item) for item in ranked],
        "shares": [int(interactions.get(item, 0)) / total if total else 0.0 for item in ranked],
    }


def example_requests(user_id: str, item_id: str, k: int) -> pd.DataFrame:
    """A user request and an item request: the logged input example."""
    return pd.DataFrame({
        "user_id": [user_id, None],
        "item_id": [None, item_id],
        "k": [k, k],
        "exclude_seen": [True, None],
    })


def log_retriever(
    tracking: str | MlflowClient,
    run_id: str,
    user_embeddings_path: str | os.PathLike,
    item_index_uri: str | os.PathLike,
    seen_pairs_path: str | os.PathLike,
    popular_items: Mapping[str, int],
    *,
    registered_model_name: str = REGISTERED_MODEL_NAME,
    tags: Mapping[str, str] | None = None,
    max_k: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    item_attributes_path: str | os.PathLike | None = None,
    user_tower_path: str | os.PathLike | None = None,
    feature_config_path: str | os.PathLike | None = None,
) -> tuple[str, str]:
    """Log the retriever into ``run_id``, register it and tag the version; (model URI, version).

    ``popular_items`` maps item ids to their training interaction counts. ``tags`` go on the
    logged model and the registered version. ``item_attributes_path``, optional, is a Parquet
    file of ``item_id`` and string attribute columns (e.g. ``offer_category_id``) that the
    retrieval server's filters read; ``predict`` does not use it. ``user_tower_path`` (the
    training's saved user tower) with ``feature_config_path`` lets the retrieval server compute
    a user's vector from a request's features and recent items. No alias is moved:
    promotion is not this step's decision. The model URI is ``models:/<name>/<version>``.
    """
    from twotower_assets.lib.checksums import artifact_checksums
    from twotower_assets.serving.ann_index import ItemIndex

    client = tracking if isinstance(tracking, MlflowClient) else MlflowClient(tracking_uri=tracking)
    index = ItemIndex.open(str(item_index_uri))
    if max_k is not None and not (1 <= max_k <= len(index)):
        raise ValueError(f"max_k={max_k} must be between 1 and the catalogue size {len(index)}")
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be at least 1")
    check_user_vectors_schema(pq.read_schema(user_embeddings_path), user_embeddings_path)
    check_seen_pairs_schema(pq.read_schema(seen_pairs_path), seen_pairs_path)
    user_ids = pq.read_table(user_embeddings_path, columns=["user_id"]).column("user_id").to_pylist()
    if not user_ids:
        raise MlflowException(f"{user_embeddings_path}: there are no users")
    check_user_ids(user_ids, user_embeddings_path)
    if (user_tower_path is None) != (feature_config_path is None):
        raise ValueError("give user_tower_path and feature_config_path together (the tower reads that config's columns)")
    if item_attributes_path is not None:
        check_item_attributes(pq.read_table(item_attributes_path), set(index.item_ids.tolist()), item_attributes_path)

    with tempfile.TemporaryDirectory(prefix="retriever-") as tmp:
        tmp = Path(tmp)
        popular = popular_ranking(popular_items, index.item_ids.tolist())
        (tmp / "popular_items.json").write_text(json.dumps(popular))
        (tmp / "settings.json").write_text(json.dumps({"max_k": max_k, "max_batch": max_batch}))
        artifacts = {
            USER_VECTORS: str(user_embeddings_path),
            ITEM_INDEX: str(item_index_uri),
            SEEN_PAIRS: str(seen_pairs_path),
            POPULAR_ITEMS: str(tmp / "popular_items.json"),
            SETTINGS: str(tmp / "settings.json"),
            **({ITEM_ATTRIBUTES: str(item_attributes_path)} if item_attributes_path is not None else {}),
            **({USER_TOWER: str(user_tower_path), FEATURE_CONFIG: str(feature_config_path)}
               if user_tower_path is not None else {}),
        }
        # Recorded with the version, verified by every load (both servers): a changed file in
        # the model store is refused, naming it, instead of answering from corrupted vectors.
        (tmp / "checksums.json").write_text(json.dumps(artifact_checksums(artifacts)))
        return log_registered_pyfunc(
            client,
            run_id,
            name=LOGGED_MODEL_NAME,
            entry_code=MODEL_ENTRY_CODE,
            artifacts={**artifacts, CHECKSUMS: str(tmp / "checksums.json")},
            signature=SIGNATURE,
            input_example=example_requests(user_ids[0], str(index.item_ids[0]), min(10, max_k or len(index))),
            registered_model_name=registered_model_name,
            pip_requirements=requirements(*SERVING_REQUIREMENTS),
            tags=tags,
            description=DESCRIPTION,
        )


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Point ``models:/<name>@<alias>`` at ``version`` (promotion and rollback)."""
    client.set_registered_model_alias(name, alias, version)
