"""A hostile and careless client against the real server process: the bad-input corpus,
clients that leave, stalled uploads, silent sockets (issue 12)."""

from __future__ import annotations

import json
import re
import signal
import socket
import time

import httpx
import pytest
from bad_inputs import corpus
from serve_fixtures import Server, make_png, serve_model

pytestmark = pytest.mark.e2e

PNG = make_png(96, 64)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(
        serve_model(),
        tmp_path_factory.mktemp("reliability") / "server.log",
        "--max-objects-limit", "100000", "--body-timeout", "1", "--keep-alive", "1",
        "--max-queue", "2", "--max-active", "2",  # 4 places: the queue's and the loop's
    ) as srv:  # fmt: skip
        yield srv


def _metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.base}/metrics", timeout=5).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_every_bad_input_gets_a_4xx_naming_it_or_a_correct_200(server):
    failures = []
    with httpx.Client(base_url=server.base, timeout=30) as client:
        for name, method, path, kwargs, want in corpus(PNG):
            response = client.request(method, path, **kwargs)
            status = response.status_code
            ok = (400 <= status < 500) if want == "4xx" else status == want
            if status >= 400:
                body = response.json()  # every error is JSON
                message = json.dumps(body.get("detail", body.get("error")))
                ok = ok and message not in ("null", '""') and " object at 0x" not in message
            elif path == "/predict" and ok:
                ok = response.json()["count"] >= 0
            if not ok:
                failures.append(f"{name}: {status} {response.text[:200]}")
    assert not failures, "\n".join(failures)
    assert 'reason="error"' not in httpx.get(f"{server.base}/metrics").text  # no 5xx counted


@pytest.mark.parametrize("path", ["/predict", "/v2/models/seqops/infer"])
def test_a_client_that_leaves_stops_its_loop(server, path):
    if path == "/predict":
        kwargs = {"content": PNG, "headers": {"content-type": "image/png"},
                  "params": {"max_objects": 100000}}  # fmt: skip
    else:
        image = {"name": "image", "datatype": "BYTES", "shape": [1],
                 "data": [__import__("base64").b64encode(PNG).decode()]}  # fmt: skip
        kwargs = {"json": {"inputs": [image], "parameters": {"max_objects": 100000}}}
    with pytest.raises(httpx.ReadTimeout):  # gives up after 0.5 s of a 100000-object loop
        httpx.post(f"{server.base}{path}", timeout=0.5, **kwargs)
    time.sleep(0.5)  # the server notices between steps
    steps = _metric(server, "seqops_step_seconds_count")
    time.sleep(0.5)
    assert _metric(server, "seqops_step_seconds_count") == steps, "still stepping for nobody"
    assert _metric(server, "seqops_inflight_requests") == 0


def _send_partial_upload(server: Server, path: str = "/predict") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            "Content-Length: 1000000\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + PNG[:100])  # ... and then nothing more
    return sock


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def test_a_stalled_upload_gets_408_and_frees_its_place(server):
    started = time.monotonic()
    sock = _send_partial_upload(server)
    answer = _read_response(sock, timeout=5)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"not received within 1 s" in answer
    assert time.monotonic() - started < 3
    assert _metric(server, "seqops_queue_depth") == 0


def test_headers_that_trickle_in_get_408_and_the_connection_closed(server):
    """A slowloris: a request line, then a header byte now and then, never the blank line."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    started = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    sock.settimeout(0.3)
    answer = b""
    for _ in range(20):  # a byte every 0.3 s keeps the idle timer (1 s) from firing
        try:
            sock.sendall(b"X")
            answer += sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # the server closed the connection
            break
        if answer:
            break
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"].startswith("request headers")
    assert time.monotonic() - started < 3  # --body-timeout 1


def test_a_full_queue_refuses_before_reading_the_body(server):
    stalled = [_send_partial_upload(server) for _ in range(4)]  # all 4 places held
    try:
        time.sleep(0.2)
        started = time.monotonic()
        response = httpx.post(f"{server.base}/predict", content=PNG,
                              headers={"content-type": "image/png"}, timeout=5)  # fmt: skip
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        assert time.monotonic() - started < 0.5
    finally:
        for sock in stalled:
            sock.close()


def test_a_silent_connection_is_closed_after_the_keep_alive_timeout(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    started = time.monotonic()
    assert _read_response(sock, timeout=5) == b""  # closed by the server, nothing sent
    assert 0.8 < time.monotonic() - started < 3
    sock.close()


@pytest.mark.slow  # its own server, stopped by the test
def test_shutdown_answers_503_with_the_points_found_before_its_time_runs_out(tmp_path):
    """A request admitted before SIGTERM whose body came late (its deadline counts from the
    body) outlives the graceful timeout: 2 s before the end it is answered 503 with its
    points so far, not cut off with a bare 500."""
    srv = Server(serve_model(), tmp_path / "server.log", "--graceful-timeout", "6",
                 "--max-deadline", "4", "--deadline", "4", "--body-timeout", "5",
                 "--max-objects-limit", "100000")  # fmt: skip
    try:
        srv.wait_ready()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        head = (f"POST /predict?max_objects=100000 HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: image/png\r\nContent-Length: {len(PNG)}\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + PNG[:100])  # admitted; the body is still coming
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        sock.sendall(PNG[100:])  # its loop starts now, with 4 s to go: past the cut at 4 s
        started = time.monotonic()
        answer = _read_response(sock, timeout=10)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert "shutting down" in body["detail"] and body["partial"]["count"] > 0
        assert len(body["partial"]["points"]) == body["partial"]["count"]
        assert time.monotonic() - started < 4
        assert srv.proc.wait(timeout=10) == 0, srv.output()
    finally:
        srv.stop()
