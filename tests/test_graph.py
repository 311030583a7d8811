"""The whole graph, materialised in-process on tiny data with the real DuckDB and MLflow stores."""

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from mlflow import MlflowClient

from helpers.graph import TINY_PARTITION, make_resources, materialize_all, metadata_of, tiny_run_config
from twotower_assets.lib import layout
from twotower_assets.model.recipes import load_recipe
from twotower_assets.serving import match_scorer
from twotower_assets.serving import retriever as retriever_module
from twotower_assets.serving.registry import logged_model_id
from twotower_assets.warehouse.errors import EmptyTableError

SECOND_PARTITION = "2026-05-25"


def config_for(*ops: str, **overrides) -> dict:
    """The tiny run config reduced to the ops a partial run executes (Dagster rejects extras)."""
    config = tiny_run_config(**overrides)
    return {"ops": {op: value for op, value in config["ops"].items() if op in ops}}


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    home = tmp_path_factory.mktemp("graph")
    resources = make_resources(home)
    result = materialize_all(resources, TINY_PARTITION)
    assert result.success
    return home, resources, result


@pytest.mark.slow
def test_every_asset_materialised(graph):
    _, _, result = graph
    materialised = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {
        layout.CLICK_EVENTS, layout.TRAINING_EVENTS, layout.VALIDATION_EVENTS, layout.TEST_EVENTS,
        "tf_datasets", "tuned_hyperparameters", "two_tower_model", "evaluation_metrics", "match_model",
        layout.USER_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_HISTORY, layout.ITEM_ANN_INDEX,
        layout.TWO_TOWER_RETRIEVER, layout.CHAMPION,
    } <= materialised


@pytest.mark.slow
def test_mlflow_run_is_finished_with_params_losses_config_and_model(graph, tmp_path):
    home, resources, result = graph
    run_id = metadata_of(result, "two_tower_model")["mlflow_run_id"].value
    assert run_id in metadata_of(result, "two_tower_model")["mlflow_run_url"].value
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert {"user_count", "item_count", "user_feature_count", "item_feature_count", "config_name"} <= set(
        run.data.params
    )
    # Every field of the resolved recipe is a param: production's, the date's tuning, then
    # tiny.yaml's overrides.
    tuned = metadata_of(result, "tuned_hyperparameters")["best_overrides"].value
    recipe = load_recipe("production").with_overrides(tuned).with_overrides(
        {"towers": {"embedding_size": 8}, "schedule": {"batch_size": 256, "epochs": 2},
         "optimizer": {"learning_rate": 0.05}},
    )
    expected = {("recipe." + k if k in ("name", "description", "features") else k): str(v)
                for k, v in recipe.params().items()}
    assert {k: run.data.params[k] for k in expected} == expected
    assert run.data.params["towers.embedding_size"] == "8" and run.data.params["optimizer.name"] == "lazy_adam"
    assert run.data.params["task.negatives.kind"] == "in_batch" and run.data.params["seed"] == "1"
    logged = Path(client.download_artifacts(run_id, "recipe.yaml", str(tmp_path)))
    assert load_recipe(logged).model_dump() == {**recipe.model_dump(), "name": "production"}
    metadata = metadata_of(result, "two_tower_model")
    assert metadata["recipe"].value == "production"
    assert metadata["recipe_fields"].value == recipe.params()
    assert len(client.get_metric_history(run_id, "loss")) == 2  # two epochs in the tiny config
    assert "recall_at_50" in run.data.metrics and "popularity_recall_at_50" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"feature_config.json", "recipe.yaml", "evaluation"} <= artifacts
    # The MatchModel and the retriever are MLflow logged models of the run (the UI's "Logged models").
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert {m.name for m in logged if m.source_run_id == run_id} == {"match_model", "retriever"}


