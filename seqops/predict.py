"""``seqops predict``: count the objects in image files with the exported model (no torch).

One JSON line per image on stdout (the image, its count and ``count_confidence``, the points
in the image's own pixels, per-step done probabilities, timings); with ``out_dir``, an
annotated PNG per image with the points numbered in the order found. An image that cannot
be read gets a JSON line with ``error`` and the others are still counted.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from seqops import imaging
from seqops.contract import DEFAULT_MAX_OBJECTS, MODEL_NAME

log = logging.getLogger(__name__)

BATCH_SIZE = 8

# The one default model of `seqops predict` and `seqops serve`: the registry's champion when
# there is one, else what `dvc repro export` wrote. Two defaults gave two answers for the same
# image after an unpromoted run (issue 16).
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"
LOCAL_MODEL_DIR = "models/onnx"
MODEL_ENV = "SEQOPS_MODEL"


def model_candidates(given: str | None) -> list[str]:
    """The models to try, in order: ``given``, else ``$SEQOPS_MODEL``, else the registry's
    champion (only when a tracking store exists: asking would create an empty one) and then
    ``models/onnx``."""
    if given:
        return [given]
    if os.environ.get(MODEL_ENV):
        return [os.environ[MODEL_ENV]]
    have_store = bool(os.environ.get("MLFLOW_TRACKING_URI")) or Path("mlflow.db").is_file()
    return [CHAMPION_URI, LOCAL_MODEL_DIR] if have_store else [LOCAL_MODEL_DIR]


def resolve_model(given: str | None) -> tuple[str, Path, str | None]:
    """The first of :func:`model_candidates` that resolves: ``(what was asked, its local
    directory, its registry version or None)``; the error lists why each one failed."""
    from seqops.predictor import PredictorError, resolve_model_dir

    errors = []
    for candidate in model_candidates(given):
        try:
            model_dir, version = resolve_model_dir(candidate)
        except PredictorError as exc:
            errors.append(str(exc))
            continue
        return candidate, model_dir, version
    raise PredictorError(
        "no model found: " + "; ".join(errors) + f" (pass --model, set {MODEL_ENV}, or make "
        "one with `make demo` or `dvc repro`)"
    )


def model_summary(predictor: Any, source: str) -> dict[str, Any]:
    """The ``model`` object of every result, as the server's ``model`` (name, version) plus
    where it came from."""
    return {
        "name": MODEL_NAME,
        "version": predictor.info.model_version,
        "source": source,
        "confidence_calibrated": predictor.info.confidence_calibrated,
    }


def parse_exemplars(text: str | None, images: Sequence[Path]) -> list[Any] | None:
    """Per-image exemplar boxes from ``--exemplars``: JSON or a JSON file holding a list of
    boxes for every image, or a mapping from image path (or file name) to boxes."""
    if text is None:
        return None
    source = "--exemplars"
    candidate = Path(text)
    if not text.lstrip().startswith(("[", "{")) and candidate.is_file():
        source, text = str(candidate), candidate.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not JSON nor a JSON file ({exc})") from None
    if isinstance(value, list):
        return [value] * len(images)
    if isinstance(value, dict):
        boxes = []
        for image in images:
            found = value.get(str(image), value.get(image.name))
            if found is None:
                raise ValueError(f"{source}: no boxes for {image} (keys: {sorted(value)})")
            boxes.append(found)
        return boxes
    raise ValueError(f"{source}: expected a list of boxes or an object image -> boxes")


def annotate(image_path: Path, points: list[list[float]], out_dir: Path) -> Path:
    """Write ``<out_dir>/<stem>.png``: the image with the points (image pixels) numbered in
    the order found."""
    from seqops.draw import draw_rollout

    out_dir.mkdir(parents=True, exist_ok=True)
    image = imaging.load_image(image_path)
    picture = draw_rollout(image, points, None)  # small images are enlarged to stay legible
    path = out_dir / f"{image_path.stem}.png"
    picture.save(path)
    return path


def run_predict(
    images: Sequence[Path],
    model: str | Path | None = None,
    *,
    out_dir: Path | None = None,
    exemplars: str | None = None,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    done_threshold: float | None = None,
    device: str = "auto",
    stream: TextIO | None = None,
) -> int:
    """Count ``images`` with ``model`` (default: :func:`model_candidates`); print one JSON
    line per image. Returns 0, or 1 when an image failed."""
    from seqops.predictor import Predictor

    stream = stream or sys.stdout
    images = [Path(p) for p in images]
    boxes = parse_exemplars(exemplars, images)
    source, model_dir, version = resolve_model(None if model is None else str(model))
    predictor = Predictor(model_dir, device=device, version=version)
    summary = model_summary(predictor, source)
    if source != str(model_dir):  # the predictor logged the directory; name what was asked
        log.info("model %s is version %s", source, summary["version"])
    failed = 0
    for start in range(0, len(images), BATCH_SIZE):
        paths = images[start : start + BATCH_SIZE]
        prepared, ok_paths = [], []
        for i, path in enumerate(paths):
            try:
                box = boxes[start + i] if boxes is not None else None
                prepared.append(predictor.prepare(path, box))
                ok_paths.append(path)
            except ValueError as exc:  # ImageError, PredictorError: name the image, go on
                failed += 1
                print(json.dumps({"image": str(path), "error": str(exc)}), file=stream)
        if not prepared:
            continue
        predictions = predictor.predict(
            prepared, max_objects=max_objects, done_threshold=done_threshold
        )
        for path, prediction in zip(ok_paths, predictions, strict=True):
            result = {"image": str(path), **prediction.to_dict(), "model": summary}
            if out_dir is not None:
                result["annotated"] = str(annotate(path, prediction.points, out_dir))
            print(json.dumps(result), file=stream)
    return 1 if failed else 0
