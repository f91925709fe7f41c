"""Losses of a batch of steps, the per-epoch validation metrics, and their pictures.

The spatial, heat-map and MSE terms count only the steps with an object left
(``done = 0``); the done BCE counts every step. Validation adds the pixel error at model
input size (over ``done = 0`` steps), done accuracy/precision/recall/F1, and a full rollout
(the served loop, with the torch model) on a fixed subset of validation images. Both the done
scores and the rollout stop at ``evaluate.done_threshold``: the threshold the exported model
carries, so validation judges the done head as serving will use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from seqops.config import Params, TrainConfig
from seqops.data.sampling import sample_image_steps
from seqops.draw import draw_rollout, draw_step
from seqops.imaging import norm_to_pixels, normalize_pixels
from seqops.model import SeqCounter, StepOutput
from seqops.rollout import Rollout, run_rollouts
from seqops.scoring import done_scores
from seqops.training import losses
from seqops.training.data import StepDataset, collate_steps
from seqops.training.runtime import autocast, to_device, worker_context


@dataclass
class StepLosses:
    """Per-step values (``[BK]``) of one batch; ``live`` marks the steps with an object left."""

    spatial: Tensor
    heatmap: Tensor
    mse: Tensor
    done: Tensor
    count: Tensor  # the count head's loss (zeros without one)
    extent: Tensor  # the extent estimate's loss (zeros without mark_extent or a target)
    live: Tensor
    target_xy: Tensor  # the target each step was scored against (0 where done)


def compute_step_losses(out: StepOutput, batch: dict[str, Tensor], cfg: TrainConfig) -> StepLosses:
    """Per-step losses of a batch, in float32 (outside any autocast precision)."""
    xy = out.xy.float()
    done_target = batch["done"]
    live = done_target < 0.5
    if cfg.target == "nearest_unmarked":
        valid = batch["unmarked"] & live[:, None]
        target = losses.nearest_unmarked_targets(xy, batch["points"], valid)
    else:
        target = batch["target_xy"]
    # Done steps have no target; zeros keep their (masked) terms finite.
    target = torch.where(live[:, None], target, torch.zeros_like(target))
    count = torch.zeros_like(done_target)
    if out.left_map is not None:
        left = out.left_map.float()
        density = losses.left_density(
            batch["points"], batch["unmarked"], left.shape[-1], cfg.loss.heatmap_sigma
        )
        count = losses.count_loss(left, density)
    extent = torch.zeros_like(done_target)
    if out.log_radius is not None:
        extent = losses.extent_loss(out.log_radius.float(), batch["log_radius"])
    return StepLosses(
        spatial=losses.spatial_loss(xy, target, cfg.loss.threshold, cfg.loss.variant),
        heatmap=losses.heatmap_loss(out.heat_logits.float(), target, cfg.loss.heatmap_sigma),
        mse=losses.mse_loss(xy, target),
        done=losses.done_loss(out.done_logit.float(), done_target, cfg.loss.pos_weight),
        count=count,
        extent=extent,
        live=live,
        target_xy=target,
    )


def reduce_losses(step: StepLosses, cfg: TrainConfig) -> dict[str, Tensor]:
    """Batch means: ``loss = spatial + w_heatmap * heatmap + w_done * done + w_count * count
    + w_extent * extent`` (spatial, heat map and MSE over the steps with an object left; done,
    count and extent over all: at a done step the count head must say that nothing is left)."""
    weight = step.live.float()
    live_steps = weight.sum().clamp_min(1.0)
    spatial = (step.spatial * weight).sum() / live_steps
    heatmap = (step.heatmap * weight).sum() / live_steps
    mse = (step.mse * weight).sum() / live_steps
    done = step.done.mean()
    count = step.count.mean()
    return loss_terms(cfg, spatial, heatmap, done, count, mse, step.extent.mean())


def loss_terms(cfg: TrainConfig, spatial, heatmap, done, count, mse, extent) -> dict[str, Any]:
    """The logged terms and their weighted sum ``loss`` (tensors in training, floats in
    validation): the one place the terms are weighted."""
    w = cfg.loss
    return {
        "loss": spatial
        + w.w_heatmap * heatmap
        + w.w_done * done
        + w.w_count * count
        + w.w_extent * extent,
        "loss_spatial": spatial,
        "loss_done": done,
        "loss_heatmap": heatmap,
        "loss_count": count,
        "loss_extent": extent,
        "mse": mse,
    }


def score_done(
    done_prob: np.ndarray, done_target: np.ndarray, threshold: float
) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of ``done_prob > threshold`` (0 where undefined)."""
    pred = np.asarray(done_prob) > threshold
    truth = np.asarray(done_target) > 0.5  # targets are 0 or 1
    return {
        "done_acc": float(np.mean(pred == truth)) if len(pred) else 0.0,
        **done_scores(done_prob, done_target, threshold, undefined=0.0),
    }


