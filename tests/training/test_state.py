"""The training state: early stopping, whether last.pt may be resumed, checkpoint/restore."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch
from conftest import shrink_params

from seqops.config import Params
from seqops.model import SeqCounter, spec_from_params
from seqops.training import checkpoint as ckpt
from seqops.training.state import EarlyStopping, TrainingState, resume_mismatch
from seqops.training.train import build_scheduler, report_resumed


def make_state(params: Params, seed: int) -> TrainingState:
    """A fresh state (network, AdamW, the cosine schedule) as ``set_up`` builds one."""
    torch.manual_seed(seed)
    model = SeqCounter(spec_from_params(params))
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr)
    return TrainingState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, params.train, steps_per_epoch=3),
        stopper=EarlyStopping(params.train.patience),
        params=params,
        data_fingerprint="abc",
    )


def take_a_step(state: TrainingState, images: torch.Tensor, marks: torch.Tensor) -> None:
    out = state.model(images, marks)
    state.optimizer.zero_grad()
    (out.xy.sum() + out.done_logit.sum()).backward()
    state.optimizer.step()
    state.scheduler.step()


def weights(state: TrainingState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=0, msg=name)


def test_checkpoint_and_restore_bring_back_the_whole_state(tmp_path, tiny_params):
    images, marks = torch.rand(2, 3, 64, 64), torch.rand(2, 1, 8, 8)
    trained = make_state(tiny_params, seed=0)
    for epoch, val_loss in ((1, 0.7), (2, 0.9)):
        take_a_step(trained, images, marks)
        best = trained.end_epoch(epoch, val_loss)
        trained.record({"epoch": epoch, "val/loss": val_loss}, best=best)
    trained.run_id = "run-1"
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, trained.checkpoint())
    draws = (random.random(), np.random.rand(), torch.rand(1).item())  # after the capture

    restored = make_state(tiny_params, seed=1)
    assert any(not torch.equal(v, weights(trained)[k]) for k, v in weights(restored).items())
    random.seed(9)
    np.random.seed(9)
    assert restored.resume(path, "require")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    assert_same_weights(weights(trained), weights(restored))
    assert_same_weights(trained.best_model_state, restored.best_model_state)
    assert (restored.epoch, restored.history, restored.run_id) == (2, trained.history, "run-1")
    assert (restored.stopper.best, restored.stopper.best_epoch) == (0.7, 1)
    assert restored.stopper.bad_epochs == 1
    assert restored.scheduler.last_epoch == 2
    assert restored.scheduler.get_last_lr() == trained.scheduler.get_last_lr()
    # AdamW's moments came back too: the next step lands on the same weights.
    take_a_step(trained, images, marks)
    take_a_step(restored, images, marks)
    assert_same_weights(weights(trained), weights(restored))


def test_a_checkpoint_describes_itself(tiny_params):
    state = make_state(tiny_params, seed=0)
    state.end_epoch(1, 0.5)
    state.record({"epoch": 1, "val/loss": 0.5, "val/count_mae": math.nan}, best=True)
    saved = state.checkpoint()
    assert saved["model_spec"] == state.model.spec.to_dict()
    assert saved["params"] == tiny_params.model_dump(mode="json")
    assert (saved["epoch"], saved["best_val_loss"], saved["data_fingerprint"]) == (1, 0.5, "abc")
    assert saved["metrics"] == {"epoch": 1, "val/loss": 0.5, "val/count_mae": None}
    assert resume_mismatch(saved, state.model.spec.to_dict(), tiny_params, "abc") is None
    older = {k: torch.zeros_like(v) for k, v in state.model.state_dict().items()}
    best = state.describe(1, {}, model_state=older)
    assert best["model_state"] is older and "optimizer_state" not in best


def test_resume_modes(tmp_path, tiny_params):
    state = make_state(tiny_params, seed=0)
    before = weights(state)
    assert not state.resume(tmp_path / "none.pt", "auto")
    with pytest.raises(ValueError, match="nothing to resume from"):
        state.resume(tmp_path / "none.pt", "require")
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, make_state(tiny_params, seed=1).checkpoint())
    assert not state.resume(path, "never")
    assert_same_weights(before, weights(state))
    other_data = make_state(tiny_params, seed=2)
    other_data.data_fingerprint = "xyz"
    with pytest.raises(ValueError, match="prepared data differs"):
        other_data.resume(path, "require")


def test_auto_continues_only_a_run_with_epochs_left(tmp_path, tiny_params, caplog):
    """A finished last.pt with as many epochs as asked or more is not resumed by `auto` (the
    run would train nothing); `require` still resumes it; a changed train.resume is free."""
    finished = make_state(tiny_params, seed=1)
    finished.end_epoch(2, 0.5)
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, finished.checkpoint())
    two = shrink_params("train.epochs=2", "train.resume=never")
    assert not make_state(two, seed=0).resume(path, "auto")
    assert "it has 2 epochs and train.epochs is 2; training from scratch" in caplog.text
    assert make_state(two, seed=0).resume(path, "require")
    assert make_state(shrink_params("train.epochs=3"), seed=0).resume(path, "auto")


def test_a_resumed_run_with_nothing_left_to_train_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="seqops.training.train")
    state = make_state(shrink_params("train.epochs=2"), seed=0)
    state.end_epoch(2, 0.5)
    report_resumed(state, tmp_path / "last.pt", "require")
    assert "last.pt has 2 epochs and train.epochs is 2: nothing to train" in caplog.text
    caplog.clear()
    state.end_epoch(1, 0.5)  # an epoch left: no warning
    report_resumed(state, tmp_path / "last.pt", "auto")
    assert "resuming" in caplog.text and "nothing to train" not in caplog.text


def test_resume_mismatch_names_what_differs(tiny_params):
    state = {
        "model_spec": {"a": 1},
        "params": tiny_params.model_dump(mode="json"),
        "data_fingerprint": "abc",
        "optimizer_state": {},
    }
    more_epochs = shrink_params("train.epochs=9", "train.patience=2", "train.max_minutes=5")
    assert resume_mismatch(state, {"a": 1}, more_epochs, "abc") is None
    assert "model spec" in resume_mismatch(state, {"a": 2}, tiny_params, "abc")
    assert "data" in resume_mismatch(state, {"a": 1}, tiny_params, "xyz")
    reason = resume_mismatch(state, {"a": 1}, shrink_params("train.loss.w_done=1.0"), "abc")
    assert "train.loss.w_done (3.0 -> 1.0)" in reason


def test_early_stopping_stops_on_a_plateau():
    stopper = EarlyStopping(patience=3)
    decisions = []
    for epoch, value in enumerate([1.0, 0.8, 0.81, 0.8, math.nan, 0.9], start=1):
        stopper.update(value, epoch)
        decisions.append(stopper.should_stop)
    assert decisions == [False, False, False, False, True, True]
    assert (stopper.best, stopper.best_epoch) == (0.8, 2)
    restored = EarlyStopping(patience=5)
    restored.load_state_dict(stopper.state_dict())
    assert (restored.best_epoch, restored.bad_epochs, restored.patience) == (2, 4, 5)
    assert not restored.should_stop  # a larger patience lets a resumed run go on
    assert restored.update(0.5, 7) and restored.bad_epochs == 0
