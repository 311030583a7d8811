"""The sensor that evaluates the assets' automation conditions (``lib/conditions.py``)."""

import dagster as dg

automation_sensor = dg.AutomationConditionSensorDefinition(
    "twotower_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Evaluates the assets' automation conditions: follow updated inputs, retrain stale "
        "models. Running by default (Dagster's own default sensor starts stopped)."
    ),
)
