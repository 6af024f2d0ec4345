"""Training diagnostics on real training: per-layer gradient norms (against a hand computation,
in history.csv and events.jsonl, with warnings once per layer), the non-finite loss guard (stop
with a message naming the step and the parameter, the last good checkpoint kept and resumable;
skip up to a limit), their resume, fp16 with a GradScaler, and bad settings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from imgtrain.api import train
from imgtrain.cli import main
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.checkpoint import load_training_state
from imgtrain.engine.events import Hook
from imgtrain.strategies.diagnostics import (
    GradientMonitorHook,
    NonFiniteGuardHook,
    NonFiniteLossError,
    classify_gradients,
    first_nonfinite_gradient,
    gradient_norms,
    missing_gradients,
    total_norm,
)
from imgtrain.tracking import read_history

STEPS = 6  # batches per epoch in these runs


def digits(*overrides: str):
    return load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "output.progress=off",
                                      "output.plots=false", "train.threads=1", "data.batch_size=32",
                                      f"train.max_steps_per_epoch={STEPS}", "schedule.name=constant",
                                      "optim.lr=0.05", *overrides])


class PoisonLoss(Hook):
    """Turns the loss of the given (epoch, batch) pairs (0-based) into nan, as a diverged step would."""

    name = "poison"

    def __init__(self, *at: tuple):
        self.at = set(at)

    def after_loss(self, state):
        if (state.epoch, state.batch_index) in self.at:
            state.loss = state.loss * float("nan")


class Interrupt(Hook):
    """Ctrl-C at the start of a batch, next to a PoisonLoss (conftest's interrupt_at replaces the extra hooks)."""

    name = "interrupt"

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def batch_start(self, state):
        if (state.epoch, state.batch_index) == (self.epoch, self.batch):
            raise KeyboardInterrupt


def events(run_dir, kind):
    records = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == kind]


# ----------------------------------------------------------------------------- pure functions

def tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))


def test_gradient_norms_match_a_hand_computation():
    net = tiny_net()
    net[0].weight.grad = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    net[0].bias.grad = torch.tensor([12.0, 0.0])
    net[2].weight.grad = torch.tensor([[1.0, 2.0]])  # net[2].bias has no gradient (frozen): left out
    norms = gradient_norms(net)
    assert norms == pytest.approx({"0": 13.0, "2": math.sqrt(5)})  # sqrt(9 + 16 + 144), sqrt(1 + 4)
    per_parameter = gradient_norms(net, by="parameter")
    assert per_parameter == pytest.approx({"0.weight": 5.0, "0.bias": 12.0, "2.weight": math.sqrt(5)})
    assert total_norm(norms) == pytest.approx(math.sqrt(169 + 5))
    assert missing_gradients(net) == ["2.bias"]

    # a real backward: loss = sum(w . x) + b has dL/dw = sum of the inputs, dL/db = batch size
    linear = torch.nn.Linear(3, 1)
    x = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    linear(x).sum().backward()
    assert gradient_norms(linear, by="parameter") == pytest.approx({"weight": 3.0, "bias": 2.0})
    assert gradient_norms(linear) == pytest.approx({"weight": 3.0, "bias": 2.0})  # root parameters: own name


def test_classify_and_first_nonfinite_gradient():
    flags = classify_gradients({"a": 1e-9, "b": 0.5, "c": 250.0, "d": float("inf"), "e": float("nan")},
                               vanishing_below=1e-7, exploding_above=100.0)
    assert flags.vanishing == ["a"] and flags.exploding == ["c", "d"] and flags.nonfinite == ["d", "e"]
    net = tiny_net()
    assert first_nonfinite_gradient(net) is None
    net[0].weight.grad = torch.ones(2, 3)
    net[2].weight.grad = torch.tensor([[1.0, float("nan")]])
    net[2].bias.grad = torch.tensor([float("inf")])
    assert first_nonfinite_gradient(net) == "2.weight"
    with pytest.raises(ValueError, match="vanishing_below < exploding_above"):
        classify_gradients({"a": 1.0}, vanishing_below=1.0, exploding_above=1.0)


