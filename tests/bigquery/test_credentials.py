"""Credentials on the BigQuery path: used for real, and never written anywhere.

The whole graph is materialised from the environment, as ``dagster`` would load it, with:

* ``TWOTOWER_GCP_CREDENTIALS``: the base64 of a service-account key made up for this test (a
  real RSA key, generated here, never stored). dagster-gcp writes it to a temporary file that
  google-auth reads as application default credentials; the key's ``token_uri`` points at a
  local token server, which hands out an access token the client then sends to the emulator.
  The token server is hit, so the key was really used.
* an MLflow tracking server on loopback with ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD`` (MLflow's own variables; a URI with a password is refused).

Then everything the run produced is searched for the key, its id, the base64 blob, the access
token and the MLflow password: captured stdout/stderr and logging, every Dagster event of the
run (materialisation and check metadata included), the stored run (run config, tags), the
repository snapshot the Dagster UI shows (resource config), every MLflow experiment, run,
param, tag and metric, every file under TWOTOWER_HOME (artifacts, models, datasets), and the
MLflow server's database and log. The emulator and the MLflow server listen on 127.0.0.1 only.
"""

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import dagster as dg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster_shared.serdes import serialize_value

from helpers.graph import materialize_all
from helpers.processes import free_port, listening_addresses, stop_group

from .emulator import PROJECT


