"""MLflow tracking: URI resolution, flattened params, runs (nested, resumed) in a SQLite store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from PIL import Image

from seqops import tracking


def test_tracking_uri_comes_from_the_environment_else_the_embedded_default():
    assert tracking.resolve_tracking_uri({}) == "sqlite:///mlflow.db"
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert tracking.resolve_tracking_uri(env) == "http://mlflow:5000"


def test_artifacts_go_beside_a_sqlite_file_and_a_server_chooses_its_own(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.default_artifact_location(uri) == (tmp_path / "mlartifacts").as_uri()
    relative = tracking.default_artifact_location("sqlite:///mlflow.db")
    assert relative == (Path.cwd() / "mlartifacts").as_uri()
    assert tracking.default_artifact_location("http://mlflow:5000") is None
    assert tracking.default_artifact_location("postgresql://u@db/mlflow") is None


def test_flatten_params_uses_dotted_keys(tiny_params):
    flat = tracking.flatten_params(tiny_params.model_dump(mode="json"))
    assert flat["train.loss.w_done"] == str(tiny_params.train.loss.w_done)
    assert flat["prepare.image_size"] == "64"
    assert flat["prepare.fsc147.classes"] == ""  # empty list
    assert all(isinstance(v, str) for v in flat.values())


def test_importing_tracking_does_no_work():
    code = "import sys, seqops.tracking; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def client(mlflow_uri):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_uri)


@pytest.mark.slow  # a real SQLite store: MLflow's migrations take seconds
def test_a_run_holds_params_tags_metrics_and_pictures(mlflow_store, client):
    run = tracking.start_run(
        {"train": {"loss": {"w_done": 3.0}}, "model": {"preset": "tiny"}},
        tags={"device": "cpu", "dvc_stage": "train"},
        run_name="test",
    )
    run.log_metrics({"val/loss": 1.5, "epoch": 1, "note": "skipped"}, step=1)
    run.log_metrics({"val/loss": 1.25}, step=2)
    run.log_image(Image.new("RGB", (8, 8), (255, 0, 0)), "pictures/epoch_001/sample_0.png")
    run.finish()
    data = client.get_run(run.run_id)
    assert data.info.status == "FINISHED"
    assert data.data.params == {"train.loss.w_done": "3.0", "model.preset": "tiny"}
    assert data.data.tags["dvc_stage"] == "train"
    assert data.data.tags["device"] == "cpu"
    assert "mlflow.source.git.commit" in data.data.tags  # the tests run inside the git repo
    history = client.get_metric_history(run.run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.25)]
    assert "note" not in data.data.metrics
    pictures = client.list_artifacts(run.run_id, "pictures/epoch_001")
    assert [a.path for a in pictures] == ["pictures/epoch_001/sample_0.png"]
    assert (mlflow_store / "mlartifacts").is_dir()  # beside the SQLite file


@pytest.mark.slow  # a real SQLite store: MLflow's migrations take seconds
def test_a_run_nests_under_the_parent_from_the_environment(monkeypatch, client):
    parent = tracking.start_run({}, experiment_name="flows")
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent.run_id)
    child = tracking.start_run({"a": 1})
    assert child.experiment_id == parent.experiment_id
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    child.finish()
    parent.finish()


@pytest.mark.slow  # a real SQLite store: MLflow's migrations take seconds
def test_resuming_continues_the_same_run_and_unknown_ids_start_a_new_one(client):
    first = tracking.start_run({"train": {"epochs": 2}})
    first.finish()
    again = tracking.start_run({"train": {"epochs": 3}}, resume_run_id=first.run_id)
    assert again.resumed and again.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    again.finish("KILLED")
    assert client.get_run(first.run_id).info.status == "KILLED"
    fresh = tracking.start_run({}, resume_run_id="0" * 32)
    assert not fresh.resumed and fresh.run_id != first.run_id
    fresh.finish()


def test_a_deferring_run_keeps_calls_while_no_server_answers_and_says_so_once(caplog):
    """No server on the port: the calls are kept in order, one warning says so, and the end
    of the run names what could not be sent (the long outage test is in tests/training)."""
    from mlflow import MlflowClient

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run = tracking.TrackedRun(MlflowClient(uri), "0" * 32, "1", uri, defer_when_unreachable=True)
    with caplog.at_level("WARNING", logger="seqops.tracking"):
        assert run.log_metrics({"val/loss": 1.5}, step=1) == 1
        run.set_tags({"device": "cpu"})
        run.log_image(Image.new("RGB", (8, 8)), "pictures/epoch_001/sample_0.png")
        assert run.pending == ["metrics at step 1", "tags", "pictures/epoch_001/sample_0.png"]
        run.finish(wait_seconds=0.1)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is unreachable" in m for m in messages) == 1, messages
    assert "4 calls not sent (metrics at step 1, tags, pictures/" in messages[-1]


def test_only_a_server_that_cannot_answer_is_waited_for():
    from mlflow.exceptions import MlflowException, RestException

    refused = MlflowException("API request to http://x/api failed with exception refused")
    assert tracking.is_unreachable(refused)
    assert tracking.is_unreachable(RestException({"error_code": "TEMPORARILY_UNAVAILABLE"}))
    assert tracking.is_unreachable(RestException({"error_code": "INTERNAL_ERROR"}))
    # The server answered that the call is wrong: sending it again would not help.
    assert not tracking.is_unreachable(RestException({"error_code": "INVALID_PARAMETER_VALUE"}))
    assert not tracking.is_unreachable(MlflowException("bad", "RESOURCE_DOES_NOT_EXIST"))
    assert not tracking.is_unreachable(ValueError("a bug"))
