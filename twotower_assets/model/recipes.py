"""Model recipes: the whole description of a two-tower model and how it is trained, as a file.

A recipe is a YAML file in ``configs/models/`` (installed with the package, like the feature
configs) with four sections and an optional feature config::

    name: production
    description: the production model ...
    features: null                  # the feature config it needs (null: whichever the data has)
    towers:    {embedding_size: 64, user_head: mlp, item_head: mlp, item_bias: false}
    task:      {temperature: 0.05, negatives: {kind: in_batch, remove_accidental_hits: true}}
    optimizer: {name: lazy_adam, learning_rate: 0.1, weight_averaging: 0.0}
    schedule:  {batch_size: 2048, epochs: 100, reduce_lr_patience: 2, early_stopping_patience: 10,
                min_delta: 0.001, shuffle_buffer: 100000}

``towers`` is the architecture (each tower is its features plus a head,
:mod:`twotower_assets.model.heads`), ``task`` the retrieval loss (the negatives strategy,
:mod:`twotower_assets.model.negatives`), ``optimizer`` and ``schedule`` how it is fitted.
Sections left out of a file take the defaults below, which are production's (``configs/models/production.yaml``).

:func:`load_recipe` is the one loader: the ``two_tower_model`` asset, ``in_memory`` and the
benchmarks all call it, by name or path, with optional overrides in the same nested shape::

    load_recipe("production", {"schedule": {"batch_size": 512}})

Everything that can be wrong is refused here, before any data is read, with the fields named;
what depends on the features (a head that needs a history feature, a head ``none`` whose
features must add up to ``embedding_size``) is checked by :meth:`ModelRecipe.check_features`
as soon as the feature config is known.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import Field

from twotower_assets.model.features import CONFIG_PACKAGE, FeatureConfig, FeatureConfigError, load_feature_config
from twotower_assets.model.heads import HeadName
from twotower_assets.model.negatives import InBatchNegatives, Negatives

RECIPE_DIRECTORY = "models"
"""Recipes live in configs/models/ (the package ``twotower_assets.configs``)."""

DEFAULT_RECIPE = "production"

# The default budget of a search of a recipe's space: trials or minutes, whichever ends first. On
# the default synthetic data the best of 20 trials moved from run to run by as much as the
# model's lead over EASE (the search's path forks on training noise); 50 trials fit in 30
# minutes there.
DEFAULT_N_TRIALS = 50
DEFAULT_TIMEOUT_MINUTES = 30.0

OptimizerName = Literal["lazy_adam", "adam", "adagrad"]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the recipe and the fields."""


class _Section(pydantic.BaseModel):
    # Unknown names are refused: a misspelt field must not silently train on a default.
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")


class Towers(_Section):
    """The architecture: vector size and the layers each tower puts after its features."""

    embedding_size: int = Field(default=64, gt=0, description="Size of the user and item vectors.")
    user_head: HeadName = Field(
        default="mlp",
        description="The user tower's layers between its features and the unit vector "
        "(twotower_assets/model/heads.py). mlp: Dense(2E, relu) -> Dense(E) (production's). "
        "dense_tanh: one Dense(E, tanh). dense_tanh_residual: that layer plus the pooled history "
        "(needs a history feature of embedding_size). none: the features are the vector.",
    )
    item_head: HeadName = Field(default="mlp", description="The item tower's head, as user_head.")
    item_bias: bool = Field(
        default=False,
        description="A learned score per item beside the cosine (Mult-DAE's output bias). It travels in "
        "the vectors: both towers return embedding_size + 1 values (the item's bias, and a 1 for the user), "
        "so recommendations stay one dot product; rank similar items with COSINE then.",
    )


class Task(_Section):
    """The retrieval loss: softmax temperature and where the negatives come from."""

    temperature: float = Field(default=0.05, gt=0, description="Softmax temperature: scores are divided by it.")
    negatives: Negatives = Field(
        default_factory=InBatchNegatives,
        description="in_batch (the batch's other items), full_catalog (an exact softmax over every item, "
        "small catalogues only) or mixed (the batch's items plus `sampled` uniform catalogue items).",
    )


class Optimizer(_Section):
    name: OptimizerName = Field(
        default="lazy_adam",
        description="lazy_adam: Adam that updates only the embedding rows (and their moments) a batch "
        "touched, much faster on large id tables (twotower_assets/model/optimizers.py). adam: stock Keras Adam. adagrad: stock Keras Adagrad "
        "(sparse updates; what TFRS's tutorials use).",
    )
    learning_rate: float = Field(default=0.1, gt=0, description="The optimiser's learning rate.")
    weight_averaging: float = Field(
        default=0.0, ge=0, lt=1,
        description="0: off. Otherwise the momentum of an exponential moving average of the weights "
        "(Polyak averaging), which validation, early stopping and the trained model use "
        "(twotower_assets/model/averaging.py). The t-th step's decay is min(momentum, (1 + t) / (10 + t)), "
        "so a run of under about 9 / (1 - momentum) steps never reaches the momentum: the average then "
        "spans roughly its last tenth of steps, whatever the value. It costs a copy of every weight, "
        "updated every step.",
    )


