"""Atomic writes when the writer is SIGKILLed: the output keeps its old content and the
next write of it removes what the killed writer left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from seqops.io import atomic_directory, atomic_write_bytes, remove_stale_temporaries

# A writer killed by SIGKILL at the moment it would rename its temporary into place: the
# temporary is complete on disk and nothing ran to remove it.
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from seqops import io

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

io.os.replace = die
kind, target = sys.argv[1], Path(sys.argv[2])
if kind == "file":
    io.atomic_write_bytes(target, b"new" * 1000)
else:
    with io.atomic_directory(target) as tmp:
        (tmp / "model.json").write_text("new")
"""


def _kill_a_writer(kind: str, target: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_WRITER), kind, str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_file_write_leaves_the_old_file_and_its_debris_goes_next_time(tmp_path):
    target = tmp_path / "last.pt"
    atomic_write_bytes(target, b"old")
    _kill_a_writer("file", target)
    assert target.read_bytes() == b"old"  # never half-written
    (debris,) = _leftovers(tmp_path)
    assert debris.startswith(".last.pt.") and debris.endswith(".tmp")

    # A live writer's temporary (this process's) is not touched; the dead one's is.
    live = tmp_path / f".last.pt.{os.getpid()}.abc123.tmp"
    live.write_bytes(b"in progress")
    other = tmp_path / ".last.pt.x.7.tmp"  # not a name this module makes: left alone
    other.write_bytes(b"")
    atomic_write_bytes(target, b"newer")
    assert target.read_bytes() == b"newer"
    assert _leftovers(tmp_path) == sorted([live.name, other.name])


def test_a_killed_directory_write_leaves_the_old_directory_and_its_debris_goes(tmp_path):
    target = tmp_path / "onnx"
    with atomic_directory(target) as tmp:
        (tmp / "model.json").write_text("old")
    _kill_a_writer("dir", target)
    assert (target / "model.json").read_text() == "old"
    (debris,) = _leftovers(tmp_path)
    assert (tmp_path / debris / "model.json").read_text() == "new"  # the unrenamed copy

    removed = remove_stale_temporaries(target)
    assert [p.name for p in removed] == [debris]
    assert _leftovers(tmp_path) == []
    with atomic_directory(target) as tmp:
        (tmp / "model.json").write_text("newer")
    assert (target / "model.json").read_text() == "newer" and _leftovers(tmp_path) == []
