"""MLflow lineage of the exported model: log it into the training run, register, alias.

Two graphs make one registered model. The ONNX flavour holds one graph, so the step graph
is the flavour's own ``model.onnx`` (small; its signature is ``features, marks -> xy,
done``) and the whole model directory (``encoder.onnx``, ``step.onnx``, ``model.json``) is
logged beside it as the flavour's ``extra_files``. Downloading ``models:/seqops@candidate``
therefore yields a directory holding an ``extra_files/`` folder with the encoder/step pair,
which is what ``seqops.predictor.resolve_model_dir`` looks for.

The tracking URI comes from ``seqops.tracking.resolve_tracking_uri`` (``MLFLOW_TRACKING_URI``
or the embedded SQLite store); nothing is set at import time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seqops.contract import (
    CALIBRATION_KEY,
    ENCODER_FILE,
    METADATA_KEY,
    MODEL_FILES,
    MODEL_NAME,
    STEP_FILE,
    STEP_IO,
)
from seqops.tracking import TrackedRun, attach_run, start_run

log = logging.getLogger(__name__)

REGISTERED_NAME = MODEL_NAME
CANDIDATE_ALIAS = "candidate"
MODEL_ARTIFACT = "model"  # the logged model's name inside the run


def _fluent_mlflow(tracking_uri: str):
    """MLflow's fluent API at ``tracking_uri`` (``mlflow.onnx.log_model`` logs through it)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow


def ensure_run(run_id: str | None, stage: str) -> tuple[TrackedRun, bool]:
    """The training run when it exists in the store; else a new (finished) run for ``stage``.

    Returns:
        ``(run, is_training_run)``. A missing training run (training without tracking, or
        another tracking store) is a warning, not an error: the model is still registered,
        in a run tagged ``lineage=training run not found``.
    """
    if run_id:
        try:
            return attach_run(run_id), True
        except LookupError:
            log.warning("MLflow: training run %s not found in this store; using a new run", run_id)
    tags = {"dvc_stage": stage, "lineage": "training run not found", "training_run_id": run_id}
    tracked = start_run({}, tags=tags, run_name=stage)
    tracked.finish()
    return tracked, False


def _signature(info: Mapping[str, Any]):
    """The step graph's tensor signature: ``features, marks -> xy, done``."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    channels = int(info["model_spec"]["step_channels"]) if "model_spec" in info else -1
    g = int(info["grid"])
    features, marks = STEP_IO.inputs
    xy, done = STEP_IO.outputs
    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema(
            [TensorSpec(f32, (-1, channels, g, g), features), TensorSpec(f32, (-1, 1, g, g), marks)]
        ),
        outputs=Schema([TensorSpec(f32, (-1, 2), xy), TensorSpec(f32, (-1,), done)]),
    )


def _pip_requirements() -> list[str]:
    """Pinned requirements of the flavour, with the one onnxruntime package installed here."""
    from importlib.metadata import version

    import mlflow

    ort = version("onnxruntime-gpu") if _installed("onnxruntime-gpu") else version("onnxruntime")
    return [
        f"mlflow=={mlflow.__version__}",
        f"onnx=={version('onnx')}",
        f"onnxruntime=={ort}",
        f"numpy=={version('numpy')}",
    ]


def _installed(dist: str) -> bool:
    """True when the distribution ``dist`` is installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