class Schedule(_Section):
    batch_size: int = Field(
        default=2048, gt=0, description="Rows per step; the in-batch softmax draws its negatives from the batch."
    )
    epochs: int = Field(
        default=100, gt=0,
        description="Upper bound; early stopping usually ends sooner. An epoch is a fifth of the training set.",
    )
    reduce_lr_patience: int = Field(
        default=2, ge=0, description="Epochs without improvement before the learning rate is halved."
    )
    early_stopping_patience: int = Field(
        default=10, ge=0, description="Epochs without improvement before training stops and restores the best weights."
    )
    min_delta: float = Field(
        default=0.001, ge=0, description="The smallest change of the monitored value that counts as an improvement."
    )
    monitor: str = Field(
        default="val_loss",
        pattern=r"^(val_loss|(recall|ndcg)@[1-9][0-9]*)$",
        description="What picks the epoch kept and drives the learning-rate halving and early stopping: "
        "val_loss, or a ranking metric of the validation users (recall@50, ndcg@10: the whole catalogue "
        "ranked after each epoch, their training items removed, as the offline evaluation does).",
    )

    @property
    def ranking_monitor(self) -> tuple[str, int] | None:
        """``(metric, k)`` when ``monitor`` is a ranking metric (``("recall", 50)``), else None."""
        if self.monitor == "val_loss":
            return None
        metric, k = self.monitor.split("@")
        return metric, int(k)
    shuffle_buffer: int = Field(
        default=100_000, gt=0, description="Training rows shuffled together (at most the whole training set)."
    )


class SearchDimension(_Section):
    """One field's search range for tuning: ``choices``, or ``low``..``high`` (``log``: sampled
    on a log scale). Integers give an integer range unless ``float_range`` is set."""

    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    float_range: bool = False
    choices: list[str | int | float | bool] | None = None

    @pydantic.model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty")
        elif self.low is None or self.high is None:
            raise ValueError("give choices, or both low and high")
        elif not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        elif self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    def edges(self) -> list:
        """The values that bound the range (every choice, or low and high)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class ModelRecipe(_Section):
    """A named model: architecture, loss, optimiser and schedule, and the features it needs."""

    name: str = Field(default="custom", min_length=1, description="The recipe's name (its file's stem).")
    description: str = Field(default="", description="What the recipe is for and where it was measured.")
    features: str | None = Field(
        default=None,
        description="The feature config the recipe needs (a name in configs/); None: any, the data's.",
    )
    towers: Towers = Field(default_factory=Towers)
    task: Task = Field(default_factory=Task)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    schedule: Schedule = Field(default_factory=Schedule)
    search: dict[str, SearchDimension] = Field(
        default_factory=dict,
        description="What tuning searches: a field's dotted name (optimizer.learning_rate) -> its range.",
    )

    @pydantic.model_validator(mode="after")
    def _search_names_fields(self) -> ModelRecipe:
        fields = {key for key in _flatten(self.model_dump(exclude={"search"})) if "." in key}
        for path, dimension in self.search.items():
            if path not in fields or path == "task.negatives.kind":
                raise ValueError(f"search: {path!r} is not a recipe field (fields: {', '.join(sorted(fields))})")
            for value in dimension.edges():
                try:
                    ModelRecipe.model_validate(
                        _merge(self.model_dump(exclude={"search"}), overrides_from_fields({path: value}))
                    )
                except pydantic.ValidationError as error:
                    raise ValueError(f"search: {path!r} value {value!r} is not valid: {error.errors()[0]['msg']}") from None
        return self

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> ModelRecipe:
        """This recipe with ``overrides`` (the same nested shape, only the fields to change) applied.

        Changing ``task.negatives.kind`` replaces the negatives section (the other kinds'
        settings do not carry over)."""
        if not overrides:
            return self
        return _validated(_merge(self.model_dump(), dict(overrides)), source=f"recipe {self.name!r} with overrides")

    def check_features(self, config: FeatureConfig) -> None:
        """Refuse a recipe whose towers cannot be built on ``config``'s features, naming the fields."""
        if self.features is not None and self.features != config.name:
            raise RecipeError(
                f"recipe {self.name!r}: `features` is {self.features!r} but the data was prepared with "
                f"feature config {config.name!r}: prepare it with {self.features!r}, or use another recipe"
            )
        size = self.towers.embedding_size
        for field, layers in (("user_head", config.user_embedding_layers), ("item_head", config.item_embedding_layers)):
            head = getattr(self.towers, field)
            if head == "dense_tanh_residual":
                history = {name: spec for name, spec in layers.items() if spec.type == "history"}
                if not history:
                    raise RecipeError(
                        f"recipe {self.name!r}: towers.{field} 'dense_tanh_residual' adds the pooled history to "
                        f"the vector, but feature config {config.name!r} gives that tower no history feature "
                        f"(features: {', '.join(layers)})"
                    )
                for name, spec in history.items():
                    if spec.embedding_size != size:
                        raise RecipeError(
                            f"recipe {self.name!r}: towers.{field} 'dense_tanh_residual' adds history feature "
                            f"{name!r} to the vector: its embedding_size {spec.embedding_size} must equal "
                            f"towers.embedding_size {size}"
                        )
            if head == "none":
                width = sum(spec.embedding_size for spec in layers.values())
                if width != size:
                    raise RecipeError(
                        f"recipe {self.name!r}: towers.{field} 'none' uses the features as the vector, but "
                        f"feature config {config.name!r} gives that tower {width} values, not "
                        f"towers.embedding_size {size}"
                    )

    def params(self) -> dict[str, str | int | float | bool | None]:
        """Every field as ``section.field`` -> value (``task.negatives.kind``, ...): MLflow params.
        The search space is not a param of the trained model (it is in the recipe file)."""
        return dict(_flatten(self.model_dump(exclude={"search"})))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def overrides_from_fields(fields: Mapping[str, Any]) -> dict:
    """``{"schedule.epochs": 20, "task.negatives.kind": "mixed"}`` as the nested overrides
    :meth:`ModelRecipe.with_overrides` takes."""
    nested: dict = {}
    for path, value in fields.items():
        *sections, name = path.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value
    return nested


