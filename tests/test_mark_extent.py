"""Marks that follow the object's extent (``model.mark_extent``): the encoder's radius
estimate, the training marks and targets it learns from, its export and the served loop."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_dataset, shrink_params

from seqops import export as E
from seqops import imaging
from seqops.data.manifest import DatasetError, manifest_path, read_manifest, write_manifest
from seqops.model import ModelSpec, spec_from_params
from seqops.predictor import Predictor
from seqops.testing import make_untrained_model
from seqops.training import losses
from seqops.training.data import EXTENT_JITTER, StepDataset, collate_steps
from seqops.training.train import set_up, train_one_epoch
from seqops.training.validation import rollout

SHARE = 1.0  # in the tests a mark's radius is the object's radius (easy to check by hand)


def extent_params(*overrides: str):
    return shrink_params(f"model.mark_extent={SHARE}", *overrides)


def dataset(data, params, split: str = "val", augment: bool = False) -> StepDataset:
    spec = spec_from_params(params)
    return StepDataset(
        data, split, spec=spec, sampling=params.sampling, train=params.train, augment=augment,
        seed=0,
    )  # fmt: skip


def test_a_marks_radius_is_a_share_of_the_objects_within_bounds():
    low, high = imaging.EXTENT_SIGMA_BOUNDS
    sigma = imaging.extent_mark_sigma(np.array([0.1, 2.0, 3.0, 50.0]), 0.5)
    np.testing.assert_allclose(sigma, [low, 1.0, 1.5, high])
    boxes = np.array([[0, 0, 10, 20], [5, 5, 9, 9]], np.float32)  # half sides 5, 10; 2, 2
    assert imaging.exemplar_radius_px(boxes) == pytest.approx((7.5 + 2.0) / 2)
    assert math.isnan(imaging.exemplar_radius_px(np.zeros((0, 4))))


def test_the_encoder_estimates_one_radius_per_image_and_fixed_marks_have_none():
    spec = ModelSpec.from_preset("tiny", 64, False, mark_extent=0.5)
    model = make_untrained_model(spec, seed=0)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features, log_radius = model.encode_extent(images)
        assert log_radius.shape == (3,)
        torch.testing.assert_close(model.encode(images), features)
        model.encoder.extent.bias.fill_(math.log(3.0))  # radius 3 cells -> mark 1.5 cells
        _, log_radius = model.encode_extent(images)
        torch.testing.assert_close(model.mark_sigmas(log_radius, 3), torch.full((3,), 1.5))
        huge = model.mark_sigmas(torch.full((2,), 10.0), 2)
        assert huge.tolist() == [imaging.EXTENT_SIGMA_BOUNDS[1]] * 2
    fixed = make_untrained_model(ModelSpec.from_preset("tiny", 64, False), seed=0)
    assert fixed.encode_extent(images)[1] is None
    assert fixed.mark_sigmas(None, 2).tolist() == [fixed.spec.mark_sigma] * 2
    assert not hasattr(fixed.encoder, "extent")  # checkpoints of fixed-mark models unchanged
    with pytest.raises(ValueError, match="mark_extent"):
        ModelSpec.from_preset("tiny", 64, False, mark_extent=-1.0)


def test_training_marks_follow_each_images_exemplar_boxes(tmp_path):
    small = make_tiny_dataset(tmp_path / "small", radius=3.5)
    large = make_tiny_dataset(tmp_path / "large", radius=8.0)
    params = extent_params()
    for data, radius_px in ((small, 3.5), (large, 8.0)):
        ds = dataset(data, params)
        expected = float(imaging.extent_mark_sigma(radius_px / 8, SHARE))
        assert ds.image_mark_sigma(0) == pytest.approx(expected)
        item = ds[0]
        np.testing.assert_allclose(item["log_radius"], math.log(radius_px / 8), rtol=1e-6)
        # Every step's marks map is its marked points rendered at that image's radius.
        record = ds.records[0]
        points = imaging.pixels_to_norm(record.points_array(), ds.image_size)
        for marks, k in zip(item["marks"][:, 0], item_ks(ds, 0), strict=True):
            np.testing.assert_allclose(
                marks, imaging.render_marks(points[:k], ds.grid, expected), atol=1e-6
            )
    # Training jitters the radius (log-normal), the same draw for the same epoch.
    train = dataset(large, params, split="train", augment=True)
    sigmas = [train.image_mark_sigma(i) for i in range(len(train))]
    assert len(set(np.round(sigmas, 5))) > 1
    ratio = np.log(np.asarray(sigmas) / (8.0 / 8 * SHARE))
    assert np.abs(ratio).max() < 5 * EXTENT_JITTER
    assert train.image_mark_sigma(3) == train.image_mark_sigma(3)
    # Fixed marks (the default) ignore the boxes.
    fixed = dataset(large, shrink_params())
    assert fixed.image_mark_sigma(0) == fixed.mark_sigma


def item_ks(ds: StepDataset, index: int) -> list[int]:
    """The number of marked objects of each validation step of image ``index``."""
    from seqops.data.sampling import sample_image_steps

    steps = sample_image_steps(
        ds.records[index].points_array(), ds.rng(index), image_size=ds.image_size,
        sampling=ds.sampling, grid=ds.grid, mark_sigma=1.0,
    )  # fmt: skip
    return [int(k) for k in steps.k]


def test_a_batch_carries_each_steps_radius_target_and_nan_without_boxes(tmp_path):
    data = make_tiny_dataset(tmp_path / "prepared", radius=6.0)
    records = read_manifest(manifest_path(data, "val"))
    write_manifest(
        manifest_path(data, "val"),
        [dataclasses.replace(records[0], exemplars=()), *records[1:]],
    )
    ds = dataset(data, extent_params())
    assert ds.image_mark_sigma(0) == ds.mark_sigma  # no boxes: the fixed radius
    batch = collate_steps([ds[0], ds[1]])
    k = len(ds[0]["done"])
    assert batch["log_radius"].shape == batch["done"].shape
    assert torch.isnan(batch["log_radius"][:k]).all()
    torch.testing.assert_close(batch["log_radius"][k:], torch.full((k,), math.log(6.0 / 8)))


def test_mark_extent_without_any_exemplar_box_names_the_file_and_the_param(tmp_path):
    data = make_tiny_dataset(tmp_path / "prepared")
    path = manifest_path(data, "train")
    write_manifest(path, [dataclasses.replace(r, exemplars=()) for r in read_manifest(path)])
    with pytest.raises(DatasetError, match=r"train\.jsonl.*model\.mark_extent=1\.0"):
        dataset(data, extent_params(), split="train", augment=True)


def test_the_extent_loss_ignores_images_without_a_target_and_learns_the_rest():
    log_radius = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    target = torch.tensor([math.nan, 0.5, 0.0])
    loss = losses.extent_loss(log_radius, target)
    assert loss[0] == 0 and loss[1] == 0 and loss[2] > 0
    loss.sum().backward()
    assert log_radius.grad.tolist()[:2] == [0.0, 0.0] and log_radius.grad[2] > 0


def test_an_epoch_trains_the_radius_head_towards_the_boxes(tmp_path):
    data = make_tiny_dataset(tmp_path / "prepared", radius=8.0)
    params = extent_params("train.lr_schedule=none", "train.rollout_images=0", "train.lr=0.02")
    from seqops.training.outputs import StageOutputs
    from seqops.training.runtime import DistInfo

    outputs = StageOutputs(tmp_path / "models")
    run = set_up(
        params, data, outputs=outputs, resume="never", device=torch.device("cpu"),
        dist=DistInfo(),
    )  # fmt: skip
    head = run.state.model.encoder.extent
    before = float(head.bias.detach())
    first = train_one_epoch(run, epoch=1)["train/loss_extent"]
    later = [train_one_epoch(run, epoch=e)["train/loss_extent"] for e in (2, 3, 4)]
    assert first > 0 and later[-1] < first
    # The bias starts at 2 cells; the boxes say 1: it moves down.
    assert float(head.bias.detach()) < before


@pytest.mark.slow  # an export and a predictor (seconds)
def test_the_export_carries_each_images_mark_radius_and_the_loop_follows_it(tmp_path):
    spec = ModelSpec.from_preset("tiny", 64, False, mark_extent=0.5)
    model = make_untrained_model(spec, seed=0)
    with torch.no_grad():
        model.encoder.extent.weight.normal_(std=2.0)  # a radius that differs per image
    params = extent_params()
    metadata = E.build_metadata(
        spec, params.model_dump(mode="json"), done_threshold=0.5, model_version="x", run_id=None
    )
    info = E.export_model(model, tmp_path / "onnx", metadata, params.export)
    assert info["mark_extent"] == 0.5 and info["parity"]["passed"]
    assert "mark_sigma" in info["parity"]["per_output"]
    encoder = onnx.load(tmp_path / "onnx" / "encoder.onnx")
    assert [o.name for o in encoder.graph.output] == ["features", "mark_sigma"]

    predictor = Predictor(tmp_path / "onnx", device="cpu", threads=1)
    rng = np.random.default_rng(0)
    pixels = [
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        np.full((64, 64, 3), 30, np.uint8),
        np.full((64, 64, 3), 230, np.uint8),
    ]
    from PIL import Image

    prepared = [predictor.prepare(Image.fromarray(p)) for p in pixels]
    features, sigmas = predictor.encode_marked(prepared)
    with torch.no_grad():
        images = torch.from_numpy(np.stack([p.pixels for p in prepared]))
        _, log_radius = model.encode_extent(images)
        expected = model.mark_sigmas(log_radius, 3).numpy()
    np.testing.assert_allclose(sigmas, expected, rtol=1e-4)
    assert np.ptp(sigmas) > 0.01  # the images' marks differ
    rollouts = predictor.start(prepared, (features, sigmas))
    for r, sigma in zip(rollouts, sigmas, strict=True):
        assert r.mark_sigma == pytest.approx(float(sigma))
        r.mark((0.1, -0.2))
        np.testing.assert_allclose(
            r.marks[0], imaging.render_marks(np.array([[0.1, -0.2]]), 8, float(sigma)), atol=1e-6
        )
    # The torch loop (validation's, and the loop states') uses the same radius.
    found = rollout(model, np.stack(pixels), None, 3, torch.device("cpu"), 0.5)
    served = predictor.predict([Image.fromarray(p) for p in pixels], max_objects=3)
    for torch_points, prediction in zip(found, served, strict=True):
        assert len(torch_points) == prediction.count
