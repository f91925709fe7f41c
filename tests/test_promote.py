"""Promotion against a real MLflow registry (a temporary SQLite store, versions from tiny files)."""

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from seqops.config import PromoteConfig
from seqops.promote import (
    CHAMPION_ALIAS,
    DATASET_TAG,
    DECISION_TAG,
    EVALUATION_TAG,
    PromotionError,
    decide_promotion,
    find_candidate_version,
    flatten_metrics,
    format_decision,
    is_better,
    promote_model,
    record_evaluation,
)

LOWER = PromoteConfig(metric="count_mae", higher_is_better=False)
_names = itertools.count()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One SQLite registry for the module (creating its tables takes seconds)."""
    mlflow = pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    client.create_experiment("promote", artifact_location=(root / "artifacts").as_uri())
    client._test_root = root
    return client


@pytest.fixture
def model(client) -> str:
    """A fresh registered model name per test, so tests do not see each other's aliases."""
    name = f"seqops-test-{next(_names)}"
    client.create_registered_model(name)
    return name


def register(client, name: str, run_metrics: dict | None = None) -> str:
    """A model version backed by a tiny file logged into a fresh run."""
    experiment = client.get_experiment_by_name("promote").experiment_id
    run = client.create_run(experiment)
    weights = Path(client._test_root) / f"{run.info.run_id}.bin"
    weights.write_bytes(b"\x00\x01")
    client.log_artifact(run.info.run_id, str(weights), "model")
    for key, value in (run_metrics or {}).items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    return str(version.version)


def champion_of(client, name: str) -> str | None:
    holder = client.get_registered_model(name).aliases.get(CHAMPION_ALIAS)
    return None if holder is None else str(holder)


# --- pure helpers ---------------------------------------------------------------------


def test_flatten_metrics_keeps_numbers_with_dotted_keys():
    flat = flatten_metrics({"count_mae": 1, "count": {"rmse": 2.5, "buckets": {"5-10": 0.5}},
                            "ok": True, "note": "x"})  # fmt: skip
    assert flat == {"count_mae": 1.0, "count.rmse": 2.5, "count.buckets.5-10": 0.5}


def test_is_better_follows_direction_and_a_tie_is_not_better():
    assert is_better(0.3, 0.5, higher_is_better=False)
    assert not is_better(0.5, 0.3, higher_is_better=False)
    assert is_better(0.9, 0.8, higher_is_better=True)
    assert not is_better(0.5, 0.5, higher_is_better=False)
    assert not is_better(0.5, 0.5, higher_is_better=True)


def _champion(version: str, value: float | None, dataset: str | None = None) -> dict:
    """What ``read_champion`` returns for a champion with ``count_mae`` = ``value``."""
    metrics = {} if value is None else {"count_mae": value}
    return {"version": version, "value": value, "metrics": metrics, "dataset": dataset,
            "source": "evaluation" if metrics else None}  # fmt: skip


def test_decide_promotion_compares_with_the_champion():
    first = decide_promotion("m", "1", {"count_mae": 0.8}, LOWER, None)
    assert first["promoted"] and first["reason"] == "no model holds @champion yet"
    better = decide_promotion("m", "2", {"count_mae": 0.5}, LOWER, _champion("1", 0.8), "d:a")
    assert better["promoted"] and math.isclose(better["delta"], -0.3)
    assert better["same_dataset"] is None  # the champion's data is unknown: nothing to compare
    worse = decide_promotion("m", "3", {"count_mae": 0.9}, LOWER, _champion("2", 0.5, "d:a"), "d:b")
    assert not worse["promoted"] and worse["same_dataset"] is False
    assert "not better (lower is better)" in worse["reason"]
    unknown = decide_promotion("m", "4", {"count_mae": 0.1}, LOWER, _champion("2", None))
    assert not unknown["promoted"] and "no recorded 'count_mae'" in unknown["reason"]
    same = decide_promotion("m", "2", {"count_mae": 0.5}, LOWER, _champion("2", 0.5))
    assert not same["promoted"] and same["delta"] == 0.0