# ----------------------------------------------------------------------------- gradient monitor

def test_the_monitor_writes_norms_to_history_and_events_and_warns_once_per_layer(tmp_path, capsys):
    # every layer's norm is above 0 and below 1e3, so vanishing_below=1e3 flags every layer at every reading
    result = train(digits("train.epochs=2", "diagnostics.grad_monitor_every=4", "diagnostics.vanishing_below=1000",
                          "diagnostics.exploding_above=1.0e+6"), run_dir=tmp_path / "run")
    ends = events(result.run_dir, "epoch_end")
    # steps are read at 1, 5, 9 ... of the run (6 steps per epoch)
    assert [r["step"] for r in ends[0]["grad_norms"]] == [1, 5]
    assert [r["step"] for r in ends[1]["grad_norms"]] == [9]
    layers = ends[0]["grad_norms"][0]["layers"]
    assert next(iter(layers)) == "stem.0" and list(layers)[-1] == "fc" and len(layers) == 9
    for end, row in zip(ends, read_history(result.run_dir / "history.csv")):
        readings = end["grad_norms"]
        assert all(r["total"] == pytest.approx(math.sqrt(sum(v * v for v in r["layers"].values())), rel=1e-6)
                   for r in readings)
        assert row["grad_norm_total"] == pytest.approx(sum(r["total"] for r in readings) / len(readings), rel=1e-5)
        largest = max(v for r in readings for v in r["layers"].values())
        assert row["grad_norm_max"] == pytest.approx(largest, rel=1e-5)
        assert readings[0]["layers"][row["grad_norm_max_layer"]] == pytest.approx(largest, rel=1e-5) or \
            readings[-1]["layers"][row["grad_norm_max_layer"]] == pytest.approx(largest, rel=1e-5)
        assert row["grad_vanishing_layers"] == 9 and row["grad_exploding_layers"] == 0
    log = (result.run_dir / "train.log").read_text()
    # 3 readings flag all 9 layers, but each layer is warned about once
    assert log.count("is vanishing") == 9 and log.count("layer stem.0 is vanishing") == 1
    assert capsys.readouterr().err.count("imgtrain: warning: gradient monitor: layer") == 9


# ----------------------------------------------------------------------------- non-finite guard

def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_epoch_resumable(tmp_path):
    overrides = ("train.epochs=3", "train.deterministic=true")
    full = train(digits(*overrides), run_dir=tmp_path / "full")
    with pytest.raises(NonFiniteLossError) as stopped:
        train(digits(*overrides), run_dir=tmp_path / "cut", hooks=[PoisonLoss((1, 3))])
    message = str(stopped.value)
    assert "non-finite training loss (nan) at epoch 2/3, batch 4/6, optimizer step 10" in message
    assert "first parameter with a non-finite gradient: stem.0.weight" in message
    assert "learning rate is too high" in message and "fp16 overflow" in message and "bad inputs" in message
    assert f"checkpoints of epoch 1 (the last finished) are kept: imgtrain train --resume {tmp_path / 'cut'}" in message
    saved = load_training_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")
    assert saved["epoch"] == 1 and len(saved["history"]) == 1
    assert len(read_history(tmp_path / "cut" / "history.csv")) == 1
    assert events(tmp_path / "cut", "nonfinite_loss")[0]["step"] == 10
    assert "stopped: non-finite training loss" in (tmp_path / "cut" / "train.log").read_text()
    resumed = train(digits(*overrides), resume=tmp_path / "cut")
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]


