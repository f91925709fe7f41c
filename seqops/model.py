"""The next-object network: encode an image once, then step cheaply once per object.

``SeqCounter.encode`` is the heavy part: a small encoder-decoder (U-Net-like, down to
stride 32 with a global-context branch, back up to the feature grid at ``spec.stride``)
over the RGB image plus two coordinate channels (CoordConv). With exemplars, a prototype
of the exemplified kind is pooled from the features under the exemplar mask and the
features are conditioned on it (a cosine-similarity map and FiLM).

``SeqCounter.step`` is light: a few convolutions at grid resolution over the features and
the marks map (objects already found, rendered by ``imaging.render_marks``). The step's
first layer is linear, so its image part (features and coordinate channels) is computed
once in ``encode`` and a step only adds the marks' term. It gives heat-map logits, a
spatial softmax and a soft-argmax (integral regression: sub-cell precise ``(x, y)``) over
a small window around the peak (with ``order_prior="scan"`` each cell's logit is first
lowered by the unmarked-object mass before it in the canonical order, a cumulative sum
over the cells in rank order), and a done logit from avg+max pooled activations (max
pooling lets it see "an unmarked object is left anywhere").

Everything exports with ``torch.onnx.export``: no data-dependent Python control flow in
``encode``/``step``; the soft-argmax is a softmax, an argmax and a coordinate buffer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqops import imaging
from seqops.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_backbone,
    freeze_stages,
    keep_frozen_norms_eval,
)
from seqops.data.ordering import ORDERS, order_indices

if TYPE_CHECKING:
    from seqops.config import Params

HEADS = ("heatmap", "pooled")
# How the step knows which unmarked object comes next in the canonical order.
# "none": only from the coordinate channels, through a 7-cell receptive field: a linear
# position prior, which cannot express reading order's row bands (it picks *an* unmarked
# object: ~95 px median error against the ordered target after 5 epochs).
# "scan" (the default): a learned map of unmarked-object mass is summed along the order (a
# cumulative sum over the cells in rank order) and each cell's logit is lowered by the mass
# before it, so the first unmarked object in the order wins. Tiny preset, 12 epochs, scenes
# without distractors, test split through the ONNX predictor: 72% exact counts (MAE 0.60)
# with "scan" against 57% (MAE 6.42) with "none" (README, "What training reaches").
ORDER_PRIORS = ("none", "scan")
# Initial bias of the scan's objectness (sigmoid): background cells add little at the start.
_SCAN_PRIOR_LOGIT = -6.0

# Named sizes. MACs per encoding at 384 (benchmarks/bench_model.py): tiny 0.11 G, base
# 0.76 G (1.5 GFLOPs); a step costs 9.8% / 5.6% of that.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "stride": 8,
        "mark_sigma": 1.0,
        "widths": (8, 16, 24, 32, 48),
        "depths": (0, 1, 1, 1, 1),
        "decoder_channels": 24,
        "step_channels": 16,
        "peak_window": 2,
    },
    "base": {
        "stride": 8,
        "mark_sigma": 1.0,
        "widths": (16, 32, 64, 96, 128),
        "depths": (0, 1, 2, 2, 2),
        "decoder_channels": 64,
        "step_channels": 32,
        "peak_window": 2,
    },
}

# Initial done probability ~0.12: most training steps have an object left (done = 0).
_DONE_PRIOR_LOGIT = -2.0
# softplus(-4) ~ 0.018 per cell: the count map starts near empty, not at ~0.7 per cell.
_LEFT_PRIOR = -4.0
# log(density + floor): a cell the density calls empty lowers the heat by log(1e-3) ~ -7,
# not by -inf, so the heat map can still point where the density missed an object.
_COUNT_PRIOR_FLOOR = 1e-3
# The extent head starts at objects of ~2 cells' radius (16 px at stride 8), the synthetic
# scenes' median.
_EXTENT_PRIOR_LOG = math.log(2.0)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network; JSON-able via :meth:`to_dict`.

    ``widths[i]`` is the encoder width at stride ``2 ** (i + 1)``; ``depths[i]`` the number
    of residual 3x3 blocks after that level's stride-2 convolution; ``decoder_channels`` the
    width of the top-down decoder; ``step_channels`` the width of the step, which is also
    the channel count of the features ``encode`` returns.
    """

    preset: str
    image_size: int
    exemplars: bool
    stride: int
    mark_sigma: float
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    decoder_channels: int
    step_channels: int
    head: str = "heatmap"  # "heatmap" (soft-argmax) | "pooled" (the research's MLP on a pool)
    # Half-width (cells) of the window around the heat map's peak the soft-argmax averages
    # over; 0: the whole grid. A window keeps a two-peaked map from answering between them.
    peak_window: int = 0
    # Defaults of the fields added later: a spec saved before them loads as it was built.
    order_prior: str = "none"  # one of ORDER_PRIORS
    order: str = "reading_order"  # prepare.order (the order the scan follows)
    row_height: float = 50.0  # prepare.row_height, px at image_size
    # A map of the objects still unmarked (trained against their density), whose sum the
    # done head sees: done should not fire while the map says objects are left.
    count_head: bool = False
    # With the count head: its density is added (as a log) to the heat map's logits, so the
    # next point lands where the density sees an unmarked object (a detector's recall in
    # clusters, the step choosing among its proposals in order).
    count_prior: bool = False
    # The done head also sees the largest logit of the scan's unmarked-object map: "is any
    # object left anywhere", which does not depend on how many there were (the pooled means
    # alone learnt the training counts' range and fired at ~50 on scenes of 100).
    done_peak: bool = False
    # "seqops" (the encoder above, from scratch, over RGB + coordinates) or an ImageNet
    # architecture of seqops.backbones (stride 8 only; widths/depths then unused).
    backbone: str = "seqops"
    # 0: every mark has radius ``mark_sigma``. > 0: marks follow the object's extent: the
    # encoder also estimates the objects' radius (trained on the exemplar boxes' size) and
    # each image's marks get this share of it (``imaging.extent_mark_sigma``), so a mark
    # covers its own object, large or small, and not the neighbour it touches.
    mark_extent: float = 0.0

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"ModelSpec.{field}={getattr(self, field)!r}: {why}")

        if len(self.widths) < 2 or any(w < 1 for w in self.widths):
            fail("widths", "need at least two positive widths")
        if len(self.depths) != len(self.widths) or any(d < 0 for d in self.depths):
            fail("depths", f"need {len(self.widths)} non-negative depths, one per width")
        max_stride = 2 ** len(self.widths)
        if self.stride not in [2**i for i in range(1, len(self.widths) + 1)]:
            fail("stride", f"must be a power of two between 2 and {max_stride}")
        # At least 2x2 cells at the deepest level: BatchNorm in training needs > 1 value.
        if self.image_size < 2 * max_stride or self.image_size % max_stride:
            fail("image_size", f"must be a multiple of the deepest stride {max_stride}, >= 2x")
        if self.mark_sigma <= 0:
            fail("mark_sigma", "must be > 0")
        if self.mark_extent < 0:
            fail("mark_extent", "must be >= 0 (0: marks of a fixed mark_sigma)")
        if self.decoder_channels < 1:
            fail("decoder_channels", "must be >= 1")
        if self.step_channels < 1:
            fail("step_channels", "must be >= 1")
        if self.peak_window < 0:
            fail("peak_window", "must be >= 0 (0: the whole grid)")
        if self.head not in HEADS:
            fail("head", f"must be one of {HEADS}")
        if self.count_prior and not self.count_head:
            fail("count_prior", "needs count_head (the density it adds to the heat map)")
        if self.done_peak and self.order_prior != "scan":
            fail("done_peak", "needs order_prior='scan' (the unmarked-object map it reads)")
        if self.order_prior not in ORDER_PRIORS:
            fail("order_prior", f"must be one of {ORDER_PRIORS}")
        if self.order not in ORDERS:
            fail("order", f"must be one of {ORDERS}")
        if self.row_height <= 0:
            fail("row_height", "must be > 0")
        if self.order_prior == "scan" and self.order == "nearest_neighbor":
            fail("order_prior", "needs a positional order, not nearest_neighbor (use 'none')")
        if self.backbone != "seqops":
            if self.backbone not in BACKBONES:
                fail("backbone", f"must be 'seqops' or one of {sorted(BACKBONES)}")
            if self.stride != 8:
                fail("stride", f"must be 8 with backbone {self.backbone} (its neck ends there)")
            if self.image_size < 64 or self.image_size % 32:
                fail("image_size", f"must be a multiple of 32, >= 64, with {self.backbone}")

    @property
    def grid(self) -> int:
        """Side of the square feature grid (``image_size // stride``)."""
        return self.image_size // self.stride

    @property
    def feature_channels(self) -> int:
        """Channels of the features ``encode`` returns (the step's width)."""
        return self.step_channels

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel pixel mean of the input normalisation (the backbone's training)."""
        return imaging.MEAN if self.backbone == "seqops" else IMAGENET_MEAN

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel pixel std of the input normalisation."""
        return imaging.STD if self.backbone == "seqops" else IMAGENET_STD

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        """Rebuild from :meth:`to_dict` output; unknown keys are errors, missing keys with
        a default (fields added later, e.g. ``order_prior``) take it, other missing keys
        are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model spec: unknown keys {unknown} (known: {sorted(known)})")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(f"model spec: {exc}") from None

    @classmethod
    def from_preset(
        cls, preset: str, image_size: int, exemplars: bool, **overrides: Any
    ) -> ModelSpec:
        """A named preset at ``image_size``; ``overrides`` replace preset fields (e.g. head).

        An override of None keeps the preset's value (``model.stride: null`` in params.yaml).
        """
        if preset not in PRESETS:
            raise ValueError(f"model preset {preset!r}: unknown (known: {sorted(PRESETS)})")
        fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(preset=preset, image_size=image_size, exemplars=exemplars, **fields)


def spec_from_params(params: Params) -> ModelSpec:
    """The spec of ``params.model`` at ``params.prepare.image_size``."""
    model = params.model
    if model.order_prior == "scan" and params.prepare.order == "nearest_neighbor":
        raise ValueError(
            "model.order_prior=scan needs a positional prepare.order (reading_order, "
            "left_to_right), got nearest_neighbor: set model.order_prior=none"
        )
    return ModelSpec.from_preset(
        model.preset,
        image_size=params.prepare.image_size,
        exemplars=model.exemplars,
        head=model.head,
        # None (params.yaml's null) keeps the preset's value: from_preset drops None overrides.
        stride=model.stride,
        peak_window=model.peak_window,
        mark_sigma=model.mark_sigma,
        order_prior=model.order_prior,
        count_head=model.count_head,
        count_prior=model.count_prior,
        done_peak=model.done_peak,
        backbone=model.backbone,
        mark_extent=model.mark_extent,
        order=params.prepare.order,
        row_height=params.prepare.row_height,
    )


class StepOutput(NamedTuple):
    """One step's prediction."""

    xy: Tensor  # [B, 2] normalised (x, y) in [-1, 1]
    done_logit: Tensor  # [B]
    heat_logits: Tensor  # [B, grid, grid]
    left_map: Tensor | None = None  # [B, grid, grid] unmarked-object density (count_head)
    # [B] log of the objects' radius (grid cells) in each step's image (mark_extent > 0);
    # training attaches it to score the encoder's extent estimate with the steps.
    log_radius: Tensor | None = None


def make_coord_grid(grid: int) -> Tensor:
    """``[2, grid, grid]``: normalised x and y of cell centres (``imaging.grid_centres``)."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2.0 - 1.0
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs, ys])


def make_rank_map(grid: int, stride: int, order: str, row_height: float) -> Tensor:
    """``[1, grid, grid]``: each cell centre's rank under ``order``, scaled to [-1, 1].

    The same ordering code as the training targets (``seqops.data.ordering``), on the cell
    centres in model pixels. ``nearest_neighbor`` depends on the objects, not on a
    position, so its map is all zeros.
    """
    if order == "nearest_neighbor" or grid < 2:
        return torch.zeros(1, grid, grid)
    centres = (np.arange(grid) + 0.5) * stride
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    points = np.stack([xs.ravel(), ys.ravel()], axis=1)
    rank = np.empty(grid * grid, np.float32)
    rank[order_indices(points, order, row_height)] = np.arange(grid * grid, dtype=np.float32)
    rank = rank / (grid * grid - 1) * 2.0 - 1.0
    return torch.from_numpy(rank.reshape(1, grid, grid))


def soft_argmax(heat_logits: Tensor, coords: Tensor, window: int = 0) -> Tensor:
    """Expected ``(x, y)`` under ``softmax(heat_logits)`` over the grid (integral regression).

    Args:
        heat_logits: ``[B, g, g]``.
        coords: ``[2, g, g]`` from :func:`make_coord_grid`.
        window: 0: expectation over the whole grid. ``w > 0``: only over the
            ``(2w + 1)^2`` cells around the most probable cell, renormalised, so that a map
            with two peaks answers at one of them rather than between them.

    Returns:
        ``[B, 2]``; sub-cell precise for a peak spread over neighbouring cells.
    """
    probs = torch.softmax(heat_logits.flatten(1), dim=1)  # [B, g*g]
    points = coords.flatten(1).t()  # [g*g, 2]
    if window <= 0:
        return probs @ points
    grid = heat_logits.shape[-1]
    peak = points[probs.argmax(dim=1)]  # [B, 2]; argmax, gather: exportable, no gradient
    # Chebyshev distance in cells from the peak (cells are 2 / grid apart); half a cell of
    # slack against rounding.
    cells = (points[None] - peak[:, None]).abs().amax(dim=-1) * (grid / 2.0)  # [B, g*g]
    local = probs * (cells <= window + 0.5).to(probs.dtype)
    return (local @ points) / local.sum(dim=1, keepdim=True)


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ResBlock(nn.Module):
    """``x + bn(conv(x))`` then ReLU: one 3x3 conv per block, cheap and easy to train."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            channels, channels, 3, padding=dilation, dilation=dilation, bias=False
        )
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn(self.conv(x)))


