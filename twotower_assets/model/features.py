"""Feature configuration: which columns feed each tower, and how.

A config is a JSON file in ``configs/`` (format and the eight production configs: docs/decisions.md),
installed with the package as ``twotower_assets.configs``::

    {"user_embedding_layers": {"user_id": {"type": "string", "embedding_size": 64}, ...},
     "item_embedding_layers": {...},
     "input_prediction_feature": "user_id"}

Feature order in the file is the concatenation order inside the tower. Everything that can
be wrong with a config is caught here, before any data is read or any model is built, and
reported as a :class:`FeatureConfigError` that names the file and the feature.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path, PurePath
from typing import Annotated, Literal

import pydantic

from twotower_assets.identifiers import check_identifier

FeatureType = Literal["string", "int", "text", "pretrained", "history"]

HistoryPooling = Literal["mean", "sqrtn", "attention"]

DEFAULT_HISTORY_LENGTH = 20
"""Items a ``history`` feature keeps per event when the config does not say (newest first)."""

ITEM_ID_FEATURE = "item_id"
"""The item tower's key: the column that identifies an item everywhere in the pipeline."""

CONFIG_PACKAGE = "twotower_assets.configs"
"""The top-level configs/ directory as a package (pyproject.toml's package-dir), so the configs
are found through importlib.resources in a wheel as in an editable install."""


class FeatureConfigError(ValueError):
    """A feature config that cannot be used; the message names the file and the feature."""


class FeatureSpec(pydantic.BaseModel):
    """One input feature of a tower."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    type: FeatureType
    # Strict: "8", 8.0 and true are mistakes in a config file, not sizes.
    embedding_size: Annotated[int, pydantic.Field(strict=True, gt=0)]
    # Only for ``history`` features: how the history items' vectors are pooled into one, and
    # how many of the user's latest earlier items the warehouse keeps per event.
    pooling: HistoryPooling | None = None
    length: Annotated[int, pydantic.Field(strict=True, gt=0)] | None = None
    # Share of history ids left out at random in each training step (denoising; 0: none).
    dropout: Annotated[float, pydantic.Field(strict=True, ge=0.0, lt=1.0)] | None = None

    @pydantic.model_validator(mode="after")
    def _history_settings_only_on_history(self) -> FeatureSpec:
        if self.type != "history" and (
            self.pooling is not None or self.length is not None or self.dropout is not None
        ):
            raise ValueError("'pooling' and 'length' apply only to features of type 'history', as does 'dropout'")
        return self

    @property
    def history_pooling(self) -> HistoryPooling:
        return self.pooling or "mean"

    @property
    def history_length(self) -> int:
        return self.length or DEFAULT_HISTORY_LENGTH

    @property
    def history_dropout(self) -> float:
        return self.dropout or 0.0


class FeatureConfig(pydantic.BaseModel):
    """Both towers' features, in concatenation order."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: str = "unnamed"
    user_embedding_layers: dict[str, FeatureSpec]
    item_embedding_layers: dict[str, FeatureSpec]
    input_prediction_feature: str = "user_id"

    @pydantic.field_validator("user_embedding_layers", "item_embedding_layers")
    @classmethod
    def _feature_names_are_sql_names(cls, layers: dict) -> dict:
        # Feature names are column names in the warehouse's SQL: plain identifiers only.
        for feature in layers:
            check_identifier(feature, "feature name")
        return layers

    @pydantic.field_validator("input_prediction_feature")
    @classmethod
    def _user_key_is_a_sql_name(cls, name: str) -> str:
        return check_identifier(name, "input_prediction_feature")

    @pydantic.model_validator(mode="after")
    def _id_features_present(self) -> FeatureConfig:
        if not self.user_embedding_layers:
            raise ValueError("user_embedding_layers is empty")
        if not self.item_embedding_layers:
            raise ValueError("item_embedding_layers is empty")
        user_key = self.input_prediction_feature
        if user_key not in self.user_embedding_layers:
            raise ValueError(
                f"missing id feature {user_key!r} (input_prediction_feature) in user_embedding_layers"
            )
        if self.user_embedding_layers[user_key].type != "string":
            raise ValueError(f"id feature {user_key!r} must have type 'string'")
        if ITEM_ID_FEATURE not in self.item_embedding_layers:
            raise ValueError(f"missing id feature {ITEM_ID_FEATURE!r} in item_embedding_layers")
        if self.item_embedding_layers[ITEM_ID_FEATURE].type != "string":
            raise ValueError(f"id feature {ITEM_ID_FEATURE!r} must have type 'string'")
        # A history is a list of item ids embedded with the item tower's id embedding (shared
        # weights), so it belongs to the user tower and has the item id's vector size.
        item_id_size = self.item_embedding_layers[ITEM_ID_FEATURE].embedding_size
        for name, spec in self.item_embedding_layers.items():
            if spec.type == "history":
                raise ValueError(f"history feature {name!r} must be in user_embedding_layers")
        for name, spec in self.user_embedding_layers.items():
            if spec.type == "history" and spec.embedding_size != item_id_size:
                raise ValueError(
                    f"history feature {name!r} has embedding_size {spec.embedding_size} but it shares "
                    f"the item tower's {ITEM_ID_FEATURE!r} embedding of size {item_id_size}"
                )
        # The input statistics are kept per column, so one column cannot be two kinds of feature.
        for name in self.user_embedding_layers.keys() & self.item_embedding_layers.keys():
            user_type = self.user_embedding_layers[name].type
            item_type = self.item_embedding_layers[name].type
            if user_type != item_type or user_type == "pretrained":
                raise ValueError(
                    f"feature {name!r} is in both towers as {user_type!r} and {item_type!r}; a column "
                    "may feed both towers only with one type, and a pretrained one only one tower"
                )
        return self

    @property
    def user_id_feature(self) -> str:
        return self.input_prediction_feature

    @property
    def item_id_feature(self) -> str:
        return ITEM_ID_FEATURE

    @property
    def user_columns(self) -> list[str]:
        return list(self.user_embedding_layers)

    @property
    def item_columns(self) -> list[str]:
        return list(self.item_embedding_layers)

    @property
    def history_features(self) -> dict[str, FeatureSpec]:
        """User-tower features computed by the warehouse from the user's earlier events."""
        return {name: spec for name, spec in self.user_embedding_layers.items() if spec.type == "history"}

    def columns_of_type(self, feature_type: FeatureType) -> list[str]:
        """Distinct columns of one feature type across both towers, in config order."""
        layers = {**self.user_embedding_layers, **self.item_embedding_layers}
        return [name for name, spec in layers.items() if spec.type == feature_type]

    def check_columns(self, available: Iterable[str], source: str = "the data") -> None:
        """Raise if a configured feature is not a column of the data, before any training."""
        available = set(available)
        for tower, layers in (
            ("user_embedding_layers", self.user_embedding_layers),
            ("item_embedding_layers", self.item_embedding_layers),
        ):
            for feature in layers:
                if feature not in available:
                    raise FeatureConfigError(
                        f"config {self.name!r}: feature {feature!r} in {tower} "
                        f"is not a column of {source} (columns: {sorted(available)})"
                    )


