"""Atomic writes: an output is written under a temporary name and renamed into place,
so a failed or killed stage never leaves a half-written file or directory behind. And
``free_port``, for the servers the demo, the benchmarks and the tests start on loopback.

A temporary name carries the writer's pid (``.<name>.<pid>.<random>.tmp``, and
``.<name>.old-<pid>`` for a directory being replaced). A SIGKILL runs no clean-up, so the
next write of the same output removes what a dead writer left beside it: a killed stage's
debris (a half-exported model directory can be tens of MB) does not pile up.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    """True unless no process ``pid`` exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_LEFTOVER = re.compile(r"(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp|old-(?P<old>[0-9]+)")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files and directories that writers of ``path`` left when they
    were killed (their pid is gone); returns what was removed.

    A live writer's temporary is kept: its pid still exists.
    """
    path = Path(path)
    name = glob.escape(path.name)
    candidates = [*path.parent.glob(f".{name}.*.tmp"), *path.parent.glob(f".{name}.old-*")]
    removed = []
    for leftover in candidates:
        # "<pid>.<random>.tmp" or "old-<pid>": anything else is not ours (another name's)
        match = _LEFTOVER.fullmatch(leftover.name[len(path.name) + 2 :])
        if match is None or _pid_alive(int(match.group("pid") or match.group("old"))):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        log.info("removed %s, left by a killed write of %s", leftover, path)
        removed.append(leftover)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def pick(metrics: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The entries of ``metrics`` named in ``keys``, in that order (missing ones left out):
    a stage's headline figures, what its DVC metrics file holds."""
    return {k: metrics[k] for k in keys if k in metrics}


def write_metrics_files(
    metrics: Mapping[str, Any],
    headline: Mapping[str, Any],
    metrics_path: str | Path | None,
    report_path: str | Path | None,
) -> None:
    """A stage's figures: every one to the report, the ``headline`` ones to the DVC metrics
    file (each when its path is set), atomically."""
    if report_path:
        atomic_write_json(report_path, metrics)
    if metrics_path:
        atomic_write_json(metrics_path, headline)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path``.

    On an exception the temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a server started next, on loopback)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
