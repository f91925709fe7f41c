"""MLflow tracking: where runs go, and a small handle that logs one training run.

Embedded default (docs/architecture.md, principle 7): MLflow's SQLite store
``sqlite:///mlflow.db`` in the current directory, artifacts in ``./mlartifacts`` beside it (the
layout ``mlflow server`` uses by default, so ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows the runs).
``MLFLOW_TRACKING_URI`` switches to a server (Postgres + S3/MinIO) without a code change;
the server then chooses the artifact location. Nothing happens at import time: the URI is
resolved and the client built only when a run starts.

A server can go away in the middle of a long training. A run started with
``defer_when_unreachable=True`` (training's) then keeps what it would send, in order, and
sends it when the server answers again, or at the end of the run (which waits up to
:data:`FINAL_FLUSH_SECONDS` for it); the log says so once per outage, not per call. The
stage's own files (DVC metrics and plots) hold the metrics whatever happens to the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
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
# While the server is away: try it again at most this often (each try may cost a timeout).
OUTAGE_RETRY_SECONDS = 5.0
# At the end of a run whose calls are still waiting: how long to wait for the server.
FINAL_FLUSH_SECONDS = 120.0
_HEALTH_TIMEOUT = 5.0  # seconds for the server's /health to answer during an outage
_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


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
    """One MLflow run, logged through an explicit client (no global MLflow state).

    With ``defer_when_unreachable`` a call that cannot reach the tracking server is kept and
    sent, in order, when the server answers again (see the module docstring); an error the
    server answers with (a bad request) is raised as usual.
    """

    client: Any  # mlflow.MlflowClient
    run_id: str
    experiment_id: str
    tracking_uri: str
    resumed: bool = False
    defer_when_unreachable: bool = False
    _closed: bool = field(default=False, repr=False)
    _pending: list[tuple[str, Callable[[], Any]]] = field(default_factory=list, repr=False)
    _outage_since: float | None = field(default=None, repr=False)  # monotonic time
    _last_try: float = field(default=0.0, repr=False)

    @property
    def pending(self) -> list[str]:
        """What is waiting for the server, oldest first (empty while it answers)."""
        return [what for what, _ in self._pending]

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> int:
        """Log the numeric values of ``metrics`` at ``step`` (keys such as ``val/loss`` are
        fine); others (text, None, booleans) are skipped. Returns how many were logged."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        # The timestamp is taken now: a deferred batch keeps it, and re-sending a batch the
        # server had stored before the connection broke adds nothing (MLflow drops exact
        # duplicates).
        now = get_current_time_millis()
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        for i in range(0, len(batch), _METRICS_BATCH):
            chunk = batch[i : i + _METRICS_BATCH]
            self._send(f"metrics at step {step}", self.client.log_batch, self.run_id, metrics=chunk)
        return len(batch)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log flat string parameters (see :func:`flatten_params`)."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self._send("params", self.client.log_batch, self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text; ``None`` values are skipped)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self._send("tags", self.client.log_batch, self.run_id, tags=items[i : i + _BATCH])

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log a PIL image (or uint8 array) as the artifact ``artifact_file`` (``.png``)."""
        send = self.client.log_image
        self._send(artifact_file, send, self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a directory with its content, under ``artifact_path``."""
        what = f"artifact {local_path}"
        if Path(local_path).is_dir():
            self._send(what, self.client.log_artifacts, self.run_id, str(local_path), artifact_path)
        else:
            self._send(what, self.client.log_artifact, self.run_id, str(local_path), artifact_path)

    def finish(self, status: str = "FINISHED", wait_seconds: float | None = None) -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``); later calls do nothing.

        Calls still waiting for the server are sent first: a finished run waits up to
        ``wait_seconds`` (default :data:`FINAL_FLUSH_SECONDS`) for it to come back, a failed
        or killed one tries once. What is still unsent then is named in a warning (the run
        stays RUNNING in MLflow; the stage's files hold its metrics).
        """
        if self._closed:
            return
        self._closed = True
        if wait_seconds is None:
            wait_seconds = FINAL_FLUSH_SECONDS if status == "FINISHED" else 0.0
        self._send("end of the run", self.client.set_terminated, self.run_id, status=status)
        deadline = time.monotonic() + wait_seconds
        while self._pending and time.monotonic() < deadline:
            time.sleep(max(0.0, min(OUTAGE_RETRY_SECONDS, deadline - time.monotonic())))
            self._flush(force=True)
        if self._pending:
            log.warning(
                "MLflow at %s still unreachable at the end of run %s (waited %.0f s): %d calls "
                "not sent (%s); the stage's metrics and plots files hold the metrics",
                self.tracking_uri, self.run_id, wait_seconds, len(self._pending),
                _summary(self.pending),
            )  # fmt: skip

    # --- sending, and keeping what cannot be sent ---------------------------------------

    def _send(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Make the MLflow call now, or keep it (and those after it) while the server is away."""
        if not self.defer_when_unreachable:
            call(*args, **kwargs)
            return
        self._pending.append((what, lambda: call(*args, **kwargs)))
        self._flush(force=False)

    def _flush(self, force: bool) -> None:
        """Send the waiting calls in order; stop at the first that cannot reach the server.

        During an outage a try is made at most every :data:`OUTAGE_RETRY_SECONDS` (unless
        ``force``), and only when the server's ``/health`` answers.
        """
        if self._outage_since is not None:
            if not force and time.monotonic() - self._last_try < OUTAGE_RETRY_SECONDS:
                return
            self._last_try = time.monotonic()
            if not _server_answers(self.tracking_uri):
                return
        sent = 0
        while self._pending:
            what, call = self._pending[0]
            try:
                with _no_http_retries():  # an outage is handled here, not by sleeping in MLflow
                    call()
            except Exception as exc:
                if not is_unreachable(exc):
                    self._pending.pop(0)
                    raise
                log.debug("MLflow: %s not sent: %s", what, _first_line(exc))
                self._went_away(what, exc)
                return
            self._pending.pop(0)
            sent += 1
        if self._outage_since is not None:
            log.warning(
                "MLflow at %s reachable again after %.0f s: sent the %d calls kept meanwhile",
                self.tracking_uri, time.monotonic() - self._outage_since, sent,
            )  # fmt: skip
            self._outage_since = None

    def _went_away(self, what: str, exc: Exception) -> None:
        """Start an outage (logged once) when the server could not be reached for ``what``."""
        self._last_try = time.monotonic()
        if self._outage_since is not None:
            return
        self._outage_since = self._last_try
        log.warning(
            "MLflow at %s is unreachable (%s: %s): training goes on; what it logs is kept, to "
            "be sent once the server can be reached (or when the run ends), and the stage's "
            "metrics and plots files hold the metrics",
            self.tracking_uri, what, _first_line(exc),
        )  # fmt: skip


def _summary(whats: list[str]) -> str:
    """A short account of the waiting calls: the first few names and how many more."""
    shown = ", ".join(whats[:3])
    return shown if len(whats) <= 3 else f"{shown} and {len(whats) - 3} more"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def is_unreachable(exc: BaseException) -> bool:
    """True when an MLflow call failed because the server could not be reached or could not
    serve it (connection refused or reset, a timeout, a 5xx or 429 answer): worth sending
    again later. A 4xx answer is a bad request, and sending it again would not help."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, RestException):
        return exc.get_http_status_code() >= 500 or exc.get_http_status_code() == 429
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    transient = (requests.RequestException, ConnectionError, TimeoutError)
    if any(isinstance(e, transient) for e in chain):
        return True
    # MLflow wraps a failed request without chaining it: "API request to ... failed with ..."
    return isinstance(exc, MlflowException) and str(exc).startswith("API request to ")


def _server_answers(tracking_uri: str) -> bool:
    """Whether an HTTP tracking server's ``/health`` answers now (other stores: assumed so,
    the next call finds out)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        return requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=_HEALTH_TIMEOUT).ok
    except requests.RequestException:
        return False


@contextlib.contextmanager
def _no_http_retries() -> Iterator[None]:
    """MLflow's HTTP client retries a failed request for minutes (7 retries, exponential
    back-off) before it raises; a deferring run keeps the call and goes on instead, so it
    asks for no retries (unless ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` is set). MLflow reads
    the variable on every request; training makes its MLflow calls from one thread."""
    if _RETRIES_ENV in os.environ:
        yield
        return
    os.environ[_RETRIES_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(_RETRIES_ENV, None)


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
    defer_when_unreachable: bool = False,
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
        defer_when_unreachable: once started, keep going when the server goes away (see
            :class:`TrackedRun`); starting needs the server.
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
        handle.defer_when_unreachable = defer_when_unreachable
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
    handle.defer_when_unreachable = defer_when_unreachable
    log.info("MLflow: run %s in experiment %s at %s", handle.run_id, experiment_id, tracking_uri)
    return handle
