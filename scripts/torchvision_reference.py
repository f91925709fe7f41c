"""Write torchvision's reference for ``seqops.backbones``: keys, shapes and feature maps.

Run inside an environment with torchvision (seqops does not depend on it)::

    python3.11 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
    /tmp/tvenv/bin/python scripts/torchvision_reference.py tests/fixtures/torchvision_reference.json

Each torchvision architecture is filled by :func:`fill_deterministic` (a formula, no RNG,
so both environments reproduce it bit for bit) and run in float64 on
:func:`reference_input`; its stride-8/16/32 feature maps are reduced by :func:`summarise`.
``tests/test_backbones.py`` rebuilds seqops's modules, fills and runs them the same way and
compares. This file needs only torch (the test imports it), and torchvision in ``main``.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from pathlib import Path

import torch
from torch import Tensor

INPUT_SIZE = 64
# Feature channels summarised per map (evenly spaced) and fixed positions read out.
SUMMARY_CHANNELS = 48


def fill_deterministic(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every floating tensor of ``state`` from a formula of its key (a sine over its
    elements), scaled so activations neither vanish nor explode through 50 layers; BN
    variances positive. Integer tensors (``num_batches_tracked``) become 0."""
    filled = {}
    for key, value in state.items():
        if not value.is_floating_point():
            filled[key] = torch.zeros_like(value)
            continue
        seed = zlib.crc32(key.encode())
        n = value.numel()
        wave = torch.sin(
            torch.arange(n, dtype=torch.float64) * (0.1 + (seed % 1000) / 997.0) + seed % 7
        )
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "running_var":
            values = 1.0 + 0.5 * (wave + 1.0)
        elif leaf == "running_mean" or leaf == "bias":
            values = 0.1 * wave
        elif value.dim() == 1:  # BatchNorm weight
            values = 1.0 + 0.2 * wave
        else:  # conv / linear weight: variance ~ 1 / fan_in
            fan_in = n // value.shape[0]
            values = wave * math.sqrt(2.0 / fan_in)
        filled[key] = values.reshape(value.shape).to(torch.float64)
    return filled


def reference_input() -> Tensor:
    """``[1, 3, 64, 64]`` float64, a formula."""
    n = 3 * INPUT_SIZE * INPUT_SIZE
    x = torch.sin(torch.arange(n, dtype=torch.float64) * 0.37) * 1.5
    return x.reshape(1, 3, INPUT_SIZE, INPUT_SIZE)


def summarise(features: Tensor) -> dict:
    """A map ``[1, C, h, w]`` as its shape, the means of evenly spaced channels and the
    values at a few fixed (channel, y, x) positions."""
    c, h, w = features.shape[1:]
    channels = torch.linspace(0, c - 1, min(c, SUMMARY_CHANNELS)).round().long()
    means = features[0].mean(dim=(1, 2))[channels]
    points = [(i * 7 % c, i * 3 % h, i * 5 % w) for i in range(16)]
    return {
        "shape": [c, h, w],
        "channel_means": means.tolist(),
        "points": [features[0, ci, yi, xi].item() for ci, yi, xi in points],
    }


def _torchvision_features(name: str, model: torch.nn.Module, x: Tensor) -> list[Tensor]:
    """Stride 8, 16, 32 maps through torchvision's own modules."""
    if name.startswith("resnet"):
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        c8 = model.layer2(model.layer1(x))
        c16 = model.layer3(c8)
        return [c8, c16, model.layer4(c16)]
    ends = (3, 5, 7) if name.startswith("convnext") else (6, 12, 16)
    taps = []
    for i, layer in enumerate(model.features):
        x = layer(x)
        if i in ends:
            taps.append(x)
    return taps


def main() -> None:
    import torchvision.models as tvm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    reference = {"torch": torch.__version__, "input_size": INPUT_SIZE, "backbones": {}}
    for name in ("resnet18", "resnet50", "mobilenet_v3_large", "convnext_tiny"):
        model = getattr(tvm, name)(weights=None).double().eval()
        state = model.state_dict()
        model.load_state_dict(fill_deterministic(state))
        with torch.no_grad():
            maps = _torchvision_features(name, model, reference_input())
        reference["backbones"][name] = {
            "keys": [[k, list(v.shape)] for k, v in state.items()],
            "features": [summarise(m) for m in maps],
        }
    reference["torchvision"] = __import__("torchvision").__version__
    args.out.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
