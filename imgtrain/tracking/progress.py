"""Console progress: a tqdm bar on a terminal, plain lines in CI logs and files.

Modes: "bar", a tqdm bar per epoch redrawn in place (`epoch 3/10 [#####---] 120/200 loss 0.512 acc 81.2% ...`);
"log", a plain line at about 25%, 50% and 75% of each epoch; "auto", "bar" on a terminal, else "log". Both end
each epoch with `format_epoch_line` (as train.log does). `after_step` fires thousands of times a minute and
reading `state.loss_sum` (a device tensor) syncs the GPU, so it does O(1) host work and reads tensors only when
it draws, at most `1 / refresh_seconds` times a second: the tracker, not tqdm's throttle, decides when to draw.
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import psutil
import torch
from tqdm import tqdm

from imgtrain.engine.events import Hook
from imgtrain.tracking.history import history_columns

MODES = ("auto", "bar", "log")
BAR_WIDTH = 20  # characters between the brackets
LOG_FRACTIONS = (0.25, 0.5, 0.75)  # log mode prints a line when an epoch passes each of these
FALLBACK_COLUMNS, FALLBACK_ROWS = 120, 24  # bar: the terminal's size when it reports none (some ptys)
UNIT_FORMATS = {"epoch_seconds": "{:.1f} s", "images_per_second": "{:.0f} img/s", "lr": "lr {:.2e}"}


def is_accuracy_key(key: str) -> bool:
    """History columns holding a fraction 0..1 that reads better as a percentage."""
    last = key.split("_")[-1]
    return last in ("acc", "accuracy") or (last.startswith("top") and last[3:].isdigit())


def format_duration(seconds: float) -> str:
    """12 -> "0:12", 754 -> "12:34", 3725 -> "1:02:05"."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_metric(key: str, value: Any) -> str:
    """One `name value` piece of an epoch line, with units where the column has one."""
    if hasattr(value, "item") and callable(value.item):  # tensors and numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{key} {value}"
    if key in UNIT_FORMATS:
        return UNIT_FORMATS[key].format(value)
    if is_accuracy_key(key):
        return f"{key} {100.0 * value:.1f}%"
    if isinstance(value, int):
        return f"{key} {value}"
    return f"{key} {value:.4g}"


