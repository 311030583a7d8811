"""Security: names that reach SQL, credentials, what the repository holds, where services listen.

* Every name a user controls (BigQuery project, dataset, click-event table; table names and the
  partition column; feature names and the user key of a feature config; vector-search tables and
  columns; query-parameter names) is refused with a clear error before any SQL is sent, and a
  legitimate value still works. Values always travel as query parameters.
* Credentials: an MLflow URI with a password in it is refused without repeating the password;
  a tracking URI from the environment reaches Dagster as an ``EnvVar``, so the UI shows its name.
  (The full materialisation scanned for secrets is tests/bigquery/test_credentials.py.)
* No private key, service-account key or token in the tracked files.
* The README's and docs' commands bind the local services to 127.0.0.1, and ``mlflow ui`` started
  as the README says listens on 127.0.0.1 only.
"""

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pydantic
import pytest
from dagster_gcp import BigQueryResource

from helpers.graph import REPO
from helpers.processes import free_port, listening_addresses, stop_group
from twotower_assets.defs.resources import default_mlflow
from twotower_assets.lib.mlflow_tracking import MlflowTracking, checked_tracking_uri
from twotower_assets.defs.training.trainer import TrainingConfig
from twotower_assets.model.features import FeatureConfigError, available_configs, load_feature_config, parse_feature_config
from twotower_assets.warehouse.bigquery import BigQueryWarehouse
from twotower_assets.warehouse.bigquery_types import query_parameters
from twotower_assets.warehouse.duckdb import DuckDBWarehouse
from twotower_assets.identifiers import (
    UnsafeIdentifierError,
    check_identifier,
    check_parameter_name,
    check_project_id,
    check_table_name,
    quote_identifier,
)
from twotower_assets.warehouse.sql import (
    BIGQUERY,
    DUCKDB,
    NeighborSearch,
    bigquery_vector_index_statement,
    bigquery_vector_search_query,
    distinct_pairs_query,
    latest_row_per_query,
    split_queries,
    training_examples_query,
)

# -- names ----------------------------------------------------------------------------------------

INJECTIONS = [
    "x; DROP TABLE y",
    "a`b",
    'a"b',
    "a'b",
    "a--",
    "a/*",
    "a*/",
    "tbl) UNION SELECT",
    "user_id\n",  # "$" in a regex also accepts a trailing newline
    "user_id\x00",
    "user id",
    "us\u0435r_id",  # Cyrillic "е"
    "user_\u0456d",  # Cyrillic "і"
    "\uff55ser_id",  # fullwidth "ｕ"
    "",
    "a" * 129,
    "x" * 10_000,
    "1abc",
    ".",
    "a.b",  # a dotted name where one plain name is expected
    "select",  # reserved keyword
    "FROM",
    "_PARTITIONTIME",  # BigQuery pseudo-column prefix
    "_TABLE_SUFFIX",
]
BAD_TABLES = [
    "x; DROP TABLE y",
    "a`b",
    'a"b',
    "tbl) UNION SELECT",
    "a--",
    "a/*",
    "ds..t",
    ".ds.t",
    "ds.t.",
    "p.ds.t.extra",
    "my-project.ds-x.t",  # hyphen outside the project part
    "My-Project.ds.t",  # project ids are lowercase
    "-proj.ds.t",
    "proj-.ds.t",
    "proj--x.ds.t",
    "twotower-test.ds.t\n",
    "twotower-test.ds.us\u0435rs",
    "",
    "ds." + "t" * 200,
]
GOOD_COLUMNS = ["user_id", "item_id", "event_date", "event_hour", "_private", "Offer_Category_ID", "a" * 128]
GOOD_TABLES = [
    "click_events",
    "ml_preproc_dev.click_events",
    "my-company-data-prod.raw_prod.click_events",
    "twotower-test.ds.t",
    "p.d.t",
]
EVENT_COLUMNS = ["user_id", "item_id", "event_date", "event_hour"]


