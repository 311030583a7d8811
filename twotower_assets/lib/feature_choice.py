"""Which feature config a step prepares: a packaged name, or an explicit file.

``config_name`` must be one of the configs shipped in ``configs/`` (checked when the run config
is built); a config of one's own is named by ``config_path``, so a typo in a name is never read
as a path and no stray ``.json`` on the machine is picked up by accident.
"""

from pathlib import Path

import pydantic
from pydantic import Field

from twotower_assets.lib.retries import StepConfig
from twotower_assets.model.features import FeatureConfig, available_configs, load_feature_config


class FeatureConfigChoice(StepConfig):
    config_name: str = Field(
        default="default-features",
        description="A feature config shipped in configs/ (name without .json): "
        + ", ".join(available_configs()) + ". Ignored when config_path is set.",
    )
    config_path: str | None = Field(
        default=None, description="An explicit feature config file (JSON) instead of a packaged name."
    )

    @pydantic.field_validator("config_name")
    @classmethod
    def _packaged(cls, name: str) -> str:
        known = available_configs()
        if name not in known:
            raise ValueError(f"{name!r} is not a packaged feature config ({', '.join(known)}); "
                             "give your own file as config_path")
        return name

    @pydantic.field_validator("config_path")
    @classmethod
    def _a_json_file(cls, path: str | None) -> str | None:
        if path is not None and not (Path(path).suffix == ".json" and Path(path).is_file()):
            raise ValueError(f"{path!r} is not a readable .json file")
        return path

    def feature_config(self) -> FeatureConfig:
        return load_feature_config(self.config_path or self.config_name)
