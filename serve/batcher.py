"""Step-level batching: concurrent requests share batched step runs.

One asyncio task owns the predictor. Requests are admitted (or refused at once when the
queue is full), decoded elsewhere, and submitted as :class:`Job` s. Each turn of the loop
encodes newcomers (a batch of up to ``run_batch``) and then steps the active images once,
in runs of ``run_batch`` images, so images join and leave between steps: a request with 3
objects does not wait for one with 300. The onnxruntime calls run in a dedicated thread
so the event loop keeps answering health checks, admitting requests and streaming points.

Which images step in a turn is a fair share of the compute: each request is charged the
steps it took plus a share (``encode_share``) of its encoding, counted in steps (the
measured encode/step cost), and a turn steps the requests charged least. Stepping every
image every turn instead made a short request's encoding free: on a mixed load the short
requests took most of the cores and the long ones, which count most objects, waited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from seqops import imaging
from seqops.predictor import Predictor, PreparedImage
from seqops.rollout import Rollout
from serve.prometheus import ServeMetrics

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The bounded queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"server busy: the request queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class StoppedError(Exception):
    """A loop stopped before its end; ``partial`` holds what it had found by then:
    ``{"count", "points"}`` (original pixels), or None when it had not started."""

    def __init__(self, message: str, partial: dict | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class DeadlineError(StoppedError):
    """The request's deadline passed; the loop stopped between steps."""


class ShuttingDownError(StoppedError):
    """The server is stopping and takes no new work (or ran out of shutdown time)."""


def _new_future() -> asyncio.Future:
    """A future of the running loop (a Job is created inside it)."""
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class Job:
    """One image's way through the batcher."""

    image: PreparedImage
    threshold: float
    max_objects: int
    deadline: float  # time.monotonic() after which the loop stops between steps
    initial_points: Sequence[tuple[float, float]] = ()  # normalised (/next: objects given)
    stream: asyncio.Queue | None = None  # receives point dicts, then None
    prepare_ms: float = 0.0  # decoding/resizing, before submission
    future: asyncio.Future = field(default_factory=_new_future)
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # encoding began
    encode_s: float = 0.0
    rollout: Rollout | None = None  # once encoded
    sent: int = 0  # points already pushed to ``stream``
    charge: float = 0.0  # compute used, in steps (its encoding's share + its steps): fair share


def points_to_original(points_norm: Sequence, image: PreparedImage, size: int) -> np.ndarray:
    """Normalised points -> ``[N, 2]`` original image pixels."""
    model_px = imaging.norm_to_pixels(np.asarray(points_norm, np.float32), size)
    return model_px / np.asarray(image.scale, np.float32)


