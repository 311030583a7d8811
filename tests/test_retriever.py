"""The retriever pyfunc, logged into a real sqlite MLflow store and loaded back by its
registered name: results against hand-computed rankings, and every bad request refused
with a message that names the problem.

The catalogue (tests/helpers/retriever.py) is built so every ranking can be read off by hand.
Items i01..i11 are distinct 0/1 vectors and i12 is (8, 4, 2, 1), so for user u1 = (8, 4, 2, 1)
the score of a 0/1 item is the item read as a binary number (i11 = 1110 scores 14) and i12
scores 64+16+4+1 = 85; user u2 = (1, 2, 4, 8) reads the bits the other way round (i07 = 0011
scores 4+8 = 12) and i12 scores 8+8+8+8 = 32. Similar items of i12 get the same scores as u1's
(i12 . x = u1 . x), no ties.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from helpers.retriever import VERSION_TAGS, LoggedRetriever, log_tiny_retriever, request, write_catalogue
from twotower_assets.serving import retriever as retriever_module
from twotower_assets.serving.retriever import REGISTERED_MODEL_NAME, log_retriever

# Training interactions from SEEN (the catalogue in helpers/retriever.py): i05 6, i12 5, i07 4,
# i01 3, i03 2, the rest 0; 20 in all. Popular order and shares: i05 0.3, i12 0.25, i07 0.2,
# i01 0.15, i03 0.1, then the items nobody saw by id with 0.0: i02 i04 i06 i08 i09 i10 i11.
POPULAR_ORDER = ["i05", "i12", "i07", "i01", "i03", "i02", "i04", "i06", "i08", "i09", "i10", "i11"]
POPULAR_SHARES = [0.3, 0.25, 0.2, 0.15, 0.1] + [0.0] * 7


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> LoggedRetriever:
    return log_tiny_retriever(tmp_path_factory.mktemp("retriever"))


@pytest.fixture(scope="module")
def retriever(logged):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
        return mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL_NAME}/1")


def answer(retriever, *requests: dict) -> list[dict]:
    return retriever.predict(pd.DataFrame(list(requests))).to_dict(orient="records")


def test_log_retriever_registers_version_1_with_its_tags_and_no_alias(logged):
    client = MlflowClient(tracking_uri=logged.tracking_uri)
    assert (logged.model_uri, logged.version) == (f"models:/{REGISTERED_MODEL_NAME}/1", "1")
    version = client.get_model_version(REGISTERED_MODEL_NAME, "1")
    assert {k: version.tags[k] for k in VERSION_TAGS} == VERSION_TAGS
    assert version.run_id == logged.run_id
    assert client.get_registered_model(REGISTERED_MODEL_NAME).aliases == {}
    # The version points at an MLflow 3 logged model named "retriever", an output of the
    # training run.
    model_id = version.source.removeprefix("models:/")
    assert model_id in [o.model_id for o in client.get_run(logged.run_id).outputs.model_outputs]
    logged_model = client.get_logged_model(model_id)
    assert (logged_model.name, logged_model.source_run_id) == ("retriever", logged.run_id)
    # In the run's experiment, its files under the experiment's artifact location (MLflow's
    # default would be experiment 0 in ./mlruns).
    assert logged_model.experiment_id == client.get_run(logged.run_id).info.experiment_id
    experiment = client.get_experiment(logged_model.experiment_id)
    assert logged_model.artifact_location.startswith(experiment.artifact_location)
    assert logged_model.status == LoggedModelStatus.READY
    assert {k: logged_model.tags[k] for k in VERSION_TAGS} == VERSION_TAGS


def test_logging_again_makes_version_2_and_leaves_the_processs_tracking_uri_alone(logged, tmp_path, monkeypatch):
    # log_retriever points MLflow's fluent API at the given store for the call only.
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    model_uri, version = log_retriever(
        logged.tracking_uri, logged.run_id, **write_catalogue(tmp_path / "catalogue"), tags=VERSION_TAGS
    )
    assert (model_uri, version) == (f"models:/{REGISTERED_MODEL_NAME}/2", "2")
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    assert mlflow.get_tracking_uri() == elsewhere
    assert not (tmp_path / "elsewhere.db").exists()


def test_the_registered_model_says_what_it_is_and_keeps_a_description_someone_wrote(tmp_path):
    """The registry's page of the model describes it (what it is, its input and output, who moves
    champion); a description someone wrote there instead is not overwritten by the next version."""
    (tmp_path / "first").mkdir()
    first = log_tiny_retriever(tmp_path / "first")
    client = MlflowClient(tracking_uri=first.tracking_uri)
    description = client.get_registered_model(REGISTERED_MODEL_NAME).description
    assert description == retriever_module.DESCRIPTION
    for said in ("two-tower", "Input: rows of `user_id` or `item_id`", "Output per row: `item_ids`",
                 "`champion`", "quality gate"):
        assert said in description, said
    client.update_registered_model(REGISTERED_MODEL_NAME, description="ours")
    log_retriever(first.tracking_uri, first.run_id, **write_catalogue(tmp_path / "again"), tags=VERSION_TAGS)
    assert client.get_registered_model(REGISTERED_MODEL_NAME).description == "ours"


def test_an_untagged_version_of_the_same_run_is_removed_when_the_run_registers_again(tmp_path, monkeypatch):
    """An attempt that died between registering and tagging left a version with no date (an
    orphan): the rerun of the same training run removes it, so versions stay paired by run;
    another run's untagged version is not this rerun's to remove."""
    logged = log_tiny_retriever(tmp_path)
    client = MlflowClient(tracking_uri=logged.tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)  # MLflow resolves a models:/ source globally
    first = client.get_model_version(REGISTERED_MODEL_NAME, logged.version)
    orphan = client.create_model_version(REGISTERED_MODEL_NAME, first.source, run_id=logged.run_id)
    assert "train_date" not in orphan.tags
    other_run = client.create_run(client.get_run(logged.run_id).info.experiment_id).info.run_id
    unrelated = client.create_model_version(REGISTERED_MODEL_NAME, first.source, run_id=other_run)
    _, version = log_retriever(logged.tracking_uri, logged.run_id, **write_catalogue(tmp_path / "again"),
                               tags=VERSION_TAGS)
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{REGISTERED_MODEL_NAME}'"))
    assert numbers == [1, int(unrelated.version), int(version)] and str(orphan.version) not in map(str, numbers)
    assert {k: client.get_model_version(REGISTERED_MODEL_NAME, version).tags[k] for k in VERSION_TAGS} == VERSION_TAGS


def test_a_changed_file_in_the_model_store_is_refused_by_every_loader_naming_it(tmp_path, monkeypatch):
    """16 flipped bytes in the index's data file used to load and answer with the wrong items."""
    from twotower_assets.lib.checksums import ArtifactIntegrityError
    from twotower_assets.serving.retrieval import Retrieval

    logged = log_tiny_retriever(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_MODEL_NAME}/1", dst_path=str(tmp_path / "ok")))
    Retrieval.load(local, "1")  # intact: loads
    [data] = [p for p in (tmp_path / "mlartifacts").rglob("*.lance") if p.is_file() and "/item_index/" in p.as_posix()]
    raw = bytearray(data.read_bytes())
    raw[100:116] = bytes(b ^ 0xFF for b in raw[100:116])
    data.write_bytes(bytes(raw))
    relative = data.as_posix().split("/item_index/", 1)[1]
    with pytest.raises(Exception, match=rf"artifact item_index, file {relative} does not match the SHA-256"):
        mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL_NAME}/1")
    changed = Path(mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_MODEL_NAME}/1", dst_path=str(tmp_path / "bad")))
    with pytest.raises(ArtifactIntegrityError, match="refusing to load it"):
        Retrieval.load(changed, "1")  # the retrieval server's loader: it keeps its previous version