@pytest.mark.parametrize("name", INJECTIONS)
def test_a_name_that_is_not_plain_is_refused_with_the_reason(name):
    with pytest.raises(UnsafeIdentifierError, match="is not a plain name") as refused:
        quote_identifier(name)
    message = str(refused.value)
    assert len(message) < 400, "a 10,000-character name is cut short in the message"
    if not name.isascii():
        assert "non-ASCII" in message and "\\u" in message, "lookalikes are shown escaped"
    with pytest.raises(UnsafeIdentifierError):
        check_identifier(name, "dataset name")


@pytest.mark.parametrize("name", GOOD_COLUMNS)
def test_plain_names_pass_unchanged(name):
    assert quote_identifier(name) == name


@pytest.mark.parametrize("name", BAD_TABLES)
def test_a_table_name_that_is_not_plain_is_refused(name):
    with pytest.raises(UnsafeIdentifierError, match="not a plain table name"):
        check_table_name(name)
    for dialect in (DUCKDB, BIGQUERY):
        with pytest.raises(UnsafeIdentifierError):
            dialect.table(name)


@pytest.mark.parametrize("name", GOOD_TABLES)
def test_plain_table_names_pass_and_are_quoted(name):
    assert check_table_name(name) == name
    assert BIGQUERY.table(name) == f"`{name}`"
    assert DUCKDB.table(name) == ".".join(f'"{p}"' for p in name.split("."))


def test_project_ids_and_parameter_names():
    assert check_project_id("my-company-ml-prod") == "my-company-ml-prod"
    for bad in ("My-Project", "proj-", "1proj", "proj--x", "proj.x", "proj x", "pröj", ""):
        with pytest.raises(UnsafeIdentifierError, match="GCP project id"):
            check_project_id(bad)
    # Parameters are written $name / @name: keywords are fine there, anything else is not.
    assert DUCKDB.param("limit") == "$limit" and BIGQUERY.param("limit") == "@limit"
    for bad in ("a; DROP TABLE y", "a`b", "x\n", ""):
        with pytest.raises(UnsafeIdentifierError):
            check_parameter_name(bad)
        with pytest.raises(UnsafeIdentifierError):
            query_parameters({bad: 1})


@pytest.mark.parametrize("bad", ["x; DROP TABLE y", "a`b", "us\u0435r_id", "select", "a\n"])
def test_every_query_builder_refuses_a_bad_column_or_table(bad):
    for dialect in (DUCKDB, BIGQUERY):
        with pytest.raises(UnsafeIdentifierError):
            split_queries(dialect, "click_events", [*EVENT_COLUMNS, bad])  # a column of an external table
        with pytest.raises(UnsafeIdentifierError):
            split_queries(dialect, bad, EVENT_COLUMNS)
        with pytest.raises(UnsafeIdentifierError):
            training_examples_query(dialect, "training_events", ["user_id", bad])
        with pytest.raises(UnsafeIdentifierError):
            latest_row_per_query(dialect, "training_events", bad, ["item_id"])  # the user key
        with pytest.raises(UnsafeIdentifierError):
            latest_row_per_query(dialect, "training_events", "user_id", [bad])
        with pytest.raises(UnsafeIdentifierError):
            distinct_pairs_query(dialect, "training_events", bad)  # the user key
        with pytest.raises(UnsafeIdentifierError):
            distinct_pairs_query(dialect, bad, "user_id")


def _search(**overrides) -> NeighborSearch:
    fields = dict(
        query_table="ds.two_tower_user_embedding_history", query_key="user_id", query_vector="user_embedding",
        base_table="ds.two_tower_item_embedding_history", base_key="item_id", base_vector="item_embedding",
        top_k=5, query_column="user_id", neighbor_column="item_id",
    )
    return NeighborSearch(**{**fields, **overrides})


@pytest.mark.parametrize(
    "field", ["query_table", "query_key", "query_vector", "base_table", "base_key", "base_vector",
              "query_column", "neighbor_column"],
)
@pytest.mark.parametrize("bad", ["x; DROP TABLE y", "a`b", "a'b", "tbl) UNION SELECT", "us\u0435r_id", ""])
def test_vector_search_names_are_refused(field, bad):
    with pytest.raises(UnsafeIdentifierError):
        _search(**{field: bad})


