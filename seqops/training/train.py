"""The ``train`` stage: fit the next-object network on a prepared dataset.

``run_train(params, data_dir, out_dir, ...)`` is the pure core behind ``seqops train``. It
reads top to bottom: :func:`set_up` (data, network, optimizer, resume from ``last.pt``),
then per epoch :func:`train_one_epoch`, :func:`validate_epoch`, :func:`save_epoch` and
:func:`log_epoch`, until the epochs, early stopping or ``train.max_minutes`` end it, and
:func:`finish` writes the stage's outputs.

Each batch encodes ``B`` images once and steps ``B * K`` times against the repeated
features. Per epoch: train, validate (losses, pixel error, done scores, a full rollout on a
fixed subset), early stopping on ``val/loss``, ``best.pt`` (what export uses) and
``last.pt`` (resume after a kill, or to extend ``train.epochs``), one row of the plots CSV,
and the same metrics plus pictures to MLflow.

Multi-GPU: launched by ``torchrun`` (``WORLD_SIZE``/``LOCAL_RANK`` set) the same command
trains with DDP and a ``DistributedSampler``; only rank 0 validates, logs and writes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from seqops.backbones import load_pretrained
from seqops.config import Params, TrainConfig
from seqops.imaging import norm_to_pixels
from seqops.io import atomic_write_json
from seqops.model import SeqCounter, StepOutput, spec_from_params
from seqops.tracking import TrackedRun, start_run
from seqops.training import checkpoint as ckpt
from seqops.training.data import VAL_SEED, StepDataset, collate_steps, fingerprint_dataset
from seqops.training.outputs import StageOutputs, final_metrics, write_metrics, write_plots_csv
from seqops.training.runtime import (
    DistInfo,
    autocast,
    broadcast_values,
    close_distributed,
    init_distributed,
    progress_enabled,
    seed_everything,
    select_device,
    stop_cleanly,
    to_device,
    worker_context,
)
from seqops.training.state import RESUME_MODES, EarlyStopping, TrainingState
from seqops.training.validation import (
    compute_step_losses,
    draw_rollout_pictures,
    draw_val_pictures,
    reduce_losses,
    rollout,
    validate,
)

log = logging.getLogger(__name__)

# Gradient check (the research's): a head whose gradient norm leaves this range is broken.
GRAD_VANISH = 1e-7
GRAD_EXPLODE = 1e3


def run_train(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path | None = None,
    plots_path: str | Path | None = None,
    resume: str | None = None,
    track: bool = True,
    report_path: str | Path | None = None,
) -> dict[str, Any]:
    """Train on the prepared dataset ``data_dir``.

    Writes ``<out_dir>/best.pt`` (lowest ``val/loss``; what export uses), ``<out_dir>/last.pt``
    (resume state, every epoch), ``<out_dir>/train_run.json`` (MLflow run id, best epoch and
    val loss), the metrics JSON (the headline figures), the report (every figure of the best
    epoch) and the per-epoch plots CSV.

    Args:
        resume: ``auto`` resumes from ``<out_dir>/last.pt`` when it exists, matches (same
            model spec and data; parameters equal apart from epochs, patience, time budget,
            devices) and has fewer than ``train.epochs`` epochs; ``never`` starts afresh;
            ``require`` fails unless it can resume. None: ``train.resume``.
        track: log the run to MLflow (``MLFLOW_TRACKING_URI`` or the embedded SQLite store).
        report_path: where every figure goes (``reports/train/metrics.json``); None: the
            metrics JSON, plots CSV and MLflow only.

    Returns:
        The best epoch's metrics plus ``best_epoch``, ``epochs_trained`` and
        ``time/train_minutes`` (what ``report_path`` holds; ``metrics_path`` holds its
        headline figures); an empty dict on ranks other than 0.
    """
    resume = params.train.resume if resume is None else resume
    if resume not in RESUME_MODES:
        raise ValueError(f"resume={resume!r}: expected one of {', '.join(RESUME_MODES)}")
    outputs = StageOutputs(
        Path(out_dir),
        metrics_path=Path(metrics_path) if metrics_path else None,
        plots_path=Path(plots_path) if plots_path else None,
        report_path=Path(report_path) if report_path else None,
    )
    device, dist = init_distributed(select_device(params.train.device))
    try:
        run = set_up(
            params, Path(data_dir), outputs=outputs, resume=resume, device=device, dist=dist
        )
        if track and dist.is_main:
            run.tracker = start_tracking(run)
        with stop_cleanly(dist):  # a SIGTERM ends the MLflow run KILLED; DDP failures say so
            return fit(run)
    finally:
        close_distributed(dist)


@dataclass
class Run:
    """One call of :func:`run_train`: its parameters, where it runs, its data and outputs,
    the network as trained (DDP-wrapped under torchrun) and the state it carries."""

    params: Params
    device: torch.device
    dist: DistInfo
    outputs: StageOutputs
    train_ds: StepDataset
    val_ds: StepDataset | None  # rank 0 validates; other ranks only train
    net: nn.Module  # a ManyStepNet around state.model, or DDP around that
    state: TrainingState
    tracker: TrackedRun | None = None  # the MLflow run (rank 0, when tracking)

    def loader(self, epoch: int) -> DataLoader:
        """This epoch's training batches (:func:`train_loader`)."""
        cfg = self.params.train
        return train_loader(self.train_ds, cfg, dist=self.dist, device=self.device, epoch=epoch)


