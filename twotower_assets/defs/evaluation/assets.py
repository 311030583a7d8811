"""Offline evaluation of one trained model against random, popularity, SVD and (small catalogues) EASE baselines.

Each sampled test user's items are ranked against the full catalog (every training item),
with the items the user saw in training removed; relevant items are the user's test items.
"""



import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from pydantic import Field, field_validator

from twotower_assets.lib import layout
from twotower_assets.lib.item_attributes import category_labels, item_categories
from twotower_assets.lib.artifacts import ArtifactStore
from twotower_assets.lib.conditions import DOWNSTREAM_CONDITION
from twotower_assets.lib.mlflow_tracking import MlflowTracking
from twotower_assets.lib.partitions import training_date, training_date_partitions
from twotower_assets.lib.retries import WAREHOUSE_RETRY_POLICY, StepConfig, retry_transient_errors_only
from twotower_assets.lib.layout import EvaluationFiles, MatchModelFiles, ModelFiles
from twotower_assets.lib.lineage import check_model_datasets
from twotower_assets.lib.metadata import rounded
from twotower_assets.model import metrics, plots
from twotower_assets.model.topk import top_k_items
from twotower_assets.warehouse.base import WarehouseResource
from twotower_assets.warehouse.errors import EmptyTableError
from twotower_assets.warehouse.queries import pair_counts_query
from twotower_assets.serving.registry import logged_model_id

MODEL_NAME = layout.EVALUATED_MODEL


class EvaluationConfig(StepConfig):
    ks: list[int] = Field(
        default=[10, 50, 100, 250, 500, 1000],
        min_length=1,
        description="Cut-offs (each >= 1); one above the catalog size is evaluated at the catalog size.",
    )
    num_users: int = Field(default=50_000, gt=0, description="Test users sampled for evaluation.")
    svd_factors: int = Field(default=100, gt=0)
    ease_regulariser: float = Field(default=500.0, gt=0, description="EASE's L2 regulariser lambda (500: best on MovieLens 100K).")
    ease_max_items: int = Field(
        default=metrics.EASE_MAX_ITEMS, ge=0,
        description="EASE is evaluated only up to this many catalogue items (a dense items x items inverse); 0 leaves it out.",
    )
    item_knn_neighbours: int = Field(
        default=100, gt=0,
        description="Neighbours per item of the item-kNN baseline, evaluated instead of EASE above ease_max_items.",
    )
    cold_user_max_events: int = Field(default=5, ge=0, description="Users with at most this many training events are 'cold'.")
    seed: int = 0

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if any(k < 1 for k in ks):
            raise ValueError(f"every k must be >= 1, got {ks}")
        return ks


def _pair_counts(warehouse: WarehouseResource, table: str, params: dict) -> pa.Table:
    return warehouse.query(pair_counts_query(warehouse.dialect, table), params)


def _matrix(pairs: pa.Table, users: pa.Array, items: pa.Array) -> sp.csr_matrix:
    """Binary users x items matrix of the pairs whose user and item are both known."""
    rows = pc.index_in(pairs["user_id"], value_set=users).to_numpy(zero_copy_only=False)
    cols = pc.index_in(pairs["item_id"], value_set=items).to_numpy(zero_copy_only=False)
    rows = np.nan_to_num(rows.astype(float), nan=-1).astype(np.int64)
    cols = np.nan_to_num(cols.astype(float), nan=-1).astype(np.int64)
    keep = (rows >= 0) & (cols >= 0)
    data = np.ones(keep.sum(), dtype=np.float32)
    matrix = sp.csr_matrix((data, (rows[keep], cols[keep])), shape=(len(users), len(items)))
    matrix.data[:] = 1.0
    return matrix


def _sorted_unique(values) -> pa.Array:
    unique = _flat(pc.unique(values))
    return unique.take(pc.sort_indices(unique))


