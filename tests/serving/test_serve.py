"""The HTTP service in-process: every endpoint and error path, against a real exported_model model.

The model is a random-init tiny network whose done head never fires, so ``max_objects``
sets the count exactly and a tiny ``done_threshold`` makes it stop at once (see
``serve_fixtures``). Answers are compared with the library's own ``Predictor.predict``: the
server must return what the predictor computes, through every input format.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import shutil
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_fixtures import (
    DONE_AT_ONCE_THRESHOLD,
    MODEL_VERSION,
    PNG,
    PNG_HEADERS,
    expected,
    make_client,
    make_png,
    serve_model,
)

from seqops.predictor import Predictor
from serve.app import create_app
from serve.batcher import DeadlineError, Job, QueueFullError, ShuttingDownError, StepBatcher
from serve.prometheus import ServeMetrics
from serve.settings import ServeSettings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return serve_model()


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor.load(model_dir, device="cpu", threads=1)


@pytest.fixture
def client(predictor):
    with make_client(predictor) as c:
        yield c


# --- /predict ---------------------------------------------------------------------------------


def test_predict_raw_multipart_and_json_give_the_predictors_answer(client, predictor):
    want = expected(predictor)
    raw = client.post("/predict", content=PNG, headers=PNG_HEADERS)
    multipart = client.post("/predict", files={"file": ("a.png", PNG, "image/png")})
    as_json = client.post("/predict", json={"image": base64.b64encode(PNG).decode()})
    for response in (raw, multipart, as_json):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["count"] == want.count == 5
        assert body["stopped_by"] == "max_objects"
        assert np.allclose(body["points"], want.points, atol=0.02)
        assert body["done_probs"] == pytest.approx(want.done_probs, abs=1e-4)
        assert body["count_confidence"] == want.count_confidence == 0.0  # stopped by the guard
        assert body["model"] == {
            "name": "seqops",
            "version": MODEL_VERSION,
            "provider": "CPUExecutionProvider",
            "confidence_calibrated": False,
        }
        assert {"prepare", "queue", "encode", "steps", "total"} <= set(body["timings_ms"])
    # Points are in the original 96x64 image's pixels, not the model's 64x64.
    points = np.asarray(raw.json()["points"])
    assert (points[:, 0] <= 96).all() and (points[:, 1] <= 64).all()
    assert np.allclose(points, np.asarray(want.points_model) * [96 / 64, 1.0], atol=0.05)


def test_predict_options_from_query_form_and_json(client):
    query = client.post("/predict?max_objects=2", content=PNG, headers=PNG_HEADERS)
    form = client.post(
        "/predict", files={"file": ("a.png", PNG, "image/png")}, data={"max_objects": "3"}
    )
    body = {"image": base64.b64encode(PNG).decode(), "max_objects": 4}
    as_json = client.post("/predict", json=body)
    assert [r.json()["count"] for r in (query, form, as_json)] == [2, 3, 4]


def test_predict_stops_on_done(client):
    response = client.post(
        f"/predict?done_threshold={DONE_AT_ONCE_THRESHOLD}", content=PNG, headers=PNG_HEADERS
    )
    body = response.json()
    assert (body["count"], body["points"], body["stopped_by"]) == (0, [], "done")
    assert len(body["done_probs"]) == 1


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "text/plain"),
        ({"content": b"not an image", "headers": PNG_HEADERS}, 400, "decodable"),
        ({"content": b"", "headers": PNG_HEADERS}, 400, "empty"),
        ({"json": {"image": "***"}}, 400, "base64"),
        ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "JSON"),
        ({"json": {"image": "", "max_objectz": 2}}, 422, "max_objectz"),
        ({"json": {"max_objects": 2}}, 422, "image"),
        ({"files": {"other": ("a.png", PNG, "image/png")}}, 422, "file"),
    ],
)
def test_predict_rejects_bad_content(client, kwargs, status, needle):
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    assert needle in json.dumps(response.json()["detail"])


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("max_objects=0", "max_objects"),
        ("max_objects=5000", "at most 1000"),
        ("done_threshold=1.5", "done_threshold"),
        ("deadline_s=9999", "deadline_s"),
        ("exemplars=[[1,2,3]]", "exemplars"),
        ("exemplars=[[1,2,30,40]]", "without exemplars"),  # this model takes none
    ],
)
def test_predict_rejects_bad_parameters_with_422(client, query, needle):
    response = client.post(f"/predict?{query}", content=PNG, headers=PNG_HEADERS)
    assert response.status_code == 422, response.text
    assert needle in json.dumps(response.json()["detail"])


def test_limits_body_size_and_pixel_count(predictor):
    with make_client(predictor, max_body_bytes=4096, max_pixels=5000) as c:
        big = make_png(200, 200)  # ~120 kB of noise, 40 000 pixels
        by_length = c.post("/predict", content=big, headers=PNG_HEADERS)
        assert by_length.status_code == 413 and "limit" in by_length.json()["detail"]

        def chunks():  # no Content-Length: the limit holds while streaming
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        chunked = c.post("/predict", content=chunks(), headers=PNG_HEADERS)
        assert chunked.status_code == 413
        pixels = c.post("/predict", content=_flat_png(100, 80), headers=PNG_HEADERS)
        assert pixels.status_code == 413 and "8000 pixels exceeds" in pixels.json()["detail"]
        kserve = c.post("/v2/models/seqops/infer", content=big)
        assert kserve.status_code == 413 and "error" in kserve.json()


def _flat_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()  # compresses to a few hundred bytes


# --- /predict/stream and /next ----------------------------------------------------------------


def test_stream_sends_points_then_the_final_record(client):
    plain = client.post("/predict?max_objects=4", content=PNG, headers=PNG_HEADERS).json()
    response = client.post("/predict/stream?max_objects=4", content=PNG, headers=PNG_HEADERS)
    assert response.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in response.text.splitlines()]
    assert [r["event"] for r in records] == ["point"] * 4 + ["done"]
    assert np.allclose([[r["x"], r["y"]] for r in records[:4]], plain["points"], atol=0.02)
    assert [r["index"] for r in records[:4]] == [0, 1, 2, 3]
    assert records[-1]["count"] == 4 and records[-1]["model"]["version"] == MODEL_VERSION
    assert records[-1]["count_confidence"] == plain["count_confidence"]

    sse = client.post(
        "/predict/stream?max_objects=2",
        content=PNG,
        headers={**PNG_HEADERS, "accept": "text/event-stream"},
    )
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = [block for block in sse.text.split("\n\n") if block]
    assert [e.splitlines()[0] for e in events] == ["event: point"] * 2 + ["event: done"]
    assert json.loads(events[-1].splitlines()[1].removeprefix("data: "))["count"] == 2


def test_stream_reports_a_deadline_as_an_error_record(client):
    response = client.post(
        "/predict/stream?max_objects=1000&deadline_s=0.000001", content=PNG, headers=PNG_HEADERS
    )
    if response.status_code == 200:  # admitted before the deadline passed: error record
        last = json.loads(response.text.splitlines()[-1])
        assert (last["event"], last["status"]) == ("error", 504)
    else:
        assert response.status_code == 504


def test_next_continues_from_given_points(client):
    full = client.post("/predict?max_objects=4", content=PNG, headers=PNG_HEADERS).json()
    given = full["points"][:2]
    body = {"image": base64.b64encode(PNG).decode(), "points": given}
    step = client.post("/next", json=body).json()
    assert step["index"] == 2 and step["done"] is False
    assert np.allclose([step["x"], step["y"]], full["points"][2], atol=0.5)
    assert step["done_prob"] == pytest.approx(full["done_probs"][2], abs=1e-4)
    # The same through multipart, and with nothing given: the first point.
    first = client.post("/next", files={"file": ("a.png", PNG, "image/png")}).json()
    assert np.allclose([first["x"], first["y"]], full["points"][0], atol=0.05)
    done = client.post(f"/next?done_threshold={DONE_AT_ONCE_THRESHOLD}", json=body).json()
    assert done["done"] is True


def test_a_calibrated_model_answers_its_confidence_everywhere_a_count_goes(predictor, tmp_path):
    """A copy of the served model whose graphs carry a calibration that gives 0.8 to every
    loop that says done: /predict, the stream's last record and KServe all report it."""
    from seqops.export import rewrite_metadata
    from seqops.predictor import read_metadata

    model_dir = tmp_path / "calibrated"
    shutil.copytree(predictor.model_dir, model_dir)
    calibration = {"features": ["stop_log_prob"], "center": [0.0], "scale": [1.0],
                   "coef": [0.0], "intercept": math.log(0.8 / 0.2)}  # fmt: skip
    meta = read_metadata(model_dir / "encoder.onnx")
    rewrite_metadata(model_dir, {**meta, "count_calibration": calibration})
    calibrated = Predictor(model_dir, device="cpu", threads=1)
    query = f"done_threshold={DONE_AT_ONCE_THRESHOLD}"
    with make_client(calibrated) as client:
        body = client.post(f"/predict?{query}", content=PNG, headers=PNG_HEADERS).json()
        stream = client.post(f"/predict/stream?{query}", content=PNG, headers=PNG_HEADERS)
        request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                               "data": [base64.b64encode(PNG).decode()]}],
                   "parameters": {"done_threshold": DONE_AT_ONCE_THRESHOLD}}  # fmt: skip
        kserve = client.post("/v2/models/seqops/infer", json=request).json()
        guarded = client.post("/predict?max_objects=2", content=PNG, headers=PNG_HEADERS)
    assert (body["count"], body["count_confidence"]) == (0, 0.8)
    assert body["model"]["confidence_calibrated"] is True
    last = json.loads(stream.text.splitlines()[-1])
    assert (last["event"], last["count_confidence"]) == ("done", 0.8)
    outputs = {o["name"]: o for o in kserve["outputs"]}
    assert outputs["count_confidence"] == {
        "name": "count_confidence", "datatype": "FP32", "shape": [1], "data": [0.8]
    }  # fmt: skip
    assert kserve["parameters"]["confidence_calibrated"] is True
    # Stopped by max_objects, not by done: 0 whatever the calibration says.
    assert guarded.json()["count_confidence"] == 0.0


