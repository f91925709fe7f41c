"""Torch/onnxruntime parity of the exported graphs on fixed inputs (CPU).

The export stage fails unless the largest difference is within
``params.export.parity_tolerance``; the numbers go to the stage's JSON and ``model.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from seqops import imaging
from seqops.contract import STEP_IO, encoder_io
from seqops.model import ModelSpec, SeqCounter

# Fixed parity inputs: a batch other than the one traced (2) checks the dynamic axis, and
# "many" marks covers a crowded image as in the data (up to 50 objects).
PARITY_BATCH = 3
PARITY_MARKS = {"marks_0": 0, "marks_1": 1, "marks_many": 40}


class ParityError(ValueError):
    """The graphs' outputs cannot be compared with torch's (shapes differ)."""


def parity_inputs(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed inputs for the parity check: images, exemplar masks (when the model has them)
    and marks maps with 0, 1 and many marks, ``PARITY_BATCH`` images each."""
    rng = np.random.default_rng(seed)
    size, g = spec.image_size, spec.grid
    # Uniform pixels through the real normalisation: the value range the model sees.
    pixels = rng.integers(0, 256, (PARITY_BATCH, size, size, 3), dtype=np.uint8)
    inputs = {"image": imaging.normalize_pixels(pixels, spec.mean, spec.std)}
    if spec.exemplars:
        masks = []
        for _ in range(PARITY_BATCH):
            x1, y1 = rng.uniform(0, 0.7 * size, 2)
            w, h = rng.uniform(0.05 * size, 0.3 * size, 2)
            masks.append(imaging.render_exemplar_mask([[x1, y1, x1 + w, y1 + h]], size, g))
        inputs["exemplar_mask"] = np.stack(masks)[:, None]
    for name, k in PARITY_MARKS.items():
        inputs[name] = np.stack(
            [
                imaging.render_marks(rng.uniform(-1, 1, (k, 2)), g, spec.mark_sigma)[None]
                for _ in range(PARITY_BATCH)
            ]
        )
    return inputs


def check_parity(
    model: SeqCounter, encoder_path: Path, step_path: Path, seed: int = 0
) -> dict[str, float]:
    """Max absolute differences between torch and onnxruntime (CPU) on fixed inputs.

    The encoder's features are compared directly; the step's ``xy`` and ``done`` (probability)
    end to end, each side from its own features, with 0, 1 and many marks.

    Returns:
        ``{"features": d, "xy/marks_0": d, "done/marks_0": d, ...}``.
    """
    model = model.cpu().eval()
    inputs = parity_inputs(model.spec, seed)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]
    encoder = ort.InferenceSession(str(encoder_path), opts, providers=cpu)
    step = ort.InferenceSession(str(step_path), opts, providers=cpu)
    spec = model.spec
    io = encoder_io(spec.exemplars, spec.mark_extent > 0)  # named as the graphs' inputs
    feed = {name: inputs[name] for name in io.inputs}
    features_ort, *sigma_ort = encoder.run(list(io.outputs), feed)
    diffs: dict[str, float] = {}
    with torch.no_grad():
        mask = torch.from_numpy(feed["exemplar_mask"]) if spec.exemplars else None
        features_torch, log_radius = model.encode_extent(torch.from_numpy(inputs["image"]), mask)
        diffs["features"] = _max_abs(features_ort, features_torch.numpy())
        if sigma_ort:
            sigma_torch = model.mark_sigmas(log_radius, PARITY_BATCH).numpy()
            diffs["mark_sigma"] = _max_abs(sigma_ort[0], sigma_torch)
        for name in PARITY_MARKS:
            marks = inputs[name]
            step_feed = dict(zip(STEP_IO.inputs, (features_ort, marks), strict=True))
            xy_ort, done_ort = step.run(list(STEP_IO.outputs), step_feed)
            out = model.step(features_torch, torch.from_numpy(marks))
            diffs[f"xy/{name}"] = _max_abs(xy_ort, out.xy.numpy())
            diffs[f"done/{name}"] = _max_abs(done_ort, torch.sigmoid(out.done_logit).numpy())
    return diffs


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """The largest absolute difference of two arrays of the same shape."""
    if a.shape != b.shape:
        raise ParityError(f"parity: onnxruntime shape {a.shape} != torch shape {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
