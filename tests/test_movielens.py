"""MovieLens loader: both file layouts, the click-event mapping, bad files, the source asset.

Fixtures under tests/fixtures/movielens/ hold the same 13 ratings, 4 users and 6 movies in
GroupLens's layout (u.data, latin-1 u.user/u.item with CRLF lines) and RecBole's atomic files.
"""

import datetime as dt
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest

from helpers.graph import REPO, failure_text, materialize_all
from twotower_assets.data.movielens import (
    MOVIELENS_EVENT_SCHEMA,
    MovieLensFormatError,
    click_event_table,
    detect_format,
    load_movielens,
    recent_items,
)
from twotower_assets.model.features import load_feature_config

FIXTURES = Path(__file__).parent / "fixtures" / "movielens"
GROUPLENS = FIXTURES / "grouplens"
RECBOLE = FIXTURES / "recbole"


@pytest.fixture(params=["grouplens", "recbole"])
def layout(request) -> Path:
    return FIXTURES / request.param


def test_detects_both_layouts():
    assert detect_format(GROUPLENS) == "grouplens"
    assert detect_format(RECBOLE) == "recbole"


def test_both_layouts_load_the_same_data():
    grouplens, recbole = load_movielens(GROUPLENS), load_movielens(RECBOLE)
    for name in ("ratings", "users", "items"):
        assert getattr(grouplens, name).equals(getattr(recbole, name)), name
    assert grouplens.num_ratings == 13


def test_item_attributes(layout):
    items = {row["item_id"]: row for row in load_movielens(layout).items.to_pylist()}
    # The "(1995)" suffix of GroupLens titles is dropped, as in RecBole's files.
    assert items["1"] == {"item_id": "1", "title": "Toy Story", "genres": "Animation Children's Comedy", "release_year": 1995}
    assert items["3"]["title"] == "Café au lait"  # latin-1 in u.item, UTF-8 in RecBole's file
    # The title's year, even where GroupLens's release date says 1997.
    assert items["6"]["release_year"] == 1996
    assert items["5"]["release_year"] is None and items["5"]["genres"] == "unknown"


def test_user_attributes(layout):
    users = load_movielens(layout).users.to_pylist()
    assert users[0] == {"user_id": "1", "age": 24, "gender": "M", "occupation": "technician", "zip_code": "85711"}


def test_click_events_table(layout):
    events = click_event_table(load_movielens(layout))
    assert events.schema == MOVIELENS_EVENT_SCHEMA
    assert events.num_rows == 13
    stamps = events["event_timestamp"].to_numpy()
    assert (np.diff(stamps) >= 0).all()
    first = events.slice(0, 1).to_pylist()[0]
    # 874965758 = 1997-09-22 22:02:38 UTC, a Monday.
    assert first["event_date"] == dt.date(1997, 9, 22)
    assert (first["event_hour"], first["event_day"], first["event_month"]) == (22, 1, "9")
    assert first["user_zip_prefix"] == "85" and first["user_gender"] == "M" and first["user_age"] == 24
    assert first["item_title"] == "Toy Story" and first["offer_category_id"] == "Animation"
    assert first["item_release_year"] == 1995


def test_end_date_shifts_every_event_by_whole_days(layout):
    data = load_movielens(layout)
    original = click_event_table(data)
    shifted = click_event_table(data, end_date=dt.date(2026, 5, 31))
    assert shifted["event_date"][-1].as_py() == dt.date(2026, 5, 31)
    gaps = shifted["event_timestamp"].to_numpy() - original["event_timestamp"].to_numpy()
    assert len(set(gaps.tolist())) == 1 and gaps[0] % 86_400 == 0
    assert shifted["event_hour"].equals(original["event_hour"])


def test_recent_items_are_strictly_earlier_and_newest_first():
    events = click_event_table(load_movielens(RECBOLE))
    user_one = [row for row in events.to_pylist() if row["user_id"] == "1"]
    recent = {row["item_id"]: row["user_recent_items"] for row in user_one}
    assert recent["1"] == ""
    # Items 2 and 4 were rated in the same second: neither sees the other.
    assert recent["2"] == "1" and recent["4"] == "1"
    assert recent["6"].split()[2] == "1" and set(recent["6"].split()[:2]) == {"2", "4"}
    capped = click_event_table(load_movielens(RECBOLE), recent_item_count=1)
    assert all(len(value.split()) <= 1 for value in capped["user_recent_items"].to_pylist())