def _feature_name_of(error: dict) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    for tower in ("user_embedding_layers", "item_embedding_layers"):
        if tower in loc and loc.index(tower) + 1 < len(loc):
            return f"feature {loc[loc.index(tower) + 1]!r} in {tower}"
    return "/".join(loc) or "config"


def parse_feature_config(raw: dict, name: str, source: str) -> FeatureConfig:
    """Validate an already-decoded config; errors name ``source`` and the feature."""
    try:
        return FeatureConfig.model_validate({**raw, "name": name})
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{_feature_name_of(err)}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise FeatureConfigError(f"invalid feature config {source}: {problems}") from None


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of repeated keys; a repeated feature is a mistake, say so."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"duplicate key {key!r} (a feature or setting listed twice)")
        result[key] = value
    return result


def _config_dir(config_dir: str | Path | None) -> Traversable:
    """``config_dir`` if given, else the configs installed with the package."""
    return Path(config_dir) if config_dir else resources.files(CONFIG_PACKAGE)


def load_feature_config(name_or_path: str | Path, config_dir: str | Path | None = None) -> FeatureConfig:
    """Load ``configs/<name>.json`` (or an explicit path) and validate it."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" or candidate.is_file():
        path, directory = candidate, candidate.parent
    else:
        directory = _config_dir(config_dir)
        path = directory.joinpath(f"{name_or_path}.json")
    if not path.is_file():
        known = available_configs(directory) if directory.is_dir() else []
        raise FeatureConfigError(f"feature config {path} does not exist (known configs: {known})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise FeatureConfigError(f"invalid feature config {path}: not valid JSON ({exc})") from None
    except _DuplicateKeyError as exc:
        raise FeatureConfigError(f"invalid feature config {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise FeatureConfigError(f"invalid feature config {path}: top level must be a JSON object")
    return parse_feature_config(raw, name=PurePath(path.name).stem, source=str(path))


def available_configs(config_dir: str | Path | Traversable | None = None) -> list[str]:
    """Names of the feature configs (``*.json``) in ``config_dir``, default the installed ones."""
    directory = config_dir if isinstance(config_dir, Traversable) else _config_dir(config_dir)
    return sorted(PurePath(entry.name).stem for entry in directory.iterdir() if entry.name.endswith(".json"))
