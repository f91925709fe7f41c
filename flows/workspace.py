"""The workspace side of the pipeline flow, without Prefect: params, lock, DVC, outputs.

- ``write_overrides``: dotted-key overrides into ``params.yaml``, validated against the typed
  config first and written atomically, keeping comments and layout (ruamel round-trip), so
  DVC sees each change as ``dvc exp run -S`` would make it.
- ``workspace_lock``: one pipeline run at a time per workspace. DVC's own repo lock fails
  rather than waits, and two runs would mix each other's parameters.
- ``run_streaming``: a command's output line by line, as it comes, to a callback (the
  Prefect log); a failure raises with the tail of its stderr.
- ``read_stage_metrics``, ``read_data_identity``: a stage's outputs, found where ``dvc.yaml``
  and ``dvc.lock`` name them.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from queue import Queue
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.representer import RoundTripRepresenter

from seqops.config import (
    DEFAULT_PARAMS_PATH,
    ConfigError,
    apply_overrides,
    params_from_dict,
    read_params_file,
)

DATA_STAGE = "prepare"  # its outputs' hashes identify the data an evaluation ran on
LOCK_PATH = Path(".dvc") / "tmp" / "seqops-flow.lock"
STDERR_TAIL_LINES = 30  # how much of a failed stage's stderr goes into the exception


class StageError(RuntimeError):
    """A ``dvc repro`` command failed; the message ends with the tail of its stderr."""


# --- params.yaml -------------------------------------------------------------------------


def _represent_float(representer: Any, value: float) -> Any:
    if value != value:
        text = ".nan"
    elif value in (float("inf"), float("-inf")):
        text = ".inf" if value > 0 else "-.inf"
    else:
        text = repr(value)
        if "e" in text and "." not in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _represent_str(representer: Any, value: str) -> Any:
    try:
        plain_ok = yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain_ok = False
    return representer.represent_scalar(
        "tag:yaml.org,2002:str", value, style=None if plain_ok else '"'
    )


class _ParamsRepresenter(RoundTripRepresenter):
    """seqops reads params.yaml with PyYAML (YAML 1.1): new floats get a dot (``1.0e-05``,
    which 1.1 reads as a float, not ``1e-05``, a string there) and strings that 1.1 would
    read as something else (``yes``, ``1e3``) are quoted. A subclass, so that ruamel's own
    representer stays as it is for everyone else in the process."""


_ParamsRepresenter.add_representer(float, _represent_float)
_ParamsRepresenter.add_representer(str, _represent_str)


def _round_trip_yaml() -> YAML:
    rt = YAML()  # round-trip: keeps comments, key order and untouched scalars as written
    rt.Representer = _ParamsRepresenter
    rt.width = 4096  # never wrap a long value onto a second line
    return rt


def _to_yaml_node(value: Any) -> Any:
    if isinstance(value, Mapping):
        node = CommentedMap()
        for key, item in value.items():
            node[key] = _to_yaml_node(item)
        return node
    if isinstance(value, list | tuple):
        seq = CommentedSeq(_to_yaml_node(v) for v in value)
        seq.fa.set_flow_style()  # `classes: [a, b]`, like the file's `classes: []`
        return seq
    return value


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def write_overrides(
    overrides: Mapping[str, Any], params_path: str | Path = DEFAULT_PARAMS_PATH
) -> dict[str, dict[str, Any]]:
    """Write dotted-key overrides into the params file, keeping its comments and layout.

    Keys and values are validated against the typed config first (``apply_overrides``,
    ``params_from_dict``): on a bad key or value nothing is written. The file is replaced
    atomically and keeps its permissions.

    Returns:
        ``{key: {"old": ..., "new": ...}}`` for the keys whose value changed (empty: the
        file was left untouched).
    """
    params_path = Path(params_path)
    raw = read_params_file(params_path)
    expected = apply_overrides(raw, list(overrides.items()))
    params_from_dict(expected, source=f"{params_path} with overrides {dict(overrides)}")
    changes = {
        key: {"old": _lookup(raw, key), "new": _lookup(expected, key)}
        for key in overrides
        if _lookup(raw, key) != _lookup(expected, key)
    }
    if not changes:
        return {}
    rt = _round_trip_yaml()
    document = rt.load(params_path.read_text())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = document
        for part in parents:
            if not isinstance(node.get(part), Mapping):
                node[part] = _to_yaml_node({})
            node = node[part]
        node[leaf] = _to_yaml_node(value)
    buffer = io.StringIO()
    rt.dump(document, buffer)
    text = buffer.getvalue()
    if yaml.safe_load(text) != expected:  # a guard: what seqops reads back must be what we meant
        raise ConfigError(f"{params_path}: could not write overrides {dict(overrides)} faithfully")
    _replace_file(params_path, text)
    return changes


def _replace_file(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- the workspace: lock, dvc commands, stage outputs ------------------------------------


@contextlib.contextmanager
def workspace_lock(root: str | Path = ".", log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the workspace's flow lock (``.dvc/tmp/seqops-flow.lock``), waiting for it if taken."""
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


def stage_env(parent_run_id: str | None) -> dict[str, str]:
    """The stage subprocess environment: this interpreter's bin first (``dvc``, ``seqops``),
    unbuffered output (lines arrive as they are written), the MLflow parent run."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONUNBUFFERED"] = "1"
    if parent_run_id:
        from seqops.tracking import PARENT_RUN_ENV

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
    lines: Queue[tuple[str, str | None]] = Queue()

    def pump(stream: Any, source: str) -> None:
        for line in stream:
            lines.put((source, line))
        lines.put((source, None))

    readers = [
        threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True),
    ]
    for reader in readers:
        reader.start()
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    try:
        open_streams = 2
        while open_streams:
            source, line = lines.get()
            if line is None:
                open_streams -= 1
                continue
            line = line.rstrip("\n").split("\r")[-1]  # a progress bar's last state
            if source == "stderr":
                tail.append(line)
            on_line(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (cancelled flow, error in on_line): stop the stage
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if code != 0:
        text = "\n".join(tail) or "(no stderr output)"
        raise StageError(f"`{name or ' '.join(cmd)}` failed with exit code {code}:\n{text}")


def read_stage_metrics(stage: str, root: str | Path = ".") -> dict[str, Any]:
    """The content of the metrics files ``dvc.yaml`` declares for ``stage``, merged."""
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
