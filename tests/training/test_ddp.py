"""DDP for real: ``torchrun --nproc-per-node 2`` on gloo (CPU). Both ranks train on their
own shard, rank 0 alone writes the checkpoints and talks to MLflow; a SIGKILL of rank 1
ends the run with an error naming it, and the same command then resumes.

The first run goes through a small driver that records, per rank, the files the process
renames into place (every output goes through ``seqops.io``'s rename), the MLflow clients
it builds and the sample indices of each epoch's loader; the code it runs is the real
``seqops train``. The resumed run is the plain ``torchrun ... seqops train`` command.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_OVERRIDES, free_port, make_tiny_dataset

from seqops.training.checkpoint import load_checkpoint

BIN = Path(sys.executable).parent
EPOCHS = 6
KILL_AFTER = 2  # epochs done when rank 1 is killed

DRIVER = """
import json, os, sys
from pathlib import Path

record = Path(sys.argv[1]) / f"rank{os.environ['RANK']}.jsonl"
record.write_text(json.dumps({"kind": "pid", "pid": os.getpid()}) + "\\n")

def note(**fields):
    with open(record, "a") as f:
        f.write(json.dumps(fields) + "\\n")

real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    note(kind="write", path=os.path.abspath(dst))
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace

import mlflow
real_client_init = mlflow.MlflowClient.__init__
def client_init(self, *args, **kwargs):
    note(kind="mlflow")
    real_client_init(self, *args, **kwargs)
mlflow.MlflowClient.__init__ = client_init

from seqops.training import train
real_loader = train.train_loader
def loader(ds, cfg, **kwargs):
    batches = real_loader(ds, cfg, **kwargs)
    note(kind="indices", epoch=kwargs["epoch"], indices=[int(i) for i in batches.sampler])
    return batches
train.train_loader = loader

from seqops.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _train_args(tmp_path: Path, data: Path) -> list[str]:
    overrides = [*TINY_OVERRIDES, f"train.epochs={EPOCHS}", "train.patience=100"]
    overrides.append("sampling.steps_per_image=16")  # about half a second an epoch
    args = ["train", "--params", str(ROOT / "params.yaml"), "--data", str(data)]
    args += ["--out", str(tmp_path / "models"), "--metrics", str(tmp_path / "train.json")]
    args += ["--plots", str(tmp_path / "train.csv")]
    return args + [arg for item in overrides for arg in ("--set", item)]


def _torchrun(tmp_path: Path, program: list[str], log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    port = str(free_port())  # not torchrun's fixed default: tests may run side by side
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", port, *program]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    """End a torchrun left running by a failed test (SIGTERM: it stops its workers)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _records(tmp_path: Path, rank: int) -> list[dict]:
    lines = (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _epochs_done(tmp_path: Path) -> int:
    plots = tmp_path / "train.csv"
    return len(plots.read_text().splitlines()) - 1 if plots.is_file() else 0


def _kill_rank_1_after(tmp_path: Path, proc: subprocess.Popen, log: Path) -> int:
    """SIGKILL rank 1 once ``KILL_AFTER`` epochs are done; returns its pid."""
    deadline = time.monotonic() + 240
    while _epochs_done(tmp_path) < KILL_AFTER:
        assert proc.poll() is None, f"torchrun ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no epoch {KILL_AFTER}:\n{log.read_text()}"
        time.sleep(0.05)
    pid = _records(tmp_path, 1)[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.e2e
@pytest.mark.slow
def test_two_ranks_shard_the_data_rank_0_writes_and_a_killed_rank_is_resumed(tmp_path):
    data = make_tiny_dataset(tmp_path / "prepared", num_train=48, num_val=4)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    args = _train_args(tmp_path, data)

    first_log = tmp_path / "first.log"
    proc = _torchrun(tmp_path, [str(driver), str(tmp_path), *args], first_log)
    try:
        pid = _kill_rank_1_after(tmp_path, proc, first_log)
        assert proc.wait(timeout=120) != 0
    finally:
        _stop(proc)
    out = first_log.read_text()
    # torchrun's summary names the rank that died and how; rank 0 says how to carry on.
    root_cause = out[out.index("Root Cause") :]
    assert "rank      : 1" in root_cause and f"Signal 9 (SIGKILL) received by PID {pid}" in out
    # Rank 0 either sees its collective fail or is stopped by torchrun, whichever is first.
    said = ("rank 0 of 2 stopped on RuntimeError", "rank 0 of 2: SIGTERM received")
    assert any(line in out for line in said) and "run the same command again to resume" in out
    _check_ranks(tmp_path)
    killed = load_checkpoint(tmp_path / "models" / "last.pt")
    assert KILL_AFTER <= killed["epoch"] < EPOCHS

    # The same command resumes at the next epoch, in the same MLflow run, and finishes.
    second_log = tmp_path / "second.log"
    proc = _torchrun(tmp_path, [str(BIN / "seqops"), *args], second_log)
    try:
        assert proc.wait(timeout=300) == 0, second_log.read_text()
    finally:
        _stop(proc)
    assert f"at epoch {killed['epoch'] + 1}" in second_log.read_text()
    with open(tmp_path / "train.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, EPOCHS + 1))
    info = json.loads((tmp_path / "models" / "train_run.json").read_text())
    assert info["run_id"] == killed["run_id"] and info["epochs_trained"] == EPOCHS
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("seqops").experiment_id])
    assert run.info.run_id == killed["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))


def _check_ranks(tmp_path: Path) -> None:
    """What the driver recorded in the killed run: shards and writers."""
    ranks = {rank: _records(tmp_path, rank) for rank in (0, 1)}
    outputs = [str(tmp_path / name) for name in ("models", "train.csv", "train.json")]
    writes = {
        rank: {
            r["path"]
            for r in records
            if r["kind"] == "write" and r["path"].startswith(tuple(outputs))
        }
        for rank, records in ranks.items()
    }
    assert writes[1] == set()  # rank 1 wrote no output
    assert {str(tmp_path / "models" / "last.pt"), str(tmp_path / "train.csv")} <= writes[0]
    assert any(r["kind"] == "mlflow" for r in ranks[0])
    assert not any(r["kind"] == "mlflow" for r in ranks[1])  # MLflow: rank 0 alone
    # Each epoch, each rank draws its own half of the training images.
    shards = {
        rank: {r["epoch"]: r["indices"] for r in records if r["kind"] == "indices"}
        for rank, records in ranks.items()
    }
    for epoch in range(1, KILL_AFTER + 1):
        mine, theirs = shards[0][epoch], shards[1][epoch]
        assert len(mine) == len(theirs) == 24 and not set(mine) & set(theirs)
        assert sorted(mine + theirs) == list(range(48))
    assert shards[0][1] != shards[0][2]  # reshuffled every epoch


def test_sigterm_stops_training_as_an_interrupt_and_the_old_handler_comes_back():
    from seqops.training.runtime import DistInfo, Terminated, stop_cleanly

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="rank 1 of 2"), stop_cleanly(DistInfo(1, 1, 2, True)):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Terminated, KeyboardInterrupt)  # fit() records KILLED, not FAILED