def test_next_rejects_points_outside_the_image(client):
    body = {"image": base64.b64encode(PNG).decode(), "points": [[10, 10], [500, 10]]}
    response = client.post("/next", json=body)
    assert response.status_code == 422 and "outside the 96x64" in response.json()["detail"]
    bad = client.post("/next", json={**body, "points": [[1, 2, 3]]})
    assert bad.status_code == 422


# --- health, readiness, auth, metrics, docs -----------------------------------------------


def test_liveness_at_once_readiness_after_loading(model_dir, tmp_path):
    app = create_app(ServeSettings(model=str(model_dir), threads=1))
    with TestClient(app) as c:
        assert c.get("/healthz").json() == {"live": True}
        for _ in range(200):  # the model loads in the background
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/readyz").json()["model"]["version"] == MODEL_VERSION
        assert c.get("/v2/health/ready").status_code == 200
        app.state.service.draining = True  # what SIGTERM does first
        assert c.get("/readyz").json() == {"ready": False, "reason": "shutting down"}
        assert c.get("/v2/health/ready").status_code == 503
        # A request already on its way is still served (uvicorn refuses new connections).
        assert c.post("/predict", content=PNG, headers=PNG_HEADERS).status_code == 200
    broken = create_app(ServeSettings(model=str(tmp_path)))  # no model there
    with TestClient(broken) as c:
        for _ in range(100):
            if c.get("/healthz").status_code == 503:
                break
            time.sleep(0.05)
        assert "encoder.onnx" in c.get("/healthz").json()["error"]
        assert c.get("/readyz").status_code == 503
        response = c.post("/predict", content=PNG, headers=PNG_HEADERS)
        assert response.status_code == 503 and "not ready" in response.json()["detail"]


