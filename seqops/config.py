"""Typed, frozen configuration read from ``params.yaml``.

``params.yaml`` is the one source of every parameter and of every default: the models
below define which keys exist, their types and bounds, but no values. Every key is
required, so a missing, unknown or mistyped key is an error that names it. The CLI and
the Prefect flow only override fields of these same models, with the
``section.key=value`` syntax of ``dvc exp run -S``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

DEFAULT_PARAMS_PATH = Path("params.yaml")


class ConfigError(ValueError):
    """A parameter file or override is invalid; the message names the key."""


class _Section(BaseModel):
    # strict: "3" is not an int, 1.5 is not an int; extra="forbid": typos are errors.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --- prepare -------------------------------------------------------------------


class SyntheticConfig(_Section):
    clutter: float = Field(ge=0, le=1)  # share of scenes whose objects may touch/overlap
    distractor_share: float = Field(ge=0, le=1)  # scenes with a second, uncounted kind
    num_exemplars: int = Field(ge=0, le=3)  # exemplar boxes per scene (FSC-147 has 3)
    noise: float = Field(ge=0, le=1)  # background noise amplitude (share of 255)


class Fsc147Config(_Section):
    root: str
    classes: tuple[str, ...] = Field(strict=False)  # YAML list; empty: every class


class CocoConfig(_Section):
    annotations: str
    images_dir: str
    categories: tuple[str, ...] = Field(strict=False)  # YAML list; empty: every one
    val_share: float = Field(ge=0, lt=1)
    test_share: float = Field(ge=0, lt=1)


class PointsConfig(_Section):
    root: str  # images with CSV and/or LabelMe point annotations (docs/points-format.md)
    labels: tuple[str, ...] = Field(strict=False)  # LabelMe labels counted; empty: every one
    val_share: float = Field(ge=0, lt=1)  # of the images without a split of their own
    test_share: float = Field(ge=0, lt=1)


class PrepareConfig(_Section):
    source: Literal["synthetic", "fsc147", "coco", "points"]
    seed: int
    image_size: int = Field(ge=32, le=2048)
    order: Literal["reading_order", "left_to_right", "nearest_neighbor"]
    row_height: float = Field(gt=0)  # px at model size (the research code's rows)
    min_objects: int = Field(ge=0)
    max_objects: int = Field(ge=1)
    on_error: Literal["skip", "fail"]
    num_train: int = Field(ge=0)  # synthetic scenes per split
    num_val: int = Field(ge=0)
    num_test: int = Field(ge=0)
    synthetic: SyntheticConfig
    fsc147: Fsc147Config
    coco: CocoConfig
    points: PointsConfig


# --- sampling (read by prepare for its statistics and by train) -----------------


class SamplingConfig(_Section):
    steps_per_image: int = Field(ge=1)  # k values trained against one image encoding
    done_share: float = Field(ge=0, le=1)  # share of those steps with k = N (done = 1)


# --- model, train ---------------------------------------------------------------


class ModelConfig(_Section):
    preset: Literal["tiny", "base"]
    exemplars: bool  # trained with exemplar boxes (count the exemplified kind)
    head: Literal["heatmap", "pooled"]  # pooled: the research's (x, y) MLP head
    # None (YAML null): the preset's value, resolved in seqops.model.spec_from_params.
    stride: int | None = Field(ge=1)  # feature-grid cell in px (4, 8, 16)
    peak_window: int | None = Field(ge=0)  # soft-argmax window half-width, cells; 0: whole grid
    mark_sigma: float | None = Field(gt=0)  # a found object's mark radius, grid cells
    # > 0: marks follow the object's extent, this share of the estimated radius; 0: fixed.
    mark_extent: float = Field(ge=0)
    # How the step finds the next object in the order (seqops.model.ORDER_PRIORS); "scan"
    # needs a positional prepare.order (not nearest_neighbor).
    order_prior: Literal["none", "scan"]
    count_head: bool  # a map of the objects left, whose sum the done head sees
    count_prior: bool  # the count head's density added to the heat map (needs count_head)
    done_peak: bool  # done also sees the scan's largest unmarked-object logit (needs scan)
    # seqops (the from-scratch encoder) or an ImageNet architecture (seqops.backbones).
    backbone: Literal["seqops", "resnet18", "resnet50", "mobilenet_v3_large", "convnext_tiny"]
    # imagenet (torchvision's weights, its cache) | none (random) | a state dict's path.
    pretrained: str = Field(min_length=1)
    # none | all | N: the backbone's first N stages (stem first) are frozen, BatchNorm too.
    freeze_backbone: Literal["none", "all"] | Annotated[int, Field(ge=0)]


class LossConfig(_Section):
    threshold: float = Field(gt=0)  # t: quadratic below, linear above (19 px at 384)
    variant: Literal["research", "continuous"]
    w_done: float = Field(ge=0)
    pos_weight: float = Field(gt=0)  # BCE pos_weight for done = 1
    w_heatmap: float = Field(ge=0)  # cross-entropy of the heat map against a Gaussian
    heatmap_sigma: float = Field(gt=0)  # that Gaussian's radius, in feature-grid cells
    w_count: float = Field(ge=0)  # the count head's map against the unmarked objects' density
    w_extent: float = Field(ge=0)  # the objects' radius estimate against the exemplar boxes'


class AugmentConfig(_Section):
    """Noise on the marks during training, so the loop recovers from its own small errors,
    and on the images (seqops.transforms), so a photo counts the same in greyscale, as a JPEG
    or from a lower-resolution source."""

    mark_jitter_px: float = Field(ge=0)  # std of Gaussian jitter of each mark, model px
    mark_drop_prob: float = Field(ge=0, le=1)  # a found object's mark goes missing
    spurious_mark_prob: float = Field(ge=0, le=1)  # a mark lands where no object is
    grey_prob: float = Field(ge=0, le=1)  # share of training images shown in greyscale
    jpeg_prob: float = Field(ge=0, le=1)  # share JPEG-compressed at a quality in [30, 90]
    # Downscaled by a factor drawn in [low, high] and back up to the model size; [1, 1]: off.
    scale_range: tuple[float, float] = Field(strict=False)  # YAML list

    @field_validator("scale_range")
    @classmethod
    def _scale_range_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError("expected [low, high] with 0 < low <= high <= 1")
        return value


class TrainConfig(_Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # images per batch (each with sampling.steps_per_image)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    max_norm: float = Field(gt=0)
    lr_schedule: Literal["none", "cosine"]
    backbone_lr_scale: float = Field(gt=0)  # the backbone's lr is lr times this
    patience: int = Field(ge=1)
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    num_workers: int = Field(ge=0)
    num_threads: int = Field(ge=0)  # torch intra-op threads; 0 = torch's default (cores)
    target: Literal["ordered", "nearest_unmarked"]
    # Share of each image's steps taken from the model's own loop (states it really visits),
    # refreshed every epoch from the second on; 0: off. loop_match_px: the least distance
    # within which a loop point found an object (see loop_states.found_radius).
    # loop_refresh: share of the training images rolled out again each epoch, a rotating
    # subset (the others keep their last rollout): 1 rolls out every image every epoch.
    loop_share: float = Field(ge=0, le=1)
    loop_refresh: float = Field(gt=0, le=1)
    loop_match_px: float = Field(gt=0)
    loss: LossConfig
    augment: AugmentConfig
    rollout_images: int = Field(ge=0)  # val images rolled out in full every epoch
    picture_samples: int = Field(ge=0)  # val samples drawn to MLflow every epoch
    max_minutes: float = Field(ge=0)  # wall-clock budget; 0 = none
    # auto: continue last.pt when it matches and has fewer than `epochs` epochs (a killed or
    # extended run); never: start afresh; require: fail unless last.pt can be continued.
    resume: Literal["auto", "never", "require"]


# --- export, evaluate, promote ---------------------------------------------------


class ExportConfig(_Section):
    # torch's exporter (torch.export-based) implements opset >= 18; converting down to 17
    # fails on this network's Reduce ops, so 18 is the lowest that exports.
    opset: int = Field(ge=18)
    parity_tolerance: float = Field(gt=0)


# A transform of seqops.transforms (its ranges are checked there, before evaluating).
TransformName = Annotated[
    str, StringConstraints(pattern=r"^(identity|grey|jpeg\d{1,3}|scale\d*\.?\d+)$")
]


class EvaluateConfig(_Section):
    match_radius_px: float = Field(gt=0)
    done_threshold: float = Field(gt=0, lt=1)
    max_objects: int = Field(ge=1)
    worst_images: int = Field(ge=0)
    # Flag an image for review when its count_confidence is below this (seqops.confidence).
    review_threshold: float = Field(ge=0, le=1)
    # Transformed copies of the split, counted too: robust/<name>/* rows (seqops.transforms).
    transforms: tuple[TransformName, ...] = Field(strict=False)  # YAML list; empty: none


class PromoteConfig(_Section):
    metric: str
    higher_is_better: bool


class Params(_Section):
    """Every section of ``params.yaml``."""

    prepare: PrepareConfig
    sampling: SamplingConfig
    model: ModelConfig
    train: TrainConfig
    export: ExportConfig
    evaluate: EvaluateConfig
    promote: PromoteConfig


# --- loading ---------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is parsed as YAML, as ``dvc exp run -S`` does."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. prepare.seed=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key, value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str | tuple[str, Any]]) -> dict:
    """Return a deep copy of ``raw`` with dotted-key overrides applied.

    Every key of the path must name a known field: the typed models define which
    keys exist, so a typo fails here rather than being silently added.
    """
    data = copy.deepcopy(dict(raw))
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        parts = key.split(".")
        model: type[BaseModel] = Params
        node = data
        for depth, part in enumerate(parts):
            field = model.model_fields.get(part)
            if field is None:
                prefix = ".".join(parts[:depth]) or "params"
                known = ", ".join(model.model_fields)
                raise ConfigError(
                    f"override {key!r}: {prefix} has no key {part!r} (known: {known})"
                )
            if depth == len(parts) - 1:
                node[part] = value
                break
            sub = field.annotation
            if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
                raise ConfigError(
                    f"override {key!r}: {'.'.join(parts[: depth + 1])} is not a section"
                )
            model = sub
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override {key!r}: {'.'.join(parts[: depth + 1])} is not a mapping"
                )
    return data


def _describe(error: dict) -> str:
    """One pydantic error as ``dotted.key: what is wrong``."""
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if error["type"] == "missing":
        return f"{where}: missing key (set it; the project's params.yaml lists every key)"
    return f"{where}: {error['msg']} (got {error.get('input')!r})"


def params_from_dict(raw: Mapping[str, Any], source: str = "params") -> Params:
    """Validate a raw mapping into :class:`Params`; errors name the file and every bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: invalid parameters:\n  {lines}") from None


def read_params_file(path: str | Path = DEFAULT_PARAMS_PATH) -> dict:
    """Read a params YAML file into a plain dict (empty file: empty dict)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: parameter file not found") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_params(
    path: str | Path = DEFAULT_PARAMS_PATH, overrides: Iterable[str | tuple[str, Any]] = ()
) -> Params:
    """Load ``params.yaml`` (or another file) and apply ``section.key=value`` overrides."""
    raw = apply_overrides(read_params_file(path), overrides)
    return params_from_dict(raw, source=str(path))
