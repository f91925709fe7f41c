"""Training while the MLflow server goes away: the run goes on, nothing is lost, one warning
per outage. A real ``mlflow server`` (proxied artifacts) is stopped and started by the test
while ``seqops train`` runs; the trainer is paused (SIGSTOP) around each stop and start so
the outages fall where the test says."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_OVERRIDES, free_port, make_tiny_dataset
from mlflow_server import MlflowServer

from seqops.tracking import OUTAGE_RETRY_SECONDS

EPOCHS = 8
BIN = Path(sys.executable).parent


def _rows(plots: Path) -> list[dict[str, str]]:
    if not plots.is_file():
        return []
    with open(plots) as f:
        return list(csv.DictReader(f))


def _wait(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"seqops train ended ({proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.05)


class Trainer:
    """``seqops train`` in a process the test can pause while it stops or starts the server."""

    def __init__(self, tmp_path: Path, tracking_uri: str) -> None:
        data = make_tiny_dataset(tmp_path / "prepared", num_train=48, num_val=4)
        self.plots, self.metrics = tmp_path / "train.csv", tmp_path / "train.json"
        self.log = tmp_path / "train.log"
        overrides = [*TINY_OVERRIDES, f"train.epochs={EPOCHS}", "train.patience=100"]
        overrides.append("sampling.steps_per_image=16")  # about a second an epoch
        cmd = [str(BIN / "seqops"), "train", "--params", str(ROOT / "params.yaml")]
        cmd += ["--data", str(data), "--out", str(tmp_path / "m")]
        cmd += ["--metrics", str(self.metrics), "--plots", str(self.plots)]
        cmd += [arg for item in overrides for arg in ("--set", item)]
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait(self, condition, what: str) -> None:
        _wait(condition, what, self.proc, self.log)

    def epochs_done(self) -> int:
        return len(_rows(self.plots))

    def paused(self, action, at_least: float = 0.0) -> None:
        """Run ``action`` with the trainer stopped, for ``at_least`` seconds in all."""
        started = time.monotonic()
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            action()
            time.sleep(max(0.0, at_least - (time.monotonic() - started)))
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)


@pytest.mark.e2e
@pytest.mark.slow
def test_training_outlives_mlflow_outages_and_loses_no_metric(tmp_path):
    server = MlflowServer(
        free_port(), f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts",
        tmp_path / "mlflow-server.log",
    )  # fmt: skip
    server.start()
    trainer = Trainer(tmp_path, server.uri)
    try:
        _two_outages(trainer, server)
        _check_nothing_was_lost(trainer, server.uri)
    finally:
        if trainer.proc.poll() is None:
            trainer.proc.kill()
        server.stop(kill=True)


def _two_outages(trainer: Trainer, server: MlflowServer) -> None:
    # Outage 1, mid-run: the server crashes after epoch 1 and is back two epochs later; the
    # trainer sends what it kept once the server is up and its retry interval has passed.
    trainer.wait(lambda: trainer.epochs_done() >= 1, "epoch 1")
    trainer.paused(lambda: server.stop(kill=True))
    down_at = trainer.epochs_done()
    trainer.wait(lambda: trainer.epochs_done() >= down_at + 2, "two epochs without MLflow")
    trainer.paused(server.start, at_least=OUTAGE_RETRY_SECONDS + 0.5)
    trainer.wait(lambda: "reachable again after" in trainer.log.read_text(), "the calls sent")
    assert trainer.epochs_done() < EPOCHS, "training ended before the second outage"

    # Outage 2, to the end: the server stops and is still gone when training ends; the run
    # waits for it, and sends everything when it is back.
    trainer.paused(server.stop)
    trainer.wait(trainer.metrics.is_file, "training's end")
    time.sleep(2)
    assert trainer.proc.poll() is None  # waiting for the server, not finished without it
    server.start()
    assert trainer.proc.wait(timeout=120) == 0, trainer.log.read_text()


def _check_nothing_was_lost(trainer: Trainer, uri: str) -> None:
    from mlflow import MlflowClient

    log = trainer.log.read_text()
    rows = _rows(trainer.plots)
    assert [int(row["epoch"]) for row in rows] == list(range(1, EPOCHS + 1))
    # One warning per outage and one when the server is reachable again; MLflow's own
    # retries (a line each) are not there.
    assert log.count("is unreachable") == 2, log
    assert log.count("reachable again after") == 2, log
    assert "Retrying" not in log and "Traceback" not in log, log

    # Every epoch's metrics reached the server, with the values of the plots file, and
    # every epoch's pictures, the checkpoint and the end of the run.
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}
    assert history == pytest.approx({int(r["epoch"]): float(r["val/loss"]) for r in rows}, 1e-5)
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert pictures == {f"pictures/epoch_{epoch:03d}" for epoch in range(1, EPOCHS + 1)}
    checkpoint = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert checkpoint == ["checkpoint/best.pt"]
    assert run.data.tags["stopped_reason"] == "epochs"
