"""ImageNet backbones for the encoder, written with torchvision's module and parameter names:
ResNet-18 and -50, MobileNetV3-Large and ConvNeXt-Tiny.

torchvision's wheels on the registry are built against CUDA torch (they do not import with
the project's CPU ``torch``), so seqops does not depend on torchvision: the architectures
are written here, with torchvision's names and shapes, so that torchvision's own weight
files load unchanged (``tests/fixtures/torchvision_reference.json``, written by
``scripts/torchvision_reference.py`` inside a torchvision environment, checks keys, shapes
and feature maps against torchvision's modules). Only the ImageNet classifier is left out
(``fc.*``, ``classifier.*``): its keys are dropped when a torchvision file is loaded.

Each backbone returns its feature maps at strides 8, 16 and 32 (``channels`` gives their
widths) and lists its ``stages`` (stem first) for ``model.freeze_backbone``.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ImageNet statistics: the normalisation every torchvision backbone was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_BASE_URL = "https://download.pytorch.org/models/"
# Keys of torchvision's ImageNet classifier, absent here: the counter needs no 1000 classes.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


@dataclass(frozen=True)
class WeightsFile:
    """torchvision's ImageNet weights of one architecture: its enum entry and its file."""

    torchvision_name: str  # for torchvision.models.get_weight
    file_name: str  # in $TORCH_HOME/hub/checkpoints; the part after "-" is its sha256 prefix

    @property
    def url(self) -> str:
        return WEIGHTS_BASE_URL + self.file_name


# The weights torchvision's ``IMAGENET1K_V1`` entries name (the first of each; V1 of
# ResNet-50 is the one FamNet-style counters start from).
IMAGENET_WEIGHTS: dict[str, WeightsFile] = {
    "resnet18": WeightsFile("ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    "resnet50": WeightsFile("ResNet50_Weights.IMAGENET1K_V1", "resnet50-0676ba61.pth"),
    "mobilenet_v3_large": WeightsFile(
        "MobileNet_V3_Large_Weights.IMAGENET1K_V1", "mobilenet_v3_large-8738ca79.pth"
    ),
    "convnext_tiny": WeightsFile(
        "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", "convnext_tiny-983f1562.pth"
    ),
}


class PretrainedError(ValueError):
    """Pretrained weights cannot be had or do not fit the architecture; names the file."""


# --- ResNet (torchvision.models.resnet) -------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet V1.5: the stride on the 3x3 convolution."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet without ``avgpool``/``fc``; features of layer2, 3, 4."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...]) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.channels = (128 * block.expansion, 256 * block.expansion, 512 * block.expansion)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stages(self) -> list[list[nn.Module]]:
        """Stem, then layer1..4: the units ``model.freeze_backbone: N`` freezes in order."""
        return [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c8 = self.layer2(self.layer1(x))
        c16 = self.layer3(c8)
        return c8, c16, self.layer4(c16)


# --- MobileNetV3-Large (torchvision.models.mobilenetv3) --------------------------


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding (the SE widths depend on it)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _conv_norm_act(
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    activation: Callable[..., nn.Module] | None = nn.Hardswish,
) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: keys ``0`` (conv), ``1`` (bn), ``2`` (act)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
    ]
    if activation is not None:
        layers.append(activation(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class InvertedResidual(nn.Module):
    def __init__(
        self, cin: int, kernel: int, expanded: int, cout: int, se: bool, hs: bool, stride: int
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(_conv_norm_act(cin, expanded, 1, activation=act))
        layers.append(_conv_norm_act(expanded, expanded, kernel, stride, expanded, act))
        if se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4)))
        layers.append(_conv_norm_act(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# (input, kernel, expanded, output, squeeze-excitation, hard-swish, stride): torchvision's
# table for MobileNetV3-Large at width 1.0.
_MOBILENET_V3_LARGE = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)
# Indices of ``features`` ending each stride (2, 4, 8, 16, 32): the stages, and the taps.
_MOBILENET_STAGE_ENDS = (1, 3, 6, 12, 16)


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3-Large without ``avgpool``/``classifier``; features after
    ``features[6]`` (40 ch, stride 8), ``features[12]`` (112, 16), ``features[16]`` (960, 32)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_norm_act(3, 16, 3, stride=2)]
        layers += [InvertedResidual(*row) for row in _MOBILENET_V3_LARGE]
        layers.append(_conv_norm_act(160, 960, 1))
        self.features = nn.Sequential(*layers)
        self.channels = (40, 112, 960)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def stages(self) -> list[list[nn.Module]]:
        """``features`` split where the stride doubles (stride 2, 4, 8, 16, 32)."""
        starts = (0, *(end + 1 for end in _MOBILENET_STAGE_ENDS[:-1]))
        return [
            list(self.features[start : end + 1])
            for start, end in zip(starts, _MOBILENET_STAGE_ENDS, strict=True)
        ]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _MOBILENET_STAGE_ENDS[2:]:
                taps.append(x)
        return taps[0], taps[1], taps[2]


# --- ConvNeXt-Tiny (torchvision.models.convnext) ----------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block; its stochastic depth (a training regulariser without
    parameters, 0.1 in torchvision's ImageNet training) is left out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXt(nn.Module):
    """torchvision's ConvNeXt-Tiny without ``avgpool``/``classifier``; features after
    ``features[3]`` (192 ch, stride 8), ``features[5]`` (384, 16), ``features[7]`` (768, 32)."""

    def __init__(self, dims: tuple[int, ...] = (96, 192, 384, 768), depths=(3, 3, 9, 3)) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        layers: list[nn.Module] = [stem]
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            layers.append(nn.Sequential(*[CNBlock(dim) for _ in range(depth)]))
            if i + 1 < len(dims):
                down = nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2))
                layers.append(down)
        self.features = nn.Sequential(*layers)
        self.channels = dims[1:]
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[list[nn.Module]]:
        """Stem, then each stride's downsampling and blocks (stride 4, 8, 16, 32)."""
        f = self.features
        return [[f[0]], [f[1]], [f[2], f[3]], [f[4], f[5]], [f[6], f[7]]]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (3, 5, 7):
                taps.append(x)
        return taps[0], taps[1], taps[2]


BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: ResNet(BasicBlock, (2, 2, 2, 2)),
    "resnet50": lambda: ResNet(Bottleneck, (3, 4, 6, 3)),
    "mobilenet_v3_large": MobileNetV3,
    "convnext_tiny": ConvNeXt,
}


def build_backbone(name: str) -> nn.Module:
    """A randomly initialised backbone (``model.pretrained`` loads weights into it)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone {name!r}: unknown (known: {sorted(BACKBONES)})")
    return BACKBONES[name]()


# --- weights ----------------------------------------------------------------------


def load_pretrained(backbone: nn.Module, name: str, pretrained: str) -> None:
    """Fill ``backbone`` (architecture ``name``) from ``model.pretrained``.

    ``none``: keep the random initialisation. ``imagenet``: torchvision's ImageNet weights,
    through torchvision's weights API when it imports, else the same file from the same URL
    into the same cache (``$TORCH_HOME/hub/checkpoints``); offline, an error naming the file,
    where to put it and that a path works offline. Anything else is a path to a state dict.
    Never falls back to random weights.

    Raises:
        PretrainedError: naming the file and what is wrong with it.
    """
    if pretrained == "none":
        return
    if pretrained == "imagenet":
        state, source = _imagenet_state_dict(name), IMAGENET_WEIGHTS[name].file_name
    else:
        state, source = read_state_dict(pretrained), pretrained
    assign_state_dict(backbone, state, name, source)


def _imagenet_state_dict(name: str) -> Mapping[str, Tensor]:
    weights = IMAGENET_WEIGHTS.get(name)
    if weights is None:
        raise PretrainedError(f"model.pretrained=imagenet: no ImageNet weights for {name!r}")
    try:
        import torchvision.models as tv_models  # type: ignore[import-not-found]
    except (ImportError, RuntimeError):  # not installed, or built against another torch
        tv_models = None
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        # weights_only: a file in the cache is read as tensors only, never as code.
        load = {"progress": True, "check_hash": True, "weights_only": True, "map_location": "cpu"}
        if tv_models is not None:
            return tv_models.get_weight(weights.torchvision_name).get_state_dict(**load)
        return torch.hub.load_state_dict_from_url(weights.url, file_name=weights.file_name, **load)
    except (urllib.error.URLError, OSError) as exc:
        raise PretrainedError(
            f"model.pretrained=imagenet: cannot fetch {weights.file_name} ({exc}). Download "
            f"{weights.url} on a connected machine and put it in {folder} (the torch hub "
            f"cache, $TORCH_HOME/hub/checkpoints), or set model.pretrained=<path to the "
            "file>, which works offline."
        ) from None
    except Exception as exc:  # a failed hash check, a truncated file in the cache
        raise PretrainedError(
            f"model.pretrained=imagenet: {folder / weights.file_name} is not a valid copy of "
            f"{weights.url} ({exc}): delete it and fetch it again"
        ) from None


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``path`` (``weights_only``): a bare one (torchvision's files) or
    one under a ``state_dict``/``model`` entry; every failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"model.pretrained={path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        raise PretrainedError(
            f"model.pretrained={path}: not a weights file that weights_only loading accepts "
            f"(truncated, not a torch file, or a pickle of other objects): {exc}"
        ) from None
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise PretrainedError(
            f"model.pretrained={path}: holds a {type(loaded).__name__}, not a state dict "
            "(a mapping of parameter names to tensors)"
        )
    return dict(loaded)


def assign_state_dict(
    backbone: nn.Module, state: Mapping[str, Tensor], name: str, source: str
) -> None:
    """Load ``state`` strictly (the classifier's keys aside); mismatches name ``source``
    and some of the missing, unexpected and mis-shaped keys."""
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [
        f"{k} {list(state[k].shape)} (expected {list(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = [
            f"{label} {len(keys)}: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("mis-shaped", misshaped),
            )
            if keys
        ]
        raise PretrainedError(
            f"model.pretrained={source}: not a {name} state dict; " + "; ".join(parts)
        )
    backbone.load_state_dict(state, strict=True)


def freeze_stages(backbone: nn.Module, freeze: str | int) -> list[nn.Module]:
    """Freeze ``model.freeze_backbone`` (``none``, ``all`` or the first N stages): their
    parameters take no gradient. Returns the frozen modules, whose BatchNorm layers
    :func:`keep_frozen_norms_eval` keeps in eval mode."""
    stages = backbone.stages()
    count = {"none": 0, "all": len(stages)}[freeze] if isinstance(freeze, str) else freeze
    if not 0 <= count <= len(stages):
        raise ValueError(f"model.freeze_backbone={freeze}: this backbone has {len(stages)} stages")
    frozen = [module for stage in stages[:count] for module in stage]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def keep_frozen_norms_eval(frozen: list[nn.Module]) -> None:
    """Put the BatchNorm layers of frozen modules back in eval mode (after ``train()``):
    their running statistics stay the pretrained ones."""
    for module in frozen:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