def test_vector_search_values_are_checked_and_legit_searches_build():
    for bad_metric in ("DOT_PRODUCT'; DROP TABLE y; --", "dot_product", ""):
        with pytest.raises(ValueError, match="metric"):
            _search(metric=bad_metric)
    for bad_k in (0, -1, 10_001, True, "5"):
        with pytest.raises(ValueError, match="top_k"):
            _search(top_k=bad_k)
    for bad in ("x; DROP TABLE y", "a`b", "a'b"):
        with pytest.raises(UnsafeIdentifierError):
            bigquery_vector_index_statement("p.ds.items", bad, "COSINE")
        with pytest.raises(UnsafeIdentifierError):
            bigquery_vector_index_statement(bad, "item_embedding", "COSINE")
    assert "`twotower-test.ds.two_tower_item_embedding_history`" in bigquery_vector_index_statement(
        "twotower-test.ds.two_tower_item_embedding_history", "item_embedding", "COSINE"
    )
    assert "VECTOR_SEARCH" in bigquery_vector_search_query(_search())


# -- feature configs: feature names and the user key become column names ---------------------------

def _config(user: dict | None = None, item: dict | None = None, user_key: str = "user_id") -> dict:
    string = {"type": "string", "embedding_size": 4}
    return {
        "user_embedding_layers": {"user_id": string, **(user or {})},
        "item_embedding_layers": {"item_id": string, **(item or {})},
        "input_prediction_feature": user_key,
    }


@pytest.mark.parametrize("bad", ["x; DROP TABLE y", "a`b", 'a"b', "a--", "tbl) UNION SELECT", "us\u0435r_age",
                                 "", "a" * 200, "select", "user_age\n"])
def test_feature_names_and_the_user_key_are_refused_when_the_config_is_read(bad):
    number = {"type": "int", "embedding_size": 4}
    string = {"type": "string", "embedding_size": 4}
    for raw in (_config(user={bad: number}), _config(item={bad: number}),
                _config(user={bad: string}, user_key=bad)):
        with pytest.raises(FeatureConfigError, match="is not a plain name") as refused:
            parse_feature_config(raw, name="evil", source="configs/evil.json")
        assert "configs/evil.json" in str(refused.value)


def test_legitimate_feature_configs_still_load():
    assert len(available_configs()) >= 8
    for name in available_configs():
        load_feature_config(name)
    config = parse_feature_config(
        _config(user={"user_age": {"type": "int", "embedding_size": 4}}), name="ok", source="ok.json"
    )
    assert config.user_columns == ["user_id", "user_age"]


# -- the warehouses refuse before they connect ---------------------------------------------------

def _rows(day: dt.date) -> pa.Table:
    return pa.table({"train_date": pa.array([day, day], pa.date32()), "user_id": ["u1", "u2"]})


@pytest.mark.parametrize("bad", ["x; DROP TABLE y", 'a"b', "tbl) UNION SELECT", "us\u0435rs"])
def test_duckdb_refuses_bad_names_before_opening_the_file(tmp_path, bad):
    path = tmp_path / "warehouse.duckdb"
    warehouse = DuckDBWarehouse(path=str(path))
    day = dt.date(2026, 6, 1)
    calls = [
        lambda: warehouse.table_name(bad),
        lambda: warehouse.write_table(bad, _rows(day)),
        lambda: warehouse.replace_partition(bad, "train_date", day, _rows(day)),
        lambda: warehouse.replace_partition("t", bad, day, _rows(day)),  # the partition column
        lambda: warehouse.replace_partition_from_queries({"t": "SELECT 1 AS x"}, bad, day, {}),
        lambda: warehouse.write_run_snapshot(bad, "t", "train_date", day, "mlflow_run_id", "a" * 32),
        lambda: warehouse.write_run_snapshot("v", bad, "train_date", day, "mlflow_run_id", "a" * 32),
        lambda: warehouse.write_run_snapshot("v", "t", bad, day, "mlflow_run_id", "a" * 32),
        lambda: warehouse.write_run_snapshot("v", "t", "train_date", day, bad, "a" * 32),
        lambda: warehouse.partition_row_counts("t", bad),
    ]
    for call in calls:
        with pytest.raises(UnsafeIdentifierError):
            call()
    assert not path.exists(), "nothing was opened, so no SQL ran"

    # A legitimate name works, and a hostile *value* is a parameter: stored verbatim.
    hostile = "x'); DROP TABLE t; --"
    rows = pa.table({"train_date": pa.array([day], pa.date32()), "user_id": [hostile]})
    assert warehouse.replace_partition("t", "train_date", day, rows) == 1
    back = warehouse.query("SELECT user_id FROM t WHERE user_id = $v", {"v": hostile})
    assert back["user_id"].to_pylist() == [hostile]
    assert warehouse.partition_row_counts("t", "train_date") == {day: 1}


