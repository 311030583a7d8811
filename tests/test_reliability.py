"""Ids kept exactly, early failure, integrity checks (one section per finding).

Each test reproduces one finding and failed before its fix; docs/reliability.md (the section
"immutable versions, integrity, early failure, ids kept exactly") lists them.
"""

import json
import shutil
from pathlib import Path

import pytest

from twotower_assets.data.movielens import MovieLensFormatError, load_movielens

FIXTURES = Path(__file__).parent / "fixtures" / "movielens"


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


# ------------------------------------------------------------------ finding 5: ids are data


def _replace_line(file: Path, number: int, new: str, encoding: str = "latin-1") -> None:
    lines = file.read_text(encoding=encoding).split("\n")
    lines[number - 1] = new
    file.write_text("\n".join(lines), encoding=encoding)


@pytest.mark.parametrize("bad_id", ["trail ", " lead", "a b", "nb\u00a0sp"])
def test_an_id_with_whitespace_is_refused_naming_the_id_and_the_line(tmp_path, bad_id):
    """'trail ' used to become 'trail' (so serving 'trail ' scored 0): now it is refused."""
    path = _copy(FIXTURES / "grouplens", tmp_path)
    user_file = path / "u.user"
    line = user_file.read_text(encoding="latin-1").split("\n")[1]  # user 2, CRLF kept
    _replace_line(user_file, 2, bad_id + line[line.index("|"):])
    with pytest.raises(MovieLensFormatError) as error:
        load_movielens(path)
    assert "u.user, line 2" in str(error.value) and repr(bad_id) in str(error.value)


def test_an_id_with_whitespace_in_the_ratings_is_refused(tmp_path):
    path = _copy(FIXTURES / "recbole", tmp_path)
    inter = path / "ml-tiny.inter"
    with inter.open("a", encoding="utf-8") as f:
        f.write("1 \t3\t4\t874965758\n")
    with pytest.raises(MovieLensFormatError, match=r"ml-tiny.inter, line 15: user_id '1 ' "):
        load_movielens(path)


def test_ids_are_kept_exactly_as_read(tmp_path):
    """Nothing is stripped or normalised: an id that loads is the id serving will see."""
    data = load_movielens(FIXTURES / "grouplens")
    raw_users = [line.split("|")[0] for line in (FIXTURES / "grouplens" / "u.user").read_text("latin-1").splitlines()]
    assert data.users["user_id"].to_pylist() == raw_users


@pytest.mark.parametrize("source", ["grouplens", "recbole"])
def test_a_duplicate_id_names_the_id_and_both_lines(tmp_path, source):
    path = _copy(FIXTURES / source, tmp_path)
    if source == "grouplens":
        user_file, encoding, first = path / "u.user", "latin-1", 1
        text = user_file.read_text(encoding=encoding)
        user_file.write_text(text.rstrip("\r\n") + "\r\n" + text.split("\n")[0].rstrip("\r") + "\r\n", encoding=encoding)
    else:
        user_file, encoding, first = path / "ml-tiny.user", "utf-8", 2
        text = user_file.read_text(encoding=encoding)
        user_file.write_text(text.rstrip("\n") + "\n" + text.split("\n")[1] + "\n", encoding=encoding)
    last = len(user_file.read_text(encoding=encoding).rstrip("\r\n").split("\n"))
    with pytest.raises(MovieLensFormatError) as error:
        load_movielens(path)
    message = str(error.value)
    assert "duplicate user_id '1'" in message and f"line {first}" in message and f"line {last}" in message
    assert user_file.name in message


# ------------------------------------------------------- finding 4: fail early, name the setting


def run_failure_text(result) -> str:
    """Every error message of a run's events (step, resource and run failures), causes included."""
    texts = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            texts.append(error.message)
            error = error.cause or error.context
    return "\n".join(texts)


def materialised_keys(result) -> set[str]:
    return {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}


def test_an_unwritable_mlflow_store_fails_the_run_before_any_step_writes(tmp_path):
    """sqlite under a path that cannot be a directory: the run stops at its start, naming the URI."""
    from helpers.graph import make_resources, materialize_all
    from twotower_assets.lib.mlflow_tracking import MlflowTracking

    resources = make_resources(tmp_path / "home")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be")
    uri = f"sqlite:///{blocker}/mlflow.db"
    resources["mlflow"] = MlflowTracking(tracking_uri=uri, artifact_root=(tmp_path / "mlartifacts").as_uri())
    result = materialize_all(resources, raise_on_error=False)
    assert not result.success
    assert materialised_keys(result) == set()  # the split and tf_datasets did not run
    text = run_failure_text(result)
    assert "MLFLOW_TRACKING_URI" in text and str(blocker) in text, text


