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

from seqops.contract import ENCODER_FILE, METADATA_KEY, MODEL_FILES, STEP_FILE

log = logging.getLogger(__name__)

REGISTERED_NAME = "seqops"
CANDIDATE_ALIAS = "candidate"
MODEL_ARTIFACT = "model"  # the logged model's name inside the run


def _client():
    """The tracking URI is set for MLflow's fluent API too: ``log_model`` uses it."""
    import mlflow

    from seqops.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri()
    mlflow.set_tracking_uri(uri)
    return mlflow, mlflow.MlflowClient(uri)


def ensure_run(run_id: str | None, stage: str) -> tuple[str, bool]:
    """The training run when it exists in the store; else a new run for ``stage``.

    Returns:
        ``(run_id, is_training_run)``. A missing training run (training without tracking, or
        another tracking store) is a warning, not an error: the model is still registered,
        in a run tagged ``lineage=training run not found``.
    """
    _, client = _client()
    if run_id:
        try:
            client.get_run(run_id)
            return run_id, True
        except Exception:  # MlflowException: not in this store
            log.warning("MLflow: training run %s not found in this store; using a new run", run_id)
    from seqops.tracking import start_run

    tags = {"dvc_stage": stage, "lineage": "training run not found", "training_run_id": run_id}
    tracked = start_run({}, tags=tags, run_name=stage)
    tracked.finish()
    return tracked.run_id, False


def _signature(info: Mapping[str, Any]):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    channels = int(info["model_spec"]["step_channels"]) if "model_spec" in info else -1
    g = int(info["grid"])
    return ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, channels, g, g), "features"),
                TensorSpec(np.dtype(np.float32), (-1, 1, g, g), "marks"),
            ]
        ),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, 2), "xy"),
                TensorSpec(np.dtype(np.float32), (-1,), "done"),
            ]
        ),
    )


def _pip_requirements() -> list[str]:
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
        "logged_model_id", "tracking_uri"}``.
    """
    import onnx

    mlflow, client = _client()
    run_id, in_training_run = ensure_run(run_id, "export")
    metadata_fields = {k: v for k, v in info.items() if not isinstance(v, dict)}
    with mlflow.start_run(run_id=run_id):
        logged = mlflow.onnx.log_model(
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
        parity = info["parity"]
        mlflow.log_metrics(
            {
                "export/parity_max_abs_diff": parity["max_abs_diff"],
                "export/encoder_bytes": info["files"][ENCODER_FILE]["bytes"],
                "export/step_bytes": info["files"][STEP_FILE]["bytes"],
            }
        )
        mlflow.set_tags({"export.opset": info["opset"], "export.parity_passed": parity["passed"]})
    version = str(logged.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    tags = {
        "run_id": run_id,
        "opset": info["opset"],
        "parity_max_abs_diff": f"{parity['max_abs_diff']:.3g}",
        "preset": info.get("preset"),
        "image_size": info.get("image_size"),
        "exemplars": info.get("exemplars"),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    log.info("MLflow: registered %s version %s, alias %s (run %s)", name, version, alias, run_id)
    return {
        "registered_model": name,
        "registered_version": version,
        "alias": alias,
        "model_uri": f"models:/{name}/{version}",
        "mlflow_run_id": run_id,
        "logged_in_training_run": in_training_run,
        "logged_model_id": getattr(logged, "model_id", None),
        "tracking_uri": mlflow.get_tracking_uri(),
    }


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
    _, client = _client()
    run_id, _ = ensure_run(run_id, "evaluate")
    numbers = {
        f"{prefix}/{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    batch = [Metric(k, v, now, 0) for k, v in numbers.items()]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])
    for artifact_path, local in artifacts.items():
        local = Path(local)
        if local.is_dir():
            client.log_artifacts(run_id, str(local), artifact_path)
        elif local.is_file():
            client.log_artifact(run_id, str(local), artifact_path)
    log.info("MLflow: logged %d %s metrics into run %s", len(numbers), prefix, run_id)
    return run_id
