"""What does training under several processes (DDP, `imgtrain train ... --nproc N`) cost or gain?

On the CPU: the same two cores used by one process with 2 threads (`data.batch_size` B) against two processes
of 1 thread each (gloo, B/2 images each: the same global batch, so the same optimizer steps and lr). The
difference is DDP's overhead: the gradient all-reduce every step, the BatchNorm average at epoch end and the
second process's start-up. On a machine with several CUDA GPUs, also 1 GPU against all of them (nccl, B images
per GPU, lr scaled linearly with the global batch: `optim.lr_scaling=linear`); on others that row says it
was skipped.

Every run is the real command line (`python -m imgtrain train fashion_mnist ...`) on a stratified subset of
Debian's Fashion-MNIST, and the numbers are read from its run folder: history.csv's images_per_second (the
whole job's training images per second of each epoch, validation left out; the first epoch, which warms the
caches up, is left out too) and its val_acc, for the training time until the first epoch at or above the
target accuracy (the sum of epoch_seconds up to it). Runs alternate (one, two, one, two ...) and each side
reports its median, so a noisy neighbour hits both alike.

    python benchmarks/ddp.py [--images 6000] [--epochs 4] [--repeats 2] [--target 0.78]

About 3 minutes of 2 CPU cores.

Goal (issue 14): two processes' images/s at least 0.85 of one process's (overhead under 15%).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class RunNumbers:
    images_per_second: float         # training images of the whole job per second, epochs 2.. (all when only 1)
    seconds_to_target: float | None  # training seconds until val_acc first reaches the target; None: never
    best_val_acc: float


def run_once(args: argparse.Namespace, processes: int, batch_size: int, threads: int,
             extra: tuple[str, ...] = ()) -> RunNumbers:
    """One `imgtrain train` run in a fresh folder; its numbers from history.csv and summary.json."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        command = [sys.executable, "-m", "imgtrain", "train", "fashion_mnist", f"data.root={FASHION}",
                   f"data.train_subset={args.images}", f"train.epochs={args.epochs}", f"data.batch_size={batch_size}",
                   f"train.threads={threads}", "output.plots=false", "output.report=false", "output.progress=off",
                   *extra, "--run-dir", str(run)]
        if processes > 1:
            command += ["--nproc", str(processes)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        with open(run / "history.csv", newline="", encoding="utf-8") as handle:
            rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    timed = rows[1:] or rows
    images = sum(row["images_per_second"] * row["epoch_seconds"] for row in timed)
    seconds, to_target = 0.0, None
    for row in rows:
        seconds += row["epoch_seconds"]
        if row["val_acc"] >= args.target:
            to_target = seconds
            break
    return RunNumbers(images / sum(row["epoch_seconds"] for row in timed), to_target, summary["best_val_acc"])


def compare(args: argparse.Namespace, label: str, base: tuple, other: tuple) -> tuple[RunNumbers, RunNumbers]:
    """Alternating repeats of two settings ((processes, batch, threads, extra), ...); the median run of each."""
    firsts, seconds = [], []
    for repeat in range(args.repeats):
        firsts.append(run_once(args, *base))
        seconds.append(run_once(args, *other))
        print(f"{label} repeat {repeat + 1}: {firsts[-1].images_per_second:.0f} against "
              f"{seconds[-1].images_per_second:.0f} img/s", file=sys.stderr)
    return median_run(firsts), median_run(seconds)


def median_run(runs: list[RunNumbers]) -> RunNumbers:
    reached = [run.seconds_to_target for run in runs if run.seconds_to_target is not None]
    return RunNumbers(statistics.median(run.images_per_second for run in runs),
                      statistics.median(reached) if len(reached) == len(runs) else None,
                      statistics.median(run.best_val_acc for run in runs))


def row(name: str, numbers: RunNumbers, base: RunNumbers) -> str:
    to_target = f"{numbers.seconds_to_target:.1f}" if numbers.seconds_to_target is not None else "not reached"
    return (f"{name:<40s}{numbers.images_per_second:>10.0f}{numbers.images_per_second / base.images_per_second:>8.3f}"
            f"{to_target:>16s}{numbers.best_val_acc:>10.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000, help="training images (stratified subset)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch of the CPU comparison")
    parser.add_argument("--target", type=float, default=0.78, help="val accuracy both runs must reach")
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"needs Debian's dataset-fashion-mnist in {FASHION} (apt-get install -y dataset-fashion-mnist)")
    header = f"{'setting':<40s}{'img/s':>10s}{'ratio':>8s}{'s to target':>16s}{'best val':>10s}"
    cpu = ("train.device=cpu",)
    batch = args.batch_size
    one, two = compare(args, "cpu", (1, batch, 2, cpu), (2, batch // 2, 1, cpu))
    print(f"\nDDP on the CPU: fashion_mnist recipe (imgtrain_cnn_small, 28 px), {args.images} training images, "
          f"{args.epochs} epochs, global batch {batch}, {args.repeats} alternating repeats (medians); target val "
          f"accuracy {args.target}; img/s from epoch 2 on")
    print(header)
    print(row("1 process x 2 threads", one, one))
    print(row("2 processes x 1 thread (gloo)", two, one))
    ratio = two.images_per_second / one.images_per_second
    print(f"goal: 2 processes at >= 0.85 of 1 process's img/s (overhead under 15%) -> "
          f"{'met' if ratio >= 0.85 else 'NOT met'} (overhead {100 * (1 - ratio):.1f}%)")
    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"\n1 GPU against several: skipped (this machine has {gpus} CUDA GPU(s); it needs 2 or more)")
        return
    gpu = ("train.device=cuda", "optim.lr_scaling=linear")
    single, many = compare(args, "gpu", (1, batch, 4, gpu), (gpus, batch, 4, gpu))
    print(f"\nDDP on {gpus} GPUs ({torch.cuda.get_device_name(0)}): {batch} images per GPU, lr scaled linearly")
    print(header)
    print(row("1 GPU", single, single))
    print(row(f"{gpus} GPUs (nccl)", many, single))
    print(f"scaling efficiency: {many.images_per_second / single.images_per_second / gpus:.2f} of {gpus}x")


if __name__ == "__main__":
    main()
