"""Cost of an encoding against a step, per preset and head, on the CPU.

Measures (median over repeats, after warm-up) the milliseconds of ``encode`` and of one
``step`` at batch 1 and 8, their ratio (the aim: a step <= 10% of an encoding), counted
FLOPs (MACs = FLOPs / 2) and parameters, and what a whole inference of N objects costs
encoded once (encode + N steps) against a full pass per object (the research's way).
With ``--onnx`` it also times the exported graphs in onnxruntime (the serving path, where
BatchNorm is folded into the convolutions).

    .venv/bin/python benchmarks/bench_model.py                 # torch eager, both presets
    .venv/bin/python benchmarks/bench_model.py --onnx --out bench_model.json
    .venv/bin/python benchmarks/bench_model.py --threads 1 --clock cpu   # on a busy machine
    .venv/bin/python benchmarks/bench_model.py --heads heatmap --backbones seqops resnet18 \
        resnet50 mobilenet_v3_large --onnx      # the ImageNet backbones (model.backbone)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from seqops.backbones import BACKBONES
from seqops.config import load_params
from seqops.contract import ENCODER_FILE, STEP_FILE
from seqops.export import export_graphs
from seqops.model import ORDER_PRIORS, PRESETS, ModelSpec, SeqCounter


def time_pair_ms(
    first: Callable[[], object],
    second: Callable[[], object],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    inner: int = 4,
    warmup: int = 10,
) -> tuple[float, float, float]:
    """Interleaved timing of two functions: medians (ms) and the median per-round ratio.

    Rounds alternate ``first`` and ``inner`` calls of ``second``, so a load change on the
    shared CPU hits both alike and their ratio stays meaningful.
    """
    for _ in range(warmup):  # oneDNN/onnxruntime build their kernels on the first calls
        first()
        second()
    a_times, b_times, ratios = [], [], []
    for _ in range(repeats):
        start = clock()
        first()
        middle = clock()
        for _ in range(inner):
            second()
        end = clock()
        a_times.append(middle - start)
        b_times.append((end - middle) / inner)
        ratios.append(b_times[-1] / a_times[-1])
    return (
        statistics.median(a_times) * 1e3,
        statistics.median(b_times) * 1e3,
        statistics.median(ratios),
    )


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the convolutions and matrix products ``fn`` runs (2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _inputs(spec: ModelSpec, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    images = torch.randn(batch, 3, spec.image_size, spec.image_size)
    marks = torch.rand(batch, 1, spec.grid, spec.grid)
    mask = torch.zeros(batch, 1, spec.grid, spec.grid) if spec.exemplars else None
    if mask is not None:
        mask[:, :, 2:5, 2:5] = 1.0
    return images, marks, mask


def _onnx_sessions(model: SeqCounter) -> tuple:
    """The encoder and step sessions of ``model`` exported by ``seqops.export`` (the graphs
    that ship: dynamic batch, so exported once per spec)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        opset = load_params(Path(__file__).resolve().parents[1] / "params.yaml").export.opset
        export_graphs(model, Path(tmp), opset, metadata={})
        return tuple(
            ort.InferenceSession(str(Path(tmp) / name), options, providers=["CPUExecutionProvider"])
            for name in (ENCODER_FILE, STEP_FILE)
        )


