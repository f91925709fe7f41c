"""``POST /collect``: save an image and its corrected points as a training record.

Off unless the server was started with ``--collect DIR``. A record is two files named by the
server, never by the client: ``<id>.png``, the image as the user saw it (EXIF orientation
applied, 8-bit RGB), and ``<id>.json``, a LabelMe file with one ``point`` shape per object
(original pixels of that image), the format ``prepare.source: points`` reads. ``<id>`` is the
first 20 hex digits of the SHA-256 of the RGB pixel bytes followed by the shape
(``"<H>x<W>x3"``): the same picture saved twice (the same file, or a lossless copy) is one
record, replaced in place, and two pictures do not share a name.

Each file is written to a temporary name in ``DIR`` and renamed into place, the PNG first and
the JSON last: the JSON is what makes a record, so a reader never sees one half written. A
bad request changes nothing in ``DIR``: every check (image, points, the folder's size cap)
runs before the first byte is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from PIL import Image

from seqops.data.sources import find_point_problem
from serve.http_io import API_KEY, ERROR_RESPONSES, ServiceDep, parse_options, read_image_request
from serve.schemas import CollectJSON, CollectOptions, CollectResponse
from serve.service import ServeError
from serve.settings import MIB

log = logging.getLogger(__name__)
LABELME_VERSION = "5.0.1"
LABEL = "object"
ID_HEX_DIGITS = 20  # 80 bits: no two images of one folder share a name by chance

router = APIRouter(tags=["collect"], dependencies=[API_KEY], responses=ERROR_RESPONSES)


def record_id(image: Image.Image) -> str:
    """The record name of an RGB image: a hash of its pixels and its shape."""
    pixels = np.asarray(image.convert("RGB"))
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes())
    digest.update("x".join(str(n) for n in pixels.shape).encode())
    return digest.hexdigest()[:ID_HEX_DIGITS]


def labelme_record(image_name: str, points: list, width: int, height: int) -> dict:
    """A LabelMe file with one ``point`` shape per object."""
    shapes = [
        {
            "label": LABEL,
            "points": [[float(x), float(y)]],
            "group_id": None,
            "shape_type": "point",
            "flags": {},
        }
        for x, y in points
    ]
    return {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": shapes,
        "imagePath": image_name,
        "imageData": None,
        "imageHeight": height,
        "imageWidth": width,
    }


def check_points(points: list, width: int, height: int, limit: int) -> None:
    """422 naming the first point that is not a finite position inside the image, the count
    when there are more than ``limit``, and whatever else the points reader of ``prepare``
    would skip the record for (one object marked twice): its own check, so the folder never
    holds a record that training would leave out. No points at all is a record too: an image
    with nothing to count (``prepare.min_objects`` decides whether training uses it)."""
    if len(points) > limit:
        raise ServeError(422, f"points: at most {limit} here, got {len(points)}")
    for i, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ServeError(422, f"points[{i}]: {[x, y]} is not a pair of finite numbers")
        if not (0 <= x <= width and 0 <= y <= height):
            raise ServeError(422, f"points[{i}]: {[x, y]} is outside the {width}x{height} image")
    if not points:
        return
    problem = find_point_problem(np.asarray(points, np.float64), width, height)
    if problem is not None:
        reason, detail = problem
        raise ServeError(422, f"points: {detail} ({reason}: prepare would skip this record)")


class Collector:
    """Writes records into one folder, one save at a time, within the folder's size cap."""

    def __init__(self, folder: str | Path, max_mb: float) -> None:
        self.folder = Path(folder)
        self.max_mb = max_mb
        self.folder.mkdir(parents=True, exist_ok=True)
        # One save at a time in this process: the size check and the writes stay together,
        # and at most one full-size image is decoded for saving at once.
        self.busy = asyncio.Lock()
        self._writing = threading.Lock()

    def save(self, image: Image.Image, points: list) -> dict:
        """Write ``<id>.png`` then ``<id>.json`` (pool thread); the answer of the route."""
        width, height = image.size
        name = record_id(image)
        png = _encode_png(image)
        record = labelme_record(f"{name}.png", points, width, height)
        text = (json.dumps(record, indent=2) + "\n").encode()
        png_path, json_path = self.folder / f"{name}.png", self.folder / f"{name}.json"
        with self._writing:
            replaced = json_path.exists()
            self._check_room(len(png) + len(text), [png_path, json_path])
            had_png = png_path.exists()
            self._write(png_path, png)
            try:
                self._write(json_path, text)
            except ServeError:
                if not had_png:  # no record without its JSON: leave the folder as it was
                    png_path.unlink(missing_ok=True)
                raise
        verb = "replaced" if replaced else "saved"
        log.info("collect: %s %s.json (%d points)", verb, name, len(points))
        return {"id": name, "count": len(points), "path": json_path.name, "replaced": replaced}

    def folder_bytes(self) -> int:
        """The size of every file under the folder."""
        total = 0
        for root, _, files in os.walk(self.folder):
            for file in files:
                with contextlib.suppress(OSError):  # removed meanwhile
                    total += os.stat(os.path.join(root, file)).st_size
        return total

    def _check_room(self, adding: int, replacing: list[Path]) -> None:
        """507 when the folder would pass its cap (the files replaced do not count)."""
        freed = sum(path.stat().st_size for path in replacing if path.exists())
        after = self.folder_bytes() - freed + adding
        if after > self.max_mb * MIB:
            raise ServeError(
                507,
                f"collect: the folder would hold {after / MIB:.1f} MiB, over its cap of"
                f" {self.max_mb:g} MiB (--collect-max-mb); nothing was written",
            )

    def _write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to a temporary name beside ``path``, then rename it into place."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the record from other users
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500
            message = f"collect: cannot write {path.name} ({exc.strerror})"
            raise ServeError(status, message) from None


def _encode_png(image: Image.Image) -> bytes:
    """The image as PNG bytes (lossless: the record holds the pixels the user counted)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


@router.post(
    "/collect",
    summary="Save an image and its points to the collect folder (with --collect DIR)",
    status_code=201,
    response_model=CollectResponse,
    responses={
        404: {"description": "the server was started without --collect"},
        507: {"description": "the folder would pass --collect-max-mb; nothing was written"},
    },
)
async def collect(request: Request, service: ServiceDep) -> dict:
    """A multipart `file` (the image, as for `/predict`) and a `points` field, JSON
    `[[x, y], ...]` in original pixels of the image as shown (EXIF orientation applied), or
    JSON `{"image": "<base64>", "points": [...]}`. Writes `<id>.png` and `<id>.json`
    (LabelMe points) into the folder; saving the same image again replaces its record. The
    points must be what `prepare` takes: no object marked twice (two points closer than
    1 px); `[]` is an image with nothing to count."""
    collector: Collector | None = request.app.state.collector
    if collector is None:
        raise ServeError(404, "collect: this server does not save (start it with --collect DIR)")
    data, fields = await read_image_request(request, CollectJSON)
    options = parse_options(CollectOptions, {}, fields)
    async with collector.busy:
        image = await service.in_pool(service.decode_full, data)
        width, height = image.size
        check_points(options.points, width, height, service.settings.max_objects_limit)
        return await service.in_pool(collector.save, image, options.points)
