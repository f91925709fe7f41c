"""Checkpoints: self-describing, atomic, read with weights_only=True, rebuild the same model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from seqops.model import SeqCounter, spec_from_params
from seqops.training import checkpoint as ckpt


@pytest.fixture
def model(tiny_params) -> SeqCounter:
    torch.manual_seed(0)
    return SeqCounter(spec_from_params(tiny_params)).eval()


def state_of(model: SeqCounter, params, **extra) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 1, 8, 8)).xy.sum().backward()
    optimizer.step()  # a non-empty optimizer state (exp_avg tensors, step counts)
    return {
        "model_state": model.state_dict(),
        "model_spec": model.spec.to_dict(),
        "params": params.model_dump(mode="json"),
        "epoch": 3,
        "best_val_loss": 0.25,
        "optimizer_state": optimizer.state_dict(),
        "run_id": None,
        **extra,
    }


def test_round_trip_rebuilds_an_identical_model(tmp_path, model, tiny_params):
    path = tmp_path / "models" / "best.pt"
    ckpt.save_checkpoint(path, state_of(model, tiny_params))
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temporary left behind
    raw = torch.load(path, weights_only=True)  # what export and evaluate will do
    assert raw["epoch"] == 3 and raw["best_val_loss"] == 0.25
    assert raw["params"]["train"]["loss"]["w_done"] == tiny_params.train.loss.w_done
    rebuilt, state = ckpt.load_model(path)
    assert rebuilt.spec == model.spec
    assert "exp_avg" in str(state["optimizer_state"]["state"][0].keys())
    images, marks = torch.rand(2, 3, 64, 64), torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        expected, got = model(images, marks), rebuilt(images, marks)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_keys_are_refused_on_save(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="model_spec"):
        ckpt.save_checkpoint(tmp_path / "x.pt", {"model_state": {}, "epoch": 1})


def test_missing_or_corrupt_file_names_the_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match=r"bad\.pt"):
        ckpt.load_checkpoint(bad)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "payload": object()}, path)
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(path)


def test_rng_state_survives_a_weights_only_round_trip(tmp_path, model, tiny_params):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, state_of(model, tiny_params, rng_state=ckpt.capture_rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng_state(ckpt.load_checkpoint(path)["rng_state"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
