"""The step dataset: a batch of B images and B * K steps, new steps each training epoch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shrink_params

from seqops.config import Params
from seqops.data.manifest import DatasetError
from seqops.model import spec_from_params
from seqops.training.data import StepDataset, collate_steps


def step_dataset(data, params: Params, split: str = "train", **kwargs) -> StepDataset:
    """``split`` of ``data`` for the network ``params`` describe."""
    kwargs.setdefault("augment", split == "train")
    kwargs.setdefault("seed", 0)
    spec = spec_from_params(params)
    return StepDataset(
        data, split, spec=spec, sampling=params.sampling, train=params.train, **kwargs
    )


def test_a_batch_holds_k_steps_per_image(tiny_dataset, tiny_params):
    ds = step_dataset(tiny_dataset, tiny_params)
    batch = collate_steps([ds[0], ds[1], ds[2]])
    k = tiny_params.sampling.steps_per_image
    assert batch["images"].shape == (3, 3, 64, 64)
    assert batch["marks"].shape == (3 * k, 1, 8, 8)
    assert batch["step_image"].tolist() == [i for i in range(3) for _ in range(k)]
    assert batch["points"].shape[:2] == batch["unmarked"].shape == (3 * k, batch["points"].shape[1])
    assert batch["done"].sum() >= 3  # every image has its k = N step
    before = [ds[i]["marks"] for i in range(len(ds))]
    ds.set_epoch(1)  # training draws new steps each epoch
    assert any(not np.array_equal(b, ds[i]["marks"]) for i, b in enumerate(before))


def test_validation_steps_are_the_same_every_epoch(tiny_dataset, tiny_params):
    ds = step_dataset(tiny_dataset, tiny_params, "val", seed=5)
    first = ds[1]
    ds.set_epoch(7)
    np.testing.assert_array_equal(first["marks"], ds[1]["marks"])


def test_exemplar_masks_come_with_an_exemplar_model(tiny_dataset):
    ds = step_dataset(tiny_dataset, shrink_params("model.exemplars=true"))
    batch = collate_steps([ds[0], ds[1]])
    assert batch["exemplar_mask"].shape == (2, 1, 8, 8)
    assert batch["exemplar_mask"].amax(dim=(1, 2, 3)).tolist() == [1.0, 1.0]


def test_a_dataset_at_another_size_than_the_model_is_refused(tiny_dataset):
    with pytest.raises(DatasetError, match=r"image_size 64 differs from prepare\.image_size 96"):
        step_dataset(tiny_dataset, shrink_params("prepare.image_size=96"))


def image_noise(prob: float) -> Params:
    """The tiny params with every image augmentation at ``prob`` (scale: a factor in [0.5, 0.9]
    when on)."""
    scale = "[0.5, 0.9]" if prob else "[1.0, 1.0]"
    return shrink_params(
        f"train.augment.grey_prob={prob}",
        f"train.augment.jpeg_prob={prob}",
        f"train.augment.scale_range={scale}",
    )


def test_image_augmentation_changes_every_training_image_at_probability_one(tiny_dataset):
    ds = step_dataset(tiny_dataset, image_noise(1.0))
    clean = step_dataset(tiny_dataset, image_noise(0.0))
    for i in range(4):
        item, plain = ds[i], clean[i]
        assert not np.array_equal(item["image"], plain["image"])
        np.testing.assert_array_equal(item["image"][0], item["image"][2])  # greyscale
        # The steps are drawn before the image noise: the same with it and without.
        np.testing.assert_array_equal(item["marks"], plain["marks"])
        np.testing.assert_array_equal(item["points"], plain["points"])
    # Deterministic for a seed and epoch; another epoch draws another quality and scale.
    again = step_dataset(tiny_dataset, image_noise(1.0))
    np.testing.assert_array_equal(again[1]["image"], ds[1]["image"])
    first = ds[1]["image"]
    ds.set_epoch(1)
    assert not np.array_equal(first, ds[1]["image"])


def test_without_image_augmentation_training_sees_the_stored_pixels(tiny_dataset):
    from seqops.imaging import normalize_pixels

    ds = step_dataset(tiny_dataset, image_noise(0.0))
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i]["image"], normalize_pixels(ds.pixels[i]))
    # Validation stays clean whatever train.augment says.
    val = step_dataset(tiny_dataset, image_noise(1.0), "val")
    np.testing.assert_array_equal(val[0]["image"], normalize_pixels(val.pixels[0]))
