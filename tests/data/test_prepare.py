"""The prepare stage on synthetic data: layout, determinism, stats, atomicity."""

import json
from typing import get_args

import numpy as np
import pytest
from conftest import shrink_params
from PIL import Image

from seqops.cli import main
from seqops.config import PrepareConfig
from seqops.data import prepare as prepare_module
from seqops.data import synthetic as synthetic_module
from seqops.data.manifest import SPLITS, read_dataset_info, read_manifest
from seqops.data.ordering import order_points
from seqops.data.prepare import SOURCES, histogram, run_prepare
from seqops.data.sources import PrepareError, find_point_problem

SIZE = 64


def _params(*overrides):
    """The real params with a small synthetic dataset (10 scenes at 64 px), then ``overrides``."""
    return shrink_params(
        "prepare.source=synthetic", "prepare.order=reading_order", f"prepare.image_size={SIZE}",
        "prepare.min_objects=3", "prepare.max_objects=9", "prepare.row_height=10",
        "prepare.num_train=6", "prepare.num_val=2", "prepare.num_test=2", *overrides,
    )  # fmt: skip


def test_layout_of_a_prepared_dataset(tmp_path):
    out = tmp_path / "prepared"
    stats = run_prepare(_params(), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json", "images", "stats.json", "test.jsonl", "train.jsonl", "val.jsonl",
    ]  # fmt: skip
    info = read_dataset_info(out)
    assert info["image_size"] == SIZE and info["order"] == "reading_order"
    assert info["row_height"] == 10.0 and info["source"] == "synthetic"
    assert info["splits"] == {"train": 6, "val": 2, "test": 2} and info["exemplars"] is True
    assert json.loads((out / "stats.json").read_text()) == stats
    for split, count in info["splits"].items():
        records = read_manifest(out / f"{split}.jsonl")
        assert len(records) == count
        for record in records:
            assert record.image == f"images/{split}/{record.id}.png"
            with Image.open(out / record.image) as image:
                assert image.size == (SIZE, SIZE) and image.mode == "RGB"
            points = record.points_array()
            assert 3 <= len(points) <= 9
            assert ((points >= 0) & (points <= SIZE)).all()
            # Stored in the configured canonical order.
            np.testing.assert_array_equal(points, order_points(points, "reading_order", 10.0))


def test_the_configured_order_is_applied(tmp_path):
    run_prepare(_params("prepare.order=left_to_right"), tmp_path / "ltr")
    for record in read_manifest(tmp_path / "ltr" / "train.jsonl"):
        xs = record.points_array()[:, 0]
        assert (np.diff(xs) >= 0).all()


def test_stats_count_objects_and_done_share(tmp_path):
    sampling = ("sampling.steps_per_image=8", "sampling.done_share=0.2")
    stats = run_prepare(_params(*sampling), tmp_path / "prepared")
    train = read_manifest(tmp_path / "prepared" / "train.jsonl")
    counts = [r.num_objects for r in train]
    assert stats["splits"]["train"]["images"] == 6
    assert stats["splits"]["train"]["objects"] == sum(counts)
    assert stats["splits"]["train"]["objects_mean"] == pytest.approx(np.mean(counts), abs=1e-3)
    assert sum(stats["splits"]["train"]["histogram"].values()) == 6
    assert stats["images"] == 10
    # round(0.2 * 8) = 2 of 8 steps are done steps; the research drew one k in [0, N].
    assert stats["done_share"]["sampled"] == 0.25
    expected = np.mean([1 / (n + 1) for n in counts])
    assert stats["done_share"]["research"] == pytest.approx(expected, abs=1e-4)
    assert stats["skipped"] == {} and stats["skipped_total"] == 0


