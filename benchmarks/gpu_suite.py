"""The GPU suite: what imgtrain's CUDA paths buy, in one table, in under 8 minutes on one GPU.

    python benchmarks/gpu_suite.py --data DIR [--model resnet18] [--img-size 64] [--batch-size 256]

DIR holds the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz ...; Debian's dataset-fashion-mnist
puts them in /usr/share/datasets/fashion-mnist): copy that folder along with the code to a GPU machine
without a network. Every row runs the real `imgtrain.train` with the fashion_mnist recipe and overrides:

    images/s     fp32, bf16 autocast, fp16 autocast + GradScaler; each without and with channels_last;
                 bf16 + channels_last with torch.compile (compile time separately, not in images/s);
                 batch augmentation on the CPU (in the loader) against on the device;
                 progressive resizing (half the size, then full) against the full size every step
    time to 93%  Fashion-MNIST test accuracy with configs/fashion_mnist_fast.yaml and train.budget=2m on the
                 GPU: whether it is reached, and the wall time

images/s is measured over the optimizer steps after the first --warmup (the loader warm, cuDNN's autotuner
done, compile done), with torch.cuda.synchronize at both ends; the ratio column is against fp32.

Without CUDA it refuses (exit code 2). `--smoke` runs every row but torch.compile's for a few steps on the
CPU instead, so the code paths are checked where no GPU is (tests/test_gpu_suite.py); its numbers mean
nothing. The progressive row times the rest of the small stage and the full-size stage together.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgtrain.engine.events import Hook

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")


class StepTimer(Hook):
    """Images/s over the optimizer steps after the first `warmup`; the first `warmup` steps' time apart
    (torch.compile's compilation happens there)."""

    name = "gpu_suite_timer"

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.done, self.images = 0, 0
        self.started = self.warm_at = self.ended = 0.0

    def _now(self, state: Any) -> float:
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        return time.perf_counter()

    def fit_start(self, state: Any) -> None:
        self.started = self._now(state)

    def after_step(self, state: Any) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.warm_at = self._now(state)
        elif self.done > self.warmup:
            self.images += int(state.inputs.shape[0])
        if self.done == self.warmup + self.steps:
            self.ended = self._now(state)
            state.stop_training = True

    def images_per_second(self) -> float:
        return self.images / max(self.ended - self.warm_at, 1e-9)


@dataclass
class Row:
    name: str
    images_per_second: float | None = None
    note: str = ""


def run_row(args: argparse.Namespace, root: Path, name: str, overrides: list[str]) -> Row:
    from imgtrain.api import train
    from imgtrain.config import load_recipe

    device = "cpu" if args.smoke else "cuda"
    base = [f"data.root={args.data}", f"train.device={device}", "output.progress=off", "output.plots=false",
            "output.report=false", f"model.name={args.model}", f"augment.img_size={args.img_size}",
            f"data.batch_size={args.batch_size}", "train.epochs=1", "train.channels_last=false", "data.workers=4",
            f"train.max_steps_per_epoch={args.warmup + args.steps}", "data.train_subset=20000",
            "data.val_subset=512", "data.test_subset=512"]
    if args.smoke:
        base += ["data.workers=0", "data.train_subset=128", "data.val_subset=64", "data.test_subset=64",
                 "train.threads=2"]
    timer = StepTimer(args.warmup, args.steps)
    started = time.perf_counter()
    train(load_recipe("fashion_mnist", [*base, *overrides]), run_dir=root / name.replace(" ", "_"), hooks=[timer])
    note = f"first {args.warmup} steps {timer.warm_at - timer.started:.1f} s" if "compile" in name else ""
    print(f"  {name}: {timer.images_per_second():.0f} images/s ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr, flush=True)
    return Row(name, timer.images_per_second(), note)


def time_to_target(args: argparse.Namespace, root: Path, target: float) -> Row:
    """Train the fast recipe on the GPU with a 2-minute budget (at most its 60 epochs); whether the test
    accuracy of the best weights passes `target`, and the wall time it took."""
    from imgtrain.api import train
    from imgtrain.config import load_recipe

    recipe = "fashion_mnist_fast"
    overrides = [f"data.root={args.data}", "output.progress=off", "output.report=false",
                 f"train.device={'cpu' if args.smoke else 'cuda'}"]
    if not args.smoke:
        overrides.append("train.budget=2m")
    else:
        overrides += ["data.train_subset=128", "data.val_subset=64", "data.test_subset=64", "train.epochs=1"]
    started = time.perf_counter()
    result = train(load_recipe(recipe, overrides), run_dir=root / "time_to_target")
    seconds = time.perf_counter() - started
    test = result.summary.get("test_acc", 0.0)
    reached = "reached" if test >= target else "NOT reached"
    epochs = result.summary["epochs_run"]
    return Row(f"{recipe}: test {target:.0%}", None,
               f"{reached}: test accuracy {test:.2%} after {seconds:.0f} s wall ({epochs} epochs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--model", default="resnet18", help="a timm model (default resnet18)")
    parser.add_argument("--img-size", type=int, default=64, help="training size: Fashion-MNIST upscaled")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=15, help="steps before timing starts")
    parser.add_argument("--steps", type=int, default=60, help="steps timed per row")
    parser.add_argument("--target", type=float, default=0.93, help="test accuracy of the time-to-target row")
    parser.add_argument("--smoke", action="store_true", help="every row for a few steps on the CPU: checks the "
                        "code paths, measures nothing")
    args = parser.parse_args()
    missing = [name for name in IDX_FILES if not (args.data / name).is_file()]
    if missing:
        print(f"gpu_suite: {args.data} lacks {', '.join(missing)}: give --data the folder of the Fashion-MNIST "
              "IDX files (Debian: /usr/share/datasets/fashion-mnist)", file=sys.stderr)
        sys.exit(2)
    if args.smoke:
        args.warmup, args.steps, args.model, args.img_size, args.batch_size = 1, 2, "imgtrain_cnn_tiny", 16, 32
    elif not torch.cuda.is_available():
        print("gpu_suite: needs a CUDA GPU (torch.cuda.is_available() is False here); run it on a GPU machine, "
              "or with --smoke to check the code paths on the CPU", file=sys.stderr)
        sys.exit(2)
    half = max(8, args.img_size // 2)
    rows_spec = [
        ("fp32", ["train.amp=off"]),
        ("fp32 channels_last", ["train.amp=off", "train.channels_last=true"]),
        ("bf16", ["train.amp=bf16"]),
        ("bf16 channels_last", ["train.amp=bf16", "train.channels_last=true"]),
        ("fp16", ["train.amp=fp16"]),
        ("fp16 channels_last", ["train.amp=fp16", "train.channels_last=true"]),
        ("bf16 channels_last compile", ["train.amp=bf16", "train.channels_last=true", "train.compile=true"]),
        ("bf16 augmentation on the CPU", ["train.amp=bf16", "augment.device_transforms=off"]),
        ("bf16 augmentation on the device", ["train.amp=bf16", "augment.device_transforms=on"]),
        (f"bf16 progressive {half} then {args.img_size} px",
         ["train.amp=bf16", "train.epochs=2", f"train.max_steps_per_epoch={(args.warmup + args.steps) // 2 + 1}",
          f"progressive.stages=[{{img_size: {half}, epochs: 1}}, {{img_size: {args.img_size}, epochs: 1}}]"]),
    ]
    if args.smoke:  # compiling takes half a minute on a CPU: the GPU run checks it
        rows_spec = [(name, overrides) for name, overrides in rows_spec if "compile" not in name]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_row(args, Path(tmp), name, overrides) for name, overrides in rows_spec]
        rows.append(time_to_target(args, Path(tmp), args.target))
    device = "CPU (--smoke: these numbers mean nothing)" if args.smoke else torch.cuda.get_device_name(0)
    print(f"\ngpu_suite: {device}, {args.model} at {args.img_size} px, batch {args.batch_size}, "
          f"{args.steps} timed steps per row after {args.warmup}; {time.perf_counter() - started:.0f} s in all")
    baseline = rows[0].images_per_second or 1.0
    print(f"{'row':<40s}{'images/s':>10s}{'vs fp32':>9s}  note")
    for row in rows:
        ips = f"{row.images_per_second:>10.0f}{row.images_per_second / baseline:>9.2f}" if row.images_per_second \
            else f"{'-':>10s}{'-':>9s}"
        print(f"{row.name:<40s}{ips}  {row.note}")


if __name__ == "__main__":
    main()
