"""The DVC pipeline: `dvc repro` in a fresh git repo builds the stage, a second run reruns nothing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc and seqops live there


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
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
    params["prepare"].update(num_train=6, num_val=2, num_test=2, image_size=64, max_objects=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
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
