"""Workspaces for flow and deployment tests: temporary git + DVC repos.

``make_workspace``: tiny stand-in stages (``stand_in.py`` below) that read the project's real
``params.yaml``, write the same kind of files and make the same MLflow calls as the real
stages (a run nested under the flow's parent run, a registered version with the
``candidate`` alias, the metrics files) in a fraction of a second: fixtures for the
orchestration, not part of the product. ``make_project_workspace``: the real pipeline
(``dvc.yaml``, ``seqops``, ``flows``, ``prefect.yaml``), run on :data:`TINY_PIPELINE`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


STAND_IN = '''
"""Stand-in stages: the files and MLflow calls of the real ones, in a fraction of a second."""
import json, sys
from pathlib import Path

import yaml

stage = sys.argv[1]
params = yaml.safe_load(Path("params.yaml").read_text())
if stage == "prepare":
    Path("data/prepared").mkdir(parents=True, exist_ok=True)
    Path("data/prepared/train.json").write_text(json.dumps(params["prepare"]["num_train"]))
elif stage == "train":
    if params["train"]["lr"] > 1:
        print("loss is nan: training diverged", file=sys.stderr)
        sys.exit(3)
    for epoch in range(params["train"]["epochs"]):
        print(f"epoch {epoch} val/loss {1 / (epoch + 1):.3f}", flush=True)
    Path("models").mkdir(exist_ok=True)
    Path("models/weights.json").write_text(json.dumps(params["train"]))
elif stage == "export":
    from seqops.tracking import start_run
    run = start_run({}, tags={"dvc_stage": "export"}, run_name="export")  # nests under the flow
    run.log_artifact("models/weights.json", "model")
    run.finish()
    client = run.client
    if not client.search_registered_models("name='seqops'"):
        client.create_registered_model("seqops")
    version = client.create_model_version("seqops", f"runs:/{run.run_id}/model", run.run_id)
    client.set_registered_model_alias("seqops", "candidate", version.version)
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/export.json").write_text(json.dumps(
        {"registered_model": "seqops", "registered_version": str(version.version)}))
elif stage == "evaluate":
    mae = round(params["train"]["lr"] * 100, 6)  # the knob the tests turn
    Path("metrics/evaluate.json").write_text(json.dumps({"count_mae": mae, "f1": 1 - mae / 10}))
'''

DVC_YAML = """
stages:
  prepare:
    cmd: python stand_in.py prepare
    deps: [stand_in.py]
    params: [prepare.num_train]
    outs: [data/prepared]
  train:
    cmd: python stand_in.py train
    deps: [stand_in.py, data/prepared]
    params: [train.lr, train.epochs]
    outs: [models/weights.json]
  export:
    cmd: python stand_in.py export
    deps: [models/weights.json]
    metrics: [{metrics/export.json: {cache: false}}]
  evaluate:
    cmd: python stand_in.py evaluate
    deps: [stand_in.py, metrics/export.json, data/prepared]
    params: [train.lr]
    metrics: [{metrics/evaluate.json: {cache: false}}]
"""


# The real pipeline in well under a minute on 2 CPU cores: 24 images of 64 px, one epoch.
TINY_PIPELINE = {
    "prepare.num_train": 16,
    "prepare.num_val": 4,
    "prepare.num_test": 4,
    "prepare.image_size": 64,
    "prepare.min_objects": 1,
    "prepare.max_objects": 4,
    "prepare.row_height": 16,
    "sampling.steps_per_image": 4,
    "train.epochs": 1,
    "train.batch_size": 4,
    "train.device": "cpu",
    "train.rollout_images": 2,
    "train.picture_samples": 2,
    "evaluate.max_objects": 20,  # an untrained model never says done: keep its loop short
}
PROJECT_FILES = (
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    "prefect.yaml",
    "prefect.toml",
    ".dvcignore",
    "seqops",
    "flows",
)


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with the venv's bin first on PATH (dvc, seqops)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _copy_project_files(path: Path, names: tuple[str, ...]) -> None:
    for name in names:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, path / name)


def _init_repo(path: Path) -> Path:
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        proc = run(cmd, path)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"
    return path


def make_workspace(path: Path, extra_files: tuple[str, ...] = ()) -> Path:
    """A committed git + DVC repo: the project's params.yaml, the stand-in stages, and
    ``extra_files`` (files or directories of the project, e.g. ``flows``, ``prefect.yaml``)."""
    path.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")
    (path / "stand_in.py").write_text(textwrap.dedent(STAND_IN))
    (path / "dvc.yaml").write_text(DVC_YAML)
    (path / ".gitignore").write_text("mlflow.db\nmlartifacts/\n__pycache__/\n")
    _copy_project_files(path, extra_files)
    return _init_repo(path)


def make_project_workspace(path: Path) -> Path:
    """A committed git + DVC repo holding the project's pipeline: dvc.yaml, params.yaml,
    the code its stages depend on, the flows and their Prefect configuration."""
    path.mkdir(parents=True)
    _copy_project_files(path, PROJECT_FILES)
    shutil.copy(ROOT / ".gitignore", path / ".gitignore")
    (path / "data" / "raw").mkdir(parents=True)
    (path / "data" / "raw" / ".gitkeep").touch()
    return _init_repo(path)