@pytest.mark.slow
def test_tuning_is_one_mlflow_run_with_a_nested_run_per_trial_and_the_model_trains_from_it(graph):
    home, resources, result = graph
    tuned = metadata_of(result, "tuned_hyperparameters")
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    parent_id = tuned["mlflow_run_url"].value.rsplit("/", 1)[-1]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["metric"] == "recall@50"
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == tuned["trials"].value == 2  # tiny.yaml's budget
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"optimizer.learning_rate", "task.temperature", "schedule.batch_size"} <= set(child.data.params)
        values = client.get_metric_history(child.info.run_id, "val_recall_at_50")
        assert 1 <= len(values) <= 3  # max_epochs 3
        # Scored at the epoch its training kept (production monitors val_loss), not its best ranking.
        kept = int(child.data.metrics["best_epoch"]) - 1
        by_step = {v.step: v.value for v in values}
        assert child.data.metrics["best_value"] == pytest.approx(by_step[kept])
        losses = {v.step: v.value for v in client.get_metric_history(child.info.run_id, "val_loss")}
        assert losses[kept] <= min(losses.values()) + 0.001  # the recipe's min_delta
    assert tuned["best_value"].value == pytest.approx(max(c.data.metrics["best_value"] for c in children), abs=1e-4)
    assert "optimization_history" in tuned and "data:image/png;base64," in tuned["optimization_history"].value
    plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert "plots/optimization_history.png" in plots
    # The model of the same date trained from the tuning (then tiny.yaml's own overrides).
    model = metadata_of(result, "two_tower_model")
    assert model["tuned_from"].value.startswith(f"{TINY_PARTITION} (recall@50 ")
    run = client.get_run(model["mlflow_run_id"].value)
    assert run.data.params["tuned_from"] == model["tuned_from"].value
    best = tuned["best_overrides"].value
    assert float(run.data.params["task.temperature"]) == pytest.approx(best["task"]["temperature"])
    assert run.data.params["towers.embedding_size"] == "8"  # the run config wins over the tuning


@pytest.mark.slow
def test_both_models_are_registered_gated_and_champion(graph):
    _, resources, result = graph
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    run_id = metadata_of(result, "two_tower_model")["mlflow_run_id"].value
    for name, asset in (("two_tower_match", "match_model"), ("two_tower_retriever", "two_tower_retriever")):
        [version] = client.search_model_versions(f"name = '{name}'")
        assert str(version.version) == metadata_of(result, asset)["model_version"].value == "1"
        assert version.run_id == run_id
        assert version.tags["train_date"] == TINY_PARTITION
        assert version.tags["dagster_run_id"] == result.run_id
        assert version.tags["gate"] == "passed"
        assert float(version.tags["gate.recall_at_50"]) == pytest.approx(metadata_of(result, "evaluation_metrics")["recall_at_50"].value, abs=1e-4)
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert metadata_of(result, layout.CHAMPION)["champion_train_date"].value == TINY_PARTITION


BASELINES = ("random", "popularity", "svd", "ease", "item_knn")