def test_twotower_home_that_is_a_file_is_named_when_the_run_starts(tmp_path, monkeypatch):
    from helpers.graph import materialize_all, tiny_run_config
    from twotower_assets.defs.resources import default_resources
    from twotower_assets.lib import layout

    home = tmp_path / "home-is-a-file"
    home.write_text("oops")
    monkeypatch.setenv("TWOTOWER_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "TWOTOWER_DUCKDB_PATH", "TWOTOWER_MLFLOW_ARTIFACTS", "TWOTOWER_WAREHOUSE"):
        monkeypatch.delenv(name, raising=False)
    source_only = {"ops": {"click_events": tiny_run_config()["ops"]["click_events"]}}
    result = materialize_all(
        default_resources(), raise_on_error=False, selection=[layout.CLICK_EVENTS], run_config=source_only
    )
    assert not result.success
    text = run_failure_text(result)
    assert "TWOTOWER_HOME" in text and str(home) in text and "FileExistsError" not in text, text


# --------------------------------------------- finding 3: checksums, verified before reading


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """The tiny graph materialised once for 2026-06-01 (tests restore what they break)."""
    from helpers.graph import make_resources, materialize_all

    import dagster as dg

    resources = make_resources(tmp_path_factory.mktemp("reliability") / "home")
    result = materialize_all(resources, selection=dg.AssetSelection.all())
    assert result.success
    return resources


def _truncate(path: Path):
    """Cut ``path`` to half its size; returns a function that restores it."""
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    return lambda: path.write_bytes(original)


def _only(resources, asset: str, **config):
    from helpers.graph import materialize_all, tiny_run_config

    ops = tiny_run_config(**({asset: config} if config else {}))["ops"]
    return materialize_all(
        resources, raise_on_error=False, selection=[asset],
        run_config={"ops": {asset: ops[asset]} if asset in ops else {}},
    )


@pytest.mark.slow
def test_every_artifact_directory_records_sha256_checksums(graph):
    import json

    from twotower_assets.lib.checksums import sha256_of

    for asset in ("tf_datasets", "two_tower_model", "match_model", "evaluation_metrics", "item_ann_index"):
        root = graph["artifacts"].path(asset, "2026-06-01")
        files = json.loads((root / "checksums.json").read_text())["files"]
        on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"checksums.json"}
        assert set(files) == on_disk, asset
        name, entry = next(iter(files.items()))
        assert entry["sha256"] == sha256_of(root / name)
    assert "model/saved_model.pb" in json.loads((graph["artifacts"].path("match_model", "2026-06-01") / "checksums.json").read_text())["files"]
    assert "user_embeddings.parquet" in json.loads((graph["artifacts"].path("two_tower_model", "2026-06-01") / "checksums.json").read_text())["files"]


