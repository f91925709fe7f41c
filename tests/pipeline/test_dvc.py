"""The DVC pipeline in a fresh git repo: `dvc repro` builds every stage; a rerun does nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: dvc and seqops live there


def run(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh git + DVC repo holding the project's pipeline files and code, with small params."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "seqops", repo / "seqops", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "data" / "raw").mkdir(parents=True)
    (repo / "data" / "raw" / ".gitkeep").touch()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"].update(
        num_train=8, num_val=4, num_test=4, image_size=64, min_objects=2, max_objects=6
    )
    params["train"].update(epochs=1, batch_size=4, rollout_images=2, picture_samples=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n")
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo)
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
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["seed"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage 'prepare'" in run(["dvc", "repro", "prepare"], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["params.yaml"]["prepare.seed"] == 7


@pytest.mark.e2e
@pytest.mark.slow
def test_repro_whole_pipeline_then_noop(project: Path):
    out = run(["dvc", "repro"], project)
    for stage in ("prepare", "train", "export", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert metrics["num_images"] == 4 and metrics["count_mae"] >= 0
    assert (project / "models" / "onnx" / "encoder.onnx").is_file()

    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again

    # An evaluate-only parameter reruns evaluate alone: train and export are cached.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["match_radius_px"] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], project)
    assert "Running stage 'evaluate'" in out
    assert "Running stage 'train'" not in out and "Running stage 'export'" not in out
