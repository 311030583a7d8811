"""Model recipes (twotower_assets/model/recipes.py): packaged files, overrides, refusals that name
the fields, and the run config of the model asset that names a recipe."""

import itertools
from pathlib import Path

import pydantic
import pytest

from twotower_assets.defs.training.trainer import TrainingConfig
from twotower_assets.model import tuning
from twotower_assets.model.features import load_feature_config, parse_feature_config
from twotower_assets.model.negatives import FullCatalogNegatives, InBatchNegatives, MixedNegatives
from twotower_assets.model.recipes import ModelRecipe, RecipeError, load_recipe, overrides_from_fields, recipe_names


def test_the_packaged_recipes_load_and_production_is_the_default_model():
    assert {"production", "movielens", "movielens-one-vector"} <= set(recipe_names())
    production = load_recipe("production")
    # The file spells out every default: the defaults are production's, in one place.
    assert production.model_dump(exclude={"name", "description", "search"}) == ModelRecipe().model_dump(
        exclude={"name", "description", "search"}
    )
    assert set(production.search) == {
        "optimizer.learning_rate", "task.temperature", "schedule.batch_size", "towers.embedding_size"
    }
    assert production.name == "production" and production.description
    movielens = load_recipe("movielens")
    assert (movielens.schedule.batch_size, movielens.optimizer.learning_rate, movielens.task.temperature) == (
        1024, 0.01, 0.1
    )
    assert movielens.towers == production.towers  # sections a file leaves out keep the defaults


def test_the_one_vector_recipe_is_the_model_that_beat_ease():
    recipe = load_recipe("movielens-one-vector")
    assert recipe.features == "movielens-one-vector-features"
    assert recipe.towers.model_dump() == {
        "embedding_size": 600, "user_head": "dense_tanh_residual", "item_head": "none", "item_bias": True
    }
    assert recipe.task.temperature == 0.2 and recipe.task.negatives == FullCatalogNegatives()
    assert recipe.optimizer.model_dump() == {"name": "lazy_adam", "learning_rate": 0.001, "weight_averaging": 0.995}
    assert recipe.schedule.model_dump(exclude={"shuffle_buffer"}) == {
        "batch_size": 1024, "epochs": 80, "reduce_lr_patience": 1000, "early_stopping_patience": 20, "min_delta": 0.0,
        "monitor": "ndcg@10",
    }
    features = load_feature_config(recipe.features)
    recipe.check_features(features)  # fits its own features
    history = features.user_embedding_layers["user_recent_items"]
    assert (history.type, history.embedding_size, history.pooling, history.length, history.dropout) == (
        "history", 600, "sqrtn", 1000, 0.5
    )
    with pytest.raises(RecipeError, match="`features` is 'movielens-one-vector-features' but the data was prepared "
                                          "with feature config 'movielens-features'"):
        recipe.check_features(load_feature_config("movielens-features"))


def test_overrides_change_only_the_fields_named():
    recipe = load_recipe("production", {"schedule": {"batch_size": 512}, "towers": {"embedding_size": 16}})
    assert recipe.schedule.batch_size == 512 and recipe.schedule.epochs == 100
    assert recipe.towers.embedding_size == 16 and recipe.towers.user_head == "mlp"
    assert recipe.name == "production"
    mixed = recipe.with_overrides({"task": {"negatives": {"kind": "mixed", "sampled": 64}}})
    assert mixed.task.negatives == MixedNegatives(sampled=64, remove_accidental_hits=True)
    # Another kind replaces the strategy: mixed's `sampled` does not carry over to full_catalog.
    assert mixed.with_overrides({"task": {"negatives": {"kind": "full_catalog"}}}).task.negatives == FullCatalogNegatives()
    assert mixed.with_overrides({"task": {"negatives": {"kind": "in_batch"}}}).task.negatives == InBatchNegatives()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"towers": {"user_head": "transformer"}}, "towers.user_head: Input should be 'mlp'"),
        ({"towers": {"embeding_size": 8}}, "towers.embeding_size: Extra inputs are not permitted"),
        ({"schedule": {"batch_size": 0}}, "schedule.batch_size: Input should be greater than 0"),
        ({"optimizer": {"weight_averaging": 1.0}}, "optimizer.weight_averaging: Input should be less than 1"),
        ({"task": {"negatives": {"kind": "mixed"}}}, r"task.negatives.mixed.sampled: Field required"),
        ({"task": {"negatives": {"kind": "hard"}}}, "task.negatives: Input tag 'hard' found using 'kind' does not match"),
        # A full softmax has no sampled items: the old flags let mixed_negatives silently change it.
        ({"task": {"negatives": {"kind": "full_catalog", "sampled": 8}}},
         "task.negatives.full_catalog.sampled: Extra inputs are not permitted"),
    ],
)
def test_bad_fields_are_refused_naming_them(overrides, message):
    with pytest.raises(RecipeError, match=f"recipe 'production' with overrides: .*{message}"):
        load_recipe("production", overrides)


