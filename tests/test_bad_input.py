"""Bad input, bad run config and serving edge cases (reliability).

Every failure here must name what is wrong (file, table, column, feature or config field) and
happen before the expensive work: before training, and before anything is written, so the
previous good output of the partition survives. Cases already covered elsewhere are listed in
the module docstrings of those tests; this file adds the rest, with the real DuckDB warehouse
and real assets materialised on tiny data.
"""

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from helpers.graph import TINY_PARTITION, failure_text, make_resources, materialize_all, tiny_run_config
from twotower_assets.lib import layout
from twotower_assets.model.features import FeatureConfigError, load_feature_config

DATE = dt.date.fromisoformat(TINY_PARTITION)
NEXT_PARTITION = "2026-06-08"  # never split in these tests
SPLIT_TABLE_KEYS = [layout.TRAINING_EVENTS, layout.VALIDATION_EVENTS, layout.TEST_EVENTS]


def config_for(*ops: str, **overrides) -> dict:
    """The tiny run config reduced to the ops a partial run executes (Dagster rejects extras)."""
    config = tiny_run_config(**overrides)
    return {"ops": {op: value for op, value in config["ops"].items() if op in ops}}


def snapshot(directory: Path) -> dict[str, str]:
    """File -> content hash of a directory tree: proves a previous artifact is untouched."""
    return {
        str(path.relative_to(directory)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


# --------------------------------------------------------------------------- feature configs
# Covered in tests/test_features.py: invalid JSON, unknown feature type, missing id feature,
# embedding_size 0 (test_config_errors_name_the_file_and_the_feature), a feature that is not a
# column (test_feature_absent_from_data_is_named; in the graph: tests/test_graph.py::
# test_a_feature_missing_from_the_data_fails_before_training), an unknown config name
# (test_unknown_config_name_lists_the_known_ones).


def _write_config(tmp_path, text: str) -> str:
    path = tmp_path / "broken.json"
    path.write_text(text)
    return str(path)


def test_a_feature_listed_twice_in_a_tower_is_refused(tmp_path):
    # json.loads would silently keep the second entry: the first one's settings would vanish.
    path = _write_config(
        tmp_path,
        '{"user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 8},'
        ' "booking_cnt": {"type": "int", "embedding_size": 1},'
        ' "booking_cnt": {"type": "int", "embedding_size": 4}},'
        ' "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 8}}}',
    )
    with pytest.raises(FeatureConfigError) as error:
        load_feature_config(path)
    assert path in str(error.value)
    assert "duplicate key 'booking_cnt'" in str(error.value)


@pytest.mark.parametrize("size", ["8", 8.5, 8.0, True, -3, None])
def test_embedding_size_must_be_a_positive_json_integer(tmp_path, size):
    payload = {
        "user_embedding_layers": {"user_id": {"type": "string", "embedding_size": size}},
        "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 8}},
    }
    path = _write_config(tmp_path, json.dumps(payload))
    with pytest.raises(FeatureConfigError) as error:
        load_feature_config(path)
    assert path in str(error.value)
    assert "feature 'user_id' in user_embedding_layers" in str(error.value)


def test_a_column_in_both_towers_with_two_types_is_refused(tmp_path):
    payload = {
        "user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 8},
                                  "event_month": {"type": "string", "embedding_size": 2}},
        "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 8},
                                  "event_month": {"type": "text", "embedding_size": 2}},
    }
    path = _write_config(tmp_path, json.dumps(payload))
    with pytest.raises(FeatureConfigError, match="'event_month'.*'string'.*'text'") as error:
        load_feature_config(path)
    assert path in str(error.value)


# --------------------------------------------------------------------------- data: fixtures


@pytest.fixture(scope="module")
def base_home(tmp_path_factory) -> Path:
    """click_events, the split tables and tf_datasets of TINY_PARTITION: the good previous state."""
    home = tmp_path_factory.mktemp("bad_input") / "home"
    resources = make_resources(home)
    result = materialize_all(
        resources,
        selection=[layout.CLICK_EVENTS, *SPLIT_TABLE_KEYS, "tf_datasets"],
        run_config=config_for("click_events", "split_tables", "tf_datasets"),
    )
    assert result.success
    return home


