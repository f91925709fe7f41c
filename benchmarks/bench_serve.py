"""Load test of `seqops serve` on loopback: latency, throughput, step batching, overload.

Starts the real server (one worker) and drives it with an asyncio/httpx load generator:

1. closed loop (C clients, each sends its next request when the last one returns) for
   images with few and many objects, C = 1, 4, 16, and a mixed load (half the clients
   few, half many), with step batching on and off: throughput, p50/p99 latency, and the
   server's mean batch size (from /metrics);
2. overload: open-loop arrivals at 2x the throughput measured with batching at C = 16,
   against the default queue bound: 429s must come back fast, and every accepted request
   must succeed (no 5xx, no 504);
3. ``--hostile`` (alone, or with the above): the server against careless and hostile
   clients (issue 12): as many clients as its capacity (refused or not?), 128 clients that
   honour or ignore ``Retry-After``, clients that give up after 0.5 s on long loops (does
   the work stop?), stalled 18 MiB uploads and 36 MP images (server RSS), idle sockets.

The default model is the real network (tiny preset, 384 px) at random init with a done
head that never fires, so ``max_objects`` sets each image's object count exactly: the cost
of a request is what it would be for a trained model finding that many objects.

    .venv/bin/python benchmarks/bench_serve.py --out bench_serve.json
    .venv/bin/python benchmarks/bench_serve.py --model models/onnx --duration 5
    .venv/bin/python benchmarks/bench_serve.py --hostile --out bench_hostile.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image, ImageDraw

from seqops.io import atomic_write_json, free_port


def export_bench_model(out_dir: Path, image_size: int, preset: str) -> Path:
    """A random-init network whose done head never fires (count = max_objects)."""
    from seqops.config import load_params
    from seqops.export import build_metadata, export_model
    from seqops.model import ModelSpec
    from seqops.testing import make_untrained_model

    params = load_params()  # the project's params.yaml (run from the repository root)
    spec = ModelSpec.from_preset(preset, image_size, False)
    model = make_untrained_model(spec, seed=0, done_bias=-12.0)
    metadata = build_metadata(
        spec, params.model_dump(mode="json"), done_threshold=params.evaluate.done_threshold,
        model_version="bench", run_id=None,
    )  # fmt: skip
    export_model(model, out_dir, metadata, params.export)
    return out_dir


def scene_png(size: int, seed: int = 0) -> bytes:
    """A synthetic scene (discs on a plain background), compressed as a photo-sized PNG."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (200, 190, 170))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(6, 14)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(60, 90, 160))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


PEERS_DIR = Path(__file__).parent / "peers"

# The servers a closed-loop run can drive: name -> (command after the interpreter, readiness
# path). {model} and {port} are filled in. Peers take the same multipart request.
_SEQOPS_ENTRY = ["-m", "seqops.cli", "serve", "--model", "{model}", "--port", "{port}",
                 "--device", "cpu", "--no-access-log"]  # fmt: skip
# seqops' app on uvicorn's pure-Python HTTP parser and the standard event loop (the default
# is httptools + uvloop): what the faster stack is worth.
_H11_ASYNCIO = (
    "import sys, uvicorn; from serve.app import create_app; "
    "from serve.settings import ServeSettings; "
    "uvicorn.run(create_app(ServeSettings(model=sys.argv[1], device='cpu')), "
    "port=int(sys.argv[2]), http='h11', loop='asyncio', access_log=False, log_level='warning')"
)
SERVERS = {
    "seqops": ([*_SEQOPS_ENTRY], "/readyz"),
    "seqops-off": ([*_SEQOPS_ENTRY, "--no-batching"], "/readyz"),
    "seqops-2w": ([*_SEQOPS_ENTRY, "--workers", "2", "--threads", "1"], "/readyz"),
    "seqops-1t": ([*_SEQOPS_ENTRY, "--threads", "1"], "/readyz"),
    "seqops-h11": (["-c", _H11_ASYNCIO, "{model}", "{port}"], "/readyz"),
    # The code of another commit (`git archive COMMIT seqops serve | tar -x -C DIR`, then
    # --before DIR), with seqops' arguments: before and after in the same run.
    "seqops-before": (["-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
                       "from seqops.cli import main; sys.exit(main())", "{before}",
                       *_SEQOPS_ENTRY[2:]], "/readyz"),
    # The same app and flags under granian (Rust HTTP, ASGI) instead of uvicorn.
    "seqops-granian": ([str(PEERS_DIR / "granian_seqops.py"), *_SEQOPS_ENTRY[3:]], "/readyz"),
    "plain": ([str(PEERS_DIR / "plain_fastapi.py"), "--model", "{model}", "--port", "{port}"],
              "/healthz"),
    "litserve": ([str(PEERS_DIR / "litserve_batched.py"), "--model", "{model}", "--port",
                  "{port}"], "/health"),
}  # fmt: skip


