"""The evaluation and training plots, as PNG bytes.

Three figures: a metric against k for the model and each baseline, a 2-D PCA of the item
embeddings coloured by a category, and training / validation loss per epoch. Each function
returns PNG bytes, which the Dagster assets log to MLflow and embed in their markdown
metadata (:func:`markdown_image`), so the same picture shows in both UIs.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas:
no pyplot, no global state, no display needed. No TensorFlow, no Dagster.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # Headless: Dagster workers and CI have no display.

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = [
    "embedding_pca_figure",
    "embedding_pca_png",
    "histograms_png",
    "loss_curves_png",
    "markdown_image",
    "metric_vs_k_png",
    "pca_2d",
    "grouped_series_over_dates_figure",
    "grouped_series_over_dates_png",
]

MAX_PCA_POINTS = 20_000
"""Items drawn in the PCA plot at most (a seeded sample beyond that): a scatter of 200,000
points is slow to draw and no more readable."""

MAX_CATEGORIES = 12
"""Categories with their own colour; rarer ones are drawn together as 'other'."""

_DPI = 90


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """Markdown that shows ``png`` inline (a base64 data URI), for ``dg.MetadataValue.md``."""
    if not png.startswith(b"\x89PNG"):
        raise ValueError("not PNG bytes")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def metric_vs_k_png(
    table: pd.DataFrame,
    metrics: Sequence[str] = ("precision", "recall", "ndcg"),
    segment: str = "all",
    title: str = "",
) -> bytes:
    """One panel per metric: the metric against k, one line per model.

    ``table`` is the long table of :func:`twotower_assets.model.metrics.evaluate_recommenders`
    (columns model, segment, k and the metrics); rows of other segments are ignored.
    """
    required = {"model", "k", *metrics}
    missing = required - set(table.columns)
    if missing:
        raise ValueError(f"metric table has no column {sorted(missing)}")
    if not metrics:
        raise ValueError("no metric to plot")
    rows = table[table["segment"] == segment] if "segment" in table.columns else table
    if rows.empty:
        raise ValueError(f"metric table has no rows for segment {segment!r}")
    figure = Figure(figsize=(4.2 * len(metrics), 3.6))
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics):
        for model, group in rows.groupby("model", sort=True):
            group = group.sort_values("k")
            axis.plot(group["k"], group[metric], marker="o", label=str(model))
        axis.set_xscale("log")
        axis.set_xlabel("k")
        axis.set_ylabel(f"{metric}@k")
        axis.set_title(metric)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return _png(figure)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The rows of ``vectors`` projected on their first two principal components."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] < 2 or vectors.shape[1] < 2:
        raise ValueError(f"need at least 2 vectors of at least 2 dimensions, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or inf")
    centred = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T


def embedding_pca_png(
    vectors: np.ndarray,
    categories: Sequence[str] | None = None,
    title: str = "Item embeddings (PCA)",
    seed: int = 0,
    category_label: str = "category",
) -> bytes:
    """Scatter of the vectors' 2-D PCA, one colour per category (the most frequent ones)."""
    return _png(embedding_pca_figure(vectors, categories, title, seed, category_label))