@pytest.fixture
def home(base_home, tmp_path) -> Path:
    """A private copy of the good state, for one test to corrupt."""
    copy = tmp_path / "home"
    shutil.copytree(base_home, copy)
    return copy


def _resources(home: Path) -> dict:
    return make_resources(home)


def _datasets_dir(home: Path, partition: str = TINY_PARTITION) -> Path:
    return home / "artifacts" / "tf_datasets" / partition


def run_datasets(resources: dict, partition: str = TINY_PARTITION, **config):
    return materialize_all(
        resources,
        partition,
        selection=["tf_datasets"],
        run_config=config_for("tf_datasets", tf_datasets=config),
        raise_on_error=False,
    )


def corrupt(resources: dict, sql: str) -> None:
    resources["warehouse"].execute(sql, {"d": DATE} if "$d" in sql else None)


def some_rows(table: str, n: int) -> str:
    """A WHERE clause picking n rows of the tiny partition of ``table``."""
    return f"rowid IN (SELECT rowid FROM {table} WHERE train_date = $d ORDER BY rowid LIMIT {n})"


def fails_before_writing(home: Path, resources: dict, partition: str = TINY_PARTITION, **config) -> str:
    """Run tf_datasets, expect a failure, check the previous artifact is intact; the error text."""
    before = snapshot(_datasets_dir(home))
    result = run_datasets(resources, partition, **config)
    assert not result.success
    assert snapshot(_datasets_dir(home)) == before
    assert not list(_datasets_dir(home, partition).with_name(f"{partition}.versions").glob(".partial-*"))
    return failure_text(result)


# --------------------------------------------------------------------------- data: empty input
# A training date with no events: tests/test_graph.py::test_a_date_without_events_fails_clearly_and_writes_nothing.


def test_an_empty_source_table_fails_the_split_and_keeps_the_previous_split(home):
    resources = _resources(home)
    before = {t: resources["warehouse"].partition_row_counts(t, "train_date") for t in SPLIT_TABLE_KEYS}
    corrupt(resources, "DELETE FROM click_events")
    result = materialize_all(resources, selection=SPLIT_TABLE_KEYS, run_config=config_for("split_tables"),
                             raise_on_error=False)
    assert not result.success
    # Every day of the window is gone (and this instance has no record of them): named.
    assert "30 event days are missing: 2026-05-02..2026-05-31" in failure_text(result)
    assert {t: resources["warehouse"].partition_row_counts(t, "train_date") for t in SPLIT_TABLE_KEYS} == before


@pytest.mark.parametrize("table", [layout.TRAINING_EVENTS, layout.VALIDATION_EVENTS])
def test_an_empty_split_fails_the_datasets_before_writing(home, table):
    resources = _resources(home)
    corrupt(resources, f"DELETE FROM {table} WHERE train_date = $d")
    message = fails_before_writing(home, resources)
    assert f"{table} has no rows for train_date {TINY_PARTITION}" in message


def test_a_date_that_was_never_split_writes_no_datasets(home):
    message = fails_before_writing(home, _resources(home), NEXT_PARTITION)
    assert f"training_events has no rows for train_date {NEXT_PARTITION}" in message
    assert not _datasets_dir(home, NEXT_PARTITION).exists()


# --------------------------------------------------------------------------- data: bad values


@pytest.mark.parametrize(
    "table, column, value, n",
    [
        (layout.TRAINING_EVENTS, "user_id", "NULL", 3),
        (layout.TRAINING_EVENTS, "item_id", "''", 2),
        (layout.VALIDATION_EVENTS, "item_id", "'   '", 1),
        (layout.VALIDATION_EVENTS, "user_id", "NULL", 4),
    ],
)
def test_null_or_empty_ids_fail_with_table_column_and_count(home, table, column, value, n):
    resources = _resources(home)
    corrupt(resources, f"UPDATE {table} SET {column} = {value} WHERE {some_rows(table, n)}")
    message = fails_before_writing(home, resources)
    assert f"{table}.{column} has {n} null or empty values for train_date {TINY_PARTITION}" in message


