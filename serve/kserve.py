"""KServe v2 / Open Inference Protocol routes, so standard clients (``tritonclient.http``)
work unchanged.

Inputs: ``image`` as ``UINT8 [H, W, 3]`` (``[1, H, W, 3]`` also taken) or an encoded image
as ``BYTES [1]`` (the element is the file or its base64 text, read alike in JSON and in
binary form), optionally ``exemplars`` ``[K, 4]`` boxes. Tensor data comes as JSON or, as
``tritonclient`` sends it by default, as binary after the JSON header (Triton's binary
tensor extension, ``Inference-Header-Content-Length``); a gzip or deflate body is taken
(``Content-Encoding``). Outputs ``count`` ``INT32 [1]``, ``points`` ``FP32 [N, 2]`` and
``count_confidence`` ``FP32 [1]`` (how likely the count is exact), as JSON or, when asked
(``binary_data_output``, an output's ``binary_data``), as binary. Loop settings go in the
request ``parameters``; errors are ``{"error": "..."}``."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError

from seqops import __version__
from seqops.predictor import Prediction
from serve.batcher import Job
from serve.http_io import API_KEY, ServiceDep, answer_head, inline_schema, read_body
from serve.schemas import (
    InferRequest,
    InferResponse,
    KServeError,
    ModelMetadata,
    ModelReady,
    PredictOptions,
    ServerLive,
    ServerMetadata,
    ServerReady,
)
from serve.service import ServeError, Service

# count_confidence last: clients that read the outputs by position still find count, points.
OUTPUTS = {
    "count": ("INT32", [1]),
    "points": ("FP32", [-1, 2]),
    "count_confidence": ("FP32", [1]),
}
# Request parameters tritonclient may send that do not concern this model.
_TRITON_PARAMETERS = {"binary_data_output", "priority", "sequence_id", "sequence_start",
                      "sequence_end"}  # fmt: skip
_NUMERIC = {
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "INT8": np.int8,
    "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
    "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
# Elements one input may declare: a 40 MP RGB image with room to spare.
_MAX_ELEMENTS = 1 << 28
# Leading bytes of the image files a BYTES element may hold as is (WebP: RIFF....WEBP).
_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"II*\x00", b"MM\x00*", b"BM")
_DIGITS = re.compile(r"[0-9]{1,15}")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": KServeError} for code in (400, 401, 404, 413, 422, 429, 503, 504)
}

# Open: probes and metadata that orchestrators and clients ask before they hold a key.
health_router = APIRouter(prefix="/v2", tags=["kserve v2"])
# The model's metadata and inference: the API key when one is set.
router = APIRouter(prefix="/v2", tags=["kserve v2"], dependencies=[API_KEY], responses=_ERRORS)


def served_model(service: ServiceDep, model_name: str) -> Service:
    """The service, once ``model_name`` is the served model: 404 otherwise, 503 before the
    model is loaded."""
    if service.predictor is None:
        raise ServeError(503, "not ready: the model is still loading", {"Retry-After": "1"})
    served = service.predictor.info.name
    if model_name != served:
        raise ServeError(404, f"model {model_name!r} not found; this server serves {served!r}")
    return service


ServedModel = Annotated[Service, Depends(served_model)]


def served_version(service: ServedModel, model_name: str, version: str) -> None:
    """404 unless ``version`` (a path segment of the versioned routes) is the served one."""
    if version != service.version:
        raise ServeError(
            404,
            f"model {model_name!r} version {version!r} not found; serving {service.version!r}",
        )


def _model_route(on: APIRouter, suffix: str, method: str | list[str], **options: Any):
    """Register the decorated endpoint for the model and for one version of it:
    ``/models/{model_name}<suffix>`` and ``/models/{model_name}/versions/{version}<suffix>``
    (only the latter takes, and checks, a version)."""

    def register(endpoint):
        on.add_api_route(
            f"/models/{{model_name}}{suffix}",
            endpoint,
            methods=[method] if isinstance(method, str) else method,
            **options,
        )
        on.add_api_route(
            f"/models/{{model_name}}/versions/{{version}}{suffix}",
            endpoint,
            methods=[method] if isinstance(method, str) else method,
            dependencies=[Depends(served_version)],
            **options,
        )
        return endpoint

    return register


# --- health and metadata ------------------------------------------------------------------


@health_router.get("", summary="Server metadata", response_model=ServerMetadata)
async def server_metadata() -> dict:
    """Server name, version and protocol extensions."""
    return {"name": "seqops", "version": __version__, "extensions": ["binary_tensor_data"]}


@health_router.get(
    "/health/live",
    summary="Liveness",
    response_model=ServerLive,
    responses={503: _ERRORS[503]},
)
async def server_live(service: ServiceDep) -> dict:
    """Liveness: 503 only when the model failed to load."""
    if service.load_error:
        raise ServeError(503, service.load_error)
    return {"live": True}


@health_router.get(
    "/health/ready",
    summary="Readiness",
    response_model=ServerReady,
    response_model_exclude_unset=True,
    responses={503: {"model": ServerReady}},
)
async def server_ready(service: ServiceDep, response: Response) -> dict:
    """Readiness: the model is loaded and warmed up, and the server is not stopping."""
    if not service.ready:
        response.status_code = 503
        return {"error": "not ready", "ready": False}
    return {"ready": True}


@_model_route(
    health_router,
    "/ready",
    "GET",
    summary="Model readiness",
    response_model=ModelReady,
    responses={code: _ERRORS[code] for code in (404, 503)},
)
async def model_ready(service: ServedModel, model_name: str) -> dict:
    """Whether the named model (and version) is ready for inference."""
    if not service.ready:
        raise ServeError(503, f"model {model_name!r} is not ready")
    return {"name": model_name, "ready": True}


@_model_route(
    router, "", "GET", summary="Model metadata: inputs and outputs", response_model=ModelMetadata
)
async def model_metadata(service: ServedModel) -> dict:
    """The model's name, versions, inputs and outputs."""
    info = service.predictor.info
    inputs = [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    if info.exemplars:
        inputs.append({"name": "exemplars", "datatype": "FP32", "shape": [-1, 4]})
    return {
        "name": info.name,
        "versions": [service.version],
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in OUTPUTS.items()],
    }


