"""Schema-driven fuzzing of the real server (schemathesis): requests generated from
``/openapi.json``, valid and not, for every operation; none may get a 5xx. Bounded to about
a minute (``--max-time``), so it can run in CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from serve_fixtures import MODEL_VERSION, Server, serve_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECONDS = 60  # schemathesis' time budget: fuzzing and stateful phases repeat until spent
# The KServe routes name the served model in their path: fuzz what lies behind them, not
# only their 404s.
CONFIG = """
[parameters]
"path.model_name" = "seqops"
"path.version" = "%s"
"""


def test_no_server_error_for_any_generated_request(tmp_path):
    srv = Server(
        serve_model(), tmp_path / "server.log", "--max-objects", "20", "--max-objects-limit", "50",
        "--collect", str(tmp_path / "collected"),  # so /collect is fuzzed, not only its 404
    )  # fmt: skip
    try:
        srv.wait_ready()
        config = tmp_path / "schemathesis.toml"
        config.write_text(CONFIG % MODEL_VERSION)
        command = [str(Path(sys.executable).with_name("schemathesis")),
                   "--config-file", str(config), "run", f"{srv.base}/openapi.json",
                   "--checks", "not_a_server_error", "--max-time", str(SECONDS),
                   "--seed", "12", "--no-color", "--request-timeout", "30"]  # fmt: skip
        # cwd: schemathesis keeps a cache directory where it runs
        run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-6000:] + srv.output()
        print(run.stdout[-600:])  # the number of requests, with pytest -s
        assert "Tested: 17" in run.stdout, run.stdout[-3000:]  # every operation was reached
        assert "404 responses" not in run.stdout, run.stdout[-3000:]
    finally:
        srv.stop()
