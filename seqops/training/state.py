"""What a training run carries from epoch to epoch, and resuming it from ``last.pt``.

:class:`TrainingState` holds the network, its optimizer and schedule, early stopping, the
epoch reached, the per-epoch history and the best epoch's weights. Its
:meth:`~TrainingState.checkpoint` is what ``last.pt`` holds and
:meth:`~TrainingState.restore` puts it back, so a killed run (or one given more
``train.epochs``) carries on as the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from seqops.config import Params
from seqops.model import SeqCounter
from seqops.tracking import flatten_params
from seqops.training import checkpoint as ckpt
from seqops.training.outputs import json_safe

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
        "train.resume",
    }
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
        """True once ``patience`` epochs in a row brought no improvement."""
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """The counters (and the settings), for a checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters; ``patience`` stays as configured now (it may be changed)."""
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


@dataclass
class TrainingState:
    """Everything a run carries from one epoch to the next.

    nanoGPT's habit: every checkpoint describes itself (weights, model spec, parameters,
    epoch, best validation loss), so export rebuilds the network from ``best.pt`` alone;
    ``last.pt`` adds what resuming needs.
    """

    model: SeqCounter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stopper: EarlyStopping
    params: Params
    data_fingerprint: str  # of the prepared data (training.data.fingerprint_dataset)
    epoch: int = 0  # the last finished epoch; 0 before the first
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch (rank 0)
    best_model_state: dict[str, Tensor] | None = None  # the best epoch's weights, on the CPU
    run_id: str | None = None  # the MLflow run, continued when the run resumes
    # The model's own loop on the training images (train.loop_share), image index -> points
    # found, model px: each epoch rolls out only a share of them, so a resumed run needs the
    # older rollouts to train on the same states as an uninterrupted one.
    loop_points: dict[int, np.ndarray] = field(default_factory=dict)

    def describe(
        self, epoch: int, metrics: dict[str, Any], model_state: dict[str, Tensor] | None = None
    ) -> dict[str, Any]:
        """A self-describing checkpoint of the weights (the current ones unless
        ``model_state`` is given) as of ``epoch`` with its ``metrics``: what ``best.pt`` holds."""
        return {
            "model_state": self.model.state_dict() if model_state is None else model_state,
            "model_spec": self.model.spec.to_dict(),
            "params": self.params.model_dump(mode="json"),
            "epoch": epoch,
            "best_val_loss": self.stopper.best,
            "run_id": self.run_id,
            "data_fingerprint": self.data_fingerprint,
            "metrics": json_safe(metrics),
        }

    def checkpoint(self) -> dict[str, Any]:
        """What ``last.pt`` holds: :meth:`describe` of the last epoch, plus the optimizer,
        schedule, early stopping, RNG state, history and the best epoch's weights."""
        return {
            **self.describe(self.epoch, self.history[-1] if self.history else {}),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "rng_state": ckpt.capture_rng_state(),
            "history": self.history,
            "best_model_state": self.best_model_state,
            "loop_points": {int(i): torch.from_numpy(p) for i, p in self.loop_points.items()},
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Carry on from a :meth:`checkpoint` (as :func:`load_resume_state` read it back)."""
        self.model.load_state_dict(saved["model_state"])
        self.optimizer.load_state_dict(saved["optimizer_state"])
        self.scheduler.load_state_dict(saved["scheduler_state"])
        self.stopper.load_state_dict(saved["early_stopping"])
        ckpt.restore_rng_state(saved["rng_state"])
        self.epoch = int(saved["epoch"])
        self.history = list(saved["history"])
        self.best_model_state = saved.get("best_model_state")
        self.run_id = saved.get("run_id")
        self.loop_points = {int(i): t.numpy() for i, t in saved.get("loop_points", {}).items()}

    def resume(self, last_path: Path, mode: str) -> bool:
        """Restore ``last_path`` when ``mode`` and the file allow it (:func:`load_resume_state`);
        True when the run resumed."""
        saved = load_resume_state(
            last_path,
            spec_dict=self.model.spec.to_dict(),
            params=self.params,
            fingerprint=self.data_fingerprint,
            mode=mode,
        )
        if saved is not None:
            self.restore(saved)
        return saved is not None

    def end_epoch(self, epoch: int, val_loss: float) -> bool:
        """Count ``epoch`` as finished; True when ``val_loss`` is the best so far."""
        self.epoch = epoch
        return self.stopper.update(val_loss, epoch)

    def record(self, row: dict[str, float], best: bool) -> None:
        """Keep a finished epoch's metrics, and its weights when it is the ``best`` so far."""
        self.history.append(row)
        if best:
            weights = self.model.state_dict()
            self.best_model_state = {k: v.detach().cpu().clone() for k, v in weights.items()}


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
    last_path: Path, *, spec_dict: dict[str, Any], params: Params, fingerprint: str, mode: str
) -> dict[str, Any] | None:
    """The ``last.pt`` state to resume from, or ``None`` to train from scratch.

    ``auto``: resume when the file exists and matches (else warn and start afresh);
    ``never``: start afresh; ``require``: fail unless it can resume.
    """
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
    if reason is None and mode == "auto" and int(state["epoch"]) >= params.train.epochs:
        # Nothing of it is left to continue: `auto` means "carry on a killed or extended run",
        # and a finished run with as many epochs or more is neither (issue 16: a 1-epoch run
        # after the demo's 12 trained nothing).
        log.warning(
            "%s: not resuming: it has %d epochs and train.epochs is %d; training from scratch "
            "(train.resume=require would keep it and train nothing)",
            last_path, int(state["epoch"]), params.train.epochs,
        )  # fmt: skip
        return None
    if reason is None:
        return state
    if mode == "require":
        raise ValueError(f"{last_path}: cannot resume: {reason}")
    log.warning("%s: not resuming (%s); training from scratch", last_path, reason)
    return None
