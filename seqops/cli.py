"""Count objects in images one at a time, and run the pipeline that makes the model:
prepare data, train, export to ONNX, evaluate, serve over HTTP.

Every stage command takes ``--params FILE`` and repeatable ``--set section.key=value``
overrides (the syntax of ``dvc exp run -S``); paths are arguments, named once in
``dvc.yaml``. Heavy modules (torch, mlflow) are imported inside the commands so that
``seqops --help`` stays fast and the serving path never imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from seqops.config import DEFAULT_PARAMS_PATH, ConfigError, Params, load_params

log = logging.getLogger("seqops")


EPILOG = """examples:
  seqops predict examples/scene.png --out outputs/predict    count a sample image
  seqops serve                                               HTTP API on 127.0.0.1:8000
  seqops data stats                                          the prepared dataset in short
  dvc repro                                                  the pipeline (with .venv/bin on PATH)

`seqops COMMAND --help` describes each command; the README walks through them."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (when it has one worth showing), and descriptions
    and epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)"


def add_parser(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose help shows the defaults."""
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def add_overrides_argument(
    parser: argparse.ArgumentParser, example: str = "train.epochs=3", written: bool = False
) -> None:
    """Repeatable ``--set KEY=VALUE`` (into ``args.overrides``), for :func:`load_params`;
    ``example`` is an override the command reads; ``written``: the command writes the
    overrides into params.yaml (the flow), rather than using them for one run."""
    where = (
        "written into params.yaml, as `dvc exp run -S` does; `git checkout params.yaml` undoes"
        if written
        else "for this run only; params.yaml is not changed"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a parameter, e.g. --set {example} (repeatable; values are YAML; {where})",
    )


def add_params_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """``--params FILE`` and the ``--set`` overrides of every stage command."""
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH, help="parameter file")
    add_overrides_argument(parser, example)


DEVICE_HELP = "auto: CUDA where it really works, else the CPU"


def _params(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.overrides)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


# --- prepare / data ------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from seqops.data.prepare import run_prepare
    from seqops.data.summary import stats_text

    stats = run_prepare(_params(args), out_dir=args.out)
    if args.json:
        _print_json(stats)
    else:
        print(stats_text(stats, str(args.out)))
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from seqops.data.summary import stats_text

    stats_path = Path(args.dataset) / "stats.json"
    if not stats_path.is_file():
        raise ConfigError(f"{stats_path}: not found (run `seqops prepare` first)")
    stats = json.loads(stats_path.read_text())
    if args.json:
        _print_json(stats)
    else:
        print(stats_text(stats, str(args.dataset)))
    return 0


def cmd_data_balance(args: argparse.Namespace) -> int:
    from seqops.data.balance import report_balance

    report = report_balance(args.dataset, args.split, _params(args).sampling)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.text())
    return 0


def _add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of text")


def _register_data(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "prepare",
        help="prepare a dataset (the `prepare` DVC stage)",
        description="Read prepare.source (synthetic scenes, FSC-147, COCO or a points "
        "folder), order each image's points, resize to the model input and write the dataset "
        "to --out; print a summary (stats.json holds it in full).",
    )
    add_params_arguments(p, "prepare.num_train=200")
    p.add_argument("--out", type=Path, default=Path("data/prepared"), help="dataset directory")
    _add_json_flag(p)
    p.set_defaults(func=cmd_prepare)

    data = add_parser(sub, "data", help="inspect prepared datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = add_parser(
        data_sub, "stats", help="a prepared dataset in short: images, objects, skipped items"
    )
    p.add_argument(
        "dataset", type=Path, nargs="?", default=Path("data/prepared"), help="prepared dataset"
    )
    _add_json_flag(p)
    p.set_defaults(func=cmd_data_stats)
    p = add_parser(
        data_sub,
        "balance",
        help="the share of done=1 training steps under the sampling settings",
    )
    add_params_arguments(p, "sampling.done_share=0.3")
    p.add_argument(
        "dataset", type=Path, nargs="?", default=Path("data/prepared"), help="prepared dataset"
    )
    p.add_argument("--split", default="train", help="a split of the dataset")
    _add_json_flag(p)
    p.set_defaults(func=cmd_data_balance)


# --- train ---------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from seqops.training.train import run_train

    metrics = run_train(
        _params(args),
        data_dir=args.data,
        out_dir=args.out,
        metrics_path=args.metrics,
        plots_path=args.plots,
        resume=args.resume,  # None: train.resume
        track=not args.no_mlflow,
        report_path=args.report,
    )
    if metrics:  # empty on torchrun ranks other than 0
        _print_json(metrics)
    return 0


def _add_metrics_arguments(p: argparse.ArgumentParser, stage: str, headline: str, each: str):
    """A stage's ``--metrics`` (the headline figures, DVC metrics) and ``--report`` (every
    one; no default, so a caller that moves ``--metrics`` elsewhere writes nothing into the
    project's reports/)."""
    p.add_argument(
        "--metrics",
        type=Path,
        default=Path(f"metrics/{stage}.json"),
        help=f"{headline} (DVC metrics)",
    )
    p.add_argument(
        "--report",
        type=Path,
        help=f"every {each} as JSON (dvc.yaml: reports/{stage}/metrics.json; default: not "
        "written, the same figures are printed)",
    )


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "train",
        help="train the network (the `train` DVC stage; under torchrun: DDP)",
        description="Train on a prepared dataset; write best.pt, last.pt and train_run.json "
        "under --out, the metrics JSON and the per-epoch plots CSV; log the run to MLflow "
        "($MLFLOW_TRACKING_URI, default sqlite:///mlflow.db).",
    )
    add_params_arguments(p, "train.epochs=3")
    p.add_argument("--data", type=Path, default=Path("data/prepared"), help="prepared dataset")
    p.add_argument("--out", type=Path, default=Path("models"), help="checkpoint directory")
    _add_metrics_arguments(
        p, "train", "the best epoch's headline figures", "figure of the best epoch"
    )
    p.add_argument("--plots", type=Path, default=Path("plots/train.csv"), help="per-epoch CSV")
    p.add_argument(
        "--resume",
        choices=("auto", "never", "require"),
        help="overrides train.resume: auto continues <out>/last.pt when it matches the params "
        "and data and has fewer than train.epochs epochs (after a kill, or with more epochs); "
        "never starts afresh; require fails unless it can resume",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_train)