def _merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if key == "search" and isinstance(value, Mapping):
            # A dimension is replaced whole (a range does not merge with choices); None drops it.
            search = {**merged.get("search", {}), **dict(value)}
            merged["search"] = {path: dimension for path, dimension in search.items() if dimension is not None}
        elif isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            if key == "negatives" and value.get("kind", merged[key].get("kind")) != merged[key].get("kind"):
                merged[key] = dict(value)  # another strategy: its own settings only
            else:
                merged[key] = _merge(merged[key], dict(value))
        else:
            merged[key] = value
    return merged


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _validated(raw: Any, source: str) -> ModelRecipe:
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, not {type(raw).__name__}")
    try:
        recipe = ModelRecipe.model_validate(raw)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'recipe'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise RecipeError(f"{source}: {problems}") from None
    if recipe.features is not None:
        try:
            recipe.check_features(load_feature_config(recipe.features))
        except FeatureConfigError as error:
            raise RecipeError(f"{source}: features: {error}") from None
    return recipe


def _recipe_dir() -> Traversable:
    return resources.files(CONFIG_PACKAGE).joinpath(RECIPE_DIRECTORY)


def recipe_names() -> list[str]:
    """The packaged recipes' names (configs/models/*.yaml)."""
    return sorted(p.name.removesuffix(".yaml") for p in _recipe_dir().iterdir() if p.name.endswith(".yaml"))


def recipe_text(name_or_path: str | Path) -> str:
    """The YAML text of a packaged recipe (by name) or of a recipe file (by path)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise RecipeError(f"no recipe file {str(candidate)!r}")
        return candidate.read_text()
    packaged = _recipe_dir().joinpath(f"{name_or_path}.yaml")
    if not packaged.is_file():
        raise RecipeError(f"unknown recipe {str(name_or_path)!r}: one of {', '.join(recipe_names())}, or a path to a .yaml file")
    return packaged.read_text()


def load_recipe(name_or_path: str | Path = DEFAULT_RECIPE, overrides: Mapping[str, Any] | None = None) -> ModelRecipe:
    """A packaged recipe by name (``production``, ``movielens-one-vector``, ...) or a recipe
    file by path, with ``overrides`` applied; validated, errors name the fields."""
    source = f"recipe {str(name_or_path)!r}"
    try:
        raw = yaml.safe_load(recipe_text(name_or_path))
    except yaml.YAMLError as error:
        raise RecipeError(f"{source}: not valid YAML ({error})") from None
    if isinstance(raw, Mapping):
        raw = {"name": Path(str(name_or_path)).stem, **raw}
    recipe = _validated(raw, source)
    return recipe.with_overrides(overrides) if overrides else recipe
