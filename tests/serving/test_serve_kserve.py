"""KServe v2 / Open Inference Protocol in-process: metadata, JSON and binary tensors (built
with ``tritonclient``'s own request encoder), errors as ``{"error": ...}``, and a model
trained with exemplars."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from serve_fixtures import (
    DONE_AT_ONCE_THRESHOLD,
    MODEL_VERSION,
    PNG,
    PNG_HEADERS,
    expected,
    make_client,
    make_png,
    png_pixels,
    serve_model,
)
from tritonclient.http import InferenceServerClient, InferInput

from seqops.imaging import load_image_reduced
from seqops.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor.load(serve_model(), device="cpu", threads=1)


@pytest.fixture
def client(predictor):
    with make_client(predictor) as c:
        yield c


# --- KServe v2 -------------------------------------------------------------------------------


def test_kserve_metadata_health_and_readiness(client):
    assert client.get("/v2").json()["name"] == "seqops"
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2/models/seqops").json()
    assert meta["versions"] == [MODEL_VERSION]
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    assert [o["name"] for o in meta["outputs"]] == ["count", "points", "count_confidence"]
    assert client.get(f"/v2/models/seqops/versions/{MODEL_VERSION}").status_code == 200
    assert client.get("/v2/models/seqops/ready").status_code == 200
    missing = client.get("/v2/models/other")
    assert missing.status_code == 404 and "serves 'seqops'" in missing.json()["error"]
    assert client.get("/v2/models/seqops/versions/9/ready").status_code == 404
    assert client.get("/v2/nothing").json() == {"error": "Not Found"}


def _uint8_request(pixels, **extra):
    tensor = {"name": "image", "datatype": "UINT8", "shape": list(pixels.shape)}
    return {"inputs": [{**tensor, "data": pixels.ravel().tolist()}], **extra}


def test_kserve_infer_json_tensors(client):
    plain = client.post("/predict?max_objects=3", content=PNG, headers=PNG_HEADERS).json()
    request = _uint8_request(png_pixels(PNG), id="req-7", parameters={"max_objects": 3})
    body = client.post("/v2/models/seqops/infer", json=request).json()
    assert body["id"] == "req-7" and body["model_version"] == MODEL_VERSION
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["count"] == {"name": "count", "datatype": "INT32", "shape": [1], "data": [3]}
    assert outputs["count_confidence"]["data"] == [plain["count_confidence"]] == [0.0]
    assert outputs["points"]["shape"] == [3, 2] and outputs["points"]["datatype"] == "FP32"
    assert np.allclose(np.reshape(outputs["points"]["data"], (3, 2)), plain["points"], atol=0.02)
    # An encoded image as BYTES (base64 in JSON), none found: points [0, 2].
    b64 = base64.b64encode(PNG).decode()
    request = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
        "parameters": {"done_threshold": DONE_AT_ONCE_THRESHOLD},
        "outputs": [{"name": "points"}],
    }
    body = client.post("/v2/models/seqops/infer", json=request).json()
    assert body["outputs"] == [{"name": "points", "datatype": "FP32", "shape": [0, 2], "data": []}]
    assert "id" not in body


@pytest.mark.parametrize("as_bytes", [False, True])
def test_kserve_infer_binary_tensors_as_tritonclient_sends_them(client, as_bytes):
    pixels = png_pixels(PNG)
    if as_bytes:
        tensor = InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([PNG], dtype=object))
    else:
        tensor = InferInput("image", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
    body, json_size = InferenceServerClient.generate_request_body(
        [tensor], request_id="bin", parameters={"max_objects": 2}
    )
    response = client.post(
        "/v2/models/seqops/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(json_size)},
    )
    assert response.status_code == 200, response.text
    # No outputs named: tritonclient asks for all of them as binary data, and gets them so.
    header_length = int(response.headers["Inference-Header-Content-Length"])
    assert "data" not in json.loads(response.content[:header_length])["outputs"][0]
    result = InferenceServerClient.parse_response_body(
        response.content, header_length=header_length
    )
    assert result.as_numpy("count").tolist() == [2]
    assert result.as_numpy("points").shape == (2, 2)
    assert result.as_numpy("count_confidence").tolist() == [0.0]  # stopped by max_objects
    assert result.get_response()["id"] == "bin"


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1]}]}, 400,
         "UINT8"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2, 3], "data": [1]}]},
         400, "do not fit"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 3],
                      "data": [1, 2, 300]}]}, 400, "0..255"),
        ({"inputs": [{"name": "img", "datatype": "UINT8", "shape": [1], "data": [1]}]}, 400,
         "unknown"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]},
         400, "base64"),
        ({"parameters": {"max_objects": 0}}, 400, "max_objects"),
        ({"parameters": {"max_objectz": 1}}, 400, "max_objectz"),
        ({"outputs": [{"name": "heat"}]}, 400, "heat"),
        ({"inputs": "nope"}, 400, "inputs"),
    ],
)  # fmt: skip
def test_kserve_infer_errors(client, change, status, needle):
    request = _uint8_request(png_pixels(make_png(8, 8))) | change
    response = client.post("/v2/models/seqops/infer", json=request)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]


# --- a model trained with exemplars ------------------------------------------------------------


@pytest.mark.slow  # exports a second model (~6 s of CPU)
def test_exemplar_model_requires_and_uses_boxes(tmp_path_factory):
    ex_predictor = Predictor.load(serve_model(exemplars=True), threads=1)
    boxes = [[10, 10, 30, 30], [40, 20, 60, 50]]
    with make_client(ex_predictor) as c:
        missing = c.post("/predict", content=PNG, headers=PNG_HEADERS)
        assert missing.status_code == 422 and "none were given" in missing.json()["detail"]
        given = c.post(f"/predict?exemplars={json.dumps(boxes)}", content=PNG, headers=PNG_HEADERS)
        want = expected(ex_predictor, exemplars=[boxes])
        assert given.status_code == 200
        assert np.allclose(given.json()["points"], want.points, atol=0.02)
        outside = c.post("/predict?exemplars=[[0,0,500,10]]", content=PNG, headers=PNG_HEADERS)
        assert outside.status_code == 422 and "outside" in outside.json()["detail"]
        meta = c.get("/v2/models/seqops").json()
        assert meta["inputs"][1] == {"name": "exemplars", "datatype": "FP32", "shape": [-1, 4]}
        request = _uint8_request(png_pixels(PNG), parameters={"max_objects": 5})
        request["inputs"].append(
            {
                "name": "exemplars",
                "datatype": "FP32",
                "shape": [2, 4],
                "data": np.ravel(boxes).tolist(),
            }
        )
        body = c.post("/v2/models/seqops/infer", json=request).json()
        points = np.reshape(body["outputs"][1]["data"], (-1, 2))
        assert np.allclose(points, want.points, atol=0.02)
        # A large JPEG is decoded reduced: boxes and points stay in the pixels sent.
        big = _large_jpeg()
        reduced, _ = load_image_reduced(big, ex_predictor.info.image_size)
        want = ex_predictor.predict([reduced], max_objects=5, exemplars=[[[5, 5, 30, 30]]])[0]
        given = c.post("/predict?max_objects=5&exemplars=[[40,40,240,240]]", content=big,
                       headers={"content-type": "image/jpeg"})  # fmt: skip
        assert given.status_code == 200, given.text
        assert np.allclose(given.json()["points"], np.asarray(want.points) * 8, atol=0.2)
        outside = c.post("/predict?exemplars=[[0,0,1300,10]]", content=big,
                         headers={"content-type": "image/jpeg"})  # fmt: skip
        assert outside.status_code == 422 and "1280x960" in outside.json()["detail"]


def _large_jpeg() -> bytes:
    """1280x960: 8x the test model's 64 px, so it decodes at 1/8."""
    pixels = np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.repeat(16, 0).repeat(16, 1)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_kserve_bytes_element_is_the_file_or_its_base64_in_json_and_binary(client):
    def infer_binary(element: bytes):
        tensor = InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([element], dtype=object))
        body, json_size = InferenceServerClient.generate_request_body(
            [tensor], parameters={"max_objects": 2}, outputs=[]
        )
        return client.post(
            "/v2/models/seqops/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(json_size)},
        )

    as_file = infer_binary(PNG)
    as_base64 = infer_binary(base64.b64encode(PNG))
    as_json = client.post(
        "/v2/models/seqops/infer",
        json={
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(PNG).decode()]}],
            "parameters": {"max_objects": 2},
        },
    )  # fmt: skip
    points = [
        InferenceServerClient.parse_response_body(
            r.content,
            header_length=int(r.headers.get("Inference-Header-Content-Length", 0)) or None,
        ).as_numpy("points")
        for r in (as_file, as_base64, as_json)
    ]
    assert all(r.status_code == 200 for r in (as_file, as_base64, as_json))
    assert np.allclose(points[0], points[1]) and np.allclose(points[0], points[2])


def test_kserve_binary_output_only_when_asked(client):
    request = _uint8_request(png_pixels(PNG), parameters={"max_objects": 2})
    request["outputs"] = [
        {"name": "count", "parameters": {"binary_data": True}},
        {"name": "points"},
    ]
    response = client.post("/v2/models/seqops/infer", json=request)
    length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.content[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 4}
    assert np.frombuffer(response.content[length:], "<i4").tolist() == [2]
    assert len(header["outputs"][1]["data"]) == 4  # points stay JSON


def test_kserve_openapi_and_head(client):
    spec = client.get("/openapi.json").json()
    refs = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(spec)))
    defined = {f"#/components/schemas/{name}" for name in spec["components"]["schemas"]}
    assert refs and refs <= defined  # no reference to a schema that is not there
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/predict"]["post"]["security"] == [{"HTTPBearer": []}]
    unversioned = spec["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert [p["name"] for p in unversioned["parameters"]] == ["model_name"]
    assert "application/json" in unversioned["requestBody"]["content"]
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready",
                 "/v2/models/seqops/ready"):  # fmt: skip
        assert client.head(path).status_code == 200, path