def format_epoch_line(row: dict[str, Any], epochs: int) -> str:
    """`epoch 3/10 train_loss 0.5123 train_acc 81.2% ... 12.3 s 1830 img/s`: a history row's keys
    in history.csv column order."""
    parts = [format_metric(key, row[key]) for key in history_columns([row]) if key != "epoch" and row[key] is not None]
    return " ".join([f"epoch {row.get('epoch', '?')}/{epochs}", *parts])


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class ProgressTracker(Hook):
    """Training progress on `stream` (default `sys.stderr`). `refresh_seconds`: the least time
    between two bar redraws; `clock` (monotonic seconds) is injectable so tests can drive time."""

    name = "progress"

    def __init__(self, mode: str = "auto", stream: TextIO | None = None,
                 refresh_seconds: float = 0.1, clock: Callable[[], float] = time.perf_counter):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r} "
                             f"(for output.progress: off, leave the ProgressTracker out)")
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.mode = ("bar" if _isatty(self.stream) else "log") if mode == "auto" else mode
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self.draws = 0                 # status lines drawn (bar updates or log lines), all epochs
        self._process = psutil.Process()
        self._epoch_t0 = 0.0
        self._next_draw = -math.inf    # bar: clock time of the next allowed redraw
        self._marks: list[int] = []    # log: batch counts that print a line, ascending
        self._mark_index = 0
        self._bar: tqdm | None = None  # bar: this epoch's, from its first draw until its last step

    def epoch_start(self, state: Any) -> None:
        self._epoch_t0 = self.clock()
        self._next_draw = -math.inf    # draw the first step at once
        total = state.steps_per_epoch
        self._marks = sorted({math.ceil(total * f) for f in LOG_FRACTIONS} - {0, total})
        self._mark_index = 0

    def after_step(self, state: Any) -> None:
        done = state.batch_index + 1
        if self.mode == "bar":
            now = self.clock()
            # the epoch's last step always draws, so the bar never ends short of 100%
            if now < self._next_draw and done < state.steps_per_epoch:
                return
            self._next_draw = now + self.refresh_seconds
            self._draw_bar(state, done, now)
        else:
            if self._mark_index >= len(self._marks) or done < self._marks[self._mark_index]:
                return
            while self._mark_index < len(self._marks) and done >= self._marks[self._mark_index]:
                self._mark_index += 1
            percent = 100 * done // max(state.steps_per_epoch, 1)
            self._write_line(f"{self._epoch_label(state)} {done}/{state.steps_per_epoch} ({percent}%) "
                             + self.status(state, done, self.clock()))
            self.draws += 1

    def epoch_end(self, state: Any) -> None:
        self._close_bar()
        row = state.history[-1] if state.history else state.epoch_metrics
        self._write_line(format_epoch_line(row, state.epochs))

    def fit_end(self, state: Any) -> None:
        self._close_bar()  # training stopped mid-epoch: do not leave the cursor on the bar

    def status(self, state: Any, done: int, now: float) -> str:
        """`loss 0.512 acc 81.2% lr 3.2e-02 1830 img/s ETA 0:12 mem 412 MB` for this moment (the only
        place tensors are read)."""
        seen = int(state.images_seen)
        elapsed = now - self._epoch_t0
        parts = []
        if seen > 0 and state.loss_sum is not None:
            parts.append(f"loss {float(state.loss_sum) / seen:.3f}")  # float() syncs the device
        if seen > 0 and state.correct_sum is not None:
            parts.append(f"acc {100.0 * float(state.correct_sum) / seen:.1f}%")
        parts.append(f"lr {state.lr:.1e}")
        if elapsed > 0 and seen > 0:
            parts.append(f"{seen / elapsed:.0f} img/s")
        if done > 0:
            parts.append(f"ETA {format_duration((state.steps_per_epoch - done) * elapsed / done)}")
        parts.append(f"mem {self.memory_bytes(state.device) / 2**20:.0f} MB")
        return " ".join(parts)

    def memory_bytes(self, device: torch.device) -> int:
        """Peak allocated memory on a CUDA device, else this process's resident memory."""
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device)
        return self._process.memory_info().rss

    def _epoch_label(self, state: Any) -> str:
        return f"epoch {state.epoch + 1}/{state.epochs}"

    def _draw_bar(self, state: Any, done: int, now: float) -> None:
        status = self.status(state, done, now)
        total = state.steps_per_epoch
        if self._bar is None:  # tqdm draws a new bar at once; the label is fixed for the epoch, the status varies
            self._bar = tqdm(total=total, initial=done, desc=status, file=self.stream, ascii="-#",
                             bar_format=f"{self._epoch_label(state)} [{{bar:{BAR_WIDTH}}}] "
                                        "{n_fmt}/{total_fmt} {desc}",
                             leave=True, **self._width())
        else:
            self._bar.n = done
            # the last step is drawn by close(), which draws a bar it leaves on screen once more
            self._bar.set_description_str(status, refresh=done < total)
        self.draws += 1
        if done >= total:
            self._close_bar()

    def _width(self) -> dict[str, Any]:
        # a line wider than the terminal wraps and `\r` redraws only its last part: tqdm trims it to
        # the width, read at every draw; a terminal reporting a size of 0 would get nothing drawn
        try:
            if os.get_terminal_size(self.stream.fileno()).columns > 0:
                return {"dynamic_ncols": True}
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):  # not a terminal
            pass
        return {"ncols": FALLBACK_COLUMNS, "nrows": FALLBACK_ROWS}

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()  # leave=True: the bar stays on screen, followed by a newline
            self._bar = None

    def _write_line(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