def log_model_to_mlflow(
    model_dir: Path,
    run_id: str | None,
    info: Mapping[str, Any],
    name: str = REGISTERED_NAME,
    alias: str = CANDIDATE_ALIAS,
) -> dict[str, Any]:
    """Log the model directory with the ONNX flavour into ``run_id``, register it as
    ``name`` and point ``alias`` at the new version.

    Args:
        model_dir: the exported directory (``encoder.onnx``, ``step.onnx``, ``model.json``).
        run_id: the training run (a new run is used when it is not in the store).
        info: the content of ``model.json`` (metadata, parity, model spec).

    Returns:
        ``{"registered_model", "registered_version", "alias", "model_uri", "mlflow_run_id",
        "logged_in_training_run", "logged_model_id", "tracking_uri"}``.
    """
    run, in_training_run = ensure_run(run_id, "export")
    mlflow = _fluent_mlflow(run.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
        logged = _log_onnx_flavour(mlflow, model_dir, info, name)
        _log_export_facts(run, info)
    version = str(logged.registered_model_version)
    run.client.set_registered_model_alias(name, alias, version)
    for key, value in _version_tags(run.run_id, info).items():
        run.client.set_model_version_tag(name, version, key, value)
    log.info(
        "MLflow: registered %s version %s, alias %s (run %s)", name, version, alias, run.run_id
    )
    return {
        "registered_model": name,
        "registered_version": version,
        "alias": alias,
        "model_uri": f"models:/{name}/{version}",
        "mlflow_run_id": run.run_id,
        "logged_in_training_run": in_training_run,
        "logged_model_id": getattr(logged, "model_id", None),
        "tracking_uri": run.tracking_uri,
    }


def _log_onnx_flavour(mlflow, model_dir: Path, info: Mapping[str, Any], name: str):
    """Log the step graph as the flavour's model, the whole directory as its extra files, and
    register it as ``name``; returns MLflow's ModelInfo."""
    import onnx

    metadata_fields = {k: v for k, v in info.items() if not isinstance(v, dict)}
    return mlflow.onnx.log_model(
        onnx.load(str(model_dir / STEP_FILE)),
        name=MODEL_ARTIFACT,
        extra_files=[str(model_dir / f) for f in MODEL_FILES],
        save_as_external_data=False,
        signature=_signature(info),
        metadata={METADATA_KEY: json.dumps(metadata_fields, sort_keys=True)},
        registered_model_name=name,
        await_registration_for=60,
        # MLflow would infer both onnxruntime and onnxruntime-gpu (they conflict) and ask
        # for CUDA first; the pyfunc of a step graph is portable with the CPU package.
        pip_requirements=_pip_requirements(),
        onnx_execution_providers=["CPUExecutionProvider"],
    )


def _log_export_facts(run: TrackedRun, info: Mapping[str, Any]) -> None:
    """Parity, sizes and the confidence calibration's fit as ``export/*`` metrics; the opset,
    the parity verdict and whether the confidence is calibrated as tags."""
    parity = info["parity"]
    export_metrics = {
        "export/parity_max_abs_diff": parity["max_abs_diff"],
        "export/encoder_bytes": info["files"][ENCODER_FILE]["bytes"],
        "export/step_bytes": info["files"][STEP_FILE]["bytes"],
    }
    calibration = info.get(CALIBRATION_KEY)
    if calibration is not None:
        fit = calibration["fit"]
        export_metrics["export/calibration_images"] = fit["images"]
        export_metrics["export/calibration_exact_share"] = fit["exact_share"]
        export_metrics["export/calibration_log_loss"] = fit["log_loss"]
    run.log_metrics(export_metrics, step=0)
    run.set_tags(
        {
            "export.opset": info["opset"],
            "export.parity_passed": parity["passed"],
            "export.confidence_calibrated": calibration is not None,
        }
    )


def _version_tags(run_id: str, info: Mapping[str, Any]) -> dict[str, str]:
    """The tags a registered version carries: its run, opset, parity and input facts."""
    tags = {
        "run_id": run_id,
        "opset": info["opset"],
        "parity_max_abs_diff": f"{info['parity']['max_abs_diff']:.3g}",
        "preset": info["preset"],
        "image_size": info["image_size"],
        "exemplars": info["exemplars"],
        "confidence_calibrated": info.get(CALIBRATION_KEY) is not None,
    }
    return {key: str(value) for key, value in tags.items()}


def log_evaluation(
    run_id: str | None,
    metrics: Mapping[str, Any],
    artifacts: Mapping[str, Path],
    prefix: str = "test",
) -> str:
    """Log evaluation metrics (``<prefix>/<name>``) and artifacts into the training run.

    Args:
        run_id: the training run the model came from (its ONNX metadata ``run_id``).
        metrics: the stage's metrics dict (numbers are logged; others skipped).
        artifacts: ``{artifact_dir: local path}``; a directory is logged with its content.

    Returns:
        The run id logged into.
    """
    run, _ = ensure_run(run_id, "evaluate")
    logged = run.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=0)
    for artifact_path, local in artifacts.items():
        if Path(local).exists():
            run.log_artifact(local, artifact_path)
    log.info("MLflow: logged %d %s metrics into run %s", logged, prefix, run.run_id)
    return run.run_id