def test_duckdb_memory_limit_is_a_size_and_the_path_is_only_a_path(tmp_path):
    for bad in ("4GB'; DROP TABLE t; --", "4GB\n", "4 GB' OR '1'='1", ""):
        with pytest.raises(pydantic.ValidationError):
            DuckDBWarehouse(path=str(tmp_path / "w.duckdb"), memory_limit=bad)
    # The file path never goes into SQL: an odd file name is just a file name.
    odd = tmp_path / "x'; DROP TABLE y; --.duckdb"
    warehouse = DuckDBWarehouse(path=str(odd))
    warehouse.write_table("t", pa.table({"a": [1]}))
    assert odd.is_file() and warehouse.query("SELECT a FROM t")["a"].to_pylist() == [1]


CLOSED = "http://127.0.0.1:9"  # nothing listens: a request would fail with a connection error


def _bigquery(**fields) -> BigQueryWarehouse:
    values = {"bigquery": BigQueryResource(project="twotower-test", location="EU"), "dataset": "ds",
              "endpoint": CLOSED, **fields}
    return BigQueryWarehouse(**values)


@pytest.mark.parametrize("bad", ["x; DROP TABLE y", "a`b", "tbl) UNION SELECT", "us\u0435rs", "a--", ""])
def test_bigquery_refuses_bad_names_before_any_request(bad):
    """Every refusal is an UnsafeIdentifierError, never a connection error: nothing was sent."""
    day = dt.date(2026, 6, 1)
    hostile = [
        _bigquery(dataset=bad),
        _bigquery(bigquery=BigQueryResource(project=bad or "-", location="EU")),
        _bigquery(external_tables={"click_events": bad}),
    ]
    for warehouse in hostile:
        with pytest.raises(UnsafeIdentifierError):
            warehouse.check_names()
        with pytest.raises(UnsafeIdentifierError):
            with warehouse.client():
                pass
        with pytest.raises(UnsafeIdentifierError):
            warehouse.query("SELECT 1")
    warehouse = _bigquery()
    calls = [
        lambda: warehouse.table_name(bad),
        lambda: warehouse.write_table(bad, _rows(day)),
        lambda: warehouse.replace_partition(bad, "train_date", day, _rows(day)),
        lambda: warehouse.replace_partition("twotower-test.ds.t", bad, day, _rows(day)),
        lambda: warehouse.replace_partition_from_queries({bad: "SELECT 1"}, "train_date", day, {}),
        lambda: warehouse.replace_partition_from_queries({"twotower-test.ds.t": "SELECT 1"}, bad, day, {}),
        lambda: warehouse.write_run_snapshot("twotower-test.ds.v", bad, "train_date", day, "mlflow_run_id", "a" * 32),
        lambda: warehouse.write_run_snapshot("twotower-test.ds.v", "twotower-test.ds.t", bad, day, "mlflow_run_id",
                                             "a" * 32),
        lambda: warehouse.partition_row_counts("t", bad),
        lambda: warehouse.query("SELECT 1", {bad: 1}),
    ]
    for call in calls:
        with pytest.raises(UnsafeIdentifierError):
            call()