def test_api_key_guards_everything_but_health_and_metrics(predictor, monkeypatch):
    monkeypatch.setenv("SEQOPS_TEST_KEY", "s3cret")
    with make_client(predictor, api_key_env="SEQOPS_TEST_KEY") as c:
        missing = c.post("/predict", content=PNG, headers=PNG_HEADERS)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = {**PNG_HEADERS, "authorization": "Bearer nope"}
        assert c.post("/predict", content=PNG, headers=wrong).status_code == 401
        right = {**PNG_HEADERS, "authorization": "Bearer s3cret"}
        assert c.post("/predict", content=PNG, headers=right).status_code == 200
        kserve = c.post("/v2/models/seqops/infer", json={"inputs": []})
        assert kserve.status_code == 401 and "API key" in kserve.json()["error"]
        for open_path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready", "/docs"):
            assert c.get(open_path).status_code == 200, open_path


def test_metrics_count_requests_steps_and_batches(client):
    for _ in range(2):
        client.post("/predict?max_objects=3", content=PNG, headers=PNG_HEADERS)
    client.post("/predict", content=b"x", headers={"content-type": "text/plain"})
    text = client.get("/metrics").text
    assert 'seqops_requests_total{endpoint="predict",reason="ok"} 2.0' in text
    assert 'seqops_requests_total{endpoint="predict",reason="unsupported_media_type"} 1.0' in text
    assert 'seqops_request_duration_seconds_count{endpoint="predict"} 3.0' in text
    assert "seqops_steps_per_request_sum 6.0" in text  # 3 steps each
    assert "seqops_step_seconds_count 6.0" in text
    assert "seqops_batch_size_bucket" in text and "seqops_queue_seconds_bucket" in text
    assert "seqops_inflight_requests 0.0" in text
    assert 'provider="CPUExecutionProvider"' in text and f'version="{MODEL_VERSION}"' in text


