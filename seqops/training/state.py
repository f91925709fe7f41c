"""Training bookkeeping: early stopping, whether ``last.pt`` may be resumed, and the
stage's small outputs (per-epoch plots CSV, final metrics)."""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from seqops.config import Params
from seqops.io import atomic_write_text
from seqops.tracking import flatten_params

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never", "require")

# Parameters that may change between a run and its resumption: they extend or re-host the
# run without changing what has been trained so far.
RESUME_FREE_KEYS = frozenset(
    {
        "train.epochs",
        "train.patience",
        "train.max_minutes",
        "train.num_workers",
        "train.num_threads",
        "train.device",
        "train.rollout_images",
        "train.picture_samples",
    }
)
# Leading columns of the plots CSV; every other metric follows in name order.
PLOT_COLUMNS = (
    "epoch",
    "train/loss",
    "val/loss",
    "val/loss_spatial",
    "val/loss_done",
    "val/loss_heatmap",
    "val/mse",
    "val/px_err_median",
    "val/px_err_p90",
    "val/done_f1",
    "val/count_mae",
    "val/count_exact",
)


@dataclass
class EarlyStopping:
    """Stop when ``val/loss`` has not improved for ``patience`` epochs.

    A NaN never counts as an improvement; ``min_delta`` is the smallest decrease that does.
    """

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record epoch ``epoch``'s value; returns True when it is the new best."""
        if not math.isnan(value) and value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters; ``patience`` stays as configured now (it may be changed)."""
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


def resume_mismatch(
    state: dict[str, Any], spec_dict: dict[str, Any], params: Params, fingerprint: str
) -> str | None:
    """Why checkpoint ``state`` cannot be resumed under ``params``, or ``None`` when it can."""
    if state.get("model_spec") != spec_dict:
        return "the model spec differs"
    if state.get("data_fingerprint") != fingerprint:
        return "the prepared data differs"
    if "optimizer_state" not in state:
        return "it holds no optimizer state (not a last.pt)"
    old = flatten_params(state.get("params", {}))
    new = flatten_params(params.model_dump(mode="json"))
    changed = sorted(
        k for k in old.keys() | new.keys() if k not in RESUME_FREE_KEYS and old.get(k) != new.get(k)
    )
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)} -> {new.get(k)})" for k in changed[:5])
        return f"parameters differ: {shown}"
    return None


def load_resume_state(
    last_path: Path, spec_dict: dict[str, Any], params: Params, fingerprint: str, mode: str
) -> dict[str, Any] | None:
    """The ``last.pt`` state to resume from, or ``None`` to train from scratch.

    ``auto``: resume when the file exists and matches (else warn and start afresh);
    ``never``: start afresh; ``require``: fail unless it can resume.
    """
    from seqops.training import checkpoint as ckpt  # torch: only when a resume is considered

    if mode not in RESUME_MODES:
        raise ValueError(f"resume={mode!r}: expected one of {', '.join(RESUME_MODES)}")
    if mode == "never" or not last_path.is_file():
        if mode == "require":
            raise ValueError(f"{last_path}: nothing to resume from (resume=require)")
        return None
    try:
        state = ckpt.load_checkpoint(last_path)
        reason = resume_mismatch(state, spec_dict, params, fingerprint)
    except ckpt.CheckpointError as exc:
        reason = str(exc)
    if reason is None:
        return state
    if mode == "require":
        raise ValueError(f"{last_path}: cannot resume: {reason}")
    log.warning("%s: not resuming (%s); training from scratch", last_path, reason)
    return None


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats become ``None`` (JSON has no NaN)."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in metrics.items()
    }


def write_plots_csv(path: str | Path, history: list[dict[str, float]]) -> None:
    """One row per epoch, ``epoch`` first: what ``dvc plots show`` renders."""
    keys = {k for row in history for k in row}
    columns = [c for c in PLOT_COLUMNS if c in keys] + sorted(keys - set(PLOT_COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def final_metrics(history: list[dict[str, float]], best_epoch: int) -> dict[str, Any]:
    """The best epoch's metrics plus ``best_epoch`` and ``epochs_trained``."""
    best = next((row for row in history if row.get("epoch") == best_epoch), {})
    metrics: dict[str, Any] = {"best_epoch": best_epoch, "epochs_trained": len(history)}
    metrics.update({k: v for k, v in best.items() if k != "epoch"})
    return json_safe(metrics)
