"""The tiny retriever catalogue, logged into a real sqlite MLflow store.

Twelve items and six users whose dot products can be ranked by hand (tests/test_retriever.py's
docstring works them out); tests/test_retriever.py and tests/test_model_serving.py load it back
in process and behind ``mlflow models serve``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient

from twotower_assets.serving.ann_index import ItemIndex
from twotower_assets.serving.retriever import log_retriever

ITEM_VECTORS = {
    "i01": [1, 0, 0, 0],  # u1: 8   u2: 1
    "i02": [0, 1, 0, 0],  # u1: 4   u2: 2
    "i03": [0, 0, 1, 0],  # u1: 2   u2: 4
    "i04": [0, 0, 0, 1],  # u1: 1   u2: 8
    "i05": [1, 1, 0, 0],  # u1: 12  u2: 3
    "i06": [0, 1, 1, 0],  # u1: 6   u2: 6
    "i07": [0, 0, 1, 1],  # u1: 3   u2: 12
    "i08": [1, 0, 0, 1],  # u1: 9   u2: 9
    "i09": [1, 0, 1, 0],  # u1: 10  u2: 5
    "i10": [0, 1, 0, 1],  # u1: 5   u2: 10
    "i11": [1, 1, 1, 0],  # u1: 14  u2: 7
    "i12": [8, 4, 2, 1],  # u1: 85  u2: 32
}
USER_VECTORS = {
    "u1": [8, 4, 2, 1],
    "u2": [1, 2, 4, 8],
    "u3": [1, 1, 1, 1],
    "u4": [0.5, 0, 0, 0],
    "u5": [0, 0, 0.5, 0],
    "u6": [-1, 0, 0, 1],
}
# u7 saw items in training but has no vector (the model dropped it): popular items, seen removed.
SEEN = {
    "u1": ["i12", "i05"],
    "u2": ["i07"],
    "u3": ["i05", "i07", "i01", "i12"],
    "u4": ["i05", "i12", "i03"],
    "u5": ["i05", "i12", "i07", "i01"],
    "u6": ["i05", "i12", "i07", "i01"],
    "u7": ["i05", "i03"],
}

VERSION_TAGS = {"train_date": "2026-06-01", "dagster_run_id": "test-run"}


@dataclass(frozen=True)
class LoggedRetriever:
    tracking_uri: str
    run_id: str
    model_uri: str
    version: str


def write_catalogue(directory: Path) -> dict:
    """The tiny catalogue's files, as log_retriever takes them."""
    directory.mkdir(parents=True, exist_ok=True)
    item_ids = np.array(list(ITEM_VECTORS))
    index_uri = str(directory / "item_index")
    ItemIndex.build(index_uri, item_ids, np.array(list(ITEM_VECTORS.values()), dtype=np.float32))

    users_path = directory / "user_vectors.parquet"
    embedding = pa.FixedSizeListArray.from_arrays(
        pa.array(np.array(list(USER_VECTORS.values()), dtype=np.float32).ravel()), 4
    )
    pq.write_table(pa.table({"user_id": list(USER_VECTORS), "embedding": embedding}), users_path)

    seen_path = directory / "seen_pairs.parquet"
    pairs = [(user, item) for user, items in SEEN.items() for item in items]
    pq.write_table(
        pa.table({"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs]}), seen_path
    )
    return {
        "user_embeddings_path": users_path,
        "item_index_uri": index_uri,
        "seen_pairs_path": seen_path,
        "popular_items": dict(Counter(item for _, item in pairs)),
    }


def log_tiny_retriever(directory: Path) -> LoggedRetriever:
    """The tiny catalogue logged into a fresh sqlite store in ``directory``: version 1."""
    tracking_uri = f"sqlite:///{directory / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment(
        "two_tower", artifact_location=(directory / "mlartifacts").as_uri()
    )
    run_id = client.create_run(experiment_id, run_name="training").info.run_id
    model_uri, version = log_retriever(
        tracking_uri, run_id, **write_catalogue(directory / "catalogue"), tags=VERSION_TAGS
    )
    return LoggedRetriever(tracking_uri, run_id, model_uri, version)


def request(user_id=None, item_id=None, k=3, exclude_seen=None) -> dict:
    return {"user_id": user_id, "item_id": item_id, "k": k, "exclude_seen": exclude_seen}


# (payload, what the 400 body's message must say), posted to /invocations of both servers
# (tests/test_model_serving.py, tests/test_retrieval_server.py). What MLflow's scoring server does
# before predict: it reads the JSON into a DataFrame (malformed JSON and unknown top-level keys are
# refused there), then checks the signature (a missing k column is refused there), then
# predict checks each request.
BAD_PAYLOADS = {
    "not JSON": ('{"dataframe_records": [', "Ensure that input is a valid JSON formatted string"),
    "no known top-level key": ({"requests": [{"user_id": "u1", "k": 3}]}, "dataframe_records"),
    "k missing": ({"dataframe_records": [{"user_id": "u1"}]}, "Model is missing inputs ['k']"),
    "k missing in one request": (
        {"dataframe_records": [{"user_id": "u1", "k": 2}, {"user_id": "u2"}]}, "requests[1]: k is missing"
    ),
    "k null": ({"dataframe_records": [{"user_id": "u1", "k": None}]}, "requests[0]: k is missing"),
    "both ids": (
        {"dataframe_records": [{"user_id": "u1", "item_id": "i01", "k": 3}]},
        "requests[0]: both user_id ('u1') and item_id ('i01') are given; give exactly one",
    ),
    "neither id": ({"dataframe_records": [{"k": 3}]}, "requests[0]: neither user_id nor item_id is given; give exactly one"),
    "k zero": ({"dataframe_records": [{"user_id": "u1", "k": 0}]}, "requests[0]: k=0 is below 1"),
    "k negative": ({"dataframe_records": [{"user_id": "u1", "k": -2}]}, "requests[0]: k=-2 is below 1"),
    "k above the catalogue": (
        {"dataframe_records": [{"item_id": "i01", "k": 13}]}, "requests[0]: k=13 is above the catalogue size (12 items)"
    ),
    "k fractional": ({"dataframe_records": [{"user_id": "u1", "k": 2.5}]}, "requests[0]: k must be an integer, got float 2.5"),
    "k a string": ({"dataframe_records": [{"user_id": "u1", "k": "3"}]}, "requests[0]: k must be an integer, got str '3'"),
    "k a boolean": ({"dataframe_records": [{"user_id": "u1", "k": True}]}, "requests[0]: k must be an integer, got bool True"),
    "user_id a number": ({"dataframe_records": [{"user_id": 5, "k": 3}]}, "requests[0]: user_id must be a string, got int 5"),
    "user_id a list": (
        {"dataframe_records": [{"user_id": ["u1"], "k": 3}]}, "requests[0]: user_id must be a string, got list ['u1']"
    ),
    "item_id empty": ({"dataframe_records": [{"item_id": "", "k": 3}]}, "requests[0]: item_id is an empty string"),
    "exclude_seen a string": (
        {"dataframe_records": [{"user_id": "u1", "k": 3, "exclude_seen": "false"}]},
        "requests[0]: exclude_seen must be true or false, got str 'false'",
    ),
    "exclude_seen a number": (
        {"dataframe_records": [{"user_id": "u1", "k": 3, "exclude_seen": 0}]},
        "requests[0]: exclude_seen must be true or false, got int 0",
    ),
    "10,000 requests": (
        {"dataframe_records": [{"user_id": "u1", "k": 3}] * 10_000},
        "a batch of 10000 requests is above the limit of 1000 requests per call; send smaller batches",
    ),
}