@pytest.mark.slow
def test_each_logged_model_carries_its_own_metrics(graph):
    """MLflow 3's Models view: the MatchModel shows the training losses of the weights it kept and
    the evaluation the gate judged; the retriever the same model's evaluation; neither a baseline's."""
    _, resources, result = graph
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    run = client.get_run(metadata_of(result, "two_tower_model")["mlflow_run_id"].value)
    versions = {name: client.get_model_version(name, metadata_of(result, asset)["model_version"].value)
                for name, asset in (("two_tower_match", "match_model"), ("two_tower_retriever", "two_tower_retriever"))}
    models = {name: client.get_logged_model(logged_model_id(client, name, v.version)) for name, v in versions.items()}
    assert {m.name for m in models.values()} == {"match_model", "retriever"}
    # The registry's page of each model says what it is, its input and output, and who moves champion.
    for name, description in (("two_tower_match", match_scorer.DESCRIPTION), ("two_tower_retriever", retriever_module.DESCRIPTION)):
        assert client.get_registered_model(name).description == description
        assert "Input:" in description and "Output" in description and "quality gate" in description
    for name, model in models.items():
        assert model.source_run_id == run.info.run_id, name
        keys = {m.key for m in model.metrics}
        assert not [k for k in keys if k.startswith(BASELINES)], (name, sorted(keys))

    match = {m.key: m for m in models["two_tower_match"].metrics}
    # Training keeps the weights of EarlyStopping's best epoch, by hand from the run's per-epoch
    # history: the last epoch whose val_loss beat the best before it by more than min_delta.
    val_loss = sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    min_delta, best, kept = load_recipe("production").schedule.min_delta, float("inf"), None
    for point in val_loss:
        if point.value < best - min_delta:
            best, kept = point.value, point
    assert match["val_loss"].step == kept.step and match["val_loss"].value == pytest.approx(kept.value)
    assert match["loss"].value == pytest.approx(loss[kept.step])
    # The evaluation the quality gate judged: the CSV it read, to full precision.
    csv = pd.read_csv(layout.EvaluationFiles(resources["artifacts"].path("evaluation_metrics", TINY_PARTITION)).metrics)
    overall = csv[(csv["segment"] == "all") & (csv["model"] == layout.EVALUATED_MODEL)].set_index("k")
    # Its single numbers: recall@50 (what the gate judged) and NDCG@10, not a column per k.
    assert {k for k in match if layout.MODEL_EVALUATION_METRIC.fullmatch(k)} == {"recall_at_50", "ndcg_at_10"}
    assert match["recall_at_50"].value == pytest.approx(overall.loc[50, "recall"])
    assert match["ndcg_at_10"].value == pytest.approx(overall.loc[10, "ndcg"])
    assert match["recall_at_50"].value == pytest.approx(metadata_of(result, "evaluation_metrics")["recall_at_50"].value,
                                                        abs=1e-4)
    retriever = {m.key: m.value for m in models["two_tower_retriever"].metrics}
    assert retriever == {"recall_at_50": pytest.approx(overall.loc[50, "recall"]),
                         "ndcg_at_10": pytest.approx(overall.loc[10, "ndcg"])}
    # Linking metrics to a model adds no points to the run's own curves.
    assert len(val_loss) == metadata_of(result, "two_tower_model")["epochs_run"].value
    assert len(client.get_metric_history(run.info.run_id, "recall_at_50")) == 1


@pytest.mark.slow
def test_embedding_tables_have_one_row_per_training_user_and_item(graph):
    _, resources, result = graph
    warehouse = resources["warehouse"]
    train_date = dt.date.fromisoformat(TINY_PARTITION)
    users = warehouse.query(
        "SELECT COUNT(DISTINCT user_id) AS n FROM training_events WHERE train_date = $d", {"d": train_date}
    )["n"][0].as_py()
    history = warehouse.query("SELECT * FROM two_tower_user_embedding_history")
    assert history.num_rows == users
    assert len(set(history["user_id"].to_pylist())) == users
    assert set(history["train_date"].to_pylist()) == {train_date}
    assert all(len(v) == 8 for v in history["user_embedding"].to_pylist())
    vectors = np.array(history["user_embedding"].to_pylist())
    assert not np.any(np.all(vectors == 0, axis=1)), "the unknown-id zero vector must not be published"
    run_id = metadata_of(result, "two_tower_model")["mlflow_run_id"].value
    assert set(history["mlflow_run_id"].to_pylist()) == {run_id}
    items = warehouse.query("SELECT COUNT(*) AS n FROM two_tower_item_embedding_latest")["n"][0].as_py()
    assert items == metadata_of(result, "two_tower_model")["items"].value


@pytest.mark.slow
def test_metrics_table_is_in_the_metadata(graph):
    _, _, result = graph
    metadata = metadata_of(result, "evaluation_metrics")
    assert "| k | metric |" in metadata["metrics"].value
    assert 0.0 <= metadata["recall_at_50"].value <= 1.0


