"""summary.json: the run's final numbers, plus the JSON and atomic-write helpers trackers share.

`write_summary(run_dir, summary)` writes `run_dir/summary.json` (indent 2) so a person or a
script can read a finished run without parsing logs; `read_summary(run_dir)` reads it back.

Values are made JSON-safe first (`json_safe`): tensors and numpy scalars become numbers,
paths, devices and dtypes become strings, and non-finite floats become the strings
"nan", "inf", "-inf" -- strict JSON has no NaN, and a diverged loss is worth keeping
visible rather than turning into a null that reads like "not measured".
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Union

import numpy
import torch

SUMMARY_FILE = "summary.json"


def json_safe(value: Any) -> Any:
    """`value` as plain JSON data (dict, list, str, int, float, bool, None), recursively."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # also turns int subclasses (IntEnum) into plain ints
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return json_safe(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, (numpy.generic, numpy.ndarray)):
        return json_safe(value.tolist())
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    # Path, torch.device and anything else: its readable string form
    return str(value)


def dumps_json(value: Any, indent: Union[int, None] = None) -> str:
    """Strict JSON text of `value` after `json_safe` (never emits NaN/Infinity)."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False, ensure_ascii=False)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write a text file so readers never see a half-written one.

    Writes a temporary file next to the target, then `os.replace`s it (atomic on POSIX and
    Windows when both are on the same filesystem, which a sibling file always is).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid keeps two processes writing the same run folder from sharing a temp file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """`atomic_write_text` for bytes (a PNG, say)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_summary(run_dir: Union[str, Path], summary: Dict[str, Any]) -> Path:
    """Atomically write `run_dir/summary.json` (indent 2, JSON-safe values); returns its path."""
    path = Path(run_dir) / SUMMARY_FILE
    atomic_write_text(path, dumps_json(summary, indent=2) + "\n")
    return path


def read_summary(run_dir: Union[str, Path]) -> Dict[str, Any]:
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
