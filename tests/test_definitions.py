"""The code location: how Dagster finds it, and the lineage the README promises."""

import subprocess
import sys
import tomllib

import dagster as dg
import yaml

from helpers.graph import REPO


def test_workspace_and_pyproject_load_the_same_module():
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    [location] = workspace["load_from"]
    assert location["python_module"]["module_name"] == pyproject["tool"]["dagster"]["module_name"]
    assert location["python_module"]["module_name"] == "twotower_assets.definitions"


def test_legacy_keras_is_switched_on_in_one_place_before_tensorflow():
    hits = [p for p in (REPO / "twotower_assets").rglob("*.py") if "TF_USE_LEGACY_KERAS" in p.read_text()]
    assert [p.relative_to(REPO).as_posix() for p in hits] == ["twotower_assets/__init__.py"]
    script = "import twotower_assets.model.towers as t, tensorflow as tf; print(type(tf.keras.layers.Dense(1)).__module__)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("tf_keras")


def test_lineage_runs_from_click_events_to_the_embedding_tables():
    from twotower_assets.definitions import defs

    graph = defs.resolve_asset_graph()

    def parents(key: str) -> set[str]:
        return {k.to_user_string() for k in graph.get(dg.AssetKey(key)).parent_keys}

    assert parents("training_events") == {"click_events"}
    assert {"training_events", "validation_events"} <= parents("tf_datasets")
    assert parents("tuned_hyperparameters") == {"tf_datasets"}
    assert parents("two_tower_model") == {"tf_datasets", "tuned_hyperparameters"}
    assert parents("match_model") == {"two_tower_model"}
    assert {"two_tower_model", "match_model"} <= parents("evaluation_metrics")
    # Everything published sits behind evaluation_metrics, whose blocking quality gate guards it.
    for published in ("two_tower_user_embedding_history", "two_tower_item_embedding_history",
                      "two_tower_recommendations", "item_ann_index", "two_tower_retriever", "champion"):
        assert "evaluation_metrics" in parents(published), published
    assert parents("two_tower_user_embedding_history") == {"match_model", "evaluation_metrics"}
    partitioned = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).partitions_def}
    assert {"training_events", "tf_datasets", "tuned_hyperparameters", "two_tower_model", "evaluation_metrics",
            "match_model",
            "two_tower_user_embedding_history", "two_tower_item_embedding_history", "item_ann_index",
            "two_tower_retriever", "champion"} <= partitioned


GROUPS_IN_DATA_ORDER = ["source", "splits", "training", "evaluation", "publishing"]


def test_groups_follow_the_data_so_the_graph_reads_in_one_direction():
    """No asset feeds a group that comes before its own: the UI lays groups out by their edges."""
    from twotower_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    backwards = []
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.group_name in GROUPS_IN_DATA_ORDER, (key, node.group_name)
        for parent in node.parent_keys:
            parent_group = graph.get(parent).group_name
            if GROUPS_IN_DATA_ORDER.index(parent_group) > GROUPS_IN_DATA_ORDER.index(node.group_name):
                backwards.append(f"{parent.to_user_string()} ({parent_group}) -> {key.to_user_string()} ({node.group_name})")
    assert not backwards, backwards


def test_the_shipped_instance_config_turns_off_the_community_dialog(tmp_path):
    """configs/dagster.yaml, copied as the README says: the UI opens on the graph, not a dialog."""
    import shutil

    shutil.copy(REPO / "configs" / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert not instance.nux_enabled


def test_training_date_assets_say_how_their_partition_health_reads():
    """A daily calendar trained weekly is mostly grey in the UI; each asset's description says why."""
    from twotower_assets.definitions import defs
    from twotower_assets.lib.partitions import training_date_partitions

    graph = defs.resolve_asset_graph()
    training_dated = [k for k in graph.get_all_asset_keys()
                      if graph.get(k).partitions_def == training_date_partitions and k.to_user_string() != "click_events"]
    assert len(training_dated) >= 10
    for key in training_dated:
        assert "missing (grey), not failed" in graph.get(key).description, key
    assert "missing (grey)" not in graph.get(dg.AssetKey("click_events")).description