BEFORE_ENV = "SEQOPS_BENCH_BEFORE"  # the directory seqops-before runs (--before sets it)


class ServerProcess:
    """A server (``seqops serve`` unless ``kind`` names another) on a free loopback port, in
    its own process group (peers start worker processes), stopped with SIGTERM."""

    def __init__(self, model: str, *args: str, kind: str = "seqops") -> None:
        self.kind = kind
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        kind, _, extra = kind.partition(":")  # "seqops:--encode-share=1,--run-batch=8"
        args = (*[a for a in extra.split(",") if a], *args)
        template, self.ready_path = SERVERS[kind]
        fill = {"model": model, "port": self.port, "before": os.environ.get(BEFORE_ENV, "")}
        command = [sys.executable, *(a.format(**fill) for a in template)]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [*command, *args], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        stop_at = time.monotonic() + timeout
        while time.monotonic() < stop_at and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.base}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.log.seek(0)
        raise RuntimeError(f"{self.kind} not ready:\n{self.log.read().decode()[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        """The server's process and its children (workers), alive now."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        time.sleep(0.5)  # its workers exit after it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def scrape(base: str) -> dict[str, float]:
    """The unlabelled sample values of /metrics (enough for sums and counts)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(seqops_[a-z_]+) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(latencies: list[float], statuses: Counter, elapsed: float) -> dict:
    ok = statuses.get(200, 0)
    return {
        "requests": sum(statuses.values()),
        "ok": ok,
        "statuses": dict(statuses),
        "throughput_rps": round(ok / elapsed, 2),
        "p50_ms": round(1e3 * percentile(latencies, 50), 1),
        "p99_ms": round(1e3 * percentile(latencies, 99), 1),
    }


async def closed_loop(
    base: str, counts: list[int], bodies: dict[int, bytes], duration: float
) -> dict[int, dict]:
    """One client per entry of ``counts`` (the objects of its image), each back to back for
    ``duration`` seconds; results per objects count (a mixed load reports each kind apart),
    with the objects the answers counted and the latencies themselves (s)."""
    latencies: dict[int, list[float]] = {n: [] for n in counts}
    statuses: dict[int, Counter] = {n: Counter() for n in counts}
    counted: dict[int, int] = dict.fromkeys(counts, 0)
    limits = httpx.Limits(max_connections=len(counts) + 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def client_loop(n: int) -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                response = await client.post(f"{base}/predict", content=bodies[n], headers=_FORM)
                statuses[n][response.status_code] += 1
                if response.status_code == 200:
                    latencies[n].append(time.perf_counter() - t0)
                    counted[n] += response.json()["count"]

        await asyncio.gather(*(client_loop(n) for n in counts))
        elapsed = time.perf_counter() - start
    return {
        n: {**summarize(latencies[n], statuses[n], elapsed),
            "objects_per_s": round(counted[n] / elapsed, 1), "latencies": latencies[n]}
        for n in latencies
    }  # fmt: skip


_BOUNDARY = "seqops-bench-boundary"
_FORM = {"content-type": f"multipart/form-data; boundary={_BOUNDARY}"}


def form_body(png: bytes, max_objects: int) -> bytes:
    """The request every server gets: a multipart form with ``max_objects`` and the image as
    ``file`` (built once: the load generator then only sends bytes)."""
    field = (
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="max_objects"\r\n\r\n'
        f'{max_objects}\r\n--{_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="scene.png"\r\nContent-Type: image/png\r\n\r\n'
    )
    return field.encode() + png + f"\r\n--{_BOUNDARY}--\r\n".encode()


async def open_loop(url: str, png: bytes, rate: float, duration: float) -> dict:
    """Poisson arrivals at ``rate`` per second for ``duration`` seconds, none retried."""
    rng = random.Random(1)
    accepted: list[float] = []
    refused: list[float] = []
    statuses: Counter = Counter()
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                response = await client.post(url, content=png, headers=_PNG)
                status = response.status_code
            except httpx.TransportError:
                status = -1
            statuses[status] += 1
            (accepted if status == 200 else refused).append(time.perf_counter() - t0)

        start = time.perf_counter()
        tasks = []
        while time.perf_counter() - start < duration:
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    result = summarize(accepted, statuses, elapsed)
    result["offered_rps"] = round(len(tasks) / duration, 1)
    result["refused_p50_ms"] = round(1e3 * percentile(refused, 50), 1)
    result["refused_p99_ms"] = round(1e3 * percentile(refused, 99), 1)
    failed = sum(n for code, n in statuses.items() if code not in (200, 429))
    result["accepted_failed"] = failed
    return result


_PNG = {"content-type": "image/png"}


def request_cpu_seconds(predictor, png: bytes, objects: int, repeats: int = 5) -> float:
    """The onnxruntime CPU time of one request with ``max_objects=objects``: its encoding and
    the steps the model takes on the image (``objects`` with the random-init model, whose done
    head never fires; fewer with a trained one that says done first) at batch 1, on one
    intra-op thread (onnxruntime runs on the calling thread then, so its thread time is the
    graphs' arithmetic and nothing else); median of ``repeats``. Decoding, the loop's
    Python, JSON and HTTP are left out: they count against a server."""
    image = predictor.prepare(png)
    (prediction,) = predictor.predict([image], max_objects=objects)
    steps = len(prediction.done_probs)  # one done probability a step
    features = predictor.encode([image])
    marks = np.zeros((1, 1, predictor.info.grid, predictor.info.grid), np.float32)
    times = []
    for _ in range(repeats + 1):  # the first warms the caches
        t0 = time.thread_time()
        features = predictor.encode([image])
        for _ in range(steps):
            predictor.step(features, marks)
        times.append(time.thread_time() - t0)
    return statistics.median(times[1:])


def tree_cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds of the given processes (those still alive)."""
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def tree_rss_mb(server: ServerProcess) -> float:
    """The resident memory of a server's processes together, MB."""
    total = 0
    for proc in server.processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return round(total / 2**20, 1)


def run_closed_loops(model: str, png: bytes, args: argparse.Namespace) -> list[dict]:
    """Every load against every server of ``args.servers``, one server at a time (peers are
    alone on the cores, and their memory and CPU are theirs); the order of the servers
    alternates between rounds, so none always runs first on the shared machine."""
    from seqops.predictor import Predictor

    predictor = Predictor(model, device="cpu", threads=1)  # the compute bound's yardstick
    loads = [(f"{c} x {n}", [n] * c) for n in (args.few, args.many) for c in args.concurrency]
    half = max(args.concurrency) // 2
    if half:  # the mixed load: half the clients few objects, half many
        loads.append((f"mixed {half} x {args.few} + {half} x {args.many}",
                      [args.few] * half + [args.many] * half))  # fmt: skip
    bodies = {n: form_body(png, n) for n in (args.few, args.many)}
    if args.interleave:
        return aggregate(run_interleaved(model, loads, bodies, predictor, png, args))
    rows = []
    for round_ in range(args.rounds):
        for kind in args.servers[:: 1 if round_ % 2 == 0 else -1]:
            server = ServerProcess(model, kind=kind)
            try:
                server.wait_ready()
                asyncio.run(closed_loop(server.base, [args.few] * 2, bodies, 1.0))  # warm-up
                for name, counts in loads:
                    seconds = {n: request_cpu_seconds(predictor, png, n) for n in set(counts)}
                    rows.append(measure(server, name, counts, bodies, args.duration, seconds))
            finally:
                server.stop()
    return aggregate(rows)


def run_interleaved(model, loads, bodies, predictor, png, args) -> list[dict]:
    """``--interleave``: every server started at once (the others idle meanwhile), then load
    by load the servers in turn, alternating their order between rounds. The runs of one
    load on two servers are seconds apart, not minutes: on a machine whose other jobs come
    and go, the pairs compare like with like."""
    servers = []
    try:
        for kind in args.servers:
            servers.append(ServerProcess(model, kind=kind))
        for server in servers:
            server.wait_ready()
            asyncio.run(closed_loop(server.base, [args.few] * 2, bodies, 1.0))  # warm-up
        rows = []
        for name, counts in loads:
            seconds = {n: request_cpu_seconds(predictor, png, n) for n in set(counts)}
            for round_ in range(args.rounds):
                for server in servers[:: 1 if round_ % 2 == 0 else -1]:
                    rows.append(measure(server, name, counts, bodies, args.duration, seconds))
        return rows
    finally:
        for server in servers:
            server.stop()


def measure(
    server: ServerProcess,
    name: str,
    counts: list[int],
    bodies: dict[int, bytes],
    duration: float,
    request_s: dict[int, float],
) -> dict:
    """One closed-loop run: throughput, latency, the share of the compute bound, the CPU of
    the server and of the load generator (this process), the server's peak RSS."""
    seqops = server.kind.startswith("seqops")
    before = scrape(server.base) if seqops else {}
    processes = server.processes()
    cpu_before, own_before = tree_cpu_seconds(processes), _own_cpu_seconds()
    peak = PeakRSS(lambda: tree_rss_mb(server))
    t0 = time.perf_counter()
    results = asyncio.run(closed_loop(server.base, counts, bodies, duration))
    elapsed = time.perf_counter() - t0
    rss = peak.stop()
    pooled = [t for r in results.values() for t in r.pop("latencies")]
    server_cpu = tree_cpu_seconds(processes) - cpu_before
    own_cpu = _own_cpu_seconds() - own_before
    after = scrape(server.base) if seqops else {}
    steps = after.get("seqops_step_seconds_count", 0) - before.get("seqops_step_seconds_count", 0)
    images = after.get("seqops_batch_size_sum", 0) - before.get("seqops_batch_size_sum", 0)
    cores = os.cpu_count() or 1
    # Each answered request needed its onnxruntime CPU time: that over the cores' time is
    # the share of the bound reached (for one kind of request, throughput / (cores / t)).
    used = sum(r["throughput_rps"] * request_s[n] for n, r in results.items())
    answered = sum(r["ok"] for r in results.values())
    row = {
        "server": server.kind,
        "load": name,
        "clients": len(counts),
        "throughput_rps": round(sum(r["throughput_rps"] for r in results.values()), 2),
        "objects_per_s": round(sum(r["objects_per_s"] for r in results.values()), 1),
        "p50_ms": round(1e3 * percentile(pooled, 50), 1),
        "p99_ms": round(1e3 * percentile(pooled, 99), 1),
        "bound_rps": round(cores / _mean_request_s(counts, request_s), 1),
        "bound_pct": round(100 * used / cores, 1),
        "rss_peak_mb": rss,
        "server_cpu_cores": round(server_cpu / elapsed, 2),
        # What a request costs the server, however many cores others left it: the figure an
        # HTTP stack changes, steadier than req/s on a shared machine.
        "server_cpu_ms_per_request": round(1e3 * server_cpu / answered, 2) if answered else None,
        "loadgen_cpu_cores": round(own_cpu / elapsed, 2),
        "failed": sum(r["requests"] - r["ok"] for r in results.values()),
        "mean_batch": round(images / steps, 2) if steps else None,
        "request_cpu_ms": {n: round(1e3 * s, 2) for n, s in request_s.items()},
        "kinds": {n: {k: r[k] for k in ("throughput_rps", "objects_per_s", "p50_ms", "p99_ms")}
                  for n, r in results.items()},
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def _own_cpu_seconds() -> float:
    """This process's CPU seconds (the load generator's, with its client threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _mean_request_s(counts: list[int], request_s: dict[int, float]) -> float:
    """The onnxruntime time of the load's average request (its clients in equal turns)."""
    return statistics.mean(request_s[n] for n in counts)


def aggregate(rows: list[dict]) -> list[dict]:
    """Medians over the rounds of each (server, load)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["server"], row["load"]), []).append(row)
    merged = []
    numeric = ("throughput_rps", "objects_per_s", "p50_ms", "p99_ms", "bound_rps", "bound_pct",
               "rss_peak_mb", "server_cpu_cores", "server_cpu_ms_per_request",
               "loadgen_cpu_cores")  # fmt: skip
    for (server, load), group in groups.items():
        row = {"server": server, "load": load, "clients": group[0]["clients"],
               "rounds": len(group)}  # fmt: skip
        for key in numeric:
            values = [r[key] for r in group if r[key] is not None]
            row[key] = round(statistics.median(values), 2) if values else None
        batches = [r["mean_batch"] for r in group if r["mean_batch"] is not None]
        row["mean_batch"] = round(statistics.median(batches), 2) if batches else None
        row["failed"] = sum(r["failed"] for r in group)
        row["rss_peak_mb_max"] = max(r["rss_peak_mb"] for r in group)
        row["kinds"] = {
            n: {k: round(statistics.median(r["kinds"][n][k] for r in group), 1)
                for k in group[0]["kinds"][n]}
            for n in group[0]["kinds"]
        }  # fmt: skip
        merged.append(row)
    return merged


def run_overload(model: str, png: bytes, rate: float, objects: int, duration: float) -> dict:
    server = ServerProcess(model)  # the defaults: max_active 32, max_queue 32
    try:
        server.wait_ready()
        url = f"{server.base}/predict?max_objects={objects}"
        asyncio.run(closed_loop(server.base, [objects] * 2, {objects: form_body(png, objects)}, 1))
        result = asyncio.run(open_loop(url, png, rate, duration))
    finally:
        server.stop()
    result.update({"objects": objects, "target_rps": round(rate, 1)})
    print(json.dumps(result), flush=True)
    return result


# --- careless and hostile clients (--hostile) ---------------------------------------------


def rss_mb(pid: int) -> float:
    """The resident memory of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class PeakRSS:
    """Samples a memory figure (MB; ``sample()``) every 50 ms in a thread; ``peak`` is the
    largest seen."""

    def __init__(self, sample: Callable[[], float]) -> None:
        self.sample, self.peak, self._stop = sample, sample(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.sample())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


async def retrying_clients(url: str, png: bytes, clients: int, duration: float, honour: bool):
    """``clients`` closed-loop clients that retry every 429: after ``Retry-After`` seconds
    (``honour``) or at once. Latency runs from a request's first attempt to its 200."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def loop() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                while time.perf_counter() < stop_at:
                    response = await client.post(url, content=png, headers=_PNG)
                    statuses[response.status_code] += 1
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                        break
                    if honour:
                        await asyncio.sleep(float(response.headers.get("retry-after", 1)))

        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return summarize(latencies, statuses, elapsed)


async def leavers(base: str, png: bytes, duration: float, objects: int) -> dict:
    """16 clients that give up after 0.5 s on ``objects``-object loops, again and again,
    beside one client counting 5 objects: its latency, and how long the server keeps
    stepping once the leavers stop."""
    probe: list[float] = []
    stop_at = time.perf_counter() + duration
    async with httpx.AsyncClient(timeout=0.5) as quitter, httpx.AsyncClient(timeout=60) as calm:

        async def leave() -> None:
            while time.perf_counter() < stop_at:
                with contextlib.suppress(httpx.TimeoutException):
                    await quitter.post(f"{base}/predict?max_objects={objects}", content=png,
                                       headers=_PNG)  # fmt: skip

        async def measure_probe() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await calm.post(f"{base}/predict?max_objects=5", content=png, headers=_PNG)
                probe.append(time.perf_counter() - t0)

        await asyncio.gather(*(leave() for _ in range(16)), measure_probe())
    left = time.perf_counter()
    steps = scrape(base)["seqops_step_seconds_count"]
    while True:  # until the step counter stands still for 0.3 s
        await asyncio.sleep(0.3)
        now = scrape(base)["seqops_step_seconds_count"]
        if now == steps:
            break
        steps = now
    return {"probe_p50_ms": round(1e3 * percentile(probe, 50), 1),
            "probe_p99_ms": round(1e3 * percentile(probe, 99), 1),
            "busy_after_leaving_s": round(time.perf_counter() - left - 0.3, 2)}  # fmt: skip


def stalled_uploads(server, count: int = 30, hold: float = 8.0) -> dict:
    """``count`` uploads announcing 18 MiB that send 8 MiB and stall for ``hold`` s (then
    give up): server RSS before, at its peak, and 12 s after (the server gives freed memory
    back every 10 s); a probe request meanwhile."""
    before = rss_mb(server.proc.pid)
    peak = PeakRSS(lambda: rss_mb(server.proc.pid))
    chunk = b"\0" * (1 << 20)
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: %d\r\n\r\n" % (18 << 20))  # fmt: skip
        socks.append(sock)
    for sock in socks:
        for _ in range(8):
            sock.sendall(chunk)
    time.sleep(1.0)
    probe = httpx.post(f"{server.base}/predict?max_objects=5", content=scene_png(384),
                       headers=_PNG, timeout=60)  # fmt: skip
    time.sleep(max(hold - 1.0, 0))
    for sock in socks:
        sock.close()
    time.sleep(12.0)
    return {"uploads": count, "rss_before_mb": before, "rss_peak_mb": peak.stop(),
            "rss_after_mb": rss_mb(server.proc.pid), "probe_status": probe.status_code}  # fmt: skip


def big_images(server, concurrent: int = 8) -> dict:
    """``concurrent`` 36 MP images at once (a PNG of ~100 KB, a JPEG): server RSS before,
    at its peak, and 12 s after."""
    results = {}
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.new("RGB", (6000, 6000), (120, 130, 140)).save(buffer, fmt)
        data = buffer.getvalue()
        before = rss_mb(server.proc.pid)
        peak = PeakRSS(lambda: rss_mb(server.proc.pid))

        async def send_all(data=data, fmt=fmt) -> list[int]:
            async with httpx.AsyncClient(timeout=120) as client:
                responses = await asyncio.gather(*(
                    client.post(f"{server.base}/predict?max_objects=5", content=data,
                                headers={"content-type": f"image/{fmt.lower()}"})
                    for _ in range(concurrent)))  # fmt: skip
            return [r.status_code for r in responses]

        t0 = time.perf_counter()
        statuses = asyncio.run(send_all())
        seconds = round(time.perf_counter() - t0, 2)
        time.sleep(12.0)
        results[fmt.lower()] = {
            "bytes": len(data), "statuses": dict(Counter(statuses)), "seconds": seconds,
            "rss_before_mb": before, "rss_peak_mb": peak.stop(),
            "rss_after_mb": rss_mb(server.proc.pid),
        }  # fmt: skip
    return results


def idle_sockets(server, count: int = 300, wait: float = 8.0) -> dict:
    """``count`` connections that never send a byte: how many are still open ``wait`` s on."""
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(count)]
    time.sleep(wait)
    still_open = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            still_open += sock.recv(1) != b""  # b"": closed by the server
        except BlockingIOError:
            still_open += 1  # nothing to read: open
        except OSError:
            pass
        sock.close()
    return {"sockets": count, "after_s": wait, "still_open": still_open}


def run_hostile(model: str, png: bytes, duration: float, many: int) -> dict:
    """Every careless-client scenario against one server with the default settings."""
    server = ServerProcess(model)
    report: dict = {}
    try:
        server.wait_ready()
        url = f"{server.base}/predict?max_objects={many}"
        bodies = {many: form_body(png, many)}
        asyncio.run(closed_loop(server.base, [many] * 2, bodies, 1.0))  # warm-up
        at_capacity = asyncio.run(closed_loop(server.base, [many] * 64, bodies, duration))[many]
        at_capacity.pop("latencies")
        report["capacity_64_clients"] = at_capacity
        for honour in (True, False):
            name = f"retry_128_clients_{'honour' if honour else 'ignore'}"
            report[name] = asyncio.run(retrying_clients(url, png, 128, duration, honour))
        report["leavers"] = asyncio.run(leavers(server.base, png, duration, 1000))
        report["stalled_uploads"] = stalled_uploads(server)
        report["big_images"] = big_images(server)
        report["idle_sockets"] = idle_sockets(server)
    finally:
        server.stop()
    for name, result in report.items():
        print(name, json.dumps(result), flush=True)
    return report


def table(rows: list[dict]) -> str:
    """The closed-loop results as a markdown table: a row per load and server (and, for a
    mixed load, a row per kind of request beneath)."""
    lines = [
        "| load | server | req/s | objects/s | p50 ms | p99 ms | RSS MB | % of bound "
        "| server CPU | CPU ms / req | load gen. CPU | mean batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (_load_order(r["load"]), r["server"])):
        lines.append(
            f"| {r['load']} | {r['server']} | {r['throughput_rps']} | {r['objects_per_s']} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['rss_peak_mb']} | {r['bound_pct']}% "
            f"(of {r['bound_rps']}/s) | {r['server_cpu_cores']} | "
            f"{r['server_cpu_ms_per_request']} | {r['loadgen_cpu_cores']} | "
            f"{r['mean_batch'] if r['mean_batch'] is not None else ''} |"
        )
        if len(r["kinds"]) > 1:
            for n, k in sorted(r["kinds"].items()):
                lines.append(
                    f"| ... {n}-object requests | {r['server']} | {k['throughput_rps']} | "
                    f"{k['objects_per_s']} | {k['p50_ms']} | {k['p99_ms']} | | | | | | |"
                )
    return "\n".join(lines)


def _load_order(load: str) -> tuple:
    """Loads in the order they run: by objects, then clients; the mixed load last."""
    if load.startswith("mixed"):
        return (1, 0, 0)
    clients, objects = (int(x) for x in load.split(" x "))
    return (0, objects, clients)


def machine() -> dict:
    """The facts of the machine a figure was measured on."""
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def hostile_main(args: argparse.Namespace) -> None:
    """``--hostile-only``: the careless-client scenarios alone."""
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(
            export_bench_model(Path(tmp) / "model", args.image_size, args.preset)
        )
        hostile = run_hostile(model, scene_png(args.image_size), args.duration, args.many)
    report = {"machine": machine(), "model": args.model or f"random-init {args.preset}",
              "hostile": hostile}  # fmt: skip
    if args.out:
        atomic_write_json(args.out, report)
    print(f"machine: {report['machine']}; model: {report['model']}")


def compare(rows: list[dict], against: str) -> list[str]:
    """seqops (batching on) against another server, load by load: throughput and objects/s
    as ratios, p99 side by side."""
    ours = {r["load"]: r for r in rows if r["server"] == "seqops"}
    lines = []
    for other in (r for r in rows if r["server"] == against and r["throughput_rps"]):
        r = ours.get(other["load"])
        if r is None or not other["objects_per_s"]:
            continue
        lines.append(
            f"seqops / {against}, {other['load']}:"
            f" req/s {r['throughput_rps'] / other['throughput_rps']:.2f}x,"
            f" objects/s {r['objects_per_s'] / other['objects_per_s']:.2f}x,"
            f" p99 {r['p99_ms']} vs {other['p99_ms']} ms,"
            f" server CPU a request {r['server_cpu_ms_per_request']}"
            f" vs {other['server_cpu_ms_per_request']} ms"
        )
    return lines


def _server_name(name: str) -> str:
    """A --servers entry: a name of SERVERS, optionally ``:`` and arguments."""
    if name.partition(":")[0] not in SERVERS:
        raise argparse.ArgumentTypeError(f"{name}: not one of {sorted(SERVERS)}")
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a random-init export)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--few", type=int, default=5, help="objects per image, 'few'")
    parser.add_argument("--many", type=int, default=50, help="objects per image, 'many'")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per load and server (median)")
    parser.add_argument(
        "--servers", nargs="+", default=["seqops", "seqops-off"], type=_server_name,
        help="servers to load: seqops (batching on), seqops-off, seqops-2w (2 workers x 1"
        " thread), seqops-1t (1 thread), seqops-h11 (h11 + asyncio), seqops-granian (granian),"
        " seqops-before (--before),"
        " and the peers plain,"
        " litserve (benchmarks/peers/); NAME:ARG,ARG adds arguments to its command line"
        " (seqops:--encode-share=1)",
    )  # fmt: skip
    parser.add_argument("--peer", nargs="+", default=[], choices=sorted(set(SERVERS) - {"seqops"}),
                        help="servers added to --servers")  # fmt: skip
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="start every server at once and take them in turn load by load"
        " (pairs seconds apart; the idle servers hold their memory meanwhile)",
    )
    parser.add_argument("--no-overload", action="store_true", help="skip the open-loop overload")
    parser.add_argument("--before", type=Path, help="older code for the server seqops-before")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--hostile", action="store_true", help="the careless-client scenarios")
    parser.add_argument("--hostile-only", action="store_true", help="only those")
    args = parser.parse_args()
    args.servers += [p for p in args.peer if p not in args.servers]
    if args.before:
        os.environ[BEFORE_ENV] = str(args.before.resolve())
    if args.hostile_only:
        return hostile_main(args)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(
            export_bench_model(Path(tmp) / "model", args.image_size, args.preset)
        )
        png = scene_png(args.image_size)
        rows = run_closed_loops(model, png, args)
        overload = None
        many = [r for r in rows if r["server"] == "seqops" and r["load"].endswith(f"x {args.many}")]
        if many and not args.no_overload:
            top = max(r["throughput_rps"] for r in many)
            overload = run_overload(model, png, 2 * top, args.many, args.duration)
        hostile = run_hostile(model, png, args.duration, args.many) if args.hostile else None
    report = {
        "machine": machine(),
        "model": args.model or f"random-init {args.preset} @ {args.image_size} px",
        "closed_loop": rows,
        "overload": overload,
        "hostile": hostile,
    }
    print(table(rows))
    if overload:
        print(json.dumps(overload, indent=2))
    for other in args.servers:
        if other != "seqops":
            print("\n".join(compare(rows, other)))
    if args.out:
        atomic_write_json(args.out, report)
    print(f"machine: {report['machine']}; model: {report['model']}")
    print("the load generator is this process, on the same cores (its CPU: load gen. CPU)")


if __name__ == "__main__":
    main()