def set_up(
    params: Params,
    data_dir: Path,
    *,
    outputs: StageOutputs,
    resume: str,
    device: torch.device,
    dist: DistInfo,
) -> Run:
    """Seed, load the data, build the network with its optimizer and schedule, resume from
    ``last.pt`` when ``resume`` allows it, and wrap the network for DDP under torchrun."""
    cfg = params.train
    seed_everything(cfg.seed + dist.rank)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    spec = spec_from_params(params)
    configs = {"spec": spec, "sampling": params.sampling, "train": cfg}
    train_ds = StepDataset(data_dir, "train", **configs, augment=True, seed=cfg.seed)
    val_ds = None
    if dist.is_main:
        val_ds = StepDataset(data_dir, "val", **configs, augment=False, seed=VAL_SEED)
        warn_uncounted_kinds(train_ds, spec.exemplars)

    model = build_model(params).to(device)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = len(train_loader(train_ds, cfg, dist=dist, device=device, epoch=1))
    state = TrainingState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, steps_per_epoch),
        stopper=EarlyStopping(cfg.patience),
        params=params,
        data_fingerprint=fingerprint_dataset(data_dir),
    )
    if state.resume(outputs.last_path, resume):
        report_resumed(state, outputs.last_path, resume)
        train_ds.loop_points = state.loop_points  # the rollouts of the epochs before
    # Wrapped after resuming: DDP starts every rank from rank 0's weights as they are now.
    net: nn.Module = ManyStepNet(model)
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    return Run(
        params=params,
        device=device,
        dist=dist,
        outputs=outputs,
        train_ds=train_ds,
        val_ds=val_ds,
        net=net,
        state=state,
    )


def build_model(params: Params) -> SeqCounter:
    """The network of ``params.model``: its backbone filled from ``model.pretrained`` (a
    resumed run then overwrites it from ``last.pt``) and frozen as ``model.freeze_backbone``
    says."""
    model = SeqCounter(spec_from_params(params))
    if model.backbone is not None:
        load_pretrained(model.backbone, model.spec.backbone, params.model.pretrained)
    elif params.model.pretrained != "none":
        raise ValueError(
            f"model.pretrained={params.model.pretrained}: the seqops encoder trains from "
            "scratch; pretrained weights need another model.backbone (seqops.backbones)"
        )
    model.freeze_backbone(params.model.freeze_backbone)
    return model