class StepBatcher:
    """Owns the predictor; runs encode + step turns over all active images.

    Args:
        predictor: the loaded predictor.
        max_active: images in the loop together at most (1: one request at a time).
        max_queue: requests admitted but not yet stepping, beyond the loop's free places;
            beyond it :class:`QueueFullError`.
        metrics: where step/encode/batch/queue observations go.
        run_batch: images per onnxruntime run. A turn encodes the newcomers and steps the
            active images due, in runs of this many. On a CPU a step's
            working set outgrows the caches beyond a few images (grid 48: ~150 kB per image
            per activation), so large runs cost more per image than small ones; a GPU
            wants large runs.
        encode_share: the share of an encoding's cost a request is charged (1: as many
            steps as an encoding costs, measured; 0: nothing, every active image steps
            every turn). A request steps when it is charged least, within one step.
        run_threads: onnxruntime runs of a turn that go at once (each in its own thread).
    """

    def __init__(
        self,
        predictor: Predictor,
        max_active: int,
        max_queue: int,
        metrics: ServeMetrics,
        run_batch: int = 4,
        encode_share: float = 0.5,
        run_threads: int = 1,
    ) -> None:
        self.predictor = predictor
        self.max_active = max_active
        self.max_queue = max_queue
        self.run_batch = max(1, min(run_batch, max_active))
        self.metrics = metrics
        self._pending = 0  # admitted and not yet active (decoding or in _waiting)
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="seqops-onnx")
        # Runs side by side, each on one onnxruntime thread (the predictor's own threads
        # parallelise inside an operator instead; on a small step graph that costs syncs).
        self._run_pool = (
            ThreadPoolExecutor(run_threads, thread_name_prefix="seqops-run")
            if run_threads > 1
            else None
        )
        self._run_features: dict[tuple[Job, ...], np.ndarray] = {}  # worker thread only
        self._request_s = 0.05  # moving average of a request's time, for Retry-After
        self.encode_share = encode_share
        # An encoding's cost in steps (per image; moving average of the turns that had both):
        # ~10 for the tiny preset at 384 on a CPU, the start value until measured.
        self._encode_steps = 10.0

    # -- admission ---------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """No place left: :meth:`admit` would raise :class:`QueueFullError`."""
        # The queue's bound plus the loop's free places: when an image leaves the loop, its
        # place counts at once, not only after the next turn has moved a waiting job in
        # (else a full house of clients, max_active + max_queue, saw 429s).
        return self._pending >= self.max_queue + max(self.max_active - len(self._active), 0)

    def admit(self) -> None:
        """Reserve a queue place before decoding; raises at once when there is none."""
        if self._closing:
            raise ShuttingDownError("server is shutting down")
        if self.full:
            raise QueueFullError(self.retry_after())
        self._pending += 1
        self.metrics.queue_depth.inc()

    def release(self) -> None:
        """Give back a place reserved by :meth:`admit` that will not be submitted."""
        self._pending -= 1
        self.metrics.queue_depth.dec()

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the time the loop takes to admit the queue
        ahead (its width admits max_active requests per request time). Counting the
        active requests too doubled the wait at capacity, and clients that honoured it
        left the server half idle while they slept."""
        ahead = self._pending / self.max_active
        return max(1, math.ceil(ahead * self._request_s))

    def submit(self, job: Job) -> asyncio.Future:
        """Queue an admitted job; its future resolves to a :class:`Prediction`."""
        self._waiting.append(job)
        self._wake.set()
        return job.future

    @property
    def load(self) -> dict[str, int]:
        """Current occupancy (for logs and tests)."""
        return {"pending": self._pending, "active": len(self._active)}

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop task (inside the running event loop)."""
        self._task = asyncio.create_task(self._run(), name="seqops-batcher")

    async def close(self, timeout: float = 30.0) -> None:
        """Take no new work, let admitted requests finish (up to ``timeout``), stop."""
        self._closing = True
        stop_at = time.monotonic() + timeout
        while (self._pending or self._active) and time.monotonic() < stop_at:
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in [*self._waiting, *self._active]:
            _fail(job, ShuttingDownError("server stopped before the request finished"))
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._run_pool is not None:
            self._run_pool.shutdown(wait=False, cancel_futures=True)

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        """The batcher task: take newcomers, run a turn in the worker thread, hand out results."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting and not self._active:
                self._wake.clear()
                await self._wake.wait()
            self._drop_expired()
            newcomers: list[Job] = []
            # Every image that fits joins now (encoded in runs of run_batch): admitting only
            # run_batch per turn left the queue full, and 429s, while the loop had room.
            room = self.max_active - len(self._active)
            while self._waiting and len(newcomers) < room:
                job = self._waiting.popleft()
                self._pending -= 1
                self.metrics.queue_depth.dec()
                if not job.future.done():
                    newcomers.append(job)
            if not newcomers and not self._active:
                continue
            started = time.perf_counter()
            for job in newcomers:
                job.started = started
                self.metrics.queue_seconds.observe(started - job.submitted)
            jobs = self._active + newcomers
            due = self._due(newcomers, jobs)
            try:
                finished, encode_s, step_s = await loop.run_in_executor(
                    self._executor, self._turn, newcomers, due
                )
            except Exception as exc:  # a failed run fails its requests, not the server
                log.exception("step run failed for %d request(s)", len(jobs))
                for job in jobs:
                    _fail(job, exc)
                self._active = []
                continue
            if newcomers:
                self.metrics.encode_seconds.observe(encode_s)
                if due:  # both costs measured in the same turn, under the same load
                    per_step = step_s / len(due)
                    ratio = encode_s / len(newcomers) / max(per_step, 1e-6)
                    self._encode_steps = 0.8 * self._encode_steps + 0.2 * ratio
            self.metrics.step_seconds.observe(step_s)
            self.metrics.batch_size.observe(len(due))
            done_jobs = {job for job, done in zip(due, finished, strict=True) if done}
            self._active = []
            for job in jobs:
                try:
                    if job in done_jobs:
                        self._push_points(job)
                        self._resolve(job)
                    elif not job.future.done():
                        self._push_points(job)
                        self._active.append(job)
                except Exception as exc:  # one request's bad luck must not stop the loop
                    log.exception("finishing a request failed")
                    _fail(job, exc)

    def _due(self, newcomers: list[Job], jobs: list[Job]) -> list[Job]:
        """The jobs that step this turn: those charged least (within one step). A newcomer
        starts at the least charge of the jobs already looping, plus its encoding's share,
        so it neither jumps the queue with a clean slate nor waits for work done before it
        came; on an idle server it steps at once."""
        charges = [job.charge for job in self._active]
        start = min(charges) if charges else 0.0
        for job in newcomers:
            job.charge = start + self.encode_share * self._encode_steps
        least = min(job.charge for job in jobs)
        return [job for job in jobs if job.charge < least + 1.0]

    def _turn(self, newcomers: list[Job], jobs: list[Job]) -> tuple[list[bool], float, float]:
        """Worker thread: encode the newcomers, then one step of each job in ``jobs`` (in
        runs of ``run_batch`` images; ``run_threads`` runs at a time)."""
        t0 = time.perf_counter()
        self._map(self._encode_run, _chunks(newcomers, self.run_batch))
        t1 = time.perf_counter()
        for job in newcomers:
            job.encode_s = t1 - t0
        runs = [tuple(run) for run in _chunks(jobs, self.run_batch)]
        finished = []
        # A run whose images are the same as last turn's reuses its stacked features (as
        # Predictor.predict does): only the marks change between steps.
        kept = {}
        stepped = self._map(self._step_run, runs)
        for run, (run_finished, features) in zip(runs, stepped, strict=True):
            if not any(run_finished):
                kept[run] = features
            finished += run_finished
        self._run_features = kept
        return finished, t1 - t0, time.perf_counter() - t1

    def _map(self, fn, runs: list) -> list:
        """``fn`` over the runs: in the run threads when there are several runs, else here."""
        if self._run_pool is None or len(runs) < 2:
            return [fn(run) for run in runs]
        return list(self._run_pool.map(fn, runs))

    def _encode_run(self, run: Sequence[Job]) -> None:
        """Encode a run of newcomers and start their rollouts."""
        rollouts = self.predictor.start(
            [job.image for job in run], initial_points=[job.initial_points for job in run]
        )
        for job, rollout in zip(run, rollouts, strict=True):
            job.rollout = rollout
            job.sent = len(job.initial_points)

    def _step_run(self, run: tuple[Job, ...]) -> tuple[list[bool], np.ndarray]:
        """One step of a run of jobs: which finished, and the run's stacked features."""
        features = self._run_features.get(run)
        if features is None:
            features = np.stack([job.rollout.features for job in run])
        marks = np.stack([job.rollout.marks for job in run])
        xy, done = self.predictor.step(features, marks)
        run_finished = [
            job.rollout.advance(xy[i], done[i], job.threshold, job.max_objects)
            for i, job in enumerate(run)
        ]
        for job in run:
            job.charge += 1.0
        return run_finished, features

    def _drop_expired(self) -> None:
        """Between steps: stop the loops whose deadline passed or whose client left."""
        now = time.monotonic()
        keep = []
        for job in self._active:
            if job.future.done():  # cancelled: the client went away
                continue
            if now > job.deadline:
                job.rollout.stopped_by = "deadline"
                partial = self._partial(job)
                message = f"deadline passed after {partial['count']} object(s)"
                _fail(job, DeadlineError(message, partial))
                continue
            keep.append(job)
        self._active = keep
        for job in list(self._waiting):
            if not job.future.done() and now > job.deadline:
                _fail(job, DeadlineError("deadline passed while the request was queued"))

    def _partial(self, job: Job) -> dict | None:
        """What a job's loop has found so far (none given to it): count and points in
        original pixels; None before it was encoded."""
        if job.rollout is None:
            return None
        found = job.rollout.points_norm[len(job.initial_points) :]
        size = self.predictor.info.image_size
        points = points_to_original(found, job.image, size) if found else np.zeros((0, 2))
        return {"count": len(found), "points": np.round(points, 2).tolist()}

    def stop_all(self, why: str) -> int:
        """Fail every waiting and active job now with :class:`ShuttingDownError` and what it
        found (shutdown time is running out); the number of jobs stopped."""
        stopped = 0
        for job in [*self._waiting, *self._active]:
            if not job.future.done():
                partial = self._partial(job)
                count = partial["count"] if partial else 0
                _fail(job, ShuttingDownError(f"{why}; stopped after {count} object(s)", partial))
                stopped += 1
        return stopped

    def _push_points(self, job: Job) -> None:
        """Send a streaming job the points found since the last turn (original pixels)."""
        if job.stream is None or job.future.done():
            return
        rollout = job.rollout
        new = rollout.points_norm[job.sent :]
        if not new:
            return
        size = self.predictor.info.image_size
        given = len(job.initial_points)  # marked before the loop's first step: no done_prob
        for k, (x, y) in enumerate(points_to_original(new, job.image, size), start=job.sent):
            job.stream.put_nowait(
                {
                    "event": "point",
                    "index": k,
                    "x": round(float(x), 2),
                    "y": round(float(y), 2),
                    "done_prob": round(rollout.done_probs[k - given], 4),
                }
            )
        job.sent = len(rollout.points_norm)

    def _resolve(self, job: Job) -> None:
        """Finish a job: its prediction with timings, metrics, the end of its stream."""
        if job.future.done():
            return
        now = time.perf_counter()
        steps = len(job.rollout.done_probs)
        self.metrics.steps_per_request.observe(steps)
        self._request_s = 0.9 * self._request_s + 0.1 * (now - job.submitted)
        timings = {
            "prepare": job.prepare_ms,
            "queue": 1e3 * (job.started - job.submitted),
            "encode": 1e3 * job.encode_s,
            "steps": 1e3 * (now - job.started - job.encode_s),
        }
        job.future.set_result(self.predictor.finish(job.rollout, timings))
        if job.stream is not None:
            job.stream.put_nowait(None)


