"""history.csv: one row per finished epoch, rewritten whole (atomically) every epoch.

Rewriting from `state.history` rather than appending means a resumed run never duplicates a row and
drops rows of epochs finished after its last checkpoint. Columns: `epoch`, the standard columns present,
then the rest in first-seen order (missing cells blank). `read_history` parses numbers back and leaves
blank cells out, so `write_history` then `read_history` gives the same rows.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgtrain.engine.events import Hook
from imgtrain.tracking.summary import atomic_write_text

HISTORY_FILE = "history.csv"

#: columns that come right after `epoch`, in this order, when any row has them
STANDARD_COLUMNS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "momentum", "epoch_seconds",
                    "images_per_second")

_INT_RE = re.compile(r"[+-]?\d+")
# plain decimal / scientific notation and the non-finite words %g writes; no "_" separators
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf)", re.IGNORECASE)


def history_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Column order for `rows`: epoch, the standard columns present, then the rest as first seen."""
    seen = dict.fromkeys(key for row in rows for key in row)  # first-seen order, O(1) lookups
    first = [c for c in ("epoch",) + STANDARD_COLUMNS if c in seen]
    rest = [c for c in seen if c not in first]
    return first + rest


def format_value(value: Any) -> str:
    """A cell: ints as ints, floats compactly (%.6g), None as blank, anything else as str."""
    if value is None:
        return ""
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return f"{value:.1f}"  # keep a float a float on the way back (1.0, not 1)
        return f"{value:.6g}"
    return str(value)


def parse_value(text: str) -> Any:
    """The inverse of `format_value` for numbers; other text is returned unchanged."""
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        return float(text)
    if text in ("true", "false"):
        return text == "true"
    return text


def write_history(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Atomically (re)write `path` as a CSV of `rows` (see the module docstring for columns)."""
    columns = history_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_value(row.get(c)) for c in columns])
    atomic_write_text(path, buffer.getvalue())


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a history.csv, numbers parsed to int/float, blank cells left out."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: parse_value(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


class HistoryTracker(Hook):
    """Rewrites `run_dir/history.csv` from `state.history` at every epoch end, and at the
    `fit_start` of a resumed run, so the CSV matches the restored state at once."""

    name = "history"

    def __init__(self, run_dir: str | Path, filename: str = HISTORY_FILE):
        self.path = Path(run_dir) / filename

    def fit_start(self, state: Any) -> None:
        if state.history:
            write_history(self.path, state.history)

    def epoch_end(self, state: Any) -> None:
        write_history(self.path, state.history)

