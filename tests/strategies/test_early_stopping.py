"""Early stopping on real training: stops after `patience` epochs without improvement, restores
the best weights, survives a resume, and refuses a metric the run does not log."""

from __future__ import annotations

import pytest
import torch

from imgtrain.api import train
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.checkpoint import load_training_state, read_metadata
from imgtrain.strategies.early_stopping import monitor_mode, should_stop


def digits(*overrides: str):
    return load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "output.progress=off",
                                      "output.plots=false", "train.threads=1", "schedule.name=constant",
                                      "optim.lr=0.05", *overrides])


def test_should_stop_counts_epochs_without_improvement():
    best, wait, stops = None, 0, []
    for value in [1.0, 0.8, 0.79, 0.85, 0.7, 0.71, 0.72]:
        stop, best, wait = should_stop(value, best, wait, mode="min", patience=2, min_delta=0.02)
        stops.append((stop, best, wait))
    # 0.79 is not 0.02 better than 0.8; 0.85 is worse: two in a row -> stop
    assert stops[2] == (False, 0.8, 1) and stops[3] == (True, 0.8, 2)
    assert stops[4] == (False, 0.7, 0) and stops[6] == (True, 0.7, 2)
    assert monitor_mode("val_loss", "auto") == "min" and monitor_mode("val_acc", "auto") == "max"


def test_stops_after_patience_epochs_and_says_so(tmp_path):
    # no epoch can beat the first by 0.5 of accuracy: epochs 2 and 3 do not improve -> stop after 3 of 10
    result = train(digits("train.epochs=10", "early_stop.monitor=val_acc", "early_stop.patience=2",
                          "early_stop.min_delta=0.5"), run_dir=tmp_path / "run")
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.summary["early_stopped_epoch"] == 3 and result.summary["early_stop_best_epoch"] == 1
    assert read_metadata(result.run_dir / "checkpoints" / "last.safetensors")["epoch"] == 3
    assert result.summary["test_acc"] > 0.5  # the run still scores its test split


def test_restore_best_puts_the_best_epochs_weights_back(tmp_path):
    # max of train_loss: the first epoch is the "best", so the model must end with epoch 1's weights.
    # No test split: with one, api.train scores the best checkpoint (output.best_metric) and the
    # returned model holds those weights instead
    first = train(digits("train.epochs=1", "data.test_fraction=0"), run_dir=tmp_path / "one")
    result = train(digits("train.epochs=6", "data.test_fraction=0", "early_stop.monitor=train_loss",
                          "early_stop.mode=max", "early_stop.patience=2", "early_stop.restore_best=true"),
                   run_dir=tmp_path / "run")
    assert len(result.history) == 3 and result.summary["restored_best_epoch"] == 1
    expected = first.model.state_dict()
    restored = result.model.state_dict()
    assert all(torch.equal(restored[k], expected[k]) for k in expected)
    trained = load_training_state(result.run_dir / "checkpoints" / "last.state.pt")["model"]
    assert not torch.equal(trained["fc.weight"], restored["fc.weight"])  # epoch 3 had moved on


def test_the_patience_counter_survives_a_resume(tmp_path, interrupt_at):
    # nothing beats epoch 1 by 0.5 of accuracy: the run stops after epoch 4 (patience 3)
    overrides = ("train.deterministic=true", "train.epochs=8", "early_stop.monitor=val_acc",
                 "early_stop.patience=3", "early_stop.min_delta=0.5")
    full = train(digits(*overrides), run_dir=tmp_path / "full")
    stop_epoch = full.summary["early_stopped_epoch"]
    assert stop_epoch == len(full.history) == 4
    with pytest.raises(KeyboardInterrupt):
        train(digits(*overrides), run_dir=tmp_path / "cut", hooks=[interrupt_at(stop_epoch - 1, 3)])
    saved = load_training_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")
    assert saved["epoch"] == 3 and saved["hooks"]["early_stopping"]["wait"] == 2
    resumed = train(digits(*overrides), resume=tmp_path / "cut")
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]  # 4 epochs, not 8
    assert resumed.summary["early_stopped_epoch"] == stop_epoch


@pytest.mark.parametrize("overrides, message", [
    (("early_stop.monitor=val_accuracy",), "early_stop.monitor: 'val_accuracy' is not a metric this run logs"),
    (("early_stop.monitor=val_loss", "data.val_fraction=0"), "(this run has no validation split)"),
])
def test_a_metric_the_run_does_not_log_stops_before_training(tmp_path, overrides, message):
    with pytest.raises(RecipeError) as info:
        train(digits(*overrides), run_dir=tmp_path / "run")
    assert message in str(info.value)
    assert not (tmp_path / "run").exists()