def optimizer_groups(model: SeqCounter, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters: the backbone's at ``lr * train.backbone_lr_scale`` (pretrained
    features move slowly), the rest at ``lr``; frozen ones are left out."""
    backbone = {id(p) for p in model.backbone.parameters()} if model.backbone else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in backbone]}]
    pretrained = [p for p in trainable if id(p) in backbone]
    if pretrained:
        groups.append({"params": pretrained, "lr": cfg.lr * cfg.backbone_lr_scale})
    return groups


def report_resumed(state: TrainingState, last_path: Path, resume: str) -> None:
    """Log where a resumed run carries on, and warn when it has nothing left to train."""
    epochs = state.params.train.epochs
    log.info("resuming %s at epoch %d (train.resume=%s)", last_path, state.epoch + 1, resume)
    if state.epoch >= epochs or state.stopper.should_stop:  # say it: nothing will train
        why = "it stopped early" if state.stopper.should_stop else f"train.epochs is {epochs}"
        log.warning(
            "%s has %d epochs and %s: nothing to train (train.resume=never starts afresh)",
            last_path, state.epoch, why,
        )  # fmt: skip


def start_tracking(run: Run) -> TrackedRun:
    """Start the MLflow run, or continue the resumed checkpoint's; the state keeps its id."""
    tags = {"device": run.device.type, "dvc_stage": "train", "world_size": run.dist.world_size}
    state = run.state
    tracker = start_run(
        run.params.model_dump(mode="json"), tags, resume_run_id=state.run_id,
        defer_when_unreachable=True,  # a server that goes away does not stop training
    )  # fmt: skip
    if state.history and not tracker.resumed:  # a new run for an old checkpoint: replay curves
        for row in state.history:
            tracker.log_metrics(row, step=int(row["epoch"]))
    state.run_id = tracker.run_id
    return tracker


def fit(run: Run) -> dict[str, Any]:
    """Train until a stop condition, then :func:`finish` (rank 0); a failure or an interrupt
    marks the MLflow run FAILED or KILLED."""
    try:
        reason = train_epochs(run)
        return finish(run, reason) if run.dist.is_main else {}
    except BaseException as exc:
        if run.tracker is not None:
            run.tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def train_epochs(run: Run) -> str:
    """The epoch loop; returns why it stopped: ``epochs``, ``early_stopping`` or
    ``time_budget``."""
    cfg, state, main = run.params.train, run.state, run.dist.is_main
    started = time.monotonic()
    epochs = range(state.epoch + 1, cfg.epochs + 1)
    for epoch in tqdm(epochs, desc="epochs", disable=not (main and progress_enabled())):
        if state.stopper.should_stop:  # a resumed run that had already stopped
            return "early_stopping"
        epoch_started = time.perf_counter()
        if cfg.loop_share > 0 and epoch > 1:
            refresh_loop_points(run, epoch)
        row = {"epoch": epoch, **train_one_epoch(run, epoch)}
        found: list[np.ndarray] = []
        if main:
            found = validate_epoch(run, row)
            row["time/epoch_seconds"] = time.perf_counter() - epoch_started
        # Every rank must take the same stop decisions: rank 0's loss and clock decide.
        val_loss, elapsed = broadcast_values(
            [row.get("val/loss", math.nan), time.monotonic() - started], run.dist, run.device
        )
        improved = state.end_epoch(epoch, val_loss)
        if main:
            state.record(row, best=improved)
            check_gradients({k: row[k] for k in ("grad/xy_head", "grad/done_head")}, epoch)
            save_epoch(run, best=improved)
            log_epoch(run, row, found)
        if state.stopper.should_stop:
            return "early_stopping"
        if cfg.max_minutes and elapsed >= cfg.max_minutes * 60:
            log.info("train.max_minutes=%s reached after epoch %d", cfg.max_minutes, epoch)
            return "time_budget"
    return "epochs"


