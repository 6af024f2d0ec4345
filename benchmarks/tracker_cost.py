"""What do the experiment trackers (TensorBoard + MLflow + W&B offline) cost a run?

The built-in `quickstart` recipe (digits) trained without trackers and with
`output.trackers=[tensorboard,mlflow,wandb]` and `output.log_images_every=1` (the confusion matrix and
the worst images at every epoch: the most image work a run can ask for). Runs alternate (none, all,
none, ...) and each side reports its median, so a noisy neighbour hits both alike:

- training images/s (history.csv's images_per_second: the epochs' training, where the image thread
  runs beside the loop);
- fit wall seconds per epoch (summary.json's wall_seconds / epochs: training, validation, checkpoints,
  plots, report and the trackers' work, their start-up and close included).

    WANDB_MODE=offline python benchmarks/tracker_cost.py [--epochs 6] [--repeats 2]

About 2-3 minutes of 2 CPU cores. Goal (issue 15): training images/s with the trackers at 0.95 or more of
the images/s without.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from imgtrain.api import train
from imgtrain.config import load_recipe

TRACKERS = "output.trackers=[tensorboard,mlflow,wandb]"


def run_once(args: argparse.Namespace, trackers: bool) -> tuple[float, float]:
    """(training images/s, fit wall seconds per epoch) of one run."""
    overrides = [f"train.epochs={args.epochs}", f"train.threads={args.threads}", "output.progress=off",
                 "data.test_fraction=0"]
    if trackers:
        overrides += [TRACKERS, "output.log_images_every=1"]
    with tempfile.TemporaryDirectory() as tmp:
        result = train(load_recipe("quickstart", overrides), run_dir=Path(tmp) / "runs" / "run")
    seconds = sum(row["epoch_seconds"] for row in result.history)
    images = sum(row["images_per_second"] * row["epoch_seconds"] for row in result.history)
    return images / seconds, result.summary["wall_seconds"] / len(result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if os.environ.get("WANDB_MODE") != "offline":
        sys.exit("run it with WANDB_MODE=offline (W&B writes its run to the run folder, no account needed)")
    none: list[tuple[float, float]] = []
    every: list[tuple[float, float]] = []
    for repeat in range(args.repeats):
        none.append(run_once(args, False))
        every.append(run_once(args, True))
        print(f"repeat {repeat + 1}: none {none[-1][0]:.0f} img/s {none[-1][1]:.2f} s/epoch, trackers "
              f"{every[-1][0]:.0f} img/s {every[-1][1]:.2f} s/epoch", file=sys.stderr)
    n_speed, a_speed = statistics.median(s for s, _ in none), statistics.median(s for s, _ in every)
    n_wall, a_wall = statistics.median(w for _, w in none), statistics.median(w for _, w in every)
    print(f"\ntracker cost: quickstart recipe (digits), {args.epochs} epochs, {args.repeats} alternating repeats, "
          f"{torch.get_num_threads()} threads, images every epoch")
    print(f"{'trackers':<34s}{'train img/s (median)':>22s}{'ratio':>8s}{'fit s/epoch':>13s}{'extra s/epoch':>15s}")
    print(f"{'none':<34s}{n_speed:>22.0f}{1.0:>8.3f}{n_wall:>13.3f}{0.0:>15.3f}")
    print(f"{'tensorboard + mlflow + wandb':<34s}{a_speed:>22.0f}{a_speed / n_speed:>8.3f}{a_wall:>13.3f}"
          f"{a_wall - n_wall:>15.3f}")
    print(f"goal: ratio >= 0.95 -> {'met' if a_speed / n_speed >= 0.95 else 'NOT met'}")


if __name__ == "__main__":
    main()
