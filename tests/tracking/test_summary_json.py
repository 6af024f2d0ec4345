"""summary.json: atomic, indented, JSON-safe; and the json_safe conversions themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
import torch

from imgtrain.tracking.summary import json_safe, read_summary, write_summary


def test_write_and_read_summary(run_dir):
    summary = {"best_val_acc": torch.tensor(0.875), "best_epoch": 7, "run_dir": run_dir,
               "final_loss": float("nan"), "per_class": {"cat": numpy.float32(0.5)}, "amp": None}
    path = write_summary(run_dir, summary)
    assert path == run_dir / "summary.json"
    text = path.read_text()
    assert text.startswith('{\n  "best_val_acc": 0.875,\n  "best_epoch": 7,')
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]  # no temp file left
    assert read_summary(run_dir) == {"best_val_acc": 0.875, "best_epoch": 7, "run_dir": str(run_dir),
                                     "final_loss": "nan", "per_class": {"cat": 0.5}, "amp": None}

    # a rewrite replaces the whole file
    write_summary(run_dir, {"best_epoch": 8})
    assert read_summary(run_dir) == {"best_epoch": 8}


def test_read_summary_of_an_unfinished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="has not finished"):
        read_summary(tmp_path)


def test_json_safe_conversions():
    value = {"t": torch.tensor([1.0, 2.0]), "i": torch.tensor(3), "p": Path("a/b"),
             "d": torch.device("cpu"), "dt": torch.float16, "inf": float("-inf"),
             "tuple": (1, numpy.int64(2)), "b": numpy.bool_(True), 1: "one"}
    safe = json_safe(value)
    assert safe == {"t": [1.0, 2.0], "i": 3, "p": str(Path("a/b")), "d": "cpu", "dt": "float16",
                    "inf": "-inf", "tuple": [1, 2], "b": True, "1": "one"}
    json.dumps(safe, allow_nan=False)  # strict JSON
