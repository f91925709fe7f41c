"""The seqops pipeline as a Prefect flow: DVC runs the stages, Prefect runs DVC.

``pipeline(overrides, promote)``, in the project workspace (the current directory; a
deployment's pull step sets it):

1. write ``overrides`` into ``params.yaml`` (what ``dvc exp run -S`` does to the workspace,
   ``seqops.params_file``);
2. open an MLflow parent run named after the Prefect flow run;
3. ``dvc repro <stage>`` for prepare -> train -> export -> evaluate, each a task whose output
   is streamed line by line into the Prefect logs; the stages' MLflow runs nest under the
   parent through ``SEQOPS_PARENT_RUN_ID``;
4. compare the evaluation with the registry's ``champion`` and move the alias when better
   (``seqops.promote``); with ``promote=False`` the comparison is made but nothing moves;
5. publish Prefect artifacts: a metrics table with the difference to the champion, and
   links to the MLflow run and model version.

Why the overrides are written into ``params.yaml`` rather than run through ``dvc exp run
-S``: ``dvc exp run`` reproduces the whole pipeline in one command (no task per stage, no
per-stage logs or failure) and records an experiment ref in git. Writing the file is the
part of ``dvc exp run -S`` that matters here: DVC sees every change (``dvc params diff``,
``dvc.lock``), and because the file keeps the values, ``dvc repro`` after the flow reruns
nothing. Keys are checked against the typed config before anything is written.

Each task runs ``dvc repro <stage>`` (not ``-s``): a task is then correct on its own (a rerun
of one task reproduces what that stage needs), and the upstream checks cost little since the
previous task has just brought them up to date. One flow run holds the workspace at a time
(a file lock in ``.dvc/tmp``, see ``seqops.workspace``).

From the project root, on Prefect's ephemeral server when no ``PREFECT_API_URL`` is set:
``python -m flows.pipeline --set train.epochs=3``. Deployments load the same function from
``flows/pipeline.py:pipeline`` (``prefect.yaml``). Stage code never imports Prefect; the flow
only calls into ``seqops`` and the ``dvc`` command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from seqops.cli import add_overrides_argument
from seqops.config import ConfigError, Params, load_params, parse_override
from seqops.params_file import write_overrides
from seqops.workspace import (
    read_data_identity,
    read_stage_metrics,
    run_streaming,
    stage_env,
    workspace_lock,
)

STAGES = ("prepare", "train", "export", "evaluate")
MLFLOW_UI_ENV = "SEQOPS_MLFLOW_UI_URL"  # where links point when tracking is not an HTTP server
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"  # `mlflow ui --backend-store-uri sqlite:///mlflow.db`
_PERMANENT_MLFLOW_ERRORS = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


# --- MLflow links ------------------------------------------------------------------------


def mlflow_ui_url(tracking_uri: str) -> str:
    """The MLflow UI's base URL: the tracking server itself, ``$SEQOPS_MLFLOW_UI_URL``, or
    where ``mlflow ui`` listens by default (for the embedded SQLite store)."""
    if os.environ.get(MLFLOW_UI_ENV):
        return os.environ[MLFLOW_UI_ENV].rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_MLFLOW_UI


def _retry_on_io_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Retry registry/tracking I/O; a bad metric or a missing version will not fix itself."""
    error = getattr(state, "data", None)
    if isinstance(error, ValueError):  # PromotionError, ConfigError
        return False
    return getattr(error, "error_code", None) not in _PERMANENT_MLFLOW_ERRORS


# --- tasks -------------------------------------------------------------------------------


