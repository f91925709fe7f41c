"""The train stage's files besides the checkpoints: where they go, the per-epoch plots CSV
and the final metrics (torch-free): the headline figures in the DVC metrics file, every figure
in the report."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqops.io import atomic_write_text, pick, write_metrics_files

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
# What the DVC metrics file holds, so `dvc metrics show` and `diff` fit a screen: how long
# training ran and the best epoch's validation loss, points, count and done head. Every
# figure of that epoch is in the report (and each epoch's in MLflow and the plots CSV).
# benchmarks/bench_quality.py and tests/pipeline/test_killed_repro.py read epochs_trained.
HEADLINE_METRICS = (
    "best_epoch", "epochs_trained", "time/train_minutes", "val/loss", "val/px_err_median",
    "val/count_mae", "val/count_exact", "val/done_f1",
)  # fmt: skip


@dataclass(frozen=True)
class StageOutputs:
    """Where the stage writes: checkpoints and run info in ``out_dir``; the metrics JSON
    (headline figures), the report (every figure) and the plots CSV where ``dvc.yaml`` (or
    the caller) says, when it says."""

    out_dir: Path
    metrics_path: Path | None = None
    plots_path: Path | None = None
    report_path: Path | None = None

    @property
    def best_path(self) -> Path:
        """The lowest ``val/loss`` epoch's weights: what export uses."""
        return self.out_dir / "best.pt"

    @property
    def last_path(self) -> Path:
        """The resume state, written every epoch."""
        return self.out_dir / "last.pt"

    @property
    def run_info_path(self) -> Path:
        """The MLflow run, best epoch and why training stopped."""
        return self.out_dir / "train_run.json"


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
    """A float as 6 significant digits, empty when not finite."""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def final_metrics(history: list[dict[str, float]], best_epoch: int) -> dict[str, Any]:
    """The best epoch's metrics plus ``best_epoch``, ``epochs_trained`` and
    ``time/train_minutes`` (the epochs' wall time, resumed runs' earlier epochs included)."""
    best = next((row for row in history if row.get("epoch") == best_epoch), {})
    seconds = sum(row.get("time/epoch_seconds", 0.0) for row in history)
    metrics: dict[str, Any] = {
        "best_epoch": best_epoch,
        "epochs_trained": len(history),
        "time/train_minutes": seconds / 60,
    }
    metrics.update({k: v for k, v in best.items() if k != "epoch"})
    return json_safe(metrics)


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The :data:`HEADLINE_METRICS` of ``metrics`` (the DVC metrics file's content)."""
    return pick(metrics, HEADLINE_METRICS)


def write_metrics(outputs: StageOutputs, metrics: dict[str, Any]) -> None:
    """Every figure to the report, the headline figures to the metrics JSON (each when its
    path is set)."""
    write_metrics_files(
        metrics, headline_metrics(metrics), outputs.metrics_path, outputs.report_path
    )