class _TagRecorder:
    """Stands in for ``MlflowClient``: records model version tags and knows one alias."""

    def __init__(self, aliases: dict | None = None):
        self.tags: dict[str, str] = {}
        self.aliases = aliases or {}

    def set_model_version_tag(self, name, version, key, value):
        assert len(value) <= 5000  # MLflow's limit on a tag value
        self.tags[key] = value

    def get_registered_model(self, name):
        return SimpleNamespace(aliases=self.aliases)


def _long_evaluation(metric_value: float) -> dict[str, float]:
    """An evaluation too long for one tag, with ``count_mae`` sorted after most keys."""
    metrics = {f"a_bucket_{i:03d}": i / 7 for i in range(300)}
    return {**metrics, "count_mae": metric_value}


def test_a_long_evaluation_keeps_the_promotion_metric():
    client = _TagRecorder()
    metrics = _long_evaluation(0.25)
    assert len(json.dumps(metrics)) > 5000
    record_evaluation(client, "m", "1", metrics, "d:a", keep="count_mae")
    stored = json.loads(client.tags[EVALUATION_TAG])
    assert stored["count_mae"] == 0.25
    assert 100 < len(stored) < len(metrics)  # the rest is cut to fit
    assert client.tags[DATASET_TAG] == "d:a"


def test_find_candidate_version_falls_back_to_the_candidate_alias():
    assert find_candidate_version(_TagRecorder(), "m", 3) == "3"
    assert find_candidate_version(_TagRecorder({"candidate": 5}), "m", None) == "5"
    with pytest.raises(PromotionError, match="no version of 'm' holds @candidate"):
        find_candidate_version(_TagRecorder(), "m", None)


# --- against the registry (slow: importing MLflow and creating its tables takes ~10 s) ---


@pytest.mark.slow
def test_first_candidate_becomes_champion_and_its_evaluation_is_recorded(client, model):
    v1 = register(client, model)
    decision = promote_model(client, model, v1, {"count_mae": 0.8, "f1": 0.5}, LOWER,
                             dataset="data:abc")  # fmt: skip
    assert decision["promoted"] and decision["champion_version"] is None
    assert champion_of(client, model) == v1
    tags = client.get_model_version(model, v1).tags
    assert '"count_mae": 0.8' in tags[EVALUATION_TAG]
    assert tags[DATASET_TAG] == "data:abc"
    assert tags[DECISION_TAG].startswith("promoted")


@pytest.mark.slow
def test_better_moves_the_alias_and_worse_leaves_it(client, model):
    v1, v2, v3 = (register(client, model) for _ in range(3))
    promote_model(client, model, v1, {"count_mae": 0.8}, LOWER)

    better = promote_model(client, model, v2, {"count_mae": 0.5}, LOWER)
    assert better["promoted"] and better["champion_version"] == v1
    assert better["champion_value"] == 0.8
    assert math.isclose(better["delta"], -0.3)
    assert champion_of(client, model) == v2

    worse = promote_model(client, model, v3, {"count_mae": 0.6}, LOWER)
    assert not worse["promoted"] and worse["champion_version"] == v2
    assert math.isclose(worse["delta"], 0.1)
    assert "not better" in worse["reason"]
    assert champion_of(client, model) == v2
    assert client.get_model_version(model, v3).tags[DECISION_TAG].startswith("not promoted")


@pytest.mark.slow
def test_higher_is_better_and_ties_keep_the_champion(client, model):
    config = PromoteConfig(metric="f1", higher_is_better=True)
    v1, v2, v3 = (register(client, model) for _ in range(3))
    promote_model(client, model, v1, {"f1": 0.7}, config)
    assert not promote_model(client, model, v2, {"f1": 0.7}, config)["promoted"]  # a tie
    assert promote_model(client, model, v3, {"f1": 0.71}, config)["promoted"]
    assert champion_of(client, model) == v3


