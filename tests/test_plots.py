"""The plots: real PNGs of the expected size, readable data URIs, clear errors on bad input."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
from matplotlib import image
from matplotlib.backends.backend_agg import FigureCanvasAgg

from twotower_assets.model import plots


def _image(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return image.imread(io.BytesIO(png), format="png")


def _metric_table() -> pd.DataFrame:
    rows = []
    for model, scale in (("two_tower", 1.0), ("popularity", 0.5), ("random", 0.1)):
        for segment in ("all", "cold"):
            for k in (10, 50, 100):
                rows.append({"model": model, "segment": segment, "k": k, "precision": scale / k,
                             "recall": scale * k / 100, "ndcg": scale * 0.3, "coverage": 0.1, "novelty": 5.0})
    return pd.DataFrame(rows)


def test_metric_vs_k_has_one_panel_per_metric():
    one = _image(plots.metric_vs_k_png(_metric_table(), metrics=("recall",)))
    three = _image(plots.metric_vs_k_png(_metric_table(), title="t"))
    assert three.shape[1] > 2 * one.shape[1]  # three panels side by side
    assert three.shape[0] > 100


def test_metric_vs_k_errors():
    with pytest.raises(ValueError, match="no column"):
        plots.metric_vs_k_png(_metric_table().drop(columns=["ndcg"]))
    with pytest.raises(ValueError, match="no rows for segment 'warm'"):
        plots.metric_vs_k_png(_metric_table(), segment="warm")


def test_pca_projects_on_the_main_directions():
    rng = np.random.default_rng(0)
    # Variance mostly along the first two axes: PCA keeps them, in order.
    vectors = rng.normal(size=(200, 5)) * np.array([10.0, 3.0, 0.1, 0.1, 0.1])
    points = plots.pca_2d(vectors)
    assert points.shape == (200, 2)
    assert np.var(points[:, 0]) > np.var(points[:, 1]) > 1.0
    # The first component is the first axis, up to its sign.
    assert abs(np.corrcoef(points[:, 0], vectors[:, 0])[0, 1]) > 0.99
    assert abs(np.corrcoef(points[:, 1], vectors[:, 1])[0, 1]) > 0.99


def test_embedding_pca_png_with_and_without_categories():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    categories = [f"c{i % 20}" for i in range(299)] + [None]  # more than MAX_CATEGORIES, one null
    assert _image(plots.embedding_pca_png(vectors, categories)).shape[0] > 100
    assert _image(plots.embedding_pca_png(vectors)).shape[0] > 100


def test_embedding_pca_legend_is_ordered_by_count_and_beside_the_points():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(60, 4))
    categories = ["rare"] * 5 + ["common"] * 40 + ["middle"] * 15
    figure = plots.embedding_pca_figure(vectors, categories)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    axis = figure.axes[0]
    legend = axis.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["common (40)", "middle (15)", "rare (5)"]
    renderer = canvas.get_renderer()
    legend_box, axes_box = legend.get_window_extent(renderer), axis.get_window_extent(renderer)
    assert legend_box.x0 >= axes_box.x1  # to the right of the axes: it covers no point
    assert legend.get_title().get_text() == "category (points)"
    genre = plots.embedding_pca_figure(vectors, categories, title="by genre", category_label="genre")
    assert genre.axes[0].get_legend().get_title().get_text() == "genre (points)"
    assert genre.axes[0].get_title() == "by genre"


def test_embedding_pca_errors():
    with pytest.raises(ValueError, match="3 categories for 4 vectors"):
        plots.embedding_pca_png(np.zeros((4, 3)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least 2 vectors"):
        plots.embedding_pca_png(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        plots.pca_2d(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_loss_curves():
    assert _image(plots.loss_curves_png({"loss": [3.0, 2.0, 1.5], "val_loss": [3.1, 2.5, 2.4]})).shape[0] > 100
    assert _image(plots.loss_curves_png({"loss": [1.0]})).shape[0] > 100
    with pytest.raises(ValueError, match="no 'loss'"):
        plots.loss_curves_png({"val_loss": [1.0]})


def test_grouped_series_share_a_colour_per_series_and_a_line_style_per_group():
    groups = {
        "none": {"2026-05-25": {"jaccard": 0.3, "overlap": 0.6}, "2026-05-18": {"jaccard": 0.2, "overlap": 0.5}},
        "previous": {"2026-06-01": {"jaccard": 0.7}, "2026-05-25": {"jaccard": 0.6}},
    }
    figure = plots.grouped_series_over_dates_figure(groups, "overlap")
    [axis] = figure.axes
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert set(lines) == {"jaccard (none)", "overlap (none)", "jaccard (previous)"}
    # Dates in calendar order across both groups, one shared axis.
    assert [tick.get_text() for tick in axis.get_xticklabels()] == ["2026-05-18", "2026-05-25", "2026-06-01"]
    assert list(lines["jaccard (none)"].get_xdata()) == [0, 1] and list(lines["jaccard (none)"].get_ydata()) == [0.2, 0.3]
    assert list(lines["jaccard (previous)"].get_xdata()) == [1, 2]
    assert lines["jaccard (none)"].get_color() == lines["jaccard (previous)"].get_color()
    assert lines["jaccard (none)"].get_linestyle() != lines["jaccard (previous)"].get_linestyle()
    assert lines["jaccard (none)"].get_linestyle() == lines["overlap (none)"].get_linestyle()
    assert plots.grouped_series_over_dates_png(groups, "overlap").startswith(b"\x89PNG")


def test_markdown_image_is_a_data_uri_of_the_png():
    png = plots.loss_curves_png({"loss": [2.0, 1.0]})
    markdown = plots.markdown_image(png, "loss")
    assert markdown.startswith("![loss](data:image/png;base64,")
    encoded = markdown.split("base64,", 1)[1].rstrip(")")
    assert base64.b64decode(encoded) == png
    with pytest.raises(ValueError, match="not PNG"):
        plots.markdown_image(b"GIF89a", "x")


# ------------------------------------------------------- plots in Dagster and MLflow


@pytest.mark.slow
def test_plots_reach_dagster_metadata_and_mlflow(tiny_resources):
    from helpers.graph import materialize_all, tiny_run_config
    from mlflow import MlflowClient

    result = materialize_all(
        tiny_resources,
        selection=["click_events", "training_events", "validation_events", "test_events", "tf_datasets",
                   "two_tower_model", "evaluation_metrics"],
        # The median test user has 7 distinct training items (tiny data, with daily sessions):
        # both segments are populated.
        run_config={"ops": {op: value for op, value in tiny_run_config(
            evaluation_metrics={"cold_user_max_events": 7})["ops"].items() if op != "tuned_hyperparameters"}},
    )
    training = result.asset_materializations_for_node("two_tower_model")[0].metadata
    assert training["loss_per_epoch"].value.startswith("![training and validation loss per epoch](data:image/png;base64,")
    evaluation = result.asset_materializations_for_node("evaluation_metrics")[0].metadata
    for name in ("metric_vs_k", "item_pca_by_offer_category_id", "item_pca_by_offer_subcategory_id"):
        markdown = evaluation[f"plot_{name}"].value
        encoded = markdown.split("base64,", 1)[1].rstrip(")")
        assert base64.b64decode(encoded).startswith(b"\x89PNG")
    # Titled by what the column holds, not by the schema's column name.
    assert evaluation["plot_item_pca_by_offer_category_id"].value.startswith("![Item embeddings (PCA) by category](")
    assert evaluation["plot_item_pca_by_offer_subcategory_id"].value.startswith("![Item embeddings (PCA) by subcategory](")
    # The per-segment breakdown: one table per segment, same layout as the overall one.
    for segment in ("cold", "warm"):
        table = evaluation[f"metrics_{segment}_users"].value
        assert table.splitlines()[0].startswith("| k | metric |") and "| recall |" in table

    client = MlflowClient(tracking_uri=tiny_resources["mlflow"].tracking_uri)
    run_id = evaluation["mlflow_run_id"].value
    logged = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/loss.png", "plots/metric_vs_k.png", "plots/item_pca_by_offer_category_id.png"} <= logged