# --- inference ------------------------------------------------------------------------------

# The body is read as bytes (JSON, or JSON then binary tensors), so FastAPI documents none.
_INFER_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(InferRequest)},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "the JSON request, then the binary tensors it announces"
                    " (its length in the Inference-Header-Content-Length header)",
                }
            },
        },
    }
}


@_model_route(
    router,
    "/infer",
    "POST",
    summary="Inference (Open Inference Protocol, JSON tensors)",
    response_model=InferResponse,
    response_model_exclude_unset=True,  # no "id" unless the request had one
    openapi_extra=_INFER_BODY_DOC,
)
async def infer(request: Request, service: ServedModel) -> dict:
    """Count the objects of one image; the request ``id`` is echoed."""
    t0 = time.perf_counter()
    header_length = request.headers.get("inference-header-content-length")
    async with service.slot() as slot:  # admission before the body is read
        body = await read_body(request)
        req, options, image = await service.in_pool(
            _parse_and_prepare, service, body, header_length
        )
        threshold, max_objects, deadline = service.loop_settings(options, options.max_objects)
        prepare_ms = 1e3 * (time.perf_counter() - t0)
        job = Job(image, threshold, max_objects, deadline, prepare_ms=prepare_ms)
        slot.submit(job)
    prediction = await service.wait(job, request.receive)
    response = _infer_response(service, req, prediction, t0)
    binary = _binary_outputs(req)
    return _binary_response(response, binary) if binary else response


def _binary_outputs(req: InferRequest) -> set[str]:
    """The outputs the client asked for as binary data (Triton's binary tensor extension):
    all of them with the request parameter ``binary_data_output`` (what ``tritonclient``
    sends when it names no outputs), or those whose ``parameters.binary_data`` is true."""
    names = [o.name for o in req.outputs] if req.outputs else list(OUTPUTS)
    if (req.parameters or {}).get("binary_data_output") is True:
        return set(names)
    return {o.name for o in req.outputs or [] if (o.parameters or {}).get("binary_data") is True}


def _binary_response(response: dict, binary: set[str]) -> Response:
    """The JSON header with the ``binary`` outputs' data moved after it, little-endian, each
    announced by ``binary_data_size`` and the header's length in
    ``Inference-Header-Content-Length``."""
    chunks = []
    for tensor in response["outputs"]:
        if tensor["name"] in binary:
            dtype = _NUMERIC[tensor["datatype"]]
            data = np.asarray(tensor.pop("data"), dtype).astype(np.dtype(dtype).newbyteorder("<"))
            chunks.append(data.tobytes())
            tensor["parameters"] = {"binary_data_size": len(chunks[-1])}
    header = json.dumps(response).encode()
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def _infer_response(service: Service, req: InferRequest, prediction: Prediction, t0: float) -> dict:
    """The response body: the wanted output tensors, the loop's outcome as parameters."""
    wanted = [o.name for o in req.outputs] if req.outputs else list(OUTPUTS)
    points = np.asarray(prediction.points, np.float32).reshape(-1, 2)
    tensors = {
        "count": {"name": "count", "datatype": "INT32", "shape": [1], "data": [prediction.count]},
        "count_confidence": {
            "name": "count_confidence",
            "datatype": "FP32",
            "shape": [1],
            "data": [prediction.count_confidence],
        },
        "points": {
            "name": "points",
            "datatype": "FP32",
            "shape": [len(points), 2],
            "data": [round(float(v), 2) for v in points.ravel()],
        },
    }
    response = {
        "model_name": service.predictor.info.name,
        "model_version": service.version,
        "parameters": {
            "stopped_by": prediction.stopped_by,
            "done_prob": prediction.done_probs[-1] if prediction.done_probs else None,
            "provider": service.predictor.provider,
            "confidence_calibrated": service.predictor.info.confidence_calibrated,
            "total_ms": round(1e3 * (time.perf_counter() - t0), 3),
        },
        "outputs": [tensors[name] for name in wanted],
    }
    if req.id is not None:
        response["id"] = req.id
    return response


