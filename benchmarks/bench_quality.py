"""Counting quality after a training budget: prepare, train, export, evaluate on held-out scenes.

Runs the pipeline's own commands (``seqops prepare / train / export / evaluate``, without
MLflow) in ``--out`` on ``params.yaml`` plus the overrides of each configuration, and prints
one row per configuration from the test split, scored through the ONNX predictor (the served
loop): matched error median and p90 (px at model size), done F1 over the loop's steps,
exact-count accuracy and count MAE, with the training minutes and epochs it took.

Configurations (repeatable ``--config``):

- ``plain``: scenes of one kind (``prepare.synthetic.distractor_share=0``), no exemplars;
- ``exemplars``: half the scenes hold a second, uncounted kind; the model takes the exemplar
  boxes (``model.exemplars=true``) and must count only the exemplified kind.

The issue's quality benchmark (``base`` preset, at most 30 minutes of training on the 2-core
CPU; goal median <= 2 px, exact >= 90%, MAE <= 0.15)::

    .venv/bin/python benchmarks/bench_quality.py --out runs/quality \\
        --set model.preset=base --set train.epochs=20 --set train.max_minutes=30

A prepared dataset and a finished configuration are reused when ``--out`` already holds them
(delete the folder to start afresh). ``--set`` applies to every configuration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "plain": ["prepare.synthetic.distractor_share=0", "model.exemplars=false"],
    "exemplars": ["prepare.synthetic.distractor_share=0.5", "model.exemplars=true"],
}
SEQOPS = [sys.executable, "-m", "seqops.cli"]


def run(args: list[str], log: Path) -> None:
    """Run one ``seqops`` command, its output into ``log``; fail with the log's tail."""
    with log.open("w") as f:
        done = subprocess.run([*SEQOPS, *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"seqops {args[0]} failed ({log}):\n{tail}")


def bench_config(name: str, params: Path, overrides: list[str], out: Path) -> dict:
    """Prepare, train, export and evaluate one configuration under ``out/name``."""
    where = out / name
    where.mkdir(parents=True, exist_ok=True)
    sets = [x for o in [*CONFIGS[name], *overrides] for x in ("--set", o)]
    common = ["--params", str(params), *sets]
    data = where / "prepared"
    if not (data / "test.jsonl").is_file():
        run(["prepare", *common, "--out", str(data)], where / "prepare.log")
    summary = where / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    started = time.perf_counter()
    run(
        [
            "train", *common, "--data", str(data), "--out", str(where / "models"),
            "--metrics", str(where / "train.json"), "--plots", str(where / "train.csv"),
            "--no-mlflow",
        ],
        where / "train.log",
    )  # fmt: skip
    train_minutes = (time.perf_counter() - started) / 60
    run(
        [
            "export", *common, "--checkpoint", str(where / "models" / "best.pt"),
            "--run", str(where / "models" / "train_run.json"), "--data", str(data),
            "--out", str(where / "onnx"),
            "--metrics", str(where / "export.json"), "--no-mlflow",
        ],
        where / "export.log",
    )  # fmt: skip
    run(
        [
            "evaluate", *common, "--model", str(where / "onnx"), "--data", str(data),
            "--split", "test", "--metrics", str(where / "evaluate.json"),
            "--plots", str(where / "plots"), "--out", str(where / "report"), "--no-mlflow",
        ],
        where / "evaluate.log",
    )  # fmt: skip
    trained = json.loads((where / "train.json").read_text())
    evaluated = json.loads((where / "evaluate.json").read_text())
    row = {
        "config": name,
        "overrides": [*CONFIGS[name], *overrides],
        "train_minutes": train_minutes,
        "epochs": trained["epochs_trained"],
        "best_epoch": trained["best_epoch"],
        **{
            key: evaluated[key]
            for key in (
                "num_images", "px_err_median", "px_err_p90", "done_f1", "count_exact_acc",
                "count_mae", "count_bias", "f1", "review_flagged_share_at_recall_80",
            )
        },
    }  # fmt: skip
    summary.write_text(json.dumps(row, indent=2) + "\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = [bench_config(c, args.params, args.set, args.out) for c in args.config or CONFIGS]
    print(
        "| config | train min | epochs | px median | px p90 | done F1 | exact | count MAE |"
        " points F1 | flagged for 80% of miscounts |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['train_minutes']:.1f} | {r['epochs']} | "
            f"{_fmt(r['px_err_median'], '.2f')} | {_fmt(r['px_err_p90'], '.2f')} | "
            f"{_fmt(r['done_f1'], '.3f')} | {_fmt(r['count_exact_acc'], '.0%')} | "
            f"{_fmt(r['count_mae'], '.2f')} | {_fmt(r['f1'], '.3f')} | "
            f"{_fmt(r.get('review_flagged_share_at_recall_80'), '.0%')} |"
        )


def _fmt(value: float | None, spec: str) -> str:
    """A metric for the table; undefined ones (no matched point, no done step) as n/a."""
    return "n/a" if value is None or value != value else format(value, spec)


if __name__ == "__main__":
    main()
