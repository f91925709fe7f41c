"""Promotion: move the registry's ``champion`` alias to a newly evaluated model when it is better.

The decision is made on one metric of the evaluation, named in ``params.yaml``
(``promote.metric``, ``promote.higher_is_better``). The champion's value comes from the
evaluation recorded on its model version when it was itself a candidate (the version tag
``seqops.evaluation``); a champion set by hand falls back to the metric of the same name in
its MLflow run (``<metric>`` or ``test/<metric>``). A champion with no known value is never
replaced automatically: nothing says the new model is better.

Evaluations are comparable only on the same test data. The identity of that data (e.g. the
prepared dataset's DVC hash) is recorded beside the evaluation; when the champion was
evaluated on other data the decision still compares the numbers but says so
(``same_dataset: false``) and logs a warning.

This module is the pure core: no Prefect, no torch. It talks to the MLflow registry only
through the client it is given, so tests run it against a temporary SQLite registry.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from seqops.config import PromoteConfig
from seqops.registry import CANDIDATE_ALIAS

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
EVALUATION_TAG = "seqops.evaluation"  # JSON: the flattened numeric evaluation metrics
DATASET_TAG = "seqops.eval_dataset"  # identity of the data the evaluation ran on
DECISION_TAG = "seqops.promotion"  # the last decision about this version, for the registry UI
RUN_METRIC_PREFIX = "test/"  # how the evaluate stage names its metrics in the MLflow run
# A cap on the tag's size, well under MLflow 3.17's limit on a model version tag value
# (100,000 characters; mlflow.utils.validation); the promotion metric always fits.
_MAX_TAG_CHARS = 5000


class PromotionError(ValueError):
    """The evaluation or the candidate cannot be promoted as given (not a transient error)."""


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict, keyed by dotted paths (as ``dvc metrics show``).

    Booleans and non-numeric values are left out; ``{"count": {"mae": 0.3}}`` gives
    ``{"count.mae": 0.3}``.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def is_better(value: float, reference: float, higher_is_better: bool) -> bool:
    """Strictly better: a tie keeps the champion (no churn of the alias for nothing)."""
    return value > reference if higher_is_better else value < reference


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _recorded_evaluation(version: Any) -> dict[str, float]:
    text = (version.tags or {}).get(EVALUATION_TAG)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        log.warning(
            "model version %s: tag %s is not JSON; ignored", version.version, EVALUATION_TAG
        )
        return {}
    return flatten_metrics(data) if isinstance(data, dict) else {}


def read_champion(
    client: Any, model_name: str, metric: str, alias: str = CHAMPION_ALIAS
) -> dict[str, Any] | None:
    """The model version holding ``alias`` and its evaluation, or ``None`` when there is none.

    Returns:
        ``{"version", "value", "metrics", "dataset", "source"}``: ``value`` is the champion's
        ``metric`` (``None`` when unknown), ``source`` says where it came from
        (``evaluation`` tag, ``run`` metric, or ``None``).
    """
    from mlflow.exceptions import MlflowException

    # The registered model's alias map, rather than get_model_version_by_alias: a missing
    # alias is reported there as INVALID_PARAMETER_VALUE, indistinguishable from a bad call.
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as exc:
        if _is_missing(exc):  # nothing registered under this name yet
            return None
        raise
    holder = (registered.aliases or {}).get(alias)
    if holder is None:
        return None
    version = client.get_model_version(model_name, str(holder))
    metrics = _recorded_evaluation(version)
    source = "evaluation" if metric in metrics else None
    if source is None and version.run_id:
        try:
            run_metrics = client.get_run(version.run_id).data.metrics
        except MlflowException as exc:
            if not _is_missing(exc):
                raise
            run_metrics = {}
        # The evaluate stage logs ``test/<name>`` into the training run.
        for name in (metric, f"{RUN_METRIC_PREFIX}{metric}"):
            if name in run_metrics:
                metrics = {**metrics, metric: run_metrics[name]}
                source = "run"
                break
    return {
        "version": str(version.version),
        "value": metrics.get(metric),
        "metrics": metrics,
        "dataset": (version.tags or {}).get(DATASET_TAG),
        "source": source,
    }


def record_evaluation(
    client: Any,
    model_name: str,
    version: str,
    metrics: Mapping[str, float],
    dataset: str | None,
    *,
    keep: str | None = None,
) -> None:
    """Store an evaluation on its model version, so later candidates compare against it.

    The tag is capped at 5000 characters: a longer evaluation keeps ``keep`` (the promotion
    metric) first, then as many other metrics, in key order, as fit. Keeping metrics in key
    order alone could drop the promotion metric, and a champion without it is never
    replaced automatically.
    """
    text = _evaluation_tag_text(metrics, keep)
    client.set_model_version_tag(model_name, version, EVALUATION_TAG, text)
    if dataset:
        client.set_model_version_tag(model_name, version, DATASET_TAG, dataset)


def _evaluation_tag_text(metrics: Mapping[str, float], keep: str | None) -> str:
    """The metrics as JSON within MLflow's tag limit, ``keep`` first among those kept."""
    text = json.dumps(dict(metrics), sort_keys=True)
    if len(text) <= _MAX_TAG_CHARS:
        return text
    # The promotion metric goes in first: a champion whose tag lost it has no known value,
    # and such a champion is never replaced automatically.
    kept: dict[str, float] = {}
    for key in sorted(metrics, key=lambda name: (name != keep, name)):
        if len(json.dumps({**kept, key: metrics[key]})) > _MAX_TAG_CHARS:
            break
        kept[key] = metrics[key]
    return json.dumps(kept, sort_keys=True)


