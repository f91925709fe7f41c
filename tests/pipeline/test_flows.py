"""The pipeline flow: its workspace helpers, and real flow runs on Prefect's ephemeral server.

The flow runs are made in a temporary git + DVC repo with tiny stand-in stages
(``flow_fixtures``): orchestration is what is tested here, not training.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from flow_fixtures import DVC_YAML, ROOT, import_flows, make_workspace, run

from seqops.config import ConfigError, load_params

fp, ws = import_flows()


# --- params.yaml ------------------------------------------------------------------------


def test_write_overrides_keeps_comments_and_reads_back(tmp_path):
    params_path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_path)
    params_path.chmod(0o644)
    before = params_path.read_text()
    original = load_params(params_path)
    changes = ws.write_overrides(
        {
            "train.epochs": original.train.epochs + 1,
            "train.lr": 1e-5,  # repr "1e-05": PyYAML would read that back as a string
            "prepare.fsc147.classes": ["apple", "yes"],  # "yes" is a bool in YAML 1.1
            "prepare.seed": original.prepare.seed,  # unchanged
        },
        params_path,
    )
    assert set(changes) == {"train.epochs", "train.lr", "prepare.fsc147.classes"}
    assert changes["train.epochs"] == {
        "old": original.train.epochs,
        "new": original.train.epochs + 1,
    }
    params = load_params(params_path)
    assert params.train.epochs == original.train.epochs + 1 and params.train.lr == 1e-5
    assert params.prepare.fsc147.classes == ("apple", "yes")
    text = params_path.read_text()

    def comments(yaml_text: str) -> list[str]:
        return [line.split("#", 1)[1] for line in yaml_text.splitlines() if "#" in line]

    assert comments(text) == comments(before)  # every comment survives, header included
    assert 'classes: [apple, "yes"]' in text
    changed = [a for a, b in zip(before.splitlines(), text.splitlines(), strict=True) if a != b]
    assert len(changed) == 3  # one line per changed key, nothing else rewritten
    assert params_path.stat().st_mode & 0o777 == 0o644


def test_write_overrides_rejects_bad_keys_and_values_without_writing(tmp_path):
    params_path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_path)
    before = params_path.read_text()
    with pytest.raises(ConfigError, match="train has no key 'epoch'"):
        ws.write_overrides({"train.epoch": 3}, params_path)
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        ws.write_overrides({"train.epochs": "three"}, params_path)
    assert params_path.read_text() == before


def test_write_overrides_without_a_change_leaves_the_file_alone(tmp_path):
    params_path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_path)
    inode = params_path.stat().st_ino
    epochs = load_params(params_path).train.epochs
    assert ws.write_overrides({"train.epochs": epochs}, params_path) == {}
    assert ws.write_overrides({}, params_path) == {}
    assert params_path.stat().st_ino == inode


# --- the workspace ----------------------------------------------------------------------


def test_run_streaming_passes_lines_in_order_and_fails_with_the_stderr_tail():
    lines: list[str] = []
    code = "import sys\nfor i in range(3): print(f'line {i}', flush=True)\n"
    ws.run_streaming([sys.executable, "-c", code], lines.append)
    assert lines == ["line 0", "line 1", "line 2"]

    failing = (
        "import sys\nprint('working')\nsys.stderr.write('first\\nboom: bad thing\\n')\nsys.exit(4)"
    )
    with pytest.raises(
        ws.StageError, match=r"`stage x` failed with exit code 4:\nfirst\nboom: bad"
    ):
        ws.run_streaming([sys.executable, "-c", failing], lines.append, name="stage x")
    assert "working" in lines


def test_workspace_lock_waits_for_the_holder(tmp_path):
    (tmp_path / ".dvc").mkdir()
    lock_path = tmp_path / ws.LOCK_PATH
    lock_path.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import fcntl, time
            f = open({str(lock_path)!r}, "a+")
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write("pid holder\\n"); f.flush()
            print("held", flush=True)
            time.sleep(1.5)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        messages: list[str] = []
        start = time.monotonic()
        with ws.workspace_lock(tmp_path, log=messages.append):
            waited = time.monotonic() - start
        assert waited > 0.5
        assert messages and "pid holder" in messages[0]
    finally:
        holder.wait(timeout=10)


def test_workspace_lock_needs_a_dvc_workspace(tmp_path):
    with pytest.raises(ConfigError, match="not a DVC workspace"), ws.workspace_lock(tmp_path):
        pass


def test_stage_metrics_and_data_identity_come_from_dvc_files(tmp_path):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text('{"count_mae": 0.5, "n": {"a": 1}}')
    assert ws.read_stage_metrics("evaluate", tmp_path) == {"count_mae": 0.5, "n": {"a": 1}}
    assert ws.read_stage_metrics("train", tmp_path) == {}  # declares none
    with pytest.raises(ConfigError, match=r"export\.json: metrics of stage 'export' not found"):
        ws.read_stage_metrics("export", tmp_path)
    assert ws.read_data_identity(tmp_path) is None
    lock = {"stages": {"prepare": {"outs": [{"path": "data/prepared", "md5": "abc.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert ws.read_data_identity(tmp_path) == "data/prepared:abc.dir"


def test_mlflow_links_point_at_a_server_or_the_local_ui(monkeypatch):
    monkeypatch.delenv(fp.MLFLOW_UI_ENV, raising=False)
    assert fp.mlflow_ui_url("http://mlflow:5000/") == "http://mlflow:5000"
    assert fp.mlflow_ui_url("sqlite:///mlflow.db") == fp.DEFAULT_MLFLOW_UI
    monkeypatch.setenv(fp.MLFLOW_UI_ENV, "https://mlflow.example/")
    assert fp.mlflow_ui_url("sqlite:///mlflow.db") == "https://mlflow.example"


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
    state = fp.pipeline(overrides={"train.lr": 0.005, "train.epochs": 2}, return_state=True)
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
    second = fp.pipeline(overrides={"train.lr": 0.008})
    decision = second["decision"]
    assert decision["version"] == "2" and not decision["promoted"]
    assert decision["champion_version"] == "1" and decision["delta"] == pytest.approx(0.3)
    assert decision["same_dataset"] is True
    assert mlflow.get_registered_model("seqops").aliases["champion"] == 1

    # 3. Nothing changed, promote=False: DVC reruns nothing; the comparison is still made.
    export_mtime = (repo / "metrics" / "export.json").stat().st_mtime_ns
    third = fp.pipeline(promote=False)
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
