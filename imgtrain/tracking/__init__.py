"""Trackers: hooks that only read the TrainState and leave a readable run folder behind.

    run_dir/train.log       timestamped story of the run          TrainLogTracker
    (console)               progress bar or plain progress lines  ProgressTracker
    run_dir/history.csv     one row per epoch, rewritten whole    HistoryTracker
    run_dir/events.jsonl    JSON diary: fit_start, epochs, ...    EventLogTracker
    run_dir/plots/*.png     loss, accuracy, lr, momentum, speed   PlotTracker
    run_dir/report.html     one self-contained page of it all     ReportTracker (tracking/report.py)
    run_dir/summary.json    final numbers                         write_summary
    TensorBoard, MLflow, W&B  output.trackers (optional packages)   ExperimentTracking (tracking/external.py)

`build_trackers(recipe, run_dir)` returns them in that order, the experiment trackers last. Trackers never
change the state, so they run after every strategy. Under DDP only rank 0 should build them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from imgtrain.config import Recipe
from imgtrain.engine.events import Hook
from imgtrain.tracking.events_log import EVENTS_FILE, EventLogTracker
from imgtrain.tracking.external import TRACKERS_EXTRA, ExperimentTracking, TrackerBackend, check_trackers
from imgtrain.tracking.history import HISTORY_FILE, HistoryTracker, read_history, write_history
from imgtrain.tracking.logfile import LOG_FILE, TrainLogTracker
from imgtrain.tracking.plots import PLOTS_DIR, REDRAW_BUDGET_FACTOR, PlotTracker, plot_history
from imgtrain.tracking.progress import ProgressTracker, format_epoch_line
from imgtrain.tracking.report import REPORT_FILE, ReportInputs, ReportTracker, rebuild_report
from imgtrain.tracking.summary import SUMMARY_FILE, json_safe, read_summary, write_summary

__all__ = [
    "EVENTS_FILE", "HISTORY_FILE", "LOG_FILE", "PLOTS_DIR", "REPORT_FILE", "SUMMARY_FILE", "TRACKERS_EXTRA",
    "EventLogTracker", "ExperimentTracking", "TrackerBackend", "build_tracker_backends", "check_trackers",
    "HistoryTracker", "PlotTracker", "ProgressTracker", "ReportInputs", "ReportTracker",
    "TrainLogTracker", "build_trackers", "format_epoch_line", "json_safe", "plot_history", "read_history",
    "read_summary", "rebuild_report", "write_history", "write_summary",
]


def build_trackers(recipe: Recipe, run_dir: str | Path, console_stream: TextIO | None = None,
                   report_inputs: ReportInputs | None = None) -> list[Hook]:
    """The trackers a recipe asks for (`output.progress`, `output.plots`, `output.report`), in firing
    order: train.log first, so an epoch's line is on disk before anything else can fail; the report
    last, as it inlines the PlotTracker's charts. `report_inputs`: the validation images it shows."""
    trackers: list[Hook] = [TrainLogTracker(run_dir)]
    if recipe.output.progress != "off":
        trackers.append(ProgressTracker(recipe.output.progress, console_stream))
    trackers.append(HistoryTracker(run_dir))
    trackers.append(EventLogTracker(run_dir))
    budget = 0.0 if recipe.output.redraw == "every_epoch" else REDRAW_BUDGET_FACTOR
    plots = PlotTracker(run_dir, redraw_budget_factor=budget) if recipe.output.plots else None
    if plots is not None:
        trackers.append(plots)
    if recipe.output.report:
        trackers.append(ReportTracker(run_dir, report_inputs, plots=plots, redraw_budget_factor=budget))
    if recipe.output.trackers:
        trackers.append(ExperimentTracking(build_tracker_backends(recipe), run_dir, recipe.output.log_images_every,
                                           report_inputs))
    return trackers


def build_tracker_backends(recipe: Recipe) -> list[TrackerBackend]:
    """One backend per name in `output.trackers`, each module imported only when it is asked for (the
    packages are optional: check_trackers has said which one is missing before training)."""
    backends: list[TrackerBackend] = []
    for name in recipe.output.trackers:
        if name == "tensorboard":
            from imgtrain.tracking.tensorboard import TensorBoardBackend
            backends.append(TensorBoardBackend())
        elif name == "mlflow":
            from imgtrain.tracking.mlflow import MlflowBackend
            backends.append(MlflowBackend(recipe.output.mlflow_uri))
        else:
            from imgtrain.tracking.wandb import WandbBackend
            backends.append(WandbBackend())
    return backends
