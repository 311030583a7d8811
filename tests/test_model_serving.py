"""The retriever behind a real ``mlflow models serve`` process on 127.0.0.1.

The registered version gets the ``champion`` alias and the server is started the way the docs
say (``-m models:/two_tower_retriever@champion --env-manager local``), with the tracking URI of
a sqlite store in a temporary directory. Answers must equal the in-process model's; every bad
request must get a 4xx whose body names the problem, and the server must keep answering.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

from helpers.model_server import mlflow_models_serve
from helpers.retriever import LoggedRetriever, log_tiny_retriever, request
from twotower_assets.serving.retriever import REGISTERED_MODEL_NAME, set_alias

pytestmark = pytest.mark.slow  # starts mlflow models serve


@dataclass(frozen=True)
class Server:
    url: str
    logged: LoggedRetriever
    log_path: Path

    def invoke(self, payload) -> requests.Response:
        data = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
        return requests.post(
            f"{self.url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=60
        )

    def records(self, *rows: dict) -> list[dict]:
        response = self.invoke({"dataframe_records": list(rows)})
        assert response.status_code == 200, response.text
        return response.json()["predictions"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("serving")
    logged = log_tiny_retriever(directory)
    set_alias(MlflowClient(tracking_uri=logged.tracking_uri), REGISTERED_MODEL_NAME, "champion", logged.version)
    log_path = directory / "server.log"
    with mlflow_models_serve(f"models:/{REGISTERED_MODEL_NAME}@champion", logged.tracking_uri, log_path) as url:
        yield Server(url, logged, log_path)


@pytest.fixture(scope="module")
def in_process(server):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", server.logged.tracking_uri)
        return mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL_NAME}@champion")


GOOD_REQUESTS = [
    request("u1", k=4),
    request("u1", k=4, exclude_seen=False),
    request("u2", k=3),
    request(item_id="i12", k=3),
    request("u-new", k=3),
    request("u7", k=3),
    request(item_id="i99", k=2),
]


def test_the_server_answers_what_the_model_answers_in_process(server, in_process):
    served = server.records(*GOOD_REQUESTS)
    assert served == in_process.predict(pd.DataFrame(GOOD_REQUESTS)).to_dict(orient="records")
    # Hand-computed in test_retriever.py: u1 without its seen i12 and i05, i12's neighbours.
    assert served[0] == {"item_ids": ["i11", "i09", "i08", "i01"], "scores": [14.0, 10.0, 9.0, 8.0], "source": "user"}
    assert served[3] == {"item_ids": ["i11", "i05", "i09"], "scores": [14.0, 12.0, 10.0], "source": "item"}
    assert served[4] == {"item_ids": ["i05", "i12", "i07"], "scores": [0.3, 0.25, 0.2], "source": "popular"}


def test_records_without_the_optional_fields_split_and_inputs_give_the_same_answers(server):
    # Leaving keys out is how a client sends a user request or an item request.
    sparse = [{"user_id": "u1", "k": 4}, {"item_id": "i12", "k": 3}, {"user_id": "u1", "k": 4, "exclude_seen": False}]
    expected = server.records(request("u1", k=4), request(item_id="i12", k=3), request("u1", k=4, exclude_seen=False))
    assert server.records(*sparse) == expected
    split = {"dataframe_split": {"columns": ["user_id", "item_id", "k", "exclude_seen"],
                                 "data": [["u1", None, 4, None], [None, "i12", 3, None], ["u1", None, 4, False]]}}
    assert server.invoke(split).json()["predictions"] == expected
    assert server.invoke({"inputs": sparse}).json()["predictions"] == expected


def test_the_logged_input_example_is_served(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.logged.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_MODEL_NAME}@champion", dst_path=str(tmp_path)))
    response = server.invoke((local / "serving_input_example.json").read_text())
    assert response.status_code == 200, response.text
    assert [row["source"] for row in response.json()["predictions"]] == ["user", "item"]


# (payload, what the 400 body's message must say). What the scoring server does before
# predict: it reads the JSON into a DataFrame (malformed JSON and unknown top-level keys are
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


@pytest.mark.parametrize("payload, message", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_a_bad_request_gets_400_naming_the_problem_and_the_server_keeps_serving(server, payload, message):
    response = server.invoke(payload)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert message in body["message"]
    assert server.records(request("u2", k=1)) == [{"item_ids": ["i12"], "scores": [32.0], "source": "user"}]


def test_a_batch_of_max_batch_requests_is_answered(server):
    predictions = server.records(*[request("u1", k=1)] * 1000)
    assert len(predictions) == 1000
    assert {tuple(p["item_ids"]) for p in predictions} == {("i11",)}
