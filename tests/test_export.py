"""ONNX export: two checked, self-describing graphs that match torch; the stage; MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import (
    ROOT,
    TINY_MODELS,
    exported_model,
    make_tiny_dataset,
    shrink_params,
    tiny_metadata,
    tiny_spec,
    tiny_torch_model,
)

from seqops import export as E
from seqops.cli import main
from seqops.config import ConfigError
from seqops.contract import ENCODER_FILE, STEP_FILE
from seqops.model import ModelSpec
from seqops.parity import check_parity, parity_inputs
from seqops.testing import make_untrained_model
from seqops.training.checkpoint import save_checkpoint

CONTRACT_KEYS = {
    "format", "name", "image_size", "grid", "mark_sigma", "exemplars", "mean", "std",
    "coordinates", "done_threshold", "order", "row_height", "preset", "model_version", "run_id",
}  # fmt: skip


def graph_metadata(path: Path) -> dict:
    """The ``seqops`` metadata of the ONNX file at ``path``."""
    return json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["seqops"])


def graph_io(model: onnx.ModelProto, which: str) -> dict[str, list]:
    values = model.graph.input if which == "input" else model.graph.output
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values
    }


def test_export_writes_two_checked_self_describing_graphs():
    model_dir, info = exported_model("plain")
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "encoder.onnx",
        "model.json",
        "step.onnx",
    ]
    g, c = info["grid"], info["model_spec"]["step_channels"]
    metas = []
    for name in ("encoder.onnx", "step.onnx"):
        model = onnx.load(model_dir / name)
        onnx.checker.check_model(model, full_check=True)
        assert not onnx.external_data_helper._get_all_tensors(model) or all(
            not onnx.external_data_helper.uses_external_data(t)
            for t in onnx.external_data_helper._get_all_tensors(model)
        )
        assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
        metas.append(json.loads({p.key: p.value for p in model.metadata_props}["seqops"]))
    assert metas[0] == metas[1]
    assert set(metas[0]) >= CONTRACT_KEYS
    assert metas[0]["image_size"] == 64 and metas[0]["grid"] == g == 8
    assert metas[0]["order"] == "reading_order" and metas[0]["done_threshold"] == 0.5
    encoder, step = onnx.load(model_dir / "encoder.onnx"), onnx.load(model_dir / "step.onnx")
    assert graph_io(encoder, "input") == {"image": ["batch", 3, 64, 64]}
    assert graph_io(encoder, "output") == {"features": ["batch", c, g, g]}
    assert graph_io(step, "input") == {"features": ["batch", c, g, g], "marks": ["batch", 1, g, g]}
    assert graph_io(step, "output") == {"xy": ["batch", 2], "done": ["batch"]}
    written = json.loads((model_dir / "model.json").read_text())
    assert written["parity"]["passed"] is True
    assert written["parity"]["max_abs_diff"] <= 1e-4
    assert set(written["parity"]["per_output"]) == {
        "features",
        *(f"{o}/marks_{k}" for o in ("xy", "done") for k in ("0", "1", "many")),
    }
    assert written["files"]["encoder.onnx"]["bytes"] == (model_dir / "encoder.onnx").stat().st_size


def test_graphs_take_any_batch_size_and_output_probabilities():
    model_dir, _ = exported_model("plain")
    encoder = ort.InferenceSession(
        str(model_dir / "encoder.onnx"), providers=["CPUExecutionProvider"]
    )
    step = ort.InferenceSession(str(model_dir / "step.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        image = np.random.default_rng(batch).normal(size=(batch, 3, 64, 64)).astype(np.float32)
        (features,) = encoder.run(None, {"image": image})
        marks = np.zeros((batch, 1, 8, 8), np.float32)
        xy, done = step.run(None, {"features": features, "marks": marks})
        assert xy.shape == (batch, 2) and done.shape == (batch,)
        assert np.all((done >= 0) & (done <= 1))
        assert np.all(np.abs(xy) <= 1)


def test_parity_is_measured_with_zero_one_and_many_marks():
    model_dir, _ = exported_model("plain")
    diffs = check_parity(
        tiny_torch_model("plain"), model_dir / "encoder.onnx", model_dir / "step.onnx"
    )
    assert max(diffs.values()) <= 1e-4
    inputs = parity_inputs(tiny_spec())
    assert [int(inputs[k].max() > 0) for k in ("marks_0", "marks_1", "marks_many")] == [0, 1, 1]
    # "Many" marks cover much more of the grid than one.
    assert (inputs["marks_many"] > 0.5).sum() > 10 * (inputs["marks_1"] > 0.5).sum()


def test_parity_failure_fails_the_export_and_keeps_the_old_model(tmp_path, monkeypatch):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("the previous export")
    plain_dir, _ = exported_model("plain")

    # Graphs of one network checked against another (other seed): a real mismatch.
    def write_plain_graphs(model, out_dir, opset, metadata):
        for name in (ENCODER_FILE, STEP_FILE):
            shutil.copy(plain_dir / name, out_dir / name)

    monkeypatch.setattr(E, "export_graphs", write_plain_graphs)
    other = make_untrained_model(tiny_spec(), seed=1)
    with pytest.raises(E.ExportError, match="parity: torch and onnxruntime differ"):
        E.export_model(other, out, tiny_metadata("plain"), shrink_params().export)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx.")]  # no temp left


def test_metadata_comes_from_the_checkpoints_params_and_names_a_missing_key():
    trained = shrink_params("prepare.order=left_to_right", "train.target=nearest_unmarked")
    train_params = trained.model_dump(mode="json")
    meta = E.build_metadata(
        tiny_spec(), train_params, done_threshold=0.7, model_version="v", run_id="r"
    )
    assert (meta["order"], meta["row_height"], meta["target"]) == (
        "left_to_right", trained.prepare.row_height, "nearest_unmarked"
    )  # fmt: skip
    assert (meta["done_threshold"], meta["model_version"], meta["run_id"]) == (0.7, "v", "r")
    del train_params["train"]["target"]
    with pytest.raises(E.ExportError, match=r"params lack train\.target"):
        E.build_metadata(
            tiny_spec(), train_params, done_threshold=0.5, model_version="v", run_id=None
        )


def test_opset_below_18_is_a_config_error():
    with pytest.raises(ConfigError, match=r"export\.opset"):
        shrink_params("export.opset=17")


def write_checkpoint(
    tmp_path: Path, params, run_id: str | None = None, done_bias: float | None = None
) -> Path:
    spec = tiny_spec()
    model = make_untrained_model(spec, seed=3, done_bias=done_bias)
    path = tmp_path / "models" / "best.pt"
    save_checkpoint(
        path,
        {
            "model_state": model.state_dict(),
            "model_spec": spec.to_dict(),
            "params": params.model_dump(mode="json"),
            "epoch": 4,
            "best_val_loss": 0.25,
            "run_id": run_id,
        },
    )
    return path


@pytest.mark.slow  # a full export of a checkpoint (seconds)
def test_export_stage_from_a_checkpoint_through_the_cli(tmp_path, capsys):
    params = shrink_params("prepare.order=left_to_right", "evaluate.done_threshold=0.6")
    params_path = ROOT / "params.yaml"  # every key is required: the real file, overridden
    # Says done at once: on the 4 val images (1-4 discs each) every count, 0, is wrong.
    checkpoint = write_checkpoint(tmp_path, params, done_bias=20.0)
    data = make_tiny_dataset(tmp_path / "prepared")
    run_path = tmp_path / "models" / "train_run.json"
    run_path.write_text(json.dumps({"run_id": "abc123", "best_epoch": 4}))
    out, metrics = tmp_path / "models" / "onnx", tmp_path / "metrics" / "export.json"
    report = tmp_path / "reports" / "export" / "metrics.json"
    code = main(
        [
            "export", "--params", str(params_path), "--set", "evaluate.done_threshold=0.6",
            "--checkpoint", str(checkpoint), "--data", str(data), "--run", str(run_path),
            "--out", str(out), "--metrics", str(metrics), "--report", str(report), "--no-mlflow",
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(report.read_text())  # every fact, as printed
    assert json.loads(capsys.readouterr().out) == result
    # DVC's metrics file: parity, sizes and the calibration's fit only (no weights, no ids).
    assert json.loads(metrics.read_text()) == {
        "parity_max_abs_diff": result["parity_max_abs_diff"],
        "encoder_bytes": result["encoder_bytes"], "step_bytes": result["step_bytes"],
        "calibration": {"calibrated": True, "images": 4, "exact_share": 0.0,
                        "log_loss": result["calibration"]["log_loss"]},
    }  # fmt: skip
    assert result["parity_passed"] is True and result["parity_max_abs_diff"] <= 1e-4
    assert result["parity_tolerance"] == 1e-4 and result["opset"] == 18
    assert result["run_id"] == "abc123" and result["epoch"] == 4
    info = json.loads((out / "model.json").read_text())
    assert info["run_id"] == "abc123"
    assert info["order"] == "left_to_right"  # the checkpoint's training params
    assert info["done_threshold"] == 0.6  # evaluate.done_threshold
    assert info["checkpoint"] == {
        "epoch": 4, "best_val_loss": 0.25, "sha256": info["model_version"][len("sha256-"):]
    }  # fmt: skip
    from seqops.predictor import Predictor

    predictor = Predictor(out, device="cpu", threads=1)
    assert predictor.info.run_id == "abc123"
    assert predictor.info.done_threshold == 0.6
    # The calibration: the same in both graphs and model.json, read by the predictor.
    calibration = info["count_calibration"]
    assert [graph_metadata(out / name)["count_calibration"] for name in (ENCODER_FILE, STEP_FILE)
            ] == [calibration, calibration]  # fmt: skip
    assert calibration["fit"] == {
        "images": 4, "exact_share": 0.0, "split": "val", "not_done": 0, "l2": 1.0,
        "log_loss": pytest.approx(calibration["fit"]["log_loss"]),
    }  # fmt: skip
    assert predictor.info.confidence_calibrated
    assert predictor.info.calibration.coef == tuple(calibration["coef"])
    image = data / "images" / "val" / "val_0000.png"
    # Platt's smoothed target with 4 miscounted images and no exact one: 1 / (4 + 2).
    assert predictor.predict([image])[0].count_confidence == pytest.approx(1 / 6, abs=0.01)
    assert result["calibration"]["calibrated"] and result["calibration"]["images"] == 4
    assert result["calibration"]["coef"] == dict(
        zip(calibration["features"], calibration["coef"], strict=True)
    )
    # The file hashes in model.json are those of the graphs with the calibration.
    assert info["files"]["step.onnx"]["sha256"] == E._sha256(out / "step.onnx")


def test_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--no-mlflow",
                 "--out", str(tmp_path / "onnx"), "--run", str(tmp_path / "run.json")])  # fmt: skip
    assert code == 2
    assert "best.pt: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_exemplar_model_exports_with_its_mask_input():
    model_dir, info = exported_model("exemplars")
    assert TINY_MODELS["exemplars"][0] is True and info["exemplars"] is True
    encoder = onnx.load(model_dir / "encoder.onnx")
    assert graph_io(encoder, "input") == {
        "image": ["batch", 3, 64, 64],
        "exemplar_mask": ["batch", 1, 8, 8],
    }
    assert info["parity"]["passed"] and info["parity"]["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_pooled_head_exports_with_parity(tmp_path):
    spec = ModelSpec.from_preset("tiny", 64, False, head="pooled")
    model = make_untrained_model(spec, seed=0)
    params = shrink_params()
    metadata = E.build_metadata(
        spec, params.model_dump(mode="json"), done_threshold=0.5, model_version="p", run_id=None
    )
    info = E.export_model(model, tmp_path / "onnx", metadata, params.export)
    assert info["parity"]["passed"] and info["head"] == "pooled"


def test_step_graph_permutes_the_cells_once(tmp_path):
    """At batch 1 a step's cost is mostly per node: the scan's rank order is reached by one
    GatherElements and never left (the soft-argmax runs in it; the map back to the grid
    serves training's heat_logits only, which the graph does not return)."""
    spec = ModelSpec.from_preset(
        "tiny", 64, False, order_prior="scan", count_head=True, count_prior=True, done_peak=True
    )
    model = make_untrained_model(spec, seed=0)
    E.export_step(model, tmp_path / "step.onnx", shrink_params().export.opset, metadata={})
    ops = [node.op_type for node in onnx.load(tmp_path / "step.onnx").graph.node]
    assert ops.count("GatherElements") == 1
    assert ops.count("Gather") == 1  # the peak's coordinates (the window's centre)
    assert "GatherND" not in ops and "ScatterElements" not in ops
    assert ops.count("MatMul") == 2  # the maps (heat, objects, left) at once; the expectation


@pytest.mark.slow
def test_export_registers_the_model_in_the_training_run(tmp_path, mlflow_uri, monkeypatch):
    import mlflow

    from seqops.tracking import start_run

    monkeypatch.chdir(tmp_path)
    params = shrink_params()
    training = start_run(params.model_dump(mode="json"), {"dvc_stage": "train"}, run_name="train")
    training.finish()
    checkpoint = write_checkpoint(tmp_path, params, run_id=training.run_id)
    run_path = tmp_path / "models" / "train_run.json"
    run_path.write_text(json.dumps({"run_id": training.run_id}))
    result = E.run_export(
        params,
        checkpoint,
        tmp_path / "models" / "onnx",
        run_path=run_path,
        metrics_path=tmp_path / "export.json",
        report_path=tmp_path / "report.json",
    )
    assert result["mlflow_run_id"] == training.run_id and result["logged_in_training_run"]
    client = mlflow.MlflowClient(mlflow_uri)
    version = client.get_model_version_by_alias("seqops", "candidate")
    assert str(version.version) == result["registered_version"]
    assert version.run_id == training.run_id
    # Exported without --data: no calibration, and both the version and the JSON say so.
    assert version.tags["confidence_calibrated"] == "False"
    assert result["calibration"] == {"calibrated": False}
    # The flow reads the registered version from DVC's metrics file; the report has it all.
    assert json.loads((tmp_path / "export.json").read_text()) == {
        "parity_max_abs_diff": result["parity_max_abs_diff"],
        "encoder_bytes": result["encoder_bytes"], "step_bytes": result["step_bytes"],
        "registered_version": str(version.version), "calibration": {"calibrated": False},
    }  # fmt: skip
    assert json.loads((tmp_path / "report.json").read_text()) == result
    run = client.get_run(training.run_id)
    assert run.data.metrics["export/parity_max_abs_diff"] == pytest.approx(
        result["parity_max_abs_diff"]
    )
    local = Path(mlflow.artifacts.download_artifacts("models:/seqops@candidate"))
    flavour = mlflow.models.Model.load(local / "MLmodel")
    assert "onnx" in flavour.flavors
    assert (local / "extra_files" / "encoder.onnx").is_file()
    assert (local / "extra_files" / "step.onnx").is_file()
    requirements = (local / "requirements.txt").read_text().split()
    assert [r for r in requirements if r.startswith("onnxruntime")] == [
        f"onnxruntime=={ort.__version__}"
    ]  # one runtime package, not both the CPU and GPU ones (they conflict)
    # Registering again (a later export) makes a new version and moves the alias to it.
    from seqops.registry import log_model_to_mlflow

    model_dir = tmp_path / "models" / "onnx"
    info = json.loads((model_dir / "model.json").read_text())
    again = log_model_to_mlflow(model_dir, training.run_id, info)
    assert int(again["registered_version"]) == int(result["registered_version"]) + 1
    moved = client.get_model_version_by_alias("seqops", "candidate")
    assert str(moved.version) == again["registered_version"]
