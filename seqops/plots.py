"""``seqops plots``: the plots ``dvc.yaml`` declares, drawn to PNG files that open offline.

``dvc plots show`` writes an HTML page whose charts load Vega from a CDN, so it is blank
without a network. This draws the same declarations (the top-level ``plots`` with
``x`` and ``y: {file: [columns]}``, and each stage's ``plots`` with ``x`` and ``y``
columns) from the same CSV files with matplotlib (installed with the ``pipeline`` extra,
which MLflow needs anyway): one PNG per declared plot.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from seqops.config import ConfigError
from seqops.io import atomic_write_bytes

log = logging.getLogger(__name__)


# The evaluation plots read against the line y = x: what it means on each.
DIAGONALS = {
    "counts": "predicted = true",
    "calibration": "perfectly calibrated",
    "count_reliability": "perfectly calibrated",
    "review_curve": "flagging at random",
}


@dataclass(frozen=True)
class PlotSpec:
    """One declared plot: a name, its template (``linear`` or ``scatter``), the x column and
    the y columns of each CSV file."""

    name: str
    template: str
    x: str
    ys: dict[str, list[str]]  # file -> columns


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def read_plot_specs(dvc_yaml: str | Path) -> list[PlotSpec]:
    """The plots ``dvc_yaml`` declares with an ``x`` and a ``y`` (DVC's own defaults, a
    chart of a file's last column, are left out: they show nothing asked for)."""
    dvc_yaml = Path(dvc_yaml)
    doc = yaml.safe_load(dvc_yaml.read_text()) or {}
    specs = []
    for entry in doc.get("plots") or []:
        for name, spec in entry.items() if isinstance(entry, dict) else []:
            if spec and "x" in spec and isinstance(spec.get("y"), dict):
                ys = {f: _as_list(cols) for f, cols in spec["y"].items()}
                specs.append(PlotSpec(name, spec.get("template", "linear"), spec["x"], ys))
    for stage in (doc.get("stages") or {}).values():
        for entry in stage.get("plots") or []:
            for path, spec in entry.items() if isinstance(entry, dict) else []:
                if spec and "x" in spec and "y" in spec:
                    name = Path(path).stem
                    template = spec.get("template", "linear")
                    specs.append(PlotSpec(name, template, spec["x"], {path: _as_list(spec["y"])}))
    return specs


def read_columns(path: Path, columns: list[str]) -> dict[str, list[float]]:
    """The named columns of a CSV file as floats (an empty cell is NaN)."""
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run `dvc repro` first)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise ConfigError(f"{path}: no column {', '.join(missing)} (has {', '.join(rows[0])})")
    return {c: [float(r[c]) if r[c] != "" else math.nan for r in rows] for c in columns}


def draw(spec: PlotSpec, root: Path, out_dir: Path) -> Path:
    """Draw ``spec`` from the CSV files under ``root`` to ``<out_dir>/<name>.png``."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for file, columns in spec.ys.items():
        data = read_columns(root / file, [spec.x, *columns])
        for column in columns:
            label = column if len(spec.ys) == 1 else f"{file}: {column}"
            if spec.template == "scatter":
                ax.scatter(data[spec.x], data[column], s=12, label=label)
            else:
                ax.plot(data[spec.x], data[column], marker=".", label=label)
    if spec.name in DIAGONALS:
        low, high = (float(v) for v in ax.get_xlim())
        ax.plot([low, high], [low, high], "k--", lw=0.8, label=DIAGONALS[spec.name])
    ax.set_xlabel(spec.x)
    ax.set_title(spec.name)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    path = out_dir / f"{spec.name}.png"
    atomic_write_bytes(path, buffer.getvalue())
    return path


def render_plots(
    dvc_yaml: str | Path = "dvc.yaml", out_dir: str | Path = "reports/plots"
) -> list[Path]:
    """Draw every plot ``dvc_yaml`` declares (files relative to its folder) into ``out_dir``;
    a plot whose CSV is missing is skipped with a warning. Returns the PNG paths."""
    dvc_yaml, out_dir = Path(dvc_yaml), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in read_plot_specs(dvc_yaml):
        try:
            written.append(draw(spec, dvc_yaml.parent, out_dir))
        except ConfigError as exc:
            log.warning("plot %s skipped: %s", spec.name, exc)
    return written
