"""Validation: step losses against the chosen target, done scores and the rollout."""

from __future__ import annotations

import pytest
import torch
from conftest import shrink_params

from seqops.model import StepOutput, spec_from_params
from seqops.testing import make_untrained_model
from seqops.training.data import VAL_SEED, StepDataset
from seqops.training.validation import compute_step_losses, reduce_losses, validate


def test_nearest_unmarked_scores_against_the_closest_unmarked_object(tiny_params):
    points = torch.tensor([[[-0.5, -0.5], [0.5, 0.5], [0.0, 0.9]]] * 2)
    batch = {
        "done": torch.tensor([0.0, 1.0]),
        "target_xy": torch.tensor([[0.5, 0.5], [0.0, 0.0]]),  # ordered: object 1 is next
        "points": points,
        "unmarked": torch.tensor([[False, True, True], [False, False, False]]),
    }
    out = StepOutput(
        xy=torch.tensor([[0.05, 0.85], [0.3, 0.3]]),
        done_logit=torch.zeros(2),
        heat_logits=torch.zeros(2, 8, 8),
    )
    nearest = compute_step_losses(out, batch, shrink_params("train.target=nearest_unmarked").train)
    ordered = compute_step_losses(out, batch, tiny_params.train)
    torch.testing.assert_close(nearest.target_xy, torch.tensor([[0.0, 0.9], [0.0, 0.0]]))
    torch.testing.assert_close(ordered.target_xy, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    assert nearest.spatial[0] < 0.02 < ordered.spatial[0]
    assert nearest.live.tolist() == [True, False]
    reduced = reduce_losses(nearest, tiny_params.train)
    assert all(torch.isfinite(v) for v in reduced.values())
    assert reduced["loss_spatial"] == pytest.approx(float(nearest.spatial[0]))  # done step out


def test_done_scores_and_the_rollout_stop_at_the_evaluate_threshold(tiny_dataset):
    params = {t: shrink_params(f"evaluate.done_threshold={t}") for t in (0.5, 0.7)}
    spec = spec_from_params(params[0.5])
    # Done probability sigmoid(0.4) = 0.60 at every step: done at 0.5, never at 0.7.
    model = make_untrained_model(spec, done_bias=0.4)
    val_ds = StepDataset(
        tiny_dataset,
        "val",
        spec=spec,
        sampling=params[0.5].sampling,
        train=params[0.5].train,
        augment=False,
        seed=VAL_SEED,
    )
    cpu = torch.device("cpu")
    low, found_low = validate(model, val_ds, params[0.5], cpu)
    high, found_high = validate(model, val_ds, params[0.7], cpu)
    assert low["val/loss"] == high["val/loss"]  # the losses do not depend on the threshold
    assert (low["val/done_recall"], high["val/done_recall"]) == (1.0, 0.0)
    assert [len(f) for f in found_low] == [0, 0]  # the rollout stops at its first step
    max_steps = 2 * params[0.7].prepare.max_objects
    assert [len(f) for f in found_high] == [max_steps, max_steps]  # and here never stops
    true_counts = [r.num_objects for r in val_ds.records[:2]]
    assert low["val/count_mae"] == pytest.approx(sum(true_counts) / 2)