class ValAccumulator:
    """Sums over the validation steps; :meth:`result` gives the ``val/...`` metrics."""

    def __init__(self, cfg: TrainConfig, image_size: int, done_threshold: float) -> None:
        self.cfg, self.image_size, self.done_threshold = cfg, image_size, done_threshold
        self.sums = dict.fromkeys(("spatial", "heatmap", "mse", "done", "count", "extent"), 0.0)
        self.live = 0
        self.steps = 0
        self.px_err: list[np.ndarray] = []
        self.done_prob: list[np.ndarray] = []
        self.done_target: list[np.ndarray] = []

    def update(self, out: StepOutput, step: StepLosses, done_target: Tensor) -> None:
        live = step.live
        for name in ("spatial", "heatmap", "mse"):
            self.sums[name] += float(getattr(step, name)[live].sum())
        self.sums["done"] += float(step.done.sum())
        self.sums["count"] += float(step.count.sum())
        self.sums["extent"] += float(step.extent.sum())
        self.live += int(live.sum())
        self.steps += len(live)
        # Euclidean error at model input size: normalised units * S/2 pixels.
        err = (out.xy.float()[live] - step.target_xy[live]).norm(dim=1) * (self.image_size / 2)
        self.px_err.append(err.cpu().numpy())
        self.done_prob.append(torch.sigmoid(out.done_logit.float()).cpu().numpy())
        self.done_target.append(done_target.cpu().numpy())

    def result(self) -> dict[str, float]:
        live, steps = max(self.live, 1), max(self.steps, 1)
        spatial = self.sums["spatial"] / live
        heatmap = self.sums["heatmap"] / live
        done, count = self.sums["done"] / steps, self.sums["count"] / steps
        mse, extent = self.sums["mse"] / live, self.sums["extent"] / steps
        metrics = loss_terms(self.cfg, spatial, heatmap, done, count, mse, extent)
        err = np.concatenate(self.px_err) if self.px_err else np.zeros(0)
        if len(err):
            metrics["px_err_mean"] = float(err.mean())
            metrics["px_err_median"] = float(np.median(err))
            metrics["px_err_p90"] = float(np.percentile(err, 90))
        done_prob, done_target = np.concatenate(self.done_prob), np.concatenate(self.done_target)
        metrics.update(score_done(done_prob, done_target, self.done_threshold))
        return metrics


