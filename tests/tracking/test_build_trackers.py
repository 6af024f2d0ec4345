"""build_trackers: the recipe picks the trackers and their order; together they fill a run folder."""

from __future__ import annotations

import io
import json

import pytest

from imgtrain.config import Recipe
from imgtrain.engine.events import HookList
from imgtrain.tracking import (
    EventLogTracker,
    HistoryTracker,
    PlotTracker,
    ProgressTracker,
    ReportTracker,
    TrainLogTracker,
    build_trackers,
    read_history,
)


@pytest.mark.parametrize("progress, plots, report, expected", [
    ("log", True, True, [TrainLogTracker, ProgressTracker, HistoryTracker, EventLogTracker, PlotTracker,
                         ReportTracker]),
    ("log", True, False, [TrainLogTracker, ProgressTracker, HistoryTracker, EventLogTracker, PlotTracker]),
    ("off", True, False, [TrainLogTracker, HistoryTracker, EventLogTracker, PlotTracker]),
    ("bar", False, True, [TrainLogTracker, ProgressTracker, HistoryTracker, EventLogTracker, ReportTracker]),
    ("off", False, False, [TrainLogTracker, HistoryTracker, EventLogTracker]),
])
def test_recipe_picks_trackers_in_order(run_dir, progress, plots, report, expected):
    recipe = Recipe()
    recipe.output.progress = progress
    recipe.output.plots = plots
    recipe.output.report = report
    trackers = build_trackers(recipe, run_dir, console_stream=io.StringIO())
    assert [type(t) for t in trackers] == expected
    HookList(trackers=trackers)  # names are unique, or HookList raises


def test_auto_progress_on_a_pipe_is_log_mode(run_dir):
    trackers = build_trackers(Recipe(), run_dir, console_stream=io.StringIO())
    assert trackers[1].mode == "log"


def test_all_trackers_fill_the_run_folder(run_dir, make_state, fake_loop):
    console = io.StringIO()
    state = make_state(epochs=2)
    fake_loop(state, build_trackers(Recipe(), run_dir, console_stream=console)).fit()

    assert sorted(p.name for p in run_dir.iterdir()) == ["events.jsonl", "history.csv", "plots",
                                                         "report.html", "train.log"]
    assert [r["epoch"] for r in read_history(run_dir / "history.csv")] == [1, 2]
    events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events == ["fit_start", "epoch_end", "epoch_end", "fit_end"]
    assert len(list((run_dir / "plots").glob("*.png"))) == 6  # loss, accuracy, lr, momentum, throughput, epoch time
    assert console.getvalue().count("\n") == 8  # 3 progress lines + 1 summary per epoch
