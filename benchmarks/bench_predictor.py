"""Per-image latency of the iterative predictor on CPU, against two baselines.

For images with N = 0, 1, 5, 20 and 50 objects (a loop of one encoding plus N + 1 steps:
N objects, then the step that says done), on random-init networks of the given presets at
the given input size (default: tiny and base at 384), in the same run:

- ``onnx``: ``seqops.predictor`` (encoder once, light step per object, onnxruntime);
- ``naive``: the whole network (encode + step, one ONNX graph) per object, onnxruntime;
- ``torch``: the same encode-once loop in torch eager mode.

It also measures the Python loop's overhead: the predictor's wall time over the sum of its
``session.run`` times (goal: at most +20%), and a request's whole CPU from the encoded
PNG bytes (decode and normalisation included) against the CPU inside onnxruntime (goal:
at least 80% inside). The number of steps is forced: the done head's
bias is set to -20 (never done) and ``max_objects = N + 1``; the N = 0 image uses +20.

    python benchmarks/bench_predictor.py [--presets tiny base] [--size 384] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

from seqops import imaging
from seqops.config import load_params
from seqops.export import GraphIO, build_metadata, export_graph, export_model
from seqops.io import atomic_write_json
from seqops.model import ModelSpec, SeqCounter
from seqops.predictor import Predictor, session_options
from seqops.testing import make_untrained_model

OBJECTS = (0, 1, 5, 20, 50)


class ForwardGraph(nn.Module):
    """The whole network per step (encode + step): the naive baseline."""

    def __init__(self, model: SeqCounter) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, marks: torch.Tensor):
        out = self.model(image, marks)
        return out.xy, torch.sigmoid(out.done_logit)


class TimedSession:
    """An onnxruntime session that adds up the wall and CPU time spent in ``run``."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.seconds = self.cpu_seconds = 0.0

    def run(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.session.run(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        return out

    def __getattr__(self, name):
        return getattr(self.session, name)


def export_models(spec: ModelSpec, root: Path) -> dict[str, Path]:
    """Export a never-done and an at-once-done model, and the never-done one as one graph."""
    dirs = {}
    params = load_params()  # the project's params.yaml (run from the repository root)
    for name, bias in (("never", -20.0), ("done", 20.0)):
        model = make_untrained_model(spec, seed=0, done_bias=bias)
        metadata = build_metadata(
            spec, params.model_dump(mode="json"), done_threshold=params.evaluate.done_threshold,
            model_version=f"bench-{name}", run_id=None,
        )  # fmt: skip
        dirs[name] = root / f"{spec.preset}-{name}"
        export_model(
            model, dirs[name], metadata, params.export, extra_info={"model_spec": spec.to_dict()}
        )
        if name == "never":
            image = torch.zeros(2, 3, spec.image_size, spec.image_size)
            marks = torch.zeros(2, 1, spec.grid, spec.grid)
            dirs["forward"] = root / f"{spec.preset}-forward.onnx"
            export_graph(
                ForwardGraph(model), (image, marks), GraphIO(("image", "marks"), ("xy", "done")),
                dirs["forward"], opset=params.export.opset, metadata=metadata,
            )  # fmt: skip
    return dirs


def time_predictor(predictor: Predictor, prepared, n: int, repeats: int) -> dict[str, float]:
    """Median wall time of ``predict`` and the Python loop's overhead over its session runs.

    The overhead is measured twice, as the median over repeats of (total - runs) / runs: in
    wall time, and in process CPU time, which a machine shared with other work does not
    inflate (time spent preempted is not CPU time; idle onnxruntime threads do not spin).
    """
    encoder, step = TimedSession(predictor._encoder), TimedSession(predictor._step)
    predictor._encoder, predictor._step = encoder, step
    walls, runs, wall_over, cpu_over = [], [], [], []
    try:
        for _ in range(repeats):
            for s in (encoder, step):
                s.seconds = s.cpu_seconds = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            result = predictor.predict([prepared], max_objects=n + 1)[0]
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            run, run_cpu = encoder.seconds + step.seconds, encoder.cpu_seconds + step.cpu_seconds
            walls.append(wall)
            runs.append(run)
            wall_over.append(wall / run - 1.0)
            cpu_over.append(cpu / run_cpu - 1.0)
    finally:
        predictor._encoder, predictor._step = encoder.session, step.session
    steps = len(result.done_probs)
    assert steps == n + 1, f"expected {n + 1} steps, ran {steps}"
    return {
        "ms": 1e3 * statistics.median(walls),
        "session_ms": 1e3 * statistics.median(runs),
        "overhead": statistics.median(wall_over),
        "overhead_cpu": statistics.median(cpu_over),
    }


def time_request(predictor: Predictor, png: bytes, n: int, repeats: int) -> dict[str, float]:
    """A request's CPU from encoded PNG bytes to the answer, and how much of it is inside
    onnxruntime (the encoder's and the steps' ``session.run``): the part no Python work can
    shrink. Process CPU time, medians over repeats (one thread: CPU = the request's cost)."""
    encoder, step = TimedSession(predictor._encoder), TimedSession(predictor._step)
    predictor._encoder, predictor._step = encoder, step
    totals, inside, prepares = [], [], []
    try:
        for _ in range(repeats):
            encoder.cpu_seconds = step.cpu_seconds = 0.0
            c0 = time.process_time()
            predictor.prepare(png)
            prepares.append(time.process_time() - c0)
            c0 = time.process_time()
            predictor.predict([png], max_objects=n + 1)
            totals.append(time.process_time() - c0)
            inside.append(encoder.cpu_seconds + step.cpu_seconds)
    finally:
        predictor._encoder, predictor._step = encoder.session, step.session
    total = statistics.median(totals)
    return {
        "request_cpu_ms": 1e3 * total,
        "request_prepare_cpu_ms": 1e3 * statistics.median(prepares),
        "request_onnx_cpu_ms": 1e3 * statistics.median(inside),
        "request_onnx_share": statistics.median(i / t for i, t in zip(inside, totals, strict=True)),
    }


def photo_png(size: int) -> bytes:
    """A PNG at model size that compresses like a photo (smooth shapes plus noise), not like
    random bytes (which PNG cannot compress, so decoding would be unrealistically cheap)."""
    rng = np.random.default_rng(1)
    coarse = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.int16)
    noisy = np.clip(smooth + rng.integers(-6, 7, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "PNG")
    return buffer.getvalue()


def time_naive(session: ort.InferenceSession, pixels, spec, n: int, repeats: int) -> float:
    """Median ms of a loop running the whole network (one graph) for each of n + 1 steps."""
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        marks = np.zeros((1, 1, spec.grid, spec.grid), np.float32)
        for _ in range(n + 1):
            xy, done = session.run(["xy", "done"], {"image": pixels, "marks": marks})
            if done[0] > 0.5 and n > 0:  # the loop's test (never true here: bias -20)
                break
            imaging.add_mark(marks[0, 0], xy[0], spec.mark_sigma)
        walls.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(walls)


def time_torch(model: SeqCounter, pixels, spec, n: int, repeats: int) -> float:
    """Median ms of the encode-once loop in torch eager mode."""
    walls = []
    image = torch.from_numpy(pixels)
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            features = model.encode(image)
            marks = np.zeros((1, 1, spec.grid, spec.grid), np.float32)
            for _ in range(n + 1):
                out = model.step(features, torch.from_numpy(marks))
                if torch.sigmoid(out.done_logit).item() > 0.5:  # never true here (bias -20)
                    break
                imaging.add_mark(marks[0, 0], out.xy[0].numpy(), spec.mark_sigma)
            walls.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(walls[1:])


def bench_preset(preset: str, size: int, threads: int, repeats: int, root: Path) -> list[dict]:
    spec = ModelSpec.from_preset(preset, size, False)
    dirs = export_models(spec, root)
    never = Predictor(dirs["never"], device="cpu", threads=threads)
    done = Predictor(dirs["done"], device="cpu", threads=threads)
    naive = ort.InferenceSession(
        str(dirs["forward"]), session_options(threads, False), providers=["CPUExecutionProvider"]
    )
    torch.set_num_threads(threads)
    model = make_untrained_model(spec, seed=0, done_bias=-20.0)
    rng = np.random.default_rng(0)
    pixels_u8 = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    prepared = never.prepare(Image.fromarray(pixels_u8))
    pixels = prepared.pixels[None]
    naive.run(None, {"image": pixels, "marks": np.zeros((1, 1, spec.grid, spec.grid), np.float32)})
    png = photo_png(size)
    rows = []
    for n in OBJECTS:
        ours = time_predictor(done if n == 0 else never, prepared, n, repeats)
        request = time_request(done if n == 0 else never, png, n, repeats)
        naive_ms = time_naive(naive, pixels, spec, n, max(1, repeats // (1 + n // 10)))
        torch_ms = time_torch(model, pixels, spec, n, max(1, repeats // 2))
        row = {
            "preset": preset,
            "image_size": size,
            "objects": n,
            "steps": n + 1,
            "onnx_ms": ours["ms"],
            "onnx_session_ms": ours["session_ms"],
            "python_overhead": ours["overhead"],
            "python_overhead_cpu": ours["overhead_cpu"],
            "naive_ms": naive_ms,
            "torch_ms": torch_ms,
            "speedup_vs_naive": naive_ms / ours["ms"],
            "speedup_vs_torch": torch_ms / ours["ms"],
            **request,
        }
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (
    "| preset | objects | onnx ms | session ms | loop overhead (wall / cpu) | naive ms "
    "| torch ms | x naive | x torch | request CPU ms (prepare) | in onnxruntime |"
    "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(r: dict) -> str:
    return (
        f"| {r['preset']}@{r['image_size']} | {r['objects']} | {r['onnx_ms']:.2f} "
        f"| {r['onnx_session_ms']:.2f} | {100 * r['python_overhead']:+.1f}% / "
        f"{100 * r['python_overhead_cpu']:+.1f}% "
        f"| {r['naive_ms']:.2f} | {r['torch_ms']:.2f} | {r['speedup_vs_naive']:.1f} "
        f"| {r['speedup_vs_torch']:.1f} | {r['request_cpu_ms']:.2f} "
        f"({r['request_prepare_cpu_ms']:.2f}) | {r['request_onnx_share']:.0%} |"
    )


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    info = {**machine(), "threads": args.threads, "repeats": args.repeats}
    print(json.dumps(info))
    print(HEADER)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-predictor-") as root:
        for preset in args.presets:
            rows += bench_preset(preset, args.size, args.threads, args.repeats, Path(root))
    for r in rows:
        if r["objects"] == 20:
            goal = "ok" if r["speedup_vs_naive"] >= 5 else "MISSED"
            print(f"{r['preset']}: {r['speedup_vs_naive']:.1f}x faster than naive at 20 ({goal})")
    worst = max(r["python_overhead"] for r in rows)
    worst_cpu = max(r["python_overhead_cpu"] for r in rows)
    print(
        f"worst Python loop overhead: {100 * worst:+.1f}% wall, {100 * worst_cpu:+.1f}% CPU"
        " (goal <= +20%)"
    )
    share = min(r["request_onnx_share"] for r in rows)
    print(f"least share of a request's CPU inside onnxruntime: {share:.0%} (goal >= 80%)")
    if args.out:
        atomic_write_json(args.out, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