@torch.no_grad()
def rollout(
    model: SeqCounter,
    pixels: np.ndarray,
    exemplar_masks: np.ndarray | None,
    max_steps: int,
    device: torch.device,
    threshold: float,
) -> list[np.ndarray]:
    """The served loop (``seqops.rollout``) with the torch model: encode once, step until
    ``done > threshold``.

    Args:
        pixels: uint8 ``[R, S, S, 3]`` images at model size.
        exemplar_masks: ``[R, 1, g, g]`` or ``None``.
        max_steps: at most this many objects per image (a loop that never stops ends here).
        threshold: the done threshold the exported model will carry.

    Returns:
        Per image, the found objects ``[n, 2]`` in normalised coordinates, in order.
    """
    spec = model.spec
    images = torch.from_numpy(normalize_pixels(pixels, spec.mean, spec.std)).to(device)
    masks = None if exemplar_masks is None else torch.from_numpy(exemplar_masks).to(device)
    features, log_radius = model.encode_extent(images, masks)
    sigmas = model.mark_sigmas(log_radius, len(pixels)).cpu().numpy()

    # The features of the images still running, compacted only when one stops: the active
    # set shrinks a few times per batch, and copying the features at every step cost as much
    # as the step itself.
    held = {"ids": np.arange(len(pixels)), "features": features}

    def step(active: np.ndarray, marks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not np.array_equal(active, held["ids"]):  # an ordered subset of the held ids
            rows = torch.from_numpy(np.searchsorted(held["ids"], active)).to(device)
            held.update(ids=active, features=held["features"].index_select(0, rows))
        out = model.step(held["features"], torch.from_numpy(marks).to(device))
        return out.xy.float().cpu().numpy(), torch.sigmoid(out.done_logit.float()).cpu().numpy()

    rollouts = [Rollout.start(spec.grid, float(sigma)) for sigma in sigmas]
    run_rollouts(rollouts, step, threshold, max_steps)
    return [np.asarray(r.points_norm, np.float32).reshape(-1, 2) for r in rollouts]


def score_counts(found: Iterable[np.ndarray], true_counts: Iterable[int]) -> dict[str, float]:
    """``count_mae`` and ``count_exact`` (share of images counted exactly)."""
    pred = np.asarray([len(f) for f in found], np.float64)
    truth = np.asarray(list(true_counts), np.float64)
    if len(truth) == 0:
        return {}
    return {
        "count_mae": float(np.abs(pred - truth).mean()),
        "count_exact": float(np.mean(pred == truth)),
    }


@torch.no_grad()
def validate(
    model: SeqCounter,
    val_ds: StepDataset,
    params: Params,
    device: torch.device,
) -> tuple[dict[str, float], list[np.ndarray]]:
    """``val/...`` metrics on the deterministic validation steps, plus a rollout.

    Returns:
        ``(metrics, found)``: ``found`` holds the rollout's objects per rolled-out image.
    """
    cfg = params.train
    model.eval()
    loader = DataLoader(
        val_ds,
        batch_size=cfg.batch_size,
        collate_fn=collate_steps,
        num_workers=cfg.num_workers,
        multiprocessing_context=worker_context(cfg.num_workers),
    )
    threshold = params.evaluate.done_threshold
    acc = ValAccumulator(cfg, val_ds.image_size, threshold)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device):
            features, log_radius = model.encode_extent(batch["images"], batch.get("exemplar_mask"))
            out = model.step(features.index_select(0, batch["step_image"]), batch["marks"])
            if log_radius is not None:
                out = out._replace(log_radius=log_radius.index_select(0, batch["step_image"]))
        acc.update(out, compute_step_losses(out, batch, cfg), batch["done"])
    metrics = {f"val/{k}": v for k, v in acc.result().items()}
    count = min(cfg.rollout_images, len(val_ds))
    found: list[np.ndarray] = []
    if count:
        masks = (
            np.stack([val_ds.exemplar_mask(i) for i in range(count)]) if val_ds.exemplars else None
        )
        max_steps = 2 * max(
            params.prepare.max_objects, *(r.num_objects for r in val_ds.records[:count])
        )
        found = rollout(model, val_ds.pixels[:count], masks, max_steps, device, threshold)
        scores = score_counts(found, (r.num_objects for r in val_ds.records[:count]))
        metrics.update({f"val/{k}": v for k, v in scores.items()})
    return metrics, found


def picture_k(sample: int, count: int, num_objects: int) -> int:
    """The step drawn for picture ``sample`` of ``count``: spread over ``[0, N]``, the last at
    ``k = N`` (the done example)."""
    if count > 1 and sample == count - 1:
        return num_objects
    return min(num_objects, (sample * (num_objects + 1)) // max(count, 1))


@torch.no_grad()
def draw_val_pictures(
    model: SeqCounter, val_ds: StepDataset, count: int, device: torch.device
) -> list[Image.Image]:
    """The research's step pictures for the first ``count`` validation images (fixed steps)."""
    model.eval()
    spec, size = model.spec, val_ds.image_size
    pictures = []
    for i in range(min(count, len(val_ds))):
        record = val_ds.records[i]
        k = picture_k(i, count, record.num_objects)
        steps = sample_image_steps(
            record.points_array(),
            np.random.default_rng(i),
            image_size=size,
            sampling=val_ds.sampling,
            grid=spec.grid,
            mark_sigma=val_ds.image_mark_sigma(i),
            ks=np.array([k]),
            shuffle=val_ds.shuffle,
        )
        pixels = normalize_pixels(val_ds.pixels[i], spec.mean, spec.std)
        image = torch.from_numpy(pixels)[None].to(device)
        mask = None
        if val_ds.exemplars:
            mask = torch.from_numpy(val_ds.exemplar_mask(i))[None].to(device)
        out = model.step(
            model.encode(image, mask), torch.from_numpy(steps.marks[:, None]).to(device)
        )
        gt = record.points_array()[k] if k < record.num_objects else None
        pictures.append(
            draw_step(
                val_ds.pixels[i],
                norm_to_pixels(steps.mark_points[0], size),
                norm_to_pixels(out.xy.float().cpu().numpy(), size)[0],
                float(torch.sigmoid(out.done_logit.float())[0]),
                gt_xy_px=gt,
                gt_done=float(steps.done[0]),
            )
        )
    return pictures


def draw_rollout_pictures(
    val_ds: StepDataset, found: list[np.ndarray], count: int
) -> list[Image.Image]:
    """Full rollouts of the first ``count`` rolled-out validation images."""
    size = val_ds.image_size
    return [
        draw_rollout(
            val_ds.pixels[i], norm_to_pixels(found[i], size), val_ds.records[i].points_array()
        )
        for i in range(min(count, len(found)))
    ]