def find_candidate_version(
    client: Any, model_name: str, version: str | int | None, alias: str = CANDIDATE_ALIAS
) -> str:
    """The version to promote: ``version`` when given, else the one holding ``alias``.

    The export stage names the version it registered; when its output lacks it, the
    ``candidate`` alias that export maintains says which one it was.

    Raises:
        PromotionError: no version given and none holds ``alias``.
    """
    if version is None:
        version = client.get_registered_model(model_name).aliases.get(alias)
        if version is None:
            raise PromotionError(
                f"no registered version given and no version of {model_name!r} holds "
                f"@{alias}: nothing to promote"
            )
    return str(version)


def promote_model(
    client: Any,
    model_name: str,
    version: str | int,
    metrics: Mapping[str, Any],
    config: PromoteConfig,
    *,
    apply: bool = True,
    dataset: str | None = None,
    alias: str = CHAMPION_ALIAS,
) -> dict[str, Any]:
    """Compare a candidate's evaluation with the champion; move ``alias`` when it is better.

    Args:
        client: an ``mlflow.MlflowClient`` for the registry.
        model_name: the registered model (``seqops``).
        version: the candidate's model version (the one the evaluation measured).
        metrics: the evaluation (nested dicts allowed; keys are flattened with dots).
        config: ``params.promote``: the metric and its direction.
        apply: ``False`` decides without writing anything to the registry (a dry run).
        dataset: identity of the evaluation data, recorded and compared with the champion's.
        alias: the alias to move.

    Returns:
        The decision (see :func:`decide_promotion`), with ``applied``: whether the registry
        was written to.

    Raises:
        PromotionError: the metric is missing or not finite, or the version does not exist.
    """
    version = str(version)
    flat = flatten_metrics(metrics)
    _check_promotion_metric(flat, config.metric)
    _check_version_exists(client, model_name, version)
    champion = read_champion(client, model_name, config.metric, alias)
    decision = decide_promotion(model_name, version, flat, config, champion, dataset, alias)
    decision["applied"] = apply
    if champion is not None and decision["same_dataset"] is False:
        log.warning(
            "champion v%s was evaluated on other data (%s, now %s): the comparison is indicative",
            champion["version"],
            champion["dataset"],
            dataset,
        )
    if apply:
        _apply_decision(client, decision, dataset, alias)
    outcome = f"promoted to @{alias}" if decision["promoted"] else "not promoted"
    log.info("%s v%s: %s (%s)", model_name, version, outcome, decision["reason"])
    return decision


def _check_promotion_metric(metrics: Mapping[str, float], metric: str) -> None:
    """Raise ``PromotionError`` unless ``metric`` is among the metrics and finite."""
    if metric not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        raise PromotionError(
            f"evaluation has no numeric metric {metric!r} (params.yaml promote.metric); "
            f"available: {known}"
        )
    value = metrics[metric]
    if not math.isfinite(value):
        raise PromotionError(f"evaluation metric {metric!r} is {value}; cannot compare it")