@pytest.mark.slow
def test_match_model_from_mlflow_loads_with_tensorflow_alone(graph, tmp_path, monkeypatch):
    import mlflow

    home, resources, result = graph
    monkeypatch.setenv("MLFLOW_TRACKING_URI", resources["mlflow"].tracking_uri)
    model = Path(mlflow.artifacts.download_artifacts("models:/two_tower_match@champion", dst_path=str(tmp_path)))
    local = str(model / "artifacts" / "model")  # the SavedModel, logged under its directory name
    history = resources["warehouse"].query(
        "SELECT user_id, user_embedding FROM two_tower_user_embedding_history ORDER BY user_id LIMIT 1")
    items = resources["warehouse"].query(
        "SELECT item_id, item_embedding FROM two_tower_item_embedding_history ORDER BY item_id LIMIT 1")
    user, item = history["user_id"][0].as_py(), items["item_id"][0].as_py()
    expected = float(np.dot(history["user_embedding"][0].as_py(), items["item_embedding"][0].as_py()))
    script = (
        "import numpy as np, tensorflow as tf, json;"
        f"m = tf.saved_model.load({local!r});"
        f"print(json.dumps([float(x) for x in m([np.array([{user!r}, 'nobody']), np.array([{item!r}, {item!r}])])]))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert scores[0] == pytest.approx(expected, abs=1e-5)
    assert scores[1] == 0.0


@pytest.mark.slow
def test_rematerialising_a_partition_replaces_it_and_keeps_the_others(graph):
    home, resources, _ = graph
    warehouse = resources["warehouse"]
    assert materialize_all(resources, SECOND_PARTITION).success
    before = warehouse.partition_row_counts(layout.USER_EMBEDDING_HISTORY, "train_date")
    assert set(before) == {dt.date(2026, 5, 25), dt.date(2026, 6, 1)}
    publish = [layout.USER_EMBEDDING_HISTORY, layout.ITEM_EMBEDDING_HISTORY, layout.TRAINING_EVENTS,
               layout.VALIDATION_EVENTS, layout.TEST_EVENTS]
    from dagster import AssetSelection
    assert materialize_all(resources, TINY_PARTITION, selection=AssetSelection.assets(*publish),
                           run_config=config_for("split_tables")).success
    assert warehouse.partition_row_counts(layout.USER_EMBEDDING_HISTORY, "train_date") == before
    for table in (layout.TRAINING_EVENTS, layout.ITEM_EMBEDDING_HISTORY):
        counts = warehouse.partition_row_counts(table, "train_date")
        assert len(counts) == 2


@pytest.mark.slow
def test_a_date_without_events_fails_clearly_and_writes_nothing(tmp_path):
    resources = make_resources(tmp_path)
    assert materialize_all(resources, TINY_PARTITION).success
    before = resources["warehouse"].partition_row_counts(layout.TRAINING_EVENTS, "train_date")
    from dagster import AssetSelection
    result = materialize_all(resources, "2026-03-10", raise_on_error=False, run_config=config_for("split_tables"),
                             selection=AssetSelection.assets(layout.TRAINING_EVENTS, layout.VALIDATION_EVENTS, layout.TEST_EVENTS))
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = str(failure.event_specific_data.error)
    assert "MissingEventDaysError" in error
    # From the first partition (2026-03-03, the first day with data) on: earlier days precede the data.
    assert "7 event days are missing: 2026-03-03..2026-03-09" in error
    assert "--select click_events --partition-range 2026-03-03...2026-03-09" in error
    assert resources["warehouse"].partition_row_counts(layout.TRAINING_EVENTS, "train_date") == before


def _events_by_day(warehouse) -> dict:
    table = warehouse.query("SELECT * FROM click_events ORDER BY event_date, user_id, item_id, event_hour")
    days = {}
    for day in sorted(set(table["event_date"].to_pylist())):
        days[day] = table.filter(pc.equal(table["event_date"], pa.scalar(day, pa.date32())))
    return days


def test_materialize_all_on_a_date_fills_only_the_missing_days_of_its_window(tmp_path):
    # Date A with the tiny size, then an earlier date B with another size, on one instance: B's
    # run writes the days of its window A's run did not, and leaves A's days as they were.
    resources = make_resources(tmp_path)
    warehouse = resources["warehouse"]
    split = [layout.CLICK_EVENTS, *layout.SPLIT_TABLES.values()]
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        first = materialize_all(resources, TINY_PARTITION, selection=split, instance=instance,
                                run_config=config_for("click_events", "split_tables"))
        assert first.success
        a_days = _events_by_day(warehouse)
        assert sorted(a_days) == [dt.date(2026, 5, 2) + dt.timedelta(days=i) for i in range(30)]
        assert {t.num_rows for t in a_days.values()} == {300}  # 12,000 events over 40 days

        bigger = config_for("click_events", "split_tables", click_events={"num_events": 24_000})
        second = materialize_all(resources, "2026-05-10", selection=split, instance=instance, run_config=bigger)
        assert second.success
        b_days = _events_by_day(warehouse)
        for day, events in a_days.items():
            assert b_days[day].equals(events), day  # A's days untouched
        new = sorted(set(b_days) - set(a_days))
        assert new == [dt.date(2026, 4, 10) + dt.timedelta(days=i) for i in range(22)]
        assert {b_days[d].num_rows for d in new} == {600}
        [result] = [e for e in second.get_asset_materialization_events()
                    if e.asset_key.to_user_string() == layout.CLICK_EVENTS and e.partition == "2026-05-10"]
        assert result.materialization.metadata["kept_days"].value == "2026-05-02..2026-05-10"
        # Dagster knows every day either run wrote: the health bar counts them.
        assert instance.get_materialized_partitions(dg.AssetKey(layout.CLICK_EVENTS)) >= {
            d.isoformat() for d in [*a_days, *new]}


def test_an_events_backfill_rewrites_exactly_its_days(tmp_path):
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
    from twotower_assets.definitions import ALL_ASSETS

    resources = make_resources(tmp_path)
    warehouse = resources["warehouse"]
    tiny = config_for("click_events")
    assert materialize_all(resources, TINY_PARTITION, selection=[layout.CLICK_EVENTS, *layout.SPLIT_TABLES.values()],
                           run_config=config_for("click_events", "split_tables")).success
    before = _events_by_day(warehouse)
    # One run over a range (BackfillPolicy.single_run), another size: only those days change.
    other = config_for("click_events", click_events={"num_events": 4_000})
    result = dg.materialize(
        ALL_ASSETS, selection=[layout.CLICK_EVENTS], resources=resources, run_config=other,
        tags={ASSET_PARTITION_RANGE_START_TAG: "2026-05-10", ASSET_PARTITION_RANGE_END_TAG: "2026-05-12"},
    )
    assert result.success
    after = _events_by_day(warehouse)
    changed = {d for d in before if not after[d].equals(before[d])}
    assert changed == {dt.date(2026, 5, 10), dt.date(2026, 5, 11), dt.date(2026, 5, 12)}
    assert {after[d].num_rows for d in changed} == {100}
    # Backfilling them again with the first size brings back exactly the first rows.
    again = dg.materialize(
        ALL_ASSETS, selection=[layout.CLICK_EVENTS], resources=resources, run_config=tiny,
        tags={ASSET_PARTITION_RANGE_START_TAG: "2026-05-10", ASSET_PARTITION_RANGE_END_TAG: "2026-05-12"},
    )
    assert again.success
    assert all(_events_by_day(warehouse)[d].equals(before[d]) for d in before)


def test_an_events_backfill_past_end_date_writes_no_later_day_as_a_training_run(tmp_path):
    """Both ways of backfilling give the same data: the events backfill used to generate days
    after the run config's end_date, which a training run never writes."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
    from twotower_assets.definitions import ALL_ASSETS

    resources = make_resources(tmp_path)
    result = dg.materialize(
        ALL_ASSETS, selection=[layout.CLICK_EVENTS], resources=resources, run_config=config_for("click_events"),
        tags={ASSET_PARTITION_RANGE_START_TAG: "2026-05-30", ASSET_PARTITION_RANGE_END_TAG: "2026-06-02"},
    )
    assert result.success
    assert set(_events_by_day(resources["warehouse"])) == {dt.date(2026, 5, 30), dt.date(2026, 5, 31)}
    # One materialisation per day of the range, each with the run's metadata.
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["written_days"].value == "2026-05-30..2026-05-31"
    assert metadata["days_after_end_date"].value == "2026-06-01..2026-06-02"


def test_the_split_of_a_date_reads_exactly_its_window_of_event_days(tmp_path):
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
    from twotower_assets.definitions import ALL_ASSETS, defs
    from twotower_assets.lib.partitions import EVENT_WINDOW_DAYS

    # Dagster's view: the split of D depends on the event days [D - 90, D - 1].
    graph = defs.resolve_asset_graph()
    mapping = graph.get_partition_mapping(dg.AssetKey(layout.TRAINING_EVENTS), dg.AssetKey(layout.CLICK_EVENTS))
    days = graph.get(dg.AssetKey(layout.CLICK_EVENTS)).partitions_def
    upstream = mapping.get_upstream_mapped_partitions_result_for_partitions(
        graph.get(dg.AssetKey(layout.TRAINING_EVENTS)).partitions_def.subset_with_partition_keys([TINY_PARTITION]),
        graph.get(dg.AssetKey(layout.TRAINING_EVENTS)).partitions_def, days,
    ).partitions_subset.get_partition_keys()
    first = dt.date(2026, 6, 1) - dt.timedelta(days=EVENT_WINDOW_DAYS)
    assert list(upstream) == [(first + dt.timedelta(days=i)).isoformat() for i in range(EVENT_WINDOW_DAYS)]

    # The SQL: events of a wider range are written; the split of D holds exactly the window's.
    resources = make_resources(tmp_path)
    warehouse = resources["warehouse"]
    assert dg.materialize(
        ALL_ASSETS, selection=[layout.CLICK_EVENTS], resources=resources,
        run_config=config_for("click_events", click_events={"end_date": "2026-06-10"}),
        tags={ASSET_PARTITION_RANGE_START_TAG: "2026-04-20", ASSET_PARTITION_RANGE_END_TAG: "2026-06-10"},
    ).success
    assert materialize_all(resources, TINY_PARTITION, selection=list(layout.SPLIT_TABLES.values()),
                           run_config=config_for("split_tables")).success
    window = warehouse.query(
        "SELECT COUNT(*) AS n, MIN(event_date) AS lo, MAX(event_date) AS hi FROM click_events "
        "WHERE event_date >= DATE '2026-05-02' AND event_date < DATE '2026-06-01'")
    split = warehouse.query(
        "SELECT COUNT(*) AS n, MIN(event_date) AS lo, MAX(event_date) AS hi FROM ("
        + " UNION ALL ".join(f"SELECT event_date FROM {t} WHERE train_date = DATE '2026-06-01'"
                             for t in layout.SPLIT_TABLES.values()) + ")")
    assert split["lo"][0].as_py() == dt.date(2026, 5, 2) and split["hi"][0].as_py() == dt.date(2026, 5, 31)
    assert split["n"][0].as_py() <= window["n"][0].as_py()


def test_a_feature_missing_from_the_data_fails_before_training(tmp_path):
    resources = make_resources(tmp_path)
    assert materialize_all(resources, TINY_PARTITION, run_config=config_for("click_events", "split_tables"),
                           selection=[layout.CLICK_EVENTS, layout.TRAINING_EVENTS, layout.VALIDATION_EVENTS,
                                      layout.TEST_EVENTS]).success
    resources["warehouse"].execute("ALTER TABLE training_events DROP COLUMN item_author")
    result = materialize_all(resources, TINY_PARTITION, raise_on_error=False, selection=["tf_datasets"],
                             run_config=config_for("tf_datasets", tf_datasets={"config_name": "default-features"}))
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "feature 'item_author' in item_embedding_layers is not a column of training_events" in str(
        failure.event_specific_data.error)
    assert not (tmp_path / "artifacts" / "tf_datasets" / TINY_PARTITION).exists()


@pytest.mark.slow
def test_metadata_and_mlflow_a_person_reads(graph):
    """What a person reads: table schemas and row counts, run links, lift, rounded numbers, MLflow
    curves and inputs."""
    _, resources, result = graph
    for table in (layout.TRAINING_EVENTS, layout.USER_EMBEDDING_HISTORY, layout.RECOMMENDATIONS, layout.SIMILAR_ITEMS):
        metadata = metadata_of(result, table)
        columns = [c.name for c in metadata["dagster/column_schema"].schema.columns]
        assert "train_date" in columns and metadata["dagster/row_count"].value > 0, table
    for asset in ("evaluation_metrics", "match_model", layout.USER_EMBEDDING_HISTORY, layout.RECOMMENDATIONS,
                  layout.TWO_TOWER_RETRIEVER, "two_tower_model"):
        assert "/#/experiments/" in metadata_of(result, asset)["mlflow_run_url"].value, asset
    evaluation = metadata_of(result, "evaluation_metrics")
    assert "| lift vs popularity |" in evaluation["metrics"].value
    assert "| coverage |" in evaluation["metrics"].value and "| novelty |" in evaluation["metrics"].value
    recall = evaluation["recall_at_50"].value
    assert recall == round(recall, 4)
    assert evaluation["lift_over_popularity_at_50"].value == pytest.approx(
        recall / evaluation["popularity_recall_at_50"].value, abs=1e-3)

    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    run = client.get_run(metadata_of(result, "two_tower_model")["mlflow_run_id"].value)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Two-tower" in experiment.tags["mlflow.note.content"]
    assert "EASE" in experiment.tags["mlflow.note.content"] and "recall_at_k" in experiment.tags["mlflow.note.content"]
    # Each metric of each model is one curve over k (step = k): one chart per family on the run
    # page, not one per k. Only the single numbers recall@50 and NDCG@10 have plain keys.
    csv = pd.read_csv(layout.EvaluationFiles(resources["artifacts"].path("evaluation_metrics", TINY_PARTITION)).metrics)
    overall = csv[csv["segment"] == "all"].set_index(["model", "k"])
    evaluated = sorted(set(overall.index.get_level_values("model")))
    assert {"two_tower", "popularity", "ease"} <= set(evaluated)
    for model in evaluated:
        prefix = "" if model == layout.EVALUATED_MODEL else f"{model}_"
        for name in layout.EVALUATION_METRICS_PER_K:
            steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"{prefix}{name}_at_k")}
            assert steps == {k: pytest.approx(overall.loc[(model, k), name]) for k in (10, 50, 100)}, (model, name)
    plain = {key for key in run.data.metrics if re.search(r"_at_\d+$", key) and not key.startswith("comparison_")}
    assert plain == {f"{'' if m == layout.EVALUATED_MODEL else m + '_'}{key}" for m in evaluated
                     for key in ("recall_at_50", "ndcg_at_10")}
    assert run.data.metrics["recall_at_50"] == pytest.approx(overall.loc[(layout.EVALUATED_MODEL, 50), "recall"])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {f"training_events@{TINY_PARTITION}", f"validation_events@{TINY_PARTITION}"}
    training = inputs[f"training_events@{TINY_PARTITION}"]
    assert json.loads(training.dataset.profile)["num_rows"] == metadata_of(result, "tf_datasets")["training_rows"].value
    assert {t.key: t.value for t in training.tags}["mlflow.data.context"] == "training"


def test_assets_have_owners_tags_and_the_warehouse_kind():
    from twotower_assets.definitions import defs
    import dagster as dg

    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.owners == ["team:recommendations"], key
        assert node.tags.get("pipeline") == "two_tower", key
        assert node.description, key
    for table in (layout.TRAINING_EVENTS, layout.USER_EMBEDDING_HISTORY, layout.RECOMMENDATIONS):
        kinds = {k.removeprefix("dagster/kind/") for k in graph.get(dg.AssetKey(table)).tags if k.startswith("dagster/kind/")}
        assert "duckdb" in kinds and "sql" not in kinds, (table, kinds)