class _Encoder(nn.Module):
    """A feature pyramid -> top-down decoder to the grid -> exemplar conditioning -> head.

    The pyramid is the seqops encoder (CoordConv input, stride-2 levels down to ``2 ** L``)
    or, with ``spec.backbone``, an ImageNet backbone's stride-8/16/32 maps over plain RGB
    (``self.backbone``; its decoder is the light neck fusing the three levels). Everything
    from the decoder on is shared, so the step and the exported graphs do not change.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        c = spec.decoder_channels
        if spec.backbone == "seqops":
            widths = spec.widths
            self.register_buffer("coords_in", make_coord_grid(spec.image_size), persistent=False)
            levels, cin = [], 5  # RGB + (x, y)
            for width, depth in zip(widths, spec.depths, strict=True):
                blocks = [_conv_bn(cin, width, stride=2)]
                blocks += [_ResBlock(width) for _ in range(depth)]
                levels.append(nn.Sequential(*blocks))
                cin = width
            self.levels = nn.ModuleList(levels)
            # Decoder levels: from the deepest up to the grid's stride (its index in levels).
            self.out_level = int(math.log2(spec.stride)) - 1
        else:
            self.backbone = build_backbone(spec.backbone)
            widths, self.out_level = self.backbone.channels, 0  # strides 8, 16, 32
        # Global context at the deepest level (image pooling): counting and done need the
        # whole image; no norm here, so it works for one image in training mode.
        self.context = nn.Sequential(nn.Conv2d(widths[-1], c, 1), nn.ReLU(inplace=True))
        self.lateral = nn.ModuleList(
            nn.Conv2d(widths[i], c, 1) for i in range(self.out_level, len(widths))
        )
        self.smooth = nn.ModuleList(_conv_bn(c, c) for _ in range(self.out_level, len(widths) - 1))
        if spec.exemplars:
            self.film = nn.Linear(c, 2 * c)
            nn.init.zeros_(self.film.weight)  # identity conditioning at the start
            nn.init.zeros_(self.film.bias)
            self.fuse = _conv_bn(c + 1, c)
        self.head = _conv_bn(c, c)
        # The step's first layer is linear in (features, coordinates, marks); the image-only
        # part is computed here, once per image, so a step only adds the marks' term.
        self.project = nn.Sequential(
            nn.Conv2d(c + 2, spec.step_channels, 1, bias=False), nn.BatchNorm2d(spec.step_channels)
        )
        self.register_buffer("coords_grid", make_coord_grid(spec.grid), persistent=False)
        if spec.mark_extent > 0:
            # The objects' radius from the pooled head features: one number per image (the
            # objects counted are of one kind, about one size).
            self.extent = nn.Linear(2 * c, 1)
            nn.init.zeros_(self.extent.weight)
            nn.init.constant_(self.extent.bias, _EXTENT_PRIOR_LOG)

    def forward(self, images: Tensor, exemplar_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Features ``[B, C, g, g]`` and, with ``mark_extent``, the log object radius ``[B]``
        (grid cells), else None."""
        b = images.shape[0]
        skips = self._pyramid(images)
        top = skips[-1]
        p = self.lateral[-1](top) + self.context(top.mean(dim=(2, 3), keepdim=True))
        for j in range(len(skips) - 2, -1, -1):
            p = F.interpolate(p, scale_factor=2.0, mode="nearest") + self.lateral[j](skips[j])
            p = self.smooth[j](p)
        if exemplar_mask is not None:
            p = self._condition(p, exemplar_mask)
        coords = self.coords_grid.unsqueeze(0).expand(b, -1, -1, -1)
        h = self.head(p)
        features = self.project(torch.cat([h, coords], dim=1))
        if self.spec.mark_extent <= 0:
            return features, None
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return features, self.extent(pooled).squeeze(1)

    def _pyramid(self, images: Tensor) -> list[Tensor]:
        """The feature maps from the grid's stride down to the deepest, finest first."""
        if self.spec.backbone != "seqops":
            return list(self.backbone(images))
        b = images.shape[0]
        x = torch.cat([images, self.coords_in.unsqueeze(0).expand(b, -1, -1, -1)], dim=1)
        skips = []
        for level in self.levels:
            x = level(x)
            skips.append(x)
        return skips[self.out_level :]

    def _condition(self, p: Tensor, mask: Tensor) -> Tensor:
        """Condition on the prototype pooled under the exemplar mask (cosine map + FiLM)."""
        # Masked average pooling; the clamp guards images without exemplar cells (proto = 0).
        area = mask.sum(dim=(2, 3)).clamp_min(1e-6)  # [B, 1]
        proto = (p * mask).sum(dim=(2, 3)) / area  # [B, C]
        similarity = (F.normalize(p, dim=1) * F.normalize(proto, dim=1)[:, :, None, None]).sum(
            dim=1, keepdim=True
        )
        gamma, beta = self.film(proto).chunk(2, dim=1)
        p = p * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return self.fuse(torch.cat([p, similarity], dim=1))


