"""Export the best checkpoint to ONNX: two graphs, checked, parity-tested, registered.

The exported model is a directory in the form ``seqops.contract`` defines (``encoder.onnx``,
``step.onnx``, ``model.json``); both graphs carry the ``seqops`` metadata, so a graph found on
its own still says how to feed it. Each file is self-contained (no external data). The
stage fails, leaving nothing behind, when ``onnx.checker`` (full check) or the
torch/onnxruntime parity check fails.

Calibration: after the checks, the exported graphs count the validation split through the
predictor; the logistic model that turns a loop's signals into ``count_confidence``
(``seqops.confidence``) is fitted on which counts came out exact and written into both graphs'
metadata and ``model.json`` (``count_calibration``), before the directory is renamed into place.

MLflow: the model is logged into the training run with the ONNX flavour (the step graph is
the flavour's ``model.onnx``; ``encoder.onnx``, ``step.onnx`` and ``model.json`` are its extra
files, so ``models:/seqops@candidate`` downloads a directory the predictor loads), registered
as ``seqops`` and given the alias ``candidate``.

The stage's JSON: every fact (opset, parity per output, sizes, ids, the calibration's fit and
weights, the registration) in the report (``reports/export/metrics.json``); the headline
figures (:func:`headline_export`) in the DVC metrics file, so ``dvc metrics show`` and
``diff`` fit a screen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from seqops.config import ExportConfig, Params
from seqops.contract import (
    CALIBRATION_KEY,
    COORDINATES,
    ENCODER_FILE,
    INFO_FILE,
    METADATA_FORMAT,
    METADATA_KEY,
    MODEL_NAME,
    STEP_FILE,
    STEP_IO,
    GraphIO,
    encoder_io,
)
from seqops.io import atomic_directory, atomic_write_json, write_metrics_files
from seqops.model import ModelSpec, SeqCounter
from seqops.parity import PARITY_BATCH, PARITY_MARKS, check_parity

log = logging.getLogger(__name__)

_TRACE_BATCH = 2
CALIBRATION_SPLIT = "val"  # fitted on validation images: the test split stays unseen

# A model directory (graphs written and checked) -> its count_calibration, or None.
Calibrate = Callable[[Path], dict[str, Any] | None]
# What the DVC metrics file holds: parity, sizes, the registered version (flows/pipeline.py
# reads it; registered_model is always seqops.registry.REGISTERED_NAME, its fallback) and
# the calibration's fit summary (its weights are in the report and model.json).
HEADLINE_METRICS = ("parity_max_abs_diff", "encoder_bytes", "step_bytes", "registered_version")
HEADLINE_CALIBRATION = ("calibrated", "images", "exact_share", "log_loss")


class ExportError(ValueError):
    """The export cannot be produced or does not match torch; the message says why."""


# --- the two graphs ---------------------------------------------------------------------


class EncoderGraph(nn.Module):
    """``SeqCounter.encode`` with named inputs, as exported."""

    def __init__(self, model: SeqCounter) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, exemplar_mask: torch.Tensor | None = None):
        features, log_radius = self.model.encode_extent(image, exemplar_mask)
        if log_radius is None:
            return features
        return features, self.model.mark_sigmas(log_radius, image.shape[0])


class StepGraph(nn.Module):
    """``SeqCounter.step`` returning ``(xy, done probability)``: the sigmoid is in-graph."""

    def __init__(self, model: SeqCounter) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, marks: torch.Tensor):
        out = self.model.step(features, marks)
        return out.xy, torch.sigmoid(out.done_logit)


def build_metadata(
    spec: ModelSpec,
    train_params: Mapping[str, Any],
    *,
    done_threshold: float,
    model_version: str,
    run_id: str | None,
) -> dict[str, Any]:
    """The ``seqops`` metadata stored in both graphs (and in ``model.json``).

    Args:
        spec: the network's spec (input size, grid, mark radius, exemplars).
        train_params: the parameters the checkpoint was trained with (its ``params``, every
            key of ``params.yaml``); ``prepare.order``, ``prepare.row_height`` and
            ``train.target`` are read, and a missing one is an :class:`ExportError`.
        done_threshold: the loop stops once ``done`` exceeds it.
        model_version: an identifier of these weights (the registry's version replaces it
            when the predictor loads from the registry).
        run_id: the MLflow training run.
    """
    return {
        "format": METADATA_FORMAT,
        "name": MODEL_NAME,
        "image_size": spec.image_size,
        "grid": spec.grid,
        "stride": spec.stride,
        "mark_sigma": spec.mark_sigma,
        "mark_extent": spec.mark_extent,  # > 0: the encoder's mark_sigma output holds the radius
        "exemplars": spec.exemplars,
        "mean": list(spec.mean),  # the backbone's normalisation: the predictor applies it
        "std": list(spec.std),
        "coordinates": COORDINATES,
        "done_threshold": done_threshold,
        "order": _training_param(train_params, "prepare.order"),
        "row_height": _training_param(train_params, "prepare.row_height"),
        "target": _training_param(train_params, "train.target"),
        "preset": spec.preset,
        "head": spec.head,
        "model_version": model_version,
        "run_id": run_id,
    }


def _metadata_io(metadata: Mapping[str, Any]) -> GraphIO:
    """The encoder's inputs and outputs for the model ``metadata`` describes."""
    return encoder_io(metadata["exemplars"], metadata.get("mark_extent", 0.0) > 0)


