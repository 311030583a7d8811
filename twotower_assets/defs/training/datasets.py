"""The tf.data input of one training date, saved to disk once.

Four datasets: training examples, validation examples, one row per user and one row per
item (each user's / item's most recent training event), plus the feature statistics the
input layers are built from. Training and embedding extraction load them from here.
"""


import dagster as dg
import pyarrow.parquet as pq

from twotower_assets.lib import layout
from twotower_assets.lib.feature_choice import FeatureConfigChoice
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.conditions import DOWNSTREAM_CONDITION
from twotower_assets.lib.partitions import training_date, training_date_partitions
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, retry_transient_errors_only
from twotower_assets.defs.splits.input_validation import validate_training_input
from twotower_assets.lib.layout import DatasetFiles, DatasetsManifest
from twotower_assets.model.datasets import FeatureStatsBuilder, feature_kinds, save_dataset
from twotower_assets.model.towers import SAMPLING_PROBABILITY_COLUMN
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.sql import (
    USER_COLUMN,
    distinct_pairs_query,
    history_time_columns,
    latest_row_per_query,
    training_examples_query,
)

BATCH_ROWS = 65_536


class DatasetConfig(FeatureConfigChoice):
    """The feature config the datasets are prepared for (``config_name`` or ``config_path``)."""


@dg.asset(
    key=layout.TF_DATASETS,
    partitions_def=training_date_partitions,
    deps=[layout.TRAINING_EVENTS, layout.VALIDATION_EVENTS],
    group_name="training",
    kinds={"tensorflow"},
    description="Saved tf.data datasets (training, validation, users, items) and feature statistics.",
    automation_condition=DOWNSTREAM_CONDITION,
    code_version="1",
    retry_policy=WAREHOUSE_RETRY_POLICY,
)
@retry_transient_errors_only
def tf_datasets(
    context: dg.AssetExecutionContext,
    config: DatasetConfig,
    warehouse: WarehouseResource,
    artifacts: ArtifactStore,
) -> dg.MaterializeResult:
    feature_config = config.feature_config()
    training_table = warehouse.table_name(layout.TRAINING_EVENTS)
    validation_table = warehouse.table_name(layout.VALIDATION_EVENTS)
    train_date = training_date(context)
    # Every check of the input data, in the warehouse, before anything is read or written
    # (empty splits included: the datasets below are never empty).
    report = validate_training_input(warehouse, feature_config, train_date)
    params = {"train_date": train_date}

    kinds = feature_kinds(feature_config)
    example_kinds = {**kinds, SAMPLING_PROBABILITY_COLUMN: "number"}
    read_columns = sorted(set(kinds) | {USER_COLUMN})
    user_kinds = {c: kinds[c] for c in feature_config.user_columns if c in kinds} | {USER_COLUMN: "string"}
    item_kinds = {c: kinds[c] for c in feature_config.item_columns if c in kinds}
    pretrained = feature_config.columns_of_type("pretrained")
    dialect = warehouse.dialect

    def read(sql: str):
        return warehouse.query_batches(sql, params, batch_size=BATCH_ROWS)

    stats_builder = FeatureStatsBuilder(feature_config)
    with artifacts.writing(layout.TF_DATASETS, context.partition_key) as directory:
        files = DatasetFiles(directory)
        rows = {}
        rows["training"] = save_dataset(
            read(training_examples_query(dialect, training_table, read_columns + pretrained)),
            example_kinds,
            files.training,
            on_batch=stats_builder.update,
        )
        stats = stats_builder.build()  # fails here, before the other datasets, if no vector is usable
        rows["validation"] = save_dataset(
            read(training_examples_query(dialect, validation_table, read_columns)),
            example_kinds,
            files.validation,
        )
        # A history feature of the user's row holds the items up to its latest event, inclusive
        # (the user's history on the training date), not the history before that event.
        history = {name: spec.history_length for name, spec in feature_config.history_features.items()}
        time_columns = history_time_columns(warehouse.table_schema(training_table).names)
        rows["users"] = save_dataset(
            read(latest_row_per_query(dialect, training_table, USER_COLUMN, list(user_kinds), history, time_columns)),
            user_kinds,
            files.users,
        )
        rows["items"] = save_dataset(
            read(latest_row_per_query(dialect, training_table, feature_config.item_id_feature, list(item_kinds))),
            item_kinds,
            files.items,
        )
        stats.save(directory)
        # The training pairs, so val_loss can leave each user's training items out (decisions.md).
        pq.write_table(
            warehouse.query(distinct_pairs_query(dialect, training_table, feature_config.user_id_feature), params),
            files.seen_pairs,
        )
        files.feature_config.write_text(feature_config.model_dump_json(indent=2))
        manifest = DatasetsManifest(
            config_name=feature_config.name, rows=rows, partition=context.partition_key,
            source_tables={"training": training_table, "validation": validation_table},
            columns={name: kind for name, kind in example_kinds.items()},
        )
        files.manifest.write_text(manifest.model_dump_json())

    return dg.MaterializeResult(
        metadata={
            "config_name": feature_config.name,
            "path": dg.MetadataValue.path(str(artifacts.path(layout.TF_DATASETS, context.partition_key))),
            **{f"{name}_rows": count for name, count in rows.items()},
            "vocabulary_sizes": dg.MetadataValue.json({k: len(v) for k, v in stats.vocabularies.items()}),
            "distinct_users": report.distinct_users,
            "distinct_items": report.distinct_items,
            # Values cut to TEXT_MAX_CHARS characters, and ids whose pretrained vector is zeros.
            "truncated_texts": dg.MetadataValue.json(report.truncated_texts),
            "unusable_pretrained_vectors": dg.MetadataValue.json(stats_builder.unusable_vectors),
        }
    )
