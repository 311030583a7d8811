"""What serves retrieval online: an ANN index of the item vectors, and the retriever model.

* ``item_ann_index``: the date's item vectors in a LanceDB table with an IVF_PQ index (exact
  re-ranking of the candidates), a directory of the artifact store
  (:class:`~twotower_assets.serving.ann_index.ItemIndex`; on GCP the store can be a gs:// URI).
* ``two_tower_retriever``: the MLflow pyfunc that answers "top k items for this user / similar
  to this item" from the user vectors and that index, with popular items for unknown users
  (:mod:`twotower_assets.serving.retriever`); logged into the training run and registered
  (``two_tower_retriever``), one version per date, tagged like the MatchModel.
  ``mlflow models serve -m models:/two_tower_retriever@champion`` serves it (docs/serving.md).

Both are published only for a model that passed the quality gate.
"""

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from twotower_assets.lib import layout
from twotower_assets.lib.artifacts import ArtifactStore, write_references
from twotower_assets.lib.item_attributes import item_categories
from twotower_assets.lib.conditions import DOWNSTREAM_CONDITION
from twotower_assets.lib.lineage import check_model_datasets
from twotower_assets.lib.layout import DatasetFiles, ItemIndexFiles, MatchModelFiles, ModelFiles, Registration, RetrieverFiles
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.partitions import training_date, training_date_partitions
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, StepConfig, retry_transient_errors_only
from twotower_assets.serving import retriever
from twotower_assets.serving.ann_index import INDEX_TYPES, ItemIndex
from twotower_assets.serving.registry import (
    DAGSTER_RUN_TAG,
    GATE_TAG,
    TRAIN_DATE_TAG,
    link_metrics,
    logged_model_id,
    run_metrics,
)
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.queries import item_event_counts_query


class ItemIndexConfig(StepConfig):
    uri_prefix: str | None = Field(
        default=None,
        description="Where the index lives, as a LanceDB URI prefix (e.g. gs://bucket/two_tower/item_index); "
        "the date is appended. Default: the artifact store ($TWOTOWER_HOME/artifacts/item_ann_index/<date>/lancedb).",
    )
    index_type: str = Field(default="IVF_PQ", description=f"One of {', '.join(INDEX_TYPES)}.")
    min_rows_for_index: int = Field(
        default=10_000, ge=1, description="Below this many items the index is an exact scan (no ANN structure)."
    )
    nprobes: int | None = Field(default=None, ge=1, description="IVF partitions searched per query (default: measured).")
    refine_factor: int | None = Field(
        default=None, ge=1, description="Candidates re-ranked exactly per result (k x this; default: measured)."
    )


@dg.asset(
    key=layout.ITEM_ANN_INDEX,
    partitions_def=training_date_partitions,
    # evaluation_metrics: its blocking quality gate keeps a failed model from being served.
    deps=[layout.MATCH_MODEL, layout.EVALUATION_METRICS],
    group_name="publishing",
    kinds={"lancedb"},
    description="LanceDB IVF_PQ index of the item vectors (exact re-ranking), one per training date.",
    automation_condition=DOWNSTREAM_CONDITION,
    code_version="1",
)
def item_ann_index(context: dg.AssetExecutionContext, config: ItemIndexConfig, artifacts: ArtifactStore):
    item_ids, vectors = ModelFiles(artifacts.require(layout.TWO_TOWER_MODEL, context.partition_key)).item_vectors()

    def build(uri: str) -> dict:
        index = ItemIndex.build(
            uri,
            item_ids,
            vectors.astype(np.float32),
            index_type=config.index_type,
            min_rows_for_index=config.min_rows_for_index,
            nprobes=config.nprobes,
            refine_factor=config.refine_factor,
        )
        return index.info()

    with artifacts.writing(layout.ITEM_ANN_INDEX, context.partition_key) as directory:
        files = ItemIndexFiles(directory)
        if config.uri_prefix:
            # Object storage: ItemIndex.build publishes a new table version atomically there; the
            # artifact store keeps the URI so the retriever finds it.
            uri = f"{config.uri_prefix.rstrip('/')}/{context.partition_key}"
            info = build(uri)
            files.remote_uri_file.write_text(uri)
        else:
            info = build(str(files.index))
            uri = str(ItemIndexFiles(artifacts.path(layout.ITEM_ANN_INDEX, context.partition_key)).index)
    return dg.MaterializeResult(
        metadata={
            "uri": dg.MetadataValue.path(uri),
            **{key: value for key, value in info.items() if isinstance(value, (int, float, str))},
        }
    )


class RetrieverConfig(StepConfig):
    registered_model_name: str = Field(
        default=retriever.REGISTERED_MODEL_NAME,
        pattern=r"^[A-Za-z0-9_.-]{1,256}$",
        description="MLflow registered model the retriever versions go to.",
    )
    max_batch: int = Field(default=retriever.DEFAULT_MAX_BATCH, ge=1, description="Requests per call the server accepts.")