class _Step(nn.Module):
    """Features (already holding the coordinates) + marks -> heat logits, (x, y), done.

    After the convolutions the step treats the cells as a sequence, ``[B, 1, g*g]``, in its
    cell order: the scan's rank order with ``order_prior="scan"`` (the cells are permuted
    once; the cumulative sum, the soft-argmax and its window then run in that order, over
    cell centres permuted alike), row-major otherwise. Only ``heat_logits`` and
    ``left_map`` go back to the grid; the exported graph returns (x, y) and done, so
    that part drops out of it. At batch 1 a step costs per operator more than per
    multiply-add, so the code keeps the exported graph's node count low.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        s = spec.step_channels
        self.grid = spec.grid
        self.head_kind = spec.head
        self.peak_window = spec.peak_window
        # The marks' term of the first layer (the rest came normalised from the encoder, so
        # BatchNorm never sees the marks' distribution, which differs in training and use).
        self.mark_in = nn.Conv2d(1, s, 1, bias=False)
        # Receptive field 1 + 2 + 4 = 7 cells: a mark's blob suppresses its own object and
        # the neighbourhood is seen; the order's global part comes from the scan.
        self.blocks = nn.Sequential(_ResBlock(s), _ResBlock(s, dilation=2))
        self.heat = nn.Conv2d(s, 1, 1)
        nn.init.normal_(self.heat.weight, std=1e-3)  # near-uniform heat map at the start
        nn.init.zeros_(self.heat.bias)
        # The receptive field is local, so the order's global structure (rows, then x)
        # comes from a scan along the order over the whole grid (see ORDER_PRIORS).
        self.order_prior = spec.order_prior
        order = torch.arange(spec.grid**2)
        if spec.order_prior == "scan":
            rank = make_rank_map(spec.grid, spec.stride, spec.order, spec.row_height)
            # Cells in rank order (a gather), and back to the grid (the inverse permutation).
            order = rank.flatten().argsort()
            self.register_buffer("scan_order", order, persistent=False)
            self.register_buffer("scan_inverse", order.argsort(), persistent=False)
            self.objects = nn.Conv2d(s, 1, 1)
            nn.init.normal_(self.objects.weight, std=1e-3)
            nn.init.constant_(self.objects.bias, _SCAN_PRIOR_LOGIT)
            self.scan_weight = nn.Parameter(torch.ones(()))
        # The soft-argmax's coordinates: the cell centres, [g*g, 2], in the cell order.
        cell_xy = make_coord_grid(spec.grid).flatten(1).t()[order].contiguous()
        self.register_buffer("cell_xy", cell_xy, persistent=False)
        self.count_head, self.count_prior = spec.count_head, spec.count_prior
        if spec.count_head:
            self.left = nn.Conv2d(s, 1, 1)
            nn.init.normal_(self.left.weight, std=1e-3)
            nn.init.constant_(self.left.bias, _LEFT_PRIOR)
        self.done_peak = spec.done_peak
        pooled_width = 2 * s + int(spec.count_head) + int(spec.done_peak)
        self.done = nn.Sequential(
            nn.Linear(pooled_width, s), nn.ReLU(inplace=True), nn.Linear(s, 1)
        )
        nn.init.constant_(self.done[-1].bias, _DONE_PRIOR_LOGIT)
        if spec.head == "pooled":
            # The research's head: a global pool, an MLP, tanh -> (x, y). For the measurement.
            self.xy_mlp = nn.Sequential(
                nn.Linear(2 * s, 2 * s), nn.ReLU(inplace=True), nn.Linear(2 * s, 2), nn.Tanh()
            )

    def forward(self, features: Tensor, marks: Tensor) -> StepOutput:
        exporting = _is_exporting()  # ~7 us a call in eager torch: once per step
        if exporting:
            # An identity, in the graph only: it takes the features into onnxruntime's
            # blocked (NCHWc) layout, so the adds and ReLUs below fuse into the convolutions
            # (without it they run apart, between layout conversions: ~7% of a step).
            features = F.max_pool2d(features, 1)
        h = self.blocks(F.relu(features + self.mark_in(marks)))
        pooled = self._pool(h, exporting)
        maps = self._maps(h)  # [B, k, g*g] row-major
        # One permutation for all maps: GatherElements (its index expanded to the batch) is
        # a plain loop in onnxruntime, Gather a copy call per cell (and in torch, gather on
        # the last axis of [B, k, n] is ~20x faster than index_select).
        cells = (
            maps.gather(2, self.scan_order.expand_as(maps)) if self.order_prior == "scan" else maps
        )
        heat, *rest = cells.split(1, dim=1)  # [B, 1, g*g] each, in the cell order
        done_in, left_map = pooled, None
        if self.order_prior == "scan":
            object_logits = rest.pop(0)
            heat = heat - self.scan_weight * self._mass_before(object_logits)
            if self.done_peak:
                done_in = torch.cat([done_in, object_logits.amax(dim=2)], dim=1)
        if self.count_head:
            left = F.softplus(rest.pop(0))
            done_in = torch.cat([done_in, torch.log1p(left.sum(dim=2))], dim=1)
            if self.count_prior:
                heat = heat + torch.log(left + _COUNT_PRIOR_FLOOR)
            left_map = self._to_grid(left)  # the softplus above, back on the grid
        done_logit = self.done(done_in).squeeze(1)
        xy = self.xy_mlp(pooled) if self.head_kind == "pooled" else self._soft_argmax(heat)
        return StepOutput(
            xy=xy, done_logit=done_logit, heat_logits=self._to_grid(heat), left_map=left_map
        )

    def _pool(self, h: Tensor, exporting: bool) -> Tensor:
        """``[B, 2C]``: the mean and the max of ``h`` over the grid. In the graph as pooling
        windows over the whole grid (the same values), which onnxruntime runs in the
        convolutions' blocked layout; in torch a 48-cell max-pool window is ~5x slower than
        ``amax``."""
        if exporting:
            return torch.cat([F.avg_pool2d(h, self.grid), F.max_pool2d(h, self.grid)], 1).flatten(1)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def _maps(self, h: Tensor) -> Tensor:
        """``[B, k, g*g]``: the 1x1 one-channel heads (heat, then objects and left when
        present) as one matrix product; the weights are concatenated here, so each head
        keeps its parameters (and checkpoints their names)."""
        convs = [self.heat]
        convs += [self.objects] if self.order_prior == "scan" else []
        convs += [self.left] if self.count_head else []
        weight = torch.cat([conv.weight.flatten(1) for conv in convs])  # [k, C]
        bias = torch.cat([conv.bias for conv in convs])
        return weight @ h.flatten(2) + bias[:, None]

    @staticmethod
    def _mass_before(object_logits: Tensor) -> Tensor:
        """The learned unmarked-object mass (the sigmoid of ``object_logits``, ``[B, 1, n]``
        in rank order) of the cells before each cell (an exclusive cumulative sum)."""
        objects = torch.sigmoid(object_logits)
        return torch.cumsum(objects, dim=2) - objects

    def _soft_argmax(self, heat: Tensor) -> Tensor:
        """:func:`soft_argmax` of ``heat`` (``[B, 1, g*g]`` in the cell order) -> ``[B, 2]``:
        the window is a mask on the logits before one softmax (the same renormalised
        probabilities), its peak the argmax of the logits."""
        if self.peak_window > 0:
            peak = F.embedding(heat.argmax(dim=2), self.cell_xy).view(-1, 2, 1)  # [B, 2, 1]
            # Chebyshev distance from the peak (cells are 2 / grid apart); half a cell of
            # slack against rounding.
            distance = (self.cell_xy.t() - peak).abs().amax(dim=1, keepdim=True)  # [B, 1, g*g]
            inside = distance <= (self.peak_window + 0.5) * 2.0 / self.grid
            heat = torch.where(inside, heat, float("-inf"))
        return (torch.softmax(heat, dim=2) @ self.cell_xy).flatten(1)

    def _to_grid(self, cells: Tensor) -> Tensor:
        """``[B, 1, g*g]`` in the cell order -> ``[B, g, g]``."""
        flat = cells.flatten(1)
        if self.order_prior == "scan":
            flat = flat.index_select(1, self.scan_inverse)
        return flat.view(-1, self.grid, self.grid)


class SeqCounter(nn.Module):
    """The next-object network: :meth:`encode` once per image, :meth:`step` once per object."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = _Encoder(spec)
        self.stepper = _Step(spec)
        self._frozen: list[nn.Module] = []

    @property
    def backbone(self) -> nn.Module | None:
        """The ImageNet backbone (``spec.backbone``), None for the seqops encoder."""
        return getattr(self.encoder, "backbone", None)

    def freeze_backbone(self, freeze: str | int) -> None:
        """``model.freeze_backbone``: ``none``, ``all`` or the first N stages of the backbone
        take no gradient, and their BatchNorm keeps its statistics (eval mode even under
        :meth:`train`)."""
        if self.backbone is None:
            if freeze != "none":
                raise ValueError(
                    f"model.freeze_backbone={freeze}: needs a model.backbone other than seqops"
                )
            return
        self._frozen = freeze_stages(self.backbone, freeze)
        self.train(self.training)

    def train(self, mode: bool = True) -> SeqCounter:
        super().train(mode)
        keep_frozen_norms_eval(self._frozen)
        return self

    def encode(self, images: Tensor, exemplar_mask: Tensor | None = None) -> Tensor:
        """``images [B,3,S,S]`` (+ ``exemplar_mask [B,1,g,g]`` iff ``spec.exemplars``) ->
        features ``[B, feature_channels, g, g]``."""
        return self.encode_extent(images, exemplar_mask)[0]

    def encode_extent(
        self, images: Tensor, exemplar_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`encode` and the log of the objects' radius in grid cells ``[B]`` (None
        unless ``spec.mark_extent``): what the marks of each image's loop follow."""
        spec = self.spec
        if spec.exemplars and exemplar_mask is None:
            raise ValueError("encode: this model was built with exemplars; pass exemplar_mask")
        if not spec.exemplars and exemplar_mask is not None:
            raise ValueError("encode: this model was built without exemplars; got exemplar_mask")
        if not _is_exporting():
            _check_shape("images", images, (3, spec.image_size, spec.image_size))
            if exemplar_mask is not None:
                _check_shape("exemplar_mask", exemplar_mask, (1, spec.grid, spec.grid))
        return self.encoder(images, exemplar_mask)

    def mark_sigmas(self, log_radius: Tensor | None, batch: int) -> Tensor:
        """``[B]`` each image's mark radius (grid cells): ``spec.mark_sigma`` for fixed
        marks, else :func:`seqops.imaging.extent_mark_sigma` of the estimated radius."""
        if log_radius is None:
            return torch.full((batch,), self.spec.mark_sigma)
        low, high = imaging.EXTENT_SIGMA_BOUNDS
        return (log_radius.float().exp() * self.spec.mark_extent).clamp(low, high)

    def step(self, features: Tensor, marks: Tensor) -> StepOutput:
        """``features [B,C,g,g]`` from :meth:`encode` + ``marks [B,1,g,g]`` -> StepOutput."""
        if not _is_exporting():
            g = self.spec.grid
            _check_shape("features", features, (self.spec.feature_channels, g, g))
            _check_shape("marks", marks, (1, g, g))
            if marks.shape[0] != features.shape[0]:
                raise ValueError(
                    f"step: marks batch {marks.shape[0]} != features batch {features.shape[0]}"
                )
        return self.stepper(features, marks)

    def forward(
        self, images: Tensor, marks: Tensor, exemplar_mask: Tensor | None = None
    ) -> StepOutput:
        """Encode + step: the whole network per object (the research's way; for baselines)."""
        return self.step(self.encode(images, exemplar_mask), marks)


def _is_exporting() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    if tensor.dim() != len(expected) + 1 or tuple(tensor.shape[1:]) != expected:
        raise ValueError(
            f"{name}: expected shape [B, {', '.join(map(str, expected))}], got {list(tensor.shape)}"
        )
