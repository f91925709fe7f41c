"""The step run size chosen from measured cost when ``--run-batch`` is 0 (on a CPU)."""

from __future__ import annotations

import re

import httpx
from conftest import exported_model
from serve_fixtures import Server

from seqops.predictor import Predictor
from serve.batcher import RUN_SIZES, choose_run_batch, measure_run_costs


def test_choose_smallest_within_tolerance_of_best():
    # 8 is cheapest; 4 is within 5% of it, so the smaller 4 wins; 2 is 10% over.
    costs = {1: 2.0, 2: 1.10, 4: 1.04, 8: 1.0, 16: 1.01}
    assert choose_run_batch(costs) == 4
    assert choose_run_batch(costs, tolerance=0.0) == 8
    assert choose_run_batch({1: 1.0, 2: 1.5, 4: 1.2}) == 1


def test_measured_costs_cover_the_candidates():
    predictor = Predictor(exported_model("plain")[0], device="cpu", threads=1)
    costs = measure_run_costs(predictor, repeats=2)
    assert sorted(costs) == list(RUN_SIZES)
    assert all(cost > 0 for cost in costs.values())
    assert choose_run_batch(costs) in RUN_SIZES


def _run_batch(srv: Server) -> int:
    text = httpx.get(f"{srv.base}/metrics", timeout=10).text
    found = re.search(r"^seqops_run_batch (\S+)$", text, re.MULTILINE)
    assert found, text[-2000:]
    return int(float(found.group(1)))


def test_an_exemplar_model_is_measured_too():
    """Its encoder needs boxes: the measurement gives them (a server of an exemplar model
    failed to start before)."""
    predictor = Predictor(exported_model("exemplars")[0], device="cpu", threads=1)
    costs = measure_run_costs(predictor, sizes=(1, 2), repeats=1)
    assert set(costs) == {1, 2} and all(c > 0 for c in costs.values())


def test_server_measures_unless_set(tmp_path):
    model_dir = exported_model("plain")[0]
    with Server(model_dir, tmp_path / "measured.log") as srv:
        chosen = _run_batch(srv)
    assert chosen in RUN_SIZES
    assert f"run_batch {chosen} chosen from step ms per image" in srv.output()
    with Server(model_dir, tmp_path / "set.log", "--run-batch", "3") as srv:
        assert _run_batch(srv) == 3
    assert "chosen from step ms" not in srv.output()
