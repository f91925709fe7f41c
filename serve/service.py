"""The service behind the routes: model loading, admission, decoding, waiting for results.

Routes of the simple API and of KServe v2 both go through :class:`Service`, so limits,
errors and metrics are the same whichever protocol a client speaks. Nothing here knows
about HTTP requests; the routers reach the service through ``http_io.ServiceDep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from starlette.types import Receive

from seqops import imaging
from seqops.predictor import (
    Prediction,
    Predictor,
    PredictorError,
    PreparedImage,
    cuda_usable,
    default_threads,
)
from serve.batcher import (
    DeadlineError,
    Job,
    QueueFullError,
    ShuttingDownError,
    StepBatcher,
    choose_run_batch,
    measure_run_costs,
)
from serve.prometheus import ServeMetrics
from serve.schemas import LoopOptions
from serve.settings import ServeSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class ServeError(Exception):
    """An error answer: HTTP status, a message that says what to change, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        partial: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.partial = partial  # a stopped loop's findings: {"count", "points"}


class Slot:
    """A place in the queue, held from admission until the job is submitted."""

    def __init__(self, batcher: StepBatcher) -> None:
        self._batcher = batcher
        self.submitted = False

    def submit(self, job: Job) -> None:
        """Hand the job to the batcher (the place becomes the job's)."""
        self._batcher.submit(job)
        self.submitted = True


