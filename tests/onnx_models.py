"""Exported random-init models with chosen behaviour, shared by the ONNX test modules.

Exporting takes seconds, so each kind is exported once per test session (cached here, in a
temporary directory removed at exit); tests only read these directories. The ``done`` and
``never`` kinds differ from ``plain`` only in the step's done head (same seed, so the same
encoder): they reuse plain's checked encoder and export just their own step graph.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

from seqops.contract import ENCODER_FILE, INFO_FILE, STEP_FILE
from seqops.export import build_metadata, export_model, export_step
from seqops.model import ModelSpec
from seqops.testing import make_untrained_model

IMAGE_SIZE = 64
OPSET = 18
# kind -> (exemplars, done_bias): done_bias +20 says done at once, -20 never.
KINDS = {
    "plain": (False, None),
    "done": (False, 20.0),
    "never": (False, -20.0),
    "exemplars": (True, None),
}
STEP_VARIANTS = ("done", "never")


@cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="seqops-onnx-models-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def make_spec(exemplars: bool = False, image_size: int = IMAGE_SIZE) -> ModelSpec:
    return ModelSpec.from_preset("tiny", image_size, exemplars)


def metadata_for(kind: str, model_version: str | None = None) -> dict:
    exemplars, _ = KINDS[kind]
    train_params = {"prepare": {"order": "reading_order", "row_height": 16.0}}
    version = model_version or f"test-{'plain' if kind in STEP_VARIANTS else kind}"
    return build_metadata(make_spec(exemplars), train_params, 0.5, version, run_id=None)


def torch_model(kind: str):
    """The torch network the ``kind`` export came from (same seed, same weights)."""
    exemplars, done_bias = KINDS[kind]
    return make_untrained_model(make_spec(exemplars), seed=0, done_bias=done_bias)


@cache
def exported(kind: str) -> tuple[Path, dict]:
    """``(model_dir, model.json content)`` of a tiny 64 px model of ``kind``."""
    model_dir = _root() / kind
    if kind in STEP_VARIANTS:
        plain_dir, info = exported("plain")
        model_dir.mkdir()
        shutil.copy(plain_dir / ENCODER_FILE, model_dir / ENCODER_FILE)
        shutil.copy(plain_dir / INFO_FILE, model_dir / INFO_FILE)
        export_step(torch_model(kind), model_dir / STEP_FILE, OPSET, metadata_for(kind))
        return model_dir, info
    spec = make_spec(KINDS[kind][0])
    info = export_model(
        torch_model(kind), model_dir, metadata_for(kind), opset=OPSET,
        extra_info={"model_spec": spec.to_dict()},
    )  # fmt: skip
    return model_dir, info
