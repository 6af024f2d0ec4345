"""history.csv: column order, compact numbers, union of keys, and no duplicates on resume."""

from __future__ import annotations

import csv
import math

import pytest

from imgtrain.tracking.history import (
    HistoryTracker,
    format_value,
    history_columns,
    read_history,
    write_history,
)


def _header_and_lines(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_columns_standard_order_then_first_seen(run_dir, make_state, fake_loop, expected_row):
    state = make_state(epochs=3)
    # epoch 2 gains a strategy's column; epoch 3 another one; they go last in first-seen order
    extras = [None, {"ema_val_acc": 0.7, "zeta": 1}, {"alpha": 0.25}]
    fake_loop(state, [HistoryTracker(run_dir)]).fit(extras=extras)

    lines = _header_and_lines(run_dir / "history.csv")
    assert lines[0] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "momentum",
                        "epoch_seconds", "images_per_second", "ema_val_acc", "zeta", "alpha"]
    assert [line[0] for line in lines[1:]] == ["1", "2", "3"]
    # blanks where a row lacks a key
    assert lines[1][9:] == ["", "", ""]
    assert lines[2][9:] == ["0.7", "1", ""]
    assert lines[3][9:] == ["", "", "0.25"]
    # floats are written compactly: 1/3 with 6 significant digits
    assert lines[3][1] == "0.333333"

    rows = read_history(run_dir / "history.csv")
    assert len(rows) == 3
    assert rows[0] == pytest.approx(expected_row(0))  # blanks are left out of the dict
    assert rows[1]["zeta"] == 1 and isinstance(rows[1]["zeta"], int)
    assert rows[2]["train_loss"] == pytest.approx(1 / 3, rel=1e-5)
    assert isinstance(rows[2]["epoch"], int)
    # nothing but the CSV is left behind (the temp file was renamed over it)
    assert sorted(p.name for p in run_dir.iterdir()) == ["history.csv"]


def test_resume_rewrites_without_duplicates(run_dir, make_state, fake_loop):
    first = make_state(epochs=5)
    fake_loop(first, [HistoryTracker(run_dir)]).fit(epochs=3)
    assert [r["epoch"] for r in read_history(run_dir / "history.csv")] == [1, 2, 3]

    # The crashed run finished epoch 3 but its last checkpoint is from epoch 2: the resumed
    # state has 2 history rows and starts at epoch index 2.
    resumed = make_state(epochs=5)
    resumed.history = [dict(r) for r in first.history[:2]]
    resumed.epoch = 2
    resumed.step = 2 * resumed.steps_per_epoch
    loop = fake_loop(resumed, [HistoryTracker(run_dir)])
    loop.hooks.fire("fit_start", resumed)
    # fit_start already made the CSV agree with the restored state
    assert [r["epoch"] for r in read_history(run_dir / "history.csv")] == [1, 2]
    loop.run_epoch()
    loop.run_epoch()
    loop.run_epoch()

    rows = read_history(run_dir / "history.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[4]["train_loss"] == pytest.approx(0.2)


def test_format_and_parse_values(tmp_path):
    assert format_value(0.1) == "0.1"
    assert format_value(1 / 3) == "0.333333"
    assert format_value(1.0) == "1.0"
    assert format_value(3.2e-5) == "3.2e-05"
    assert format_value(12345678.9) == "1.23457e+07"
    assert format_value(7) == "7"
    assert format_value(None) == ""
    assert format_value(float("nan")) == "nan"

    rows = [{"epoch": 1, "val_loss": float("nan"), "lr": 3.2e-5, "note": "warm, up", "flag": True}]
    path = tmp_path / "h.csv"
    write_history(path, rows)
    back = read_history(path)[0]
    assert back["epoch"] == 1 and back["lr"] == 3.2e-5
    assert math.isnan(back["val_loss"])
    assert back["note"] == "warm, up"  # a comma inside a value survives (csv quoting)
    assert back["flag"] is True
    assert isinstance(read_history(path)[0]["epoch"], int)


def test_history_columns_with_no_standard_keys():
    assert history_columns([{"b": 1}, {"a": 2, "epoch": 1}]) == ["epoch", "b", "a"]
    assert history_columns([]) == []
