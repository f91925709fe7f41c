"""Training throughput: many steps per encoding against one step per full forward pass.

seqops trains ``K = sampling.steps_per_image`` steps (different ``k``, different marks)
against one encoding of each image: a batch of ``B`` images holds ``B * K`` examples but
encodes only ``B`` images. The research ran the whole network once per example, so the same
``B * K`` examples cost ``B * K`` encodings. Both ways here train the same model on the same
batches (drawn by the real ``StepDataset`` from freshly generated synthetic scenes) with the
same losses, optimizer and clipping; rounds alternate the two ways so that load changes on a
shared CPU hit both alike. Reported: training examples per second (forward, backward and
optimizer step; data loading is excluded, it is the same per example for both) and their
ratio, median over rounds.

    .venv/bin/python benchmarks/bench_train.py                          # tiny and base, K = 8
    .venv/bin/python benchmarks/bench_train.py --presets base --steps-per-image 4 8 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from seqops.config import load_params
from seqops.data.prepare import run_prepare
from seqops.model import SeqCounter, StepOutput, spec_from_params
from seqops.training.data import StepDataset, collate_steps
from seqops.training.train import ManyStepNet
from seqops.training.validation import compute_step_losses, reduce_losses


class OneStepPerForward(ManyStepNet):
    """The research's way: every example runs the whole network on its own image."""

    def forward(
        self, images: Tensor, marks: Tensor, step_image: Tensor, exemplar_mask: Tensor | None
    ) -> StepOutput:
        mask = None if exemplar_mask is None else exemplar_mask.index_select(0, step_image)
        return self.model(images.index_select(0, step_image), marks, mask)


def make_batches(params, data_dir: Path, spec, num_batches: int) -> list[dict[str, Tensor]]:
    ds = StepDataset(
        data_dir,
        "train",
        spec=spec,
        sampling=params.sampling,
        train=params.train,
        augment=True,
        seed=0,
    )
    b = params.train.batch_size
    return [
        collate_steps([ds[(i * b + j) % len(ds)] for j in range(b)]) for i in range(num_batches)
    ]


def train_seconds(net: nn.Module, model: SeqCounter, batch, optimizer, params) -> float:
    """Wall seconds of one training iteration (forward, losses, backward, clip, step)."""
    start = time.perf_counter()
    out = net(batch["images"], batch["marks"], batch["step_image"], batch.get("exemplar_mask"))
    loss = reduce_losses(compute_step_losses(out, batch, params.train), params.train)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), params.train.max_norm)
    optimizer.step()
    return time.perf_counter() - start


def measure(params, data_dir: Path, rounds: int, warmup: int) -> dict:
    spec = spec_from_params(params)
    torch.manual_seed(0)
    model = SeqCounter(spec)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay
    )
    ways = {"many_steps": ManyStepNet(model), "one_step": OneStepPerForward(model)}
    batches = make_batches(params, data_dir, spec, max(rounds, 1))
    for i in range(warmup):
        for net in ways.values():
            train_seconds(net, model, batches[i % len(batches)], optimizer, params)
    rates: dict[str, list[float]] = {name: [] for name in ways}
    ratios = []
    for i in range(rounds):
        batch = batches[i % len(batches)]
        examples = len(batch["done"])
        round_rates = {
            name: examples / train_seconds(net, model, batch, optimizer, params)
            for name, net in ways.items()
        }
        for name, rate in round_rates.items():
            rates[name].append(rate)
        ratios.append(round_rates["many_steps"] / round_rates["one_step"])
    return {
        "preset": spec.preset,
        "exemplars": spec.exemplars,
        "batch_images": params.train.batch_size,
        "steps_per_image": params.sampling.steps_per_image,
        "examples_per_batch": params.train.batch_size * params.sampling.steps_per_image,
        "many_steps_examples_per_s": statistics.median(rates["many_steps"]),
        "one_step_examples_per_s": statistics.median(rates["one_step"]),
        "ratio": statistics.median(ratios),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--steps-per-image", nargs="+", type=int, default=[8])
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument("--exemplars", action="store_true")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        overrides = [
            "prepare.num_train=64",
            "prepare.num_val=4",
            "prepare.num_test=4",
            f"train.batch_size={args.batch_size}",
            f"model.exemplars={str(args.exemplars).lower()}",
        ]
        run_prepare(load_params(args.params, overrides), data)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"batch {args.batch_size} images"
        )
        print(f"{'preset':<6} {'K':>3} {'many-steps ex/s':>16} {'one-step ex/s':>14} {'ratio':>6}")
        for preset in args.presets:
            for k in args.steps_per_image:
                params = load_params(
                    args.params,
                    [*overrides, f"model.preset={preset}", f"sampling.steps_per_image={k}"],
                )
                row = measure(params, data, args.rounds, args.warmup)
                rows.append(row)
                print(
                    f"{preset:<6} {k:>3} {row['many_steps_examples_per_s']:>16.1f} "
                    f"{row['one_step_examples_per_s']:>14.1f} {row['ratio']:>5.1f}x",
                    flush=True,
                )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
