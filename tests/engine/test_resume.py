"""Resume semantics on real data: which training state a resume uses, a finished run, a run extended
with more epochs, --resume auto, times across resumes. (Kills at random points, signals and disk
faults with real processes are in tests/faults/.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat

import pytest
import torch

from imgtrain.api import train
from imgtrain.cli import main
from imgtrain.config import load_recipe
from imgtrain.engine.checkpoint import (
    PREVIOUS_STATE_FILE,
    RUN_FILE,
    STATE_FILE,
    CheckpointError,
    load_resumable_state,
    load_training_state,
)
from imgtrain.engine.events import Hook
from imgtrain.engine.preemption import StopSignals, TrainingPreempted
from imgtrain.tracking import read_history

TIMING = ("epoch_seconds", "images_per_second")


def recipe(*overrides: str):
    return load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "output.progress=off",
                                      "output.plots=false", "output.report=false", "train.epochs=3",
                                      "train.max_steps_per_epoch=6", "train.deterministic=true",
                                      "train.threads=1", *overrides])


def rows(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, interrupt_at):
    """A run stopped in epoch 2 (after batch 4, state every 2 steps), and the same run uninterrupted."""
    base = tmp_path_factory.mktemp("resume")
    full = train(recipe("train.checkpoint_every.steps=2"), run_dir=base / "full")
    with pytest.raises(KeyboardInterrupt):
        train(recipe("train.checkpoint_every.steps=2"), run_dir=base / "cut", hooks=[interrupt_at(1, 4)])
    return base, full


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_two_states_are_kept_and_the_last_is_mid_epoch(stopped_run):
    base, _ = stopped_run
    ckpt = base / "cut" / "checkpoints"
    last, previous = load_training_state(ckpt / STATE_FILE), load_training_state(ckpt / PREVIOUS_STATE_FILE)
    assert last["mid_epoch"]["epoch"] == 1 and last["mid_epoch"]["batches_done"] == 4
    assert previous["mid_epoch"]["batches_done"] == 2  # the save before: two steps earlier
    assert last["run_id"] == json.loads((base / "cut" / RUN_FILE).read_text())["run_id"]
    # every file of the run folder a user may copy or read has the usual mode, not mkstemp's 0600
    usual = stat.S_IMODE((base / "cut" / "config.yaml").stat().st_mode)
    assert stat.S_IMODE((ckpt / STATE_FILE).stat().st_mode) == usual
    assert stat.S_IMODE((ckpt / "last.safetensors").stat().st_mode) & 0o044 == 0o044


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a state", "another run's"])
def test_a_damaged_last_state_falls_back_to_the_previous(damage, stopped_run, tmp_path, capsys):
    base, full = stopped_run
    run = copy_of(base / "cut", tmp_path)
    last = run / "checkpoints" / STATE_FILE
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "not a state":
        torch.save({"weights": torch.zeros(3)}, last)
    else:
        shutil.copy(base / "full" / "checkpoints" / STATE_FILE, last)
    resumed = train(load_recipe(run / "config.yaml"), resume=run)
    err = capsys.readouterr().err
    assert f"{last}: " in err and f"resuming from {run / 'checkpoints' / PREVIOUS_STATE_FILE} instead" in err
    assert {"truncated": "corrupt or truncated", "empty": "empty file (0 bytes)",
            "not a state": "not a training state", "another run's": "the training state of another run"}[damage] in err
    assert rows(resumed.history) == rows(full.history)
    assert "resumed from the state before it" in (run / "train.log").read_text()


def test_no_usable_state_is_an_error_that_lists_each_problem(stopped_run, tmp_path):
    base, _ = stopped_run
    run = copy_of(base / "cut", tmp_path)
    (run / "checkpoints" / STATE_FILE).write_bytes(b"")
    (run / "checkpoints" / PREVIOUS_STATE_FILE).write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="no usable training state") as error:
        load_resumable_state(run / "checkpoints")
    assert STATE_FILE in str(error.value) and PREVIOUS_STATE_FILE in str(error.value)
    assert main(["train", "--resume", str(run)]) == 2


def test_a_finished_run_resumed_is_left_as_it_is(stopped_run, tmp_path, capsys):
    base, _ = stopped_run
    run = copy_of(base / "full", tmp_path)
    before = {name: (run / name).read_bytes() for name in ("summary.json", "events.jsonl", "history.csv")}
    assert main(["train", "--resume", str(run)]) == 0
    assert "already finished (3 epochs); nothing to do" in capsys.readouterr().err
    assert {name: (run / name).read_bytes() for name in before} == before


def test_more_epochs_on_a_finished_run_start_a_new_schedule_segment(stopped_run, tmp_path):
    base, full = stopped_run
    run = copy_of(base / "full", tmp_path)
    assert main(["train", "--resume", str(run), "train.epochs=5"]) == 0
    history = read_history(run / "history.csv")
    assert len(history) == 5 and rows(history[:3]) == rows(read_history(full.run_dir / "history.csv"))
    # one-cycle: the first segment ends near 0; the added one warms up again from a low lr, peaks, anneals
    lrs = [row["lr"] for row in history]
    assert lrs[2] < 0.05 * lrs[0] and lrs[3] > 10 * lrs[2] and lrs[4] < lrs[3]
    assert json.loads((run / RUN_FILE).read_text())["segments"] == [3, 2]
    assert load_recipe(run / "config.yaml").train.epochs == 5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 5 and summary["wall_seconds"] > full.summary["wall_seconds"]
    # fewer epochs than planned cannot be asked for
    assert main(["train", "--resume", str(run), "train.epochs=4"]) == 2


def test_times_add_up_across_a_resume(stopped_run, tmp_path):
    base, full = stopped_run
    run = copy_of(base / "cut", tmp_path)
    before = load_training_state(run / "checkpoints" / STATE_FILE)["fit_seconds"]
    assert before > 0
    resumed = train(load_recipe(run / "config.yaml"), resume=run)
    assert rows(resumed.history) == rows(full.history)
    assert resumed.summary["wall_seconds"] > before and resumed.summary["total_seconds"] > before


def test_resume_auto_starts_a_run_then_continues_it(stopped_run, tmp_path, interrupt_at):
    _, full = stopped_run
    run = tmp_path / "auto"
    with pytest.raises(KeyboardInterrupt):  # nothing there yet: a new run, at exactly that folder
        train(recipe("train.checkpoint_every.steps=2"), run_dir=run, resume="auto", hooks=[interrupt_at(1, 4)])
    assert (run / "checkpoints" / STATE_FILE).is_file()
    resumed = train(recipe("train.checkpoint_every.steps=2"), run_dir=run, resume="auto")
    assert resumed.run_dir == run and rows(resumed.history) == rows(full.history)
    # the recipe key does the same, and a finished run is then left alone
    again = train(recipe("train.checkpoint_every.steps=2", "train.auto_resume=true"), run_dir=run)
    assert rows(again.history) == rows(full.history)


def test_a_resumed_run_starts_its_log_on_a_line_of_its_own(stopped_run, tmp_path):
    base, _ = stopped_run
    run = copy_of(base / "cut", tmp_path)
    log = run / "train.log"
    log.write_text(log.read_text() + "2026-01-01 00:00:00 a line cut short by a kill")  # no final newline
    train(load_recipe(run / "config.yaml"), resume=run)
    lines = log.read_text().splitlines()
    assert lines[-1].split(" ", 2)[2].startswith("fit_end") and log.read_text().endswith("\n")
    assert all(line.count(" fit_start ") <= 1 and not line.endswith("short by a kill2026") for line in lines)
    assert any(line.endswith("a line cut short by a kill") for line in lines)  # kept, ended


class SignalAt(Hook):
    """Sends this process a signal at the start of a batch, as a scheduler or Ctrl-C would."""

    name = "signal"

    def __init__(self, epoch: int, batch: int, signum: int):
        self.epoch, self.batch, self.signum = epoch, batch, signum

    def batch_start(self, state):
        if state.epoch == self.epoch and state.batch_index == self.batch:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 75)])
def test_a_signal_saves_the_batch_under_way_and_stops(signum, code, stopped_run, tmp_path):
    """Ctrl-C or SIGTERM at batch 3 of epoch 2: that batch's step is taken, a mid-epoch state is saved
    (no train.checkpoint_every needed), the run stops with the signal's exit code and resumes exactly."""
    _, full = stopped_run
    run = tmp_path / "run"
    with pytest.raises(TrainingPreempted) as stop:
        train(recipe(), run_dir=run, hooks=[SignalAt(1, 3, signum)])
    assert stop.value.exit_code == code and stop.value.batches_done == 4
    saved = load_training_state(run / "checkpoints" / STATE_FILE)
    assert saved["mid_epoch"]["batches_done"] == 4
    assert f"stopped by {signal.Signals(signum).name} in epoch 2, after 4 batches" in (run / "train.log").read_text()
    # the handler was the run's only while it trained
    assert not isinstance(getattr(signal.getsignal(signum), "__self__", None), StopSignals)
    resumed = train(load_recipe(run / "config.yaml"), resume=run)
    assert rows(resumed.history) == rows(full.history)