def _flat(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _vectors(embeddings: pa.Table, rows: np.ndarray) -> np.ndarray:
    column = _flat(embeddings["embedding"]).take(pa.array(rows))
    return column.flatten().to_numpy().reshape(len(rows), -1).astype(np.float32)


def evaluate(
    user_embeddings: pa.Table,
    item_embeddings: pa.Table,
    training_pairs: pa.Table,
    test_pairs: pa.Table,
    config: EvaluationConfig,
) -> tuple[pd.DataFrame, dict]:
    """Metrics of the model and the baselines (long table) and a few counts."""
    items = _flat(item_embeddings["item_id"])
    # Sorted: the pairs come from GROUP BYs in no fixed order, and the user sample, the random
    # baseline and SVD's start vector must not depend on it.
    train_users = _sorted_unique(training_pairs["user_id"])
    train = _matrix(training_pairs, train_users, items)

    known_test_users = _sorted_unique(test_pairs["user_id"])
    known_test_users = known_test_users.filter(pc.is_in(known_test_users, user_embeddings["user_id"]))
    if len(known_test_users) == 0:
        raise EmptyTableError("no test user has an embedding: nothing to evaluate")
    rng = np.random.default_rng(config.seed)
    sample_size = min(config.num_users, len(known_test_users))
    sample = np.sort(rng.choice(len(known_test_users), size=sample_size, replace=False))
    eval_users = known_test_users.take(pa.array(sample))

    user_rows = pc.index_in(eval_users, value_set=user_embeddings["user_id"]).to_numpy()
    item_rows = pc.index_in(items, value_set=item_embeddings["item_id"]).to_numpy()
    user_vectors = _vectors(user_embeddings, user_rows)
    item_vectors = _vectors(item_embeddings, item_rows)

    train_rows_of_eval = pc.index_in(eval_users, value_set=train_users).to_numpy()
    seen = train[train_rows_of_eval]
    relevant = _matrix(test_pairs, eval_users, items)
    k_max = max(metrics.capped_ks(config.ks, len(items)))
    item_counts = np.asarray(train.sum(axis=0)).ravel()
    event_counts = _event_counts_per_item(training_pairs, items)
    popularity = item_counts / max(train.shape[0], 1)

    recommenders = {
        MODEL_NAME: lambda: top_k_items(user_vectors, item_vectors, k_max, exclude=seen),
        "random": lambda: metrics.random_recommendations(len(eval_users), len(items), k_max, exclude=seen, seed=config.seed),
        "popularity": lambda: metrics.popularity_recommendations(event_counts, len(eval_users), k_max, exclude=seen),
        "svd": lambda: metrics.svd_recommendations(
            train, train_rows_of_eval, k_max, exclude=seen, n_factors=config.svd_factors, seed=config.seed
        ),
    }
    # EASE, the strongest simple baseline on small catalogues, is only affordable up to a bound;
    # item-kNN (sparse, any size) is evaluated at every size, the gate's baseline above it.
    with_ease = 0 < len(items) <= config.ease_max_items
    if with_ease:
        recommenders["ease"] = lambda: metrics.ease_recommendations(
            train, train_rows_of_eval, k_max, exclude=seen, regulariser=config.ease_regulariser,
            max_items=config.ease_max_items,
        )
    if len(items):
        recommenders["item_knn"] = lambda: metrics.item_knn_recommendations(
            train, train_rows_of_eval, k_max, exclude=seen, neighbours=config.item_knn_neighbours,
        )
    train_events = np.asarray(seen.sum(axis=1)).ravel()
    segments = np.where(train_events <= config.cold_user_max_events, "cold", "warm")
    # One model's (users x k_max) list at a time: 50,000 x 1,000 int64 is 400 MB each.
    table = pd.concat(
        [
            metrics.evaluate_recommenders({name: recommend()}, relevant, popularity, config.ks, user_segments=segments)
            for name, recommend in recommenders.items()
        ],
        ignore_index=True,
    )
    counts = {
        "evaluated_users": int(len(eval_users)),
        "catalog_items": int(len(items)),
        "test_pairs": int(relevant.nnz),
        "cold_users": int((segments == "cold").sum()),
        "ease": "evaluated" if with_ease else f"left out: {len(items):,} items is above ease_max_items "
        f"({config.ease_max_items:,}); item-kNN evaluated instead",
    }
    return table, counts


def _event_counts_per_item(training_pairs: pa.Table, items: pa.Array) -> np.ndarray:
    cols = pc.index_in(training_pairs["item_id"], value_set=items).to_numpy(zero_copy_only=False)
    valid = ~np.isnan(cols.astype(float))
    return np.bincount(cols[valid].astype(np.int64), weights=training_pairs["events"].to_numpy()[valid], minlength=len(items))


def _figures(
    table: pd.DataFrame, item_embeddings: pa.Table, warehouse: WarehouseResource, params: dict
) -> dict[str, tuple[bytes, str]]:
    """PNG plots and their titles: metric vs k (all users), and the item-embedding PCA by each
    category column, titled by what the column holds (MovieLens: genre)."""
    title = "Full catalogue, seen items removed"
    figures = {"metric_vs_k": (plots.metric_vs_k_png(table, title=title), f"Metrics against k: {title}")}
    ids = _flat(item_embeddings["item_id"]).to_pylist()
    if len(ids) < 2:
        return figures
    vectors = _vectors(item_embeddings, np.arange(len(ids)))
    labels = category_labels(warehouse)
    for column, by_item in item_categories(warehouse, params).items():
        title = f"Item embeddings (PCA) by {labels[column]}"
        figures[f"item_pca_by_{column}"] = (
            plots.embedding_pca_png(vectors, [by_item.get(i) for i in ids], title=title, category_label=labels[column]),
            title,
        )
    return figures


METRICS_SHOWN = ("recall", "precision", "ndcg", "coverage", "novelty")


def metrics_markdown(table: pd.DataFrame, segment: str = "all") -> str:
    """One row per (k, metric), one column per model, and the model's lift over popularity."""
    wide = table[table["segment"] == segment].pivot(index="k", columns="model", values=list(METRICS_SHOWN))
    models = list(wide["recall"].columns)
    lift = MODEL_NAME in models and "popularity" in models
    header = "| k | metric | " + " | ".join(models) + (" | lift vs popularity |" if lift else " |")
    lines = [header, "|---|---|" + "---|" * (len(models) + lift)]
    for k in wide.index:
        for metric in METRICS_SHOWN:
            values = " | ".join(f"{wide.loc[k, (metric, m)]:.4f}" for m in models)
            if lift:
                baseline = wide.loc[k, (metric, "popularity")]
                ratio = wide.loc[k, (metric, MODEL_NAME)] / baseline if baseline else float("nan")
                values += f" | {ratio:.2f}x"
            lines.append(f"| {k} | {metric} | {values} |")
    return "\n".join(lines)


def log_metric_curves(run, overall: pd.DataFrame) -> None:
    """Each metric of each model as one curve over k: ``recall_at_k``, ``popularity_recall_at_k``,
    ... with MLflow's step = k, so the run page draws one chart per metric and model instead of
    one per k. The run's only: a logged model shows single numbers (:func:`log_headline_metrics`)."""
    for k, rows in overall.groupby("k"):
        run.metrics(
            {layout.evaluation_metric_key(row.model, name): getattr(row, name)
             for row in rows.itertuples() for name in METRICS_SHOWN},
            step=int(k),
        )


def headline_metrics(overall: pd.DataFrame) -> dict[str, dict[str, float]]:
    """model -> {plain key: value} of :data:`layout.HEADLINE_METRICS` (``recall_at_50``,
    ``ndcg_at_10``; ``popularity_recall_at_50``, ...), each at its k or the largest evaluated k below."""
    evaluated = overall["k"].unique()
    values = overall.set_index(["model", "k"])
    headline: dict[str, dict[str, float]] = {}
    for model in overall["model"].unique():
        for name, wanted in layout.HEADLINE_METRICS.items():
            k = layout.largest_k_up_to(evaluated, wanted) or int(min(evaluated))
            headline.setdefault(model, {})[layout.evaluation_metric_key(model, name, k)] = float(values.loc[(model, k), name])
    return headline


def log_headline_metrics(run, overall: pd.DataFrame, match_model_id: str | None) -> None:
    """The single numbers under plain keys; the evaluated model's are also the registered
    MatchModel's own (MLflow's Models view), the baselines' stay the run's."""
    for model, values in headline_metrics(overall).items():
        run.metrics(values, model_id=match_model_id if model == MODEL_NAME else None)


def _match_model_id(artifacts: ArtifactStore, mlflow: MlflowTracking, partition_key: str) -> str | None:
    """The logged model of the date's registered MatchModel, the model this evaluation judges."""
    files = MatchModelFiles(artifacts.path(layout.MATCH_MODEL, partition_key))
    if not files.registration_file.is_file():
        return None
    registration = files.registration()
    with mlflow.reporting_failures(f"reading {registration.name} version {registration.version}"):
        return logged_model_id(mlflow.client(), registration.name, registration.version)


@dg.asset(
    key=layout.EVALUATION_METRICS,
    partitions_def=training_date_partitions,
    # match_model: the registered candidate is what the quality gate judges and tags.
    deps=[layout.TWO_TOWER_MODEL, layout.MATCH_MODEL, layout.TRAINING_EVENTS, layout.TEST_EVENTS],
    group_name="evaluation",
    kinds={"python", "mlflow"},
    description="Precision, recall, NDCG, coverage and novelty at k for the model and baselines.",
    automation_condition=DOWNSTREAM_CONDITION,
    code_version="1",
    retry_policy=WAREHOUSE_RETRY_POLICY,
)
@retry_transient_errors_only
def evaluation_metrics(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    warehouse: WarehouseResource,
    artifacts: ArtifactStore,
    mlflow: MlflowTracking,
) -> dg.MaterializeResult:
    model = ModelFiles(artifacts.require(layout.TWO_TOWER_MODEL, context.partition_key))
    summary = model.summary()
    check_model_datasets(artifacts, context.partition_key, summary, "evaluation_metrics")
    params = {"train_date": training_date(context)}
    training_pairs = _pair_counts(warehouse, warehouse.table_name(layout.TRAINING_EVENTS), params)
    test_pairs = _pair_counts(warehouse, warehouse.table_name(layout.TEST_EVENTS), params)
    if test_pairs.num_rows == 0:
        raise EmptyTableError(f"test_events has no rows for {context.partition_key}: nothing to evaluate")
    table, counts = evaluate(
        pq.read_table(model.user_embeddings),
        pq.read_table(model.item_embeddings),
        training_pairs,
        test_pairs,
        config,
    )
    markdown = metrics_markdown(table)
    segment_markdown = {
        segment: metrics_markdown(table, segment) for segment in sorted(set(table["segment"]) - {"all"})
    }
    figures = _figures(table, pq.read_table(model.item_embeddings), warehouse, params)
    match_model_id = _match_model_id(artifacts, mlflow, context.partition_key)
    with artifacts.writing(layout.EVALUATION_METRICS, context.partition_key) as directory, mlflow.active(summary.mlflow_run_id) as run:
        out = EvaluationFiles(directory)
        table.to_csv(out.metrics, index=False)
        for name, (png, _) in figures.items():
            out.plot(name).write_bytes(png)
            run.artifact(out.plot(name), "plots")
        out.write_counts(counts)
        overall = table[table["segment"] == "all"]
        log_headline_metrics(run, overall, match_model_id)
        log_metric_curves(run, overall)
        run.artifact(out.metrics, "evaluation")
        run.text(markdown, "metrics.md", "evaluation")

    overall = table[table["segment"] == "all"].set_index(["model", "k"])
    headline_k = 50 if 50 in overall.index.get_level_values("k") else int(overall.index.get_level_values("k").min())
    return dg.MaterializeResult(
        metadata={
            "metrics": dg.MetadataValue.md(markdown),
            **{f"metrics_{segment}_users": dg.MetadataValue.md(text) for segment, text in segment_markdown.items()},
            **{f"plot_{name}": dg.MetadataValue.md(plots.markdown_image(png, title)) for name, (png, title) in figures.items()},
            f"recall_at_{headline_k}": rounded(overall.loc[(MODEL_NAME, headline_k), "recall"]),
            f"popularity_recall_at_{headline_k}": rounded(overall.loc[("popularity", headline_k), "recall"]),
            f"lift_over_popularity_at_{headline_k}": rounded(
                overall.loc[(MODEL_NAME, headline_k), "recall"] / overall.loc[("popularity", headline_k), "recall"]
                if overall.loc[("popularity", headline_k), "recall"] else float("nan")
            ),
            **counts,
            "mlflow_run_id": summary.mlflow_run_id,
            "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(summary.mlflow_experiment_id, summary.mlflow_run_id)),
        }
    )
