"""`dvc repro` SIGKILLed during train and during export: nothing half-written is left, the
next `dvc repro` finishes, and training resumes (same epochs, same MLflow run).

The whole job is killed (its process group: dvc and the stage command under it), as a
cancelled CI job, an OOM kill or a lost container kills it: nothing gets to clean up.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flow_fixtures import BIN, TINY_PIPELINE, make_project_workspace
from flow_fixtures import run as run_command

from seqops.params_file import write_overrides
from seqops.training.checkpoint import load_checkpoint

EPOCHS = 3  # the kill lands after epoch 1's checkpoint, with two epochs still to go
# What the atomic writers of seqops.io name their temporaries (and a replaced directory).
DEBRIS = re.compile(r"^\..+\.(?:[0-9]+\.[A-Za-z0-9_]+\.tmp|old-[0-9]+)$")


def _env(project: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }


def _repro_killed_when(project: Path, ready: Callable[[], bool], what: str) -> str:
    """Run `dvc repro` and SIGKILL its whole process group once ``ready()``; its output."""
    log_path = project.parent / f"repro-{what}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["dvc", "repro"], cwd=project, env=_env(project), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail(f"dvc repro ended ({proc.returncode}) before {what}:\n{log_path.read_text()}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return log_path.read_text()


def _debris(project: Path) -> list[str]:
    return sorted(
        str(path.relative_to(project))
        for folder in ("data", "models", "metrics", "plots", "reports")
        for path in (project / folder).rglob(".*")
        if DEBRIS.match(path.name)
    )


def _repro(project: Path) -> str:
    proc = run_command(["dvc", "repro"], project, env=_env(project))
    assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_a_repro_killed_in_train_and_in_export_leaves_nothing_half_written(tmp_path):
    project = make_project_workspace(tmp_path / "repo")
    write_overrides({**TINY_PIPELINE, "train.epochs": EPOCHS}, project / "params.yaml")
    models = project / "models"

    # 1. Killed in train, after epoch 1's checkpoints: both load whole.
    out = _repro_killed_when(project, lambda: (models / "last.pt").is_file(), "train")
    assert "Running stage 'train'" in out and "Running stage 'export'" not in out
    first = load_checkpoint(models / "last.pt")
    assert 1 <= first["epoch"] < EPOCHS and load_checkpoint(models / "best.pt")
    assert first["run_id"]

    # 2. Resumes train (same MLflow run), then is killed while export writes models/onnx.
    exporting = lambda: any(models.glob(".onnx.*.tmp"))  # noqa: E731
    out = _repro_killed_when(project, exporting, "export")
    assert f"resuming {Path('models') / 'last.pt'} at epoch {first['epoch'] + 1}" in out
    assert "Running stage 'export'" in out
    assert not (models / "onnx").exists()  # DVC removed it; the new one was never renamed in
    assert _debris(project)  # the killed export's temporary directory, for now
    run_info = json.loads((models / "train_run.json").read_text())
    assert run_info["run_id"] == first["run_id"]
    assert json.loads((project / "metrics" / "train.json").read_text())["epochs_trained"] == 3
    with open(project / "plots" / "train.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3"]

    # 3. The next repro finishes what is left and leaves no debris behind.
    out = _repro(project)
    assert "Running stage 'train'" not in out
    assert "Running stage 'export'" in out and "Running stage 'evaluate'" in out
    assert _debris(project) == []
    status = run_command(["dvc", "status"], project, env=_env(project))
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    info = json.loads((models / "onnx" / "model.json").read_text())
    assert info["run_id"] == first["run_id"]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_run(first["run_id"]).info.status == "FINISHED"
    candidate = client.get_model_version_by_alias("seqops", "candidate")
    assert candidate.run_id == first["run_id"]
