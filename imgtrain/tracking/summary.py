"""summary.json: the run's final numbers, written atomically (indent 2) so a person or a script can
read a finished run without parsing logs. Values are made JSON-safe first (`json_safe`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the helpers live in imgtrain/io.py; named here too because summary.json is where most readers meet them
from imgtrain.io import atomic_write_bytes, atomic_write_text, dumps_json, json_safe

SUMMARY_FILE = "summary.json"

__all__ = ["SUMMARY_FILE", "atomic_write_bytes", "atomic_write_text", "dumps_json", "json_safe", "read_summary",
           "write_summary"]


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Atomically write `run_dir/summary.json` (indent 2, JSON-safe values); returns its path."""
    path = Path(run_dir) / SUMMARY_FILE
    atomic_write_text(path, dumps_json(summary, indent=2) + "\n")
    return path


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The dict stored in `run_dir/summary.json`."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} does not exist: the run has not finished (summary.json is written at the "
            f"end of training); check the run folder or see history.csv for finished epochs"
        ) from None
    return json.loads(text)