def test_the_cli_turns_the_stop_into_one_line_and_exit_code_3(tmp_path, capsys, monkeypatch):
    # the poisoning hook reaches the CLI run as a user's would: a module on the path and --hook
    (tmp_path / "poison_hooks.py").write_text(
        "from imgtrain import Hook\n\n"
        "class PoisonThirdBatch(Hook):\n"
        "    name = 'poison'\n"
        "    def after_loss(self, state):\n"
        "        if (state.epoch, state.batch_index) == (0, 2):\n"
        "            state.loss = state.loss * float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["train", "quickstart", "model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.epochs=2",
                 "train.threads=1", "output.progress=off", "output.plots=false", "train.max_steps_per_epoch=4",
                 "--run-dir", str(tmp_path / "run"), "--hook", "poison_hooks:PoisonThirdBatch"])
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("imgtrain: training stopped: non-finite training loss (nan) at epoch 1/2, batch 3/4")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "No epoch had finished, so there is no checkpoint to resume" in err
    assert not (tmp_path / "run" / "checkpoints" / "last.state.pt").exists()


def test_a_learning_rate_far_too_high_is_caught_at_the_first_nan(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1/2, batch (\d)/6, optimizer step \1;.*"
                                                 r"first parameter with a non-finite gradient: stem\.0\.weight"):
        train(digits("train.epochs=2", "optim.lr=1.0e+30"), run_dir=tmp_path / "run")


def test_deferred_checks_still_catch_the_batch_and_name_it(tmp_path):
    # losses stay on the device and are looked at every 4 batches: batch 2 is named at batch 4
    with pytest.raises(NonFiniteLossError) as stopped:
        train(digits("train.epochs=2", "diagnostics.nonfinite_check_every=4"), run_dir=tmp_path / "run",
              hooks=[PoisonLoss((0, 1))])
    assert "at epoch 1/2, batch 2/6, optimizer step 2 (found at batch 4: diagnostics.nonfinite_check_every is 4)" \
        in str(stopped.value)
    # a bad batch in the last, short window of an epoch is caught before the epoch's checkpoint
    with pytest.raises(NonFiniteLossError, match="batch 6/6"):
        train(digits("train.epochs=2", "diagnostics.nonfinite_check_every=4"), run_dir=tmp_path / "run2",
              hooks=[PoisonLoss((0, 5))])
    assert not (tmp_path / "run2" / "checkpoints" / "last.state.pt").exists()


def test_skip_mode_skips_and_counts_up_to_the_limit_then_stops(tmp_path):
    result = train(digits("train.epochs=2", "diagnostics.nonfinite=skip", "diagnostics.max_skipped_steps=2"),
                   run_dir=tmp_path / "run", hooks=[PoisonLoss((0, 1), (1, 2))])
    assert [r["nonfinite_skipped"] for r in result.history] == [1, 1]
    assert result.summary["skipped_steps"] == 2
    assert all(math.isfinite(r["train_loss"]) for r in result.history)  # the skipped batch counts at the mean
    # the nan never reached the weights
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values() if v.is_floating_point())
    assert all(math.isfinite(r["val_loss"]) for r in result.history)
    assert [(e["epoch"], e["batch"], e["step"]) for e in events(result.run_dir, "nonfinite_skipped")] == \
        [(1, 2, 2), (2, 3, 9)]
    # a third bad step is over the limit of 2: stop, saying so
    with pytest.raises(NonFiniteLossError, match=r"batch 5/6, optimizer step 11; 2 step\(s\) already skipped"):
        train(digits("train.epochs=2", "diagnostics.nonfinite=skip", "diagnostics.max_skipped_steps=2"),
              run_dir=tmp_path / "over", hooks=[PoisonLoss((0, 1), (1, 2), (1, 4))])


def test_skip_mode_with_accumulation_skips_the_whole_group_once(tmp_path):
    # 6 batches in groups of 3: batch 2 (group 1) and 3 (group 1 again) are bad: one skipped step
    result = train(digits("train.epochs=1", "train.grad_accum_steps=3", "diagnostics.nonfinite=skip"),
                   run_dir=tmp_path / "run", hooks=[PoisonLoss((0, 1), (0, 2))])
    assert result.history[0]["nonfinite_skipped"] == 1 and result.summary["skipped_steps"] == 1
    assert math.isfinite(result.history[0]["train_loss"])


