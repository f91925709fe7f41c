"""MLflow tracking: where runs go, and a small handle that logs one training run.

Embedded default (docs/architecture.md, principle 7): MLflow's SQLite store
``sqlite:///mlflow.db`` in the current directory, artifacts in ``./mlartifacts`` beside it (the
layout ``mlflow server`` uses by default, so ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows the runs).
``MLFLOW_TRACKING_URI`` switches to a server (Postgres + S3/MinIO) without a code change;
the server then chooses the artifact location. Nothing happens at import time: the URI is
resolved and the client built only when a run starts.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "seqops"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
PARENT_RUN_ENV = "SEQOPS_PARENT_RUN_ID"  # set by the Prefect flow: nest the stage's run
ARTIFACTS_DIR_NAME = "mlartifacts"
# MLflow limits: 100 params/tags and 1000 metrics per batch request, 6000 characters per
# param value.
_BATCH = 100
_METRICS_BATCH = 1000
_MAX_PARAM_CHARS = 6000


def resolve_tracking_uri(env: Mapping[str, str] | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store in the current dir."""
    env = os.environ if env is None else env
    return env.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def default_artifact_location(tracking_uri: str) -> str | None:
    """``<dir of the SQLite file>/mlartifacts`` for a ``sqlite:///`` URI, else ``None``
    (a server, or another database, knows its own artifact root)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db_path = Path(tracking_uri[len(prefix) :])
    return (db_path.parent.resolve() / ARTIFACTS_DIR_NAME).as_uri()


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"loss": {"w_done": 3.0}}}`` -> ``{"train.loss.w_done": "3.0"}``."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:_MAX_PARAM_CHARS]
    return flat


def git_commit(cwd: str | Path | None = None) -> tuple[str | None, bool]:
    """``(commit, dirty)`` of the git work tree at ``cwd``; ``(None, False)`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None, False
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    return commit.stdout.strip(), bool(status.stdout.strip())


@dataclass
class TrackedRun:
    """One MLflow run, logged through an explicit client (no global MLflow state)."""

    client: Any  # mlflow.MlflowClient
    run_id: str
    experiment_id: str
    tracking_uri: str
    resumed: bool = False
    _closed: bool = field(default=False, repr=False)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> int:
        """Log the numeric values of ``metrics`` at ``step`` (keys such as ``val/loss`` are
        fine); others (text, None, booleans) are skipped. Returns how many were logged."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        for i in range(0, len(batch), _METRICS_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + _METRICS_BATCH])
        return len(batch)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log flat string parameters (see :func:`flatten_params`)."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text; ``None`` values are skipped)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _BATCH])

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log a PIL image (or uint8 array) as the artifact ``artifact_file`` (``.png``)."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a directory with its content, under ``artifact_path``."""
        if Path(local_path).is_dir():
            self.client.log_artifacts(self.run_id, str(local_path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``); later calls do nothing."""
        if not self._closed:
            self.client.set_terminated(self.run_id, status=status)
            self._closed = True


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a SQLite file) when new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))


def _resumable(client: Any, run_id: str | None) -> bool:
    """True when ``run_id`` is an active run of this store."""
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except Exception:  # not in this tracking store (another URI, a fresh database)
        return False
    return run.info.lifecycle_stage == "active"


def attach_run(run_id: str, tracking_uri: str | None = None) -> TrackedRun:
    """A handle on the existing run ``run_id``, to log more into it (its status is kept).

    Raises:
        LookupError: the run is not in this tracking store (another URI, a fresh database).
    """
    from mlflow import MlflowClient

    tracking_uri = tracking_uri or resolve_tracking_uri()
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # MlflowException: not in this store
        raise LookupError(f"MLflow run {run_id} not found at {tracking_uri}") from exc
    return TrackedRun(client, run.info.run_id, run.info.experiment_id, tracking_uri)


def start_run(
    params: Mapping[str, Any],
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
) -> TrackedRun:
    """Start (or resume) a run, logging flattened ``params`` and ``tags``.

    Args:
        params: nested parameters (``params.model_dump(mode="json")``), logged flattened as
            ``train.loss.w_done`` style keys. Not re-logged on resume (MLflow params are
            immutable; a resumed run may extend ``train.epochs``).
        tags: extra tags (device, dvc_stage, ...); the git commit is added when known.
        run_name: the run's display name.
        resume_run_id: continue this run when it exists in the store (a resumed training).
        tracking_uri: default :func:`resolve_tracking_uri`.
        experiment_name: default ``$MLFLOW_EXPERIMENT_NAME`` or ``seqops``. A run nested under
            ``$SEQOPS_PARENT_RUN_ID`` goes into its parent's experiment.
    """
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

    tracking_uri = tracking_uri or resolve_tracking_uri()
    client = MlflowClient(tracking_uri)
    if _resumable(client, resume_run_id):
        run = client.get_run(resume_run_id)
        client.update_run(resume_run_id, status="RUNNING")
        handle = TrackedRun(client, run.info.run_id, run.info.experiment_id, tracking_uri, True)
        handle.set_tags(dict(tags or {}))
        log.info("MLflow: resuming run %s at %s", resume_run_id, tracking_uri)
        return handle
    all_tags: dict[str, Any] = {}
    commit, dirty = git_commit()
    if commit:
        all_tags[MLFLOW_GIT_COMMIT] = commit
        all_tags["git_dirty"] = dirty
    parent_id = os.environ.get(PARENT_RUN_ENV)
    if parent_id:
        experiment_id = client.get_run(parent_id).info.experiment_id
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
    else:
        name = experiment_name or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
        experiment_id = _experiment_id(client, name, tracking_uri)
    all_tags.update(tags or {})
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={k: str(v) for k, v in all_tags.items() if v is not None},
    )
    handle = TrackedRun(client, run.info.run_id, experiment_id, tracking_uri)
    handle.log_params(flatten_params(params))
    log.info("MLflow: run %s in experiment %s at %s", handle.run_id, experiment_id, tracking_uri)
    return handle
