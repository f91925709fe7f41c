"""The DVC workspace a pipeline run works in: its lock, its stage commands, its outputs.

- ``workspace_lock``: one pipeline run at a time per workspace. DVC's own repo lock fails
  rather than waits, and two runs would mix each other's parameters.
- ``run_streaming``: a command's output line by line, as it comes, to a callback (the
  Prefect log, for the flow); a failure raises with the tail of its stderr.
- ``read_stage_metrics``, ``read_data_identity``: a stage's outputs, found where ``dvc.yaml``
  and ``dvc.lock`` name them.

Orchestrator-free: the Prefect flow in ``flows/`` calls these; nothing here imports Prefect.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from queue import Queue
from typing import IO, Any

import yaml

from seqops.config import ConfigError
from seqops.tracking import PARENT_RUN_ENV

DATA_STAGE = "prepare"  # its outputs' hashes identify the data an evaluation ran on
LOCK_PATH = Path(".dvc") / "tmp" / "seqops-flow.lock"
STDERR_TAIL_LINES = 30  # how much of a failed stage's stderr goes into the exception


class StageError(RuntimeError):
    """A stage command failed; the message ends with the tail of its stderr."""


# --- the lock ----------------------------------------------------------------------------


@contextlib.contextmanager
def workspace_lock(root: str | Path = ".", log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the workspace's flow lock (``.dvc/tmp/seqops-flow.lock``), waiting for it if taken.

    Args:
        root: the DVC workspace (it must hold ``.dvc/``).
        log: told once when the lock is taken by someone else, with the holder's pid.

    Raises:
        ConfigError: ``root`` is not a DVC workspace.
    """
    root = Path(root)
    if not (root / ".dvc").is_dir():
        raise ConfigError(f"{root.resolve()}: not a DVC workspace (no .dvc/); run from the project")
    path = root / LOCK_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            log(f"waiting for {path}: another pipeline run holds it ({handle.read().strip()})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- stage commands ----------------------------------------------------------------------


def stage_env(parent_run_id: str | None) -> dict[str, str]:
    """The stage subprocess environment: this interpreter's bin first (``dvc``, ``seqops``),
    unbuffered output (lines arrive as they are written), the MLflow parent run."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONUNBUFFERED"] = "1"
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    return env


def run_streaming(
    cmd: Sequence[str],
    on_line: Callable[[str], None],
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
) -> None:
    """Run ``cmd``, passing each line of stdout and stderr to ``on_line`` as it arrives.

    ``name`` is how the command is called in an error (default: the command line).

    Raises:
        StageError: non-zero exit; the message holds the command and its stderr's last lines.
    """
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        bufsize=1,
    )
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    try:
        for source, line in _merged_lines(proc):
            if source == "stderr":
                tail.append(line)
            on_line(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (cancelled flow, error in on_line): stop the stage
            _terminate(proc)
    if code != 0:
        text = "\n".join(tail) or "(no stderr output)"
        raise StageError(f"`{name or ' '.join(cmd)}` failed with exit code {code}:\n{text}")


def _merged_lines(proc: subprocess.Popen) -> Iterator[tuple[str, str]]:
    """``(source, line)`` from the process's stdout and stderr, in the order they arrive."""
    lines: Queue[tuple[str, str | None]] = Queue()

    def pump(stream: IO[str], source: str) -> None:
        for line in stream:
            lines.put((source, line))
        lines.put((source, None))

    for stream, source in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        threading.Thread(target=pump, args=(stream, source), daemon=True).start()
    open_streams = 2
    while open_streams:
        source, line = lines.get()
        if line is None:
            open_streams -= 1
            continue
        # Text mode reads universal newlines: each state a progress bar draws after a "\r"
        # arrives as a line of its own, so the log shows the progress as it happens.
        yield source, line.rstrip("\n")


def _terminate(proc: subprocess.Popen) -> None:
    """Stop a process: SIGTERM, then SIGKILL if it is still there after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- stage outputs -----------------------------------------------------------------------


def read_stage_metrics(stage: str, root: str | Path = ".") -> dict[str, Any]:
    """The content of the metrics files ``dvc.yaml`` declares for ``stage``, merged.

    Raises:
        ConfigError: ``dvc.yaml`` has no such stage, or a declared metrics file is missing.
    """
    root = Path(root)
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    declared = (dvc_yaml.get("stages") or {}).get(stage)
    if declared is None:
        raise ConfigError(f"{root / 'dvc.yaml'}: no stage {stage!r}")
    merged: dict[str, Any] = {}
    for entry in declared.get("metrics") or []:
        path = root / (next(iter(entry)) if isinstance(entry, dict) else entry)
        if not path.is_file():
            raise ConfigError(f"{path}: metrics of stage {stage!r} not found")
        data = yaml.safe_load(path.read_text())  # JSON is YAML; DVC accepts both
        if isinstance(data, dict):
            merged.update(data)
    return merged


def read_data_identity(root: str | Path = ".") -> str | None:
    """The DVC hashes of the data stage's outputs (``dvc.lock``): which data was evaluated."""
    lock_path = Path(root) / "dvc.lock"
    if not lock_path.is_file():
        return None
    lock = yaml.safe_load(lock_path.read_text()) or {}
    outs = ((lock.get("stages") or {}).get(DATA_STAGE) or {}).get("outs") or []
    hashes = [f"{o['path']}:{o.get('md5') or o.get('hash')}" for o in outs if "path" in o]
    return ",".join(hashes) or None
