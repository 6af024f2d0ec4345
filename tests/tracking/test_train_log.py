"""train.log: timestamped fit_start, epoch, note and fit_end lines; a resume appends."""

from __future__ import annotations

import re

import torch

from imgtrain.tracking.logfile import TrainLogTracker
from imgtrain.tracking.progress import format_epoch_line

STAMP = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} "


def _messages(path):
    lines = path.read_text().splitlines()
    for line in lines:
        assert re.match(STAMP, line), line
    return [line[20:] for line in lines]  # drop "YYYY-MM-DD HH:MM:SS "


def test_lines_of_a_run_and_a_resume(run_dir, make_state, fake_loop):
    tracker = TrainLogTracker(run_dir)
    tracker.log("data: 128 train images")  # the loop may log before fit_start
    state = make_state(epochs=3)
    fake_loop(state, [tracker]).fit(epochs=2)
    tracker.log("warning: loss spiked\nsecond line")

    resumed = make_state(epochs=3)
    resumed.history = list(state.history)
    resumed.epoch = 2
    resumed.amp_dtype = torch.bfloat16
    fake_loop(resumed, [TrainLogTracker(run_dir)]).fit()

    messages = _messages(run_dir / "train.log")
    assert messages[0] == "data: 128 train images"
    assert messages[1] == ("fit_start model imgtrain_cnn_small device cpu amp off parameters 33 "
                           "trainable 33 epochs 3 steps_per_epoch 8")
    assert messages[2] == format_epoch_line(state.history[0], 3)
    assert messages[3] == format_epoch_line(state.history[1], 3)
    assert messages[4] == "fit_end epochs_run 2 best_val_acc 0.65"
    assert messages[5:7] == ["warning: loss spiked", "second line"]
    # the resumed run continues the same file
    assert messages[7] == ("fit_start model imgtrain_cnn_small device cpu amp bfloat16 parameters 33 "
                           "trainable 33 epochs 3 steps_per_epoch 8 resumed_from_epoch 2")
    assert messages[8].startswith("epoch 3/3 train_loss 0.3333 train_acc 75.0% ")
    assert messages[9] == "fit_end epochs_run 3 best_val_acc 0.75"
    assert len(messages) == 10