@pytest.mark.slow
def test_a_truncated_dataset_shard_fails_training_naming_asset_partition_file_and_fix(graph):
    from helpers.graph import failure_text

    root = graph["artifacts"].path("tf_datasets", "2026-06-01")
    shard = max((p for p in (root / "training").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    restore = _truncate(shard)
    try:
        result = _only(graph, "two_tower_model")
    finally:
        restore()
    assert not result.success
    text = failure_text(result)
    assert "DataLossError" not in text
    assert f"tf_datasets partition 2026-06-01" in text and shard.relative_to(root).as_posix() in text, text
    assert "re-materialise tf_datasets for 2026-06-01" in text


@pytest.mark.slow
def test_a_truncated_match_model_is_refused_before_it_is_published(graph):
    from helpers.graph import failure_text

    pb = graph["artifacts"].path("match_model", "2026-06-01") / "model" / "saved_model.pb"
    restore = _truncate(pb)
    try:
        result = _only(graph, "champion")
    finally:
        restore()
    assert not result.success
    text = failure_text(result)
    assert "match_model partition 2026-06-01" in text and "model/saved_model.pb" in text, text
    assert "re-materialise match_model for 2026-06-01" in text


def test_the_match_model_is_probed_right_after_saving(tmp_path):
    """A SavedModel that does not load or score as its vectors say is refused, naming the path."""
    import numpy as np

    from twotower_assets.model.match_model import MatchModel, MatchModelProbeError, probe_match_model, save_match_model

    rng = np.random.default_rng(0)
    users, items = np.array(["u1", "u2", "trail "]), np.array(["i1", "i2"])
    user_vectors, item_vectors = rng.normal(size=(3, 4)), rng.normal(size=(2, 4))
    model = MatchModel(users, user_vectors, items, item_vectors)
    save_match_model(model, tmp_path / "ok")
    probe_match_model(tmp_path / "ok", users, user_vectors, items, item_vectors)  # loads, scores, agrees
    with pytest.raises(MatchModelProbeError, match="scores"):
        probe_match_model(tmp_path / "ok", users, user_vectors * 2, items, item_vectors)
    save_match_model(model, tmp_path / "cut")
    _truncate(tmp_path / "cut" / "saved_model.pb")
    with pytest.raises(MatchModelProbeError, match=str(tmp_path / "cut")):
        probe_match_model(tmp_path / "cut", users, user_vectors, items, item_vectors)


# ------------------------------------- findings 1 and 2: immutable versions, recorded lineage


def test_a_rewrite_never_changes_the_version_a_reader_holds(tmp_path):
    """Run B rewriting a date's datasets while run A reads them: A keeps reading its version."""
    from twotower_assets.lib.artifacts import ArtifactStore

    store = ArtifactStore(base_dir=str(tmp_path))
    with store.writing("tf_datasets", "2026-06-01") as directory:
        (directory / "features.json").write_text('{"user_queries": "text"}')
    held = store.require("tf_datasets", "2026-06-01")  # run A starts training on it
    with store.writing("tf_datasets", "2026-06-01") as directory:  # run B, another feature config
        (directory / "features.json").write_text('{"user_id": "string"}')
    assert (held / "features.json").read_text() == '{"user_queries": "text"}'
    store.require("tf_datasets", "2026-06-01", version=store.version_of(held))  # still verifies
    current = store.require("tf_datasets", "2026-06-01")
    assert current != held and (current / "features.json").read_text() == '{"user_id": "string"}'
    assert store.current_version("tf_datasets", "2026-06-01") == store.version_of(current)
    # The date's path shows the newest version (what people and tools open).
    assert (store.path("tf_datasets", "2026-06-01") / "features.json").read_text() == '{"user_id": "string"}'


def test_concurrent_writers_of_one_partition_do_not_destroy_each_other(tmp_path):
    from twotower_assets.lib.artifacts import ArtifactStore

    store = ArtifactStore(base_dir=str(tmp_path))
    with store.writing("tf_datasets", "2026-06-01") as first:
        (first / "a.txt").write_text("A")
        with store.writing("tf_datasets", "2026-06-01") as second:  # starts and finishes inside A
            (second / "b.txt").write_text("B")
        (first / "a2.txt").write_text("A, still writing")
    current = store.require("tf_datasets", "2026-06-01")
    assert sorted(p.name for p in current.iterdir()) == ["a.txt", "a2.txt", "checksums.json"]
    assert len(store.versions("tf_datasets", "2026-06-01")) == 2


def test_old_versions_are_collected_by_the_documented_rule(tmp_path):
    """Kept: the current version, versions younger than the grace period, protected ones."""
    import os
    import time

    from twotower_assets.lib.artifacts import ArtifactStore

    store = ArtifactStore(base_dir=str(tmp_path), keep_versions_hours=1.0)
    made = []
    for n in range(4):
        with store.writing("two_tower_model", "2026-06-01") as directory:
            (directory / "n.txt").write_text(str(n))
        made.append(store.current_version("two_tower_model", "2026-06-01"))
    old = time.time() - 2 * 3600
    for version in made[:3]:
        os.utime(store.version_path("two_tower_model", "2026-06-01", version), (old, old))
    # Scratch of a killed writer (its process is gone) goes at once; a live writer's stays.
    import socket

    versions = store.versions_dir("two_tower_model", "2026-06-01")
    dead = versions / f".partial-{socket.gethostname()}-{2**22 + 12345}-deadbeef0000"
    live = versions / f".partial-{socket.gethostname()}-{os.getpid()}-cafe00000000"
    dead.mkdir(), live.mkdir()
    removed = store.collect_garbage("two_tower_model", "2026-06-01", protected={made[1]})
    assert removed == [made[0], made[2]]
    assert store.partials("two_tower_model", "2026-06-01") == [live]
    assert store.versions("two_tower_model", "2026-06-01") == [made[1], made[3]]
    assert store.current_version("two_tower_model", "2026-06-01") == made[3]


@pytest.mark.slow
def test_a_model_is_refused_downstream_when_its_datasets_were_rewritten(graph):
    """Finding 2: tf_datasets re-run with another config; evaluation names both versions."""
    from helpers.graph import failure_text, materialize_all, tiny_run_config

    artifacts = graph["artifacts"]
    summary = json.loads((artifacts.path("two_tower_model", "2026-06-01") / "summary.json").read_text())
    trained_on = summary["datasets_version"]
    assert trained_on == artifacts.current_version("tf_datasets", "2026-06-01")
    ops = tiny_run_config(tf_datasets={"config_name": "default-features"})["ops"]
    assert materialize_all(graph, selection=["tf_datasets"], run_config={"ops": {"tf_datasets": ops["tf_datasets"]}}).success
    rewritten = artifacts.current_version("tf_datasets", "2026-06-01")
    assert rewritten != trained_on
    # (The last test on the shared graph: it leaves the rewritten datasets in place.)
    for asset in ("evaluation_metrics", "match_model", "two_tower_retriever"):
        result = _only(graph, asset)
        assert not result.success, asset
        text = failure_text(result)
        assert trained_on in text and rewritten in text and "tiny-features" in text, text