def _chunks(items: Sequence, size: int) -> list:
    """``items`` in consecutive slices of ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def _fail(job: Job, exc: BaseException) -> None:
    """Fail a job (unless already finished) and end its stream."""
    if not job.future.done():
        job.future.set_exception(exc)
    if job.stream is not None:
        job.stream.put_nowait(None)


RUN_SIZES = (1, 2, 4, 8, 16)


def choose_run_batch(per_image: dict[int, float], tolerance: float = 0.05) -> int:
    """The smallest run size whose per-image step time is within ``tolerance`` of the best:
    a smaller run answers sooner and interleaves more, so it wins unless it costs more."""
    if not per_image:
        raise ValueError("choose_run_batch: no measured run sizes")
    best = min(per_image.values())
    return min(size for size, cost in per_image.items() if cost <= best * (1.0 + tolerance))


def measure_run_costs(
    predictor: Predictor, sizes: Sequence[int] = RUN_SIZES, repeats: int = 5
) -> dict[int, float]:
    """Seconds per image of one step at each run size, the best of ``repeats`` runs (the
    least disturbed by other work), on the features of a blank image's encoding."""
    size = predictor.info.image_size
    # An exemplar model needs boxes to encode at all: any box will do for timing the step.
    boxes = [[0, 0, size // 4, size // 4]] if predictor.info.exemplars else None
    blank = predictor.prepare(Image.new("RGB", (size, size)), boxes)
    features = predictor.encode([blank])
    grid = predictor.info.grid
    costs: dict[int, float] = {}
    for n in sizes:
        feats = np.repeat(features, n, axis=0)
        marks = np.zeros((n, 1, grid, grid), np.float32)
        predictor.step(feats, marks)  # the first run at a new shape allocates
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            predictor.step(feats, marks)
            best = min(best, time.perf_counter() - start)
        costs[n] = best / n
    return costs
