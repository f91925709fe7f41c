"""ImageNet backbones: torchvision's architectures (against a fixture torchvision wrote),
their weights (ImageNet, a path, every bad file), freezing, and the model around them."""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, shrink_params

from seqops import backbones as B
from seqops.config import ConfigError
from seqops.model import ModelSpec, SeqCounter
from seqops.training.train import build_model, optimizer_groups

ARCHS = ("resnet18", "resnet50", "mobilenet_v3_large", "convnext_tiny")
FIXTURE = ROOT / "tests" / "fixtures" / "torchvision_reference.json"


def _reference_script():
    """scripts/torchvision_reference.py: the fill formula and input torchvision's run used."""
    path = ROOT / "scripts" / "torchvision_reference.py"
    spec = importlib.util.spec_from_file_location("torchvision_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_equals_torchvisions_keys_shapes_and_features(arch):
    reference = json.loads(FIXTURE.read_text())["backbones"][arch]
    script = _reference_script()
    backbone = B.build_backbone(arch).double().eval()
    state = backbone.state_dict()
    # Every torchvision key but the ImageNet classifier's, in the same order and shape.
    expected = [(k, s) for k, s in reference["keys"] if not k.startswith(("fc.", "classifier."))]
    assert [(k, list(v.shape)) for k, v in state.items()] == expected
    # Filled by the formula torchvision's modules were filled with, in both environments.
    B.assign_state_dict(backbone, script.fill_deterministic(state), arch, "formula")
    with torch.no_grad():
        maps = backbone(script.reference_input())
    for got, want in zip(maps, reference["features"], strict=True):
        got = script.summarise(got)
        assert got["shape"] == want["shape"]
        for key in ("channel_means", "points"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_model_spec_takes_the_backbones_normalisation_and_needs_stride_8():
    spec = ModelSpec.from_preset("tiny", 64, False, backbone="resnet18")
    assert spec.mean == B.IMAGENET_MEAN and spec.std == B.IMAGENET_STD
    assert ModelSpec.from_preset("tiny", 64, False).mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="stride=16: must be 8 with backbone resnet18"):
        ModelSpec.from_preset("tiny", 64, False, backbone="resnet18", stride=16)
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        shrink_params("model.backbone=vgg16")


def test_a_state_dict_file_loads_and_other_files_are_errors_naming_them(tmp_path):
    source = B.build_backbone("resnet18")
    good = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), good)
    target = B.build_backbone("resnet18")
    B.load_pretrained(target, "resnet18", str(good))
    for name, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], value, msg=name)
    # Under a "state_dict" entry (a training checkpoint's habit) and with torchvision's fc.
    wrapped = tmp_path / "wrapped.pth"
    extra = {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save({"state_dict": {**source.state_dict(), **extra}, "epoch": 3}, wrapped)
    B.load_pretrained(B.build_backbone("resnet18"), "resnet18", str(wrapped))

    with pytest.raises(B.PretrainedError, match=f"{good}: not a mobilenet_v3_large state") as e:
        B.load_pretrained(B.build_backbone("mobilenet_v3_large"), "mobilenet_v3_large", str(good))
    assert re.search(r"missing \d+: features.0.0.weight", str(e.value))
    assert re.search(r"unexpected \d+: conv1.weight", str(e.value))
    shapes = r"mis-shaped \d+: layer1.0.conv1.weight \[64, 64, 3, 3\] \(expected \[64, 64, 1, 1\]\)"
    with pytest.raises(B.PretrainedError, match=shapes):
        B.load_pretrained(B.build_backbone("resnet50"), "resnet50", str(good))

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(B.PretrainedError, match=f"{truncated}: not a weights file"):
        B.load_pretrained(target, "resnet18", str(truncated))
    refused = tmp_path / "pickle.pth"  # a pickle of an object: weights_only loading refuses
    refused.write_bytes(pickle.dumps(ConfigError("x")))
    with pytest.raises(B.PretrainedError, match=f"{refused}: not a weights file"):
        B.load_pretrained(target, "resnet18", str(refused))
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    with pytest.raises(B.PretrainedError, match=f"{listed}: holds a list, not a state dict"):
        B.load_pretrained(target, "resnet18", str(listed))
    with pytest.raises(B.PretrainedError, match=r"nowhere\.pth: no such file"):
        B.load_pretrained(target, "resnet18", str(tmp_path / "nowhere.pth"))


@pytest.mark.e2e  # tries the download; this machine has no route to download.pytorch.org
def test_imagenet_offline_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("socket.getaddrinfo", _no_network)  # offline, quickly
    before = B.build_backbone("resnet18").state_dict()
    backbone = B.build_backbone("resnet18")
    backbone.load_state_dict(before)
    with pytest.raises(B.PretrainedError) as e:
        B.load_pretrained(backbone, "resnet18", "imagenet")
    message = str(e.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "model.pretrained=<path" in message
    for name, value in before.items():  # nothing loaded, nothing silently random either
        torch.testing.assert_close(backbone.state_dict()[name], value)


def test_a_bad_imagenet_file_in_the_cache_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / B.IMAGENET_WEIGHTS["resnet18"].file_name
    cached.parent.mkdir(parents=True)
    torch.save(B.build_backbone("resnet18").state_dict(), cached)
    cached.write_bytes(cached.read_bytes()[:4000])  # an interrupted copy
    with pytest.raises(B.PretrainedError, match=re.escape(f"{cached} is not a valid copy")):
        B.load_pretrained(B.build_backbone("resnet18"), "resnet18", "imagenet")
    # A good copy in the cache loads offline, as torchvision's own cache does.
    source = B.build_backbone("resnet18")
    torch.save(source.state_dict(), cached)
    target = B.build_backbone("resnet18")
    B.load_pretrained(target, "resnet18", "imagenet")
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight)


def _no_network(*args, **kwargs):
    raise OSError("no network in this test")


def test_freezing_stops_gradients_and_keeps_batchnorm_statistics():
    params = shrink_params("model.backbone=resnet18", "model.freeze_backbone=2")
    model = build_model(params).train()
    bb = model.backbone
    assert not any(p.requires_grad for p in [*bb.conv1.parameters(), *bb.layer1.parameters()])
    assert all(p.requires_grad for p in bb.layer2.parameters())
    assert not bb.bn1.training and not bb.layer1[0].bn1.training
    assert bb.layer2[0].bn1.training and model.stepper.training
    before = bb.layer1[0].bn1.running_mean.clone()
    model.encode(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(bb.layer1[0].bn1.running_mean, before)

    frozen = build_model(shrink_params("model.backbone=resnet18", "model.freeze_backbone=all"))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    with pytest.raises(ValueError, match="freeze_backbone=6: this backbone has 5 stages"):
        build_model(shrink_params("model.backbone=resnet18", "model.freeze_backbone=6"))
    with pytest.raises(ValueError, match=r"freeze_backbone=all: needs a model\.backbone"):
        build_model(shrink_params("model.freeze_backbone=all"))
    with pytest.raises(ValueError, match="seqops encoder trains from scratch"):
        build_model(shrink_params("model.pretrained=imagenet"))


def test_the_backbone_learns_at_its_own_rate():
    params = shrink_params(
        "model.backbone=mobilenet_v3_large",
        "model.freeze_backbone=1",
        "train.backbone_lr_scale=0.1",
    )
    model = build_model(params)
    groups = optimizer_groups(model, params.train)
    optimizer = torch.optim.AdamW(groups, lr=params.train.lr)
    head, backbone = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(params.train.lr * 0.1)
    assert head["lr"] == params.train.lr
    trainable = [p for p in model.backbone.parameters() if p.requires_grad]
    assert len(backbone["params"]) == len(trainable) < len(list(model.backbone.parameters()))
    assert len(head["params"]) + len(trainable) == sum(p.requires_grad for p in model.parameters())


def test_the_default_encoder_keeps_its_parameter_names():
    names = set(SeqCounter(ModelSpec.from_preset("tiny", 64, False)).state_dict())
    assert "encoder.levels.0.0.0.weight" in names and "encoder.lateral.0.weight" in names
    assert not any(".backbone." in n for n in names)


def _fsc147_fixture():
    """tests/data/test_fsc147.py's writer of a tiny tree in FSC-147's exact layout."""
    path = ROOT / "tests" / "data" / "test_fsc147.py"
    spec = importlib.util.spec_from_file_location("fsc147_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.slow  # an export per architecture (seconds each)
def test_every_backbone_exports_with_parity_and_its_normalisation(arch, tmp_path):
    from seqops.export import build_metadata, export_model
    from seqops.predictor import Predictor
    from seqops.testing import make_untrained_model

    params = shrink_params(f"model.backbone={arch}")
    spec = ModelSpec.from_preset("tiny", 64, False, backbone=arch)
    metadata = build_metadata(
        spec, params.model_dump(mode="json"), done_threshold=0.5, model_version="t", run_id=None
    )
    info = export_model(
        make_untrained_model(spec, seed=0), tmp_path / arch, metadata, params.export
    )
    assert info["parity"]["passed"] and info["parity"]["max_abs_diff"] <= 1e-4
    predictor = Predictor(tmp_path / arch, device="cpu", threads=1)
    assert predictor.info.mean == B.IMAGENET_MEAN and predictor.info.std == B.IMAGENET_STD


@pytest.mark.slow
@pytest.mark.e2e  # a gloo process group, the CLI stages and a real HTTP server
def test_fsc147_to_a_served_count_with_a_resnet18_state_dict(tmp_path, monkeypatch, mlflow_uri):
    """prepare.source=fsc147 -> model.backbone=resnet18 + model.pretrained=<path> -> train
    (under torchrun's environment, DDP on gloo, then resumed) -> export (registered in
    MLflow) -> serve."""
    import httpx
    import mlflow
    from conftest import free_port
    from serving.serve_fixtures import Server

    from seqops.cli import main
    from seqops.predictor import Predictor
    from seqops.training import checkpoint as ckpt

    fixture = _fsc147_fixture()
    root = fixture.write_fsc147(tmp_path / "fsc147", bad=())
    weights = tmp_path / "resnet18-test.pth"
    torch.manual_seed(1)
    torch.save(B.build_backbone("resnet18").state_dict(), weights)
    sets = {
        "prepare.source": "fsc147", "prepare.fsc147.root": str(root), "prepare.image_size": 64,
        "prepare.min_objects": 1, "prepare.max_objects": 50, "prepare.on_error": "skip",
        "model.backbone": "resnet18", "model.pretrained": str(weights),
        "model.freeze_backbone": 1, "train.backbone_lr_scale": 0.1, "train.batch_size": 1,
        "train.epochs": 1, "train.rollout_images": 1, "train.picture_samples": 0,
        "evaluate.max_objects": 5,
    }  # fmt: skip
    base = ["--params", str(ROOT / "params.yaml")]
    base += [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]
    data, models = tmp_path / "prepared", tmp_path / "models"
    assert main(["prepare", *base, "--out", str(data)]) == 0
    train = ["train", *base, "--data", str(data), "--out", str(models)]
    train += ["--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "p.csv")]
    train += ["--report", str(tmp_path / "r.json")]
    torchrun = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**torchrun, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    assert main(train) == 0
    first = ckpt.load_checkpoint(models / "last.pt")
    # The pretrained weights went in (frozen stem: unchanged after training).
    saved = torch.load(weights, weights_only=True)
    torch.testing.assert_close(first["model_state"]["encoder.backbone.conv1.weight"],
                               saved["conv1.weight"])  # fmt: skip
    assert len(first["optimizer_state"]["param_groups"]) == 2
    assert main([*train, "--set", "train.epochs=2", "--set", "train.resume=require"]) == 0
    assert ckpt.load_checkpoint(models / "last.pt")["epoch"] == 2

    out = models / "onnx"
    export = ["export", *base, "--checkpoint", str(models / "best.pt"), "--data", str(data)]
    export += ["--run", str(models / "train_run.json"), "--out", str(out)]
    export += ["--metrics", str(tmp_path / "e.json"), "--report", str(tmp_path / "er.json")]
    assert main(export) == 0
    report = json.loads((tmp_path / "er.json").read_text())
    assert report["parity_passed"] and report["parity_max_abs_diff"] <= 1e-4
    assert json.loads((out / "model.json").read_text())["mean"] == list(B.IMAGENET_MEAN)
    assert report["logged_in_training_run"] and report["registered_version"]
    registered = Path(mlflow.artifacts.download_artifacts("models:/seqops@candidate"))
    for name in ("encoder.onnx", "step.onnx"):
        assert (registered / "extra_files" / name).read_bytes() == (out / name).read_bytes()

    image = (root / fixture.IMAGES_DIR / "3.jpg").read_bytes()
    want = Predictor(out, device="cpu", threads=1).predict([image], max_objects=5)[0]
    with Server(out, tmp_path / "serve.log", "--max-objects", "5") as server:
        response = httpx.post(
            f"{server.base}/predict", content=image, headers={"content-type": "image/jpeg"}
        )
    assert response.status_code == 200, response.text
    assert response.json()["count"] == want.count
    np.testing.assert_allclose(response.json()["points"], want.points, atol=0.02)


@pytest.mark.slow
@pytest.mark.e2e  # a gloo process group on a local port
@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "resnet50"])
def test_a_backbone_run_resumes_as_if_never_stopped_under_ddp(arch, tiny_dataset, tmp_path,
                                                                monkeypatch):  # fmt: skip
    """Frozen stages, the backbone's own learning rate and DDP: a run stopped after one epoch
    and resumed ends with the same weights as one that never stopped."""
    from conftest import free_port

    from seqops.training import checkpoint as ckpt
    from seqops.training.train import run_train

    torchrun = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    sets = (
        f"model.backbone={arch}", "model.freeze_backbone=2", "train.backbone_lr_scale=0.1",
        "train.lr_schedule=none", "train.rollout_images=0", "train.picture_samples=0",
    )  # fmt: skip

    def train(out, epochs, resume="auto"):
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        run_train(
            shrink_params(*sets, f"train.epochs={epochs}"), tiny_dataset, out / "models",
            metrics_path=out / "m.json", plots_path=out / "p.csv", report_path=out / "r.json",
            track=False, resume=resume,
        )  # fmt: skip
        return ckpt.load_checkpoint(out / "models" / "last.pt")

    straight = train(tmp_path / "straight", 2)
    train(tmp_path / "resumed", 1)
    resumed = train(tmp_path / "resumed", 2, resume="require")
    assert resumed["epoch"] == 2
    for name, value in straight["model_state"].items():
        torch.testing.assert_close(resumed["model_state"][name], value, msg=name)
    groups = resumed["optimizer_state"]["param_groups"]
    lr = shrink_params().train.lr
    assert [g["lr"] for g in groups] == pytest.approx([lr, lr * 0.1])