# --- one epoch: train, validate, save, log ---------------------------------------------


class ManyStepNet(nn.Module):
    """Encode ``B`` images once, step ``B * K`` times: the module DDP wraps (its ``forward``
    is what DDP hooks for gradient synchronisation)."""

    def __init__(self, model: SeqCounter) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: Tensor, marks: Tensor, step_image: Tensor, exemplar_mask: Tensor | None
    ) -> StepOutput:
        features, log_radius = self.model.encode_extent(images, exemplar_mask)
        out = self.model.step(features.index_select(0, step_image), marks)
        if log_radius is None:
            return out
        return out._replace(log_radius=log_radius.index_select(0, step_image))


# Images per rollout batch when the loop's own states are collected (train.loop_share).
LOOP_BATCH = 32


@torch.no_grad()
def refresh_loop_points(run: Run, epoch: int) -> None:
    """Run the current model's loop (as served: eval mode, the export's done threshold) on
    the training images and hand the points found to the dataset, whose steps then include
    the states that loop visits (``train.loop_share``).

    Each epoch rolls out the share ``train.loop_refresh`` of the images, in turn (image
    ``i`` in epoch ``e`` when ``i % parts == (e - 2) % parts``): a rollout of every image
    costs about two thirds of a training epoch, and states one or two epochs old teach the
    step nearly as well. Images not rolled out yet train on clean marks only.
    """
    ds, model, params = run.train_ds, run.state.model, run.params
    parts = max(1, round(1 / params.train.loop_refresh))
    chosen = np.flatnonzero(np.arange(len(ds)) % parts == (epoch - 2) % parts)
    model.eval()
    max_steps = 2 * params.prepare.max_objects
    found = dict(ds.loop_points)
    for start in range(0, len(chosen), LOOP_BATCH):
        index = chosen[start : start + LOOP_BATCH]
        masks = np.stack([ds.exemplar_mask(i) for i in index]) if ds.exemplars else None
        points = rollout(
            model, ds.pixels[index], masks, max_steps, run.device,
            params.evaluate.done_threshold,
        )  # fmt: skip
        for i, norm in zip(index, points, strict=True):
            found[int(i)] = norm_to_pixels(norm, ds.image_size)
    ds.loop_points = run.state.loop_points = found
    model.train()


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training data; returns ``train/...`` and ``grad/...`` means."""
    run.net.train()
    sums: dict[str, float] = {}
    batches, examples = 0, 0
    groups = _param_groups(run.state.model)
    started = time.perf_counter()
    loader = run.loader(epoch)
    for batch in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress_enabled()):
        batch = to_device(batch, run.device)
        for key, value in _train_step(run, batch, groups).items():
            sums[key] = sums.get(key, 0.0) + value
        batches += 1
        examples += len(batch["done"])
    metrics = {k: v / max(batches, 1) for k, v in sums.items()}
    seconds = time.perf_counter() - started
    metrics["train/examples_per_second"] = examples / max(seconds, 1e-9)
    metrics["train/lr"] = float(run.state.scheduler.get_last_lr()[0])
    return metrics


def _train_step(
    run: Run, batch: dict[str, Tensor], groups: dict[str, list[nn.Parameter]]
) -> dict[str, float]:
    """One optimizer step; its losses (``train/...``) and gradient norms (``grad/...``)."""
    cfg, state = run.params.train, run.state
    with autocast(run.device):
        out = run.net(
            batch["images"], batch["marks"], batch["step_image"], batch.get("exemplar_mask")
        )
    values = reduce_losses(compute_step_losses(out, batch, cfg), cfg)
    state.optimizer.zero_grad(set_to_none=True)
    values["loss"].backward()
    norms = {f"grad/{name}": _grad_norm(params) for name, params in groups.items()}
    norms["grad/total"] = float(nn.utils.clip_grad_norm_(state.model.parameters(), cfg.max_norm))
    state.optimizer.step()
    state.scheduler.step()
    return {**{f"train/{k}": float(v.detach()) for k, v in values.items()}, **norms}


def validate_epoch(run: Run, row: dict[str, float]) -> list[np.ndarray]:
    """Add the ``val/...`` metrics to ``row`` (rank 0); returns the rollout's found objects."""
    metrics, found = validate(run.state.model, run.val_ds, run.params, run.device)
    row.update(metrics)
    return found


