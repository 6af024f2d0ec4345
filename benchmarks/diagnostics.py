"""What do the training diagnostics cost? Images/s with the guard and the gradient monitor on and off.

The non-finite loss guard reads every batch's loss (one device sync per batch) and the gradient
monitor reads every layer's gradient norm every N steps (one sync per reading). On a CPU a sync
is free; on a GPU it stalls the host until the queued kernels finish, which costs most with
small, fast batches. This benchmark trains the same recipe with each setting and prints the
images/s of the last epoch (the first pays start-up), median over alternating repeats so a
noisy neighbour hits all alike:

    python benchmarks/diagnostics.py [--images 10000] [--epochs 2] [--repeats 2] [--device auto]

Ten training runs: 4.5 minutes on the quiet 2-core machine (9 with --repeats 4). Single runs move by
10 to 15% here, more than the settings differ: see the README before reading a ratio. Fashion-MNIST when
installed, else digits.
Goal: the defaults (guard on, every batch; monitor off) at 0.97 or more of everything off.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from imgtrain.api import train
from imgtrain.config import load_recipe
from imgtrain.data.sources import FASHION_MNIST_DIR

VARIANTS = [
    ("all off", ["diagnostics.nonfinite=off"]),
    ("guard, every batch (default)", []),
    ("guard, every 16 batches", ["diagnostics.nonfinite_check_every=16"]),
    ("guard + monitor every 50 steps", ["diagnostics.grad_monitor_every=50"]),
    ("guard + monitor every step", ["diagnostics.grad_monitor_every=1"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000, help="training images (a stratified subset)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    fashion = Path(FASHION_MNIST_DIR).is_dir()
    base = ["model.name=imgtrain_cnn_tiny", "output.progress=off", "output.plots=false", "data.batch_size=128",
            f"train.epochs={args.epochs}", f"train.device={args.device}", "data.val_fraction=0.05",
            "data.test_fraction=0"]
    if fashion:
        base += ["data.source=fashion-mnist", f"data.train_subset={args.images}"]
    speeds = {name: [] for name, _ in VARIANTS}
    device = "?"
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for index, (name, keys) in enumerate(VARIANTS):
                result = train(load_recipe("quickstart", base + keys), run_dir=Path(tmp) / f"{repeat}-{index}")
                speeds[name].append(result.history[-1]["images_per_second"])
                device = result.summary["device"]
    data = f"Fashion-MNIST, {args.images} images" if fashion else "digits"
    print(f"diagnostics overhead: imgtrain_cnn_tiny, {data}, batch 128, {device}, images/s of epoch {args.epochs}, "
          f"median of {args.repeats}")
    reference = statistics.median(speeds["all off"])
    print(f"{'setting':<34}{'images/s':>10}{'ratio':>8}")
    for name, _ in VARIANTS:
        value = statistics.median(speeds[name])
        print(f"{name:<34}{value:>10.0f}{value / reference:>8.3f}")
    default = statistics.median(speeds["guard, every batch (default)"]) / reference
    print(f"goal: defaults at >= 0.97 of all off -> {'met' if default >= 0.97 else 'NOT met'} ({default:.3f})")


if __name__ == "__main__":
    main()
