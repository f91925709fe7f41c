"""Helpers of the serving tests: an in-process client and what the library itself answers.

The models are ``conftest.exported_model``'s (a tiny network whose done never fires, so
``max_objects`` sets the count exactly, and ``DONE_AT_ONCE_THRESHOLD`` makes it stop at once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import DONE_AT_ONCE_THRESHOLD, exported_model, free_port, make_png, png_pixels
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.settings import ServeSettings

__all__ = [
    "DONE_AT_ONCE_THRESHOLD",
    "free_port",
    "make_png",
    "png_pixels",
]  # the serving tests' helpers

MODEL_VERSION = "test-never"  # the served model's version, as /predict and KServe report it
PNG = make_png(96, 64)
PNG_HEADERS = {"content-type": "image/png"}


def serve_model(exemplars: bool = False) -> Path:
    """The directory of the served test model (done never fires)."""
    return exported_model("exemplars-never" if exemplars else "never")[0]


def make_client(predictor, **settings) -> TestClient:
    """An in-process client of an app serving ``predictor`` (5 objects by default)."""
    base = {"model": str(predictor.model_dir), "max_objects": 5}
    return TestClient(create_app(ServeSettings(**(base | settings)), predictor=predictor))


def expected(predictor, png=PNG, max_objects=5, **kwargs):
    """What the library itself answers: the server must return the same."""
    return predictor.predict([png], max_objects=max_objects, **kwargs)[0]


def seqops_command() -> list[str]:
    script = Path(sys.executable).with_name("seqops")  # the installed console script
    return [str(script)] if script.is_file() else [sys.executable, "-m", "seqops.cli"]


class Server:
    """A `seqops serve` process; its output goes to a log file for failure messages."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "SEQOPS_API_KEY"}
        command = [*seqops_command(), "serve", "--model", str(model_dir), "--port",
                   str(self.port), "--device", "cpu", "--no-access-log", *args]  # fmt: skip
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        stop_at = time.monotonic() + timeout
        while time.monotonic() < stop_at:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready after {timeout} s:\n{self.output()}")

    def __enter__(self) -> Server:
        """``with Server(...) as srv``: ready inside the block, stopped after it."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
