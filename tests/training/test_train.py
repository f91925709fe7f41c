"""The train stage on tiny data: learning, outputs, resume, early stopping, MLflow, DDP, CLI.

Tests that train whole runs are marked slow (``make test-fast`` skips them); the pieces of
the loop (one epoch, saving and resuming an epoch) run unmarked on a few batches.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_OVERRIDES, free_port, make_tiny_dataset, shrink_params

from seqops.cli import main
from seqops.data.manifest import manifest_path, read_manifest, write_manifest
from seqops.imaging import load_image, normalize_pixels, pixels_to_norm, render_marks
from seqops.model import spec_from_params
from seqops.training import checkpoint as ckpt
from seqops.training.data import StepDataset
from seqops.training.outputs import (
    HEADLINE_METRICS,
    StageOutputs,
    final_metrics,
    headline_metrics,
    write_metrics,
)
from seqops.training.runtime import DistInfo
from seqops.training.train import (
    Run,
    check_gradients,
    refresh_loop_points,
    run_train,
    save_epoch,
    set_up,
    train_one_epoch,
    validate_epoch,
    warn_uncounted_kinds,
)

# Plain settings for tests that compare runs: no schedule, no mark noise.
PLAIN = ("train.lr_schedule=none", "train.rollout_images=0", "train.picture_samples=0")


def train(params, data, tmp_path, **kwargs) -> dict:
    kwargs.setdefault("track", False)
    return run_train(
        params,
        data,
        tmp_path / "models",
        metrics_path=tmp_path / "metrics" / "train.json",
        plots_path=tmp_path / "plots" / "train.csv",
        report_path=tmp_path / "reports" / "train" / "metrics.json",
        **kwargs,
    )


def read_plots(tmp_path) -> list[dict[str, str]]:
    with open(tmp_path / "plots" / "train.csv") as f:
        return list(csv.DictReader(f))


def train_split(data, params) -> StepDataset:
    spec = spec_from_params(params)
    return StepDataset(
        data, "train", spec=spec, sampling=params.sampling, train=params.train, augment=True, seed=0
    )


def test_training_warns_when_scenes_hold_a_kind_nothing_says_not_to_count(tmp_path, tiny_params):
    data = make_tiny_dataset(tmp_path / "prepared", num_train=6, num_val=1)
    records = read_manifest(manifest_path(data, "train"))
    marked = [dataclasses.replace(r, extra={"num_distractors": 2}) for r in records[:2]]
    write_manifest(manifest_path(data, "train"), marked + records[2:])
    ds = train_split(data, tiny_params)
    message = warn_uncounted_kinds(ds, exemplars=False)
    assert message is not None and "2 of 6 training scenes hold distractors" in message
    assert warn_uncounted_kinds(ds, exemplars=True) is None
    write_manifest(manifest_path(data, "train"), records)
    plain = train_split(data, tiny_params)
    assert warn_uncounted_kinds(plain, exemplars=False) is None


def set_up_on_cpu(params, data, tmp_path, resume: str = "never") -> Run:
    outputs = StageOutputs(tmp_path / "models", plots_path=tmp_path / "plots" / "train.csv")
    return set_up(
        params, data, outputs=outputs, resume=resume, device=torch.device("cpu"), dist=DistInfo()
    )


def test_one_epoch_of_a_few_batches_trains_both_heads(tiny_dataset, tmp_path):
    run = set_up_on_cpu(shrink_params(*PLAIN), tiny_dataset, tmp_path)
    assert len(run.loader(1)) == 3  # 12 images, 4 per batch
    before = {k: v.clone() for k, v in run.state.model.state_dict().items()}
    metrics = train_one_epoch(run, epoch=1)
    assert run.state.scheduler.last_epoch == 3  # one optimizer step per batch
    assert metrics["train/lr"] == run.params.train.lr  # no schedule in PLAIN
    for key in ("train/loss", "train/loss_spatial", "train/loss_done", "train/loss_heatmap"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    assert metrics["grad/xy_head"] > 0 and metrics["grad/done_head"] > 0
    assert metrics["grad/total"] > 0 and metrics["train/examples_per_second"] > 0
    after = run.state.model.state_dict()
    moved = {name.split(".")[0] for name, v in before.items() if not torch.equal(v, after[name])}
    assert "stepper" in moved and "encoder" in moved


def test_an_epoch_saved_by_save_epoch_is_resumed_by_set_up(tiny_dataset, tmp_path):
    run = set_up_on_cpu(shrink_params(*PLAIN), tiny_dataset, tmp_path)
    row = {"epoch": 1, **train_one_epoch(run, epoch=1)}
    validate_epoch(run, row)
    row["time/epoch_seconds"] = 1.0
    best = run.state.end_epoch(1, row["val/loss"])
    run.state.record(row, best=best)
    save_epoch(run, best=best)
    assert ckpt.load_checkpoint(tmp_path / "models" / "best.pt")["epoch"] == 1
    assert [int(r["epoch"]) for r in read_plots(tmp_path)] == [1]
    resumed = set_up_on_cpu(shrink_params(*PLAIN), tiny_dataset, tmp_path, resume="require")
    assert (resumed.state.epoch, resumed.state.stopper.best) == (1, row["val/loss"])
    assert resumed.state.history == [row]
    trained = run.state.model.state_dict()
    for name, value in resumed.state.model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_the_loop_own_states_reach_the_training_batches(tiny_dataset, tmp_path):
    params = shrink_params(*PLAIN, "train.loop_share=0.5", "train.loop_refresh=1")
    run = set_up_on_cpu(params, tiny_dataset, tmp_path)
    refresh_loop_points(run, epoch=2)
    ds = run.train_ds
    assert sorted(ds.loop_points) == list(range(len(ds)))
    assert run.state.model.training  # put back in training mode after the rollout
    item = ds[0]
    k = run.params.sampling.steps_per_image
    loop = ds.loop_points[0]
    # the last steps hold the loop's marks: the final one all of its points
    final_marks = render_marks(pixels_to_norm(loop, ds.image_size), ds.grid, ds.mark_sigma)
    np.testing.assert_allclose(item["marks"][k - 1, 0], final_marks, atol=1e-6)
    metrics = train_one_epoch(run, epoch=2)
    assert math.isfinite(metrics["train/loss"])


@pytest.mark.slow
def test_each_epoch_rolls_out_its_share_of_the_images_in_turn(tiny_dataset, tmp_path):
    params = shrink_params(*PLAIN, "train.loop_share=0.5", "train.loop_refresh=0.5")
    run = set_up_on_cpu(params, tiny_dataset, tmp_path)
    n = len(run.train_ds)
    refresh_loop_points(run, epoch=2)
    assert sorted(run.train_ds.loop_points) == list(range(0, n, 2))
    first = {i: p.copy() for i, p in run.train_ds.loop_points.items()}
    refresh_loop_points(run, epoch=3)  # the other half; the first half keeps its rollout
    assert sorted(run.train_ds.loop_points) == list(range(n))
    for i, points in first.items():
        np.testing.assert_array_equal(run.train_ds.loop_points[i], points)


@pytest.mark.slow
def test_a_tiny_model_learns_and_writes_every_output(tiny_dataset, tmp_path):
    params = shrink_params("train.epochs=3", "train.lr=0.005")
    metrics = train(params, tiny_dataset, tmp_path)
    rows = read_plots(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train/loss"]) < float(rows[0]["train/loss"])
    assert float(rows[-1]["val/loss"]) < float(rows[0]["val/loss"])
    assert list(rows[0])[:3] == ["epoch", "train/loss", "val/loss"]
    for key in (
        "val/loss_spatial", "val/loss_done", "val/loss_heatmap", "val/mse", "val/px_err_mean",
        "val/px_err_median", "val/px_err_p90", "val/done_acc", "val/done_precision",
        "val/done_recall", "val/done_f1", "val/count_mae", "val/count_exact",
        "train/loss_spatial", "train/loss_done", "train/loss_heatmap", "train/mse",
    ):  # fmt: skip
        assert key in metrics, key
    assert metrics["grad/xy_head"] > 0 and metrics["grad/done_head"] > 0  # heads were found
    # The report: every figure; DVC's metrics file: the headline ones (a screen).
    assert json.loads((tmp_path / "reports" / "train" / "metrics.json").read_text()) == metrics
    headline = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert headline == {k: metrics[k] for k in HEADLINE_METRICS} and len(metrics) > 20
    seconds = [float(r["time/epoch_seconds"]) for r in rows]
    assert metrics["time/train_minutes"] == pytest.approx(sum(seconds) / 60, rel=1e-4)
    run_info = json.loads((tmp_path / "models" / "train_run.json").read_text())
    assert run_info["best_epoch"] == metrics["best_epoch"]
    assert run_info["best_val_loss"] == pytest.approx(metrics["val/loss"])
    best = ckpt.load_checkpoint(tmp_path / "models" / "best.pt")
    assert best["epoch"] == metrics["best_epoch"]
    assert best["best_val_loss"] == pytest.approx(metrics["val/loss"])
    assert best["params"]["train"]["lr"] == 0.005


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch_with_the_optimizer_state(tiny_dataset, tmp_path):
    straight = tmp_path / "straight"
    train(shrink_params("train.epochs=3", *PLAIN), tiny_dataset, straight)
    resumed = tmp_path / "resumed"
    train(shrink_params("train.epochs=2", *PLAIN), tiny_dataset, resumed)
    assert ckpt.load_checkpoint(resumed / "models" / "last.pt")["epoch"] == 2
    more = shrink_params("train.epochs=3", *PLAIN)
    metrics = train(more, tiny_dataset, resumed, resume="require")
    assert metrics["epochs_trained"] == 3
    assert [int(r["epoch"]) for r in read_plots(resumed)] == [1, 2, 3]
    # Same weights as the uninterrupted run: AdamW's moments, the epoch's shuffle and steps
    # and the RNG state all came back.
    a = ckpt.load_checkpoint(straight / "models" / "last.pt")
    b = ckpt.load_checkpoint(resumed / "models" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for name, value in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][name], value, msg=name)


@pytest.mark.slow
def test_resume_needs_matching_params(tiny_dataset, tmp_path, caplog):
    train(shrink_params("train.epochs=1", *PLAIN), tiny_dataset, tmp_path)
    changed = shrink_params("train.epochs=2", "train.lr=0.01", *PLAIN)
    with pytest.raises(ValueError, match=r"train\.lr"):
        train(changed, tiny_dataset, tmp_path, resume="require")
    with caplog.at_level(logging.WARNING):
        metrics = train(changed, tiny_dataset, tmp_path)  # auto: fresh start
    assert "not resuming" in caplog.text
    assert metrics["epochs_trained"] == 2


@pytest.mark.slow
def test_a_corrupt_last_checkpoint_means_a_fresh_start(tiny_dataset, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "last.pt").write_bytes(b"garbage")
    metrics = train(shrink_params("train.epochs=1", *PLAIN), tiny_dataset, tmp_path)
    assert metrics["epochs_trained"] == 1


@pytest.mark.slow
def test_the_time_budget_stops_after_the_epoch_that_crosses_it(tiny_dataset, tmp_path):
    params = shrink_params("train.epochs=5", "train.max_minutes=0.00001", *PLAIN)
    metrics = train(params, tiny_dataset, tmp_path)
    assert metrics["epochs_trained"] == 1
    run_info = json.loads((tmp_path / "models" / "train_run.json").read_text())
    assert run_info["stopped_reason"] == "time_budget"


def test_gradient_check_warns_on_vanishing_and_exploding_heads(caplog):
    with caplog.at_level(logging.WARNING):
        warnings = check_gradients({"xy_head": 0.0, "done_head": 5e3, "other": 0.5}, epoch=4)
    assert len(warnings) == 2
    assert "vanishing gradient in the xy_head" in caplog.text
    assert "exploding gradient in the done_head" in caplog.text


@pytest.mark.slow
def test_the_mlflow_run_holds_params_metrics_pictures_and_the_checkpoint(
    tiny_dataset, tmp_path, mlflow_uri
):
    from mlflow import MlflowClient

    metrics = train(shrink_params(), tiny_dataset, tmp_path, track=True)
    run_info = json.loads((tmp_path / "models" / "train_run.json").read_text())
    assert run_info["tracking_uri"] == mlflow_uri
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == run_info["experiment_id"]
    assert run.data.params["train.loss.w_done"] == "3.0"
    assert run.data.params["prepare.image_size"] == "64"
    assert run.data.tags["dvc_stage"] == "train"
    assert run.data.tags["device"] == "cpu"
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in history] == [1, 2]
    assert history[metrics["best_epoch"] - 1].value == pytest.approx(metrics["val/loss"])
    assert "val/px_err_median" in run.data.metrics
    for epoch in (1, 2):
        folder = f"pictures/epoch_{epoch:03d}"
        names = sorted(a.path for a in client.list_artifacts(run.info.run_id, folder))
        expected = [f"{folder}/{kind}_{i}.png" for kind in ("rollout", "sample") for i in range(2)]
        assert names == expected
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == [
        "checkpoint/best.pt"
    ]
    # The stage's files: the headline figures, every figure (the report), the curves.
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "train"))
    assert logged == ["train/metrics.json", "train/train.csv", "train/train.json"]
    report = client.download_artifacts(run.info.run_id, "train/metrics.json", str(tmp_path))
    assert json.loads(Path(report).read_text()) == metrics


@pytest.mark.slow
def test_done_is_higher_with_every_object_marked_than_with_none(tmp_path):
    data = make_tiny_dataset(tmp_path / "prepared", num_train=24, num_val=8)
    params = shrink_params("train.epochs=8", "train.lr=0.005", "train.rollout_images=0")
    train(params, data, tmp_path)
    model, _ = ckpt.load_model(tmp_path / "models" / "best.pt")
    spec = model.spec
    gaps = []
    with torch.no_grad():
        for record in read_manifest(data / "val.jsonl"):
            pixels = np.asarray(load_image(data / record.image))
            features = model.encode(torch.from_numpy(normalize_pixels(pixels))[None])
            points = pixels_to_norm(record.points_array(), 64)
            done = []
            for k in (0, len(points)):
                marks = render_marks(points[:k], spec.grid, spec.mark_sigma)
                out = model.step(features, torch.from_numpy(marks)[None, None])
                done.append(torch.sigmoid(out.done_logit).item())
            gaps.append(done[1] - done[0])
    assert min(gaps) > 0, gaps
    assert np.mean(gaps) > 0.2, gaps


@pytest.mark.slow
@pytest.mark.e2e  # joins a gloo process group on a local port
def test_torchrun_environment_trains_with_ddp_on_gloo(tiny_dataset, tmp_path, monkeypatch):
    for key, value in {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    metrics = train(shrink_params("train.epochs=1", *PLAIN), tiny_dataset, tmp_path)
    assert metrics["epochs_trained"] == 1
    assert (tmp_path / "models" / "best.pt").is_file()
    assert not torch.distributed.is_initialized()  # the process group was closed


@pytest.mark.slow
def test_cli_train_writes_the_stage_outputs(tiny_dataset, tmp_path, capsys):
    sets = [arg for o in (*TINY_OVERRIDES, "train.epochs=1", *PLAIN) for arg in ("--set", o)]
    argv = ["train", "--params", str(ROOT / "params.yaml"), *sets, "--data", str(tiny_dataset)]
    argv += ["--out", str(tmp_path / "models"), "--metrics", str(tmp_path / "m.json")]
    argv += ["--plots", str(tmp_path / "p.csv"), "--report", str(tmp_path / "r.json")]
    assert main([*argv, "--no-mlflow"]) == 0
    printed = json.loads(capsys.readouterr().out)  # every figure, as the report
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert json.loads((tmp_path / "m.json").read_text()) == headline_metrics(printed)
    # No rollout here (PLAIN): the count figures are absent, the others are there.
    headline = {"best_epoch", "epochs_trained", "time/train_minutes", "val/loss"}
    assert headline <= set(headline_metrics(printed)) < set(printed)
    assert {p.name for p in (tmp_path / "models").iterdir()} == {
        "best.pt",
        "last.pt",
        "train_run.json",
    }
    missing = ["train", "--params", str(ROOT / "params.yaml"), "--data", str(tmp_path / "none")]
    assert main([*missing, "--out", str(tmp_path / "x"), "--no-mlflow"]) == 2
    assert "dataset.json" in capsys.readouterr().err


@pytest.mark.slow
def test_workers_exemplars_and_nearest_unmarked_train(tiny_dataset, tmp_path):
    params = shrink_params(
        "train.epochs=1", "train.num_workers=2", "model.exemplars=true",
        "train.target=nearest_unmarked", "train.loss.variant=continuous", *PLAIN,
    )  # fmt: skip
    metrics = train(params, tiny_dataset, tmp_path)
    assert math.isfinite(metrics["val/loss"])
    model, _ = ckpt.load_model(tmp_path / "models" / "best.pt")
    assert model.spec.exemplars


def test_the_metrics_file_gets_the_headline_and_the_report_every_figure(tmp_path):
    history = [
        {"epoch": 1, "val/loss": 2.0, "val/count_mae": 3.0, "time/epoch_seconds": 30.0},
        {"epoch": 2, "val/loss": 1.0, "val/count_mae": math.nan, "time/epoch_seconds": 90.0,
         "val/mse": 0.5, "grad/total": 4.0},
        {"epoch": 3, "val/loss": 1.5, "val/count_mae": 1.0, "time/epoch_seconds": 60.0},
    ]  # fmt: skip
    metrics = final_metrics(history, best_epoch=2)
    assert metrics == {
        "best_epoch": 2, "epochs_trained": 3, "time/train_minutes": 3.0, "val/loss": 1.0,
        "val/count_mae": None, "time/epoch_seconds": 90.0, "val/mse": 0.5, "grad/total": 4.0,
    }  # fmt: skip
    outputs = StageOutputs(
        tmp_path / "models",
        metrics_path=tmp_path / "metrics" / "train.json",
        report_path=tmp_path / "reports" / "train" / "metrics.json",
    )
    write_metrics(outputs, metrics)
    assert json.loads(outputs.report_path.read_text()) == metrics
    # The headline figures there are (val/count_mae undefined: null, as DVC expects).
    assert json.loads(outputs.metrics_path.read_text()) == {
        "best_epoch": 2, "epochs_trained": 3, "time/train_minutes": 3.0, "val/loss": 1.0,
        "val/count_mae": None,
    }  # fmt: skip
    assert list(headline_metrics(metrics)) == [k for k in HEADLINE_METRICS if k in metrics]
    write_metrics(StageOutputs(tmp_path / "m2"), metrics)  # neither path: nothing written
    assert not (tmp_path / "m2").exists()
