"""What do the experiment trackers (TensorBoard + MLflow + W&B offline) cost a run?

The built-in `quickstart` recipe (digits) trained without trackers, with
`output.trackers=[tensorboard,mlflow,wandb]` at the default image cadence (`output.log_images_every=5`:
the confusion matrix and worst images at epochs 5, 10 ... and the last), and with images at every epoch
(`output.log_images_every=1`, the most image work a run can ask for). Runs alternate (none, default,
every epoch, none, ...) and each side reports its median, so a noisy neighbour hits all alike:

- training images/s (history.csv's images_per_second: the epochs' training, while the image thread
  draws and writes beside the loop);
- fit wall seconds per epoch (summary.json's wall_seconds / epochs: training, validation, checkpoints,
  plots, report and the trackers' work, their start-up and close included);
- epoch end seconds on the training thread (median): from a user hook's epoch_end to the next
  epoch_start, i.e. the trackers' epoch_end (metrics written, the image snapshot) plus the checkpoint.

    WANDB_MODE=offline python benchmarks/tracker_cost.py [--epochs 10] [--repeats 2]

About 4 minutes of 2 idle CPU cores. Goal (issue 15): training images/s with the trackers at the default
cadence at 0.95 or more of the images/s without.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from imgtrain import Hook
from imgtrain.api import train
from imgtrain.config import load_recipe

TRACKERS = "output.trackers=[tensorboard,mlflow,wandb]"
SIDES = {"none": [], "trackers, images every 5 epochs": [TRACKERS],
         "trackers, images every epoch": [TRACKERS, "output.log_images_every=1"]}


class EpochEndClock(Hook):
    """Times each epoch end on the training thread: from this hook's epoch_end (user hooks run before the
    trackers) to the next epoch_start, which covers every tracker's epoch_end and the epoch's checkpoint."""

    name = "epoch_end_clock"

    def __init__(self) -> None:
        self.started: float | None = None
        self.seconds: list[float] = []

    def epoch_end(self, state: Any) -> None:
        self.started = time.perf_counter()

    def epoch_start(self, state: Any) -> None:
        if self.started is not None:
            self.seconds.append(time.perf_counter() - self.started)


def run_once(args: argparse.Namespace, extra: list[str]) -> tuple[float, float, float]:
    """(training images/s, fit wall seconds per epoch, median epoch-end seconds) of one run."""
    overrides = [f"train.epochs={args.epochs}", f"train.threads={args.threads}", "output.progress=off",
                 "data.test_fraction=0", *extra]
    clock = EpochEndClock()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(load_recipe("quickstart", overrides), run_dir=Path(tmp) / "runs" / "run", hooks=[clock])
    seconds = sum(row["epoch_seconds"] for row in result.history)
    images = sum(row["images_per_second"] * row["epoch_seconds"] for row in result.history)
    return images / seconds, result.summary["wall_seconds"] / len(result.history), statistics.median(clock.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if os.environ.get("WANDB_MODE") != "offline":
        sys.exit("run it with WANDB_MODE=offline (W&B writes its run to the run folder, no account needed)")
    results: dict[str, list[tuple[float, float, float]]] = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        for side, extra in SIDES.items():
            results[side].append(run_once(args, extra))
            speed, wall, end = results[side][-1]
            print(f"repeat {repeat + 1}: {side}: {speed:.0f} img/s, {wall:.2f} s/epoch, epoch end {end:.3f} s",
                  file=sys.stderr)
    medians = {side: tuple(statistics.median(run[i] for run in runs) for i in range(3))
               for side, runs in results.items()}
    base_speed, base_wall, _ = medians["none"]
    print(f"\ntracker cost: quickstart recipe (digits), {args.epochs} epochs, {args.repeats} alternating repeats, "
          f"{torch.get_num_threads()} threads")
    print(f"{'trackers':<34s}{'train img/s (median)':>22s}{'ratio':>8s}{'fit s/epoch':>13s}{'extra s/epoch':>15s}"
          f"{'epoch end s':>13s}")
    for side, (speed, wall, end) in medians.items():
        print(f"{side:<34s}{speed:>22.0f}{speed / base_speed:>8.3f}{wall:>13.3f}{wall - base_wall:>15.3f}{end:>13.3f}")
    ratio = medians["trackers, images every 5 epochs"][0] / base_speed
    print(f"goal: ratio >= 0.95 at the default cadence -> {'met' if ratio >= 0.95 else 'NOT met'}")

if __name__ == "__main__":
    main()