def save_epoch(run: Run, best: bool) -> None:
    """``best.pt`` when this epoch is the ``best`` so far, ``last.pt`` always, the plots CSV."""
    state, outputs = run.state, run.outputs
    if best:
        ckpt.save_checkpoint(outputs.best_path, state.describe(state.epoch, state.history[-1]))
    ckpt.save_checkpoint(outputs.last_path, state.checkpoint())
    if outputs.plots_path:
        write_plots_csv(outputs.plots_path, state.history)


def log_epoch(run: Run, row: dict[str, float], found: list[np.ndarray]) -> None:
    """The epoch's metrics and pictures to MLflow, and a line to the log."""
    epoch = row["epoch"]
    if run.tracker is not None:
        run.tracker.log_metrics(row, step=epoch)
        _log_pictures(run, found, epoch)
    log.info(
        "epoch %d: train/loss %.4f val/loss %.4f px_err_median %.2f count_mae %s %.1fs",
        epoch, row["train/loss"], row["val/loss"], row.get("val/px_err_median", math.nan),
        row.get("val/count_mae"), row["time/epoch_seconds"],
    )  # fmt: skip


def _log_pictures(run: Run, found: list[np.ndarray], epoch: int) -> None:
    """Step pictures and rollout pictures of the first validation images."""
    model, val_ds, count = run.state.model, run.val_ds, run.params.train.picture_samples
    folder = f"pictures/epoch_{epoch:03d}"
    for i, picture in enumerate(draw_val_pictures(model, val_ds, count, run.device)):
        run.tracker.log_image(picture, f"{folder}/sample_{i}.png")
    for i, picture in enumerate(draw_rollout_pictures(val_ds, found, count)):
        run.tracker.log_image(picture, f"{folder}/rollout_{i}.png")


# --- the end: the stage's outputs --------------------------------------------------------


def finish(run: Run, reason: str) -> dict[str, Any]:
    """Write the stage's outputs once training has stopped (for ``reason``); close the
    MLflow run. Returns the best epoch's metrics."""
    state, outputs, stopper = run.state, run.outputs, run.state.stopper
    if not state.history:
        epochs = run.params.train.epochs
        raise ValueError(f"{outputs.out_dir}: no epoch was trained (train.epochs={epochs})")
    if not outputs.best_path.is_file() and state.best_model_state is not None:
        # e.g. removed by `dvc repro` before a resumed run: rebuild it from last.pt's copy
        best_row = next(r for r in state.history if r["epoch"] == stopper.best_epoch)
        best = state.describe(stopper.best_epoch, best_row, model_state=state.best_model_state)
        ckpt.save_checkpoint(outputs.best_path, best)
    metrics = final_metrics(state.history, stopper.best_epoch)
    write_metrics(outputs, metrics)
    if outputs.plots_path:
        write_plots_csv(outputs.plots_path, state.history)
    atomic_write_json(outputs.run_info_path, _run_info(run, reason))
    log.info(
        "training stopped (%s); best epoch %d, val/loss %.4f",
        reason,
        stopper.best_epoch,
        stopper.best,
    )
    if run.tracker is not None:
        _close_tracking(run, reason)
    return metrics