def test_nan_and_infinite_numeric_features_fail_with_column_and_count(home):
    resources = _resources(home)
    table = layout.TRAINING_EVENTS
    corrupt(resources, f"UPDATE {table} SET item_mean_stock_price = 'nan'::DOUBLE WHERE {some_rows(table, 4)}")
    corrupt(resources, f"UPDATE {table} SET item_mean_stock_price = '-inf'::DOUBLE "
                       f"WHERE rowid IN (SELECT rowid FROM {table} WHERE train_date = $d ORDER BY rowid DESC LIMIT 3)")
    message = fails_before_writing(home, resources)
    assert f"{table}.item_mean_stock_price has 7 NaN or infinite values for train_date {TINY_PARTITION}" in message


def test_a_numeric_feature_on_a_string_column_is_named(home):
    resources = _resources(home)
    corrupt(resources, "ALTER TABLE training_events ALTER booking_cnt TYPE VARCHAR")
    message = fails_before_writing(home, resources)
    assert "int feature 'booking_cnt' reads training_events.booking_cnt, a string column" in message


def test_text_bytes_that_are_not_utf8_are_refused_by_column_type(home):
    resources = _resources(home)
    # DuckDB (like BigQuery STRING) refuses invalid UTF-8 in a text column...
    with pytest.raises(Exception, match="invalid UTF8"):
        resources["warehouse"].query("SELECT decode('\\xFF\\xFE'::BLOB) AS s")
    # ...so bytes can only arrive as a binary column, which a feature may not read.
    corrupt(resources, "ALTER TABLE training_events ALTER item_names TYPE BLOB")
    corrupt(resources, f"UPDATE training_events SET item_names = '\\xFF\\xFEname'::BLOB WHERE {some_rows('training_events', 5)}")
    message = fails_before_writing(home, resources)
    assert "text feature 'item_names' reads training_events.item_names, a binary column" in message
    assert "UTF-8" in message


def test_huge_texts_are_truncated_not_loaded_whole(home):
    from twotower_assets.model.datasets import load_dataset
    from twotower_assets.model.layers import TEXT_MAX_CHARS

    resources = _resources(home)
    # 2 MB of words in five rows: untruncated, one batch of them is ~400k tokens per row.
    corrupt(resources, f"UPDATE training_events SET item_names = repeat('word ', 400000) WHERE {some_rows('training_events', 5)}")
    result = run_datasets(resources)
    assert result.success
    [event] = result.get_asset_materialization_events()
    assert event.materialization.metadata["truncated_texts"].value == {"training_events.item_names": 5}
    training = load_dataset(_datasets_dir(home) / "training").as_numpy_iterator()
    lengths = sorted(len(row["item_names"]) for row in training)
    assert lengths[-5:] == [TEXT_MAX_CHARS] * 5 and lengths[-6] < 100  # the five long ones, cut


def test_malformed_pretrained_vectors_become_zeros_and_are_counted(home):
    from twotower_assets.model.layers import FeatureStats

    ids, vectors = FeatureStats.load(_datasets_dir(home)).pretrained["item_image_embedding"]
    already_zero = int((~vectors.any(axis=1)).sum())  # the synthetic data has a few missing vectors
    not_json, wrong_length, intact = [i for i, v in zip(ids, vectors) if v.any()][:3]
    resources = _resources(home)
    corrupt(resources, f"UPDATE training_events SET item_image_embedding = 'not json' WHERE item_id = '{not_json}'")
    corrupt(resources, f"UPDATE training_events SET item_image_embedding = '[1, 2, 3]' WHERE item_id = '{wrong_length}'")
    result = run_datasets(resources)
    assert result.success
    [event] = result.get_asset_materialization_events()
    assert event.materialization.metadata["unusable_pretrained_vectors"].value == {"item_image_embedding": already_zero + 2}
    ids, vectors = FeatureStats.load(_datasets_dir(home)).pretrained["item_image_embedding"]
    assert not vectors[ids.index(not_json)].any() and not vectors[ids.index(wrong_length)].any()
    assert vectors[ids.index(intact)].any()


def test_no_usable_pretrained_vector_fails_before_replacing_the_datasets(home):
    resources = _resources(home)
    corrupt(resources, "UPDATE training_events SET item_image_embedding = '[1, 2]' WHERE train_date = $d")
    message = fails_before_writing(home, resources)
    assert "pretrained feature 'item_image_embedding'" in message
    assert "16 numbers" in message


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_a_single_user_or_item_fails_before_training(home, column):
    resources = _resources(home)
    corrupt(resources, f"UPDATE training_events SET {column} = 'the_only_one' WHERE train_date = $d")
    message = fails_before_writing(home, resources)
    assert f"training_events has 1 distinct {column} for train_date {TINY_PARTITION}" in message
    assert "at least 2" in message


