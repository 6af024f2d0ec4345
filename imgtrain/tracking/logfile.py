"""train.log: the human-readable story of a run, one timestamped line per thing that happened.

`TrainLogTracker` writes a line at `fit_start`, one per epoch (`format_epoch_line`, as on the console)
and one at `fit_end`; the loop adds warnings and notes through `log(message)`. Each line is appended
on its own, so it is on disk at once and a resumed run continues the file.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from imgtrain.engine.events import Hook
from imgtrain.tracking.events_log import fit_start_fields
from imgtrain.tracking.progress import format_epoch_line
from imgtrain.tracking.summary import json_safe

LOG_FILE = "train.log"


def format_fields(fields: dict[str, Any]) -> str:
    """`key value` pairs; floats compact, nested values as JSON."""
    parts = []
    for key, value in json_safe(fields).items():
        if isinstance(value, float):
            text = f"{value:.6g}"
        elif isinstance(value, (dict, list)):
            text = json.dumps(value)
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " ".join(parts)


class TrainLogTracker(Hook):
    """Appends timestamped lines to `run_dir/train.log`; `log(message)` adds the loop's notes."""

    name = "train_log"

    def __init__(self, run_dir: str | Path, filename: str = LOG_FILE):
        self.path = Path(run_dir) / filename
        self._checked_end = False

    def log(self, message: str) -> None:
        """Append `YYYY-MM-DD HH:MM:SS message` (one line per line of `message`), in one write, so a
        line is on disk whole or not at all."""
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        text = "".join(f"{stamp} {line}\n" for line in str(message).splitlines() or [""])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._checked_end:  # a log an older process left without its final newline: end that line
            self._checked_end = True
            if self.path.is_file() and self.path.stat().st_size:
                with open(self.path, "rb") as f:
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        text = "\n" + text
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)

    def on_note(self, message: str, event: Any, fields: Any) -> None:
        self.log(message)  # what a strategy reported with state.note

    def fit_start(self, state: Any) -> None:
        info = fit_start_fields(state)
        amp = info["amp_dtype"] or "off"
        line = (f"fit_start model {info['model']} device {info['device']} amp {amp} "
                f"parameters {info['parameters']:,} trainable {info['trainable_parameters']:,} "
                f"epochs {info['epochs']} steps_per_epoch {info['steps_per_epoch']}")
        if "resumed_from_epoch" in info:
            line += f" resumed_from_epoch {info['resumed_from_epoch']}"
        self.log(line)

    def epoch_end(self, state: Any) -> None:
        row = state.history[-1] if state.history else state.epoch_metrics
        self.log(format_epoch_line(row, state.epochs))

    def fit_end(self, state: Any) -> None:
        self.log(("fit_end " + format_fields(state.summary)).rstrip())

