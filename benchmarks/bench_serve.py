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
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
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


class ServerProcess:
    """`seqops serve` on a free loopback port (stopped with SIGTERM)."""

    def __init__(self, model: str, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).with_name("seqops")
        command = [str(script), "serve", "--model", model, "--port", str(self.port),
                   "--device", "cpu", "--no-access-log", *args]  # fmt: skip
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        stop_at = time.monotonic() + timeout
        while time.monotonic() < stop_at and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.log.seek(0)
        raise RuntimeError(f"server not ready:\n{self.log.read().decode()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
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


async def closed_loop(urls: list[str], png: bytes, duration: float) -> dict[str, dict]:
    """One client per entry of ``urls``, each back to back for ``duration`` seconds;
    results per distinct URL (so a mixed load reports each kind of request apart)."""
    latencies: dict[str, list[float]] = {url: [] for url in urls}
    statuses: dict[str, Counter] = {url: Counter() for url in urls}
    limits = httpx.Limits(max_connections=len(urls) + 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def client_loop(url: str) -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                response = await client.post(url, content=png, headers=_PNG)
                statuses[url][response.status_code] += 1
                if response.status_code == 200:
                    latencies[url].append(time.perf_counter() - t0)

        await asyncio.gather(*(client_loop(url) for url in urls))
        elapsed = time.perf_counter() - start
    return {url: summarize(latencies[url], statuses[url], elapsed) for url in latencies}


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


def run_closed_loops(model: str, png: bytes, args: argparse.Namespace) -> list[dict]:
    """Each load against a server with batching on and one with it off, back to back (the
    shared machine's load changes slowly, so neighbours in time compare fairly)."""
    servers = {True: ServerProcess(model), False: ServerProcess(model, "--no-batching")}
    rows = []
    try:
        for server in servers.values():
            server.wait_ready()
        loads = [(f"{n} objects", [n] * c) for n in (args.few, args.many) for c in args.concurrency]
        half = max(args.concurrency) // 2
        loads.append(("mixed", [args.few] * half + [args.many] * half))
        for server in servers.values():  # warm-up
            asyncio.run(closed_loop([f"{server.base}/predict?max_objects=5"] * 2, png, 1.0))
        for round_ in range(args.rounds):  # alternate the order: no mode always goes first
            order = list(servers.items())[:: 1 if round_ % 2 == 0 else -1]
            for name, counts in loads:
                for batching, server in order:
                    rows += measure(server, batching, name, counts, png, args.duration)
    finally:
        for server in servers.values():
            server.stop()
    return aggregate(rows)


def measure(server, batching: bool, name: str, counts: list[int], png: bytes, duration: float):
    """One closed-loop run; a row per kind of request, with the server's mean batch."""
    urls = [f"{server.base}/predict?max_objects={n}" for n in counts]
    before = scrape(server.base)
    results = asyncio.run(closed_loop(urls, png, duration))
    after = scrape(server.base)
    steps = after["seqops_step_seconds_count"] - before["seqops_step_seconds_count"]
    images = after["seqops_batch_size_sum"] - before["seqops_batch_size_sum"]
    rows = []
    for url, result in results.items():
        row = {
            "batching": batching,
            "load": name,
            "objects": int(url.rsplit("=", 1)[1]),
            "concurrency": len(urls),
            **result,
            "mean_batch": round(images / steps, 2) if steps else None,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Medians over the rounds of each (mode, load, kind of request)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["batching"], row["load"], row["objects"], row["concurrency"])
        groups.setdefault(key, []).append(row)
    merged = []
    for (batching, load, objects, concurrency), group in groups.items():
        merged.append({
            "batching": batching, "load": load, "objects": objects, "concurrency": concurrency,
            "rounds": len(group),
            **{k: round(statistics.median(r[k] for r in group), 2)
               for k in ("throughput_rps", "p50_ms", "p99_ms", "mean_batch")},
            "failed": sum(r["requests"] - r["ok"] for r in group),
        })  # fmt: skip
    return sorted(
        merged, key=lambda r: (r["load"], r["objects"], r["concurrency"], not r["batching"])
    )


def run_overload(model: str, png: bytes, rate: float, objects: int, duration: float) -> dict:
    server = ServerProcess(model)  # the defaults: max_active 32, max_queue 32
    try:
        server.wait_ready()
        url = f"{server.base}/predict?max_objects={objects}"
        asyncio.run(closed_loop([url, url], png, 1.0))
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
    """Samples a process's RSS every 50 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss_mb(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

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
    peak = PeakRSS(server.proc.pid)
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
        peak = PeakRSS(server.proc.pid)

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
        asyncio.run(closed_loop([url, url], png, 1.0))  # warm-up
        at_capacity = asyncio.run(closed_loop([url] * 64, png, duration))[url]
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
    """The closed-loop results as a markdown table."""
    lines = [
        "| batching | load | clients | objects | req/s | p50 ms | p99 ms | mean batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'on' if r['batching'] else 'off'} | {r['load']} | {r['concurrency']} | "
            f"{r['objects']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['mean_batch']} |"
        )
    return "\n".join(lines)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a random-init export)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--few", type=int, default=5, help="objects per image, 'few'")
    parser.add_argument("--many", type=int, default=50, help="objects per image, 'many'")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per load and mode (median)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--hostile", action="store_true", help="the careless-client scenarios")
    parser.add_argument("--hostile-only", action="store_true", help="only those")
    args = parser.parse_args()
    if args.hostile_only:
        return hostile_main(args)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(
            export_bench_model(Path(tmp) / "model", args.image_size, args.preset)
        )
        png = scene_png(args.image_size)
        rows = run_closed_loops(model, png, args)
        top = max(
            (r for r in rows if r["batching"] and r["load"] == f"{args.many} objects"),
            key=lambda r: r["throughput_rps"],
        )
        overload = run_overload(model, png, 2 * top["throughput_rps"], args.many, args.duration)
        hostile = run_hostile(model, png, args.duration, args.many) if args.hostile else None
    report = {
        "machine": machine(),
        "model": args.model or f"random-init {args.preset} @ {args.image_size} px",
        "closed_loop": rows,
        "overload": overload,
        "hostile": hostile,
    }
    print(table(rows))
    print(json.dumps(overload, indent=2))
    on = {(r["load"], r["objects"], r["concurrency"]): r for r in rows if r["batching"]}
    for off in (r for r in rows if not r["batching"] and r["throughput_rps"]):
        r = on[(off["load"], off["objects"], off["concurrency"])]
        print(
            f"batching on/off, {off['load']} ({off['objects']} objects), {off['concurrency']}"
            f" clients: throughput {r['throughput_rps'] / off['throughput_rps']:.2f}x,"
            f" p50 {r['p50_ms']} vs {off['p50_ms']} ms"
        )
    if args.out:
        atomic_write_json(args.out, report)
    print(f"machine: {report['machine']}; model: {report['model']}")


if __name__ == "__main__":
    main()