def test_data_stats_prints_a_short_summary_and_json_on_request(tmp_path, capsys):
    out = tmp_path / "prepared"
    run_prepare(_params(), out)
    assert main(["data", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith(f"{out}: 10 images, ") and "source synthetic" in lines[0]
    assert any(line.split()[:2] == ["train", "6"] for line in lines)
    assert "skipped: 0" in text and len(lines) < 15  # a screen, not the raw JSON
    assert main(["data", "stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "stats.json").read_text())
    assert main(["data", "stats", str(tmp_path / "nowhere")]) == 2
    assert "nowhere/stats.json: not found" in capsys.readouterr().err


def test_same_params_give_byte_identical_datasets(tmp_path):
    run_prepare(_params(), tmp_path / "a")
    run_prepare(_params(), tmp_path / "b")
    for split in SPLITS:
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{split}.jsonl"
        ).read_bytes()
    for png in (tmp_path / "a" / "images").rglob("*.png"):
        assert png.read_bytes() == (tmp_path / "b" / png.relative_to(tmp_path / "a")).read_bytes()
    assert (tmp_path / "a" / "stats.json").read_bytes() == (
        tmp_path / "b" / "stats.json"
    ).read_bytes()


def test_scenes_do_not_depend_on_the_split_sizes(tmp_path):
    run_prepare(_params("prepare.num_train=2"), tmp_path / "few")
    run_prepare(_params("prepare.num_train=5", "prepare.num_val=0"), tmp_path / "many")
    few = (tmp_path / "few" / "train.jsonl").read_text().splitlines()
    many = (tmp_path / "many" / "train.jsonl").read_text().splitlines()
    assert few == many[:2]
    assert read_manifest(tmp_path / "many" / "val.jsonl") == []


def test_parallel_generation_gives_the_same_dataset(tmp_path, monkeypatch):
    four_train = ("prepare.num_train=4", "prepare.num_val=0", "prepare.num_test=0")
    run_prepare(_params(*four_train), tmp_path / "serial")
    pools = []

    class SpyPool(synthetic_module.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(synthetic_module, "ProcessPoolExecutor", SpyPool)
    monkeypatch.setattr(synthetic_module, "PARALLEL_MIN_SCENES", 1)
    monkeypatch.setattr(synthetic_module.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(synthetic_module.threading, "active_count", lambda: 1)
    run_prepare(_params(*four_train), tmp_path / "parallel")
    assert len(pools) == 1
    for name in ("train.jsonl", "images/train/train-000003.png"):
        assert (tmp_path / "serial" / name).read_bytes() == (
            tmp_path / "parallel" / name
        ).read_bytes()


def test_a_failed_run_leaves_the_previous_dataset_and_no_temporary_files(tmp_path):
    out = tmp_path / "prepared"
    run_prepare(_params(), out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    broken = tmp_path / "FSC147"
    broken.mkdir()
    (broken / "annotation_FSC147_384.json").write_text("{broken")
    params = _params("prepare.source=fsc147", ("prepare.fsc147.root", str(broken)))
    with pytest.raises(PrepareError, match=r"annotation_FSC147_384.json"):
        run_prepare(params, out)

    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FSC147", "prepared"]


def test_a_failure_midway_through_writing_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def explode(sample, cfg):
        calls.append(sample)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(sample, cfg)

    original = prepare_module._finish_record
    monkeypatch.setattr(prepare_module, "_finish_record", explode)
    with pytest.raises(RuntimeError, match=r"disk full"):
        run_prepare(_params(), tmp_path / "prepared")
    assert list(tmp_path.iterdir()) == []


def test_min_above_max_is_an_error(tmp_path):
    with pytest.raises(PrepareError, match=r"min_objects \(9\) > prepare.max_objects \(3\)"):
        run_prepare(_params("prepare.min_objects=9", "prepare.max_objects=3"), tmp_path / "out")


def test_exemplars_off(tmp_path):
    run_prepare(_params("prepare.synthetic.num_exemplars=0"), tmp_path / "out")
    assert read_dataset_info(tmp_path / "out")["exemplars"] is False


def test_find_point_problem():
    ok = np.array([[0.0, 0.0], [10.0, 5.0], [10.0, 6.5], [20.0, 20.0]])
    assert find_point_problem(ok, 20, 20) is None
    assert find_point_problem(np.zeros((0, 2)), 20, 20)[0] == "no_points"
    reason, detail = find_point_problem(np.array([[1.0, 1.0], [5.0, -0.5]]), 20, 20)
    assert reason == "point_outside_image" and "point 1" in detail
    near = np.array([[3.0, 3.0], [15.0, 15.0], [3.4, 3.5]])
    reason, detail = find_point_problem(near, 20, 20)
    assert reason == "duplicate_points" and "points 0 and 2" in detail


def test_histogram_buckets():
    assert histogram([]) == {}
    assert histogram([0, 4, 5, 12, 12]) == {"0-4": 2, "5-9": 1, "10-14": 2}
    assert list(histogram([250]))[-1] == "100+"


def test_every_source_the_config_accepts_is_registered():
    """A new source is one module plus one line in SOURCES; the config's choices follow it."""
    accepted = get_args(PrepareConfig.model_fields["source"].annotation)
    assert sorted(SOURCES) == sorted(accepted)
