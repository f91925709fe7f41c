"""The ``seqops-pipeline/local`` deployment, end to end against a real Prefect server.

A ``prefect server start`` process on a free loopback port, the ``process`` work pool, the
deployment made from the project's ``prefect.yaml``, a worker, and a run triggered with
overrides, as a user would (``make prefect-server``, ``prefect-worker``, ``deploy``,
``run-deployment``). The workspace is a temporary git + DVC repo holding the project's
pipeline (``dvc.yaml``, ``seqops``, ``flows``, ``prefect.yaml``), run on tiny overrides: the
real stages, one epoch on 24 images of 64 px.
"""

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from flow_fixtures import BIN, TINY_PIPELINE, make_project_workspace, run

from seqops.config import load_params

POOL = "seqops-process"  # prefect.yaml's work pool of the `local` deployment
SERVER_START_TIMEOUT = 120  # seconds; a fresh database is migrated first (slow on 2 cores)
RUN_TIMEOUT = 300


def wait_healthy(url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited early:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(1)
    pytest.fail(
        f"prefect server not healthy after {SERVER_START_TIMEOUT}s:\n{log_path.read_text()}"
    )


def stop(proc: subprocess.Popen) -> None:
    """End a process started in its own session, and its children (the flow-run processes)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.e2e
def test_local_deployment_runs_on_a_process_worker(tmp_path):
    repo = make_project_workspace(tmp_path / "repo")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick the run up quickly
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
    }

    def prefect(*args: str, cwd: Path = repo, timeout: float = 120) -> str:
        proc = subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{output}"
        return output

    server_log = tmp_path / "server.log"
    worker_log = tmp_path / "worker.log"
    processes: list[subprocess.Popen] = []

    def spawn(log_path: Path, *args: str) -> subprocess.Popen:
        """Start ``prefect <args>`` in its own session outside the workspace, output to
        ``log_path``; :func:`stop` ends it after the test."""
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [str(BIN / "prefect"), *args],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        processes.append(proc)
        return proc

    try:
        server = spawn(server_log, "server", "start", "--host", "127.0.0.1", "--port", str(port))
        wait_healthy(f"http://127.0.0.1:{port}/api/health", server, server_log)

        prefect("work-pool", "create", POOL, "--type", "process", "--overwrite")
        deployed = prefect("--no-prompt", "deploy", "--name", "local")
        assert "seqops-pipeline/local" in deployed
        inspected = prefect("deployment", "inspect", "seqops-pipeline/local")
        assert str(repo) in inspected  # the pull step's directory: where `deploy` ran

        # The worker starts elsewhere: the pull step alone puts the run in the workspace.
        spawn(worker_log, "worker", "start", "--pool", POOL)

        overrides = json.dumps(TINY_PIPELINE)
        try:
            output = prefect(
                "deployment",
                "run",
                "seqops-pipeline/local",
                "--param",
                f"overrides={overrides}",
                "--watch",
                "--watch-timeout",
                str(RUN_TIMEOUT),
                timeout=RUN_TIMEOUT + 30,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nworker log:\n{worker_log.read_text()[-6000:]}") from None
        assert "Completed" in output, f"{output}\nworker log:\n{worker_log.read_text()[-6000:]}"
    finally:
        for proc in reversed(processes):
            stop(proc)

    # The run happened in the workspace: overrides written, stages run, model promoted.
    worker_output = worker_log.read_text()
    assert "Running stage 'train'" in worker_output  # stage output streamed into the logs
    params = load_params(repo / "params.yaml")
    assert (params.train.epochs, params.prepare.image_size) == (1, 64)
    assert "count_mae" in json.loads((repo / "metrics" / "evaluate.json").read_text())
    status = run(["dvc", "status", "--json"], repo)  # `dvc repro` now would rerun nothing
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout

    from mlflow import MlflowClient

    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert mlflow.get_registered_model("seqops").aliases["champion"] == 1
    (parent,) = mlflow.search_runs(["0", "1"], "tags.`prefect.flow_run_id` != ''")
    assert parent.info.status == "FINISHED" and "evaluate/count_mae" in parent.data.metrics
    children = mlflow.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 1  # the training run, which export and evaluate log into
    assert mlflow.get_model_version("seqops", "1").run_id == children[0].info.run_id
