"""The real server: `seqops serve` as a process on a free loopback port.

Plain HTTP clients and ``tritonclient.http`` (the KServe v2 client) call it; SIGTERM during
requests must lose none of them, and the process must exit 0.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from serve_fixtures import MODEL_VERSION, Server, make_png, png_pixels, serve_model
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e

PNG = make_png(96, 64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return serve_model()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("serve_e2e") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_plain_http_endpoints(server):
    response = httpx.post(
        f"{server.base}/predict?max_objects=3",
        content=PNG,
        headers={"content-type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == 3 and body["model"]["version"] == MODEL_VERSION
    with httpx.stream(
        "POST",
        f"{server.base}/predict/stream?max_objects=3",
        content=PNG,
        headers={"content-type": "image/png"},
        timeout=30,
    ) as stream:
        records = [json.loads(line) for line in stream.iter_lines() if line]
    assert [r["event"] for r in records] == ["point"] * 3 + ["done"]
    assert np.allclose([[r["x"], r["y"]] for r in records[:3]], body["points"], atol=0.02)
    assert httpx.get(f"{server.base}/openapi.json").json()["info"]["title"] == "seqops"


def test_short_requests_beside_a_long_loop_are_answered_first(server):
    """The real server's fair share: 3-object requests sent while a 1000-object loop runs
    come back before it, every count right (one client, made before: a new httpx client
    costs tens of ms, as much as the loop)."""
    start = time.monotonic()

    def count(client: httpx.Client, n: int) -> tuple[int, float]:
        response = client.post(f"{server.base}/predict?max_objects={n}", content=PNG,
                               headers={"content-type": "image/png"})  # fmt: skip
        assert response.status_code == 200, response.text
        return response.json()["count"], time.monotonic() - start

    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(4) as pool:
        count(client, 1)  # the connection pool warm
        start = time.monotonic()
        long_loop = pool.submit(count, client, 1000)
        time.sleep(0.05)
        shorts = [pool.submit(count, client, 3) for _ in range(3)]
        (long_count, long_done), answers = long_loop.result(), [f.result() for f in shorts]
    assert long_count == 1000 and [n for n, _ in answers] == [3, 3, 3]
    assert all(done < long_done for _, done in answers), (long_done, answers)


def test_parallel_runs_answer_what_one_run_at_a_time_does(server, model_dir, tmp_path):
    """`--threads 1 --run-threads 2`: a turn's runs go two at a time; six concurrent
    requests get the same points as from the default server."""

    def points(base: str, seed: int) -> list:
        response = httpx.post(f"{base}/predict?max_objects={seed + 2}", timeout=60,
                              content=make_png(96, 64, seed=seed),
                              headers={"content-type": "image/png"})  # fmt: skip
        assert response.status_code == 200, response.text
        return response.json()["points"]

    args = ("--threads", "1", "--run-threads", "2", "--run-batch", "1")
    with Server(model_dir, tmp_path / "server.log", *args) as parallel:
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda seed: points(parallel.base, seed), range(6)))
        log = parallel.output()
    for seed, found in enumerate(got):
        assert len(found) == seed + 2
        assert np.allclose(found, points(server.base, seed), atol=0.02)
    assert "run_batch=1, run_threads=2" in log


def test_kserve_with_tritonclient(server):
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("seqops")
    assert client.get_model_metadata("seqops")["versions"] == [MODEL_VERSION]

    pixels = png_pixels(PNG)
    as_pixels = triton.InferInput("image", list(pixels.shape), "UINT8")
    as_pixels.set_data_from_numpy(pixels)  # binary tensor data, tritonclient's default
    result = client.infer("seqops", [as_pixels], request_id="e2e-1", parameters={"max_objects": 3})
    assert result.get_response()["id"] == "e2e-1"
    assert result.as_numpy("count").tolist() == [3]
    points = result.as_numpy("points")
    assert points.shape == (3, 2) and points.dtype == np.float32

    encoded = triton.InferInput("image", [1], "BYTES")  # base64 text in the JSON body
    encoded.set_data_from_numpy(np.array([base64.b64encode(PNG)], dtype=object), False)
    wanted = [triton.InferRequestedOutput("points", binary_data=False)]
    result = client.infer("seqops", [encoded], outputs=wanted, parameters={"max_objects": 3})
    assert np.allclose(result.as_numpy("points"), points, atol=0.02)

    with pytest.raises(InferenceServerException, match="not found"):
        client.infer("other", [as_pixels])
    metrics = httpx.get(f"{server.base}/metrics").text
    assert 'seqops_requests_total{endpoint="kserve_infer",reason="ok"} 2.0' in metrics
    assert 'seqops_requests_total{endpoint="kserve_infer",reason="not_found"} 1.0' in metrics


@pytest.mark.slow  # 3000 objects x 6 requests, then a shutdown
def test_sigterm_finishes_in_flight_requests(model_dir, tmp_path):
    srv = Server(model_dir, tmp_path / "server.log", "--max-objects-limit", "100000")
    try:
        srv.wait_ready()

        def count(i: int) -> tuple[int, int]:
            response = httpx.post(
                f"{srv.base}/predict?max_objects=3000",
                content=make_png(96, 64, seed=i),
                headers={"content-type": "image/png"},
                timeout=60,
            )
            return response.status_code, response.json().get("count", -1)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(count, i) for i in range(6)]
            stop_at = time.monotonic() + 20
            while time.monotonic() < stop_at:  # all six admitted and being stepped
                text = httpx.get(f"{srv.base}/metrics").text
                if "seqops_inflight_requests 6.0" in text:
                    break
                time.sleep(0.02)
            assert not any(f.done() for f in futures), "requests finished before SIGTERM"
            srv.proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert results == [(200, 3000)] * 6
        assert srv.proc.wait(timeout=30) == 0, srv.output()
        assert "finishing in-flight requests" in srv.output()
        with pytest.raises(httpx.TransportError):  # no longer listening
            httpx.get(f"{srv.base}/healthz", timeout=2)
    finally:
        srv.stop()


@pytest.mark.slow  # starts two worker processes
def test_workers_share_the_port_and_the_metrics(model_dir, tmp_path):
    srv = Server(model_dir, tmp_path / "server.log", "--workers", "2")
    try:
        srv.wait_ready()
        for _ in range(4):
            response = httpx.post(
                f"{srv.base}/predict?max_objects=2",
                content=PNG,
                headers={"content-type": "image/png"},
                timeout=30,
            )
            assert response.status_code == 200
        # Any worker answers the scrape with the sum over both.
        metrics = httpx.get(f"{srv.base}/metrics").text
        assert 'seqops_requests_total{endpoint="predict",reason="ok"} 4.0' in metrics
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0, srv.output()
    finally:
        srv.stop()
