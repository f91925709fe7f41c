"""train.resume end to end: a run asked for fewer epochs than last.pt holds trains afresh
(issue 16: `make flow SET="train.epochs=1"` after the demo trained nothing)."""

from __future__ import annotations

import logging

from conftest import shrink_params

from seqops.training.train import run_train

PLAIN = ("train.lr_schedule=none", "train.rollout_images=0", "train.picture_samples=0")


def test_fewer_epochs_than_last_pt_trains_afresh_and_require_trains_nothing(
    tiny_dataset, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="seqops.training")

    def train(*overrides: str, **kwargs) -> dict:
        params = shrink_params(*PLAIN, *overrides)
        return run_train(params, tiny_dataset, tmp_path / "models", track=False, **kwargs)

    assert train("train.epochs=2")["epochs_trained"] == 2
    # The default, train.resume=auto: last.pt's 2 epochs leave nothing of 1 to continue.
    assert train("train.epochs=1")["epochs_trained"] == 1
    assert "it has 2 epochs and train.epochs is 1; training from scratch" in caplog.text
    # require keeps last.pt (now 1 epoch) and, asked for 1, trains nothing and says so.
    caplog.clear()
    assert train("train.epochs=1", "train.resume=require")["epochs_trained"] == 1
    assert "has 1 epochs and train.epochs is 1: nothing to train" in caplog.text