def test_openapi_documents_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/predict", "/predict/stream", "/next", "/v2/models/{model_name}/infer"):
        assert path in paths
    assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    # Every reference resolves: inlined pydantic schemas must not point at their own $defs.
    refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(schema))
    assert refs and {r.rpartition("/")[0] for r in refs} == {"#/components/schemas"}
    assert {r.rpartition("/")[2] for r in refs} <= set(schema["components"]["schemas"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_json_routes_declare_the_response_model_that_validates_them(client):
    """A route without one documents an empty 200 schema. Only the streamed records and the
    Prometheus text (not JSON) go without one."""
    without = set()
    for path, methods in client.get("/openapi.json").json()["paths"].items():
        for operation in methods.values():
            answer = operation["responses"].get("200") or operation["responses"]["201"]
            ok = answer.get("content", {}).get("application/json", {})
            if not ok.get("schema"):
                without.add(path)
    assert without == {"/predict/stream", "/metrics"}


# --- the queue, deadlines, step batching ---------------------------------------------------


def test_full_queue_answers_429_with_retry_after(predictor):
    # The places: the queue's (1) and the loop's free ones (1).
    with make_client(predictor, max_queue=1, max_active=1) as c:
        for _ in range(2):
            c.app.state.service.batcher.admit()  # other requests hold every place
        response = c.post("/predict", content=PNG, headers=PNG_HEADERS)
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert "queue is full" in response.json()["detail"]
        c.app.state.service.batcher.release()
        assert c.post("/predict", content=PNG, headers=PNG_HEADERS).status_code == 200
        c.app.state.service.batcher.release()
    with make_client(predictor, max_queue=1, max_active=1, queue_full_status=503) as c:
        for _ in range(2):
            c.app.state.service.batcher.admit()
        assert c.post("/predict", content=PNG, headers=PNG_HEADERS).status_code == 503
        for _ in range(2):
            c.app.state.service.batcher.release()  # else shutdown waits for them


def test_deadline_answers_504(client):
    response = client.post(
        "/predict?max_objects=1000&deadline_s=0.000001", content=PNG, headers=PNG_HEADERS
    )
    assert response.status_code == 504 and "deadline" in response.json()["detail"]


def run_batcher(predictor, jobs_spec, max_active=16, run_batch=16, encode_share=0.5, run_threads=1):
    """Submit jobs concurrently to a fresh batcher; returns results and the metrics."""

    async def main():
        metrics = ServeMetrics()
        batcher = StepBatcher(
            predictor, max_active, 64, metrics, run_batch, encode_share, run_threads
        )
        batcher.start()
        futures = []
        for png, max_objects, deadline_s in jobs_spec:
            batcher.admit()
            image = predictor.prepare(png)
            job = Job(image, 0.5, max_objects, time.monotonic() + deadline_s)
            futures.append(batcher.submit(job))
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        return results, metrics

    return asyncio.run(main())


def test_step_batching_matches_one_by_one_and_lets_images_leave_early(predictor):
    pngs = [make_png(96, 64, seed=s) for s in range(4)]
    counts = [1, 7, 3, 12]
    results, metrics = run_batcher(
        predictor, [(p, n, 30.0) for p, n in zip(pngs, counts, strict=True)]
    )
    for png, n, got in zip(pngs, counts, results, strict=True):
        want = expected(predictor, png, max_objects=n)
        assert got.count == n and np.allclose(got.points, want.points, atol=0.02)
    # 12 steps in all (the longest request), not 1 + 7 + 3 + 12: images shared step runs.
    registry = metrics.registry
    assert registry.get_sample_value("seqops_step_seconds_count") == 12
    assert registry.get_sample_value("seqops_batch_size_sum") == sum(counts)
    assert registry.get_sample_value("seqops_encode_seconds_count") == 1  # one batched encode


def test_runs_of_run_batch_images_give_the_same_answers(predictor):
    """Runs of 2: 4 newcomers all join in the first turn (encoded in two runs), and the
    active set is stepped in pairs: 4 objects take 4 turns."""
    pngs = [make_png(96, 64, seed=s) for s in range(4)]
    results, metrics = run_batcher(predictor, [(p, 4, 30.0) for p in pngs], run_batch=2)
    for png, got in zip(pngs, results, strict=True):
        assert np.allclose(got.points, expected(predictor, png, max_objects=4).points, atol=0.02)
    registry = metrics.registry
    assert registry.get_sample_value("seqops_encode_seconds_count") == 1
    assert registry.get_sample_value("seqops_step_seconds_count") == 4
    assert registry.get_sample_value("seqops_batch_size_sum") == 16  # all four, every turn


def test_runs_side_by_side_give_the_same_answers(predictor):
    """Two run threads: runs of 2 images encoded and stepped at once, same points."""
    pngs = [make_png(96, 64, seed=s) for s in range(5)]
    counts = [4, 2, 6, 1, 3]
    specs = [(p, n, 30.0) for p, n in zip(pngs, counts, strict=True)]
    results, metrics = run_batcher(predictor, specs, run_batch=2, run_threads=2)
    for png, n, got in zip(pngs, counts, results, strict=True):
        want = expected(predictor, png, max_objects=n)
        assert got.count == n and np.allclose(got.points, want.points, atol=0.02)
    assert metrics.registry.get_sample_value("seqops_step_seconds_count") == 6


def test_batching_off_runs_one_request_at_a_time(predictor):
    results, metrics = run_batcher(predictor, [(PNG, 3, 30.0)] * 3, max_active=1)
    assert [r.count for r in results] == [3, 3, 3]
    assert metrics.registry.get_sample_value("seqops_batch_size_sum") == 9
    assert metrics.registry.get_sample_value("seqops_step_seconds_count") == 9


def test_deadline_stops_the_loop_between_steps(predictor):
    results, _ = run_batcher(predictor, [(PNG, 100_000, 0.05), (PNG, 2, 30.0)])
    assert isinstance(results[0], DeadlineError)
    found = int(str(results[0]).split("after ")[1].split()[0])
    assert 0 < found < 100_000  # stopped mid-loop, not before the first step
    assert results[1].count == 2  # its neighbour in the batch was not disturbed


def test_fair_share_a_newcomer_is_charged_its_encoding_before_it_steps():
    """A long loop charged 10 steps; a newcomer starts at 10 plus half an encoding (4
    steps): it sits out two turns while the long loop catches up, then both step."""

    async def main():
        batcher = StepBatcher(None, 8, 8, ServeMetrics(), 4, encode_share=0.5)
        batcher._encode_steps = 4.0
        long_job = Job(None, 0.5, 50, 1e12, charge=10.0)
        newcomer = Job(None, 0.5, 5, 1e12)
        batcher._active = [long_job]
        turns = [batcher._due([newcomer], [long_job, newcomer])]
        batcher._active = [long_job, newcomer]
        for _ in range(3):
            for job in turns[-1]:
                job.charge += 1.0  # what a turn's step charges
            turns.append(batcher._due([], batcher._active))
        return turns, long_job, newcomer

    turns, long_job, newcomer = asyncio.run(main())
    assert newcomer.charge >= 12.0
    assert turns == [[long_job], [long_job], [long_job, newcomer], [long_job, newcomer]]


def test_fair_share_on_an_idle_server_a_request_steps_at_once():
    async def main():
        batcher = StepBatcher(None, 8, 8, ServeMetrics(), 4, encode_share=1.0)
        job = Job(None, 0.5, 5, 1e12)
        return batcher._due([job], [job]) == [job]

    assert asyncio.run(main())


@pytest.mark.parametrize("encode_share", [0.0, 1.0])
def test_a_short_request_joining_a_long_loop_gets_its_answer_first(predictor, encode_share):
    """Whatever the share, a 3-object request sent while a 400-object loop runs is answered
    long before it (it is not queued behind it), and both get the predictor's answer."""

    async def main():
        batcher = StepBatcher(predictor, 8, 8, ServeMetrics(), 4, encode_share)
        batcher.start()
        finished = []

        async def count(png, n):
            batcher.admit()
            job = Job(predictor.prepare(png), 0.5, n, time.monotonic() + 60)
            prediction = await batcher.submit(job)
            finished.append(n)
            return prediction

        long_task = asyncio.create_task(count(make_png(96, 64, seed=1), 400))
        await asyncio.sleep(0.05)  # the long loop is stepping
        short = await count(PNG, 3)
        result = await long_task
        await batcher.close()
        return finished, short, result

    finished, short, result = asyncio.run(main())
    assert finished == [3, 400]
    assert np.allclose(short.points, expected(predictor, max_objects=3).points, atol=0.02)
    want = expected(predictor, make_png(96, 64, seed=1), max_objects=400)
    assert result.count == 400 and np.allclose(result.points, want.points, atol=0.02)


def test_admission_is_bounded():
    metrics = ServeMetrics()

    async def main():
        batcher = StepBatcher(predictor=None, max_active=1, max_queue=2, metrics=metrics)
        for _ in range(3):  # the queue's 2 places and the idle loop's 1
            batcher.admit()
        with pytest.raises(QueueFullError) as info:
            batcher.admit()
        batcher.release()
        batcher.admit()
        return info.value.retry_after

    assert asyncio.run(main()) >= 1


def test_a_deadline_answers_504_with_the_points_found_so_far(predictor):
    with make_client(predictor, max_objects_limit=100_000) as c:
        response = c.post(
            "/predict?max_objects=100000&deadline_s=0.3", content=PNG, headers=PNG_HEADERS
        )
        assert response.status_code == 504, response.text
        partial = response.json()["partial"]
        assert partial["count"] > 0 and len(partial["points"]) == partial["count"]
        # The same points the loop gives when it is let run that far, in original pixels.
        want = expected(predictor, max_objects=partial["count"])
        assert np.allclose(partial["points"], want.points, atol=0.02)
        request = {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1],
                 "data": [base64.b64encode(PNG).decode()]}
            ],
            "parameters": {"max_objects": 100000, "deadline_s": 0.3},
        }  # fmt: skip
        infer = c.post("/v2/models/seqops/infer", json=request)
        assert infer.status_code == 504 and infer.json()["partial"]["count"] > 0


