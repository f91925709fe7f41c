"""The server's limits answer in the API's JSON, naming the limit: the connection cap
(uvicorn's own 503 is plain text) and a multipart form that holds more, or other, files
than the one image (Starlette says "Too many files") (issue 12)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from serve_fixtures import Server, make_png, serve_model

pytestmark = pytest.mark.e2e

PNG = make_png(96, 64)
MAX_CONNECTIONS = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(
        serve_model(),
        tmp_path_factory.mktemp("limits") / "server.log",
        "--max-connections", str(MAX_CONNECTIONS), "--body-timeout", "5", "--max-objects", "3",
    ) as srv:  # fmt: skip
        yield srv


def _hold_connections(server: Server, count: int) -> list[socket.socket]:
    """``count`` connections busy with an upload that has not finished (each holds its
    place until closed)."""
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: %d\r\n\r\n" % len(PNG))  # fmt: skip
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(head + PNG[:100])
        held.append(sock)
    time.sleep(0.1)  # the server has taken them all
    return held


def _predict(server: Server) -> httpx.Response:
    return httpx.post(f"{server.base}/predict", content=PNG,
                      headers={"content-type": "image/png"}, timeout=10)  # fmt: skip


def test_past_the_connection_limit_the_503_is_json_naming_it(server):
    held = _hold_connections(server, MAX_CONNECTIONS)
    try:
        started = time.monotonic()
        refused = _predict(server)
        assert time.monotonic() - started < 1
        kserve = httpx.get(f"{server.base}/v2/models/seqops", timeout=5)
    finally:
        for sock in held:
            sock.close()
    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    assert refused.json() == {
        "detail": f"too many connections: the server holds at most {MAX_CONNECTIONS} "
        "(--max-connections); retry later"
    }
    assert kserve.status_code == 503 and "--max-connections" in kserve.json()["error"]


def test_the_last_connection_under_the_limit_is_served(server):
    """``--max-connections 3`` serves 3 (uvicorn's own count, the asking one included,
    would refuse the third)."""
    time.sleep(0.2)  # the previous test's sockets are closed: their places are free
    held = _hold_connections(server, MAX_CONNECTIONS - 1)
    try:
        response = _predict(server)
    finally:
        for sock in held:
            sock.close()
    assert response.status_code == 200, response.text
    assert response.json()["count"] == 3


def test_a_burst_past_the_limit_serves_the_first_connections_and_refuses_the_rest(server):
    """Twice the limit of connections open at once, then each sends a request: N are
    served (their uploads held open), the other N get the 503 at once.
    uvicorn's own count refused all of them (every one saw 2N connections open)."""
    time.sleep(0.2)  # the previous tests' sockets are closed: their places are free
    address = ("127.0.0.1", server.port)
    socks = [socket.create_connection(address) for _ in range(2 * MAX_CONNECTIONS)]
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: %d\r\n\r\n" % len(PNG))  # fmt: skip
    try:
        time.sleep(0.1)  # every connection is open before any request
        for sock in socks:
            sock.sendall(head + PNG[:100])
        answers = []
        for sock in socks:
            sock.settimeout(1.0)
            try:
                answers.append(sock.recv(4096))
            except TimeoutError:
                answers.append(b"")  # served: its upload is still open, no answer yet
    finally:
        for sock in socks:
            sock.close()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert len(refused) == MAX_CONNECTIONS, answers
    assert answers.count(b"") == MAX_CONNECTIONS  # served: still uploading, no answer


def _post_form(server: Server, files: list, path: str = "/predict") -> httpx.Response:
    return httpx.post(f"{server.base}{path}", files=files, data={"max_objects": "2"}, timeout=10)


def _image(name: str = "file") -> tuple:
    return (name, ("a.png", PNG, "image/png"))


def test_a_form_with_one_image_in_file_is_counted(server):
    response = _post_form(server, [_image()])
    assert response.status_code == 200 and response.json()["count"] == 2


@pytest.mark.parametrize("path", ["/predict", "/next"])
def test_two_images_in_a_form_get_422_naming_the_field_and_the_count(server, path):
    response = _post_form(server, [_image(), _image()], path)
    assert response.status_code == 422, response.text
    assert response.json() == {"detail": "file: one image per request, got 2 file parts"}


def test_a_form_with_many_files_gets_422_naming_the_limit(server):
    response = _post_form(server, [_image() for _ in range(6)])
    assert response.status_code == 422, response.text
    assert response.json() == {"detail": "file: one image per request, got more than 4 file parts"}


def test_an_image_under_another_name_gets_422_naming_the_accepted_fields(server):
    response = _post_form(server, [_image("image")])
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("file: the image goes in a part named 'file'"), detail
    assert "'image'" in detail
    for field in ("max_objects", "done_threshold", "exemplars", "deadline_s"):
        assert field in detail


def test_a_second_upload_under_another_name_is_named(server):
    response = _post_form(server, [_image(), _image("picture")])
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("picture: a second file upload"), detail
    option_as_file = _post_form(server, [_image(), ("max_objects", ("x", b"3", "text/plain"))])
    assert option_as_file.status_code == 422
    assert json.loads(option_as_file.text) == {
        "detail": "max_objects: expected a form field, got a file upload"
    }


def test_a_form_with_too_many_fields_or_no_boundary_is_named(server):
    fields = {f"field{i}": "1" for i in range(17)}
    crowded = httpx.post(f"{server.base}/predict", files=[_image()], data=fields, timeout=10)
    assert crowded.status_code == 422, crowded.text
    assert crowded.json() == {"detail": "form: at most 16 option fields, got more"}
    unbounded = httpx.post(f"{server.base}/predict", content=b"--x\r\n",
                           headers={"content-type": "multipart/form-data"}, timeout=10)  # fmt: skip
    assert unbounded.status_code == 400, unbounded.text
    assert unbounded.json()["detail"].startswith("body: not a valid multipart form")