@pytest.mark.parametrize(
    "variable, value",
    [
        ("TWOTOWER_BQ_PROJECT", "proj`; DROP TABLE x"),
        ("TWOTOWER_BQ_PROJECT", "Proj"),
        ("GOOGLE_CLOUD_PROJECT", "a b"),
        ("TWOTOWER_BQ_DATASET", "ds; DROP TABLE y"),
        ("TWOTOWER_BQ_DATASET", "ml_preproc_d\u0435v"),
        ("TWOTOWER_BQ_CLICK_EVENTS_TABLE", "proj.raw.click_events` UNION SELECT 1 --"),
        ("TWOTOWER_BQ_CLICK_EVENTS_TABLE", "proj.raw.click_events.x"),
    ],
)
def test_bigquery_names_from_the_environment_stop_the_code_location(monkeypatch, variable, value):
    from twotower_assets.defs.resources import default_warehouse

    for name in ("TWOTOWER_BQ_PROJECT", "GOOGLE_CLOUD_PROJECT", "TWOTOWER_BQ_DATASET", "TWOTOWER_BQ_CLICK_EVENTS_TABLE",
                 "TWOTOWER_GCP_CREDENTIALS", "TWOTOWER_BQ_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TWOTOWER_WAREHOUSE", "bigquery")
    monkeypatch.setenv("TWOTOWER_BQ_PROJECT", "my-company-ml-dev")
    monkeypatch.setenv("TWOTOWER_BQ_ENDPOINT", CLOSED)
    legit = default_warehouse()
    assert legit.table_name("click_events") == "my-company-ml-dev.ml_preproc_dev.click_events"
    if variable == "GOOGLE_CLOUD_PROJECT":
        monkeypatch.delenv("TWOTOWER_BQ_PROJECT")
    monkeypatch.setenv(variable, value)
    with pytest.raises(UnsafeIdentifierError, match="not a plain"):
        default_warehouse()


# -- MLflow ---------------------------------------------------------------------------------------

def test_the_mlflow_experiment_name_is_a_value_and_control_characters_are_refused(tmp_path):
    for bad in ("", "   ", "two_tower\nINFO forged log line", "a\x00b", "x" * 257):
        with pytest.raises(pydantic.ValidationError):
            TrainingConfig(experiment_name=bad)
    hostile = "team/x'; DROP TABLE experiments; --"
    assert TrainingConfig(experiment_name=hostile).experiment_name == hostile
    mlflow = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=(tmp_path / "a").as_uri())
    experiment_id, run_id = mlflow.find_or_create_run(hostile, "run", {"train_date": "2026-06-01"})
    assert mlflow.client().get_experiment(experiment_id).name == hostile  # stored verbatim, a parameter
    assert mlflow.find_or_create_run(hostile, "run", {"train_date": "2026-06-01"}) == (experiment_id, run_id)
    assert mlflow.client().get_experiment_by_name("Default") is not None  # the experiments table is intact


def test_an_mlflow_uri_with_a_password_is_refused_without_repeating_it():
    secret = "S3cr3t-" + os.urandom(6).hex()
    for uri in (f"http://alice:{secret}@127.0.0.1:5000", f"https://alice:{secret}@mlflow.example.com/path",
                f"http://{secret}@127.0.0.1:5000"):
        with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD") as refused:
            MlflowTracking(tracking_uri=uri).client()
        assert secret not in str(refused.value) and "alice" not in str(refused.value)
    for fine in ("http://127.0.0.1:5000", "sqlite:///tmp/mlflow.db", "databricks", "file:///tmp/mlruns"):
        assert checked_tracking_uri(fine) == fine


