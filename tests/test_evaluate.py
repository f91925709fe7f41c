"""The evaluate stage through the ONNX predictor, on tiny prepared datasets."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import ROOT, exported_model, make_tiny_dataset, shrink_params
from PIL import Image

from seqops.cli import main
from seqops.confidence import EPS, confidence_from_features
from seqops.contract import CountCalibration
from seqops.data.manifest import Record, manifest_path, read_manifest
from seqops.evaluate import (
    HEADLINE_METRICS,
    ROBUST_HEADLINE,
    ROBUST_METRICS,
    EvaluateError,
    calibrate_confidence,
    evaluate_image,
    read_split,
    run_evaluate,
    score_split,
)
from seqops.predictor import Prediction
from seqops.transforms import parse_transform


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six test images with 1-4 discs, plus one blank image with no object."""
    root = make_tiny_dataset(
        tmp_path_factory.mktemp("evaluate") / "prepared", num_train=0, num_val=0, num_test=6
    )
    Image.new("RGB", (64, 64), (200, 200, 200)).save(root / "images/test/blank.png")
    with open(manifest_path(root, "test"), "a") as f:
        f.write(Record(id="blank", image="images/test/blank.png", points=()).to_json() + "\n")
    return root


def true_counts(root: Path) -> np.ndarray:
    return np.array([r.num_objects for r in read_manifest(manifest_path(root, "test"))])


