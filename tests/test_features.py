"""Feature configs: the shipped ones load; every kind of mistake is a clear error."""

import json

import pytest

from twotower_assets.data.synthetic import CLICK_EVENT_SCHEMA
from twotower_assets.model.features import (
    FeatureConfigError,
    available_configs,
    load_feature_config,
)

PRODUCTION_CONFIGS = [
    "default-features",
    "pretrained-features",
    "pretrained-feature-with-ts",
    "test-1-features",
    "test-2-features",
    "test-3-features",
    "test-4-features",
    "user-qpi-features",
]


def test_all_eight_production_configs_ship_and_load():
    assert set(PRODUCTION_CONFIGS) <= set(available_configs())
    for name in PRODUCTION_CONFIGS:
        config = load_feature_config(name)
        config.check_columns(CLICK_EVENT_SCHEMA.names, source="the synthetic click events")


def test_default_config_matches_the_spec_in_order():
    config = load_feature_config("default-features")
    assert list(config.user_embedding_layers) == [
        "user_id", "user_theoretical_remaining_credit", "has_added_offer_to_favorites", "consult_offer", "booking_cnt",
    ]
    assert config.user_embedding_layers["user_id"].embedding_size == 64
    assert config.item_embedding_layers["item_names"].type == "text"
    assert config.item_embedding_layers["offer_subcategory_id"].embedding_size == 1


def test_user_qpi_config_keys_users_by_qpi():
    config = load_feature_config("user-qpi-features")
    assert config.user_id_feature == "qpi_subcategory_ids"
    assert "user_id" not in config.user_embedding_layers


def _write(tmp_path, payload) -> str:
    path = tmp_path / "broken.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


GOOD_ITEM = {"item_id": {"type": "string", "embedding_size": 8}}


@pytest.mark.parametrize(
    "payload, expected",
    [
        (
            {"user_embedding_layers": {"user_id": {"type": "float", "embedding_size": 8}}, "item_embedding_layers": GOOD_ITEM},
            "feature 'user_id' in user_embedding_layers",
        ),
        (
            {"user_embedding_layers": {"booking_cnt": {"type": "int", "embedding_size": 1}}, "item_embedding_layers": GOOD_ITEM},
            "missing id feature 'user_id'",
        ),
        (
            {"user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 8}},
             "item_embedding_layers": {"item_names": {"type": "text", "embedding_size": 4}}},
            "missing id feature 'item_id'",
        ),
        (
            {"user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 0}}, "item_embedding_layers": GOOD_ITEM},
            "feature 'user_id' in user_embedding_layers: Input should be greater than 0",
        ),
        ("{not json", "not valid JSON"),
    ],
)
def test_config_errors_name_the_file_and_the_feature(tmp_path, payload, expected):
    path = _write(tmp_path, payload)
    with pytest.raises(FeatureConfigError) as error:
        load_feature_config(path)
    assert path in str(error.value)
    assert expected in str(error.value)


def test_feature_absent_from_data_is_named():
    config = load_feature_config("default-features")
    with pytest.raises(FeatureConfigError, match="feature 'item_author' in item_embedding_layers is not a column"):
        config.check_columns([c for c in CLICK_EVENT_SCHEMA.names if c != "item_author"], source="training_events")


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(FeatureConfigError, match="default-features"):
        load_feature_config("no-such-config")


HISTORY_USER = {"user_id": {"type": "string", "embedding_size": 8}}


@pytest.mark.parametrize(
    "user_layers, item_layers, expected",
    [
        (
            {**HISTORY_USER, "user_recent_items": {"type": "history", "embedding_size": 4}},
            GOOD_ITEM,
            "history feature 'user_recent_items' has embedding_size 4 but it shares the item tower's 'item_id' embedding of size 8",
        ),
        (
            HISTORY_USER,
            {**GOOD_ITEM, "item_recent_users": {"type": "history", "embedding_size": 8}},
            "history feature 'item_recent_users' must be in user_embedding_layers",
        ),
        (
            {"user_id": {"type": "string", "embedding_size": 8, "pooling": "mean"}},
            GOOD_ITEM,
            "'pooling' and 'length' apply only to features of type 'history'",
        ),
        (
            {**HISTORY_USER, "user_recent_items": {"type": "history", "embedding_size": 8, "pooling": "max"}},
            GOOD_ITEM,
            "feature 'user_recent_items' in user_embedding_layers",
        ),
        (
            {**HISTORY_USER, "user_recent_items": {"type": "history", "embedding_size": 8, "length": 0}},
            GOOD_ITEM,
            "Input should be greater than 0",
        ),
    ],
)
def test_history_feature_mistakes_are_named(tmp_path, user_layers, item_layers, expected):
    path = _write(tmp_path, {"user_embedding_layers": user_layers, "item_embedding_layers": item_layers})
    with pytest.raises(FeatureConfigError) as error:
        load_feature_config(path)
    assert path in str(error.value)
    assert expected in str(error.value)


def test_history_feature_defaults_and_settings(tmp_path):
    path = _write(tmp_path, {
        "user_embedding_layers": {**HISTORY_USER,
                                  "recent": {"type": "history", "embedding_size": 8},
                                  "recent_attention": {"type": "history", "embedding_size": 8, "pooling": "attention", "length": 50}},
        "item_embedding_layers": GOOD_ITEM,
    })
    config = load_feature_config(path)
    assert list(config.history_features) == ["recent", "recent_attention"]
    assert (config.history_features["recent"].history_pooling, config.history_features["recent"].history_length) == ("mean", 20)
    assert (config.history_features["recent_attention"].history_pooling,
            config.history_features["recent_attention"].history_length) == ("attention", 50)
