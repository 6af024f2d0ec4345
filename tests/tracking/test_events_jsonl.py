"""events.jsonl: strict JSON lines with fit_start, epoch_end rows, loop events and fit_end."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch

from imgtrain.tracking.events_log import EventLogTracker


def _reject_constant(name):
    raise AssertionError(f"events.jsonl holds the non-JSON constant {name}")


def _records(path: Path):
    lines = path.read_text().splitlines()
    return [json.loads(line, parse_constant=_reject_constant) for line in lines]


def test_events_of_a_run(run_dir, make_state, fake_loop, expected_row):
    state = make_state(epochs=2)
    tracker = EventLogTracker(run_dir)
    loop = fake_loop(state, [tracker])
    loop.hooks.fire("fit_start", state)
    loop.run_epoch()
    tracker.log("checkpoint", path=run_dir / "checkpoints" / "last.pt", epoch=1,
                value=torch.tensor(0.625), extra=float("nan"))
    loop.run_epoch()
    tracker.log("skipped_images", count=3, files=[Path("a.png"), Path("b.png")], ratio=float("inf"))
    state.summary = {"best_val_acc": torch.tensor(0.65), "device": torch.device("cpu"),
                     "amp": torch.bfloat16, "final_loss": float("-inf")}
    loop.hooks.fire("fit_end", state)

    records = _records(run_dir / "events.jsonl")
    assert [r["event"] for r in records] == ["fit_start", "epoch_end", "checkpoint", "epoch_end",
                                            "skipped_images", "fit_end"]
    for r in records:
        assert list(r)[:2] == ["time", "event"]
        assert datetime.datetime.fromisoformat(r["time"]).tzinfo is not None

    start = records[0]
    assert start["device"] == "cpu"
    assert start["amp_dtype"] is None
    assert start["epochs"] == 2 and start["steps_per_epoch"] == 8
    assert start["parameters"] == 10 * 3 + 3
    assert start["model"] == "imgtrain_cnn_small"
    assert "resumed_from_epoch" not in start

    epoch2 = records[3]
    assert {k: epoch2[k] for k in expected_row(1)} == pytest.approx(expected_row(1))

    ckpt = records[2]
    assert ckpt["path"] == str(run_dir / "checkpoints" / "last.pt")
    assert ckpt["value"] == 0.625 and ckpt["extra"] == "nan"
    assert records[4]["files"] == ["a.png", "b.png"] and records[4]["ratio"] == "inf"

    end = records[5]
    assert end["best_val_acc"] == pytest.approx(0.65)
    assert end["device"] == "cpu" and end["amp"] == "bfloat16" and end["final_loss"] == "-inf"


def test_resumed_run_appends_and_says_so(run_dir, make_state, fake_loop):
    first = make_state(epochs=3)
    fake_loop(first, [EventLogTracker(run_dir)]).fit(epochs=1)

    resumed = make_state(epochs=3)
    resumed.history = list(first.history)
    resumed.epoch = 1
    resumed.amp_dtype = torch.float16
    fake_loop(resumed, [EventLogTracker(run_dir)]).fit()

    records = _records(run_dir / "events.jsonl")
    assert [r["event"] for r in records] == ["fit_start", "epoch_end", "fit_end",
                                            "fit_start", "epoch_end", "epoch_end", "fit_end"]
    assert records[3]["resumed_from_epoch"] == 1
    assert records[3]["amp_dtype"] == "float16"
    assert [r["epoch"] for r in records if r["event"] == "epoch_end"] == [1, 2, 3]
    assert records[-1]["epochs_run"] == 3


def test_time_and_event_cannot_be_overridden(run_dir):
    tracker = EventLogTracker(run_dir)
    tracker.write("note", {"event": "other", "time": "yesterday", 5: "five"})
    (record,) = _records(run_dir / "events.jsonl")
    assert record["event"] == "note" and record["time"] != "yesterday"
    assert record["5"] == "five"
