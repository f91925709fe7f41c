"""The iterative predictor on onnxruntime: encode once, step until done. No torch here.

Serving and evaluation both run models through this module, so what is measured is
what users get. A model is a directory in the form ``seqops.contract`` describes; it is
loaded from a path or from the MLflow registry (``models:/seqops@champion``,
``models:/seqops/3``). The loop itself is ``seqops.rollout``'s.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from seqops import confidence, imaging
from seqops.contract import (
    DEFAULT_MAX_OBJECTS,
    ENCODER_FILE,
    MAX_EXEMPLARS,
    METADATA_KEY,
    STEP_FILE,
    STEP_IO,
    ContractError,
    ModelInfo,
    is_model_dir,
    parse_metadata,
    require_model_dir,
)
from seqops.rollout import Rollout, run_rollouts

log = logging.getLogger(__name__)


class PredictorError(ContractError):
    """A model cannot be loaded or a request does not fit the model; says which and why."""


@dataclass
class PreparedImage:
    """One request image turned into network inputs."""

    pixels: np.ndarray  # float32 [3, S, S], normalised
    orig_size: tuple[int, int]  # (width, height)
    scale: tuple[float, float]  # model px = original px * scale
    exemplar_mask: np.ndarray | None  # float32 [1, g, g]


@dataclass
class Prediction:
    """The answer for one image: points in the caller's original pixel coordinates."""

    count: int
    points: list[list[float]]
    points_model: list[list[float]]  # at model input size
    done_probs: list[float]
    stopped_by: str
    timings_ms: dict[str, float]
    # How likely ``count`` is exact (seqops.confidence); 0 when the loop did not say done.
    count_confidence: float = 0.0
    # The signals it came from (seqops.confidence.FEATURES; empty when the loop did not say
    # done): what export fits the calibration on and evaluation reports per image.
    confidence_features: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON answer (without the model-pixel points and the confidence's features)."""
        return {
            "count": self.count,
            "count_confidence": self.count_confidence,
            "points": self.points,
            "done_probs": self.done_probs,
            "stopped_by": self.stopped_by,
            "timings_ms": self.timings_ms,
        }


# --- providers -------------------------------------------------------------------------


def cuda_usable() -> bool:
    """True when a CUDA driver with at least one device is present.

    onnxruntime-gpu lists CUDAExecutionProvider wherever it is installed, and on a host
    without a GPU, asking for it prints library-load errors before falling back. Asking the
    driver first keeps CPU hosts silent.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return (
        cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    )


def choose_providers(device: str) -> list[str]:
    """Execution providers for ``device`` = ``auto`` | ``cuda`` | ``cpu``."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if not cuda_usable():
            raise PredictorError("device=cuda: no usable CUDA device/driver on this host")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return choose_providers("cuda" if cuda_usable() else "cpu")
    raise PredictorError(f"device={device!r}: expected auto, cuda or cpu")


def session_options(threads: int, spin: bool) -> ort.SessionOptions:
    """Options chosen on purpose: all graph optimisations, a fixed thread count, and no
    spinning by default, since the Python loop between step runs would leave spinning
    threads burning cores that other requests/workers need."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return opts


# --- loading ---------------------------------------------------------------------------


def resolve_model_dir(uri: str | Path) -> tuple[Path, str | None]:
    """A local model directory for ``uri``, and the registry version when it came from one.

    ``uri`` is a directory holding ``encoder.onnx`` and ``step.onnx``, or an MLflow URI
    (``models:/name@alias``, ``models:/name/version``, ``runs:/...``), downloaded with the
    tracking URI from ``MLFLOW_TRACKING_URI`` (else the project's embedded store).
    """
    text = str(uri)
    if "://" not in text and ":/" not in text:
        try:
            return require_model_dir(Path(text)), None
        except ContractError as exc:
            raise PredictorError(str(exc)) from None
    import mlflow  # lazy: the registry client is only needed for registry URIs

    from seqops.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri())
    version = _registry_version(mlflow, text)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    except Exception as exc:
        raise PredictorError(f"{text}: cannot download from MLflow ({exc})") from None
    found = sorted(p.parent for p in local.rglob(ENCODER_FILE) if is_model_dir(p.parent))
    if not found:
        raise PredictorError(f"{text}: the MLflow model holds no {ENCODER_FILE}/{STEP_FILE} pair")
    return found[0], version


def _registry_version(mlflow, uri: str) -> str | None:
    """The registry version a ``models:/`` URI names (an alias resolved); None otherwise."""
    if not uri.startswith("models:/"):
        return None
    ref = uri.removeprefix("models:/")
    client = mlflow.MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = ref.partition("/")
        return version or None
    except Exception as exc:
        raise PredictorError(f"{uri}: not found in the MLflow registry ({exc})") from None


def read_metadata(path: Path | ort.InferenceSession, source: str | None = None) -> dict:
    """The ``seqops`` metadata JSON stored in an ONNX file (or an open session of one)."""
    if isinstance(path, ort.InferenceSession):
        session = path
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        return parse_metadata(raw, source or str(path))
    except ContractError as exc:
        raise PredictorError(str(exc)) from None


# --- the predictor ---------------------------------------------------------------------


class Predictor:
    """Encode once, step until done, on onnxruntime.

    Args:
        model_dir: directory with ``encoder.onnx`` and ``step.onnx``.
        device: ``auto`` (CUDA only where it really works), ``cuda`` or ``cpu``.
        threads: intra-op threads per session; 0 lets onnxruntime choose (all cores).
        spin: let idle onnxruntime threads spin (lower latency alone, worse when shared).
        warmup: run each graph once at load so the first request is not slow.
        version: the registry version it was loaded as (replaces the metadata's
            ``model_version``, which is the export's checkpoint hash).
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        threads: int = 0,
        spin: bool = False,
        warmup: bool = True,
        version: str | None = None,
    ):
        model_dir = Path(model_dir)
        providers = choose_providers(device)
        opts = session_options(threads, spin)
        try:
            self._encoder = ort.InferenceSession(str(model_dir / ENCODER_FILE), opts, providers)
            self._step = ort.InferenceSession(str(model_dir / STEP_FILE), opts, providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise PredictorError(f"{model_dir}: cannot load the ONNX graphs ({exc})") from None
        # Metadata from the sessions just opened (the encoder is not loaded twice); both
        # graphs must come from the same export, or features would not fit the step.
        meta = read_metadata(self._encoder, str(model_dir / ENCODER_FILE))
        if read_metadata(self._step, str(model_dir / STEP_FILE)) != meta:
            raise PredictorError(
                f"{model_dir}: {ENCODER_FILE} and {STEP_FILE} carry different metadata"
                " (graphs from two different exports)"
            )
        if version is not None:
            meta["model_version"] = version
        try:
            self.info = ModelInfo.from_metadata(meta, str(model_dir / ENCODER_FILE))
            confidence.as_calibration(self.info.calibration, str(model_dir / ENCODER_FILE))
        except ValueError as exc:  # ContractError, or a calibration on unknown features
            raise PredictorError(str(exc)) from None
        self.model_dir = model_dir
        self.provider = self._step.get_providers()[0]
        log.info(
            "loaded %s (model version %s) on %s%s",
            model_dir, self.info.model_version, self.provider,
            "" if self.info.confidence_calibrated else "; count_confidence uncalibrated",
        )  # fmt: skip
        if warmup:
            self.warm_up()

    @classmethod
    def load(cls, uri: str | Path, **kwargs) -> Predictor:
        """Load from a directory or an MLflow URI (``models:/seqops@champion``)."""
        model_dir, version = resolve_model_dir(uri)
        return cls(model_dir, version=version, **kwargs)

    # -- inputs ------------------------------------------------------------------------

    def prepare(
        self, image: Image.Image | bytes | str | Path, exemplars: Sequence | None = None
    ) -> PreparedImage:
        """Decode/resize/normalise an image and render its exemplar boxes (original px)."""
        if not isinstance(image, Image.Image):
            image = imaging.load_image(image)
        pixels, scale = imaging.resize_for_model(image.convert("RGB"), self.info.image_size)
        mask = self._exemplar_mask(exemplars, image.size, scale)
        return PreparedImage(
            imaging.normalize_pixels(pixels, self.info.mean, self.info.std), image.size, scale, mask
        )

    def _exemplar_mask(self, exemplars, size, scale) -> np.ndarray | None:
        """The exemplar mask ``[1, g, g]`` of boxes in original px; checks them first."""
        given = exemplars is not None and len(exemplars) > 0
        if not self.info.exemplars:
            if given:
                raise PredictorError(
                    "exemplars: this model was trained without exemplars; send none"
                )
            return None
        if not given:
            raise PredictorError(
                f"exemplars: this model counts the kind shown by 1-{MAX_EXEMPLARS} exemplar boxes"
                " [x1, y1, x2, y2] (original image pixels); none were given"
            )
        boxes = np.asarray(exemplars, np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not 1 <= len(boxes) <= MAX_EXEMPLARS:
            raise PredictorError(
                f"exemplars: expected 1-{MAX_EXEMPLARS} boxes [x1, y1, x2, y2], got {exemplars!r}"
            )
        width, height = size
        for box in boxes:
            x1, y1, x2, y2 = box
            if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
                raise PredictorError(
                    f"exemplars: box {box.tolist()} is empty or outside the {width}x{height} image"
                )
        boxes_model = boxes * np.array([scale[0], scale[1], scale[0], scale[1]])
        mask = imaging.render_exemplar_mask(boxes_model, self.info.image_size, self.info.grid)
        return mask[None]

    # -- the two graphs ---------------------------------------------------------------

    def encode(self, images: Sequence[PreparedImage]) -> np.ndarray:
        """Run the encoder on a batch: ``[B, C, g, g]`` features."""
        return self.encode_marked(images)[0]

    def encode_marked(self, images: Sequence[PreparedImage]) -> tuple[np.ndarray, np.ndarray]:
        """Run the encoder on a batch: ``[B, C, g, g]`` features and ``[B]`` the radius of
        each image's marks, grid cells (the encoder's, when marks follow the object's
        extent; else the model's ``mark_sigma``)."""
        inputs = [np.stack([im.pixels for im in images])]
        if self.info.exemplars:
            inputs.append(np.stack([im.exemplar_mask for im in images]))
        io = self.info.encoder_io
        outputs = self._encoder.run(list(io.outputs), dict(zip(io.inputs, inputs, strict=True)))
        if len(outputs) > 1:
            return outputs[0], outputs[1]
        return outputs[0], np.full(len(images), self.info.mark_sigma, np.float32)

    def step(self, features: np.ndarray, marks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run one step on a batch: normalised ``xy`` ``[B, 2]`` and ``done`` ``[B]``."""
        feed = dict(zip(STEP_IO.inputs, (features, marks), strict=True))
        xy, done = self._step.run(list(STEP_IO.outputs), feed)
        return xy, done

    def start(
        self,
        images: Sequence[PreparedImage],
        encoded: tuple[np.ndarray, np.ndarray] | None = None,
        initial_points: Sequence[Sequence[Sequence[float]]] | None = None,
    ) -> list[Rollout]:
        """One :class:`Rollout` per image, holding its encoding (``encode_marked``'s, run here
        unless ``encoded`` is given), fresh or continuing from ``initial_points`` (normalised,
        one list per image)."""
        features, sigmas = self.encode_marked(images) if encoded is None else encoded
        initial = initial_points or [()] * len(images)
        return [
            Rollout.start(
                self.info.grid, float(sigmas[i]), initial[i], image=im, features=features[i]
            )
            for i, im in enumerate(images)
        ]

    # -- the loop ---------------------------------------------------------------------

    def predict(
        self,
        images: Sequence[Image.Image | bytes | str | Path | PreparedImage],
        exemplars: Sequence[Sequence | None] | None = None,
        max_objects: int = DEFAULT_MAX_OBJECTS,
        done_threshold: float | None = None,
        deadline: float | None = None,
    ) -> list[Prediction]:
        """Count every image: encode the batch once, then step all unfinished images together.

        Args:
            images: images (PIL, encoded bytes, paths) or already prepared ones.
            exemplars: per image, its exemplar boxes in original pixels (or None).
            max_objects: guard against a loop that never says done.
            done_threshold: stop when done exceeds it (default: the model's).
            deadline: ``time.monotonic()`` value after which the loop stops between steps.
        """
        if max_objects < 1:
            raise PredictorError(f"max_objects: must be >= 1, got {max_objects}")
        threshold = self.info.done_threshold if done_threshold is None else done_threshold
        if not 0.0 < threshold < 1.0:
            raise PredictorError(f"done_threshold: must be in (0, 1), got {threshold}")
        if not images:
            return []
        exemplars = [None] * len(images) if exemplars is None else exemplars
        if len(exemplars) != len(images):
            raise PredictorError("exemplars: one entry per image expected")
        t0 = time.perf_counter()
        prepared = [
            im if isinstance(im, PreparedImage) else self.prepare(im, ex)
            for im, ex in zip(images, exemplars, strict=True)
        ]
        t_prep = time.perf_counter()
        features, sigmas = self.encode_marked(prepared)
        rollouts = self.start(prepared, (features, sigmas))
        t_enc = time.perf_counter()
        run_rollouts(rollouts, self._stepper(features), threshold, max_objects, deadline)
        t_end = time.perf_counter()
        timings = {
            "prepare": 1e3 * (t_prep - t0),
            "encode": 1e3 * (t_enc - t_prep),
            "steps": 1e3 * (t_end - t_enc),
            "total": 1e3 * (t_end - t0),
        }
        return [self.finish(r, timings) for r in rollouts]

    def _stepper(self, features: np.ndarray):
        """The step for :func:`run_rollouts`. The rollouts' features stay stacked and are
        re-sliced only when an image finishes (the active set only shrinks), which saves a
        copy of every feature map per step."""
        current = features

        def step(active: np.ndarray, marks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            nonlocal current
            if len(active) != len(current):
                current = features[active]
            return self.step(current, marks)

        return step

    def finish(self, rollout: Rollout, timings_ms: dict[str, float]) -> Prediction:
        """Turn a finished rollout into a :class:`Prediction` in original pixels."""
        size = self.info.image_size
        model_px = imaging.norm_to_pixels(np.asarray(rollout.points_norm), size)
        sx, sy = rollout.image.scale
        orig_px = model_px / np.array([sx, sy], np.float32)
        features = confidence.rollout_features(rollout)
        count_confidence = confidence.confidence_from_features(features, self.info.calibration)
        return Prediction(
            count=len(rollout.points_norm),
            points=np.round(orig_px.astype(np.float64), 2).tolist(),
            points_model=np.round(model_px.astype(np.float64), 2).tolist(),
            done_probs=[round(p, 4) for p in rollout.done_probs],
            stopped_by=rollout.stopped_by or "deadline",
            timings_ms={k: round(v, 3) for k, v in timings_ms.items()},
            count_confidence=round(count_confidence, 4),
            confidence_features=features or {},
        )

    def warm_up(self) -> None:
        """Run each graph once on zeros (allocations and kernels chosen before traffic)."""
        size, grid = self.info.image_size, self.info.grid
        blank = PreparedImage(
            np.zeros((3, size, size), np.float32),
            (size, size),
            (1.0, 1.0),
            np.zeros((1, grid, grid), np.float32) if self.info.exemplars else None,
        )
        encoded = self.encode_marked([blank])
        threshold = self.info.done_threshold
        run_rollouts(self.start([blank], encoded), self._stepper(encoded[0]), threshold, 1)


def default_threads(workers: int = 1) -> int:
    """Cores per worker, so several workers do not oversubscribe the CPU."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
