"""Training data: a prepared split held in memory, and batches of many steps per image.

Each PNG is decoded once, when the split is loaded (a uint8 array of ``N x S x S x 3``),
so epochs cost no decoding. An item is one image with ``steps_per_image`` steps drawn by
:func:`seqops.data.sampling.sample_image_steps`; a batch stacks ``B`` images and ``B * K`` steps,
with ``step_image`` saying which image each step belongs to (the model encodes the ``B``
images once and steps ``B * K`` times).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from seqops.config import SamplingConfig, TrainConfig
from seqops.data.manifest import (
    DatasetError,
    Record,
    manifest_path,
    read_dataset_info,
    read_manifest,
)
from seqops.data.sampling import ImageSteps, sample_image_steps
from seqops.imaging import (
    exemplar_radius_px,
    extent_mark_sigma,
    load_image,
    normalize_pixels,
    render_exemplar_mask,
)
from seqops.model import ModelSpec
from seqops.training.loop_states import loop_steps, replace_tail
from seqops.transforms import augment_image

# Validation steps come from this fixed seed, whatever train.seed is, so val/loss compares
# across epochs and across runs.
VAL_SEED = 1234
# With marks that follow the object's extent, a training image's marks take its true radius
# times a log-normal factor of this std: the encoder's estimate is off by about as much, and
# the step must not depend on the exact radius.
EXTENT_JITTER = 0.1


def load_pixels(dataset_dir: str | Path, records: list[Record], image_size: int) -> np.ndarray:
    """Decode every record's image once: uint8 ``[N, S, S, 3]``.

    Raises:
        DatasetError: an image is not at the model input size (names the file).
    """
    pixels = np.zeros((len(records), image_size, image_size, 3), np.uint8)
    for i, record in enumerate(records):
        path = Path(dataset_dir) / record.image
        image = load_image(path)
        if image.size != (image_size, image_size):
            raise DatasetError(
                f"{path}: image is {image.size[0]}x{image.size[1]}, the model input is "
                f"{image_size}x{image_size} (prepare the dataset at prepare.image_size)"
            )
        pixels[i] = np.asarray(image, np.uint8)
    return pixels


def fingerprint_dataset(dataset_dir: str | Path) -> str:
    """A short hash of ``dataset.json`` and the train/val manifests: resuming checks it."""
    digest = hashlib.sha256()
    for name in ("dataset.json", "train.jsonl", "val.jsonl"):
        path = Path(dataset_dir) / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class StepDataset(Dataset):
    """One prepared split; item ``i`` is image ``i`` with its sampled steps.

    Training items (``augment=True``) draw new steps each epoch (seeded by ``seed``, epoch and
    index, so a resumed run draws what the uninterrupted one would) and show the image as
    ``train.augment`` transforms it; validation items use clean images and marks and the same
    steps every epoch.

    Args:
        dataset_dir: a prepared dataset (``seqops.data.manifest``).
        split: ``train`` or ``val`` (any split with a manifest).
        spec: the network trained on it: input size, grid, mark radius, exemplars.
        sampling: steps per image and their done share.
        train: the mark and image noise (``train.augment``) and target (``train.target``).
        augment: apply ``train.augment``'s noise (training) or not (validation).
        seed: the steps' random source.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        *,
        spec: ModelSpec,
        sampling: SamplingConfig,
        train: TrainConfig,
        augment: bool,
        seed: int,
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.image_size = spec.image_size
        info = read_dataset_info(dataset_dir)
        if int(info.get("image_size", -1)) != self.image_size:
            raise DatasetError(
                f"{self.dataset_dir / 'dataset.json'}: image_size {info.get('image_size')} "
                f"differs from prepare.image_size {self.image_size}"
            )
        self.records = read_manifest(manifest_path(dataset_dir, split))
        if not self.records:
            raise DatasetError(f"{manifest_path(dataset_dir, split)}: no records")
        self.pixels = load_pixels(dataset_dir, self.records, self.image_size)
        self.sampling = sampling
        self.augment = train.augment if augment else None
        # nearest_unmarked: the loop marks objects in its own order, so mark random subsets.
        self.shuffle = train.target == "nearest_unmarked"
        self.grid, self.mark_sigma, self.exemplars = spec.grid, spec.mark_sigma, spec.exemplars
        # Marks that follow the object's extent (spec.mark_extent): each image's objects'
        # radius in grid cells, from its exemplar boxes (NaN without: fixed marks, no target).
        self.mark_extent = spec.mark_extent
        self.radius_cells = np.asarray(
            [exemplar_radius_px(r.exemplars_array()) / spec.stride for r in self.records],
            np.float32,
        )
        if self.mark_extent > 0 and not np.isfinite(self.radius_cells).any():
            raise DatasetError(
                f"{manifest_path(dataset_dir, split)}: model.mark_extent={self.mark_extent} "
                "learns the objects' size from exemplar boxes, and no record has any (set "
                "model.mark_extent=0)"
            )
        self.mean, self.std = spec.mean, spec.std  # the backbone's input normalisation
        self.seed = seed
        self.epoch = 0
        # The model's own loop on some images (train.loop_share): index -> points found, model
        # px; set by the training loop each epoch, so these steps follow the current model.
        self.loop_points: dict[int, np.ndarray] = {}
        self.loop_share = train.loop_share if augment else 0.0
        self.loop_radius_px = train.loop_match_px

    def set_epoch(self, epoch: int) -> None:
        """Training draws depend on the epoch (set before each epoch's iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def rng(self, index: int) -> np.random.Generator:
        """The random source of item ``index`` (this epoch's, for training)."""
        if self.augment is None:
            return np.random.default_rng([self.seed, index])
        return np.random.default_rng([self.seed, self.epoch, index])

    def exemplar_mask(self, index: int) -> np.ndarray:
        """``[1, g, g]`` exemplar mask of image ``index``."""
        boxes = self.records[index].exemplars_array()
        return render_exemplar_mask(boxes, self.image_size, self.grid)[None]

    def image_mark_sigma(self, index: int) -> float:
        """The radius (grid cells) of image ``index``'s marks: ``spec.mark_sigma``, or with
        ``mark_extent`` the share of its objects' radius (jittered in training)."""
        radius = float(self.radius_cells[index])
        if self.mark_extent <= 0 or not np.isfinite(radius):
            return self.mark_sigma
        if self.augment is not None:
            # Its own stream: the steps and image noise draw what they drew without it.
            jitter = np.random.default_rng([self.seed, self.epoch, index, 1]).normal()
            radius *= float(np.exp(EXTENT_JITTER * jitter))
        return float(extent_mark_sigma(radius, self.mark_extent))

    def image_pixels(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """uint8 ``[S, S, 3]`` of image ``index``, for training as ``train.augment``'s image
        noise transforms it (drawn from the item's ``rng`` after its steps, so the steps do not
        depend on it; the points stay where they are: the image keeps its size)."""
        if self.augment is None:
            return self.pixels[index]
        return augment_image(
            self.pixels[index],
            rng,
            grey_prob=self.augment.grey_prob,
            jpeg_prob=self.augment.jpeg_prob,
            scale_range=self.augment.scale_range,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        rng = self.rng(index)
        mark_sigma = self.image_mark_sigma(index)
        steps = sample_image_steps(
            record.points_array(),
            rng,
            image_size=self.image_size,
            sampling=self.sampling,
            grid=self.grid,
            mark_sigma=mark_sigma,
            augment=self.augment,
            shuffle=self.shuffle,
        )
        if index in self.loop_points:
            steps = self._with_loop_steps(steps, index, rng, mark_sigma)
        item = {
            "image": normalize_pixels(self.image_pixels(index, rng), self.mean, self.std),
            "marks": steps.marks[:, None],
            "target_xy": steps.target_xy,
            "done": steps.done,
            "unmarked": steps.unmarked,
            "points": record.points_array() * (2.0 / self.image_size) - 1.0,
            "index": index,
            "log_radius": np.log(self.radius_cells[index]),  # NaN: no exemplars, no target
        }
        if self.exemplars:
            item["exemplar_mask"] = self.exemplar_mask(index)
        return item

    def _with_loop_steps(self, steps: ImageSteps, index: int, rng, mark_sigma: float) -> ImageSteps:
        """Replace the last ``loop_share`` of the steps (uniform-k ones; the done steps come
        first) with states of the model's own loop on this image."""
        count = min(round(self.loop_share * len(steps.k)), len(steps.k))
        if count == 0:
            return steps
        loop = loop_steps(
            self.records[index].points_array(), self.loop_points[index], rng, count=count,
            image_size=self.image_size, grid=self.grid, mark_sigma=mark_sigma,
            radius_px=self.loop_radius_px,
        )  # fmt: skip
        return replace_tail(steps, loop)


def collate_steps(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``B`` images and their ``B * K`` steps.

    Returns tensors: ``images [B,3,S,S]``, optional ``exemplar_mask [B,1,g,g]``, ``marks
    [BK,1,g,g]``, ``target_xy [BK,2]``, ``done [BK]``, ``step_image [BK]`` (image of each
    step), ``points [BK,Nmax,2]`` and ``unmarked [BK,Nmax]`` (padded; for
    ``nearest_unmarked`` targets), ``index [B]`` (dataset indices), ``log_radius [BK]`` (log
    object radius, grid cells, of each step's image; NaN without exemplars).
    """
    steps = [len(it["done"]) for it in items]
    n_max = max(1, max(len(it["points"]) for it in items))
    total = sum(steps)
    points = np.zeros((total, n_max, 2), np.float32)
    unmarked = np.zeros((total, n_max), bool)
    row = 0
    for it, k in zip(items, steps, strict=True):
        n = len(it["points"])
        points[row : row + k, :n] = it["points"]
        unmarked[row : row + k, :n] = it["unmarked"]
        row += k
    batch = {
        "images": torch.from_numpy(np.stack([it["image"] for it in items])),
        "marks": torch.from_numpy(np.concatenate([it["marks"] for it in items])),
        "target_xy": torch.from_numpy(np.concatenate([it["target_xy"] for it in items])),
        "done": torch.from_numpy(np.concatenate([it["done"] for it in items])),
        "step_image": torch.repeat_interleave(torch.arange(len(items)), torch.tensor(steps)),
        "points": torch.from_numpy(points),
        "unmarked": torch.from_numpy(unmarked),
        "index": torch.tensor([it["index"] for it in items]),
        "log_radius": torch.from_numpy(
            np.repeat(np.asarray([it["log_radius"] for it in items], np.float32), steps)
        ),
    }
    if "exemplar_mask" in items[0]:
        batch["exemplar_mask"] = torch.from_numpy(np.stack([it["exemplar_mask"] for it in items]))
    return batch