def _check_version_exists(client: Any, model_name: str, version: str) -> None:
    """Raise ``PromotionError`` when the registry has no such model version."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(model_name, version)
    except MlflowException as exc:
        if _is_missing(exc):
            raise PromotionError(f"model {model_name!r} has no version {version}") from exc
        raise


def decide_promotion(
    model_name: str,
    version: str,
    metrics: Mapping[str, float],
    config: PromoteConfig,
    champion: Mapping[str, Any] | None,
    dataset: str | None = None,
    alias: str = CHAMPION_ALIAS,
) -> dict[str, Any]:
    """The decision about a candidate, without touching the registry.

    Args:
        metrics: the candidate's flattened evaluation; it holds ``config.metric``.
        champion: what :func:`read_champion` returned (``None``: no model holds ``alias``).

    Returns:
        ``model_name``, ``version``, ``metric``, ``higher_is_better``, ``value``,
        ``champion_version``, ``champion_value``, ``delta`` (value - champion value),
        ``same_dataset``, ``promoted`` (the alias should point at this version), ``reason``,
        and the flattened ``metrics`` and ``champion_metrics``.
    """
    decision: dict[str, Any] = {
        "model_name": model_name,
        "version": version,
        "metric": config.metric,
        "higher_is_better": config.higher_is_better,
        "value": metrics[config.metric],
        "champion_version": None,
        "champion_value": None,
        "delta": None,
        "same_dataset": None,
        "promoted": False,
        "reason": f"no model holds @{alias} yet",
        "metrics": dict(metrics),
        "champion_metrics": {},
    }
    if champion is None:
        decision["promoted"] = True
        return decision
    decision.update(
        champion_version=champion["version"],
        champion_value=champion["value"],
        champion_metrics=champion["metrics"],
    )
    if dataset and champion["dataset"]:
        decision["same_dataset"] = dataset == champion["dataset"]
    decision.update(_compare_with_champion(decision, alias))
    return decision


def _compare_with_champion(decision: Mapping[str, Any], alias: str) -> dict[str, Any]:
    """``delta``, ``promoted`` and ``reason`` of a decision against a known champion."""
    version, metric, value = decision["version"], decision["metric"], decision["value"]
    champion_version, champion_value = decision["champion_version"], decision["champion_value"]
    if champion_version == version:
        return {"delta": 0.0, "reason": f"v{version} already holds @{alias}"}
    if champion_value is None:
        reason = f"champion v{champion_version} has no recorded {metric!r}; @{alias} left as is"
        return {"reason": reason}
    better = is_better(value, champion_value, decision["higher_is_better"])
    direction = "higher" if decision["higher_is_better"] else "lower"
    verdict = "better" if better else "not better"
    return {
        "delta": value - champion_value,
        "promoted": better,
        "reason": (
            f"{metric} {value:.6g} vs champion v{champion_version} {champion_value:.6g}: "
            f"{verdict} ({direction} is better)"
        ),
    }


def _apply_decision(
    client: Any, decision: Mapping[str, Any], dataset: str | None, alias: str
) -> None:
    """Record the evaluation and the decision on the version; move ``alias`` if promoted."""
    model_name, version = decision["model_name"], decision["version"]
    record_evaluation(
        client, model_name, version, decision["metrics"], dataset, keep=decision["metric"]
    )
    if decision["promoted"]:
        client.set_registered_model_alias(model_name, alias, version)
    outcome = "promoted" if decision["promoted"] else "not promoted"
    note = f"{outcome}: {decision['reason']}"[:_MAX_TAG_CHARS]
    client.set_model_version_tag(model_name, version, DECISION_TAG, note)


def _fmt(value: float | None, sign: str = "") -> str:
    return "–" if value is None else f"{value:{sign}.6g}"


def format_decision(decision: Mapping[str, Any]) -> str:
    """The decision as markdown: the verdict, then every metric beside the champion's.

    The promotion metric comes first, in bold; ``Δ`` is this model minus the champion.
    """
    version = decision["version"]
    champion = decision["champion_version"]
    verdict = "promoted to @champion" if decision["promoted"] else "not promoted"
    if decision["promoted"] and not decision["applied"]:
        verdict = "would be promoted (promote=false: registry unchanged)"
    lines = [
        f"### {decision['model_name']} v{version}: {verdict}",
        "",
        decision["reason"],
        "",
    ]
    if decision["same_dataset"] is False:
        lines += ["**Note:** the champion was evaluated on other data.", ""]
    ours = decision["metrics"]
    theirs = decision["champion_metrics"] or {}
    head = f"champion v{champion}" if champion is not None else "champion"
    lines += [f"| metric | v{version} | {head} | Δ |", "|---|---:|---:|---:|"]
    ordered = [decision["metric"], *sorted(k for k in ours if k != decision["metric"])]
    for key in ordered:
        value, other = ours.get(key), theirs.get(key)
        delta = None if value is None or other is None else value - other
        name = f"**{key}**" if key == decision["metric"] else key
        lines.append(f"| {name} | {_fmt(value)} | {_fmt(other)} | {_fmt(delta, '+')} |")
    return "\n".join(lines) + "\n"
