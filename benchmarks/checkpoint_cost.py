"""What does saving a mid-epoch training state every 50 optimizer steps cost?

The built-in `fashion_mnist` recipe (Debian's dataset-fashion-mnist) on a stratified subset of the
training images, trained with `train.checkpoint_every.steps=50` and without mid-epoch checkpoints
(`train.checkpoint_every.minutes=null`; the epoch-end checkpoints both runs write are not in the
number). Each run reports the training images/s of its epochs (history.csv's images_per_second, which
covers the mid-epoch saves and leaves out validation and the end-of-epoch files); runs alternate (none,
every 50 steps, none, ...) and each side reports its median, so a noisy neighbour hits both alike.

    python benchmarks/checkpoint_cost.py [--images 10000] [--epochs 2] [--repeats 3] [--every 50]

About 4 minutes of 2 CPU cores (480 s of CPU in all; 6 minutes when they were shared with another job).

Goal (issue 13): images/s with a state every 50 steps at 0.95 or more of the images/s without.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from imgtrain.api import train
from imgtrain.config import load_recipe

FASHION = Path("/usr/share/datasets/fashion-mnist")


def run_once(args: argparse.Namespace, every: int | None) -> tuple[float, int]:
    """Training images/s of one run and the mid-epoch states it saved."""
    checkpoints = (f"train.checkpoint_every.steps={every}" if every else "train.checkpoint_every.steps=null",
                   "train.checkpoint_every.minutes=null")
    recipe = load_recipe("fashion_mnist", [f"data.root={FASHION}", f"data.train_subset={args.images}",
                                           f"train.epochs={args.epochs}", f"train.threads={args.threads}",
                                           "output.plots=false", "output.report=false", "output.progress=off",
                                           *checkpoints])
    with tempfile.TemporaryDirectory() as tmp:
        result = train(recipe, run_dir=Path(tmp) / "run")
        events = (result.run_dir / "events.jsonl").read_text(encoding="utf-8")
    seconds = sum(row["epoch_seconds"] for row in result.history)
    images = sum(row["images_per_second"] * row["epoch_seconds"] for row in result.history)
    return images / seconds, events.count('"mid_epoch_checkpoint"')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000, help="training images (stratified subset)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=50, help="optimizer steps between mid-epoch states")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"needs Debian's dataset-fashion-mnist in {FASHION} (apt-get install -y dataset-fashion-mnist)")
    none, every, saves = [], [], 0
    for repeat in range(args.repeats):
        none.append(run_once(args, None)[0])
        speed, saves = run_once(args, args.every)
        every.append(speed)
        print(f"repeat {repeat + 1}: none {none[-1]:.0f} img/s, every {args.every} steps {every[-1]:.0f} img/s "
              f"({saves} mid-epoch states)", file=sys.stderr)
    n, e = statistics.median(none), statistics.median(every)
    print(f"\ncheckpoint cost: fashion_mnist recipe, {args.images} training images, {args.epochs} epochs, "
          f"{args.repeats} alternating repeats, {torch.get_num_threads()} threads")
    print(f"{'mid-epoch training states':<34s}{'images/s (median)':>20s}{'ratio':>8s}")
    print(f"{'none':<34s}{n:>20.0f}{1.0:>8.3f}")
    print(f"{f'every {args.every} steps ({saves} a run)':<34s}{e:>20.0f}{e / n:>8.3f}")
    print(f"goal: ratio >= 0.95 -> {'met' if e / n >= 0.95 else 'NOT met'}")


if __name__ == "__main__":
    main()
