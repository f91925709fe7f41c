"""Random-init networks with chosen behaviour, for tests, benchmarks and smoke runs.

Not used by any stage: a fresh network's near-uniform heat map puts every point at the
centre and its done head hovers at 0.5, so tests and benchmarks that need a loop of a known
length (or an image-dependent one) shape the heads' init here.
"""

from __future__ import annotations

import torch
from torch import nn

from seqops.model import ModelSpec, SeqCounter

# Init scales of make_untrained_model's heads: a sharp heat map and a done value that moves
# with the marks, so random networks trace varied, image-dependent loops in tests/benchmarks.
HEAT_STD = 20.0
DONE_STD = 5.0


def make_untrained_model(
    spec: ModelSpec, seed: int = 0, done_bias: float | None = None, peaked: bool = True
) -> SeqCounter:
    """A random-init network with chosen behaviour, for tests, benchmarks and smoke runs.

    Args:
        done_bias: replaces the done head's final bias: +20 says done at once, -20 never.
        peaked: widen the heat head's and the done head's init, so the heat map has a
            clear peak (a fresh network's near-uniform map puts every point at the centre)
            and done varies from step to step.
    """
    torch.manual_seed(seed)
    model = SeqCounter(spec)
    with torch.no_grad():
        if peaked:
            nn.init.normal_(model.stepper.heat.weight, std=HEAT_STD)
            nn.init.normal_(model.stepper.done[-1].weight, std=DONE_STD)
        if done_bias is not None:
            model.stepper.done[-1].weight.zero_()
            model.stepper.done[-1].bias.fill_(done_bias)
    return model.eval()