def test_the_tracking_uri_reaches_dagster_as_an_env_var_not_its_value(monkeypatch, tmp_path):
    """The Dagster UI shows configured resource values; a database URI's password must not be one."""
    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster_shared.serdes import serialize_value

    secret = "DbPa55-" + os.urandom(6).hex()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql://mlflow:{secret}@db.internal:5432/mlflow")
    monkeypatch.setenv("TWOTOWER_HOME", str(tmp_path))
    resource = default_mlflow()

    @dg.asset
    def uses_mlflow(mlflow: MlflowTracking) -> None: ...

    defs = dg.Definitions(assets=[uses_mlflow], resources={"mlflow": resource})
    snapshot = serialize_value(RepositorySnap.from_def(defs.get_repository_def()))
    assert "MLFLOW_TRACKING_URI" in snapshot
    assert secret not in snapshot

    result = dg.materialize([uses_mlflow], resources={"mlflow": resource}, instance=dg.DagsterInstance.ephemeral())
    assert result.success
    run = result.dagster_run
    assert secret not in json.dumps(run.run_config, default=str)
    for entry in result.all_events:
        assert secret not in serialize_value(entry)


# -- the repository holds no credentials ----------------------------------------------------------

_BEGIN = "-----BEGIN"
CREDENTIAL_PATTERNS = {
    "private key": re.compile(_BEGIN + r" (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    "service-account key": re.compile(r'"type"\s*:\s*"service_account"'),
    "private_key field": re.compile(r'"private_key"\s*:\s*"' + _BEGIN),
    "Google API key": re.compile(r"AIza[0-9A-Za-z_\-]{35}"),
    "Google OAuth token": re.compile(r"\bya29\.[0-9A-Za-z_\-]{20,}"),
    "AWS access key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[0-9A-Za-z]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abposr]-[0-9A-Za-z-]{10,}"),
    "URI with a password": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"`]+:[^\s/@'\"`{}$<>]+@[^\s/]"),
    "assigned secret": re.compile(
        r"(?i)\b(?:password|passwd|secret|api_key|apikey|access_token|auth_token)\b\s*[:=]\s*['\"][^'\"\s]{8,}['\"]"
    ),
}
# Placeholders the docs and tests use on purpose: (file, matched text).
ALLOWED = {
    ("tests/test_security.py", "http://alice:{secret}@127.0.0.1:5000"),
    ("tests/test_security.py", '"type": "service_account"'),  # the scan's own sample
    ("tests/bigquery/test_credentials.py", '"type": "service_account"'),  # a key made up at test time
}


def test_no_credentials_in_the_tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [name for name in listed.decode().split("\0") if name]
    assert len(files) > 50
    found = []
    for name in files:
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for label, pattern in CREDENTIAL_PATTERNS.items():
            for match in pattern.finditer(text):
                if (name, match.group(0)) not in ALLOWED and not _placeholder(match.group(0)):
                    found.append(f"{name}: {label}: {match.group(0)[:60]!r}")
    assert not found, "\n".join(found)
    untracked_keys = [p for p in REPO.glob("*.json") if "service_account" in p.read_text(errors="replace")]
    assert not untracked_keys


def _placeholder(text: str) -> bool:
    """Interpolations and obvious placeholders (user:password@, {secret}) are not credentials."""
    return bool(re.search(r"\{[a-z_]+\}|\$\{?[A-Z_]+|<[a-z_-]+>|:(?:password|pass|secret|\*+)@", text, re.I))


def test_the_credential_scan_finds_what_it_looks_for():
    """The patterns are not vacuous: each finds a made-up credential of its kind."""
    fake = os.urandom(16).hex()
    samples = {
        "private key": f"{_BEGIN} PRIVATE KEY-----\nMIIE...",
        "service-account key": '{"type": "service_account", "project_id": "p"}',
        "private_key field": '"private_key": "' + _BEGIN + ' PRIVATE KEY-----\\n"',
        "Google API key": "AIza" + "B" * 35,
        "Google OAuth token": "ya29." + fake,
        "AWS access key": "AKIA" + "ABCDEFGHIJKLMNOP",
        "GitHub token": "ghp_" + "a1" * 18,
        "Slack token": "xoxb-" + fake,
        "URI with a password": f"http://user:{fake}@host:5000",
        "assigned secret": f'password = "{fake}"',
    }
    for label, sample in samples.items():
        assert CREDENTIAL_PATTERNS[label].search(sample), label