def _loop_options(parameters: dict[str, Any]) -> PredictOptions:
    """``max_objects``, ``done_threshold``, ``deadline_s`` (or Triton's ``timeout`` in µs)."""
    given = {k: v for k, v in parameters.items() if k not in _TRITON_PARAMETERS}
    timeout_us = given.pop("timeout", None)
    if timeout_us is not None and "deadline_s" not in given:
        is_number = isinstance(timeout_us, int | float) and not isinstance(timeout_us, bool)
        if not is_number or timeout_us <= 0:
            raise ServeError(400, f"parameters.timeout: microseconds > 0, got {timeout_us!r}")
        given["deadline_s"] = timeout_us / 1e6
    try:
        return PredictOptions.model_validate(given, strict=True)
    except ValidationError as exc:
        raise ServeError(400, _describe(exc, "parameters.")) from None


def _describe(exc: ValidationError, prefix: str = "") -> str:
    """A validation error as one line: ``<prefix><loc>: <msg>; ...``."""
    return "; ".join(f"{prefix}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def _parse_and_prepare(service: Service, body: bytes, header_length: str | None):
    """Pool thread: parse the request (JSON + binary tensors) and prepare the image."""
    req, raw = parse_infer_request(body, header_length)
    tensors = {t.name: t for t in req.inputs}
    unknown = sorted(set(tensors) - {"image", "exemplars"})
    if unknown:
        raise ServeError(400, f"inputs: unknown {unknown}; this model takes 'image', 'exemplars'")
    if "image" not in tensors:
        raise ServeError(400, "inputs: 'image' is required (UINT8 [H, W, 3] or BYTES [1])")
    for out in req.outputs or []:
        if out.name not in OUTPUTS:
            raise ServeError(400, f"outputs: unknown {out.name!r}; known: {list(OUTPUTS)}")
    options = _loop_options(req.parameters or {})  # before the costly decoding
    image = _image_input(tensors["image"], raw.get("image"))
    exemplars = None
    if "exemplars" in tensors:
        tensor = tensors["exemplars"]
        if len(tensor.shape) != 2 or tensor.shape[1] != 4 or not 0 <= tensor.shape[0] <= 3:
            raise ServeError(400, f"exemplars: shape must be [K <= 3, 4], got {tensor.shape}")
        array = _tensor_array(tensor, raw.get("exemplars"))
        exemplars = array.reshape(tensor.shape).astype(np.float64).tolist()
    return req, options, service.prepare_image(image, exemplars)


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[InferRequest, dict]:
    """The JSON header as :class:`InferRequest`, and each binary input's bytes by name."""
    if header_length is not None:
        # ASCII digits only: str.isdigit() accepts "²", which int() then refuses.
        if not _DIGITS.fullmatch(header_length) or int(header_length) > len(body):
            raise ServeError(
                400,
                f"Inference-Header-Content-Length: {header_length!r} is not a length within"
                f" the {len(body)}-byte body",
            )
        split = int(header_length)
        header, binary = body[:split], body[split:]
    else:
        header, binary = body, b""
    try:  # strict: a shape of [true] or a name of 3 is a client's mistake, not a coercion
        req = InferRequest.model_validate_json(header, strict=True)
    except ValidationError as exc:
        raise ServeError(400, f"request: {_describe(exc)}") from None
    raw, offset = {}, 0
    for tensor in req.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ServeError(400, f"inputs.{tensor.name}: binary_data_size {size!r} out of range")
        raw[tensor.name] = binary[offset : offset + size]
        offset += size
    if offset != len(binary):
        raise ServeError(400, f"body: {len(binary) - offset} binary bytes belong to no input")
    return req, raw


def _image_input(tensor, raw: bytes | None) -> bytes | np.ndarray:
    """The ``image`` input: encoded bytes (BYTES) or a uint8 ``[H, W, 3]`` array (UINT8)."""
    if tensor.datatype == "BYTES":
        if _element_count(tensor) != 1:
            raise ServeError(400, f"image: BYTES shape must hold one image, got {tensor.shape}")
        if raw is not None:  # 4-byte little-endian length, then the bytes
            if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != len(raw) - 4:
                raise ServeError(400, "image: malformed binary BYTES element")
            return _encoded_image(raw[4:])
        data = tensor.data
        while isinstance(data, list) and len(data) == 1:
            data = data[0]
        if not isinstance(data, str):
            raise ServeError(400, "image: BYTES data in JSON must be one string")
        return _encoded_image(data.encode("utf-8", "surrogateescape"))
    if tensor.datatype != "UINT8":
        raise ServeError(
            400, f"image: datatype UINT8 [H, W, 3] or BYTES [1] expected, got {tensor.datatype}"
        )
    shape = list(tensor.shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or shape[2] != 3:
        raise ServeError(400, f"image: UINT8 shape must be [H, W, 3], got {tensor.shape}")
    return _tensor_array(tensor, raw).reshape(shape)


def _encoded_image(element: bytes) -> bytes:
    """A BYTES element -> the encoded image, read the same way whether the element came in
    JSON or binary: the file itself, or its base64 text. JSON strings cannot carry a PNG's
    raw bytes (not UTF-8), so JSON clients send base64; binary clients usually send the
    file, but base64 there is taken too. A file is recognised by its signature."""
    if element.startswith(_IMAGE_SIGNATURES) or (element[:4], element[8:12]) == (b"RIFF", b"WEBP"):
        return element
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(
            400, "image: the BYTES element is neither an image file nor base64 text of one"
        ) from None


def _tensor_array(tensor, raw: bytes | None) -> np.ndarray:
    """A numeric tensor's data (JSON, flat or nested, or binary) checked against its shape."""
    dtype = _NUMERIC.get(tensor.datatype)
    if dtype is None:
        raise ServeError(400, f"{tensor.name}: unsupported datatype {tensor.datatype}")
    expected = _element_count(tensor)
    if raw is not None:
        if len(raw) != expected * np.dtype(dtype).itemsize:
            raise ServeError(400, f"{tensor.name}: {len(raw)} bytes do not fit {tensor.shape}")
        values = np.frombuffer(raw, dtype)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ServeError(400, f"{tensor.name}: NaN or infinite values")
        return values
    values = _json_numbers(tensor)
    if values.size != expected:
        raise ServeError(400, f"{tensor.name}: {values.size} values do not fit {tensor.shape}")
    if not np.isfinite(values).all():
        raise ServeError(400, f"{tensor.name}: NaN or infinite values")
    if np.dtype(dtype).kind in "iu":
        if (values != np.round(values)).any():
            raise ServeError(400, f"{tensor.name}: {tensor.datatype} data must be integers")
        info = np.iinfo(dtype)
        if values.min(initial=0) < info.min or values.max(initial=0) > info.max:
            raise ServeError(
                400, f"{tensor.name}: {tensor.datatype} values must be in {info.min}..{info.max}"
            )
    return values.astype(dtype)


def _element_count(tensor) -> int:
    """The number of elements the tensor's shape declares: every dimension a size (no -1
    in a request), and a total small enough to mean something (a product that overflows
    int64 would otherwise wrap around in numpy)."""
    if any(d < 0 for d in tensor.shape):
        raise ServeError(400, f"{tensor.name}: shape {tensor.shape} has a negative dimension")
    count = math.prod(tensor.shape)  # Python ints: no overflow
    if count > _MAX_ELEMENTS:
        raise ServeError(413, f"{tensor.name}: shape {tensor.shape} holds too many elements")
    return count


def _json_numbers(tensor) -> np.ndarray:
    """JSON ``data`` (flat or nested like the shape) as float64; booleans and strings are
    refused rather than read as 1/0 or parsed."""
    data = tensor.data
    if not isinstance(data, list):
        raise ServeError(400, f"{tensor.name}: data must be a list of numbers")
    try:
        values = np.asarray(data, np.float64).ravel()
    except (TypeError, ValueError, RecursionError):
        raise ServeError(400, f"{tensor.name}: data must be a list of numbers") from None
    if _has_non_number(data):
        raise ServeError(400, f"{tensor.name}: data must be numbers, not booleans or strings")
    return values


def _has_non_number(data: list) -> bool:
    """Whether a (nested) list holds anything but ints and floats."""
    stack = [data]
    while stack:
        for item in stack.pop():
            if isinstance(item, list):
                stack.append(item)
            elif isinstance(item, bool) or not isinstance(item, int | float):
                return True
    return False


answer_head(health_router)  # after every health route above
