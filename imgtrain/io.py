"""Files a person reads, written safely: JSON-safe values, atomic writes, run-folder checks.

The bottom layer (beside config.py): it imports nothing of imgtrain. `check_replaceable` /
`make_run_dir` are the one rule for folders a command writes: absent or empty, or, with
--overwrite, one that this kind of command wrote (never a foreign folder).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy
import torch


class RunDirError(ValueError):
    """A run folder that cannot be used as asked (exists, or is not a run folder)."""


def json_safe(value: Any) -> Any:
    """`value` as plain JSON data, recursively; non-finite floats become "nan", "inf", "-inf"
    (strict JSON has no NaN, and a diverged loss should stay visible)."""
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


def dumps_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON text of `value` after `json_safe` (never emits NaN/Infinity)."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False, ensure_ascii=False)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a sibling temporary file, then `os.replace` it: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid keeps two processes writing the same run folder from sharing a temp file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text (newlines written as they are)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def looks_like_run(path: Path) -> bool:
    """A folder imgtrain's train wrote (config.yaml or checkpoints/)."""
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def check_replaceable(folder: Path, overwrite: bool, ours: bool, refuse: str, foreign: str) -> None:
    """A folder a command is about to write must be absent or empty, or, with --overwrite, one that
    command wrote (`ours`); RunDirError says which rule failed (`refuse`, `foreign`)."""
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise RunDirError(f"{folder}: {refuse}")
        if not ours:
            raise RunDirError(f"{folder}: --overwrite refused: {foreign}, so nothing in it is deleted")


def make_run_dir(run_dir: Path) -> Path:
    """Create a planned run folder, replacing the old run there (check_replaceable allowed it)."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
