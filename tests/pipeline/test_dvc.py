"""The DVC pipeline in a fresh git repo: `dvc repro` builds every stage; a rerun does nothing."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from flow_fixtures import TINY_PIPELINE, make_project_workspace
from flow_fixtures import run as run_command

from seqops import export
from seqops.data.manifest import manifest_path, read_manifest
from seqops.evaluate import HEADLINE_METRICS
from seqops.params_file import write_overrides
from seqops.training import outputs as train_outputs


def run(cmd: list[str], cwd: Path) -> str:
    """Run ``cmd`` in the workspace with its own MLflow store; its output, or a test failure."""
    proc = run_command(cmd, cwd, env={"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"})
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh git + DVC repo holding the project's pipeline files and code, with tiny params."""
    repo = make_project_workspace(tmp_path / "repo")
    write_overrides(TINY_PIPELINE, repo / "params.yaml")
    return repo


@pytest.mark.e2e
def test_repro_prepare_then_noop(project: Path):
    out = run(["dvc", "repro", "prepare"], project)
    assert "Running stage 'prepare'" in out
    assert (project / "data" / "prepared" / "train.jsonl").is_file()
    assert (project / "dvc.lock").is_file()

    again = run(["dvc", "repro", "prepare"], project)
    assert "Running stage" not in again
    assert "didn't change" in again

    # Changing a key the stage reads reruns it; the lock records the new value.
    write_overrides({"prepare.seed": 7}, project / "params.yaml")
    assert "Running stage 'prepare'" in run(["dvc", "repro", "prepare"], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["params.yaml"]["prepare.seed"] == 7


def _check_evaluation_agrees_with_its_inputs(project: Path, metrics: dict) -> None:
    """The metrics file against the test manifest, the per-image counts and MLflow."""
    from mlflow import MlflowClient

    records = read_manifest(manifest_path(project / "data" / "prepared", "test"))
    assert metrics["num_images"] == len(records) == TINY_PIPELINE["prepare.num_test"]
    assert metrics["num_objects"] == sum(r.num_objects for r in records)
    with open(project / "plots" / "evaluate" / "counts.csv") as f:
        rows = list(csv.DictReader(f))
    true_counts = {r.id: r.num_objects for r in records}
    assert {row["id"]: int(row["true_count"]) for row in rows} == true_counts
    errors = [abs(int(row["pred_count"]) - int(row["true_count"])) for row in rows]
    assert metrics["count_mae"] == pytest.approx(sum(errors) / len(errors))
    assert metrics["num_predictions"] == sum(int(row["pred_count"]) for row in rows)
    # The value the registry compares champions on: logged into the candidate's run.
    mlflow = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    candidate = mlflow.get_model_version_by_alias("seqops", "candidate")
    run_metrics = mlflow.get_run(candidate.run_id).data.metrics
    assert run_metrics["test/count_mae"] == pytest.approx(metrics["count_mae"])


@pytest.mark.e2e
@pytest.mark.slow
def test_repro_whole_pipeline_then_noop(project: Path):
    out = run(["dvc", "repro"], project)
    for stage in ("prepare", "train", "export", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((project / "reports" / "evaluate" / "metrics.json").read_text())
    _check_evaluation_agrees_with_its_inputs(project, metrics)
    # DVC's metrics file holds the headline figures of the same evaluation.
    headline = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert headline == {k: metrics[k] for k in HEADLINE_METRICS}
    _check_headlines_of_train_and_export(project)
    assert (project / "models" / "onnx" / "encoder.onnx").is_file()

    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again

    # An evaluate-only parameter reruns evaluate alone: train and export are cached.
    write_overrides({"evaluate.match_radius_px": 4}, project / "params.yaml")
    out = run(["dvc", "repro"], project)
    assert "Running stage 'evaluate'" in out
    assert "Running stage 'train'" not in out and "Running stage 'export'" not in out


def _check_headlines_of_train_and_export(project: Path) -> None:
    """Train and export: DVC's metrics files hold the headline figures of the reports."""

    def read(*parts: str) -> dict:
        return json.loads(project.joinpath(*parts).read_text())

    trained = read("reports", "train", "metrics.json")
    assert trained["epochs_trained"] == 1 and "grad/total" in trained and len(trained) > 20
    assert read("metrics", "train.json") == {k: trained[k] for k in train_outputs.HEADLINE_METRICS}
    exported = read("reports", "export", "metrics.json")
    assert exported["registered_version"] == "1" and exported["parity_passed"] is True
    assert read("metrics", "export.json") == export.headline_export(exported)
    assert set(read("metrics", "export.json")) == {*export.HEADLINE_METRICS, "calibration"}
