"""The training losses: the research's spatial hinge, MSE, done BCE, heat-map cross-entropy.

Pure functions returning one value per example (``[B]``); the caller masks and reduces
(spatial, MSE and heat-map terms count only where ``done_target == 0``). Coordinates are
normalised to ``[-1, 1]`` as everywhere in seqops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SPATIAL_VARIANTS = ("research", "continuous")


def spatial_loss(
    pred_xy: Tensor, target_xy: Tensor, threshold: float = 0.1, variant: str = "research"
) -> Tensor:
    """The research's L1 hinge on ``dist = |dx| + |dy|`` (normalised units).

    ``research`` (the default, exactly as the research wrote it):
    ``dist^2 if dist < t else t*dist + t^2`` -- it jumps by ``t^2`` at ``dist = t``
    (``t^2`` just below, ``2 t^2`` just above) and its slope drops from ``2t`` to ``t``.
    ``continuous``: ``dist^2 if dist < t else 2*t*dist - t^2`` -- value and slope matched
    at ``t`` (Huber-like).

    Args:
        pred_xy, target_xy: ``[B, 2]``.
        threshold: ``t`` (0.1 = 19 px at 384).
        variant: ``"research"`` or ``"continuous"``.

    Returns:
        ``[B]`` per-example loss.
    """
    if variant not in SPATIAL_VARIANTS:
        raise ValueError(f"spatial_loss variant {variant!r}: expected one of {SPATIAL_VARIANTS}")
    if threshold <= 0:
        raise ValueError(f"spatial_loss threshold {threshold!r}: must be > 0")
    dist = (pred_xy - target_xy).abs().sum(dim=-1)
    t = threshold
    linear = t * dist + t * t if variant == "research" else 2.0 * t * dist - t * t
    return torch.where(dist < t, dist * dist, linear)


def mse_loss(pred_xy: Tensor, target_xy: Tensor) -> Tensor:
    """Mean squared error over ``(x, y)``, per example ``[B]`` (logged beside the hinge)."""
    return ((pred_xy - target_xy) ** 2).mean(dim=-1)


def done_loss(done_logit: Tensor, done_target: Tensor, pos_weight: float = 1.0) -> Tensor:
    """Binary cross-entropy with logits, per example ``[B]``.

    ``pos_weight`` scales the ``done = 1`` term against the class imbalance (most steps of a
    sequence have an object left).
    """
    weight = torch.as_tensor(pos_weight, dtype=done_logit.dtype, device=done_logit.device)
    return F.binary_cross_entropy_with_logits(
        done_logit, done_target.to(done_logit.dtype), pos_weight=weight, reduction="none"
    )


def render_heatmap_target(target_xy: Tensor, grid: int, sigma_cells: float) -> Tensor:
    """A normalised Gaussian on the grid's cell centres around each target, ``[B, g, g]``.

    Cell centres follow ``imaging.grid_centres`` (the model's coordinate buffer), so a
    target exactly between cells spreads evenly over them.
    """
    if sigma_cells <= 0:
        raise ValueError(f"heatmap sigma_cells {sigma_cells!r}: must be > 0")
    centres = (
        torch.arange(grid, dtype=target_xy.dtype, device=target_xy.device) + 0.5
    ) / grid * 2.0 - 1.0
    scale = sigma_cells * 2.0 / grid
    # Separable: log of a product of Gaussians in x and y, normalised by a softmax.
    log_gx = -0.5 * ((centres[None, :] - target_xy[:, :1]) / scale) ** 2  # [B, g]
    log_gy = -0.5 * ((centres[None, :] - target_xy[:, 1:]) / scale) ** 2
    log_g = log_gy[:, :, None] + log_gx[:, None, :]
    return torch.softmax(log_g.flatten(1), dim=1).view(-1, grid, grid)


def heatmap_loss(heat_logits: Tensor, target_xy: Tensor, sigma_cells: float) -> Tensor:
    """Cross-entropy of ``softmax(heat_logits)`` against a Gaussian at the target, ``[B]``.

    Minimal (equal to the target's entropy) when the softmax equals that Gaussian; it
    supervises the heat map itself, beside the soft-argmax's coordinate loss, so the
    distribution stays peaked on one object rather than averaging between several.
    """
    b, g, _ = heat_logits.shape
    target = render_heatmap_target(target_xy.to(heat_logits.dtype), g, sigma_cells)
    log_probs = torch.log_softmax(heat_logits.reshape(b, g * g), dim=1)
    return -(target.reshape(b, g * g) * log_probs).sum(dim=1)


def left_density(points: Tensor, unmarked: Tensor, grid: int, sigma_cells: float) -> Tensor:
    """The density of the objects still unmarked, ``[B, g, g]``: a unit-mass Gaussian on the
    grid per unmarked object, so the map sums to the number of objects left.

    Args:
        points: ``[B, Nmax, 2]`` every object of each step's image, normalised, padded.
        unmarked: ``[B, Nmax]`` bool, True for the real objects without a mark.
    """
    b, n, _ = points.shape
    if n == 0:
        return points.new_zeros(b, grid, grid)
    blobs = render_heatmap_target(points.reshape(b * n, 2), grid, sigma_cells).view(b, n, -1)
    weights = unmarked.to(blobs.dtype)[:, :, None]
    return (blobs * weights).sum(dim=1).view(b, grid, grid)


# A unit-mass Gaussian of sigma 1 cell has sum(D^2) = 1 / (4 pi) ~ 0.08: left alone, a map
# that spreads an object evenly costs 12x less than one object miscounted, and training
# learns the total but not where (measured: a flat map, max 0.03 per cell). Weighting the
# cells by 25 makes "where" count about twice "how many".
CELL_WEIGHT = 25.0


def count_loss(left_map: Tensor, density: Tensor) -> Tensor:
    """Per step ``[B]``: the map's squared error over the grid (weighted by
    :data:`CELL_WEIGHT`) plus the absolute error of its total, the number of objects left,
    so both where and how many are taught."""
    per_cell = ((left_map - density) ** 2).sum(dim=(1, 2))
    total = (left_map.sum(dim=(1, 2)) - density.sum(dim=(1, 2))).abs()
    return CELL_WEIGHT * per_cell + total


def nearest_unmarked_targets(pred_xy: Tensor, points: Tensor, valid: Tensor) -> Tensor:
    """The valid point nearest to each prediction (L1, the spatial loss's distance).

    Args:
        pred_xy: ``[B, 2]`` predictions.
        points: ``[B, Nmax, 2]`` candidate objects, padded.
        valid: ``[B, Nmax]`` bool, True for real, not yet marked objects.

    Returns:
        ``[B, 2]`` targets (no gradient). A row without any valid point (done) gets its own
        detached prediction, so its spatial loss is zero wherever the caller forgets to mask.
    """
    if points.shape[:2] != valid.shape or points.shape[0] != pred_xy.shape[0]:
        raise ValueError(
            f"nearest_unmarked_targets: points {list(points.shape)}, valid {list(valid.shape)} "
            f"and pred_xy {list(pred_xy.shape)} disagree"
        )
    pred = pred_xy.detach()
    if points.shape[1] == 0:  # no object in the whole batch
        return pred.clone()
    dist = (points - pred[:, None, :]).abs().sum(dim=-1)  # [B, Nmax]
    dist = dist.masked_fill(~valid, float("inf"))
    index = dist.argmin(dim=1)  # [B]
    nearest = points.gather(1, index[:, None, None].expand(-1, 1, 2)).squeeze(1)
    return torch.where(valid.any(dim=1, keepdim=True), nearest, pred).detach()


def extent_loss(log_radius: Tensor, target_log_radius: Tensor) -> Tensor:
    """Smooth L1 of the log object radius against its target, per example ``[B]``; zero
    (with a zero gradient, so every rank's graph is the same) where the target is NaN (an
    image without exemplar boxes to measure the objects by)."""
    known = torch.isfinite(target_log_radius)
    target = torch.where(known, target_log_radius, log_radius.detach())
    loss = F.smooth_l1_loss(log_radius, target.to(log_radius.dtype), reduction="none", beta=0.1)
    return torch.where(known, loss, torch.zeros_like(loss))