def test_an_unknown_config_name_in_the_run_config_writes_nothing(home):
    message = fails_before_writing(home, _resources(home), config_name="no-such-config")
    assert "no-such-config" in message and "tiny-features" in message


# --------------------------------------------------------------------------- run config


@pytest.mark.parametrize(
    "section, field, value", [("schedule", "batch_size", -1), ("towers", "embedding_size", 0), ("schedule", "epochs", 0)]
)
def test_bad_training_config_fails_before_training(home, section, field, value):
    resources = _resources(home)
    result = materialize_all(
        resources,
        selection=["two_tower_model"],
        run_config=config_for("two_tower_model", two_tower_model={section: {field: value}}),
        raise_on_error=False,
    )
    assert not result.success
    message = failure_text(result)
    assert f"{section}.{field}" in message and "greater than 0" in message
    assert not (home / "artifacts" / "two_tower_model").exists()


def test_bad_cutoffs_are_config_errors():
    from pydantic import ValidationError

    from twotower_assets.lib.retries import RunConfigError
    from twotower_assets.defs.evaluation.quality_gate import QualityGateConfig
    from twotower_assets.defs.evaluation.assets import EvaluationConfig
    from twotower_assets.defs.publishing.recommendations import RecommendationsConfig
    from twotower_assets.defs.publishing.similar_items import VectorSearchConfig

    for make, field in [
        (lambda: EvaluationConfig(ks=[]), "ks"),
        (lambda: EvaluationConfig(ks=[10, 0]), "ks"),
        (lambda: EvaluationConfig(ks=[-5]), "ks"),
        (lambda: QualityGateConfig(k=0), "k"),
        (lambda: RecommendationsConfig(k=0), "k"),
        (lambda: VectorSearchConfig(top_k=0), "top_k"),
    ]:
        with pytest.raises((ValidationError, RunConfigError)) as error:
            make()
        errors = error.value.errors() if isinstance(error.value, ValidationError) else error.value.field_errors
        assert errors[0]["loc"][0] == field


def test_an_invalid_run_config_fails_a_retried_step_once_naming_the_field(tmp_path):
    """Dagster builds the config before the step runs; the warehouse retry policy must not
    retry a value that can never be valid (it used to take 3 retries and 343 s)."""
    import time

    import dagster as dg

    from helpers.graph import make_resources
    from twotower_assets.definitions import ALL_ASSETS

    started = time.monotonic()
    result = dg.materialize(
        ALL_ASSETS, selection=["click_events"], partition_key="2026-06-01", resources=make_resources(tmp_path),
        run_config={"ops": {"click_events": {"config": {"num_users": -5, "num_items": 0}}}}, raise_on_error=False,
    )
    assert not result.success and time.monotonic() - started < 60
    events = {e.event_type_value for e in result.all_events}
    assert "STEP_UP_FOR_RETRY" not in events
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "invalid run config (ClickEventsConfig): num_users: Input should be greater than 0" in message
    assert "num_items: Input should be greater than 0" in message


@pytest.fixture(scope="module")
def oversized_k(tmp_path_factory):
    """The whole tiny graph with every k far above its 120-item catalog."""
    resources = make_resources(tmp_path_factory.mktemp("oversized_k") / "home")
    run_config = tiny_run_config(
        evaluation_metrics={"ks": [10, 50, 100_000]},
        evaluation_metrics_quality_gate={"k": 100_000},
        two_tower_recommendations={"k": 100_000},
        two_tower_similar_items={"top_k": 1000},  # the largest allowed; above it is a config error
    )
    result = materialize_all(resources, run_config=run_config)
    assert result.success
    return resources, result


def _metadata(result, key: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == key]
    return event.materialization.metadata