@task(name="apply-overrides", cache_policy=NO_CACHE)
def apply_overrides_task(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Write the flow's overrides into params.yaml (validated first; nothing written on error)."""
    logger = get_run_logger()
    changes = write_overrides(overrides)
    for key, change in changes.items():
        logger.info("params.yaml: %s: %r -> %r", key, change["old"], change["new"])
    if not changes:
        logger.info("params.yaml unchanged")
    return changes


@task(name="open-mlflow-run", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def open_parent_run(params: dict[str, Any], tags: dict[str, str], run_name: str) -> dict[str, str]:
    """Start the flow run's MLflow parent run; returns its ids and the tracking URI."""
    from seqops.tracking import start_run

    run = start_run(params, tags=tags, run_name=run_name)
    get_run_logger().info("MLflow parent run %s (%s)", run.run_id, run.tracking_uri)
    return {"run_id": run.run_id, "experiment_id": run.experiment_id, "uri": run.tracking_uri}


@task(name="dvc-repro", task_run_name="dvc repro {stage}", cache_policy=NO_CACHE)
def repro_stage(stage: str, parent_run_id: str | None) -> None:
    """``dvc repro <stage>``, its output streamed into the Prefect log. No retries: a failed
    stage (a training error) fails the same way again; DVC caches what already succeeded."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", stage]
    logger.info("$ dvc repro %s", stage)
    run_streaming(cmd, logger.info, env=stage_env(parent_run_id), name=f"dvc repro {stage}")


@task(
    name="promote",
    retries=3,
    retry_delay_seconds=[2, 5, 10],
    retry_condition_fn=_retry_on_io_errors,
    cache_policy=NO_CACHE,
)
def promote_task(
    export_info: dict[str, Any],
    metrics: dict[str, Any],
    params: Params,
    apply: bool,
    dataset: str | None,
) -> dict[str, Any]:
    """Compare the evaluation with @champion and move the alias when better (``apply``)."""
    from mlflow import MlflowClient

    from seqops.promote import find_candidate_version, promote_model
    from seqops.registry import REGISTERED_NAME
    from seqops.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri())
    name = export_info.get("registered_model") or REGISTERED_NAME
    version = find_candidate_version(client, name, export_info.get("registered_version"))
    decision = promote_model(
        client, name, version, metrics, params.promote, apply=apply, dataset=dataset
    )
    get_run_logger().info("%s v%s: %s", name, version, decision["reason"])
    return decision


@task(name="publish-report", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def publish_report(decision: dict[str, Any], parent: dict[str, str]) -> None:
    """Prefect artifacts: the metrics beside the champion's, links to the run and version."""
    from seqops.promote import format_decision

    ui = mlflow_ui_url(parent["uri"])
    create_markdown_artifact(
        format_decision(decision),
        key="seqops-evaluation",
        description="Evaluation of this run's model against the registry's champion",
    )
    create_link_artifact(
        f"{ui}/#/experiments/{parent['experiment_id']}/runs/{parent['run_id']}",
        link_text=f"MLflow run {parent['run_id']}",
        key="seqops-mlflow-run",
        description=f"The flow run's MLflow parent run ({parent['uri']})",
    )
    create_link_artifact(
        f"{ui}/#/models/{decision['model_name']}/versions/{decision['version']}",
        link_text=f"{decision['model_name']} v{decision['version']}",
        key="seqops-model-version",
        description="The model version this run evaluated",
    )


@task(name="close-mlflow-run", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def close_parent_run(
    parent: dict[str, str], status: str, metrics: dict[str, float], tags: dict[str, str]
) -> None:
    """Log the evaluation and the decision on the parent run and end it with ``status``."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag
    from mlflow.utils.time import get_current_time_millis

    client = MlflowClient(parent["uri"])
    now = get_current_time_millis()
    client.log_batch(
        parent["run_id"],
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(parent["run_id"], status=status)


# --- the flow ----------------------------------------------------------------------------


def _flow_run_tags() -> dict[str, str]:
    from prefect.runtime import deployment, flow_run

    tags = {
        "prefect.flow_run_id": flow_run.id,
        "prefect.flow_run_name": flow_run.name,
        "prefect.deployment": deployment.name,
    }
    if flow_run.ui_url and flow_run.ui_url.startswith("http"):  # none on an ephemeral server
        tags["prefect.flow_run_url"] = flow_run.ui_url
    return {k: str(v) for k, v in tags.items() if v}


@flow(name="seqops-pipeline")
def pipeline(overrides: dict[str, Any] | None = None, promote: bool = True) -> dict[str, Any]:
    """prepare -> train -> export -> evaluate with DVC, then promote the model if better.

    Args:
        overrides: ``{"train.epochs": 3, ...}``: params.yaml keys set before the run, as
            ``dvc exp run -S`` does; they stay in params.yaml so ``dvc repro`` agrees.
        promote: move the registry's ``champion`` alias when the new model is better;
            ``False`` still compares and reports, but changes nothing in the registry.

    Returns:
        ``{"changes", "mlflow_run_id", "metrics", "decision"}``.
    """
    logger = get_run_logger()
    overrides = dict(overrides or {})
    with workspace_lock(".", log=logger.info):
        changes = apply_overrides_task(overrides)
        params = load_params()
        tags = {**_flow_run_tags(), "seqops.overrides": json.dumps(overrides, sort_keys=True)}
        run_name = f"pipeline-{tags.get('prefect.flow_run_name', 'local')}"
        parent = open_parent_run(params.model_dump(mode="json"), tags, run_name)
        status, final_metrics, final_tags = "FAILED", {}, {}
        try:
            for stage in STAGES:
                repro_stage(stage, parent["run_id"])
            metrics = read_stage_metrics("evaluate")
            decision = promote_task(
                read_stage_metrics("export"), metrics, params, promote, read_data_identity()
            )
            publish_report(decision, parent)
            final_metrics = {f"evaluate/{k}": v for k, v in decision["metrics"].items()}
            final_tags = {
                "seqops.model_version": decision["version"],
                "seqops.promoted": str(decision["promoted"]).lower(),
                "seqops.promotion_reason": decision["reason"][:5000],
            }
            status = "FINISHED"
        finally:
            try:
                close_parent_run(parent, status, final_metrics, final_tags)
            except Exception:
                if status == "FINISHED":
                    raise
                logger.warning("could not close MLflow run %s", parent["run_id"], exc_info=True)
    return {
        "changes": changes,
        "mlflow_run_id": parent["run_id"],
        "metrics": metrics,
        "decision": decision,
    }


# The figures a person reads first (evaluate.py's headline, in this order): key -> label, format.
SUMMARY_FIGURES = {
    "count_mae": ("count MAE", "{:.3f}"),
    "count_exact_acc": ("exact", "{:.0%}"),
    "f1": ("points F1", "{:.3f}"),
    "px_err_median": ("px median", "{:.2f}"),
    "review_flagged_share": ("flagged for review", "{:.0%}"),
    "latency_ms_per_image": ("ms/image", "{:.0f}"),
}


SUMMARY_CHANGES = 4  # params.yaml changes listed by name in the summary


def _figure(metrics: dict[str, Any], key: str) -> str:
    label, fmt = SUMMARY_FIGURES[key]
    value = metrics.get(key)
    return f"{label} {'n/a' if value is None else fmt.format(value)}"


def summary_text(result: dict[str, Any]) -> str:
    """What a flow run did, in a few lines: the params it changed, the model version and its
    headline figures, whether it became the champion, and where to look next."""
    decision, changes = result["decision"], result["changes"]
    name, version = decision["model_name"], decision["version"]
    verdict = "promoted to @champion" if decision["promoted"] else "not promoted"
    shown = list(changes.items())[:SUMMARY_CHANGES]  # a line, not a page: git diff has them all
    changed = ", ".join(f"{k}: {c['old']!r} -> {c['new']!r}" for k, c in shown)
    if len(changes) > len(shown):
        changed += f", ... ({len(changes)} keys; `git diff params.yaml`)"
    lines = [
        f"model {name} version {version} (models:/{name}/{version}): {verdict}",
        f"  {decision['reason']}",
        "  " + ", ".join(_figure(decision["metrics"], k) for k in SUMMARY_FIGURES),
        f"  params.yaml: {changed} (kept; `git checkout params.yaml` undoes)"
        if changes
        else "  params.yaml: unchanged",
        f"  next: dvc metrics show | seqops plots | make mlflow-ui (run {result['mlflow_run_id']})"
        " | seqops serve",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.pipeline [--set key=value ...] [--no-promote]``: one flow run."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline", description=pipeline.__doc__.splitlines()[0]
    )
    add_overrides_argument(parser, written=True)
    parser.add_argument(
        "--no-promote", action="store_true", help="compare with the champion, move nothing"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the whole result as JSON, not a summary"
    )
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        # MLflow prints "View run ... at" links on stdout when it talks to a server: they go
        # to stderr, so that stdout holds the result alone (`--json` is read by programs).
        with contextlib.redirect_stdout(sys.stderr):
            result = pipeline(overrides=overrides, promote=not args.no_promote)
    except Exception as exc:  # the flow run's log already holds the traceback
        print(f"seqops pipeline failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else summary_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
