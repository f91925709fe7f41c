"""The ``train`` stage: fit the next-object network on a prepared dataset.

``run_train(params, data_dir, out_dir, ...)`` is the pure core behind ``seqops train``.
Each batch encodes ``B`` images once and steps ``B * K`` times against the repeated
features (DESIGN principle 5). Per epoch: train, validate (losses, pixel error, done
scores, a full rollout on a fixed subset), early stopping on ``val/loss``, ``best.pt``
(what export uses) and ``last.pt`` (resume after a kill, or to extend ``train.epochs``),
one row of the plots CSV, and the same metrics plus pictures to MLflow.

Multi-GPU: launched by ``torchrun`` (``WORLD_SIZE``/``LOCAL_RANK`` set) the same command
trains with DDP and a ``DistributedSampler``; only rank 0 validates, logs and writes.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from seqops.config import Params, TrainConfig
from seqops.io import atomic_write_json
from seqops.model import SeqCounter, StepOutput, spec_from_params
from seqops.training import checkpoint as ckpt
from seqops.training.data import VAL_SEED, StepDataset, collate_steps, fingerprint_dataset
from seqops.training.runtime import (
    DistInfo,
    autocast,
    broadcast_values,
    close_distributed,
    init_distributed,
    progress_enabled,
    seed_everything,
    select_device,
    to_device,
    worker_context,
)
from seqops.training.state import (
    RESUME_MODES,
    EarlyStopping,
    final_metrics,
    json_safe,
    load_resume_state,
    write_plots_csv,
)
from seqops.training.validation import (
    compute_step_losses,
    draw_rollout_pictures,
    draw_val_pictures,
    reduce_losses,
    validate,
)

log = logging.getLogger(__name__)

# Gradient check (the research's): a head whose gradient norm leaves this range is broken.
GRAD_VANISH = 1e-7
GRAD_EXPLODE = 1e3


class ManyStepNet(nn.Module):
    """Encode ``B`` images once, step ``B * K`` times: the module DDP wraps (its ``forward``
    is what DDP hooks for gradient synchronisation)."""

    def __init__(self, model: SeqCounter) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: Tensor, marks: Tensor, step_image: Tensor, exemplar_mask: Tensor | None
    ) -> StepOutput:
        features = self.model.encode(images, exemplar_mask)
        return self.model.step(features.index_select(0, step_image), marks)


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
    groups: dict[str, list[nn.Parameter]] = {"xy_head": [], "done_head": []}
    for name, param in model.named_parameters():
        if ".done." in name:
            groups["done_head"].append(param)
        elif ".heat." in name or ".xy_mlp." in name:
            groups["xy_head"].append(param)
    return groups


def _grad_norm(params: list[nn.Parameter]) -> float:
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


def train_one_epoch(
    net: nn.Module,
    model: SeqCounter,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    device: torch.device,
    desc: str,
) -> dict[str, float]:
    """One pass over the training data; returns ``train/...`` and ``grad/...`` means."""
    net.train()
    sums: dict[str, float] = {}
    batches, examples = 0, 0
    groups = _param_groups(model)
    started = time.perf_counter()
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress_enabled()):
        batch = to_device(batch, device)
        with autocast(device):
            out = net(
                batch["images"], batch["marks"], batch["step_image"], batch.get("exemplar_mask")
            )
        values = reduce_losses(compute_step_losses(out, batch, cfg), cfg)
        optimizer.zero_grad(set_to_none=True)
        values["loss"].backward()
        norms = {f"grad/{name}": _grad_norm(ps) for name, ps in groups.items()}
        norms["grad/total"] = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.max_norm))
        optimizer.step()
        scheduler.step()
        for key, value in values.items():
            sums[f"train/{key}"] = sums.get(f"train/{key}", 0.0) + float(value.detach())
        for key, value in norms.items():
            sums[key] = sums.get(key, 0.0) + value
        batches += 1
        examples += len(batch["done"])
    metrics = {k: v / max(batches, 1) for k, v in sums.items()}
    seconds = time.perf_counter() - started
    metrics["train/examples_per_second"] = examples / max(seconds, 1e-9)
    metrics["train/lr"] = float(scheduler.get_last_lr()[0])
    return metrics


def _loader(
    ds: StepDataset, cfg: TrainConfig, dist_info: DistInfo, device: torch.device, epoch: int
) -> DataLoader:
    """This epoch's training batches: a shuffle seeded by (seed, epoch), so resuming at an
    epoch replays exactly what the uninterrupted run would have seen."""
    ds.set_epoch(epoch)
    if dist_info.enabled:
        sampler = DistributedSampler(ds, dist_info.world_size, dist_info.rank, seed=cfg.seed)
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


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _log_pictures(tracker, model, val_ds, found, cfg: TrainConfig, epoch: int, device) -> None:
    folder = f"pictures/epoch_{epoch:03d}"
    for i, picture in enumerate(draw_val_pictures(model, val_ds, cfg.picture_samples, device)):
        tracker.log_image(picture, f"{folder}/sample_{i}.png")
    for i, picture in enumerate(draw_rollout_pictures(val_ds, found, cfg.picture_samples)):
        tracker.log_image(picture, f"{folder}/rollout_{i}.png")


def run_train(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path | None = None,
    plots_path: str | Path | None = None,
    resume: str = "auto",
    track: bool = True,
) -> dict[str, Any]:
    """Train on the prepared dataset ``data_dir``.

    Writes ``<out_dir>/best.pt`` (lowest ``val/loss``; what export uses), ``<out_dir>/last.pt``
    (resume state, every epoch), ``<out_dir>/train_run.json`` (MLflow run id, best epoch and
    val loss), the metrics JSON and the per-epoch plots CSV.

    Args:
        resume: ``auto`` resumes from ``<out_dir>/last.pt`` when it exists and matches (same
            model spec and data; parameters equal apart from epochs, patience, time budget,
            devices), ``never`` starts afresh, ``require`` fails unless it can resume.
        track: log the run to MLflow (``MLFLOW_TRACKING_URI`` or the embedded SQLite store).

    Returns:
        The best epoch's metrics plus ``best_epoch`` and ``epochs_trained`` (what
        ``metrics_path`` holds); an empty dict on ranks other than 0.
    """
    if resume not in RESUME_MODES:
        raise ValueError(f"resume={resume!r}: expected one of {', '.join(RESUME_MODES)}")
    device, dist_info = init_distributed(select_device(params.train.device))
    try:
        return _fit(
            params, Path(data_dir), Path(out_dir), metrics_path, plots_path, resume, track,
            device, dist_info,
        )  # fmt: skip
    finally:
        close_distributed(dist_info)


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


def _fit(
    params: Params,
    data_dir: Path,
    out_dir: Path,
    metrics_path: str | Path | None,
    plots_path: str | Path | None,
    resume: str,
    track: bool,
    device: torch.device,
    dist_info: DistInfo,
) -> dict[str, Any]:
    cfg, main = params.train, dist_info.is_main
    seed_everything(cfg.seed + dist_info.rank)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    spec = spec_from_params(params)
    dataset_args = (params, spec.grid, spec.mark_sigma, spec.exemplars)
    train_ds = StepDataset(data_dir, "train", *dataset_args, augment=True, seed=cfg.seed)
    val_ds = (
        StepDataset(data_dir, "val", *dataset_args, augment=False, seed=VAL_SEED) if main else None
    )
    fingerprint = fingerprint_dataset(data_dir)
    if main:
        warn_uncounted_kinds(train_ds, spec.exemplars)

    model = SeqCounter(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg, len(_loader(train_ds, cfg, dist_info, device, 1)))
    stopper = EarlyStopping(cfg.patience)
    history: list[dict[str, float]] = []
    run_id, start_epoch, best_state, reason = None, 1, None, "epochs"
    state = load_resume_state(out_dir / "last.pt", spec.to_dict(), params, fingerprint, resume)
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        stopper.load_state_dict(state["early_stopping"])
        ckpt.restore_rng_state(state["rng_state"])
        history, run_id = list(state["history"]), state.get("run_id")
        best_state, start_epoch = state.get("best_model_state"), int(state["epoch"]) + 1
        log.info("resuming %s at epoch %d", out_dir / "last.pt", start_epoch)
    net: nn.Module = ManyStepNet(model)
    if dist_info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=ids)

    tracker = None
    if track and main:
        from seqops.tracking import start_run

        tags = {"device": device.type, "dvc_stage": "train", "world_size": dist_info.world_size}
        tracker = start_run(params.model_dump(mode="json"), tags, resume_run_id=run_id)
        if history and not tracker.resumed:  # a new run for an old checkpoint: replay curves
            for row in history:
                tracker.log_metrics(row, step=int(row["epoch"]))
        run_id = tracker.run_id

    def checkpoint_state(epoch: int, row: dict[str, float]) -> dict[str, Any]:
        return {
            "model_state": model.state_dict(),
            "model_spec": spec.to_dict(),
            "params": params.model_dump(mode="json"),
            "epoch": epoch,
            "best_val_loss": stopper.best,
            "run_id": run_id,
            "data_fingerprint": fingerprint,
            "metrics": json_safe(row),
        }

    started = time.monotonic()
    try:
        epochs = range(start_epoch, cfg.epochs + 1)
        for epoch in tqdm(epochs, desc="epochs", disable=not (main and progress_enabled())):
            if stopper.should_stop:  # a resumed run that had already stopped
                reason = "early_stopping"
                break
            epoch_start = time.perf_counter()
            loader = _loader(train_ds, cfg, dist_info, device, epoch)
            row = {"epoch": epoch}
            row.update(
                train_one_epoch(
                    net, model, loader, optimizer, scheduler, cfg, device, f"epoch {epoch}"
                )
            )
            val_loss, found = math.nan, []
            if main:
                val_metrics, found = validate(model, val_ds, params, device)
                row.update(val_metrics)
                row["time/epoch_seconds"] = time.perf_counter() - epoch_start
                val_loss = row["val/loss"]
            val_loss, elapsed = broadcast_values(
                [val_loss, time.monotonic() - started], dist_info, device
            )
            improved = stopper.update(val_loss, epoch)
            if main:
                history.append(row)
                check_gradients({k: row[k] for k in ("grad/xy_head", "grad/done_head")}, epoch)
                if improved:
                    best_state = _cpu_state(model)
                    ckpt.save_checkpoint(out_dir / "best.pt", checkpoint_state(epoch, row))
                last = checkpoint_state(epoch, row)
                last.update(
                    optimizer_state=optimizer.state_dict(),
                    scheduler_state=scheduler.state_dict(),
                    early_stopping=stopper.state_dict(),
                    rng_state=ckpt.capture_rng_state(),
                    history=history,
                    best_model_state=best_state,
                )
                ckpt.save_checkpoint(out_dir / "last.pt", last)
                if plots_path:
                    write_plots_csv(plots_path, history)
                if tracker is not None:
                    tracker.log_metrics(row, step=epoch)
                    _log_pictures(tracker, model, val_ds, found, cfg, epoch, device)
                log.info(
                    "epoch %d: train/loss %.4f val/loss %.4f px_err_median %.2f count_mae %s %.1fs",
                    epoch, row["train/loss"], val_loss, row.get("val/px_err_median", math.nan),
                    row.get("val/count_mae"), row["time/epoch_seconds"],
                )  # fmt: skip
            if stopper.should_stop:
                reason = "early_stopping"
                break
            if cfg.max_minutes and elapsed >= cfg.max_minutes * 60:
                reason = "time_budget"
                log.info("train.max_minutes=%s reached after epoch %d", cfg.max_minutes, epoch)
                break
        if not main:
            return {}
        return _finish(params, out_dir, metrics_path, plots_path, history, stopper, reason,
                       best_state, tracker, checkpoint_state)  # fmt: skip
    except BaseException as exc:
        if tracker is not None:
            tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _finish(params, out_dir, metrics_path, plots_path, history, stopper, reason, best_state,
            tracker, checkpoint_state) -> dict[str, Any]:  # fmt: skip
    """Write the stage's outputs once training has stopped; close the MLflow run."""
    if not history:
        raise ValueError(f"{out_dir}: no epoch was trained (train.epochs={params.train.epochs})")
    best_path = out_dir / "best.pt"
    if not best_path.is_file() and best_state is not None:  # e.g. removed by `dvc repro`
        best_row = next(r for r in history if r["epoch"] == stopper.best_epoch)
        state = checkpoint_state(stopper.best_epoch, best_row)
        ckpt.save_checkpoint(best_path, {**state, "model_state": best_state})
    metrics = final_metrics(history, stopper.best_epoch)
    if metrics_path:
        atomic_write_json(metrics_path, metrics)
    if plots_path:
        write_plots_csv(plots_path, history)
    run_info = {
        "run_id": tracker.run_id if tracker else None,
        "experiment_id": tracker.experiment_id if tracker else None,
        "tracking_uri": tracker.tracking_uri if tracker else None,
        "best_epoch": stopper.best_epoch,
        "best_val_loss": stopper.best,
        "epochs_trained": len(history),
        "stopped_reason": reason,
    }
    atomic_write_json(out_dir / "train_run.json", run_info)
    log.info(
        "training stopped (%s); best epoch %d, val/loss %.4f",
        reason,
        stopper.best_epoch,
        stopper.best,
    )
    if tracker is not None:
        tracker.log_metrics(
            {"best/val_loss": stopper.best, "best/epoch": stopper.best_epoch}, step=0
        )
        tracker.set_tags({"best_epoch": stopper.best_epoch, "stopped_reason": reason})
        tracker.log_artifact(best_path, "checkpoint")
        for path in (metrics_path, plots_path):
            if path:
                tracker.log_artifact(path, "train")
        tracker.finish()
    return metrics
