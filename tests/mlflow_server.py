"""A real ``mlflow server`` process for tests: started, stopped and started again on the same
port and stores (``from mlflow_server import MlflowServer``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


class MlflowServer:
    """``mlflow server`` on loopback with proxied artifacts (``--artifacts-destination``):
    clients upload artifacts through it, so an outage cuts metrics and artifacts alike."""

    def __init__(self, port: int, backend_uri: str, artifacts: Path, log_path: Path) -> None:
        self.port, self.backend_uri, self.artifacts, self.log_path = (
            port, backend_uri, artifacts, log_path,
        )  # fmt: skip
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        """Start the server and wait for its ``/health`` (a new store migrates: ~20 s)."""
        cmd = [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", self.artifacts.as_uri(), "--serve-artifacts",
            "--workers", "1",
        ]  # fmt: skip
        # The server's job runner (three more processes) is not needed for tracking.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.log_path.read_text()[-3000:]}")
            if self.healthy():
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server not up in {timeout} s:\n{self.log_path.read_text()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop the server and its workers: SIGTERM to the group (SIGKILL after 20 s), or
        SIGKILL at once with ``kill`` (a crash; also no wait for requests in flight)."""
        if self.proc is None:
            return
        signals = ((signal.SIGKILL, 10),) if kill else ((signal.SIGTERM, 20), (signal.SIGKILL, 10))
        for sig, wait in signals:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # uvicorn's worker may outlive the parent for a moment: the port must be free
        deadline = time.monotonic() + 20
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.proc = None
