"""The next-object network: shapes, exemplars, step cost, soft-argmax, spec, ONNX parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shrink_params
from torch.utils.flop_counter import FlopCounterMode

from seqops.data.ordering import order_indices
from seqops.imaging import grid_centres, render_exemplar_mask, render_marks
from seqops.model import (
    ORDER_PRIORS,
    PRESETS,
    ModelSpec,
    SeqCounter,
    StepOutput,
    make_coord_grid,
    make_rank_map,
    soft_argmax,
    spec_from_params,
)


def _build(preset: str, size: int, exemplars: bool = False, **kw) -> SeqCounter:
    torch.manual_seed(0)
    return SeqCounter(ModelSpec.from_preset(preset, size, exemplars, **kw)).eval()


def _mask(spec: ModelSpec, batch: int) -> torch.Tensor:
    boxes = np.array([[10, 10, 30, 30], [40, 20, 56, 40]], np.float32) * spec.image_size / 64
    mask = render_exemplar_mask(boxes, spec.image_size, spec.grid)
    return torch.from_numpy(mask)[None, None].repeat(batch, 1, 1, 1)


def _flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(("preset", "size"), [("tiny", 384), ("base", 128)])
def test_encode_and_step_shapes(preset: str, size: int) -> None:
    model = _build(preset, size)
    spec = model.spec
    images = torch.randn(2, 3, size, size)
    marks = torch.from_numpy(render_marks(np.array([[0.1, -0.2]]), spec.grid, spec.mark_sigma))
    marks = marks[None, None].repeat(2, 1, 1, 1)
    with torch.no_grad():
        features = model.encode(images)
        out = model.step(features, marks)
    assert features.shape == (2, spec.feature_channels, spec.grid, spec.grid)
    assert isinstance(out, StepOutput)
    assert out.xy.shape == (2, 2) and out.done_logit.shape == (2,)
    assert out.heat_logits.shape == (2, spec.grid, spec.grid)
    assert out.xy.abs().max() <= 1.0
    # Initialisation: done is unlikely and the heat map near uniform.
    assert torch.sigmoid(out.done_logit).max() < 0.3
    probs = torch.softmax(out.heat_logits.flatten(1), dim=1)
    assert probs.max() < 1.5 / spec.grid**2
    # forward == encode + step (the whole-network-per-object baseline).
    with torch.no_grad():
        assert torch.allclose(model(images, marks).xy, out.xy, atol=1e-6)


def test_exemplar_mask_required_iff_built_with_exemplars() -> None:
    with_ex, without = _build("tiny", 64, exemplars=True), _build("tiny", 64)
    images = torch.randn(2, 3, 64, 64)
    mask = _mask(with_ex.spec, 2)
    with pytest.raises(ValueError, match="with exemplars; pass exemplar_mask"):
        with_ex.encode(images)
    with pytest.raises(ValueError, match="without exemplars; got exemplar_mask"):
        without.encode(images, mask)
    with pytest.raises(ValueError, match=r"exemplar_mask: expected shape \[B, 1, 8, 8\]"):
        with_ex.encode(images, mask[:, :, :4])
    with torch.no_grad():
        features = with_ex.encode(images, mask)
        other = with_ex.encode(images, torch.flip(mask, dims=(3,)))
        empty = with_ex.encode(images, torch.zeros_like(mask))  # no exemplar cell: no NaN
    assert features.shape == (2, with_ex.spec.feature_channels, 8, 8)
    assert not torch.allclose(features, other)  # the exemplars condition the features
    assert torch.isfinite(empty).all()


def test_bad_shapes_name_the_input() -> None:
    model = _build("tiny", 64)
    with pytest.raises(ValueError, match=r"images: expected shape \[B, 3, 64, 64\]"):
        model.encode(torch.randn(1, 3, 32, 32))
    features = model.encode(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="marks: expected shape"):
        model.step(features, torch.zeros(1, 1, 4, 4))


# Counting FLOPs of a preset larger than tiny takes seconds (base: 2.5 s): slow.
@pytest.mark.parametrize(
    "preset", [pytest.param(p, marks=[pytest.mark.slow] * (p != "tiny")) for p in sorted(PRESETS)]
)
def test_step_costs_at_most_a_tenth_of_an_encoding(preset: str) -> None:
    """Counted FLOPs (robust under CPU load, unlike timing) at the real input size 384,
    with the scan over the order (the trained default; it adds ~0.03% of an encoding)."""
    model = _build(preset, 384, order_prior="scan")
    g = model.spec.grid
    images = torch.randn(1, 3, 384, 384)
    features = model.encode(images).detach()
    encode_flops = _flops(lambda: model.encode(images))
    step_flops = _flops(lambda: model.step(features, torch.zeros(1, 1, g, g)))
    assert 0 < step_flops <= 0.10 * encode_flops


def test_soft_argmax_is_sub_cell_precise() -> None:
    grid = 48
    coords = make_coord_grid(grid)
    np.testing.assert_allclose(coords[0, 0].numpy(), grid_centres(grid), atol=1e-6)
    targets = torch.tensor([[0.1234, -0.4567], [-0.7001, 0.3333]])
    sigma = 1.0 * 2.0 / grid  # one cell
    d2 = (coords[None, 0] - targets[:, 0, None, None]) ** 2
    d2 = d2 + (coords[None, 1] - targets[:, 1, None, None]) ** 2
    xy = soft_argmax(-d2 / (2 * sigma**2), coords)
    # 1e-4 normalised = 0.02 px at 384; a cell is 0.042.
    torch.testing.assert_close(xy, targets, atol=1e-4, rtol=0)
    peaked = torch.full((1, grid, grid), -50.0)
    peaked[0, 7, 30] = 50.0
    torch.testing.assert_close(
        soft_argmax(peaked, coords), coords[:, 7, 30][None], atol=1e-6, rtol=0
    )


def test_windowed_soft_argmax_answers_at_one_peak_not_between() -> None:
    grid = 48
    coords = make_coord_grid(grid)
    cell = 2.0 / grid
    near, far = torch.tensor([-0.5012, 0.2031]), torch.tensor([0.4377, -0.3])  # two objects
    logits = torch.full((1, grid, grid), -30.0)
    for centre, height in ((near, 0.0), (far, -0.5)):  # `near` more probable
        d2 = (coords[0] - centre[0]) ** 2 + (coords[1] - centre[1]) ** 2
        logits[0] = torch.maximum(logits[0], height - d2 / (2 * cell**2))
    between = soft_argmax(logits, coords)[0]
    assert (between - near).abs().sum() > 0.3  # the global mean lands between the objects
    local = soft_argmax(logits, coords, window=2)[0]
    torch.testing.assert_close(local, near, atol=0.05 * cell, rtol=0)  # at one peak, sub-cell


def test_heatmap_head_returns_the_soft_argmax_of_its_heat_map() -> None:
    model = _build("tiny", 64)
    torch.nn.init.normal_(model.stepper.heat.weight, std=1.0)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64), torch.zeros(3, 1, 8, 8))
    assert model.spec.peak_window == 2  # the presets' window
    expected = soft_argmax(out.heat_logits, make_coord_grid(8), window=2)
    torch.testing.assert_close(out.xy, expected)
    assert out.xy.abs().max() > 0.01  # not trivially the centre


def _reference_step(stepper: torch.nn.Module, features: torch.Tensor, marks: torch.Tensor):
    """The step as defined on the grid: each head a 1x1 convolution, the scan a gather into
    rank order and back, mean and max pooling, :func:`soft_argmax` over the heat map."""
    import torch.nn.functional as F

    h = stepper.blocks(F.relu(features + stepper.mark_in(marks)))
    b, g = h.shape[0], h.shape[-1]
    heat = F.conv2d(h, stepper.heat.weight, stepper.heat.bias)[:, 0]
    done_in = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
    left_map = None
    if stepper.order_prior == "scan":
        logits = F.conv2d(h, stepper.objects.weight, stepper.objects.bias)[:, 0]
        ranked = torch.sigmoid(logits).flatten(1)[:, stepper.scan_order]
        before = torch.empty_like(ranked)
        before[:, stepper.scan_order] = torch.cumsum(ranked, dim=1) - ranked
        heat = heat - stepper.scan_weight * before.view(b, g, g)
        if stepper.done_peak:
            done_in = torch.cat([done_in, logits.flatten(1).amax(dim=1, keepdim=True)], dim=1)
    if stepper.count_head:
        left_map = F.softplus(F.conv2d(h, stepper.left.weight, stepper.left.bias)[:, 0])
        done_in = torch.cat([done_in, torch.log1p(left_map.sum(dim=(1, 2)))[:, None]], dim=1)
        if stepper.count_prior:
            heat = heat + torch.log(left_map + 1e-3)
    if stepper.head_kind == "pooled":
        xy = stepper.xy_mlp(done_in[:, : 2 * h.shape[1]])
    else:
        xy = soft_argmax(heat, make_coord_grid(g), stepper.peak_window)
    return StepOutput(xy, stepper.done(done_in)[:, 0], heat, left_map)


@pytest.mark.parametrize(
    "options",
    [
        {"order_prior": "none"},
        {"order_prior": "none", "count_head": True, "count_prior": True, "peak_window": 0},
        {"order_prior": "scan"},
        {"order_prior": "scan", "count_head": True, "count_prior": True, "done_peak": True},
        {"order_prior": "scan", "head": "pooled"},
    ],
)
def test_step_in_cell_order_computes_the_step_defined_on_the_grid(options: dict) -> None:
    """The step runs its maps as one matrix product and the scan, window and soft-argmax in
    rank order (fewer exported nodes); the outputs are those of the grid's definition."""
    model = _build("tiny", 64, **options)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.stepper.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # peaked maps, a scan that matters
    features, marks = torch.randn(4, 16, 8, 8), torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        got, want = model.step(features, marks), _reference_step(model.stepper, features, marks)
    for name, a, b in zip(StepOutput._fields, got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6, msg=name)