def test_the_logged_model_carries_its_code_requirements_signature_and_example(logged, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_MODEL_NAME}/1", dst_path=str(tmp_path)))
    assert (local / "two_tower_retriever_model.py").is_file()  # models from code: no pickle
    assert (local / "code" / "twotower_assets" / "serving" / "retriever.py").is_file()
    requirements = (local / "requirements.txt").read_text().split()
    # What serving imports, pinned; not TensorFlow.
    assert sorted(r.split("==")[0] for r in requirements) == ["lancedb", "mlflow", "numpy", "pandas", "pyarrow"]
    signature = mlflow.models.Model.load(str(local)).signature
    assert [(c.name, c.required) for c in signature.inputs.inputs] == [
        ("user_id", False), ("item_id", False), ("k", True), ("exclude_seen", False)
    ]
    assert signature.outputs.input_names() == ["item_ids", "scores", "source"]
    # One user and one item request (test_model_serving.py posts it to the server).
    example = json.loads((local / "serving_input_example.json").read_text())["dataframe_split"]
    assert example["columns"] == ["user_id", "item_id", "k", "exclude_seen"]
    assert example["data"] == [["u1", None, 10, True], [None, "i01", 10, None]]


def test_a_fresh_process_runs_the_code_logged_with_the_model(logged, tmp_path):
    # What a server process does: load by name before anything imported twotower_assets.
    loaded_from = subprocess.run(
        [sys.executable, "-c", "import mlflow, sys; "
         f"mlflow.pyfunc.load_model('models:/{REGISTERED_MODEL_NAME}/1'); "
         "print(sys.modules['twotower_assets.serving.retriever'].__file__)"],
        env={**os.environ, "MLFLOW_TRACKING_URI": logged.tracking_uri},
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip().splitlines()[-1]
    assert Path(loaded_from).parts[-4:] == ("code", "twotower_assets", "serving", "retriever.py")
    assert "mlartifacts" in Path(loaded_from).parts


def test_a_users_top_k_is_the_dot_product_order_without_the_seen_items(retriever):
    # u1 saw i12 (85) and i05 (12); u2 saw i07 (12).
    assert answer(retriever, request("u1", k=4), request("u2", k=3)) == [
        {"item_ids": ["i11", "i09", "i08", "i01"], "scores": [14.0, 10.0, 9.0, 8.0], "source": "user"},
        {"item_ids": ["i12", "i10", "i08"], "scores": [32.0, 10.0, 9.0], "source": "user"},
    ]


def test_exclude_seen_false_keeps_the_seen_items(retriever):
    assert answer(retriever, request("u1", k=4, exclude_seen=False)) == [
        {"item_ids": ["i12", "i11", "i05", "i09"], "scores": [85.0, 14.0, 12.0, 10.0], "source": "user"},
    ]


def test_k_equal_to_the_catalogue_gives_every_unseen_item(retriever):
    [result] = answer(retriever, request("u1", k=12))
    assert result["item_ids"] == ["i11", "i09", "i08", "i01", "i06", "i10", "i02", "i07", "i03", "i04"]
    assert result["scores"] == [14.0, 10.0, 9.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]


def test_an_items_similar_items_are_its_dot_product_neighbours_without_itself(retriever):
    similar = {"item_ids": ["i11", "i05", "i09"], "scores": [14.0, 12.0, 10.0], "source": "item"}
    # exclude_seen means nothing without a user: the same answer either way.
    assert answer(retriever, request(item_id="i12"), request(item_id="i12", exclude_seen=False)) == [similar, similar]
    [everything] = answer(retriever, request(item_id="i12", k=12))
    assert everything["item_ids"] == ["i11", "i05", "i09", "i08", "i01", "i06", "i10", "i02", "i07", "i03", "i04"]


def test_an_unknown_user_gets_the_popular_items_scored_by_their_share(retriever):
    assert answer(retriever, request("u-new")) == [
        {"item_ids": ["i05", "i12", "i07"], "scores": [0.3, 0.25, 0.2], "source": "popular"},
    ]
    [everything] = answer(retriever, request("u-new", k=12))
    assert (everything["item_ids"], everything["scores"]) == (POPULAR_ORDER, POPULAR_SHARES)


def test_a_user_without_a_vector_gets_popular_items_minus_what_they_saw(retriever):
    # u7 saw i05 and i03.
    assert answer(retriever, request("u7"), request("u7", exclude_seen=False)) == [
        {"item_ids": ["i12", "i07", "i01"], "scores": [0.25, 0.2, 0.15], "source": "popular"},
        {"item_ids": ["i05", "i12", "i07"], "scores": [0.3, 0.25, 0.2], "source": "popular"},
    ]


def test_an_item_outside_the_catalogue_gets_the_popular_items(retriever):
    assert answer(retriever, request(item_id="i99", k=2)) == [
        {"item_ids": ["i05", "i12"], "scores": [0.3, 0.25], "source": "popular"},
    ]


def test_a_mixed_batch_answers_each_request_in_order(retriever):
    batch = [request("u-new", k=1), request(item_id="i12", k=1), request("u1", k=1), request("u2", k=2)]
    assert answer(retriever, *batch) == [answer(retriever, r)[0] for r in batch]
    assert [row["item_ids"] for row in answer(retriever, *batch)] == [["i05"], ["i11"], ["i11"], ["i12", "i10"]]


def test_k_given_as_a_whole_float_is_that_integer(retriever):
    # JSON 3.0 reads as a float, and so does every k of a batch where one request leaves k out.
    assert answer(retriever, request("u1", k=3.0)) == answer(retriever, request("u1", k=3))


def test_an_empty_batch_gets_an_empty_answer(retriever):
    answered = retriever.predict(pd.DataFrame({"user_id": pd.Series([], dtype=object), "k": pd.Series([], dtype="int64")}))
    assert list(answered.columns) == ["item_ids", "scores", "source"]
    assert len(answered) == 0


BAD_REQUESTS = {
    "k missing": (pd.DataFrame({"user_id": ["u1"]}), "Model is missing inputs ['k']"),
    "k missing in one request": (
        pd.DataFrame([{"user_id": "u1", "k": 2}, {"user_id": "u2"}]), "requests[1]: k is missing"
    ),
    "both ids": (
        pd.DataFrame([request("u1", "i01")]),
        "requests[0]: both user_id ('u1') and item_id ('i01') are given; give exactly one",
    ),
    "neither id": (pd.DataFrame({"k": [3]}), "requests[0]: neither user_id nor item_id is given; give exactly one"),
    "k zero": (pd.DataFrame([request("u1", k=0)]), "requests[0]: k=0 is below 1"),
    "k negative": (pd.DataFrame([request("u1", k=-2)]), "requests[0]: k=-2 is below 1"),
    "k above the catalogue": (
        pd.DataFrame([request("u1", k=13)]), "requests[0]: k=13 is above the catalogue size (12 items)"
    ),
    "k fractional": (pd.DataFrame([request("u1", k=2.5)]), "requests[0]: k must be an integer, got float 2.5"),
    "k a string": (pd.DataFrame([request("u1", k="3")]), "requests[0]: k must be an integer, got str '3'"),
    "k a boolean": (pd.DataFrame([request("u1", k=True)]), "requests[0]: k must be an integer, got bool True"),
    "user_id a number": (
        pd.DataFrame([request("u1"), request(5)]), "requests[1]: user_id must be a string, got int 5"
    ),
    "user_id empty": (pd.DataFrame([request("")]), "requests[0]: user_id is an empty string"),
    "item_id blank": (pd.DataFrame([request(item_id="  ")]), "requests[0]: item_id is only whitespace ('  ')"),
    "exclude_seen a string": (
        pd.DataFrame([request("u1", exclude_seen="no")]),
        "requests[0]: exclude_seen must be true or false, got str 'no'",
    ),
    "several bad requests": (
        pd.DataFrame([request("u1", k=0), request("u1"), request(item_id="i01", k=99)]),
        "2 bad requests: requests[0]: k=0 is below 1; requests[2]: k=99 is above the catalogue size (12 items)",
    ),
    "more bad requests than the message lists": (
        pd.DataFrame([request("u1", k=0)] * 12),
        "12 bad requests: requests[0]: k=0 is below 1; requests[1]: k=0 is below 1; "
        "requests[2]: k=0 is below 1; requests[3]: k=0 is below 1; requests[4]: k=0 is below 1; "
        "requests[5]: k=0 is below 1; requests[6]: k=0 is below 1; requests[7]: k=0 is below 1; "
        "requests[8]: k=0 is below 1; requests[9]: k=0 is below 1 (and 2 more)",
    ),
    "batch above max_batch": (
        pd.DataFrame([request("u1")] * 1001),
        "a batch of 1001 requests is above the limit of 1000 requests per call; send smaller batches",
    ),
}


@pytest.mark.parametrize("requests, message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_is_refused_with_a_message_naming_the_problem(retriever, requests, message):
    with pytest.raises(MlflowException) as raised:
        retriever.predict(requests)
    assert message in raised.value.message
    # INVALID_PARAMETER_VALUE is what the scoring server answers with HTTP 400.
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert raised.value.get_http_status_code() == 400


def test_log_retriever_refuses_inputs_that_do_not_fit_together(tmp_path):
    catalogue = write_catalogue(tmp_path / "catalogue")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("two_tower", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(experiment_id).info.run_id

    with pytest.raises(MlflowException, match=r"popular items not in the item index: \['i99'\]"):
        log_retriever(client, run_id, **{**catalogue, "popular_items": {"i01": 3, "i99": 1}})

    no_embedding = tmp_path / "users_without_embedding.parquet"
    pq.write_table(pa.table({"user_id": ["u1"], "vector": [[1.0, 0.0, 0.0, 0.0]]}), no_embedding)
    with pytest.raises(MlflowException, match=r"users_without_embedding.parquet: the user vectors need "
                                              r"a fixed-size list<float32> column 'embedding'"):
        log_retriever(client, run_id, **{**catalogue, "user_embeddings_path": no_embedding})

    twice = tmp_path / "users_twice.parquet"
    users = pq.read_table(catalogue["user_embeddings_path"])
    pq.write_table(pa.concat_tables([users, users.slice(1, 1)]), twice)
    with pytest.raises(MlflowException, match=r"users_twice.parquet: 1 user id\(s\) appear more than once, e.g. 'u2'"):
        log_retriever(client, run_id, **{**catalogue, "user_embeddings_path": twice})

    with pytest.raises(ValueError, match=r"max_k=13 must be between 1 and the catalogue size 12"):
        log_retriever(client, run_id, **catalogue, max_k=13)
    assert client.search_registered_models() == []