# --- export, evaluate, predict -----------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from seqops.export import run_export

    result = run_export(
        _params(args),
        checkpoint_path=args.checkpoint,
        out_dir=args.out,
        run_path=args.run,
        data_dir=args.data,
        metrics_path=args.metrics,
        register=not args.no_mlflow,
        report_path=args.report,
    )
    _print_json(result)
    return 0


def _register_export(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "export",
        help="export the best checkpoint to ONNX (the `export` DVC stage)",
        description="Export encoder.onnx + step.onnx + model.json to --out (atomically), after "
        "onnx.checker and a torch/onnxruntime parity check; calibrate count_confidence on the "
        "val split of --data; log the model into the training run with MLflow's ONNX "
        "flavour, register it as `seqops` with alias `candidate`.",
    )
    add_params_arguments(p, "export.opset=18")
    p.add_argument(
        "--checkpoint", type=Path, default=Path("models/best.pt"), help="trained checkpoint"
    )
    p.add_argument("--run", type=Path, default=Path("models/train_run.json"), help="train run")
    p.add_argument("--out", type=Path, default=Path("models/onnx"), help="model directory")
    # No default: a dataset other than the checkpoint's would calibrate silently wrong.
    p.add_argument(
        "--data",
        type=Path,
        help="prepared dataset whose val split calibrates count_confidence (dvc.yaml: "
        "data/prepared); without it, count_confidence is the uncalibrated stop probability",
    )
    _add_metrics_arguments(p, "export", "the export's headline figures", "export fact")
    p.add_argument("--no-mlflow", action="store_true", help="do not log/register in MLflow")
    p.set_defaults(func=cmd_export)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from seqops.evaluate import headline_metrics, run_evaluate

    metrics = run_evaluate(
        _params(args),
        model=args.model,
        data_dir=args.data,
        split=args.split,
        metrics_path=args.metrics,
        plots_dir=args.plots,
        out_dir=args.out,
        track=not args.no_mlflow,
        device=args.device,
        batch_size=args.batch_size,
    )
    _print_json(headline_metrics(metrics))  # every metric: the report's metrics.json
    return 0


