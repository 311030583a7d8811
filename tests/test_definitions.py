"""The code location: how Dagster finds it, and the lineage the README promises."""

import os
import re
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


def _python(script: str, **env: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter, without the variables a user's shell may set to quiet
    TensorFlow or choose its devices, plus ``env``."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("TF_ENABLED_DEVICE_TYPES", "TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES",
                         "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**base, **env})


def test_tensorflow_without_a_gpu_logs_no_cuda_error():
    """The tensorflow wheel calls cuInit when asked for devices and logs an E-level "failed call to
    cuInit" on a machine without an NVIDIA driver. Without one, the package lets TensorFlow register
    its CPU only: no error line, and the CPU is there. With a GPU nothing is changed."""
    script = ("import os, twotower_assets, tensorflow as tf; print(twotower_assets.no_nvidia_gpu_here()); "
              "print([d.device_type for d in tf.config.list_physical_devices()]); "
              "print(os.environ.get('TF_ENABLED_DEVICE_TYPES'))")
    out = _python(script)
    no_gpu, devices, enabled = out.stdout.splitlines()[-3:]
    if no_gpu == "True":
        assert enabled == "CPU" and devices == "['CPU']"
        assert "cuInit" not in out.stderr
        assert not [line for line in out.stderr.splitlines() if re.match(r"^[EF]\d{4} ", line)], out.stderr
    else:
        assert enabled == "None" and "'GPU'" in devices


def test_a_chosen_device_setting_is_left_alone():
    """CUDA_VISIBLE_DEVICES (someone chose the GPUs) or TF_ENABLED_DEVICE_TYPES set: not overridden."""
    script = "import os, twotower_assets; print(os.environ.get('TF_ENABLED_DEVICE_TYPES'))"
    assert _python(script, CUDA_VISIBLE_DEVICES="0").stdout.strip() == "None"
    assert _python(script, TF_ENABLED_DEVICE_TYPES="CPU,GPU").stdout.strip() == "CPU,GPU"
    # MLflow's download progress bars are off unless asked for.
    bars = "import os, twotower_assets; print(os.environ['MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'])"
    assert _python(bars).stdout.strip() == "false"
    assert _python(bars, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="true").stdout.strip() == "true"


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
