"""The pipeline flow: real flow runs on Prefect's ephemeral server.

The flow runs are made in a temporary git + DVC repo with tiny stand-in stages
(``flow_fixtures``): orchestration is what is tested here, not training. The workspace code
the flow calls is tested in ``test_workspace.py`` and ``test_params_file.py``.
"""

import json
import os
import subprocess
import sys

import pytest
from flow_fixtures import make_workspace, run

from flows.pipeline import (
    DEFAULT_MLFLOW_UI,
    MLFLOW_UI_ENV,
    main,
    mlflow_ui_url,
    pipeline,
    summary_text,
)
from seqops.config import load_params


def test_mlflow_links_point_at_a_server_or_the_local_ui(monkeypatch):
    monkeypatch.delenv(MLFLOW_UI_ENV, raising=False)
    assert mlflow_ui_url("http://mlflow:5000/") == "http://mlflow:5000"
    assert mlflow_ui_url("sqlite:///mlflow.db") == DEFAULT_MLFLOW_UI
    monkeypatch.setenv(MLFLOW_UI_ENV, "https://mlflow.example/")
    assert mlflow_ui_url("sqlite:///mlflow.db") == "https://mlflow.example"


def test_the_command_line_takes_the_cli_set_option_and_rejects_a_bad_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--set", "train.epochs"])  # no "=": refused before any flow run starts
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "expected KEY=VALUE" in err and "--set KEY=VALUE" in err


def test_the_summary_says_what_the_run_did_in_a_few_lines():
    from seqops.config import PromoteConfig
    from seqops.promote import decide_promotion

    metrics = {"count_mae": 0.54, "count_exact_acc": 0.79, "f1": 0.94, "px_err_median": 1.99}
    decision = decide_promotion("seqops", "3", metrics, PromoteConfig(metric="count_mae",
                                higher_is_better=False), champion=None)  # fmt: skip
    changes = {"train.epochs": {"old": 12, "new": 1}}
    text = summary_text({"decision": decision, "changes": changes, "mlflow_run_id": "abc"})
    lines = text.splitlines()
    assert lines[0] == "model seqops version 3 (models:/seqops/3): promoted to @champion"
    assert "count MAE 0.540, exact 79%, points F1 0.940, px median 1.99" in lines[2]
    assert "flagged for review n/a" in lines[2]
    assert "train.epochs: 12 -> 1 (kept; `git checkout params.yaml` undoes)" in lines[3]
    assert "(run abc)" in lines[4] and len(lines) == 5
    many = {f"prepare.k{i}": {"old": i, "new": i + 1} for i in range(9)}
    text = summary_text({"decision": decision, "changes": many, "mlflow_run_id": "abc"})
    assert "prepare.k3: 3 -> 4, ... (9 keys; `git diff params.yaml`)" in text
    assert "prepare.k4" not in text


# --- real flow runs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server and database for this module's flow runs."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    settings = {PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(settings), prefect_test_harness(server_startup_timeout=60):
        yield


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


@pytest.mark.slow
@pytest.mark.e2e
def test_flow_runs_the_stages_promotes_and_reports(prefect_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    repo = make_workspace(tmp_path / "repo")
    monkeypatch.chdir(repo)
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow = MlflowClient(uri)

    # 1. First model: there is no champion, so it becomes one.
    state = pipeline(overrides={"train.lr": 0.005, "train.epochs": 2}, return_state=True)
    assert state.is_completed(), state.message
    first = state.result()
    assert first["decision"]["promoted"] and first["decision"]["version"] == "1"
    assert first["metrics"]["count_mae"] == 0.5
    assert first["changes"]["train.lr"]["new"] == 0.005
    assert mlflow.get_registered_model("seqops").aliases["champion"] == 1
    # The overrides stay in params.yaml, so DVC agrees with the flow: nothing to rerun.
    assert load_params(repo / "params.yaml").train.lr == 0.005
    status = run(["dvc", "status", "--json"], repo)
    assert status.returncode == 0 and json.loads(status.stdout) == {}

    # The MLflow parent run carries the flow run id; the stage's run is its child.
    parent = mlflow.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert parent.data.metrics["evaluate/count_mae"] == 0.5
    assert parent.data.params["train.lr"] == "0.005"
    children = mlflow.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert [c.data.tags["dvc_stage"] for c in children] == ["export"]

    # Prefect artifacts: the metrics table and the two links.
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert set(artifacts) == {"seqops-evaluation", "seqops-mlflow-run", "seqops-model-version"}
    assert "| **count_mae** | 0.5 |" in artifacts["seqops-evaluation"].data
    assert parent.info.run_id in artifacts["seqops-mlflow-run"].data
    assert "/#/models/seqops/versions/1)" in artifacts["seqops-model-version"].data

    # 2. A worse model: compared and reported, but the champion stays.
    second = pipeline(overrides={"train.lr": 0.008})
    decision = second["decision"]
    assert decision["version"] == "2" and not decision["promoted"]
    assert decision["champion_version"] == "1" and decision["delta"] == pytest.approx(0.3)
    assert decision["same_dataset"] is True
    assert mlflow.get_registered_model("seqops").aliases["champion"] == 1

    # 3. Nothing changed, promote=False: DVC reruns nothing; the comparison is still made.
    export_mtime = (repo / "metrics" / "export.json").stat().st_mtime_ns
    third = pipeline(promote=False)
    assert third["changes"] == {}
    assert (repo / "metrics" / "export.json").stat().st_mtime_ns == export_mtime
    assert third["decision"]["version"] == "2" and not third["decision"]["applied"]
    assert mlflow.get_registered_model("seqops").aliases["champion"] == 1


@pytest.mark.slow
@pytest.mark.e2e
def test_a_failed_stage_fails_the_flow_with_its_error(tmp_path):
    """``python -m flows.pipeline`` with no Prefect API configured: the embedded default."""
    repo = make_workspace(tmp_path / "repo", extra_files=("flows", "prefect.toml"))
    env = {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
    }
    env_clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--set", "train.lr=5.0"],
        cwd=repo,
        env={**env_clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Starting temporary server" in proc.stdout + proc.stderr  # the ephemeral server
    assert "seqops pipeline failed: `dvc repro train` failed" in proc.stderr
    assert "loss is nan: training diverged" in proc.stderr  # the stage's own error
    assert not (repo / "metrics" / "evaluate.json").exists()
    from mlflow import MlflowClient

    parents = MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        ["1"], "tags.`prefect.flow_run_id` != ''"
    )
    assert [p.info.status for p in parents] == ["FAILED"]
