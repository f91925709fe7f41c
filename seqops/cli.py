"""The ``seqops`` command: a thin adapter around each stage's pure core.

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


def _add_params_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", type=Path, default=DEFAULT_PARAMS_PATH, help="parameter file (params.yaml)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. --set prepare.num_train=200 (repeatable)",
    )


def _params(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.overrides)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


# --- prepare / data ------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from seqops.data.prepare import run_prepare

    stats = run_prepare(_params(args), out_dir=args.out)
    _print_json(stats)
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    stats_path = Path(args.dataset) / "stats.json"
    if not stats_path.is_file():
        raise ConfigError(f"{stats_path}: not found (run `seqops prepare` first)")
    _print_json(json.loads(stats_path.read_text()))
    return 0


def cmd_data_balance(args: argparse.Namespace) -> int:
    from seqops.data.balance import report_balance

    report = report_balance(args.dataset, args.split, _params(args).sampling)
    print(report.text())
    return 0


def _register_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="prepare a dataset (the `prepare` DVC stage)")
    _add_params_args(p)
    p.add_argument("--out", type=Path, default=Path("data/prepared"), help="dataset directory")
    p.set_defaults(func=cmd_prepare)

    data = sub.add_parser("data", help="inspect prepared datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("stats", help="print a prepared dataset's stats.json")
    p.add_argument("dataset", type=Path, nargs="?", default=Path("data/prepared"))
    p.set_defaults(func=cmd_data_stats)
    p = data_sub.add_parser("balance", help="done=1 share under the training sampling settings")
    _add_params_args(p)
    p.add_argument("dataset", type=Path, nargs="?", default=Path("data/prepared"))
    p.add_argument("--split", default="train")
    p.set_defaults(func=cmd_data_balance)


# --- entry point ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqops", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_data(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
