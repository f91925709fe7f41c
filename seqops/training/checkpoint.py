"""Self-describing checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint holds everything needed to rebuild the network without ``params.yaml``
(nanoGPT's habit): the weights, the model spec, the parameters it was trained with, the
epoch and best validation loss; ``last.pt`` adds what resuming needs (optimizer,
scheduler, early stopping, RNG state, the per-epoch history). Only plain containers,
numbers, strings and tensors go in, so ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqops.io import atomic_write_bytes
from seqops.model import ModelSpec, SeqCounter

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model_state", "model_spec", "params", "epoch", "best_val_loss")


class CheckpointError(ValueError):
    """A checkpoint is missing or malformed; the message names the file."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` under a temporary name, then rename it into place.

    ``state`` must hold at least :data:`REQUIRED_KEYS`; tensors are moved to the CPU so the
    file loads anywhere.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **_to_cpu(state)}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run `seqops train` first)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(state).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def build_model(state: dict[str, Any]) -> SeqCounter:
    """Rebuild the network of a loaded checkpoint (spec + weights), in eval mode, on the CPU."""
    model = SeqCounter(ModelSpec.from_dict(state["model_spec"]))
    model.load_state_dict(state["model_state"])
    return model.eval()


def load_model(path: str | Path) -> tuple[SeqCounter, dict[str, Any]]:
    """Load a checkpoint file and rebuild its network; returns ``(model, checkpoint)``."""
    state = load_checkpoint(path)
    return build_model(state), state


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy and torch RNG states as weights_only-safe values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