@pytest.mark.slow
def test_apply_false_decides_but_writes_nothing(client, model):
    v1, v2 = register(client, model), register(client, model)
    promote_model(client, model, v1, {"count_mae": 0.8}, LOWER)
    dry = promote_model(client, model, v2, {"count_mae": 0.1}, LOWER, apply=False)
    assert dry["promoted"] and not dry["applied"]
    assert champion_of(client, model) == v1
    assert EVALUATION_TAG not in client.get_model_version(model, v2).tags
    assert "would be promoted" in format_decision(dry)


@pytest.mark.slow
def test_the_champion_again_is_not_a_promotion(client, model):
    v1 = register(client, model)
    promote_model(client, model, v1, {"count_mae": 0.8}, LOWER)
    again = promote_model(client, model, v1, {"count_mae": 0.8}, LOWER)
    assert not again["promoted"] and "already holds" in again["reason"]
    assert champion_of(client, model) == v1


@pytest.mark.slow
def test_a_champion_set_by_hand_is_compared_through_its_run_metrics(client, model):
    v1 = register(client, model, run_metrics={"test/count_mae": 0.4})
    client.set_registered_model_alias(model, CHAMPION_ALIAS, v1)
    v2 = register(client, model)
    decision = promote_model(client, model, v2, {"count_mae": 0.5}, LOWER)
    assert decision["champion_value"] == 0.4 and not decision["promoted"]


@pytest.mark.slow
def test_a_champion_without_a_known_value_is_not_replaced(client, model):
    v1 = register(client, model)
    client.set_registered_model_alias(model, CHAMPION_ALIAS, v1)
    v2 = register(client, model)
    decision = promote_model(client, model, v2, {"count_mae": 0.01}, LOWER)
    assert not decision["promoted"] and "no recorded 'count_mae'" in decision["reason"]
    assert champion_of(client, model) == v1


@pytest.mark.slow
def test_other_evaluation_data_is_flagged(client, model):
    v1, v2 = register(client, model), register(client, model)
    promote_model(client, model, v1, {"count_mae": 0.8}, LOWER, dataset="data:aaa")
    decision = promote_model(client, model, v2, {"count_mae": 0.5}, LOWER, dataset="data:bbb")
    assert decision["same_dataset"] is False and decision["promoted"]
    assert "other data" in format_decision(decision)


@pytest.mark.slow
def test_bad_input_is_a_clear_error_and_changes_nothing(client, model):
    v1 = register(client, model)
    with pytest.raises(PromotionError, match=r"no numeric metric 'count_mae'.*available: f1"):
        promote_model(client, model, v1, {"f1": 0.5}, LOWER)
    with pytest.raises(PromotionError, match="is nan"):
        promote_model(client, model, v1, {"count_mae": float("nan")}, LOWER)
    with pytest.raises(PromotionError, match="has no version 99"):
        promote_model(client, model, "99", {"count_mae": 0.5}, LOWER)
    assert champion_of(client, model) is None
    assert EVALUATION_TAG not in client.get_model_version(model, v1).tags


@pytest.mark.slow
def test_format_decision_puts_the_metric_first_with_the_difference(client, model):
    v1, v2 = register(client, model), register(client, model)
    promote_model(client, model, v1, {"count_mae": 0.8, "f1": 0.5}, LOWER)
    decision = promote_model(client, model, v2, {"count_mae": 0.5, "f1": 0.75}, LOWER)
    text = format_decision(decision)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == f"| metric | v{v2} | champion v{v1} | Δ |"
    assert rows[1] == "| **count_mae** | 0.5 | 0.8 | -0.3 |"
    assert rows[2] == "| f1 | 0.75 | 0.5 | +0.25 |"
    assert "promoted to @champion" in text


@pytest.mark.slow
def test_a_champion_with_a_long_evaluation_is_replaced_by_a_better_one(client, model):
    v1, v2 = register(client, model), register(client, model)
    promote_model(client, model, v1, _long_evaluation(0.8), LOWER)
    assert '"count_mae": 0.8' in client.get_model_version(model, v1).tags[EVALUATION_TAG]
    decision = promote_model(client, model, v2, _long_evaluation(0.5), LOWER)
    assert decision["champion_value"] == 0.8 and decision["promoted"]
    assert champion_of(client, model) == v2