def test_recent_items_from_a_separate_history():
    # The bench's use: test events see only training ratings; unknown users see nothing.
    out = recent_items(
        events_user=np.array(["a", "a", "z"]),
        events_time=np.array([10, 100, 50]),
        history_user=np.array(["a", "a", "a", "b"]),
        history_item=np.array(["i1", "i2", "i3", "i4"]),
        history_time=np.array([5, 20, 200, 1]),
        k=5,
    )
    assert out == ["i1", "i2 i1", ""]
    with pytest.raises(ValueError, match="k must be"):
        recent_items(np.array(["a"]), np.array([1]), np.array(["a"]), np.array(["i"]), np.array([0]), k=-1)


def test_movielens_feature_config_matches_the_event_table():
    config = load_feature_config("movielens-features")
    config.check_columns(MOVIELENS_EVENT_SCHEMA.names, source="MovieLens click events")
    assert config.user_id_feature == "user_id"


# --------------------------------------------------------------------------- bad input


def _copy(layout: Path, tmp_path: Path) -> Path:
    target = tmp_path / layout.name
    shutil.copytree(layout, target)
    return target


def test_missing_directory_names_the_download(tmp_path):
    with pytest.raises(MovieLensFormatError, match="grouplens.org"):
        load_movielens(tmp_path / "nowhere")
    with pytest.raises(MovieLensFormatError, match="neither"):
        load_movielens(tmp_path)


def test_missing_companion_file(tmp_path):
    path = _copy(GROUPLENS, tmp_path)
    (path / "u.user").unlink()
    with pytest.raises(MovieLensFormatError, match="missing MovieLens file .*u.user"):
        load_movielens(path)


def test_malformed_line_is_named(tmp_path):
    path = _copy(GROUPLENS, tmp_path)
    with (path / "u.data").open("a") as f:
        f.write("1\t2\t3\n")
    with pytest.raises(MovieLensFormatError, match=r"u.data, line 14: expected 4"):
        load_movielens(path)


def test_non_numeric_rating(tmp_path):
    path = _copy(RECBOLE, tmp_path)
    with (path / "ml-tiny.inter").open("a") as f:
        f.write("1\t3\tgood\t874965758\n")
    with pytest.raises(MovieLensFormatError, match="rating 'good' is not a number"):
        load_movielens(path)


def test_recbole_header_without_a_field(tmp_path):
    path = _copy(RECBOLE, tmp_path)
    item_file = path / "ml-tiny.item"
    lines = item_file.read_text().splitlines()
    item_file.write_text("\n".join([lines[0].replace("class:token_seq", "genre:token_seq"), *lines[1:]]) + "\n")
    with pytest.raises(MovieLensFormatError, match=r"header has no field \['class'\]"):
        load_movielens(path)


def test_ratings_of_unknown_items(tmp_path):
    path = _copy(GROUPLENS, tmp_path)
    with (path / "u.data").open("a") as f:
        f.write("1\t999\t4\t874965758\n")
    with pytest.raises(MovieLensFormatError, match="item_id values missing from the items file .*'999'"):
        load_movielens(path)


def test_no_ratings(tmp_path):
    path = _copy(GROUPLENS, tmp_path)
    (path / "u.data").write_text("")
    with pytest.raises(MovieLensFormatError, match="has no ratings"):
        load_movielens(path)


# ------------------------------------------------------------------------ source asset


def test_click_events_asset_loads_movielens(tiny_resources):
    from twotower_assets.defs.source.assets import click_events

    # An events backfill of every event day from the first partition to end_date, in one run.
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
    from twotower_assets.lib.partitions import PARTITIONS_START

    result = dg.materialize(
        [click_events],
        resources={"warehouse": tiny_resources["warehouse"]},
        run_config={"ops": {"click_events": {"config": {
            "source": "movielens", "movielens_path": str(GROUPLENS), "end_date": "2026-05-31",
        }}}},
        tags={ASSET_PARTITION_RANGE_START_TAG: PARTITIONS_START, ASSET_PARTITION_RANGE_END_TAG: "2026-05-31"},
    )
    assert result.success
    everything = click_event_table(load_movielens(GROUPLENS), dt.date(2026, 5, 31))
    in_range = [d for d in everything["event_date"].to_pylist() if d >= dt.date.fromisoformat(PARTITIONS_START)]
    warehouse = tiny_resources["warehouse"]
    table = warehouse.query(f"SELECT * FROM {warehouse.dialect.table(warehouse.table_name('click_events'))}")
    assert table.num_rows == len(in_range) > 0
    assert sorted(table["event_date"].to_pylist()) == sorted(in_range)
    assert set(MOVIELENS_EVENT_SCHEMA.names) <= set(table.column_names)
    [materialisation] = {m.partition: m for m in result.asset_materializations_for_node("click_events")
                         if m.partition == "2026-05-31"}.values()
    metadata = materialisation.metadata
    assert metadata["dagster/row_count"].value == len(in_range) and metadata["source"].value == "movielens"