def test_a_model_that_stops_at_once_scores_as_expected(dataset: Path, tmp_path: Path):
    params = shrink_params("evaluate.worst_images=3")
    out = tmp_path / "reports"
    metrics = run_evaluate(
        params,
        exported_model("done")[0],
        dataset,
        metrics_path=tmp_path / "metrics.json",
        plots_dir=tmp_path / "plots",
        out_dir=out,
        track=False,
        device="cpu",
        batch_size=3,
    )
    counts = true_counts(dataset)
    with_objects = (counts > 0).mean()
    assert metrics["num_images"] == 7 and metrics["num_objects"] == counts.sum()
    assert metrics["num_predictions"] == 0
    assert metrics["count_mae"] == pytest.approx(counts.mean())
    assert metrics["count_rmse"] == pytest.approx(np.sqrt((counts**2).mean()))
    assert metrics["count_exact_acc"] == pytest.approx(1 / 7)  # only the blank image
    assert metrics["count_bias"] == pytest.approx(-counts.mean())
    assert metrics["recall"] == 0.0 and metrics["precision"] is None  # NaN -> null
    assert metrics["misses"] == counts.sum() and metrics["duplicates"] == 0
    # One step per image, done ~1: right only on the blank image.
    assert metrics["done_steps"] == 7 and metrics["steps_per_image"] == 1.0
    assert metrics["done_brier"] == pytest.approx(with_objects, abs=1e-4)
    assert metrics["done_ece"] == pytest.approx(with_objects, abs=1e-4)
    assert metrics["stop_early_rate"] == pytest.approx(with_objects)
    assert metrics["stop_on_time_rate"] == pytest.approx(1 / 7)
    assert metrics["latency_ms_per_image"] > 0
    # DVC's file: the headline figures only (a screen); the report: every metric.
    headline = json.loads((tmp_path / "metrics.json").read_text())
    assert headline == {k: metrics[k] for k in HEADLINE_METRICS} and len(headline) < 20
    assert json.loads((out / "metrics.json").read_text()) == metrics

    with open(tmp_path / "plots" / "counts.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["true_count"]) for r in rows] == counts.tolist()
    assert {r["pred_count"] for r in rows} == {"0"}
    with open(tmp_path / "plots" / "calibration.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1 and table[0]["bin_lower"] == "0.9" and table[0]["steps"] == "7"

    per_image = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert [r["id"] for r in per_image][-1] == "blank"
    assert per_image[-1]["stop"] == "on_time" and per_image[-1]["abs_err"] == 0
    worst = sorted(p.name for p in (out / "worst").iterdir())
    assert len(worst) == 3
    # The worst image is the one with the most objects (all missed).
    top = max(per_image, key=lambda r: r["true_count"])
    assert worst[0].startswith("01_") and top["abs_err"] == counts.max()
    most = {r["id"] for r in per_image if r["true_count"] == counts.max()}
    assert worst[0].removeprefix("01_").removesuffix(".png") in most
    assert json.loads((out / "calibration.json").read_text())[9]["steps"] == 7


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_count_confidence_figures_agree_with_a_hand_computation(dataset: Path, tmp_path: Path):
    """The "done" model says done at once with probability ~1 on every image: each count is
    0 with the uncalibrated confidence 1 - EPS (the export has no calibration), and only the
    blank image is exact."""
    params = shrink_params("evaluate.review_threshold=0.9", "evaluate.worst_images=0")
    metrics = run_evaluate(
        params, exported_model("done")[0], dataset, plots_dir=tmp_path / "plots",
        out_dir=tmp_path / "out", track=False, device="cpu",
    )  # fmt: skip
    conf = 1 - EPS
    per_image = [json.loads(line) for line in (tmp_path / "out/per_image.jsonl").open()]
    assert {r["count_confidence"] for r in per_image} == {conf}
    assert [r["exact"] for r in per_image] == [False] * 6 + [True]
    assert metrics["count_confidence_ece"] == pytest.approx(conf - 1 / 7)
    # Nothing is below 0.9: nothing flagged, no miscount caught.
    assert (metrics["review_flagged_share"], metrics["review_miscount_recall"]) == (0.0, 0.0)
    # Only a threshold above every confidence (1.0) catches 80%: it flags every image.
    assert metrics["review_flagged_share_at_recall_80"] == 1.0
    assert read_csv(tmp_path / "plots/count_reliability.csv") == [
        {"bin_lower": 0.9, "bin_upper": 1.0, "images": 7, "mean_confidence": pytest.approx(conf),
         "exact_share": pytest.approx(1 / 7)},
    ]  # fmt: skip
    assert read_csv(tmp_path / "plots/review_curve.csv") == [
        {"threshold": 0.0, "flagged_share": 0.0, "miscount_recall": 0.0},
        {"threshold": conf, "flagged_share": 0.0, "miscount_recall": 0.0},
        {"threshold": 1.0, "flagged_share": 1.0, "miscount_recall": 1.0},
    ]


def test_calibration_is_fitted_on_the_counts_of_a_split(tiny_dataset: Path):
    settings = shrink_params().evaluate
    # Done at once on 4 val images with 1-4 discs each: every count (0) is wrong.
    calibration = calibrate_confidence(exported_model("done")[0], tiny_dataset, settings)
    fit = calibration["fit"]
    assert (fit["split"], fit["images"], fit["exact_share"], fit["not_done"]) == ("val", 4, 0, 0)
    stored = CountCalibration.from_metadata(json.loads(json.dumps(calibration)), "test")
    features = dict(zip(stored.features, stored.center, strict=True))  # every image's
    # Platt's smoothed target for 4 miscounted images and no exact one: 1 / (4 + 2).
    assert confidence_from_features(features, stored) == pytest.approx(1 / 6, abs=0.01)
    # A model that never says done leaves nothing to fit: no calibration.
    assert calibrate_confidence(exported_model("never")[0], tiny_dataset, settings) is None


def test_a_loop_stopped_by_the_guard_is_flagged(dataset: Path):
    params = shrink_params("evaluate.max_objects=3", "evaluate.worst_images=0")
    metrics = run_evaluate(params, exported_model("never")[0], dataset, track=False, device="cpu")
    # Confidence 0 everywhere: every image flagged, so every miscount is caught.
    assert metrics["review_flagged_share"] == 1.0 and metrics["review_miscount_recall"] == 1.0


def test_the_loop_guard_is_reported(dataset: Path):
    params = shrink_params("evaluate.max_objects=3", "evaluate.worst_images=0")
    metrics = run_evaluate(params, exported_model("never")[0], dataset, track=False, device="cpu")
    assert metrics["num_predictions"] == 3 * 7
    assert metrics["stop_guard_rate"] == 1.0
    assert metrics["steps_per_image"] == 3.0
    assert metrics["done_steps"] == 21
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1


def test_evaluate_image_on_a_perfect_rollout():
    record = Record(id="a", image="a.png", points=((10.0, 10.0), (40.0, 30.0)))
    perfect = Prediction(
        count=2,
        points=[[10.5, 10.0], [40.0, 31.0]],
        points_model=[[10.5, 10.0], [40.0, 31.0]],
        done_probs=[0.1, 0.2, 0.9],
        stopped_by="done",
        timings_ms={},
    )
    row, match, probs, labels = evaluate_image(record, perfect, radius=8)
    assert row["f1"] == 1.0 and row["abs_err"] == 0 and row["stop"] == "on_time"
    assert match.matches == 2 and row["px_err_mean"] == pytest.approx(0.75)
    assert labels.tolist() == [0, 0, 1] and probs.tolist() == [0.1, 0.2, 0.9]
    # A duplicate on the way: done at step 3 is still on time (everything found by then).
    twice = Prediction(3, [], [[10, 10], [11, 10], [40, 30]], [0.1, 0.1, 0.1, 0.9], "done", {})
    row, match, _, labels = evaluate_image(record, twice, radius=8)
    assert row["duplicates"] == 1 and row["stop"] == "on_time"
    assert labels.tolist() == [0, 0, 0, 1]  # all found once the third point is marked
    # A duplicate after everything was found: done came one step late.
    late = Prediction(3, [], [[10, 10], [40, 30], [11, 10]], [0.1, 0.1, 0.2, 0.9], "done", {})
    row, _, _, labels = evaluate_image(record, late, radius=8)
    assert row["duplicates"] == 1 and row["stop"] == "late"
    assert labels.tolist() == [0, 0, 1, 1]


def test_dataset_at_another_size_is_refused(tmp_path: Path):
    small = make_tiny_dataset(tmp_path / "small", 0, 0, 1, image_size=32, radius=2)
    with pytest.raises(EvaluateError, match="image_size 32 differs from the model's 64"):
        run_evaluate(shrink_params(), exported_model("done")[0], small, track=False)


def test_evaluate_cli(dataset: Path, tmp_path: Path, capsys):
    params_path = ROOT / "params.yaml"  # every key is required: the real file, overridden
    code = main(
        [
            "evaluate", "--params", str(params_path), "--set", "evaluate.worst_images=1",
            "--model", str(exported_model("done")[0]),
            "--data", str(dataset), "--metrics", str(tmp_path / "m.json"),
            "--plots", str(tmp_path / "plots"), "--out", str(tmp_path / "out"), "--no-mlflow",
        ]
    )  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 7
    assert len(list((tmp_path / "out" / "worst").iterdir())) == 1


def with_run_id(model_dir: Path, run_id: str, dest: Path) -> Path:
    """A copy of an exported_model model whose metadata names ``run_id`` as its training run."""
    dest.mkdir()
    for name in ("encoder.onnx", "step.onnx"):
        graph = onnx.load(model_dir / name)
        meta = json.loads({p.key: p.value for p in graph.metadata_props}["seqops"])
        meta["run_id"] = run_id
        del graph.metadata_props[:]
        onnx.helper.set_model_props(graph, {"seqops": json.dumps(meta, sort_keys=True)})
        onnx.save(graph, dest / name)
    shutil.copy(model_dir / "model.json", dest / "model.json")
    return dest


@pytest.mark.slow
def test_metrics_and_report_go_to_the_training_run(dataset, tmp_path, mlflow_uri):
    import mlflow

    from seqops.tracking import start_run

    training = start_run({}, {"dvc_stage": "train"}, run_name="train")
    training.finish()
    model_dir = with_run_id(exported_model("done")[0], training.run_id, tmp_path / "onnx")
    params = shrink_params("evaluate.worst_images=2")
    metrics = run_evaluate(
        params, model_dir, dataset, plots_dir=tmp_path / "plots", out_dir=tmp_path / "out"
    )
    client = mlflow.MlflowClient(mlflow_uri)
    logged = client.get_run(training.run_id).data.metrics
    assert logged["test/count_mae"] == pytest.approx(metrics["count_mae"])
    robust = json.loads((tmp_path / "out/robust.json").read_text())
    assert logged["test/robust/grey/count_exact_acc"] == robust["robust/grey/count_exact_acc"]
    assert logged[f"test/{ROBUST_HEADLINE}"] == metrics[ROBUST_HEADLINE]
    assert "test/precision" not in logged  # undefined (no predictions): not logged
    artifacts = {a.path for a in client.list_artifacts(training.run_id, "evaluate")}
    assert {"evaluate/per_image.jsonl", "evaluate/worst", "evaluate/plots"} <= artifacts


@pytest.mark.slow  # exports an exemplar model (seconds, shared with other modules)
def test_an_exemplar_model_is_evaluated_with_each_records_boxes(tmp_path: Path):
    from seqops.evaluate import prepare_record
    from seqops.predictor import Predictor

    root = make_tiny_dataset(tmp_path / "prepared", 0, 0, 3)
    records = read_manifest(manifest_path(root, "test"))
    # One box running off the image, and one record without any box.
    records[1] = Record(**{**records[1].__dict__, "exemplars": ((-5.0, 50.0, 20.0, 70.0),)})
    records[2] = Record(**{**records[2].__dict__, "exemplars": ()})
    with open(manifest_path(root, "test"), "w") as f:
        f.writelines(r.to_json() + "\n" for r in records)
    predictor = Predictor(exported_model("exemplars")[0], device="cpu", threads=1)
    prepared = [prepare_record(predictor, root, r) for r in records]
    assert prepared[0].exemplar_mask.sum() > 0
    assert prepared[1].exemplar_mask.sum() > 0  # clipped to the image, not refused
    assert prepared[2].exemplar_mask.sum() == 0  # training's empty mask
    params = shrink_params("evaluate.max_objects=4", "evaluate.worst_images=1")
    metrics = run_evaluate(params, exported_model("exemplars")[0], root, track=False, device="cpu")
    assert metrics["num_images"] == 3


def test_transformed_copies_are_scored_and_the_worst_is_the_headline(dataset: Path, tmp_path):
    """The "never" model places 3 points on every image (the guard): the count is exact where
    3 objects are, and where the points land depends on the pixels."""
    names = ["identity", "grey", "jpeg20", "scale0.5"]
    params = shrink_params(
        f"evaluate.transforms=[{', '.join(names)}]",
        "evaluate.max_objects=3",
        "evaluate.worst_images=0",
    )
    metrics = run_evaluate(
        params, exported_model("never")[0], dataset, metrics_path=tmp_path / "metrics.json",
        out_dir=tmp_path / "out", track=False, device="cpu",
    )  # fmt: skip
    robust = json.loads((tmp_path / "out/robust.json").read_text())
    assert sorted(robust) == sorted(f"robust/{n}/{k}" for n in names for k in ROBUST_METRICS)
    # An unchanged copy scores what the split does.
    assert {k: robust[f"robust/identity/{k}"] for k in ROBUST_METRICS} == {
        k: metrics[k] for k in ROBUST_METRICS
    }
    assert robust["robust/grey/count_exact_acc"] == np.mean(true_counts(dataset) == 3)
    assert metrics[ROBUST_HEADLINE] == min(robust[f"robust/{n}/count_exact_acc"] for n in names)
    # The metrics file gets the headline only.
    assert [k for k in metrics if "robust" in k] == [ROBUST_HEADLINE]
    assert (
        json.loads((tmp_path / "metrics.json").read_text())[ROBUST_HEADLINE]
        == (metrics[ROBUST_HEADLINE])
    )


def test_without_transforms_there_is_no_headline(dataset: Path, tmp_path: Path):
    params = shrink_params("evaluate.transforms=[]", "evaluate.worst_images=0")
    metrics = run_evaluate(
        params, exported_model("done")[0], dataset, out_dir=tmp_path / "out", track=False
    )
    assert metrics[ROBUST_HEADLINE] is None
    assert json.loads((tmp_path / "out/robust.json").read_text()) == {}


def test_a_bad_transform_is_refused_before_counting(dataset: Path):
    params = shrink_params("evaluate.transforms=[grey, jpeg0]")
    with pytest.raises(EvaluateError, match=r"evaluate\.transforms: transform 'jpeg0'"):
        run_evaluate(params, "no/such/model", dataset, track=False)


class OraclePredictor:
    """Finds every true object of the split (in order), ``offset_px`` to the right, in the
    pixels of the image it is given; ``points_model`` stays in the split's model px."""

    def __init__(self, records: list[Record], image_size: int, offset_px: float) -> None:
        self.info = SimpleNamespace(exemplars=False, image_size=image_size)
        self.records, self.offset = iter(records), offset_px

    def prepare(self, image: Image.Image) -> Image.Image:
        return image

    def predict(self, images, max_objects: int, done_threshold: float) -> list[Prediction]:
        out = []
        for image in images:
            true = next(self.records).points_array()
            scale = image.size[0] / self.info.image_size
            points = (true * scale + [self.offset, 0]).tolist()
            n = len(points)
            out.append(Prediction(n, points, true.tolist(), [0.0] * n + [1.0], "done", {}))
        return out


@pytest.mark.parametrize(("offset_px", "all_found"), [(0.0, True), (3.0, True), (5.0, False)])
def test_a_rescaled_copy_is_scored_in_its_own_pixels(dataset: Path, offset_px, all_found):
    """At half size the 8 px radius is 4 px of the copy: 3 px off still matches, 5 px not (the
    rightmost object of every image is missed; another may lie 5 px right of its neighbour)."""
    split = read_split(dataset, "test")
    predictor = OraclePredictor(split.records, 64, offset_px)
    settings = shrink_params("evaluate.match_radius_px=8").evaluate
    scores = score_split(predictor, split, settings, 3, parse_transform("scale0.5"))
    assert [r["pred_count"] for r in scores.rows] == true_counts(dataset).tolist()
    assert [r["f1"] == 1.0 for r in scores.rows if r["true_count"]] == [all_found] * 6
