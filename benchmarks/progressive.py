"""Does progressive resizing buy its speed without losing accuracy? Fashion-MNIST, one run.

Trains the `fashion_mnist` recipe (imgtrain_cnn_small, 28 px, SGD one-cycle) on a stratified
subset of the training images twice, with the same seed and the same number of epochs:

  fixed        every epoch at 28 px, batch 128
  progressive  the same epochs in stages, small images first (default 16 px x 3 epochs,
               22 px x 3, 28 px x 2), batch 128 throughout, evaluation at 28 px

With `--batch-scaling` a third arm follows the seed project's shape: the small stages also
take larger batches (512, 256), with the lr scaled by the square root of the batch ratio.

Each arm runs in its own process, so the peak memory column is that arm's alone (peak
resident memory on CPU, peak allocated GPU memory on CUDA). The table has the seed's
columns: strategy, batch size, image size, epochs, peak memory, wall time, test accuracy,
and the ratios against the fixed-size run.

    python benchmarks/progressive.py [--images 20000] [--epochs 8] [--stages 16:3,22:3,28:2]
                                     [--device-transforms] [--batch-scaling] [--rounds 1]

With `--device-transforms` both arms augment whole batches (`augment.device_transforms: on`)
instead of image by image in the loader: the per-image work, the same at any training size,
no longer dilutes the saving.

About 10 minutes on 2 quiet CPU cores with the defaults.

Goal (issue 5): progressive within 0.5 points of fixed-size accuracy at 0.65x its wall time or less.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def stage_list(text: str, batches: list[int] | None = None) -> list[dict]:
    stages = []
    for index, part in enumerate(text.split(",")):
        size, epochs = (int(v) for v in part.split(":"))
        stage = {"img_size": size, "epochs": epochs}
        if batches is not None and index < len(batches):
            stage["batch_size"] = batches[index]
        stages.append(stage)
    return stages


def arm_overrides(arm: str, args: argparse.Namespace) -> list[str]:
    common = ["output.progress=off", "output.plots=false", f"data.train_subset={args.images}",
              f"train.epochs={args.epochs}", f"train.seed={args.seed}", "augment.img_size=28",
              f"data.val_fraction={args.val_fraction}"]
    if args.device_transforms:
        common.append("augment.device_transforms=on")
    if arm == "fixed":
        return common
    batches = None
    if arm == "progressive + batch scaling":
        batches = [512, 256]  # the seed's 4x, 2x on the small stages; the last keeps data.batch_size
    stages = stage_list(args.stages, batches)
    return common + [f"progressive.stages={json.dumps(stages)}", "progressive.lr_scaling=sqrt"]


def peak_memory_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status", encoding="ascii") as handle:  # VmHWM: this process's peak resident set
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_arm(arm: str, args: argparse.Namespace) -> None:
    """Child process: train one arm, print one JSON line."""
    from imgtrain.api import train
    from imgtrain.config import load_recipe

    recipe = load_recipe("fashion_mnist", arm_overrides(arm, args))
    with tempfile.TemporaryDirectory() as tmp:
        started, cpu_started = time.perf_counter(), time.process_time()
        result = train(recipe, run_dir=Path(tmp) / "run", console=io.StringIO())
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    rows = result.history
    sizes = sorted({r.get("img_size", 28) for r in rows})
    batches = sorted({r.get("batch_size", recipe.data.batch_size) for r in rows}, reverse=True)
    # wall: the training itself (epochs and their validation), what progressive resizing changes;
    # total: the whole call, with reading Fashion-MNIST and the test pass, the same in every arm
    print(json.dumps({"arm": arm, "wall": result.summary["training_seconds"], "total": wall, "cpu": cpu,
                      "test_acc": result.summary["test_acc"],
                      "epochs": len(rows), "sizes": sizes, "batches": batches, "peak_mb": peak_memory_mb(),
                      "train_seconds": sum(r["epoch_seconds"] for r in rows)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000, help="Fashion-MNIST training images used")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--val-fraction", type=float, default=0.05, help="of the 60,000, validated every epoch")
    parser.add_argument("--stages", default="16:3,22:3,28:2", help="size:epochs,... (epochs must add up)")
    parser.add_argument("--device-transforms", action="store_true",
                        help="both arms augment per batch (augment.device_transforms: on) instead of per image")
    parser.add_argument("--batch-scaling", action="store_true", help="add the seed's arm: larger batches when small")
    parser.add_argument("--rounds", type=int, default=1, help="run every arm this many times, alternating "
                                                                "the order; the table shows each arm's median")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    args = parser.parse_args()
    if args.arm:
        run_arm(args.arm, args)
        return
    if sum(int(p.split(":")[1]) for p in args.stages.split(",")) != args.epochs:
        parser.error(f"--stages {args.stages} must add up to --epochs {args.epochs}")
    arms = ["fixed", "progressive"] + (["progressive + batch scaling"] if args.batch_scaling else [])
    runs: dict = {arm: [] for arm in arms}
    # rounds alternate the order (fixed, progressive, progressive, fixed ...): a machine that speeds
    # up or slows down during the benchmark then weighs on every arm alike
    order = [arm for r in range(args.rounds) for arm in (arms if r % 2 == 0 else arms[::-1])]
    for arm in order:
        command = [sys.executable, __file__, "--arm", arm, "--images", str(args.images), "--epochs",
                   str(args.epochs), "--stages", args.stages, "--seed", str(args.seed), "--val-fraction",
                   str(args.val_fraction)] + (["--device-transforms"] if args.device_transforms else [])
        # the repository first on the path: the child imports this checkout's imgtrain
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"{arm} failed:\n{done.stderr[-3000:]}")
        runs[arm].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {arm}: {runs[arm][-1]['test_acc']:.2%}, {runs[arm][-1]['wall']:.0f} s training, "
              f"{runs[arm][-1]['total']:.0f} s in all", file=sys.stderr)
    results = []
    for arm in arms:  # the median round of each arm (by training wall time)
        ordered = sorted(runs[arm], key=lambda r: r["wall"])
        results.append(ordered[(len(ordered) - 1) // 2])
    base = results[0]
    where = "per batch (device_transforms on)" if args.device_transforms else "per image in the loader"
    print(f"\nprogressive resizing: Fashion-MNIST, {args.images} training images, imgtrain_cnn_small, "
          f"{args.epochs} epochs each, seed {args.seed}, augmentation {where}, test split (10,000 images), "
          f"median of {args.rounds} alternating round(s)")
    print(f"{'strategy':<28s}{'batch size':>12s}{'image size':>12s}{'epochs':>7s}{'peak MB':>9s}{'wall s':>8s}"
          f"{'x wall':>8s}{'train s':>9s}{'cpu s':>8s}{'test acc':>10s}{'vs fixed':>10s}")
    for r in results:
        print(f"{r['arm']:<28s}{'/'.join(map(str, r['batches'])):>12s}{'/'.join(map(str, r['sizes'])):>12s}"
              f"{r['epochs']:>7d}{r['peak_mb']:>9.0f}{r['wall']:>8.0f}{r['wall'] / base['wall']:>8.2f}"
              f"{r['train_seconds']:>9.0f}{r['cpu']:>8.0f}{r['test_acc']:>10.2%}"
              f"{(r['test_acc'] - base['test_acc']) * 100:>+10.2f}")
    print("wall s: training, every epoch with its validation (the goal's measure); train s: the training passes "
          "alone; cpu s: the whole process, data loading included")
    for r in results[1:]:
        ok = r["wall"] / base["wall"] <= 0.65 and r["test_acc"] >= base["test_acc"] - 0.005
        print(f"goal for {r['arm']} (within 0.5 points at <= 0.65x wall): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