def test_click_events_asset_needs_a_path(tiny_resources):
    from twotower_assets.defs.source.assets import click_events

    result = dg.materialize(
        [click_events],
        resources={"warehouse": tiny_resources["warehouse"]},
        run_config={"ops": {"click_events": {"config": {"source": "movielens"}}}},
        partition_key="2026-05-31",
        raise_on_error=False,
    )
    assert not result.success
    assert "source is 'movielens' but neither movielens_path nor TWOTOWER_MOVIELENS_PATH is set" in failure_text(result)


def test_click_events_reads_the_movielens_path_from_the_environment(tiny_resources, monkeypatch):
    """The packaged run config names no path: TWOTOWER_MOVIELENS_PATH points at the files."""
    import yaml

    from twotower_assets.defs.source.assets import click_events

    packaged = yaml.safe_load((REPO / "configs" / "run" / "movielens.yaml").read_text())["ops"]["click_events"]["config"]
    assert "movielens_path" not in packaged
    monkeypatch.setenv("TWOTOWER_MOVIELENS_PATH", str(GROUPLENS))
    result = dg.materialize(
        [click_events],
        resources={"warehouse": tiny_resources["warehouse"]},
        run_config={"ops": {"click_events": {"config": packaged}}},
        partition_key="2026-05-31",
    )
    assert result.success
    [metadata] = [m.metadata for m in result.asset_materializations_for_node("click_events") if m.partition == "2026-05-31"]
    assert metadata["movielens_path"].value == str(GROUPLENS)
    events = click_event_table(load_movielens(GROUPLENS), dt.date(2026, 5, 31))
    assert metadata["dagster/row_count"].value == sum(d == dt.date(2026, 5, 31) for d in events["event_date"].to_pylist()) > 0


# ------------------------------------------------------ full-catalogue softmax (opt-in)


def _fixture_examples():
    from twotower_assets.model.datasets import FeatureStatsBuilder, batch_to_features, feature_kinds

    config = load_feature_config("movielens-features")
    events = click_event_table(load_movielens(RECBOLE))
    kinds = feature_kinds(config)
    events = events.append_column("item_sampling_probability", pa.array(np.full(events.num_rows, 1 / 6)))
    batch = events.combine_chunks().to_batches()[0]
    builder = FeatureStatsBuilder(config)
    builder.update(batch)
    features = batch_to_features(batch, {**kinds, "item_sampling_probability": "number"})
    items = load_movielens(RECBOLE).items.rename_columns(["item_id", "item_title", "item_genres", "item_release_year"])
    catalog = batch_to_features(items.combine_chunks().to_batches()[0], {c: kinds[c] for c in config.item_columns})
    return config, builder.build(), features, catalog


def test_catalog_softmax_is_the_exact_cross_entropy_over_every_item():
    import tensorflow as tf

    from twotower_assets.model.negatives import FullCatalogNegatives
    from twotower_assets.model.towers import TwoTowerModel

    config, stats, features, catalog = _fixture_examples()
    model = TwoTowerModel(config, stats, embedding_size=8, temperature=0.2, negatives=FullCatalogNegatives(), catalog=catalog)
    inputs = {k: tf.constant(v) for k, v in features.items()}
    loss = float(model.compute_loss(inputs))
    users = model.user_tower(inputs).numpy()
    items = model.item_tower({k: tf.constant(v) for k, v in catalog.items()}).numpy()
    logits = users @ items.T / 0.2
    rows = [list(catalog["item_id"]).index(i) for i in features["item_id"]]
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert loss == pytest.approx(-log_softmax[np.arange(len(rows)), rows].mean(), rel=1e-5)