# -- local services listen on 127.0.0.1 ---------------------------------------------------------------

DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
SCRIPTS = [*sorted(str(p.relative_to(REPO)) for p in (REPO / ".ci").iterdir()), "docs/screenshot.sh"]
SERVICE = re.compile(r"\b(dagster\"?\s+dev|dagster-webserver|mlflow\"?\s+(?:ui|server|models\s+serve)|bqemulator\"?,?\s+\"?start)\b[^\n`|]*")


def service_commands() -> list[tuple[str, str]]:
    """(file, command) for each command line of the docs and scripts that starts a server:
    the docs' code blocks and inline commands, the scripts' lines, comments and echo lines left out."""
    commands = []
    for name in [*DOCUMENTS, *SCRIPTS]:
        text = (REPO / name).read_text()
        for match in SERVICE.finditer(text):
            line_start = text.rfind("\n", 0, match.start()) + 1
            line = text[line_start:text.find("\n", match.start()) % (len(text) + 1)]
            command = re.sub(r"(^|\s)#.*$", "", match.group(0)).strip()
            before = text[line_start:match.start()]
            if not command or line.lstrip().startswith("#") or "#" in before or re.search(r"\becho\b", before):
                continue  # a comment or a message, not a command
            if name.endswith(".md"):
                if not _in_code(text, match.start()):
                    continue  # prose that names the command
                bare = re.fullmatch(r"dagster dev|dagster-webserver|mlflow (?:ui|server|models serve)", command)
                if bare and text[match.start() - 1:match.end() + 1] == f"`{command}`":
                    continue  # `dagster dev` alone in a sentence names it, it is not a command line
            commands.append((name, command))
    return commands


def _in_code(text: str, position: int) -> bool:
    before = text[:position]
    in_block = before.count("```") % 2 == 1
    line_start = before.rfind("\n") + 1
    in_span = text[line_start:position].count("`") % 2 == 1
    return in_block or in_span


def test_every_documented_server_command_binds_to_loopback():
    commands = service_commands()
    assert {n for n, c in commands if c.startswith("dagster dev")} >= {"README.md", "docs/operations.md"}
    assert {n for n, c in commands if c.startswith("mlflow ui")} >= {"README.md"}
    assert {n for n, c in commands if c.startswith("mlflow models serve")} >= {"README.md", "docs/serving.md"}
    assert {n for n, c in commands if c.startswith('dagster" dev')} >= {"docs/screenshot.sh"}
    host = re.compile(r"(?:\s-h|\s--host|\s--rest-host)[ =]127\.0\.0\.1\b")
    wrong = [f"{name}: {command}" for name, command in commands if not host.search(command)]
    assert not wrong, "commands that do not say -h/--host 127.0.0.1:\n" + "\n".join(wrong)
    emulator = (REPO / "tests" / "bigquery" / "emulator.py").read_text()
    assert '"--rest-host", "127.0.0.1"' in emulator and '"--grpc-host", "127.0.0.1"' in emulator


def readme_mlflow_ui_command() -> list[str]:
    readme = (REPO / "README.md").read_text()
    (command,) = re.findall(r"`(\.venv/bin/mlflow ui [^`]+)`", readme)
    return command.split()


@pytest.mark.slow  # starts mlflow ui
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp")
def test_mlflow_ui_as_the_readme_starts_it_listens_on_loopback_only(tmp_path):
    command = readme_mlflow_ui_command()
    assert command[:2] == [".venv/bin/mlflow", "ui"] and "--host" in command
    port = free_port()
    argv = [str(Path(sys.executable).with_name("mlflow")), *command[1:], "--port", str(port)]
    argv = [a.replace("sqlite:///data/mlflow.db", f"sqlite:///{tmp_path / 'mlflow.db'}") for a in argv]
    log = (tmp_path / "mlflow_ui.log").open("w")
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        assert process.poll() is None, (tmp_path / "mlflow_ui.log").read_text()[-2000:]
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        stop_group(process)
        log.close()