class TokenServer:
    """A stand-in for oauth2.googleapis.com/token: any JWT grant gets ``token``."""

    def __init__(self, token: str):
        self.grants: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                outer.grants.append({k: v[0] for k, v in parse_qs(body).items()})
                answer = json.dumps({"access_token": token, "expires_in": 3600, "token_type": "Bearer"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def made_up_service_account_key(token_uri: str) -> dict:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": uuid.uuid4().hex + uuid.uuid4().hex[:8],
        "private_key": pem,
        "client_email": f"pipeline@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "1" + uuid.uuid4().int.__str__()[:20],
        "auth_uri": "http://127.0.0.1:9/auth",
        "token_uri": token_uri,
    }


def start_mlflow_server(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = (tmp / "mlflow_server.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow_server.db'}",
         "--default-artifact-root", (tmp / "server_artifacts").as_uri(), "--workers", "1"],
        cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, port
        except OSError:
            time.sleep(0.5)
    stop_group(process)
    raise RuntimeError("mlflow server did not start:\n" + (tmp / "mlflow_server.log").read_text()[-3000:])


def secrets_of(key: dict, blob: str, token: str, mlflow_password: str) -> dict[str, str]:
    """What must never appear, each with a name for the failure message."""
    body = [line for line in key["private_key"].splitlines() if "-----" not in line]
    secrets = {f"private key line {i}": line for i, line in enumerate(body[1:-1]) if i % 5 == 0}
    secrets.update({
        "private_key_id": key["private_key_id"],
        "base64 key (start)": blob[:48],
        "base64 key (middle)": blob[len(blob) // 2:len(blob) // 2 + 48],
        "access token": token,
        "MLflow password": mlflow_password,
    })
    return secrets


def find_secrets(texts: dict[str, str | bytes], secrets: dict[str, str]) -> list[str]:
    found = []
    for where, text in texts.items():
        data = text if isinstance(text, bytes) else text.encode("utf-8", errors="replace")
        for what, secret in secrets.items():
            if secret.encode() in data:
                found.append(f"{what} in {where}")
    return found


@pytest.mark.slow
def test_credentials_are_used_and_never_logged_stored_or_shown(bq_emulator, tmp_path, monkeypatch, capfd, caplog):
    token = "ya29.fake-" + uuid.uuid4().hex + uuid.uuid4().hex
    mlflow_password = "mlflow-pw-" + uuid.uuid4().hex
    token_server = TokenServer(token)
    key = made_up_service_account_key(token_server.url)
    blob = base64.b64encode(json.dumps(key).encode()).decode()
    secrets = secrets_of(key, blob, token, mlflow_password)
    mlflow_process, mlflow_port = start_mlflow_server(tmp_path)
    home = tmp_path / "home"
    try:
        assert listening_addresses(mlflow_port) == {"127.0.0.1"}
        for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "TWOTOWER_BQ_CLICK_EVENTS_TABLE",
                     "TWOTOWER_BQ_ENDPOINT", "MLFLOW_TRACKING_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        environment = {
            "TWOTOWER_WAREHOUSE": "bigquery",
            "TWOTOWER_BQ_PROJECT": PROJECT,
            "TWOTOWER_BQ_DATASET": f"sec_{uuid.uuid4().hex[:8]}",
            "BIGQUERY_EMULATOR_HOST": bq_emulator.endpoint,
            "TWOTOWER_GCP_CREDENTIALS": blob,
            "TWOTOWER_HOME": str(home),
            "TWOTOWER_MLFLOW_ARTIFACTS": (home / "mlartifacts").as_uri(),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "MLFLOW_TRACKING_USERNAME": "twotower",
            "MLFLOW_TRACKING_PASSWORD": mlflow_password,
        }
        for name, value in environment.items():
            monkeypatch.setenv(name, value)

        from twotower_assets.definitions import ALL_ASSETS, ALL_CHECKS
        from twotower_assets.defs.resources import default_resources

        resources = default_resources()  # as the code location builds them
        instance = dg.DagsterInstance.ephemeral()
        result = materialize_all(resources, instance=instance)
        assert result.success

        # The key was really used: google-auth signed a JWT grant with it and got the token.
        assert token_server.grants and all(g["grant_type"].endswith("jwt-bearer") for g in token_server.grants)
        assert "GOOGLE_APPLICATION_CREDENTIALS" not in os.environ, "dagster-gcp's temporary key file is gone"

        run_id = result.run_id
        texts: dict[str, str | bytes] = {}
        captured = capfd.readouterr()
        texts["stdout"], texts["stderr"], texts["logging"] = captured.out, captured.err, caplog.text
        for i, entry in enumerate(instance.all_logs(run_id)):
            texts[f"event {i} ({entry.dagster_event.event_type_value if entry.dagster_event else 'log'})"] = (
                serialize_value(entry)
            )
        materialized = result.get_asset_materialization_events()
        assert len(materialized) >= 10
        texts["stored run (run config, tags)"] = serialize_value(instance.get_run_by_id(run_id))
        definitions = dg.Definitions(assets=ALL_ASSETS, asset_checks=ALL_CHECKS, resources=resources)
        snapshot = serialize_value(RepositorySnap.from_def(definitions.get_repository_def()))
        assert "TWOTOWER_GCP_CREDENTIALS" in snapshot and "MLFLOW_TRACKING_URI" in snapshot  # names only
        texts["repository snapshot (Dagster UI)"] = snapshot

        from mlflow import MlflowClient

        client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # the resource's EnvVar resolves only in a run
        runs = 0
        for experiment in client.search_experiments():
            texts[f"MLflow experiment {experiment.name}"] = json.dumps(dict(experiment.tags)) + experiment.name
            for run in client.search_runs([experiment.experiment_id]):
                runs += 1
                texts[f"MLflow run {run.info.run_id}"] = json.dumps(
                    {"params": run.data.params, "tags": run.data.tags, "metrics": run.data.metrics,
                     "info": str(run.info)}
                )
        assert runs >= 1
        files = [p for p in home.rglob("*") if p.is_file()]
        assert any(p.name == "training_summary.json" for p in files), "MLflow artifacts are under TWOTOWER_HOME"
        for path in files:
            texts[f"file {path.relative_to(home)}"] = path.read_bytes()
        for path in tmp_path.glob("mlflow_server*"):
            if path.is_file():
                texts[f"MLflow server {path.name}"] = path.read_bytes()

        leaks = find_secrets(texts, secrets)
        assert not leaks, "secrets found:\n" + "\n".join(leaks)
        # The search itself works: the secrets are found where they were put.
        assert find_secrets({"env": json.dumps(environment)}, secrets)
    finally:
        stop_group(mlflow_process)
        token_server.stop()


def test_the_emulator_listens_on_loopback_only(bq_emulator):
    assert listening_addresses(bq_emulator.rest_port) == {"127.0.0.1"}
    assert listening_addresses(bq_emulator.grpc_port) <= {"127.0.0.1", "::1"}