def test_pooled_head_variant() -> None:
    model = _build("tiny", 64, head="pooled")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), torch.zeros(2, 1, 8, 8))
    assert out.xy.shape == (2, 2) and out.heat_logits.shape == (2, 8, 8)
    assert out.xy.abs().max() < 1.0  # tanh
    assert not torch.allclose(out.xy, soft_argmax(out.heat_logits, make_coord_grid(8)))


@pytest.mark.parametrize(
    ("exemplars", "order_prior"),
    [(False, "none"), (True, "none")] + [(False, p) for p in ORDER_PRIORS[1:]],
)
def test_every_parameter_gets_a_gradient(exemplars: bool, order_prior: str) -> None:
    model = _build("tiny", 64, exemplars=exemplars, order_prior=order_prior).train()
    images = torch.randn(2, 3, 64, 64)
    mask = _mask(model.spec, 2) if exemplars else None
    features = model.encode(images, mask).repeat_interleave(3, 0)  # many steps per encoding
    out = model.step(features, torch.rand(6, 1, 8, 8))
    (out.xy.sum() + out.done_logit.sum() + out.heat_logits.logsumexp((1, 2)).sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_rank_map_is_the_order_of_the_cell_centres() -> None:
    grid, stride = 48, 8  # 384 px; rows of 50 px are 6.25 cells
    rank = make_rank_map(grid, stride, "reading_order", 50.0)[0]
    assert rank.shape == (grid, grid) and rank.min() == -1.0 and rank.max() == 1.0
    centres = (np.arange(grid) + 0.5) * stride
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    order = order_indices(np.stack([xs.ravel(), ys.ravel()], 1), "reading_order", 50.0)
    assert (np.diff(rank.flatten().numpy()[order]) > 0).all()
    # Row bands, not y: cell row 5 (y 44 px) is in the first band, row 6 (y 52 px) in the
    # second, so the right end of row 5 precedes the left end of row 6 ...
    assert rank[5, 47] < rank[6, 0]
    # ... while within a band x comes first: row 5's left end precedes row 0's right end.
    assert rank[5, 0] < rank[0, 47]
    by_x = make_rank_map(grid, stride, "left_to_right", 50.0)[0]
    assert by_x[47, 0] < by_x[0, 1]
    assert not make_rank_map(grid, stride, "nearest_neighbor", 50.0).any()


def _mass_before_on_grid(stepper: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The step's scan (``_mass_before``, in rank order) of the objects map of ``h``, on the
    grid: ``[B, g, g]``."""
    objects = stepper._maps(h)[:, 1:2]  # row 1: the objects map (row 0: heat)
    before = stepper._mass_before(objects[:, :, stepper.scan_order])
    return stepper._to_grid(before)


def test_scan_prior_lowers_each_cell_by_the_object_mass_before_it() -> None:
    model = _build("tiny", 64, order_prior="scan")
    spec, stepper = model.spec, model.stepper
    rank = make_rank_map(spec.grid, spec.stride, spec.order, spec.row_height)[0]
    with torch.no_grad():
        stepper.objects.weight.zero_()
        stepper.objects.bias.fill_(30.0)  # every cell has mass 1: mass before = rank index
        h = torch.randn(2, spec.step_channels, spec.grid, spec.grid)
        before = _mass_before_on_grid(stepper, h)
    index = (rank + 1.0) / 2.0 * (spec.grid**2 - 1)
    torch.testing.assert_close(before, index.expand(2, -1, -1))
    # One object at cell (2, 5) (mass 1, elsewhere 0): only cells after it in the order pay.
    mass = torch.full((1, 1, spec.grid, spec.grid), -30.0)
    mass[0, 0, 2, 5] = 30.0
    with torch.no_grad():
        stepper.objects.weight.zero_()
        stepper.objects.weight[0, 0] = 1.0
        stepper.objects.bias.zero_()
        h = torch.zeros(1, spec.step_channels, spec.grid, spec.grid)
        h[:, :1] = mass
        before = _mass_before_on_grid(stepper, h)[0]
    torch.testing.assert_close(before, (rank > rank[2, 5]).float(), atol=1e-6, rtol=0)


def test_spec_round_trip_and_validation() -> None:
    spec = ModelSpec.from_preset("base", 256, True, head="pooled", stride=4)
    restored = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec and restored.grid == 64 and isinstance(restored.widths, tuple)
    with pytest.raises(ValueError, match="unknown keys"):
        ModelSpec.from_dict({**spec.to_dict(), "colour": 1})
    # A spec saved before the order fields existed still loads, with their defaults.
    old = {
        k: v for k, v in spec.to_dict().items() if k not in ("order_prior", "order", "row_height")
    }
    restored = ModelSpec.from_dict(old)
    assert (restored.order_prior, restored.order, restored.row_height) == (
        "none",
        "reading_order",
        50.0,
    )
    with pytest.raises(ValueError, match=r"ModelSpec\.order_prior='sorted'"):
        ModelSpec.from_preset("tiny", 64, False, order_prior="sorted")
    with pytest.raises(ValueError, match=r"ModelSpec\.order_prior='scan': .*positional order"):
        ModelSpec.from_preset("tiny", 64, False, order_prior="scan", order="nearest_neighbor")
    with pytest.raises(ValueError, match=r"ModelSpec\.order='spiral'"):
        ModelSpec.from_preset("tiny", 64, False, order="spiral")
    with pytest.raises(ValueError, match=r"model spec: .*preset"):
        ModelSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "preset"})
    with pytest.raises(ValueError, match=r"ModelSpec.image_size=100: .* multiple of .* 32"):
        ModelSpec.from_preset("tiny", 100, False)
    with pytest.raises(ValueError, match=r"ModelSpec.image_size=32: .*>= 2x"):
        ModelSpec.from_preset("tiny", 32, False)  # 1x1 at stride 32: no batch statistics
    with pytest.raises(ValueError, match=r"ModelSpec\.stride=6"):
        ModelSpec.from_preset("tiny", 64, False, stride=6)
    with pytest.raises(ValueError, match="model preset 'huge'"):
        ModelSpec.from_preset("huge", 64, False)


def test_spec_from_params() -> None:
    params = shrink_params("prepare.image_size=256", "model.preset=base", "model.exemplars=true")
    assert params.model.stride is None and params.model.peak_window is None  # params.yaml
    spec = spec_from_params(params)
    assert (spec.preset, spec.image_size, spec.exemplars) == ("base", 256, True)
    assert spec.head == "heatmap"
    # null in params.yaml: the preset's stride and window.
    assert spec.stride == PRESETS["base"]["stride"] and spec.grid == 256 // spec.stride
    assert spec.peak_window == PRESETS["base"]["peak_window"]
    assert spec.order_prior == "scan"  # params.yaml's
    params = shrink_params(
        "model.head=pooled", "model.stride=16", "model.peak_window=0", "model.order_prior=scan",
        "prepare.order=reading_order", "prepare.row_height=50",
    )  # fmt: skip
    spec = spec_from_params(params)
    assert (spec.head, spec.stride, spec.peak_window) == ("pooled", 16, 0)
    assert (spec.order_prior, spec.order, spec.row_height) == ("scan", "reading_order", 50.0)
    params = shrink_params(
        "prepare.order=left_to_right", "prepare.row_height=30", "model.order_prior=none"
    )
    spec = spec_from_params(params)
    assert (spec.order_prior, spec.order, spec.row_height) == ("none", "left_to_right", 30.0)
    params = shrink_params("prepare.order=nearest_neighbor", "model.order_prior=scan")
    with pytest.raises(ValueError, match=r"model.order_prior=scan .* set model.order_prior=none"):
        spec_from_params(params)


class _Encode(torch.nn.Module):
    def __init__(self, model: SeqCounter) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, exemplar_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images, exemplar_mask)


class _Step(torch.nn.Module):
    def __init__(self, model: SeqCounter) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, marks: torch.Tensor):
        return tuple(out for out in self.model.step(features, marks) if out is not None)


def _export(module: torch.nn.Module, args: tuple, names: list[str], outs: list[str], path) -> None:
    # The wrapper must be in eval mode: the exporter restores the wrapper's mode afterwards,
    # recursively, which would put the wrapped model back into training mode.
    torch.onnx.export(
        module.eval(),
        args,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=names,
        output_names=outs,
        dynamic_axes={n: {0: "batch"} for n in names + outs},
    )


@pytest.mark.parametrize(
    ("order_prior", "count_head", "done_peak"),
    [(prior, False, False) for prior in ORDER_PRIORS]
    + [("scan", True, False), ("scan", False, True)],
)
def test_onnx_export_matches_torch(
    tmp_path, order_prior: str, count_head: bool, done_peak: bool
) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _build(
        "tiny", 64, exemplars=True, order_prior=order_prior, count_head=count_head,
        count_prior=count_head, done_peak=done_peak,
    )  # fmt: skip
    torch.manual_seed(1)
    # Non-trivial random weights: a peaked heat map and BN statistics that are not identity.
    torch.nn.init.normal_(model.stepper.heat.weight, std=1.0)
    if order_prior == "scan":  # a scan that matters: object mass ~0.5 per cell
        torch.nn.init.normal_(model.stepper.objects.weight, std=1.0)
        torch.nn.init.zeros_(model.stepper.objects.bias)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    spec = model.spec
    images, mask = torch.randn(2, 3, 64, 64), _mask(spec, 2)
    features = model.encode(images, mask).detach()
    marks = torch.rand(2, 1, spec.grid, spec.grid)
    encoder_path, step_path = tmp_path / "encoder.onnx", tmp_path / "step.onnx"
    _export(_Encode(model), (images, mask), ["images", "exemplar_mask"], ["features"], encoder_path)
    outs = ["xy", "done_logit", "heat_logits"] + (["left_map"] if count_head else [])
    _export(_Step(model), (features, marks), ["features", "marks"], outs, step_path)
    assert not model.training

    providers = ["CPUExecutionProvider"]
    encoder = ort.InferenceSession(str(encoder_path), providers=providers)
    stepper = ort.InferenceSession(str(step_path), providers=providers)
    # A different batch size than at export: the batch axis is dynamic.
    images, mask = torch.randn(3, 3, 64, 64), _mask(spec, 3)
    marks = torch.rand(3, 1, spec.grid, spec.grid)
    (onnx_features,) = encoder.run(None, {"images": images.numpy(), "exemplar_mask": mask.numpy()})
    with torch.no_grad():
        features = model.encode(images, mask)
        expected = model.step(features, marks)
    np.testing.assert_allclose(onnx_features, features.numpy(), atol=1e-4, rtol=0)
    onnx_out = stepper.run(None, {"features": onnx_features, "marks": marks.numpy()})
    expected = [out for out in expected if out is not None]
    for got, want in zip(onnx_out, expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
