"""`seqops plots`: the plots dvc.yaml declares, drawn to PNG files from their CSVs."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT
from PIL import Image

from seqops.cli import main
from seqops.plots import read_plot_specs

DVC_YAML = """
stages:
  train:
    cmd: true
    plots:
      - plots/undeclared.csv: {cache: false}
  evaluate:
    cmd: true
    plots:
      - plots/counts.csv: {cache: false, template: scatter, x: true_count, y: pred_count}
plots:
  - loss:
      template: linear
      x: epoch
      y:
        plots/train.csv: [train/loss, val/loss]
"""


def test_the_projects_plots_are_declared_with_their_axes():
    names = [spec.name for spec in read_plot_specs(ROOT / "dvc.yaml")]
    assert names == [
        "loss", "pixel_error", "counting",  # the training curves
        "counts", "calibration", "count_reliability", "review_curve",  # the evaluation
    ]  # fmt: skip


def test_plots_draws_each_declared_plot_and_skips_dvc_defaults(tmp_path: Path, capsys):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "train.csv").write_text("epoch,train/loss,val/loss\n1,3,4\n2,2,2.5\n")
    (tmp_path / "plots" / "counts.csv").write_text("id,true_count,pred_count\na,3,3\nb,5,4\n")
    out = tmp_path / "png"
    assert main(["plots", "--dvc-yaml", str(tmp_path / "dvc.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "loss.png"), str(out / "counts.png")]
    for path in printed:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300


def test_a_missing_column_or_file_is_named(tmp_path: Path, capsys, caplog):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "train.csv").write_text("epoch,train/loss\n1,3\n")
    assert main(["plots", "--dvc-yaml", str(tmp_path / "dvc.yaml"), "--out", str(tmp_path)]) == 2
    assert "train.csv: no column val/loss" in caplog.text
    assert "counts.csv: not found" in caplog.text
    assert "no plot could be drawn" in capsys.readouterr().err
