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
from helpers.retriever import BAD_PAYLOADS, LoggedRetriever, log_tiny_retriever, request
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
