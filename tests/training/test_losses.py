"""The training losses: the research hinge and its continuous variant, done, heat map, targets."""

from __future__ import annotations

import math

import pytest
import torch

from seqops.training import losses
from seqops.training.losses import (
    done_loss,
    heatmap_loss,
    mse_loss,
    nearest_unmarked_targets,
    render_heatmap_target,
    spatial_loss,
)

T = 0.1


def _at_distance(dist: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A prediction at L1 distance ``dist`` from the target, split over x and y."""
    target = torch.tensor([[0.2, -0.3]], dtype=torch.float64)
    pred = target + torch.tensor([[0.25 * dist, -0.75 * dist]], dtype=torch.float64)
    return pred.requires_grad_(True), target


def _value_and_slope(dist: float, variant: str) -> tuple[float, float]:
    pred, target = _at_distance(dist)
    loss = spatial_loss(pred, target, threshold=T, variant=variant)
    loss.sum().backward()
    # d loss / d dist: moving pred along (+1, -1) changes dist by 2 per unit.
    slope = (pred.grad[0, 0] - pred.grad[0, 1]).item() / 2
    return loss.item(), slope


def test_research_variant_steps_by_t_squared_at_t() -> None:
    below, slope_below = _value_and_slope(T - 1e-9, "research")
    above, slope_above = _value_and_slope(T + 1e-9, "research")
    assert below == pytest.approx(T**2, abs=1e-7)  # 0.01 just below
    assert above == pytest.approx(2 * T**2, abs=1e-7)  # 0.02 just above
    assert slope_below == pytest.approx(2 * T) and slope_above == pytest.approx(T)
    # Exactly as written: quadratic inside, t*dist + t^2 outside.
    assert _value_and_slope(0.05, "research")[0] == pytest.approx(0.0025)
    assert _value_and_slope(0.5, "research")[0] == pytest.approx(T * 0.5 + T**2)


def test_continuous_variant_matches_value_and_slope_at_t() -> None:
    below, slope_below = _value_and_slope(T - 1e-9, "continuous")
    above, slope_above = _value_and_slope(T + 1e-9, "continuous")
    assert below == pytest.approx(T**2, abs=1e-7) and above == pytest.approx(T**2, abs=1e-7)
    assert slope_below == pytest.approx(2 * T, abs=1e-6)
    assert slope_above == pytest.approx(2 * T, abs=1e-6)
    assert _value_and_slope(0.5, "continuous")[0] == pytest.approx(2 * T * 0.5 - T**2)


def test_spatial_loss_is_per_example_and_validates() -> None:
    pred = torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    target = torch.zeros(2, 2)
    loss = spatial_loss(pred, target)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor([0.0, T * 1.0 + T**2]))
    with pytest.raises(ValueError, match="variant 'smooth'"):
        spatial_loss(pred, target, variant="smooth")
    with pytest.raises(ValueError, match="threshold"):
        spatial_loss(pred, target, threshold=0.0)


def test_mse_loss_per_example() -> None:
    pred = torch.tensor([[0.1, 0.3], [0.0, 0.0]])
    torch.testing.assert_close(mse_loss(pred, torch.zeros(2, 2)), torch.tensor([0.05, 0.0]))


def test_done_loss_is_bce_with_pos_weight() -> None:
    logits = torch.tensor([0.3, 0.3, -1.2])
    targets = torch.tensor([1.0, 0.0, 1.0])
    plain = done_loss(logits, targets)
    p = torch.sigmoid(logits)
    expected = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))
    torch.testing.assert_close(plain, expected)
    weighted = done_loss(logits, targets, pos_weight=4.0)
    torch.testing.assert_close(weighted[targets == 1], 4.0 * expected[targets == 1])
    torch.testing.assert_close(weighted[targets == 0], expected[targets == 0])
    # Bool targets (as a mask would give) are accepted.
    torch.testing.assert_close(done_loss(logits, targets.bool()), plain)


def test_heatmap_target_is_a_normalised_gaussian_at_the_target() -> None:
    target = render_heatmap_target(torch.tensor([[0.0, 0.0], [-0.6, 0.35]]), 16, 1.0)
    assert target.shape == (2, 16, 16)
    torch.testing.assert_close(target.sum(dim=(1, 2)), torch.ones(2))
    centres = (torch.arange(16) + 0.5) / 16 * 2 - 1
    assert (target[1] * centres[None, :]).sum() == pytest.approx(-0.6, abs=1e-3)
    assert (target[1] * centres[:, None]).sum() == pytest.approx(0.35, abs=1e-3)


def test_heatmap_loss_is_minimal_at_the_target() -> None:
    grid, sigma = 16, 1.0
    # float64: the log of the target's far tail (exp(-100)) must not underflow to -inf.
    target_xy = torch.tensor([[0.27, -0.41]], dtype=torch.float64)
    best = torch.log(render_heatmap_target(target_xy, grid, sigma)).requires_grad_(True)
    loss = heatmap_loss(best, target_xy, sigma)
    loss.sum().backward()
    assert best.grad.abs().max() < 1e-6  # a stationary point: the minimum of a convex loss
    for shift in ([0.125, 0.0], [0.0, -0.125], [0.5, 0.5]):
        moved = torch.log(
            render_heatmap_target(
                target_xy + torch.tensor([shift], dtype=torch.float64), grid, sigma
            )
        )
        assert heatmap_loss(moved, target_xy, sigma) > loss.detach() + 1e-3
    uniform = torch.zeros(1, grid, grid, dtype=torch.float64)
    assert heatmap_loss(uniform, target_xy, sigma).item() == pytest.approx(math.log(grid * grid))


def test_nearest_unmarked_picks_the_nearest_valid_point() -> None:
    pred = torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.1, 0.1]], requires_grad=True)
    points = torch.tensor(
        [
            [[0.05, 0.05], [0.3, -0.3], [0.9, 0.9], [0.0, 0.0]],  # [0]: nearest valid is [0]
            [[0.0, 0.0], [0.55, 0.4], [0.5, 0.5], [0.6, 0.6]],  # [1]: [2] is marked, [1] wins
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # [2]: nothing left (done)
        ]
    )
    valid = torch.tensor(
        [[True, True, True, False], [True, True, False, True], [False, False, False, False]]
    )
    targets = nearest_unmarked_targets(pred, points, valid)
    torch.testing.assert_close(targets[0], torch.tensor([0.05, 0.05]))
    torch.testing.assert_close(targets[1], torch.tensor([0.55, 0.4]))
    torch.testing.assert_close(targets[2], pred[2].detach())  # zero loss where done
    assert not targets.requires_grad


def test_nearest_unmarked_uses_l1_not_euclidean() -> None:
    pred = torch.zeros(1, 2)
    # L1: (0.3, 0.3) -> 0.6, (0.55, 0.0) -> 0.55; Euclidean would pick the first.
    points = torch.tensor([[[0.3, 0.3], [0.55, 0.0]]])
    targets = nearest_unmarked_targets(pred, points, torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(targets, torch.tensor([[0.55, 0.0]]))


def test_nearest_unmarked_edge_cases() -> None:
    pred = torch.zeros(2, 2)
    empty = nearest_unmarked_targets(
        pred, torch.zeros(2, 0, 2), torch.zeros(2, 0, dtype=torch.bool)
    )
    torch.testing.assert_close(empty, pred)
    with pytest.raises(ValueError, match="disagree"):
        nearest_unmarked_targets(pred, torch.zeros(2, 3, 2), torch.ones(2, 4, dtype=torch.bool))


def test_left_density_holds_one_unit_per_unmarked_object():
    points = torch.tensor([[[-0.5, -0.5], [0.5, 0.25], [0.0, 0.0]]])
    unmarked = torch.tensor([[True, False, True]])
    density = losses.left_density(points, unmarked, grid=16, sigma_cells=1.0)
    assert density.shape == (1, 16, 16)
    assert float(density.sum()) == pytest.approx(2.0, abs=1e-4)
    # the marked object's cell holds (nearly) nothing, an unmarked one's its blob's peak
    assert float(density[0, 10, 12]) < 1e-3 < float(density[0, 4, 4])
    assert float(losses.count_loss(density, density)[0]) == 0.0
    assert float(losses.count_loss(density * 1.5, density)[0]) > 1.0  # one object too many


def test_the_count_head_feeds_the_done_decision():
    from seqops.model import ModelSpec, SeqCounter

    torch.manual_seed(0)
    model = SeqCounter(ModelSpec.from_preset("tiny", 64, False, count_head=True))
    features = model.encode(torch.randn(2, 3, 64, 64))
    out = model.step(features, torch.zeros(2, 1, model.spec.grid, model.spec.grid))
    assert out.left_map.shape == (2, model.spec.grid, model.spec.grid)
    assert float(out.left_map.min()) > 0  # softplus: a density is never negative
    out.done_logit.sum().backward()
    assert float(model.stepper.left.weight.grad.abs().sum()) > 0


def test_done_sees_whether_any_unmarked_object_is_left():
    from seqops.model import ModelSpec, SeqCounter

    with pytest.raises(ValueError, match="done_peak"):
        ModelSpec.from_preset("tiny", 64, False, order_prior="none", done_peak=True)
    torch.manual_seed(0)
    model = SeqCounter(ModelSpec.from_preset("tiny", 64, False, order_prior="scan", done_peak=True))
    features = model.encode(torch.randn(2, 3, 64, 64))
    out = model.step(features, torch.zeros(2, 1, model.spec.grid, model.spec.grid))
    out.done_logit.sum().backward()
    # the done loss reaches the unmarked-object map through its maximum
    assert float(model.stepper.objects.weight.grad.abs().sum()) > 0
    assert model.stepper.done[0].in_features == 2 * model.spec.step_channels + 1