def test_skip_works_with_fp16_and_its_grad_scaler(tmp_path):
    # fp16 autocast on the CPU with a GradScaler: the skipped step must still close the scaler's step
    result = train(digits("train.epochs=1", "train.amp=fp16", "diagnostics.nonfinite=skip",
                          "diagnostics.grad_monitor_every=1"), run_dir=tmp_path / "run", hooks=[PoisonLoss((0, 1))])
    assert result.summary["amp"] == "float16" and result.summary["skipped_steps"] == 1
    readings = events(result.run_dir, "epoch_end")[0]["grad_norms"]
    assert [r["step"] for r in readings] == [1, 3, 4, 5, 6]  # the skipped step 2 is not read
    assert math.isfinite(result.history[0]["train_loss"])


def test_the_skip_counter_and_the_monitor_survive_a_resume(tmp_path):
    overrides = ("train.epochs=3", "train.deterministic=true", "diagnostics.nonfinite=skip",
                 "diagnostics.max_skipped_steps=2", "diagnostics.grad_monitor_every=2",
                 "diagnostics.vanishing_below=0.05")
    poison = PoisonLoss((0, 1), (2, 3))
    full = train(digits(*overrides), run_dir=tmp_path / "full", hooks=[poison])
    assert full.summary["skipped_steps"] == 2
    with pytest.raises(KeyboardInterrupt):
        train(digits(*overrides), run_dir=tmp_path / "cut", hooks=[poison, Interrupt(1, 2)])
    saved = load_training_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")
    assert saved["hooks"]["nonfinite_guard"]["skipped"] == 1
    warned = saved["hooks"]["gradient_monitor"]["warned"]
    resumed = train(digits(*overrides), resume=tmp_path / "cut", hooks=[poison])
    timing = ("epoch_seconds", "images_per_second")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in full.history]
    assert "grad_norm_total" in resumed.history[1] and resumed.history[2]["nonfinite_skipped"] == 1
    assert resumed.summary["skipped_steps"] == 2
    log = (tmp_path / "cut" / "train.log").read_text()
    assert all(log.count(f"layer {layer} is vanishing") == 1 for layer in warned)  # not warned again


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("overrides, message", [
    (("diagnostics.vanishing_below=-1",), "diagnostics.vanishing_below: -1.0 is out of range"),
    (("diagnostics.exploding_above=0",), "diagnostics.exploding_above: 0.0 is out of range"),
    (("diagnostics.grad_monitor_every=-5",), "diagnostics.grad_monitor_every: -5 is out of range"),
    (("diagnostics.max_skipped_steps=-1",), "diagnostics.max_skipped_steps: -1 is out of range"),
    (("diagnostics.nonfinite=ignore",), "diagnostics.nonfinite: 'ignore' is not one of stop, skip, off"),
    (("diagnostics.vanishing_below=1.0", "diagnostics.exploding_above=0.5"),
     "diagnostics.vanishing_below: must be below diagnostics.exploding_above (0.5), got 1.0"),
    (("diagnostics.nonfinite=skip", "diagnostics.nonfinite_check_every=8"),
     "diagnostics.nonfinite_check_every: nonfinite: skip must see every batch's loss"),
])
def test_bad_diagnostics_settings_stop_before_training(tmp_path, overrides, message):
    with pytest.raises(RecipeError) as error:
        train(digits(*overrides), run_dir=tmp_path / "run")
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


def test_the_hooks_refuse_bad_arguments():
    with pytest.raises(ValueError):
        GradientMonitorHook(0)
    with pytest.raises(ValueError):
        NonFiniteGuardHook("skip", check_every=2)
    with pytest.raises(ValueError):
        NonFiniteGuardHook("stop", max_skipped_steps=-1)
    with pytest.raises(ValueError):
        gradient_norms(tiny_net(), by="module")