def test_catalog_softmax_trains_and_refuses_an_incomplete_catalog():
    import tensorflow as tf

    from twotower_assets.model.negatives import FullCatalogNegatives
    from twotower_assets.model.recipes import ModelRecipe, Optimizer, Schedule, Task, Towers
    from twotower_assets.model.training import TrainingParams, train_two_tower

    config, stats, features, catalog = _fixture_examples()
    params = TrainingParams(recipe=ModelRecipe(
        towers=Towers(embedding_size=8), task=Task(negatives=FullCatalogNegatives()),
        optimizer=Optimizer(learning_rate=0.05), schedule=Schedule(batch_size=4, epochs=3),
    ))
    dataset = tf.data.Dataset.from_tensor_slices(features)
    result = train_two_tower(config, stats, dataset, 13, dataset, params, catalog=catalog)
    assert result.epochs_run == 3 and all(np.isfinite(result.history["val_loss"]))
    partial = {k: v[:3] for k, v in catalog.items()}
    with pytest.raises(ValueError, match="training items are not in the catalog"):
        train_two_tower(config, stats, dataset, 13, None, params, catalog=partial)


# ---------------------------------------------------- the asset graph on MovieLens files


def _write_grouplens(path: Path, users: int = 60, items: int = 40, seed: int = 3) -> None:
    """A small MovieLens-shaped data set: users prefer one of four genres, rate 12-30 movies."""
    from twotower_assets.data.movielens import GROUPLENS_GENRES

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    genre_of = rng.integers(1, 5, items)  # Action, Adventure, Animation, Children's
    lines = []
    for user in range(1, users + 1):
        liked = rng.integers(1, 5)
        weights = np.where(genre_of == liked, 6.0, 1.0)
        chosen = rng.choice(items, size=int(rng.integers(12, 31)), replace=False, p=weights / weights.sum())
        start = 880_000_000 + int(rng.integers(0, 5_000_000))
        for n, item in enumerate(chosen):
            lines.append(f"{user}\t{item + 1}\t{int(rng.integers(1, 6))}\t{start + n * 3_600}")
    (path / "u.data").write_text("\n".join(lines) + "\n")
    (path / "u.user").write_text(
        "".join(f"{u}|{20 + u % 40}|{'MF'[u % 2]}|{['student', 'writer', 'other'][u % 3]}|{10000 + u}\n" for u in range(1, users + 1)),
        encoding="latin-1",
    )
    rows = []
    for item in range(items):
        flags = ["0"] * len(GROUPLENS_GENRES)
        flags[genre_of[item]] = "1"
        rows.append("|".join([str(item + 1), f"Movie {item + 1} ({1980 + item % 20})", "01-Jan-1990", "", "url", *flags]))
    (path / "u.item").write_text("\n".join(rows) + "\n", encoding="latin-1")


@pytest.mark.slow
def test_whole_graph_on_movielens_files(tmp_path, tiny_resources):
    import yaml

    data = tmp_path / "ml"
    _write_grouplens(data)
    run_config = yaml.safe_load((REPO / "configs" / "run" / "movielens.yaml").read_text())
    ops = run_config["ops"]
    ops["click_events"]["config"]["movielens_path"] = str(data)
    # The opt-in exact softmax, so its path through the asset (catalogue from the items dataset) runs too.
    ops["two_tower_model"]["config"] = {
        "recipe": "movielens", "towers": {"embedding_size": 8}, "schedule": {"batch_size": 128, "epochs": 3},
        "task": {"negatives": {"kind": "full_catalog"}},
    }
    ops["evaluation_metrics"]["config"].update({"ks": [5, 10, 20], "num_users": 100, "svd_factors": 5})
    ops["tuned_hyperparameters"] = {"config": {"recipe": "movielens", "n_trials": 1, "max_epochs": 2, "k": 10}}
    result = materialize_all(
        tiny_resources,
        selection=["click_events", "training_events", "validation_events", "test_events", "tf_datasets",
                   "tuned_hyperparameters", "two_tower_model", "evaluation_metrics", "match_model"],
        run_config=run_config,
    )
    assert result.success
    [source] = [m.metadata for m in result.asset_materializations_for_node("click_events") if m.partition == "2026-06-01"]
    assert source["source"].value == "movielens" and source["last_event_date"].value == "2026-05-31"
    training = result.asset_materializations_for_node("two_tower_model")[0].metadata
    assert training["config_name"].value == "movielens-features" and training["items"].value == 40
    evaluation = result.asset_materializations_for_node("evaluation_metrics")[0].metadata
    # MovieLens's first genre is its offer_category_id: the PCA is coloured, and titled, by genre.
    assert evaluation["plot_item_pca_by_offer_category_id"].value.startswith("![Item embeddings (PCA) by genre](")
    assert evaluation["evaluated_users"].value > 0
