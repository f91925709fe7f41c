# ruff: noqa: E501  (a table of cases: one case a line reads better than wrapped ones)
"""A corpus of bad (and awkward but valid) requests, generated here: every one must get a 4xx
JSON answer that names what was wrong, or a 200; never a 5xx. The reliability tests send
them all to a real server process.

Each case: ``(name, method, path, httpx request keywords, expected)`` where expected is an
exact status, or ``"4xx"`` when any refusal is right.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import zlib

import numpy as np
from PIL import Image

Case = tuple[str, str, str, dict, int | str]
INFER = "/v2/models/seqops/infer"
DEEP = 5000  # thousands deep: past Python's recursion limit for the json module


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces ``width x height`` and holds a few compressed zeros."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 100000)  # zeros compress ~1000:1: a real bomb's whole trick
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _infer(inputs: list, **extra) -> dict:
    return {"json": {"inputs": inputs, **extra}}


def _uint8(shape: list, data: list) -> dict:
    return {"name": "image", "datatype": "UINT8", "shape": shape, "data": data}


def image_cases(png: bytes) -> list[Case]:
    """Images: formats, modes, sizes, broken files."""
    grey16 = Image.fromarray(np.full((32, 48), 30000, np.uint16))
    floats = Image.fromarray(np.full((32, 48), 0.5, np.float32))
    rgba = Image.new("RGBA", (48, 32), (10, 200, 30, 128))
    raw = {"content-type": "image/png"}
    return [
        ("16-bit grey png", "POST", "/predict", {"content": _encode(grey16, "PNG"), "headers": raw}, 200),
        ("float tiff", "POST", "/predict", {"content": _encode(floats, "TIFF"), "headers": raw}, 200),
        ("rgba png", "POST", "/predict", {"content": _encode(rgba, "PNG"), "headers": raw}, 200),
        ("cmyk jpeg", "POST", "/predict",
         {"content": _encode(Image.new("CMYK", (48, 32)), "JPEG"), "headers": raw}, 200),
        ("webp", "POST", "/predict",
         {"content": _encode(Image.new("RGB", (48, 32)), "WEBP"), "headers": raw}, 200),
        ("float tiff 1e6", "POST", "/predict",
         {"content": _encode(Image.fromarray(np.full((32, 48), 1e6, np.float32)), "TIFF"),
          "headers": raw}, 415),
        ("gif", "POST", "/predict",
         {"content": _encode(Image.new("RGB", (48, 32)), "GIF"), "headers": raw}, 415),
        ("ico", "POST", "/predict",
         {"content": _encode(Image.new("RGB", (32, 32)), "ICO"), "headers": raw}, 415),
        ("1x1 png", "POST", "/predict",
         {"content": _encode(Image.new("RGB", (1, 1)), "PNG"), "headers": raw}, 422),
        ("bomb header", "POST", "/predict", {"content": _png_header_only(60000, 60000),
                                             "headers": raw}, 413),
        ("truncated png", "POST", "/predict", {"content": png[: len(png) // 2], "headers": raw}, 400),
        ("empty body", "POST", "/predict", {"content": b"", "headers": raw}, 400),
        ("text body", "POST", "/predict", {"content": b"hi", "headers": {"content-type": "text/plain"}},
         415),
    ]  # fmt: skip


def json_cases(png: bytes) -> list[Case]:
    """JSON, query and form options: nesting, types, files where text belongs."""
    b64 = base64.b64encode(png).decode()
    deep = "[" * DEEP + "]" * DEEP
    ctype = {"content-type": "application/json"}
    raw = {"content-type": "image/png"}
    cases: list[Case] = [
        ("deep json body", "POST", "/predict", {"content": b"[" * 100000, "headers": ctype}, 400),
        ("max_objects true", "POST", "/predict", {"json": {"image": b64, "max_objects": True}}, 422),
        ("max_objects 1.5", "POST", "/predict", {"json": {"image": b64, "max_objects": 1.5}}, 422),
        ("max_objects '3'", "POST", "/predict", {"json": {"image": b64, "max_objects": "3"}}, 422),
        ("image not base64", "POST", "/predict", {"json": {"image": "***"}}, 400),
        ("form file as option", "POST", "/predict",
         {"files": {"file": ("a.png", png, "image/png"), "max_objects": ("x", b"3", "text/plain")}},
         "4xx"),
        ("brotli body", "POST", "/predict",
         {"content": png, "headers": {**raw, "content-encoding": "br"}}, 415),
    ]  # fmt: skip
    for path, field in (("/predict", "exemplars"), ("/predict/stream", "exemplars"),
                        ("/next", "points"), ("/next", "exemplars")):  # fmt: skip
        body = "{" + f'"image": "{b64}", "{field}": {deep}' + "}"
        cases += [
            (f"deep {field} json {path}", "POST", path, {"content": body, "headers": ctype}, "4xx"),
            (f"deep {field} query {path}", "POST", path,
             {"content": png, "headers": raw, "params": {field: deep}}, "4xx"),
            (f"deep {field} form {path}", "POST", path,
             {"files": {"file": ("a.png", png, "image/png")}, "data": {field: deep}}, "4xx"),
        ]  # fmt: skip
    return cases


def kserve_cases(png: bytes) -> list[Case]:
    """KServe v2 infer: shapes, types, binary framing, compression."""
    b64 = base64.b64encode(png).decode()
    good = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "data": [b64]}], "parameters": {"max_objects": 2}}).encode()  # fmt: skip
    gz = {"content-type": "application/json", "content-encoding": "gzip"}
    bomb = gzip.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}")
    exemplars = {"name": "exemplars", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]}
    return [
        ("uint8 shape -1", "POST", INFER, _infer([_uint8([-1, -1, 3], [1, 2, 3])]), 400),
        ("uint8 shape overflow", "POST", INFER, _infer([_uint8([2**40, 2**40, 3], [1])]), "4xx"),
        ("uint8 1.5", "POST", INFER, _infer([_uint8([16, 16, 3], [1.5] * 768)]), 400),
        ("uint8 true", "POST", INFER, _infer([_uint8([16, 16, 3], [True] * 768)]), 400),
        ("uint8 NaN", "POST", INFER,
         {"content": '{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 3],'
                     ' "data": [NaN, 1, 2]}]}', "headers": {"content-type": "application/json"}},
         400),
        ("exemplars shape [3]", "POST", INFER,
         _infer([{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}, exemplars]),
         400),
        ("max_objects true", "POST", INFER,
         _infer([{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                parameters={"max_objects": True}), 400),
        ("header length superscript", "POST", INFER,
         {"content": good, "headers": {"Inference-Header-Content-Length": "²".encode("latin-1")}}, 400),
        ("header length too long", "POST", INFER,
         {"content": good, "headers": {"Inference-Header-Content-Length": str(len(good) + 1)}}, 400),
        ("deep data", "POST", INFER,
         {"content": '{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1],'
                     ' "data": ' + "[" * DEEP + "]" * DEEP + "}]}",
          "headers": {"content-type": "application/json"}}, 400),
        ("gzip body", "POST", INFER, {"content": gzip.compress(good), "headers": gz}, 200),
        ("gzip bomb", "POST", INFER, {"content": bomb, "headers": gz}, 413),
        ("gzip garbage", "POST", INFER, {"content": b"not gzip", "headers": gz}, 400),
        ("bytes element not an image", "POST", INFER,
         _infer([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]), 400),
    ]  # fmt: skip


def corpus(png: bytes) -> list[Case]:
    """Every case."""
    return image_cases(png) + json_cases(png) + kserve_cases(png)