def embedding_pca_figure(
    vectors: np.ndarray,
    categories: Sequence[str] | None = None,
    title: str = "Item embeddings (PCA)",
    seed: int = 0,
    category_label: str = "category",
) -> Figure:
    """The figure of :func:`embedding_pca_png`: the legend (titled ``category_label``) lists the
    largest category first, with its count, beside the axes."""
    vectors = np.asarray(vectors)
    labels = None
    if categories is not None:
        labels = np.asarray(["none" if c is None else str(c) for c in categories], dtype=object)
        if labels.shape[0] != vectors.shape[0]:
            raise ValueError(f"{labels.shape[0]} categories for {vectors.shape[0]} vectors")
    if vectors.ndim == 2 and vectors.shape[0] > MAX_PCA_POINTS:
        keep = np.sort(np.random.default_rng(seed).choice(vectors.shape[0], MAX_PCA_POINTS, replace=False))
        vectors = vectors[keep]
        labels = labels[keep] if labels is not None else None
    points = pca_2d(vectors)
    figure = Figure(figsize=(6.4 if labels is None else 8.0, 5.2), layout="constrained")
    axis = figure.subplots()
    if labels is None:
        axis.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6)
    else:
        names, counts = np.unique(labels, return_counts=True)
        ranked = [str(n) for n in names[np.argsort(-counts, kind="stable")]]
        shown = ranked[:MAX_CATEGORIES]
        grouped = np.where(np.isin(labels, shown), labels, "other")
        # tab20: distinct colours for all MAX_CATEGORIES + "other" (the default cycle repeats after 10).
        colours = matplotlib.colormaps["tab20"]
        for number, name in enumerate(shown + (["other"] if len(ranked) > MAX_CATEGORIES else [])):
            mask = grouped == name
            axis.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.6, label=f"{name} ({int(mask.sum()):,})",
                         color=colours(number))
        # Largest category first, with its count; outside the axes so it never covers points.
        axis.legend(fontsize="x-small", markerscale=2, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                    borderaxespad=0.0, title=f"{category_label} (points)", title_fontsize="x-small")
    axis.set_xlabel("PC 1")
    axis.set_ylabel("PC 2")
    axis.set_title(title)
    return figure


def loss_curves_png(history: Mapping[str, Sequence[float]], title: str = "Training loss") -> bytes:
    """Training loss (and validation loss when present) per epoch."""
    curves = {name: list(history[name]) for name in ("loss", "val_loss") if history.get(name)}
    if "loss" not in curves:
        raise ValueError("history has no 'loss' values")
    figure = Figure(figsize=(6.0, 3.8))
    axis = figure.subplots()
    for name, values in curves.items():
        epochs = np.arange(1, len(values) + 1)
        axis.plot(epochs, values, marker="o", markersize=3, label="validation" if name == "val_loss" else "training")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend()
    return _png(figure)


def histograms_png(series: Mapping[str, Sequence[float]], xlabel: str, title: str, bins: int = 20) -> bytes:
    """One outlined histogram per named series on shared axes (e.g. per-user Jaccard@10 and @100)."""
    figure = Figure(figsize=(6.0, 3.8))
    axis = figure.subplots()
    for name, values in series.items():
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            axis.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (mean {values.mean():.3f})")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("count")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    if series:
        axis.legend()
    return _png(figure)


LINE_STYLES = ("-", "--", ":", "-.")


def grouped_series_over_dates_figure(
    groups: Mapping[str, Mapping[str, Mapping[str, float]]], title: str, ylabel: str = ""
) -> Figure:
    """Series over dates for several groups of runs on one axis: ``groups`` maps a group
    (e.g. a ``warm_start`` setting) to date (ISO text) -> series -> value.

    One colour per series and one line style per group, so the same figure of two groups
    (cold and warm starts) reads side by side; labels say ``series (group)``.
    """
    names = sorted({name for points in groups.values() for values in points.values() for name in values})
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    figure = Figure(figsize=(6.4, 4.0))
    axis = figure.subplots()
    # Dates as categories in calendar order across all groups, so the groups share the x axis.
    dates = sorted({date for points in groups.values() for date in points})
    position = {date: i for i, date in enumerate(dates)}
    for index, group in enumerate(sorted(groups)):
        points = groups[group]
        for name in names:
            xs = [d for d in sorted(points) if name in points[d]]
            if xs:
                axis.plot([position[d] for d in xs], [points[d][name] for d in xs], marker="o",
                          color=colours[name], linestyle=LINE_STYLES[index % len(LINE_STYLES)], label=f"{name} ({group})")
    axis.set_xticks(range(len(dates)), dates)
    axis.set_xlabel("training date")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.tick_params(axis="x", labelrotation=30)
    if names:
        axis.legend(fontsize="small")
    return figure


def grouped_series_over_dates_png(
    groups: Mapping[str, Mapping[str, Mapping[str, float]]], title: str, ylabel: str = ""
) -> bytes:
    """:func:`grouped_series_over_dates_figure` as PNG bytes."""
    return _png(grouped_series_over_dates_figure(groups, title, ylabel))