def _run_info(run: Run, reason: str) -> dict[str, Any]:
    """``train_run.json``: the MLflow run, the best epoch and why training stopped."""
    tracker, stopper = run.tracker, run.state.stopper
    return {
        "run_id": tracker.run_id if tracker else None,
        "experiment_id": tracker.experiment_id if tracker else None,
        "tracking_uri": tracker.tracking_uri if tracker else None,
        "best_epoch": stopper.best_epoch,
        "best_val_loss": stopper.best,
        "epochs_trained": len(run.state.history),
        "stopped_reason": reason,
    }


def _close_tracking(run: Run, reason: str) -> None:
    """Log the best epoch, the checkpoint and the stage's files; end the MLflow run."""
    tracker, stopper, outputs = run.tracker, run.state.stopper, run.outputs
    tracker.log_metrics({"best/val_loss": stopper.best, "best/epoch": stopper.best_epoch}, step=0)
    tracker.set_tags({"best_epoch": stopper.best_epoch, "stopped_reason": reason})
    tracker.log_artifact(outputs.best_path, "checkpoint")
    for path in (outputs.metrics_path, outputs.report_path, outputs.plots_path):
        if path:
            tracker.log_artifact(path, "train")
    tracker.finish()


# --- pieces: batches, schedule, gradient check, data warning ----------------------------


def train_loader(
    ds: StepDataset, cfg: TrainConfig, *, dist: DistInfo, device: torch.device, epoch: int
) -> DataLoader:
    """Epoch ``epoch``'s training batches: a shuffle seeded by (seed, epoch), so resuming at
    an epoch replays exactly what the uninterrupted run would have seen."""
    ds.set_epoch(epoch)
    if dist.enabled:
        sampler = DistributedSampler(ds, dist.world_size, dist.rank, seed=cfg.seed)
        sampler.set_epoch(epoch)
    else:
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        sampler = RandomSampler(ds, generator=generator)
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate_steps,
        num_workers=cfg.num_workers,
        multiprocessing_context=worker_context(cfg.num_workers),
        pin_memory=device.type == "cuda",
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay per optimizer step over ``train.epochs`` (or constant for ``none``).

    A lambda, not CosineAnnealingLR: its length comes from the current ``train.epochs``,
    so a run resumed with more epochs stretches the remaining schedule.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.lr_schedule == "cosine":
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _param_groups(model: SeqCounter) -> dict[str, list[nn.Parameter]]:
    """The parameters of the xy head and of the done head (checked by their gradient norm)."""
    groups: dict[str, list[nn.Parameter]] = {"xy_head": [], "done_head": []}
    for name, param in model.named_parameters():
        if ".done." in name:
            groups["done_head"].append(param)
        elif ".heat." in name or ".xy_mlp." in name:
            groups["xy_head"].append(param)
    return groups


def _grad_norm(params: list[nn.Parameter]) -> float:
    """The L2 norm of the parameters' gradients together (0 without any)."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def check_gradients(norms: dict[str, float], epoch: int) -> list[str]:
    """Warn (and return the warnings) when a head's mean gradient norm vanishes or explodes."""
    warnings = []
    for name, value in norms.items():
        if value < GRAD_VANISH or value > GRAD_EXPLODE:
            kind = "vanishing" if value < GRAD_VANISH else "exploding"
            warnings.append(f"epoch {epoch}: {kind} gradient in the {name}: norm {value:.3g}")
            log.warning(warnings[-1])
    return warnings


def warn_uncounted_kinds(ds: StepDataset, exemplars: bool) -> str | None:
    """Warn (and return the warning) when scenes hold an uncounted kind and nothing says
    which kind counts: without exemplars the network cannot tell the kinds apart."""
    scenes = sum(1 for r in ds.records if r.extra.get("num_distractors", 0) > 0)
    if exemplars or not scenes:
        return None
    message = (
        f"{ds.dataset_dir}: {scenes} of {len(ds.records)} training scenes hold distractors "
        "(a second, uncounted kind) but model.exemplars is false, so nothing tells the model "
        "which kind to count: set model.exemplars=true or prepare.synthetic.distractor_share=0"
    )
    log.warning(message)
    return message