def _training_param(train_params: Mapping[str, Any], key: str) -> Any:
    """The value at the dotted ``key`` of the checkpoint's params; ExportError when absent."""
    node: Any = train_params
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ExportError(
                f"the checkpoint's params lack {key} (a checkpoint written by `seqops train` "
                "holds every key of params.yaml)"
            )
        node = node[part]
    return node


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines and known-harmless warnings (torchvision ops
    absent, deprecations); errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    io: GraphIO,
    path: Path,
    *,
    opset: int,
    metadata: dict[str, Any],
) -> None:
    """Export one graph with ``torch.onnx.export`` (the torch.export-based exporter), add the
    metadata, check it (full check) and save it as one self-contained file."""
    proto = _trace(module, args, io, opset, path.name)
    produced = max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    if produced != opset:
        raise ExportError(
            f"{path.name}: export.opset={opset} requested, the exporter produced opset "
            f"{produced} (torch's exporter implements opset >= 18; set export.opset >= 18)"
        )
    _set_metadata(proto, metadata)
    proto.doc_string = f"seqops {path.stem}: {', '.join(io.inputs)} -> {', '.join(io.outputs)}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: onnx.checker (full check) failed: {exc}") from None
    onnx.save_model(proto, str(path), save_as_external_data=False)


def _set_metadata(proto: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Make ``metadata`` the graph's only ``seqops`` metadata."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def rewrite_metadata(model_dir: Path, metadata: dict[str, Any]) -> None:
    """Replace the metadata of both graphs in ``model_dir`` (the weights stay as they are)."""
    for name in (ENCODER_FILE, STEP_FILE):
        proto = onnx.load(str(model_dir / name))
        _set_metadata(proto, metadata)
        onnx.save_model(proto, str(model_dir / name), save_as_external_data=False)


def _trace(
    module: nn.Module, args: tuple[torch.Tensor, ...], io: GraphIO, opset: int, name: str
) -> onnx.ModelProto:
    """The ONNX proto of ``module`` on ``args``, with a dynamic batch axis on every input."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                input_names=list(io.inputs),
                output_names=list(io.outputs),
                dynamic_shapes={name: {0: batch} for name in io.inputs},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many kinds
        raise ExportError(f"{name}: torch.onnx.export failed ({exc})") from exc
    return program.model_proto


def export_encoder(model: SeqCounter, path: Path, opset: int, metadata: dict[str, Any]) -> None:
    """Write the encoder graph of ``model`` (CPU, eval mode) to ``path``."""
    model = model.cpu().eval()
    spec = model.spec
    args: tuple[torch.Tensor, ...] = (
        torch.zeros(_TRACE_BATCH, 3, spec.image_size, spec.image_size),
    )
    if spec.exemplars:
        args += (torch.zeros(_TRACE_BATCH, 1, spec.grid, spec.grid),)
    io = encoder_io(spec.exemplars, spec.mark_extent > 0)
    export_graph(EncoderGraph(model), args, io, path, opset=opset, metadata=metadata)


def export_step(model: SeqCounter, path: Path, opset: int, metadata: dict[str, Any]) -> None:
    """Write the step graph of ``model`` (CPU, eval mode) to ``path``."""
    model = model.cpu().eval()
    spec = model.spec
    features = torch.zeros(_TRACE_BATCH, spec.feature_channels, spec.grid, spec.grid)
    marks = torch.zeros(_TRACE_BATCH, 1, spec.grid, spec.grid)
    export_graph(StepGraph(model), (features, marks), STEP_IO, path, opset=opset, metadata=metadata)


def export_graphs(model: SeqCounter, out_dir: Path, opset: int, metadata: dict[str, Any]) -> None:
    """Write ``encoder.onnx`` and ``step.onnx`` of ``model`` into ``out_dir``."""
    export_encoder(model, out_dir / ENCODER_FILE, opset, metadata)
    export_step(model, out_dir / STEP_FILE, opset, metadata)


# --- the export -------------------------------------------------------------------------


def export_model(
    model: SeqCounter,
    out_dir: str | Path,
    metadata: dict[str, Any],
    settings: ExportConfig,
    *,
    extra_info: dict[str, Any] | None = None,
    calibrate: Calibrate | None = None,
) -> dict[str, Any]:
    """Export ``model`` to the model directory ``out_dir``, atomically, after the checks.

    The graphs are written to a temporary directory, checked (``onnx.checker`` full check),
    compared with torch on CPU; only when the largest difference is within
    ``settings.parity_tolerance`` does the directory replace ``out_dir``.

    Args:
        settings: ``params.export`` (the opset and the parity tolerance).
        extra_info: more facts for ``model.json`` (the checkpoint, the model spec).
        calibrate: fits the confidence calibration on the checked directory; its result
            goes into both graphs' metadata and ``model.json`` as ``count_calibration``
            (None, or a result of None: the model's confidence stays uncalibrated).

    Returns:
        The content of ``model.json``: the metadata, the opset, the parity report
        (``parity.max_abs_diff``, ``parity.tolerance``, ``parity.passed``, per output) and
        the files' sizes and hashes.

    Raises:
        ExportError: the export, the checker or the parity check failed (``out_dir`` is
            left as it was).
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        export_graphs(model, tmp, settings.opset, metadata)
        parity = measure_parity(model, tmp, settings.parity_tolerance)
        if not parity["passed"]:
            worst_name = max(parity["per_output"], key=parity["per_output"].get)
            raise ExportError(
                f"parity: torch and onnxruntime differ by {parity['max_abs_diff']:.3g} on "
                f"{worst_name} (export.parity_tolerance={settings.parity_tolerance}); "
                f"{out_dir} left unchanged"
            )
        calibration = calibrate(tmp) if calibrate is not None else None
        if calibration is not None:
            metadata = {**metadata, CALIBRATION_KEY: calibration}
            rewrite_metadata(tmp, metadata)
        info = {**describe_export(tmp, metadata, settings.opset, parity), **(extra_info or {})}
        atomic_write_json(tmp / INFO_FILE, info)
    log.info(
        "exported %s (opset %d, parity max |diff| %.2g <= %g)",
        out_dir, settings.opset, parity["max_abs_diff"], settings.parity_tolerance,
    )  # fmt: skip
    return info


def measure_parity(model: SeqCounter, model_dir: Path, tolerance: float) -> dict[str, Any]:
    """The parity report of the graphs in ``model_dir`` against ``model`` (CPU)."""
    diffs = check_parity(model, model_dir / ENCODER_FILE, model_dir / STEP_FILE)
    worst = max(diffs.values())
    return {
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "passed": worst <= tolerance,
        "device": "cpu",
        "batch": PARITY_BATCH,
        "marks": dict(PARITY_MARKS),
        "per_output": diffs,
    }


def describe_export(
    model_dir: Path, metadata: dict[str, Any], opset: int, parity: dict[str, Any]
) -> dict[str, Any]:
    """The content of ``model.json`` for the graphs in ``model_dir``."""
    return {
        **metadata,
        "opset": opset,
        "parity": parity,
        "files": {name: _file_facts(model_dir / name) for name in (ENCODER_FILE, STEP_FILE)},
        "inputs": {
            "encoder": list(_metadata_io(metadata).inputs),
            "step": list(STEP_IO.inputs),
        },
        "outputs": {
            "encoder": list(_metadata_io(metadata).outputs),
            "step": list(STEP_IO.outputs),
        },
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }


def _file_facts(path: Path) -> dict[str, Any]:
    """A file's size and SHA-256."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- the stage --------------------------------------------------------------------------


def read_train_run(path: str | Path) -> dict[str, Any]:
    """Read ``train_run.json`` (the training stage's MLflow run id and best epoch)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: not found (run `seqops train` first)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return info


def checkpoint_facts(state: Mapping[str, Any], spec: ModelSpec, digest: str) -> dict[str, Any]:
    """What ``model.json`` records of the checkpoint: epoch, validation loss, hash, spec."""
    return {
        "checkpoint": {
            "epoch": int(state["epoch"]),
            "best_val_loss": float(state["best_val_loss"]),
            "sha256": digest,
        },
        "model_spec": spec.to_dict(),
    }


def summarise_export(info: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's output JSON from ``model.json``'s content: opset, parity, sizes, ids."""
    parity = info["parity"]
    return {
        "opset": info["opset"],
        "parity_max_abs_diff": parity["max_abs_diff"],
        "parity_tolerance": parity["tolerance"],
        "parity_passed": parity["passed"],
        "parity": parity["per_output"],
        "encoder_bytes": info["files"][ENCODER_FILE]["bytes"],
        "step_bytes": info["files"][STEP_FILE]["bytes"],
        "model_version": info["model_version"],
        "run_id": info["run_id"],
        "epoch": info["checkpoint"]["epoch"],
        "calibration": summarise_calibration(info.get(CALIBRATION_KEY)),
    }


def summarise_calibration(calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    """The confidence calibration as the stage's JSON shows it: its fit facts and each
    feature's weight, centre and scale by name (no lists, so ``dvc metrics show`` reads it)."""
    if calibration is None:
        return {"calibrated": False}
    names = calibration["features"]
    return {
        "calibrated": True,
        **calibration["fit"],
        "intercept": calibration["intercept"],
        **{
            key: dict(zip(names, calibration[key], strict=True))
            for key in ("coef", "center", "scale")
        },
    }


def headline_export(result: Mapping[str, Any]) -> dict[str, Any]:
    """The DVC metrics file's content: the :data:`HEADLINE_METRICS` of the stage's JSON and
    the :data:`HEADLINE_CALIBRATION` of its ``calibration``."""
    headline = {k: result[k] for k in HEADLINE_METRICS if k in result}
    calibration = result.get("calibration") or {}
    headline["calibration"] = {k: calibration[k] for k in HEADLINE_CALIBRATION if k in calibration}
    return headline


def write_export_metrics(
    result: Mapping[str, Any], metrics_path: str | Path | None, report_path: str | Path | None
) -> None:
    """The whole stage's JSON to the report, its :func:`headline_export` to the DVC metrics
    file (each when its path is given)."""
    write_metrics_files(result, headline_export(result), metrics_path, report_path)


def _calibrator(params: Params, data_dir: str | Path) -> Calibrate:
    """Fits the confidence calibration of an export on the validation split of ``data_dir``."""
    from seqops.evaluate import calibrate_confidence  # lazy: the evaluation code, for export

    def calibrate(model_dir: Path) -> dict[str, Any] | None:
        return calibrate_confidence(model_dir, data_dir, params.evaluate, CALIBRATION_SPLIT)

    return calibrate


def run_export(
    params: Params,
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    run_path: str | Path | None = None,
    data_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    register: bool = True,
    report_path: str | Path | None = None,
) -> dict[str, Any]:
    """The ``export`` stage: checkpoint -> checked, calibrated ONNX model dir -> MLflow.

    Args:
        params: ``export.opset``, ``export.parity_tolerance``, ``evaluate.done_threshold``
            and, to calibrate, ``evaluate.max_objects`` are read; the network itself is
            rebuilt from the checkpoint alone.
        checkpoint_path: the best checkpoint (``models/best.pt``).
        out_dir: the model directory (``models/onnx``), replaced atomically.
        run_path: ``train_run.json``; its ``run_id`` (else the checkpoint's) is the training
            run the model is logged into.
        data_dir: the prepared dataset (``data/prepared``) whose validation split calibrates
            ``count_confidence``; None exports without a calibration.
        metrics_path: where the headline figures go (``metrics/export.json``).
        register: log to MLflow, register as ``seqops`` and set alias ``candidate``.
        report_path: where the whole stage's JSON goes (``reports/export/metrics.json``).

    Returns:
        The stage's output JSON: opset, parity, sizes, run id, registered version.
    """
    from seqops.training.checkpoint import build_model, load_checkpoint

    state = load_checkpoint(checkpoint_path)
    model = build_model(state)
    run_id = (read_train_run(run_path) if run_path is not None else {}).get("run_id")
    run_id = run_id or state.get("run_id")
    # The checkpoint's hash identifies these weights until the registry gives a version.
    digest = _sha256(checkpoint_path)[:12]
    metadata = build_metadata(
        model.spec,
        state["params"],
        done_threshold=params.evaluate.done_threshold,
        model_version=f"sha256-{digest}",
        run_id=run_id,
    )
    extra_info = checkpoint_facts(state, model.spec, digest)
    calibrate = _calibrator(params, data_dir) if data_dir is not None else None
    if calibrate is None:
        log.info("no dataset to calibrate on: count_confidence stays uncalibrated")
    info = export_model(
        model, out_dir, metadata, params.export, extra_info=extra_info, calibrate=calibrate
    )
    result = summarise_export(info)
    if register:
        from seqops.registry import log_model_to_mlflow

        result.update(log_model_to_mlflow(Path(out_dir), run_id, info))
    write_export_metrics(result, metrics_path, report_path)
    return result
