"""The retrieval server (``python -m twotower_assets.serving``) as a real process on 127.0.0.1,
loading ``models:/two_tower_retriever@champion`` from a sqlite MLflow registry.

Its answers must equal the registered pyfunc's for the same requests (so clients switch by
port), filters must give the hand-computed rankings below, every bad request must get a 4xx
naming the problem, and the alias must be followed: promotion and rollback under a request
loop without a failed request or an answer mixing versions, broken versions refused while
the served one keeps answering.

Hand-computed rankings (the tiny catalogue of tests/helpers/retriever.py; its docstring in
tests/test_retriever.py works out the scores). u1 scores i01 8, i02 4, i03 2, i04 1, i05 12,
i06 6, i07 3, i08 9, i09 10, i10 5, i11 14, i12 85 and saw i12 and i05. Category "a" is
i01..i06, "b" i07..i12; subcategory "odd"/"even" by the item's number
(tests/helpers/retrieval_server.py). Version 2 doubles every user vector, so its user scores
are twice version 1's: an answer's scores tell which version produced it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import mlflow
import pandas as pd
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from helpers.retrieval_server import Registry, retrieval_server, terminate
from helpers.retriever import BAD_PAYLOADS, request
from twotower_assets.serving.retriever import REGISTERED_MODEL_NAME

pytestmark = pytest.mark.slow  # starts servers

U1_TOP3 = {"item_ids": ["i11", "i09", "i08"], "scores": [14.0, 10.0, 9.0], "source": "user"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    registry = Registry.create(tmp_path_factory.mktemp("retrieval-server"))
    assert registry.log("v1") == "1"
    assert registry.log("v2", user_scale=2.0) == "2"
    registry.promote("1")
    return registry


@pytest.fixture(scope="module")
def server(registry):
    # Pinned to what it loads first: the tests that move the alias start servers of their own.
    with retrieval_server(registry.tracking_uri, registry.directory / "server.log", "--poll-interval", "3600") as server:
        yield server


def predictions(server, *rows) -> list[dict]:
    response = server.post("/invocations", {"dataframe_records": list(rows)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == response.headers["X-Model-Version"] == "1"
    return body["predictions"]


# ------------------------------------------------------------------ same answers as the pyfunc

GOOD_REQUESTS = [
    request("u1", k=4), request("u1", k=4, exclude_seen=False), request("u2", k=3), request(item_id="i12", k=3),
    request("u-new", k=3), request("u7", k=3), request(item_id="i99", k=2), request("u1", k=12),
]


def test_invocations_answers_what_the_registered_model_answers_in_process(server, registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    in_process = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL_NAME}@champion")
    expected = in_process.predict(pd.DataFrame(GOOD_REQUESTS)).to_dict(orient="records")
    assert predictions(server, *GOOD_REQUESTS) == expected
    assert predictions(server, {"user_id": "u1", "k": 3}) == [U1_TOP3]


def test_records_split_and_inputs_give_the_same_answers(server):
    sparse = [{"user_id": "u1", "k": 4}, {"item_id": "i12", "k": 3}, {"user_id": "u1", "k": 4, "exclude_seen": False}]
    expected = predictions(server, *sparse)
    split = {"dataframe_split": {"columns": ["user_id", "item_id", "k", "exclude_seen"],
                                 "data": [["u1", None, 4, None], [None, "i12", 3, None], ["u1", None, 4, False]]}}
    assert server.post("/invocations", split).json()["predictions"] == expected
    assert server.post("/invocations", {"inputs": sparse}).json()["predictions"] == expected
    assert server.post("/invocations", {"instances": sparse}).json()["predictions"] == expected


def test_the_lean_path_answers_one_request_or_a_list(server):
    one = server.post("/recommend", {"user_id": "u1", "k": 3})
    assert one.status_code == 200, one.text
    assert one.json() == {**U1_TOP3, "model_version": "1"}
    several = server.post("/recommend", {"requests": [{"user_id": "u1", "k": 3}, {"item_id": "i12", "k": 1}]})
    assert several.json() == {"results": [U1_TOP3, {"item_ids": ["i11"], "scores": [14.0], "source": "item"}],
                              "model_version": "1"}


# ------------------------------------------------------------------ filters, by hand

FILTERED = {
    # Unseen category-a items of u1: i01 8, i06 6, i02 4, i03 2, i04 1.
    "category a": ({"user_id": "u1", "k": 3, "filters": {"offer_category_id": "a"}},
                   (["i01", "i06", "i02"], [8.0, 6.0, 4.0], "user")),
    "k items when k exist": ({"user_id": "u1", "k": 5, "filters": {"offer_category_id": "a"}},
                             (["i01", "i06", "i02", "i03", "i04"], [8.0, 6.0, 4.0, 2.0, 1.0], "user")),
    "fewer only when fewer exist": ({"user_id": "u1", "k": 8, "filters": {"offer_category_id": "a"}},
                                    (["i01", "i06", "i02", "i03", "i04"], [8.0, 6.0, 4.0, 2.0, 1.0], "user")),
    # b and even: i08 9, i10 5, i12 (seen).
    "two attributes": ({"user_id": "u1", "k": 3, "filters": {"offer_category_id": "b", "offer_subcategory_id": "even"}},
                       (["i08", "i10"], [9.0, 5.0], "user")),
    "a list of values": ({"user_id": "u1", "k": 3, "filters": {"offer_category_id": ["a", "b"]}},
                         (["i11", "i09", "i08"], [14.0, 10.0, 9.0], "user")),
    "allowed ids (unknown ones ignored)": ({"user_id": "u1", "k": 3, "allowed_item_ids": ["i04", "i03", "i99"]},
                                           (["i03", "i04"], [2.0, 1.0], "user")),
    "excluded ids": ({"user_id": "u1", "k": 2, "excluded_item_ids": ["i11"]}, (["i09", "i08"], [10.0, 9.0], "user")),
    "allowed and excluded": ({"user_id": "u1", "k": 3, "allowed_item_ids": ["i01", "i02", "i03"],
                              "excluded_item_ids": ["i01"]}, (["i02", "i03"], [4.0, 2.0], "user")),
    # i12's neighbours score like u1's; i12 itself is left out, seen items are not (no user).
    "an item's neighbours in a category": ({"item_id": "i12", "k": 3, "filters": {"offer_category_id": "a"}},
                                           (["i05", "i01", "i06"], [12.0, 8.0, 6.0], "item")),
    # Popular order i05 i12 i07 i01 i03, then the rest by id; b: i12 0.25, i07 0.2, i08 0.0.
    "popular items in a category": ({"user_id": "u-new", "k": 3, "filters": {"offer_category_id": "b"}},
                                    (["i12", "i07", "i08"], [0.25, 0.2, 0.0], "popular")),
    "popular items minus excluded ones": ({"user_id": "u-new", "k": 2, "excluded_item_ids": ["i05"]},
                                          (["i12", "i07"], [0.25, 0.2], "popular")),
}


@pytest.mark.parametrize("row, expected", FILTERED.values(), ids=FILTERED.keys())
def test_filters_narrow_the_candidates_before_the_top_k_is_cut(server, row, expected):
    item_ids, scores, source = expected
    assert predictions(server, row) == [{"item_ids": item_ids, "scores": scores, "source": source}]
    lean = server.post("/recommend", row).json()
    assert (lean["item_ids"], lean["scores"], lean["source"]) == expected


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("payload, message", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_a_bad_invocation_gets_400_naming_the_problem_as_mlflow_serve_does(server, payload, message):
    response = server.post("/invocations", payload)
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert message in response.json()["message"]
    assert predictions(server, {"user_id": "u2", "k": 1}) == [{"item_ids": ["i12"], "scores": [32.0], "source": "user"}]


BAD_FILTERS = {
    "unknown attribute": ({"user_id": "u1", "k": 3, "filters": {"colour": "red"}},
                          "requests[0]: filters: unknown item attribute 'colour'; the attributes are "
                          "offer_category_id, offer_subcategory_id"),
    "attribute value not a string": ({"user_id": "u1", "k": 3, "filters": {"offer_category_id": 5}},
                                     "requests[0]: filters: offer_category_id must be a string or a non-empty "
                                     "list of strings, got int 5"),
    "filters not an object": ({"user_id": "u1", "k": 3, "filters": "a"},
                              "requests[0]: filters must be an object of attribute: value(s), got str 'a'"),
    "allowed ids not a list": ({"user_id": "u1", "k": 3, "allowed_item_ids": "i01"},
                               "requests[0]: allowed_item_ids must be a list of item ids, got str 'i01'"),
    "an empty excluded id": ({"user_id": "u1", "k": 3, "excluded_item_ids": ["i01", ""]},
                             "requests[0]: excluded_item_ids must hold non-empty strings, got str ''"),
    "too many ids": ({"user_id": "u1", "k": 3, "allowed_item_ids": ["i01"] * 10_001},
                     "requests[0]: allowed_item_ids lists 10001 ids, more than the limit of 10000"),
}


@pytest.mark.parametrize("row, message", BAD_FILTERS.values(), ids=BAD_FILTERS.keys())
def test_a_bad_filter_gets_400_naming_it(server, row, message):
    for route, payload in (("/invocations", {"dataframe_records": [row]}), ("/recommend", row)):
        response = server.post(route, payload)
        assert response.status_code == 400, response.text
        assert response.json() == {"error_code": "INVALID_PARAMETER_VALUE", "message": message}


def test_the_lean_path_refuses_unknown_fields_and_other_bodies(server):
    misspelt = server.post("/recommend", {"userId": "u1", "k": 3})
    assert misspelt.status_code == 400
    assert misspelt.json()["message"].startswith("requests[0]: unknown fields ['userId']; the fields are user_id, ")
    assert server.post("/recommend", [1, 2]).json()["message"] == (
        'the body must be one request object or {"requests": [request objects]}'
    )
    assert server.post("/recommend", "{").json()["error_code"] == "BAD_REQUEST"


def test_wrong_content_type_and_oversized_bodies_are_refused(server):
    response = server.post("/invocations", '{"dataframe_records": []}', content_type="text/plain")
    assert response.status_code == 415
    assert response.json()["message"] == "This server only supports Content-Type application/json. Got 'text/plain'."
    huge = b'{"dataframe_records": [' + b'{"user_id": "u1", "k": 3},' * 200_000 + b'{"user_id": "u1", "k": 3}]}'
    response = server.post("/invocations", huge)
    assert response.status_code == 413
    assert response.json()["message"] == (
        f"the body has {len(huge)} bytes, above the limit of 4194304 bytes; send smaller batches"
    )
    assert predictions(server, {"user_id": "u1", "k": 3}) == [U1_TOP3]


# ------------------------------------------------------------------ operations


def test_health_ready_and_prometheus_metrics(server):
    assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/ready", timeout=10).json() == {"ready": True, "model_version": "1"}
    health = server.health()
    assert (health["status"], health["model_version"], health["model"]) == (
        "serving", "1", "models:/two_tower_retriever@champion"
    )
    assert health["served"] == {"version": "1", "users": 6, "items": 12, "dimension": 4, "search": "exact",
                                "item_attributes": ["offer_category_id", "offer_subcategory_id"],
                                "max_k": 12, "max_batch": 1000}
    before = _samples(server)
    predictions(server, {"user_id": "u1", "k": 3})
    server.post("/invocations", {"dataframe_records": [{"user_id": "u1", "k": 0}]})
    after = _samples(server)
    ok = ("retrieval_requests_total", (("route", "/invocations"), ("status", "200")))
    bad = ("retrieval_errors_total", (("error_code", "INVALID_PARAMETER_VALUE"), ("route", "/invocations")))
    assert after[ok] - before.get(ok, 0) == 1
    assert after[bad] - before.get(bad, 0) == 1
    assert after[("retrieval_model_version", ())] == 1.0
    count = ("retrieval_request_seconds_count", (("route", "/invocations"),))
    assert after[count] - before.get(count, 0) == 2


def _samples(server) -> dict:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_not_ready_until_the_alias_names_a_version_then_serves_it(tmp_path):
    registry = Registry.create(tmp_path)
    registry.log("v1")
    with retrieval_server(registry.tracking_uri, tmp_path / "server.log", "--poll-interval", "0.2",
                          wait_ready=False) as server:
        assert requests.get(f"{server.url}/ready", timeout=10).status_code == 503
        response = server.post("/invocations", {"dataframe_records": [{"user_id": "u1", "k": 3}]})
        assert (response.status_code, response.json()["error_code"]) == (503, "MODEL_NOT_LOADED")
        health = server.wait_for(lambda h: h["last_poll_error"] is not None, "a failed look at the registry")
        assert "champion" in health["last_poll_error"]
        registry.promote("1")
        server.wait_for(lambda h: h["model_version"] == "1", "version 1 served")
        assert requests.get(f"{server.url}/ready", timeout=10).status_code == 200
        # SIGTERM stops it cleanly, as an orchestrator stopping a replica does: uvicorn finishes
        # the requests in flight, runs the shutdown (the follower stops), then exits by the
        # signal it caught (-15), as it does since 0.29.
        assert terminate(server.process) == -signal.SIGTERM
        events = [e["event"] for e in server.logged_events()]
        assert events[-3:] == ["stopped", "Application shutdown complete.", f"Finished server process [{server.process.pid}]"]


# ------------------------------------------------------------------ following the alias


class RequestLoop:
    """Client threads posting u1's top 3 without pause; every answer kept with its version."""

    def __init__(self, url: str, clients: int = 4):
        self.url = url
        self.answers: list[tuple[int, str, list[float]]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                response = session.post(f"{self.url}/recommend", json={"user_id": "u1", "k": 3}, timeout=30)
            except requests.RequestException as error:
                self.failures.append(repr(error))
                continue
            if response.status_code != 200:
                self.failures.append(f"{response.status_code} {response.text}")
                continue
            body = response.json()
            self.answers.append((time.monotonic_ns(), body["model_version"], body["scores"]))

    def __enter__(self) -> RequestLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_promotion_and_rollback_under_a_request_loop_switch_versions_without_a_failure(registry, tmp_path):
    with retrieval_server(registry.tracking_uri, tmp_path / "server.log", "--poll-interval", "0.2") as server:
        with RequestLoop(server.url) as loop:
            time.sleep(1.0)
            registry.promote("2")
            server.wait_for(lambda h: h["model_version"] == "2", "version 2 served after the promotion")
            time.sleep(1.0)
            registry.promote("1")  # the rollback
            server.wait_for(lambda h: h["model_version"] == "1", "version 1 served after the rollback")
            time.sleep(1.0)
        assert loop.failures == []
        expected_scores = {"1": [14.0, 10.0, 9.0], "2": [28.0, 20.0, 18.0]}
        mixed = [(v, s) for _, v, s in loop.answers if s != expected_scores[v]]
        assert mixed == []
        # Versions in answer order: 1, then 2, then 1 again.
        runs = [v for i, (_, v, _) in enumerate(sorted(loop.answers)) if i == 0 or sorted(loop.answers)[i - 1][1] != v]
        assert runs[0] == "1" and runs[-1] == "1" and "2" in runs
        counts = Counter(v for _, v, _ in loop.answers)
        assert counts["1"] > 0 and counts["2"] > 0
        assert server.health()["swaps"] == 2
        swapped = [e for e in server.logged_events() if e["event"] == "swapped"]
        assert [(e["previous"], e["version"]) for e in swapped] == [("1", "2"), ("2", "1")]


def test_a_version_that_cannot_load_or_fails_the_probe_is_refused_and_the_old_one_keeps_serving(registry, tmp_path):
    wrong_dimensions = registry.log("wrong-dimensions", broken_users="dimensions")
    nan_vectors = registry.log("nan-vectors", broken_users="nan")
    registry.promote("1")
    with retrieval_server(registry.tracking_uri, tmp_path / "server.log", "--poll-interval", "0.2") as server:
        with RequestLoop(server.url, clients=2) as loop:
            for version, reason in ((wrong_dimensions, "load failed: MlflowException: the user vectors have 3 "
                                                        "dimensions and the item index 4"),
                                    (nan_vectors, "probe failed: ProbeFailed: 6 of 6 user vectors hold NaN")):
                registry.promote(version)
                health = server.wait_for(lambda h, v=version: v in h["refused"], f"version {version} refused")
                assert health["refused"][version].startswith(reason)
                assert health["model_version"] == "1"
                response = server.post("/recommend", {"user_id": "u1", "k": 3})
                assert response.json() == {**U1_TOP3, "model_version": "1"}
                refusal = [e for e in server.logged_events() if e["event"] == "refused" and e["version"] == version]
                assert refusal and refusal[0]["reason"].startswith(reason) and refusal[0]["serving"] == "1"
            time.sleep(0.5)
        assert loop.failures == []
        assert {v for _, v, _ in loop.answers} == {"1"}
        metrics = _samples(server)
        assert metrics[("retrieval_model_refusals_total", ())] == 2
        assert metrics[("retrieval_model_version", ())] == 1.0
    registry.promote("1")


def test_a_pinned_version_is_served_whatever_the_alias_says(registry, tmp_path):
    with retrieval_server(registry.tracking_uri, tmp_path / "server.log", "--model",
                          f"models:/{REGISTERED_MODEL_NAME}/2", "--poll-interval", "0.2") as server:
        assert server.post("/recommend", {"user_id": "u1", "k": 3}).json() == {
            **U1_TOP3, "scores": [28.0, 20.0, 18.0], "model_version": "2"
        }
        assert server.health()["model"] == f"models:/{REGISTERED_MODEL_NAME}/2"


@pytest.mark.parametrize("arguments, environment, message", [
    ([], {"MLFLOW_TRACKING_URI": ""},
     "set MLFLOW_TRACKING_URI (or --tracking-uri) to the registry the model is registered in"),
    (["--model", "two_tower_retriever@champion"], {"MLFLOW_TRACKING_URI": "sqlite:///unused.db"},
     "model 'two_tower_retriever@champion': give models:/<name>@<alias> or models:/<name>/<version>"),
    (["--poll-interval", "0"], {"MLFLOW_TRACKING_URI": "sqlite:///unused.db"},
     "poll_interval_s must be above 0, got 0.0"),
], ids=["no registry", "not a models URI", "poll interval zero"])
def test_bad_settings_stop_the_server_before_it_listens_with_a_message(arguments, environment, message, tmp_path):
    finished = subprocess.run(
        [sys.executable, "-m", "twotower_assets.serving", "--port", "1", *arguments],
        env={**os.environ, **environment}, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert (finished.returncode, finished.stderr.strip().splitlines()[-1]) == (2, message)
    assert list(tmp_path.iterdir()) == []  # nothing written, no store created
