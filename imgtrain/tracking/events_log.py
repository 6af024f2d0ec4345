"""events.jsonl: a machine-readable diary of the run, one JSON object per line.

`EventLogTracker` appends `{"time": <ISO 8601>, "event": <name>, ...fields}` at `fit_start` (device,
amp, sizes, model; `resumed_from_epoch` on a resume), `epoch_end` (the history row), `fit_end`
(`state.summary`) and for what the loop reports through `log(event, **fields)`. Each record opens the
file in append mode: a resume continues the diary, a crash loses at most one record, no handle stays open.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from imgtrain.engine.events import Hook
from imgtrain.tracking.summary import dumps_json

EVENTS_FILE = "events.jsonl"


def now_iso() -> str:
    """Local time with its UTC offset, to the millisecond (ISO 8601)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


def amp_name(dtype: Any) -> str | None:
    """`torch.bfloat16` -> "bfloat16"; None (full precision) stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def fit_start_fields(state: Any) -> dict[str, Any]:
    """What the run is about to do; shared by the event log and train.log."""
    params = list(state.model.parameters())
    fields: dict[str, Any] = {
        "model": getattr(getattr(state.recipe, "model", None), "name", type(state.model).__name__),
        "device": str(state.device),
        "amp_dtype": amp_name(state.amp_dtype),
        "epochs": state.epochs,
        "steps_per_epoch": state.steps_per_epoch,
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "num_classes": len(state.classes),
    }
    if state.epoch > 0:  # a restored run starts at its first unfinished epoch: state.epoch epochs are done
        fields["resumed_from_epoch"] = state.epoch
    return fields


class EventLogTracker(Hook):
    """Appends JSON lines to `run_dir/events.jsonl`; `log()` adds the loop's own events."""

    name = "events"

    def __init__(self, run_dir: str | Path, filename: str = EVENTS_FILE):
        self.path = Path(run_dir) / filename

    def log(self, event: str, **fields: Any) -> None:
        """Append one record; `time` and `event` come first and cannot be overridden."""
        self.write(event, fields)

    def write(self, event: str, fields: dict[Any, Any]) -> None:
        """`log` for a dict whose keys need not be identifiers (a summary, a history row)."""
        record: dict[str, Any] = {"time": now_iso(), "event": event}
        for key, value in fields.items():
            if str(key) not in record:
                record[str(key)] = value
        line = dumps_json(record) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)

    def on_note(self, message: str, event: Any, fields: dict[Any, Any]) -> None:
        if event is not None:  # a strategy's note with an event name (state.note) becomes a record
            self.write(event, fields)

    def fit_start(self, state: Any) -> None:
        self.write("fit_start", fit_start_fields(state))

    def epoch_end(self, state: Any) -> None:
        # the loop appends the row before firing epoch_end; epoch_metrics is the fallback
        record = dict(state.history[-1] if state.history else state.epoch_metrics)
        recall = getattr(state, "val_per_class_recall", None)
        if recall:  # too wide for history.csv with many classes: it lives here
            record["val_per_class_recall"] = recall
        record.update(getattr(state, "epoch_details", None) or {})  # e.g. trainable_per_group
        self.write("epoch_end", record)

    def fit_end(self, state: Any) -> None:
        self.write("fit_end", state.summary)
