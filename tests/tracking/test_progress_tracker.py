"""Console progress: log-mode lines with the right numbers, a throttled `\\r` bar, auto mode."""

from __future__ import annotations

import io
import re

import pytest
import torch

from imgtrain.tracking.progress import ProgressTracker, format_duration, format_epoch_line


class FakeClock:
    """Seconds that advance only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_epoch_line(expected_row):
    row = expected_row(2, {"ema_val_acc": 0.8125, "note": "frozen"})
    line = format_epoch_line(row, 10)
    assert line == ("epoch 3/10 train_loss 0.3333 train_acc 75.0% val_loss 0.2667 val_acc 75.0% "
                    "lr 2.50e-02 momentum 0.9 2.5 s 51 img/s ema_val_acc 81.2% note frozen")
    assert format_epoch_line({"epoch": 1, "val_top5": 0.5, "early_stop": 0}, 2) == \
        "epoch 1/2 val_top5 50.0% early_stop 0"


def test_format_duration():
    assert format_duration(12) == "0:12"
    assert format_duration(754.4) == "12:34"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("inf")) == "?"


def test_log_mode_lines_hold_the_numbers(make_state, fake_loop):
    stream = io.StringIO()
    clock = FakeClock()
    tracker = ProgressTracker("log", stream, clock=clock)
    state = make_state(epochs=2, steps_per_epoch=8)
    loop = fake_loop(state, [tracker], on_step=lambda: clock.advance(0.5))
    loop.hooks.fire("fit_start", state)
    loop.run_epoch()
    loop.run_epoch()

    out = stream.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    # 25%, 50%, 75% of 8 steps, then the summary line, per epoch
    assert len(lines) == 8
    assert lines[0].startswith("epoch 1/2 2/8 (25%) loss 1.000 acc 50.0% lr 1.0e-01 ")
    # 32 images in 1.0 s; 6 batches left at 0.5 s each
    assert " 32 img/s ETA 0:03 mem " in lines[0]
    assert re.search(r"mem \d+ MB$", lines[0])
    assert lines[1].startswith("epoch 1/2 4/8 (50%) ")
    assert lines[2].startswith("epoch 1/2 6/8 (75%) ")
    assert lines[3] == format_epoch_line(state.history[0], 2)
    assert lines[3].startswith("epoch 1/2 train_loss 1 train_acc 50.0% val_loss 0.8 val_acc 55.0%")
    # epoch 2: loss 1/2, accuracy 62.5%, lr halved by the StepLR
    assert lines[4].startswith("epoch 2/2 2/8 (25%) loss 0.500 acc 62.5% lr 5.0e-02 ")
    assert lines[7].startswith("epoch 2/2 train_loss 0.5 train_acc 62.5%")
    assert tracker.draws == 6


def test_bar_mode_redraws_in_place_and_is_throttled(make_state, fake_loop):
    stream = io.StringIO()
    clock = FakeClock()
    tracker = ProgressTracker("bar", stream, refresh_seconds=0.1, clock=clock)
    state = make_state(epochs=1, steps_per_epoch=1000)
    # 1000 steps/s: the epoch's 1000 steps take 1 s
    fake_loop(state, [tracker], on_step=lambda: clock.advance(0.001)).fit()

    out = stream.getvalue()
    redraws = out.count("\r")
    # one draw at the first step, then at most one per 0.1 s, plus the epoch's last step
    assert 9 <= redraws <= 12
    assert tracker.draws == redraws
    bar_part, summary, tail = out.rsplit("\n", 2)
    assert tail == ""
    last_draw = bar_part.rsplit("\r", 1)[1]
    assert last_draw.startswith("epoch 1/1 [####################] 1000/1000 loss 1.000 acc 50.0% ")
    first_draw = bar_part.split("\r")[1]
    assert first_draw.startswith("epoch 1/1 [--------------------] 1/1000 ")
    assert summary == format_epoch_line(state.history[0], 1)


def test_bar_line_shows_eta_and_speed(make_state, fake_loop):
    stream = io.StringIO()
    clock = FakeClock()
    tracker = ProgressTracker("bar", stream, clock=clock)
    state = make_state(epochs=10, steps_per_epoch=200)
    state.epoch = 2
    loop = fake_loop(state, [tracker])
    loop.hooks.fire("epoch_start", state)
    state.images_seen = 120 * 16
    state.loss_sum = torch.tensor(0.512 * state.images_seen)
    state.correct_sum = torch.tensor(round(0.812 * state.images_seen))
    state.batch_index = 119
    clock.now += 1.2  # 120 batches in 1.2 s: 80 left take 0.8 s
    tracker.after_step(state)
    line = stream.getvalue().split("\r")[-1]
    assert line.startswith("epoch 3/10 [############--------] 120/200 loss 0.512 acc 81.2% lr 1.0e-01 "
                           "1600 img/s ETA 0:01 mem ")


@pytest.mark.parametrize("stream, expected", [(io.StringIO(), "log"), (TtyStream(), "bar")])
def test_auto_mode_picks_bar_only_on_a_terminal(stream, expected):
    assert ProgressTracker("auto", stream).mode == expected


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="progress mode must be one of auto, bar, log"):
        ProgressTracker("off", io.StringIO())