class PixelBudget:
    """At most ``limit`` pixels being decoded at once, over all decode threads: Pillow holds
    4 bytes a pixel, so two 36 MP images side by side cost ~300 MB more than one after the
    other. Large images decode in turn; small ones still side by side."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Wait (in a pool thread) until ``pixels`` fit, hold them for the block."""
        pixels = min(pixels, self._limit)
        with self._changed:
            self._changed.wait_for(lambda: self._used + pixels <= self._limit)
            self._used += pixels
        try:
            yield
        finally:
            with self._changed:
                self._used -= pixels
                self._changed.notify_all()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (other allocators have their own policy)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _header_pixels(data: bytes) -> int:
    """Width x height from the image's header (0 when unreadable: decoding says why)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.width * probe.height
    except Exception:  # any failure is load_image's to report, by kind
        return 0


class Service:
    """Owns the predictor, the batcher and the decode threads of one server process."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: ServeMetrics,
        predictor: Predictor | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.predictor = predictor
        self.batcher: StepBatcher | None = None
        self.load_error: str | None = None
        self.draining = False
        self._decode_pool = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="seqops-decode"
        )
        self._pixel_budget = PixelBudget(settings.max_pixels)
        self._trimmer: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, and not shutting down."""
        return self.batcher is not None and not self.draining

    async def start(self) -> None:
        """Load + warm up the model (in a thread: liveness answers meanwhile), then serve."""
        try:
            if self.predictor is None:
                self.predictor = await asyncio.to_thread(self._load)
            info = self.predictor.info
            self.metrics.set_model(
                info.name, self.version, info.preset or "unknown", self.predictor.provider
            )
            s = self.settings
            run_batch = s.run_batch or await asyncio.to_thread(self._measured_run_batch)
            self.batcher = StepBatcher(
                self.predictor, s.max_active, s.max_queue, self.metrics, run_batch,
                s.encode_share, self.run_threads(),
            )  # fmt: skip
            self.metrics.run_batch.set(self.batcher.run_batch)
            self.batcher.start()
            self._trimmer = asyncio.create_task(self._trim_memory(), name="seqops-trim")
            log.info(
                "ready: %s v%s on %s, batching %s (max_active=%d, run_batch=%d, run_threads=%d,"
                " encode_share=%g, max_queue=%d)",
                info.name,
                self.version,
                self.predictor.provider,
                "on" if s.batching else "off",
                s.max_active,
                self.batcher.run_batch,
                self.run_threads(),
                s.encode_share,
                s.max_queue,
            )
        except Exception as exc:
            self.load_error = str(exc)  # PredictorError names the model and the reason
            log.error("cannot serve: %s", self.load_error)

    def _load(self) -> Predictor:
        """Load and warm up the predictor the settings name (worker thread)."""
        s = self.settings
        kwargs: dict[str, Any] = {
            "device": s.device,
            # The cores, shared among the workers and each worker's parallel runs.
            "threads": s.threads or default_threads(s.workers * self.run_threads()),
            "spin": s.spin,
            "warmup": True,
        }
        if s.model_version is not None:  # the CLI resolved the URI already
            return Predictor(s.model, version=s.model_version, **kwargs)
        return Predictor.load(s.model, **kwargs)

    def _measured_run_batch(self) -> int:
        """Images per step run when not set: 64 on CUDA (a GPU wants big runs), else the
        size the step graph is cheapest per image at on this machine (measured, not a fixed
        guess: the best size depends on the model and the cores)."""
        if "CUDA" in self.predictor.provider:
            return 64
        costs = measure_run_costs(self.predictor)
        chosen = choose_run_batch(costs)
        log.info(
            "run_batch %d chosen from step ms per image %s",
            chosen,
            {n: round(cost * 1e3, 3) for n, cost in costs.items()},
        )
        return chosen

    def run_threads(self) -> int:
        """onnxruntime runs at once: as set, else the cores of this worker on a CPU (each
        run on one of them: the step graph is too small to split an operator over threads
        without waiting on their syncs), one on CUDA (a GPU wants big runs instead)."""
        s = self.settings
        if s.run_threads:
            return s.run_threads
        if s.device == "cuda" or (s.device == "auto" and cuda_usable()):
            return 1
        return max(1, default_threads(s.workers) // max(1, s.threads))

    def cut_in_flight(self) -> None:
        """Shutdown time is running out: answer every admitted request now (503 with the
        points found so far; a stream ends with an error record) rather than be cut off by
        the server with a bare 500."""
        if self.batcher is not None:
            stopped = self.batcher.stop_all("server shutting down")
            log.warning("graceful shutdown time is running out: stopped %d request(s)", stopped)

    async def _trim_memory(self, every_s: float = 10.0) -> None:
        """Give freed heap memory back to the OS every ``every_s`` seconds. Request bodies
        and decoded images are MBs each; once glibc's malloc has freed a few, it keeps such
        blocks in its heap, and a burst of 18 MiB uploads left the server's RSS ~170 MB
        higher for good. ``malloc_trim`` (in a pool thread) returns them; fixing the mmap
        threshold instead cost a third of the throughput (the step's arrays are MBs too)."""
        trim = _malloc_trim()
        if trim is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            await loop.run_in_executor(self._decode_pool, trim, 0)

    async def stop(self) -> None:
        """Stop being ready, let admitted requests finish, release the threads."""
        self.draining = True
        if self._trimmer is not None:
            self._trimmer.cancel()
        if self.batcher is not None:
            await self.batcher.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    # -- identity ----------------------------------------------------------------------

    @property
    def version(self) -> str:
        """The served model's version ("local" for an unversioned directory)."""
        return (self.predictor.info.model_version if self.predictor else "") or "local"

    def model_ref(self) -> dict[str, Any]:
        """``{"name", "version", "provider", "confidence_calibrated"}`` for every response."""
        return {
            "name": self.predictor.info.name,
            "version": self.version,
            "provider": self.predictor.provider,
            "confidence_calibrated": self.predictor.info.confidence_calibrated,
        }

    # -- admission and decoding --------------------------------------------------------

    def check_ready(self) -> None:
        """503 while loading or after a failed load.

        Not while draining: requests that reached the server before SIGTERM are in flight
        and must complete; uvicorn already refuses new connections then.
        """
        if self.batcher is None:
            why = self.load_error or "the model is still loading"
            raise ServeError(503, f"not ready: {why}", {"Retry-After": "1"})

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Admission: a queue place or an immediate 429/503, released unless submitted."""
        self.check_ready()
        try:
            self.batcher.admit()
        except QueueFullError as exc:
            status = self.settings.queue_full_status
            raise ServeError(status, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except ShuttingDownError as exc:
            raise ServeError(503, str(exc), {"Retry-After": "1"}) from None
        slot = Slot(self.batcher)
        try:
            yield slot
        finally:
            if not slot.submitted:
                self.batcher.release()

    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run decoding/parsing off the event loop; map input errors to 4xx."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._decode_pool, fn, *args)
        except imaging.ImageError as exc:
            raise ServeError(400, f"image: {exc}") from None
        except PredictorError as exc:
            raise ServeError(422, str(exc)) from None

    def prepare_image(
        self, source: bytes | np.ndarray, exemplars: Sequence | None
    ) -> PreparedImage:
        """Encoded bytes or a uint8 ``[H, W, 3]`` array -> network inputs (pool thread)."""
        if isinstance(source, np.ndarray):
            return self.predictor.prepare(self._image_from_array(source), exemplars)
        image, full_size = self._decode(source)
        if image.size == full_size:
            return self.predictor.prepare(image, exemplars)
        # A reduced decode: boxes into its frame, then scale and size back to the full
        # image's, so points and checks are in the pixels the client sent.
        fx, fy = image.width / full_size[0], image.height / full_size[1]
        self._check_boxes(exemplars, full_size)
        boxes = None if exemplars is None else [
            [min(x1 * fx, image.width), min(y1 * fy, image.height),
             min(x2 * fx, image.width), min(y2 * fy, image.height)]
            for x1, y1, x2, y2 in exemplars
        ]  # fmt: skip
        prepared = self.predictor.prepare(image, boxes)
        size = self.predictor.info.image_size
        scale = (size / full_size[0], size / full_size[1])
        return dataclasses.replace(prepared, orig_size=full_size, scale=scale)

    @staticmethod
    def _check_boxes(exemplars: Sequence | None, full_size: tuple[int, int]) -> None:
        """Exemplar boxes must lie in the image the client sent (the predictor checks them
        again, in the reduced frame; this says it in the client's pixels)."""
        width, height = full_size
        for box in exemplars or []:
            x1, y1, x2, y2 = box
            if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
                raise ServeError(
                    422,
                    f"exemplars: box {list(box)} is empty or outside the {width}x{height} image",
                )

    def decode_full(self, data: bytes) -> Image.Image:
        """Encoded bytes -> the whole RGB image as the user sees it, with the checks and
        errors of counting requests, not reduced: what ``/collect`` stores (pool thread)."""
        return self._decode(data, reduced=False)[0]

    def _decode(self, data: bytes, reduced: bool = True) -> tuple[Image.Image, tuple[int, int]]:
        """Encoded bytes -> RGB image as the user sees it (EXIF orientation applied) and its
        full size; a JPEG is decoded reduced (down to the model's input side), a large
        photo then costs a fraction of its full decoding memory. 413 before decoding any
        pixel when the header announces too many, 415 for a format or pixel mode not taken
        (the message names it), 400 when undecodable."""
        if not data:
            raise ServeError(400, "image: the body is empty")
        size = self.predictor.info.image_size if reduced else 0
        try:
            with self._pixel_budget.hold(_header_pixels(data)):
                image, full_size = imaging.load_image_reduced(
                    data, size, max_pixels=self.settings.max_pixels
                )
                # Shrink by a whole factor while both sides stay >= the model's input (the
                # box filter Pillow's own resize uses on the way), so the conversions and
                # the resize after this work on a fraction of the pixels.
                factor = min(image.width, image.height) // size if reduced else 1
                if factor >= 2:
                    image = image.reduce(factor)
        except imaging.ImageTooLargeError as exc:
            raise ServeError(413, f"image: {_unnamed(exc)}") from None
        except imaging.UnsupportedImageError as exc:
            raise ServeError(415, f"image: {_unnamed(exc)}") from None
        except imaging.ImageError as exc:
            raise ServeError(400, f"image: {_unnamed(exc)}") from None
        self._check_size(*full_size)
        return image, full_size

    def _image_from_array(self, array: np.ndarray) -> Image.Image:
        """A uint8 ``[H, W, 3]`` array -> RGB image, with the same checks as decoding."""
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ServeError(
                400, f"image: expected uint8 [H, W, 3], got {array.dtype} {list(array.shape)}"
            )
        height, width = array.shape[:2]
        if width < 1 or height < 1:
            raise ServeError(400, f"image: empty ({width}x{height})")
        self._check_size(width, height)
        return Image.fromarray(np.ascontiguousarray(array), "RGB")

    def _check_size(self, width: int, height: int) -> None:
        """413 above the pixel limit; 422 below the smallest side (a 1x1 image stretched to
        the model's input is no picture of anything, and the loop would count noise)."""
        limit = self.settings.max_pixels
        if width * height > limit:
            raise ServeError(
                413, f"image: {width}x{height} = {width * height} pixels exceeds the limit {limit}"
            )
        smallest = self.settings.min_image_side
        if min(width, height) < smallest:
            raise ServeError(
                422, f"image: {width}x{height} is smaller than {smallest} px on a side"
            )

    # -- jobs --------------------------------------------------------------------------

    def loop_settings(
        self, options: LoopOptions, max_objects: int | None
    ) -> tuple[float, int, float]:
        """``(done_threshold, max_objects, deadline)`` with the server's defaults and limits."""
        s = self.settings
        max_objects = s.max_objects if max_objects is None else max_objects
        if max_objects > s.max_objects_limit:
            raise ServeError(
                422, f"max_objects: at most {s.max_objects_limit} here, got {max_objects}"
            )
        deadline_s = s.deadline_s if options.deadline_s is None else options.deadline_s
        if deadline_s > s.max_deadline_s:
            raise ServeError(422, f"deadline_s: at most {s.max_deadline_s} here, got {deadline_s}")
        threshold = options.done_threshold
        if threshold is None:
            threshold = self.predictor.info.done_threshold
        return threshold, max_objects, time.monotonic() + deadline_s

    async def wait(self, job: Job, receive: Receive | None = None) -> Prediction:
        """The job's prediction, or the error answer its failure means.

        With the request's ``receive``, a client that disconnects (gave up, timed out) has
        its job cancelled: the batcher drops it between steps instead of stepping to the
        end for nobody, and the answer is 499 (which no one reads, but metrics count).
        """
        if receive is None:
            return await _result(job)
        gone = asyncio.ensure_future(_client_gone(receive))
        try:
            await asyncio.wait((job.future, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():
            job.future.cancel()
            raise ServeError(499, "client closed the request; its loop was stopped")
        return await _result(job)


async def _result(job: Job) -> Prediction:
    """The job's prediction, its failure as the error answer."""
    try:
        return await job.future
    except Exception as exc:
        raise as_serve_error(exc) from None


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _unnamed(exc: Exception) -> str:
    """An imaging error's message without the ``<bytes>: `` its source name is here."""
    return str(exc).removeprefix("<bytes>: ")


def as_serve_error(exc: BaseException) -> ServeError:
    """The answer a failed job gives (the batcher has logged unexpected failures)."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, DeadlineError):
        return ServeError(504, f"deadline: {exc}", partial=exc.partial)
    if isinstance(exc, ShuttingDownError):
        return ServeError(503, str(exc), {"Retry-After": "1"}, partial=exc.partial)
    return ServeError(500, f"inference failed: {exc}")