def test_shutdown_running_out_stops_every_request_with_its_points(predictor):
    """What SIGTERM does when the graceful timeout nears its end (Service.cut_in_flight)."""

    async def main():
        batcher = StepBatcher(predictor, 4, 8, ServeMetrics(), 4)
        batcher.start()
        futures = []
        for seed in range(3):
            batcher.admit()
            job = Job(predictor.prepare(make_png(96, 64, seed=seed)), 0.5, 100_000, 1e12)
            futures.append(batcher.submit(job))
        await asyncio.sleep(0.3)
        stopped = batcher.stop_all("server shutting down")
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        return stopped, results

    stopped, results = asyncio.run(main())
    assert stopped == 3
    for result in results:
        assert isinstance(result, ShuttingDownError) and "stopped after" in str(result)
        assert result.partial["count"] > 0
        assert len(result.partial["points"]) == result.partial["count"]


def test_a_stream_failure_is_counted_by_its_status(client):
    response = client.post(
        "/predict/stream?max_objects=1000&deadline_s=0.05", content=PNG, headers=PNG_HEADERS
    )
    metrics = client.get("/metrics").text
    if response.status_code == 200:  # the error came as the last record
        assert json.loads(response.text.splitlines()[-1])["status"] == 504
    assert 'seqops_requests_total{endpoint="predict_stream",reason="deadline"} 1.0' in metrics
    assert 'endpoint="predict_stream",reason="ok"' not in metrics


