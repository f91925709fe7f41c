"""``seqops.workspace``: the flow's lock, its streamed stage commands, the DVC outputs it reads."""

import fcntl
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from flow_fixtures import DVC_YAML

from seqops.config import ConfigError
from seqops.tracking import PARENT_RUN_ENV
from seqops.workspace import (
    LOCK_PATH,
    StageError,
    read_data_identity,
    read_stage_metrics,
    run_streaming,
    stage_env,
    workspace_lock,
)


def test_run_streaming_passes_lines_in_order_and_fails_with_the_stderr_tail():
    lines: list[str] = []
    code = "import sys\nfor i in range(3): print(f'line {i}', flush=True)\n"
    run_streaming([sys.executable, "-c", code], lines.append)
    assert lines == ["line 0", "line 1", "line 2"]

    failing = (
        "import sys\nprint('working')\nsys.stderr.write('first\\nboom: bad thing\\n')\nsys.exit(4)"
    )
    with pytest.raises(StageError, match=r"`stage x` failed with exit code 4:\nfirst\nboom: bad"):
        run_streaming([sys.executable, "-c", failing], lines.append, name="stage x")
    assert "working" in lines


def test_run_streaming_passes_each_progress_bar_state_as_a_line():
    lines: list[str] = []
    code = "import sys\nsys.stderr.write('10%\\r50%\\r100%\\n')\n"
    run_streaming([sys.executable, "-c", code], lines.append)
    assert lines == ["10%", "50%", "100%"]


def test_stage_env_puts_this_interpreter_first_and_names_the_parent_run(monkeypatch):
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    env = stage_env("abc123")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env[PARENT_RUN_ENV] == "abc123" and env["PYTHONUNBUFFERED"] == "1"
    assert PARENT_RUN_ENV not in stage_env(None)


def test_workspace_lock_waits_for_the_holder(tmp_path):
    (tmp_path / ".dvc").mkdir()
    lock_path = tmp_path / LOCK_PATH
    lock_path.parent.mkdir(parents=True)
    # flock locks belong to an open file: a second open() in this process must wait too.
    holder = open(lock_path, "a+")  # noqa: SIM115 (closed by the timer, which frees the lock)
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("pid holder\n")
    holder.flush()
    release = threading.Timer(0.5, holder.close)
    messages: list[str] = []
    start = time.monotonic()
    release.start()
    try:
        with workspace_lock(tmp_path, log=messages.append):
            waited = time.monotonic() - start
            assert lock_path.read_text().startswith("pid ")  # the new holder's pid
    finally:
        release.join()
        holder.close()
    assert waited > 0.3
    assert messages and "pid holder" in messages[0]


def test_workspace_lock_needs_a_dvc_workspace(tmp_path):
    with pytest.raises(ConfigError, match="not a DVC workspace"), workspace_lock(tmp_path):
        pass


def test_stage_metrics_and_data_identity_come_from_dvc_files(tmp_path):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text('{"count_mae": 0.5, "n": {"a": 1}}')
    assert read_stage_metrics("evaluate", tmp_path) == {"count_mae": 0.5, "n": {"a": 1}}
    assert read_stage_metrics("train", tmp_path) == {}  # declares none
    with pytest.raises(ConfigError, match=r"export\.json: metrics of stage 'export' not found"):
        read_stage_metrics("export", tmp_path)
    with pytest.raises(ConfigError, match="no stage 'deploy'"):
        read_stage_metrics("deploy", tmp_path)
    assert read_data_identity(tmp_path) is None
    lock = {"stages": {"prepare": {"outs": [{"path": "data/prepared", "md5": "abc.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert read_data_identity(tmp_path) == "data/prepared:abc.dir"
