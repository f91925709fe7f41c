"""The scaled-out configuration for real: PostgreSQL (Debian's package, installed and started
by ``scripts/postgres.sh``), ``mlflow server`` on it with proxied artifacts, ``prefect
server`` on it, and the pipeline flow run against both, switched by environment variables
alone (docs/architecture.md, principle 7). The deployment and worker path is tested on
Prefect's SQLite in ``test_deployment.py``; this test is about the databases and servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from flow_fixtures import BIN, TINY_PIPELINE, make_project_workspace
from mlflow_server import MlflowServer
from test_deployment import stop, wait_healthy

SCRIPT = ROOT / "scripts" / "postgres.sh"
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _script(*args: str, timeout: float = 900) -> str:
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{SCRIPT.name} {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout.strip()


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster with databases ``mlflow`` and ``prefect``; its URL."""
    if os.geteuid() != 0:
        pytest.skip("installing PostgreSQL (scripts/postgres.sh install) needs root and apt-get")
    _script("install")
    # Not under pytest's tmp_path: PostgreSQL runs as the `postgres` user, who cannot enter
    # pytest's 0700 folders.
    cluster = Path(tempfile.mkdtemp(prefix="seqops-pg-", dir="/tmp"))
    url = _script("start", str(cluster), str(free_port())).splitlines()[-1]
    try:
        yield url
    finally:
        _script("stop", str(cluster))


def _prefect_server(tmp_path: Path, database_url: str) -> tuple[subprocess.Popen, str, dict]:
    """``prefect server start`` on the PostgreSQL database; returns the process, its API URL
    and the environment a client of it uses."""
    port = free_port()
    client_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server_env = {**client_env, "PREFECT_API_DATABASE_CONNECTION_URL": database_url}
    with open(tmp_path / "prefect-server.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=server_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return proc, client_env["PREFECT_API_URL"], client_env


def _query(url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as connection:
        return connection.execute(sql).fetchall()


def _flow_runs(api: str) -> list[dict]:
    request = urllib.request.Request(
        f"{api}/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_pipeline_flow_runs_on_mlflow_and_prefect_servers_on_postgres(
    postgres, tmp_path, monkeypatch
):
    repo = make_project_workspace(tmp_path / "repo")
    artifacts = tmp_path / "mlflow-artifacts"
    mlflow = MlflowServer(
        free_port(), f"{postgres}/mlflow", artifacts, tmp_path / "mlflow-server.log"
    )
    prefect_db = postgres.replace("postgresql://", "postgresql+asyncpg://") + "/prefect"
    prefect, api, env = _prefect_server(tmp_path, prefect_db)
    started = time.monotonic()
    try:
        mlflow.start(timeout=300)  # both servers migrate their new database meanwhile
        wait_healthy(f"{api}/health", prefect, tmp_path / "prefect-server.log")
        startup = time.monotonic() - started
        overrides = [arg for k, v in TINY_PIPELINE.items() for arg in ("--set", f"{k}={v}")]
        flow = subprocess.run(
            [str(BIN / "python"), "-m", "flows.pipeline", "--json", *overrides],
            cwd=repo, env={**env, "MLFLOW_TRACKING_URI": mlflow.uri},
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert flow.returncode == 0, f"{flow.stdout[-3000:]}\n{flow.stderr[-6000:]}"
        result = json.loads(flow.stdout)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.uri)  # `models:/` URIs resolve there
        _check_mlflow(mlflow.uri, result, artifacts, repo)
        runs = _flow_runs(api)
    finally:
        stop(prefect)
        mlflow.stop()
    print(f"servers up in {startup:.0f} s on PostgreSQL")

    assert result["decision"]["promoted"] and result["decision"]["version"] == "1"
    (run,) = runs
    assert run["state"]["type"] == "COMPLETED" and run["flow_id"]
    # What the servers showed is what PostgreSQL holds.
    assert ("seqops",) in _query(f"{postgres}/mlflow", "SELECT name FROM registered_models")
    (finished,) = _query(f"{postgres}/mlflow", "SELECT count(*) FROM runs WHERE status='FINISHED'")
    assert finished[0] >= 2  # the flow's parent run and the training run
    states = _query(f"{postgres}/prefect", "SELECT name, state_type FROM flow_run")
    assert states == [(run["name"], "COMPLETED")]
    keys = {key for (key,) in _query(f"{postgres}/prefect", "SELECT key FROM artifact")}
    assert {"seqops-evaluation", "seqops-mlflow-run", "seqops-model-version"} <= keys


def _check_mlflow(uri: str, result: dict, artifacts: Path, repo: Path) -> None:
    """The registry and runs on the server; the model's files went through the server's
    artifact proxy into its destination, nothing into the workspace."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(uri)
    # The REST API gives the version as text (a SQLite store: a number); seqops uses str().
    assert str(client.get_registered_model("seqops").aliases["champion"]) == "1"
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and "evaluate/count_mae" in parent.data.metrics
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert list(artifacts.rglob("encoder.onnx")), "the model did not reach the artifact store"
    assert not (repo / "mlartifacts").exists()
    downloaded = Path(download_artifacts("models:/seqops@champion"))
    assert {p.name for p in downloaded.rglob("*.onnx")} >= {"encoder.onnx", "step.onnx"}
