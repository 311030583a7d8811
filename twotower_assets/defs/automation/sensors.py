"""The sensors: the one that evaluates the assets' automation conditions (``lib/conditions.py``),
and the one that finishes a promotion that stopped halfway (``lib/promotion.py``)."""

import dagster as dg

from twotower_assets.lib.mlflow_tracking import MlflowTracking

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


@dg.sensor(
    name="champion_reconciler",
    job_name="reconcile_champion_job",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=300,
    description=(
        "Every 5 minutes: when two_tower_match@champion is not the MatchModel of the run "
        "two_tower_retriever@champion (the record) names, a promotion stopped halfway; it starts "
        "reconcile_champion_job, which makes the alias and the _latest tables follow the record."
    ),
)
def champion_reconciler(context: dg.SensorEvaluationContext, mlflow: MlflowTracking):
    from twotower_assets.lib.promotion import alias_state
    from twotower_assets.serving.match_scorer import REGISTERED_MODEL_NAME as MATCH_MODEL_NAME
    from twotower_assets.serving.retriever import REGISTERED_MODEL_NAME as RETRIEVER_NAME

    if not mlflow.store_exists():
        return dg.SkipReason("no MLflow store yet: nothing has been published")  # the first run creates it
    state = alias_state(mlflow.client(), MATCH_MODEL_NAME, RETRIEVER_NAME)
    if state.agree:
        return dg.SkipReason(f"the aliases agree ({state.describe(MATCH_MODEL_NAME, RETRIEVER_NAME)})")
    # One run per disagreement: the key names the state, so an unchanged one is not re-run.
    return dg.RunRequest(run_key=f"record-{state.record}-match-{state.match}")


@dg.sensor(
    name="dead_run_detector",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description=(
        "Every minute: a STARTED run whose worker process on this host is gone (SIGKILL, out of "
        "memory) is marked FAILED, freeing its concurrency slot; run retries and the automation "
        "conditions then take over (twotower_assets/lib/run_liveness.py)."
    ),
)
def dead_run_detector(context: dg.SensorEvaluationContext):
    from twotower_assets.lib.run_liveness import dead_runs

    marked = []
    for run, reason in dead_runs(context.instance):
        context.instance.report_run_failed(run, reason)
        marked.append(run.run_id)
    return dg.SkipReason(f"marked failed: {', '.join(marked)}" if marked else "no dead run")