def test_recipe_files_by_path_and_their_errors(tmp_path):
    good = tmp_path / "small.yaml"
    good.write_text("towers: {embedding_size: 8}\nschedule: {epochs: 3}\n")
    recipe = load_recipe(good)
    assert (recipe.name, recipe.towers.embedding_size, recipe.schedule.epochs) == ("small", 8, 3)
    with pytest.raises(RecipeError, match="unknown recipe 'nope': one of .*production"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("towers: {embedding_size: 8\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad_yaml)
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping of sections, not list"):
        load_recipe(not_a_mapping)
    unknown_features = tmp_path / "unknown.yaml"
    unknown_features.write_text("features: no-such-features\n")
    with pytest.raises(RecipeError, match="features: .*no-such-features"):
        load_recipe(unknown_features)


def test_heads_that_do_not_fit_the_features_are_refused_naming_the_fields():
    config = parse_feature_config(
        {"user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 8}},
         "item_embedding_layers": {"item_id": {"type": "string", "embedding_size": 6}}},
        name="ids", source="test",
    )
    with pytest.raises(RecipeError, match="towers.user_head 'dense_tanh_residual' .* no history feature"):
        ModelRecipe(towers={"user_head": "dense_tanh_residual"}).check_features(config)
    with pytest.raises(RecipeError, match="towers.item_head 'none' .* gives that tower 6 values, not towers.embedding_size 8"):
        ModelRecipe(towers={"embedding_size": 8, "item_head": "none"}).check_features(config)
    ModelRecipe(towers={"embedding_size": 6, "item_head": "none"}).check_features(config)


@pytest.mark.parametrize(
    "search, message",
    [
        ({"optimizer.learning_rat": {"low": 0.1, "high": 1.0}}, "'optimizer.learning_rat' is not a recipe field"),
        ({"schedule.epochs": {"low": 5}}, "give choices, or both low and high"),
        ({"optimizer.learning_rate": {"low": 0.3, "high": 0.1}}, r"low \(0.3\) must be below high \(0.1\)"),
        ({"optimizer.learning_rate": {"low": 0.0, "high": 0.1, "log": True}}, "a log range needs low > 0"),
        ({"schedule.batch_size": {"choices": [512, 0]}}, "'schedule.batch_size' value 0 is not valid"),
        ({"towers.user_head": {"choices": ["mlp", "deep"]}}, "'towers.user_head' value 'deep' is not valid"),
    ],
)
def test_a_search_space_names_fields_and_valid_values(search, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("production", {"search": search})


def test_every_corner_of_the_one_vector_search_space_fits_its_features_and_starts_from_the_recipe():
    # Tuning keeps the 600-d towers the residual head needs and the recipe's own epochs (each trial
    # runs under its early stopping); the recipe's values lie in the space, so the first trial is
    # the recipe as written.
    recipe = load_recipe("movielens-one-vector")
    assert "towers.embedding_size" not in recipe.search and "schedule.epochs" not in recipe.search
    assert tuning.recipe_point(recipe) == {"optimizer.learning_rate": 0.001, "schedule.batch_size": 1024,
                                           "task.temperature": 0.2}
    features = load_feature_config(recipe.features)
    corners = itertools.product(*(d.choices or [d.low, d.high] for d in recipe.search.values()))
    for corner in corners:
        candidate = recipe.with_overrides(overrides_from_fields(dict(zip(recipe.search, corner))))
        candidate.check_features(features)
        assert candidate.schedule.epochs == 80 and candidate.towers.embedding_size == 600


def test_mlflow_params_name_every_field_by_section():
    params = load_recipe("movielens-one-vector").params()
    flat_fields = {
        f"{section}.{field}"
        for section in ("towers", "optimizer", "schedule")
        for field in type(getattr(ModelRecipe(), section)).model_fields
    }
    assert flat_fields | {"task.temperature", "task.negatives.kind", "name", "description", "features"} == set(params)
    assert params["task.negatives.kind"] == "full_catalog" and params["towers.embedding_size"] == 600


def test_the_run_config_names_a_recipe_and_overrides_its_fields():
    config = TrainingConfig(recipe="movielens", schedule={"epochs": 3}, task={"negatives": {"kind": "mixed", "sampled": 8}})
    recipe = config.model_recipe()
    assert recipe.name == "movielens" and recipe.schedule.epochs == 3 and recipe.schedule.batch_size == 1024
    assert recipe.task.negatives == MixedNegatives(sampled=8) and recipe.task.temperature == 0.1
    params = config.training_params()
    assert (params.seed, params.mixed_precision, params.recipe) == (42, False, recipe)
    assert TrainingConfig().model_recipe() == load_recipe("production")
    # Refused when the config is built, before any data is read, naming the field.
    with pytest.raises(pydantic.ValidationError, match="towers.item_head: Input should be"):
        TrainingConfig(towers={"item_head": "deep"})
    with pytest.raises(pydantic.ValidationError, match="unknown recipe 'prod'"):
        TrainingConfig(recipe="prod")
    # The Pipes launcher sends the config as a dict and rebuilds it on the other side.
    assert TrainingConfig(**config.model_dump()).model_recipe() == recipe


def test_the_packaged_run_configs_name_recipes_that_resolve():
    import yaml

    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "run").glob("*.yaml")):
        ops = yaml.safe_load(path.read_text())["ops"]
        TrainingConfig(**ops["two_tower_model"]["config"]).model_recipe()