def test_docs_load_their_assets_from_the_server_not_a_cdn(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert not re.findall(r"https?://", html), page  # works offline
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(client.get(a).status_code == 200 for a in assets), assets


def test_a_large_jpeg_is_decoded_reduced_and_answered_in_its_own_pixels(client, predictor):
    from PIL import Image

    from seqops.imaging import load_image_reduced

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (60, 80, 3), np.uint8).repeat(16, 0).repeat(16, 1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)  # 1280x960
    jpeg = buffer.getvalue()
    reduced, full = load_image_reduced(jpeg, predictor.info.image_size)
    assert full == (1280, 960) and reduced.size == (160, 120)  # 1/8: the model takes 64 px
    want = predictor.predict([reduced], max_objects=5)[0]
    response = client.post("/predict", content=jpeg, headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert np.allclose(response.json()["points"], np.asarray(want.points) * 8, atol=0.2)


def test_a_large_png_is_reduced_before_the_resize_and_answered_in_its_own_pixels(client, predictor):
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 255, (64, 80, 3), np.uint8)
    large = Image.fromarray(pixels.repeat(8, 0).repeat(8, 1))  # 640x512: 8x the model's 64
    buffer = io.BytesIO()
    large.save(buffer, "PNG")
    want = predictor.predict([large.reduce(8)], max_objects=5)[0]
    response = client.post("/predict", content=buffer.getvalue(), headers=PNG_HEADERS)
    assert response.status_code == 200, response.text
    assert np.allclose(response.json()["points"], np.asarray(want.points) * 8, atol=0.2)


