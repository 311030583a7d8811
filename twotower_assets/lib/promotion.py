"""Moving ``champion``: one record, and everything else following it.

The record is ``two_tower_retriever@champion``, the alias the retrieval server follows: one
registry write says which training run is champion. ``two_tower_match@champion`` (the same
run's MatchModel: both versions carry the run id and ``train_date``) and the ``_latest``
tables are derived from it by :func:`reconcile_champion`, which is idempotent. The ``_latest``
tables are copies of the champion run's rows (:meth:`WarehouseResource.write_run_snapshot`),
so a later rewrite of the champion's date (a retrain not yet promoted, or one the gate fails)
changes nothing consumers read. A promotion
killed after the record moved is finished by the next run of ``champion``, the
``rollback_champion`` job or the ``champion_reconciler`` sensor, and the asset check
``champion_aliases_agree`` fails while the two aliases disagree.

Used by the ``champion`` asset after a date is published and by the ``rollback_champion`` job.
"""

import datetime as dt
from dataclasses import dataclass

from mlflow import MlflowClient

from twotower_assets.lib import layout
from twotower_assets.lib.kill_points import kill_point
from twotower_assets.serving.registry import TRAIN_DATE_TAG, champion, check_gate_passed, promote, version_of_date
from twotower_assets.warehouse.base import WarehouseResource


RUN_COLUMN = "mlflow_run_id"
"""The training run of each row of the published tables."""


@dataclass(frozen=True)
class Champion:
    train_date: str
    match_model: str
    match_version: str
    retriever: str
    retriever_version: str
    mlflow_run_id: str


@dataclass(frozen=True)
class AliasState:
    """Where the two aliases point: ``agree`` when both name one training run's versions."""

    record: str | None  # the retriever's champion version (the record)
    match: str | None  # the MatchModel's champion version
    expected_match: str | None  # the MatchModel version of the record's run
    train_date: str | None
    run_id: str | None = None  # the record's training run

    @property
    def agree(self) -> bool:
        return self.match == self.expected_match

    def describe(self, match_model: str, retriever: str) -> str:
        if self.record is None:
            return f"{retriever} has no champion yet; {match_model}@champion is {self.match or 'unset'}"
        return (f"{retriever}@champion is v{self.record} ({self.train_date}); {match_model}@champion is "
                f"{'v' + self.match if self.match else 'unset'}, the same run's version is "
                f"{'v' + self.expected_match if self.expected_match else 'missing'}")


def move_champion(
    warehouse: WarehouseResource,
    client: MlflowClient,
    match_model: str,
    match_version: str,
    retriever: str,
) -> Champion:
    """Make ``match_model`` version ``match_version`` and its run's retriever the champion.

    Refuses a version the quality gate did not pass, or one whose run has no retriever. The
    record (the retriever's alias) is written in one call, then the MatchModel's alias and the
    ``_latest`` tables follow it (:func:`reconcile_champion`).
    """
    version = client.get_model_version(match_model, match_version)
    train_date = version.tags.get(TRAIN_DATE_TAG)
    if not train_date:
        raise ValueError(f"{match_model} version {match_version} has no {TRAIN_DATE_TAG} tag: not a version this graph registered")
    check_gate_passed(version)
    served = version_of_date(client, retriever, train_date, mlflow_run_id=version.run_id)
    if served is None:
        raise ValueError(
            f"{match_model} version {match_version} ({train_date}) has no {retriever} version of the same run "
            f"({version.run_id}): materialise two_tower_retriever for {train_date} first"
        )
    check_tables_can_follow(warehouse, dt.date.fromisoformat(train_date), version.run_id)  # before the record moves
    promote(client, retriever, served.version)  # the record
    kill_point("promotion.record_moved")
    return reconcile_champion(warehouse, client, match_model, retriever)


def alias_state(client: MlflowClient, match_model: str, retriever: str) -> AliasState:
    """Where both aliases point, and where the MatchModel's should point given the record."""
    record = champion(client, retriever)
    match = champion(client, match_model)
    if record is None:
        return AliasState(None, match.version if match else None, None, None)
    train_date = record.tags.get(TRAIN_DATE_TAG)
    paired = version_of_date(client, match_model, train_date, mlflow_run_id=record.run_id) if train_date else None
    return AliasState(str(record.version), str(match.version) if match else None,
                      str(paired.version) if paired else None, train_date, record.run_id)


def reconcile_champion(warehouse: WarehouseResource, client: MlflowClient, match_model: str, retriever: str) -> Champion | None:
    """Bring ``match_model@champion`` and the ``_latest`` tables in line with the record; None
    when there is no champion. Safe to repeat: the alias is written only when it differs, the
    tables are rewritten from the same rows."""
    state = alias_state(client, match_model, retriever)
    if state.record is None:
        return None
    if state.expected_match is None:
        raise ValueError(f"the champion record cannot be followed: {state.describe(match_model, retriever)}")
    if not state.agree:
        promote(client, match_model, state.expected_match)
        kill_point("promotion.match_alias_moved")
    write_latest_tables(warehouse, dt.date.fromisoformat(state.train_date), state.run_id)
    return Champion(state.train_date, match_model, state.expected_match, retriever, state.record, state.run_id)


def check_tables_can_follow(warehouse: WarehouseResource, train_date: dt.date, run_id: str) -> None:
    """Refuse a champion whose rows are gone from a published table (its date was rewritten by
    another run since): its ``_latest`` tables could not be written."""
    for table in layout.LATEST_TABLES:
        name = warehouse.table_name(table)
        if warehouse.table_exists(name) and not warehouse.run_rows(name, layout.PARTITION_COLUMN, train_date,
                                                                   RUN_COLUMN, run_id):
            raise ValueError(
                f"{name} has no rows of run {run_id} for {train_date.isoformat()}: the date was rewritten by another "
                "run since, so that model's tables are gone; choose another version or retrain the date"
            )


def write_latest_tables(warehouse: WarehouseResource, train_date: dt.date, run_id: str) -> list[str]:
    """Replace each ``_latest`` table with run ``run_id``'s rows of ``train_date`` (tables that exist only)."""
    written = []
    for table, latest in layout.LATEST_TABLES.items():
        name = warehouse.table_name(table)
        if warehouse.table_exists(name):
            warehouse.write_run_snapshot(warehouse.table_name(latest), name, layout.PARTITION_COLUMN, train_date,
                                         RUN_COLUMN, run_id)
            written.append(warehouse.table_name(latest))
    return written