@dg.asset(
    key=layout.TWO_TOWER_RETRIEVER,
    partitions_def=training_date_partitions,
    deps=[layout.ITEM_ANN_INDEX, layout.MATCH_MODEL, layout.EVALUATION_METRICS, layout.TF_DATASETS, layout.TRAINING_EVENTS],
    group_name="publishing",
    kinds={"mlflow", "lancedb"},
    description="The retrieval model (MLflow pyfunc: user -> top k items, item -> similar items, unknown "
    "user -> popular items), registered one version per training date.",
    automation_condition=DOWNSTREAM_CONDITION,
    code_version="1",
    retry_policy=WAREHOUSE_RETRY_POLICY,
)
@retry_transient_errors_only
def two_tower_retriever(
    context: dg.AssetExecutionContext,
    config: RetrieverConfig,
    warehouse: WarehouseResource,
    artifacts: ArtifactStore,
    mlflow: MlflowTracking,
) -> dg.MaterializeResult:
    trained = ModelFiles(artifacts.require(layout.TWO_TOWER_MODEL, context.partition_key))
    summary = trained.summary()
    datasets_version = check_model_datasets(artifacts, context.partition_key, summary, "two_tower_retriever")
    index_files = ItemIndexFiles(artifacts.require(layout.ITEM_ANN_INDEX, context.partition_key))
    index_dir = index_files.uri()
    datasets = DatasetFiles(artifacts.require(layout.TF_DATASETS, context.partition_key, datasets_version))
    seen_pairs = datasets.seen_pairs
    match = MatchModelFiles(artifacts.require(layout.MATCH_MODEL, context.partition_key)).registration()
    # The gate judged the MatchModel of this date; its verdict and numbers go on the retriever too.
    match_tags = mlflow.client().get_model_version(match.name, match.version).tags
    gate_tags = {k: v for k, v in match_tags.items() if k == GATE_TAG or k.startswith(f"{GATE_TAG}.")}
    counts = warehouse.query(
        item_event_counts_query(warehouse.dialect, warehouse.table_name(layout.TRAINING_EVENTS)),
        {"train_date": training_date(context)},
    )
    popular = dict(zip(counts["item_id"].to_pylist(), counts["events"].to_pylist()))
    user_ids, user_vectors = trained.user_vectors(summary.user_key)
    with artifacts.writing(layout.TWO_TOWER_RETRIEVER, context.partition_key) as directory, mlflow.active(summary.mlflow_run_id) as run:
        out = RetrieverFiles(directory)
        write_references(directory, {layout.TWO_TOWER_MODEL: (context.partition_key, artifacts.version_of(trained.root)),
                                     layout.ITEM_ANN_INDEX: (context.partition_key, artifacts.version_of(index_files.root))})
        # The retriever's user_id is the model's user key, as for the MatchModel.
        pq.write_table(layout.embeddings_table({"user_id": user_ids}, user_vectors), out.user_vectors)
        pairs = pq.read_table(seen_pairs)
        pq.write_table(pa.table({"user_id": pairs["user_key"], "item_id": pairs["item_id"]}), out.seen_pairs)
        attributes = item_attributes_table(warehouse, {"train_date": training_date(context)}, index_files)
        if attributes is not None:
            pq.write_table(attributes, out.item_attributes)
        with mlflow.reporting_failures(f"registering the retriever of {context.partition_key}"):
            model_uri, version = retriever.log_retriever(
                run.client, summary.mlflow_run_id, out.user_vectors, index_dir, out.seen_pairs, popular,
                registered_model_name=config.registered_model_name,
                tags={TRAIN_DATE_TAG: context.partition_key, DAGSTER_RUN_TAG: context.run_id,
                      "match_model_version": match.version, **gate_tags},
                max_batch=config.max_batch,
                item_attributes_path=out.item_attributes if attributes is not None else None,
                # The retrieval server runs it on a request's features and recent items.
                user_tower_path=trained.user_tower, feature_config_path=datasets.feature_config,
            )
            # It serves the evaluated vectors: their evaluation is its own; the baselines' is not.
            run_logged = run.client.get_run(summary.mlflow_run_id).data.metrics
            link_metrics(
                run.client, summary.mlflow_run_id,
                logged_model_id(run.client, config.registered_model_name, version),
                run_metrics(run.client, summary.mlflow_run_id,
                            sorted(k for k in run_logged if layout.MODEL_EVALUATION_METRIC.fullmatch(k))),
            )
        out.registration_file.write_text(
            Registration(name=config.registered_model_name, version=version, model_uri=model_uri).model_dump_json()
        )
    return dg.MaterializeResult(
        metadata={
            "registered_model": config.registered_model_name,
            "model_version": version,
            "model_uri": model_uri,
            "model_version_url": dg.MetadataValue.url(mlflow.model_version_url(config.registered_model_name, version)),
            "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(summary.mlflow_experiment_id, summary.mlflow_run_id)),
            "users": len(user_ids),
            "popular_items": len(popular),
            "serve": dg.MetadataValue.md(
                f"```bash\nmlflow models serve -m models:/{config.registered_model_name}@champion "
                "--env-manager local -h 127.0.0.1 -p 5001\n```"
            ),
        }
    )


def item_attributes_table(warehouse: WarehouseResource, params: dict, index_files) -> pa.Table | None:
    """``item_id`` and each category column the training table has (values as strings, a
    missing value as ""), for the index's items: what the retrieval server's filters read."""
    by_column = item_categories(warehouse, params)
    if not by_column:
        return None
    item_ids = ItemIndex.open(index_files.uri()).item_ids.tolist()
    return pa.table({"item_id": pa.array(item_ids, pa.string()),
                     **{column: pa.array(["" if values.get(i) is None else str(values[i]) for i in item_ids], pa.string())
                        for column, values in by_column.items()}})
