"""What do the experiment trackers (TensorBoard + MLflow + W&B offline) cost a run?

The built-in `quickstart` recipe (digits) trained without trackers, with
`output.trackers=[tensorboard,mlflow,wandb]` at the default image cadence (`output.log_images_every=5`:
the confusion matrix and worst images at epochs 5, 10 ... and the last), and with images at every epoch
(`output.log_images_every=1`, the most image work a run can ask for). Runs alternate (none, default,
every epoch, none, ...) and each side reports its median, so a noisy neighbour hits all alike:

- training images/s (history.csv's images_per_second: the epochs' training, while the image thread
  draws and writes beside the loop);
- fit wall seconds per epoch (summary.json's wall_seconds / epochs: training, validation, checkpoints,
  plots, report and the trackers' work, their start-up and close included).

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
from pathlib import Path

import torch

from imgtrain.api import train
from imgtrain.config import load_recipe

TRACKERS = "output.trackers=[tensorboard,mlflow,wandb]"
SIDES = {"none": [], "trackers, images every 5 epochs": [TRACKERS],
         "trackers, images every epoch": [TRACKERS, "output.log_images_every=1"]}


def run_once(args: argparse.Namespace, extra: list[str]) -> tuple[float, float]:
    """(training images/s, fit wall seconds per epoch) of one run."""
    overrides = [f"train.epochs={args.epochs}", f"train.threads={args.threads}", "output.progress=off",
                 "data.test_fraction=0", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        result = train(load_recipe("quickstart", overrides), run_dir=Path(tmp) / "runs" / "run")
    seconds = sum(row["epoch_seconds"] for row in result.history)
    images = sum(row["images_per_second"] * row["epoch_seconds"] for row in result.history)
    return images / seconds, result.summary["wall_seconds"] / len(result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if os.environ.get("WANDB_MODE") != "offline":
        sys.exit("run it with WANDB_MODE=offline (W&B writes its run to the run folder, no account needed)")
    results: dict[str, list[tuple[float, float]]] = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        for side, extra in SIDES.items():
            results[side].append(run_once(args, extra))
            speed, wall = results[side][-1]
            print(f"repeat {repeat + 1}: {side}: {speed:.0f} img/s, {wall:.2f} s/epoch", file=sys.stderr)
    medians = {side: (statistics.median(s for s, _ in runs), statistics.median(w for _, w in runs))
               for side, runs in results.items()}
    base_speed, base_wall = medians["none"]
    print(f"\ntracker cost: quickstart recipe (digits), {args.epochs} epochs, {args.repeats} alternating repeats, "
          f"{torch.get_num_threads()} threads")
    print(f"{'trackers':<34s}{'train img/s (median)':>22s}{'ratio':>8s}{'fit s/epoch':>13s}{'extra s/epoch':>15s}")
    for side, (speed, wall) in medians.items():
        print(f"{side:<34s}{speed:>22.0f}{speed / base_speed:>8.3f}{wall:>13.3f}{wall - base_wall:>15.3f}")
    ratio = medians["trackers, images every 5 epochs"][0] / base_speed
    print(f"goal: ratio >= 0.95 at the default cadence -> {'met' if ratio >= 0.95 else 'NOT met'}")

if __name__ == "__main__":
    main()