@pytest.mark.slow
def test_k_above_the_catalog_is_capped_at_the_catalog_everywhere(oversized_k):
    resources, result = oversized_k
    catalog = _metadata(result, "evaluation_metrics")["catalog_items"].value
    assert 0 < catalog < 1000
    metrics = pd.read_csv(resources["artifacts"].path("evaluation_metrics", TINY_PARTITION) / "metrics.csv")
    assert sorted(metrics["k"].unique()) == [10, 50, catalog]
    [gate] = [e for e in result.get_asset_check_evaluations() if e.check_name == "quality_gate"]
    assert gate.passed and gate.metadata["gate_k"].value == catalog
    recommendations = _metadata(result, "two_tower_recommendations")
    assert recommendations["k"].value == catalog
    lists = resources["warehouse"].query(
        "SELECT max(len(item_ids)) AS longest FROM two_tower_recommendations WHERE train_date = $d", {"d": DATE})
    assert lists["longest"][0].as_py() <= catalog
    similar = _metadata(result, "two_tower_similar_items")
    items = similar["items"].value
    assert similar["top_k"].value == items - 1  # every other item
    ranks = resources["warehouse"].query(
        "SELECT max(neighbor_rank) AS deepest FROM two_tower_similar_items WHERE train_date = $d", {"d": DATE})
    assert ranks["deepest"][0].as_py() == items - 1
    from twotower_assets.defs.publishing.similar_items import VectorSearchConfig

    with pytest.raises(Exception, match="top_k"):
        VectorSearchConfig(top_k=1001)


# --------------------------------------------------------------------------- serving
# Unknown ids score 0 and batches mix known and unknown ids: tests/test_model.py::
# test_match_model_round_trip_in_a_fresh_process (in memory, loaded, and in a bare TensorFlow
# process); from the MLflow artifact: tests/test_graph.py::test_match_model_from_mlflow_loads_with_tensorflow_alone.


@pytest.fixture(scope="module")
def saved_match_model(tmp_path_factory):
    import tensorflow as tf

    from twotower_assets.model.match_model import MatchModel, save_match_model

    users, items = np.eye(2, 3, dtype=np.float32), np.eye(4, 3, dtype=np.float32)
    path = tmp_path_factory.mktemp("match_model") / "mm"
    save_match_model(MatchModel(np.array(["u0", "u1"]), users, np.array(["i0", "i1", "i2", "i3"]), items), path)
    return tf.saved_model.load(str(path))


def test_serving_signature_scores_unknown_ids_zero_in_mixed_batches(saved_match_model):
    import tensorflow as tf

    serve = saved_match_model.signatures["serving_default"]
    scores = serve(user_id=tf.constant(["u0", "u1", "ghost", "", "u1"]),
                   item_id=tf.constant(["i0", "i1", "i0", "i1", "nope"]))["score"].numpy()
    np.testing.assert_allclose(scores, [1.0, 1.0, 0.0, 0.0, 0.0])


def test_empty_and_mismatched_batches(saved_match_model):
    import tensorflow as tf

    empty = saved_match_model([np.array([], dtype=str), np.array([], dtype=str)]).numpy()
    assert empty.shape == (0,)
    with pytest.raises(tf.errors.InvalidArgumentError, match="same number of user_id and item_id"):
        saved_match_model([np.array(["u0", "u1"]), np.array(["i0", "i1", "i2"])])


def test_a_feature_config_is_a_packaged_name_or_an_explicit_config_path(tmp_path):
    import json

    from twotower_assets.defs.splits.assets import SplitConfig
    from twotower_assets.defs.training.datasets import DatasetConfig
    from twotower_assets.lib.retries import RunConfigError
    from twotower_assets.model.features import _config_dir

    own = tmp_path / "mine.json"
    own.write_text((_config_dir(None) / "tiny-features.json").read_text())
    for config_class in (SplitConfig, DatasetConfig):
        assert config_class(config_path=str(own)).feature_config().name == "mine"
        assert config_class(config_name="tiny-features").feature_config().name == "tiny-features"
        # A path in config_name is not read as a path (any readable .json used to be accepted).
        with pytest.raises(RunConfigError, match=r"config_name: .*is not a packaged feature config.*config_path"):
            config_class(config_name=str(own))
        with pytest.raises(RunConfigError, match=r"config_path: .*is not a readable \.json file"):
            config_class(config_path=str(tmp_path / "missing.json"))
    assert json.loads(own.read_text())