def test_the_pixel_budget_lets_large_decodes_take_turns():
    import threading

    from serve.service import PixelBudget

    budget = PixelBudget(100)
    inside, most = [0], [0]
    lock = threading.Lock()

    def decode(pixels):
        pixels = min(pixels, 100)  # an image over the whole budget holds all of it
        with budget.hold(pixels):
            with lock:
                inside[0] += pixels
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= pixels

    threads = [threading.Thread(target=decode, args=(p,)) for p in (90, 90, 5, 5, 500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] <= 100  # never two large ones at once; one over the budget alone


def test_a_full_server_refuses_before_routing_but_not_before_the_api_key(predictor, monkeypatch):
    monkeypatch.setenv("SEQOPS_TEST_KEY", "s3cret")
    with make_client(predictor, max_queue=1, max_active=1, api_key_env="SEQOPS_TEST_KEY") as c:
        for _ in range(2):
            c.app.state.service.batcher.admit()
        infer = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
        assert c.post("/predict", content=PNG, headers=PNG_HEADERS).status_code == 401
        key = {"authorization": "Bearer s3cret"}
        for path, kwargs in (
            ("/predict", {"content": PNG, "headers": PNG_HEADERS | key}),
            ("/next", {"content": PNG, "headers": PNG_HEADERS | key}),
            ("/v2/models/seqops/infer", {"json": infer, "headers": key}),
        ):
            response = c.post(path, **kwargs)
            assert response.status_code == 429, (path, response.text)
            assert int(response.headers["retry-after"]) >= 1
        assert "queue is full" in response.json()["error"]  # KServe's error format
        metrics = c.get("/metrics").text
        assert 'seqops_requests_total{endpoint="predict",reason="queue_full"} 1.0' in metrics
        for _ in range(2):
            c.app.state.service.batcher.release()