def _time_onnx(
    model: SeqCounter, sessions: tuple, batch: int, repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    encoder, stepper = sessions
    images, marks, mask = _inputs(model.spec, batch)
    enc_args = (images,) if mask is None else (images, mask)
    features = model.encode(*enc_args)
    feeds_enc = {i.name: a.numpy() for i, a in zip(encoder.get_inputs(), enc_args, strict=True)}
    step_args = (features, marks)
    feeds_step = {i.name: a.numpy() for i, a in zip(stepper.get_inputs(), step_args, strict=True)}
    encode_ms, step_ms, ratio = time_pair_ms(
        lambda: encoder.run(None, feeds_enc), lambda: stepper.run(None, feeds_step), repeats, clock
    )
    return {"onnx_encode_ms": encode_ms, "onnx_step_ms": step_ms, "onnx_ratio": ratio}


def bench_spec(
    spec: ModelSpec,
    batches: list[int],
    repeats: int,
    onnx: bool,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """One row per batch size for ``spec``."""
    torch.manual_seed(0)
    model = SeqCounter(spec).eval()
    images, marks, mask = _inputs(spec, 1)
    with torch.no_grad():
        features = model.encode(images, mask)
    encode_flops = count_flops(lambda: model.encode(images, mask))
    step_flops = count_flops(lambda: model.step(features, marks))
    base = {
        "backbone": spec.backbone,
        "preset": spec.preset,
        "head": spec.head,
        "order_prior": spec.order_prior,
        "exemplars": spec.exemplars,
        "image_size": spec.image_size,
        "grid": spec.grid,
        "encode_mmacs": encode_flops / 2e6,
        "step_mmacs": step_flops / 2e6,
        "macs_ratio": step_flops / encode_flops,
        "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
        "step_params": sum(p.numel() for p in model.stepper.parameters()),
    }
    # One pass at the largest batch first: glibc raises its mmap threshold after freeing big
    # blocks, so later (smaller) passes stop paying page faults; without this the first
    # configuration timed looks ~50% slower than the same one timed again.
    with torch.inference_mode():
        model.encode(*_inputs(spec, max(batches))[::2])
    rows = []
    sessions = _onnx_sessions(model) if onnx else None
    for batch in batches:
        images, marks, mask = _inputs(spec, batch)
        with torch.inference_mode():
            features = model.encode(images, mask)
            encode_ms, step_ms, ratio = time_pair_ms(
                lambda i=images, e=mask: model.encode(i, e),
                lambda f=features, m=marks: model.step(f, m),
                repeats,
                clock,
            )
        row = {**base, "batch": batch, "encode_ms": encode_ms, "step_ms": step_ms, "ratio": ratio}
        # 30 objects: encode once + 31 steps (the last says done) vs 31 full passes.
        row["speedup_30_objects"] = 31 * (encode_ms + step_ms) / (encode_ms + 31 * step_ms)
        if sessions:
            with torch.no_grad():
                row.update(_time_onnx(model, sessions, batch, repeats, clock))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    onnx = "onnx_ratio" in rows[0]
    head = "| backbone | preset | head | batch | encode ms | step ms | step/encode | MACs ratio |"
    head += " 30-object speed-up |"
    head += " onnx encode ms | onnx step ms | onnx step/encode |" if onnx else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r['backbone']} | {r['preset']} | {r['head']} | {r['batch']} | "
            f"{r['encode_ms']:.2f} | "
            f"{r['step_ms']:.3f} | {r['ratio']:.1%} | {r['macs_ratio']:.1%} | "
            f"{r['speedup_30_objects']:.1f}x |"
        )
        if onnx:
            line += (
                f" {r['onnx_encode_ms']:.2f} | {r['onnx_step_ms']:.3f} | {r['onnx_ratio']:.1%} |"
            )
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS, reverse=True))
    parser.add_argument("--heads", nargs="+", default=["heatmap", "pooled"])
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, robust when other jobs share the cores (use --threads 1)",
    )
    parser.add_argument("--exemplars", action="store_true")
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["seqops"],
        choices=["seqops", *BACKBONES],
        help="model.backbone values (seqops: the from-scratch encoder)",
    )
    parser.add_argument(
        "--order-prior",
        choices=list(ORDER_PRIORS),
        default="scan",
        help="the step's order prior (params model.order_prior)",
    )
    parser.add_argument("--onnx", action="store_true", help="also time onnxruntime (CPU)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = []
    for backbone in args.backbones:
        for preset in args.presets:
            for head in args.heads:
                spec = ModelSpec.from_preset(
                    preset, args.image_size, args.exemplars, head=head,
                    order_prior=args.order_prior, backbone=backbone,
                )  # fmt: skip
                rows.extend(bench_spec(spec, args.batches, args.repeats, args.onnx, clock))
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} threads, {args.clock} clock, "
        f"{args.image_size}px, order prior {args.order_prior}"
    )
    for r in rows:
        if r["batch"] == args.batches[0]:
            print(
                f"{r['backbone']}/{r['preset']}/{r['head']}: encode {r['encode_mmacs']:.0f} MMACs "
                f"({r['encoder_params'] / 1e3:.0f}k params), step {r['step_mmacs']:.1f} MMACs "
                f"({r['step_params'] / 1e3:.1f}k params)"
            )
    print(format_table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