def _register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "evaluate",
        help="evaluate the exported model through the ONNX predictor (the `evaluate` stage)",
        description="Count every image of a split with the onnxruntime predictor; write the "
        "metrics JSON, the plots CSVs (counts, done calibration, count-confidence reliability, "
        "review curve) and a report with the worst images; log test/<metric> into the model's "
        "training run.",
    )
    add_params_arguments(p, "evaluate.match_radius_px=8")
    p.add_argument("--model", default="models/onnx", help="model directory or models:/ URI")
    p.add_argument("--data", type=Path, default=Path("data/prepared"), help="prepared dataset")
    p.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="the split to count"
    )
    p.add_argument(
        "--metrics",
        type=Path,
        default=Path("metrics/evaluate.json"),
        help="headline metrics JSON (every metric: metrics.json in --out)",
    )
    p.add_argument("--plots", type=Path, default=Path("plots/evaluate"), help="plots directory")
    p.add_argument("--out", type=Path, default=Path("reports/evaluate"), help="report directory")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=8, help="images per predictor batch")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_evaluate)


def cmd_predict(args: argparse.Namespace) -> int:
    from seqops.predict import run_predict

    return run_predict(
        args.images,
        model=args.model,
        out_dir=args.out,
        exemplars=args.exemplars,
        max_objects=args.max_objects,
        done_threshold=args.done_threshold,
        device=args.device,
    )


def _register_predict(sub: argparse._SubParsersAction) -> None:
    from seqops.contract import DEFAULT_MAX_OBJECTS  # here: not a dep of every stage
    from seqops.predict import CHAMPION_URI, LOCAL_MODEL_DIR, MODEL_ENV

    p = add_parser(
        sub,
        "predict",
        help="count the objects in images (JSON per image on stdout)",
        description="Count the objects in each image with the exported model (onnxruntime, "
        "no torch): one JSON line per image on stdout (count, count_confidence, points in the "
        "image's own pixels, per-step done probability, the model's name and version, "
        "timings); with --out, an annotated PNG per image.",
    )
    p.add_argument("images", nargs="+", type=Path, help="PNG/JPEG files")
    p.add_argument(
        "--model",
        help=f"model directory or MLflow URI; default: ${MODEL_ENV}, else {CHAMPION_URI} when "
        f"a champion exists, else {LOCAL_MODEL_DIR} (as seqops serve)",
    )
    p.add_argument("--out", type=Path, help="write <out>/<image stem>.png with numbered points")
    p.add_argument(
        "--exemplars",
        help="exemplar boxes for a model trained with them, in image pixels: JSON (or a JSON "
        "file) holding [[x1, y1, x2, y2], ...] for every image, or {image: boxes}",
    )
    p.add_argument("--max-objects", type=int, default=DEFAULT_MAX_OBJECTS, help="loop guard")
    p.add_argument(
        "--done-threshold", type=float, help="stop when done exceeds it; None: the model's own"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_predict)


# --- plots ---------------------------------------------------------------------------


def cmd_plots(args: argparse.Namespace) -> int:
    from seqops.plots import render_plots

    written = render_plots(args.dvc_yaml, args.out)
    for path in written:
        print(path)
    if not written:
        raise ConfigError(f"{args.dvc_yaml}: no plot could be drawn (run `dvc repro` first)")
    return 0


def _register_plots(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "plots",
        help="draw the pipeline's plots to PNG files (offline; `dvc plots show` needs a CDN)",
        description="Draw every plot dvc.yaml declares (training curves, evaluation counts, "
        "done calibration, count-confidence reliability, review curve) from its CSV files "
        "to one PNG each, with matplotlib.",
    )
    p.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"), help="pipeline file")
    p.add_argument("--out", type=Path, default=Path("reports/plots"), help="PNG directory")
    p.set_defaults(func=cmd_plots)


# --- serve ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.run import main as serve_main  # lazy: the service only for this command

    return serve_main(args.serve_args, prog="seqops serve")


def _register_serve(sub: argparse._SubParsersAction) -> None:
    # The service is an application of its own (serve/): it parses its flags itself, so
    # the library does not repeat them; `seqops serve --help` shows them.
    p = sub.add_parser(
        "serve",
        help="serve the model over HTTP (simple API, KServe v2, metrics); --help for its flags",
        add_help=False,
    )
    p.set_defaults(func=cmd_serve)


# --- entry point ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqops",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_data(sub)
    _register_train(sub)
    _register_export(sub)
    _register_evaluate(sub)
    _register_predict(sub)
    _register_plots(sub)
    _register_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        args.serve_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        # Expected user errors: one clear line, no traceback (use -v for one).
        if args.verbose:
            raise
        print(f"seqops {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
