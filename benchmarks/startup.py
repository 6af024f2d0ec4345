"""How long before the first training step, cold (no scan cache) and warm (scan cache present)?

Generates image folders of small real JPEGs (32 x 32, 10 classes; the generation is not timed), then
for each `data.verify` level (full, header, off) and each folder size:

- scan: `build_splits` alone (the start-up scan: data/scan.py), cold then warm;
- first step: `imgtrain.train` of the built-in `imagefolder` recipe (data.workers 0, augment.normalize
  compute, so the 5,000 images read for the normalisation statistics are in it) from the call until the
  first optimizer step has finished (a hook stops the run there), cold then warm.

Cold deletes data.cache_dir (the scan cache) first; warm runs the same again. Each number is the
median of --repeats. Ratios are against cold `full`, today's behaviour before the scan cache. The
scan-cache size and a linear estimate of a warm scan of 1,000,000 files close the table.

    python benchmarks/startup.py [--sizes 10000 100000] [--repeats 1] [--data-dir /tmp/startup_bench]

About 6 minutes of 2 CPU cores with both sizes (most of it the cold `full` runs and the generation of
100,000 files; `--sizes 10000` takes under a minute).

Goal (issue 14 part 9): start-up under a minute for a million already-seen files with the default
`data.verify`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgtrain.api import train
from imgtrain.config import load_recipe
from imgtrain.data import build_splits
from imgtrain.data.scan import VERIFY_LEVELS, scan_cache_file
from imgtrain.engine.events import Hook

CLASSES = 10
LEVELS = tuple(reversed(VERIFY_LEVELS))  # full, header, off


def make_folder(root: Path, count: int) -> Path:
    """`count` 32 x 32 JPEGs in ROOT/class_k/ (kept between runs of the script: --data-dir)."""
    folder = root / f"jpeg32_{count}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    base = rng.integers(0, 256, (CLASSES, 32, 32, 3), dtype=np.uint8)
    for i in range(count):
        k = i % CLASSES
        pixels = np.clip(base[k].astype(np.int16) + rng.integers(-40, 41, (32, 32, 3)), 0, 255).astype(np.uint8)
        path = folder / f"class_{k}" / f"{i:07d}.jpg"
        if i < CLASSES:
            path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    done.touch()
    print(f"generated {count:,} JPEGs in {folder} in {time.perf_counter() - started:.0f} s (not timed)",
          file=sys.stderr)
    return folder


class FirstStep(Exception):
    """Raised by StopAtFirstStep: the run has done what is measured."""


class StopAtFirstStep(Hook):
    name = "stop_at_first_step"

    def __init__(self) -> None:
        self.at: float | None = None

    def after_step(self, state: object) -> None:
        self.at = time.perf_counter()
        raise FirstStep


def overrides(folder: Path, cache_dir: Path, verify: str) -> list[str]:
    return [f"data.root={folder}", f"data.cache_dir={cache_dir}", f"data.verify={verify}", "data.workers=0",
            "output.plots=false", "output.report=false", "output.progress=off", "train.threads=2"]


def time_scan(folder: Path, cache_dir: Path, verify: str) -> float:
    recipe = load_recipe("imagefolder", overrides(folder, cache_dir, verify))
    started = time.perf_counter()
    build_splits(recipe.data)
    return time.perf_counter() - started


def time_first_step(folder: Path, cache_dir: Path, verify: str, run_dir: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    hook = StopAtFirstStep()
    started = time.perf_counter()
    recipe = load_recipe("imagefolder", overrides(folder, cache_dir, verify))
    try:
        train(recipe, run_dir=run_dir, hooks=[hook])
    except FirstStep:
        pass
    assert hook.at is not None, "the run ended before its first step"
    return hook.at - started


def measure(folder: Path, work: Path, verify: str, repeats: int) -> dict[str, float]:
    """Median seconds of: cold scan, warm scan, cold first step, warm first step."""
    cache_dir = work / "cache"
    runs: dict[str, list[float]] = {"scan_cold": [], "scan_warm": [], "step_cold": [], "step_warm": []}
    for _ in range(repeats):
        shutil.rmtree(cache_dir, ignore_errors=True)
        runs["scan_cold"].append(time_scan(folder, cache_dir, verify))
        runs["scan_warm"].append(time_scan(folder, cache_dir, verify))
        shutil.rmtree(cache_dir, ignore_errors=True)
        runs["step_cold"].append(time_first_step(folder, cache_dir, verify, work / "run"))
        runs["step_warm"].append(time_first_step(folder, cache_dir, verify, work / "run"))
    return {name: statistics.median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="files per folder")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/imgtrain_startup_bench"),
                        help="where the generated folders are kept (reused by later runs)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"\nstart-up: imagefolder recipe, 32 x 32 JPEGs, {CLASSES} classes, data.workers 0, "
          f"{args.repeats} repeat(s), median seconds; ratio = against cold full of the same size")
    print(f"{'files':>8s} {'verify':<7s}{'scan cold':>10s}{'scan warm':>10s}{'1st step cold':>14s}"
          f"{'1st step warm':>14s}{'ratio cold':>11s}{'ratio warm':>11s}")
    estimates = []
    for count in args.sizes:
        folder = make_folder(args.data_dir, count)
        work = args.data_dir / f"work_{count}"
        baseline = None
        for verify in LEVELS:
            t = measure(folder, work, verify, args.repeats)
            baseline = baseline or t["step_cold"]
            print(f"{count:>8,d} {verify:<7s}{t['scan_cold']:>10.2f}{t['scan_warm']:>10.2f}{t['step_cold']:>14.2f}"
                  f"{t['step_warm']:>14.2f}{t['step_cold'] / baseline:>11.3f}{t['step_warm'] / baseline:>11.3f}",
                  flush=True)
            if verify == "full":
                cache = scan_cache_file(work / "cache", "imagefolder", folder)
                estimates.append((count, t["scan_warm"], cache.stat().st_size))
    for count, warm, size in estimates:
        per_million = warm * 1_000_000 / count
        print(f"{count:,} files: scan cache {size / 2**20:.1f} MiB; a warm scan of 1,000,000 files at this "
              f"rate: {per_million:.0f} s")
    count, warm, _ = estimates[-1]
    goal = warm * 1_000_000 / count
    print(f"goal: warm start-up scan of 1,000,000 already-seen files under 60 s with data.verify: full "
          f"(linear estimate from {count:,}) -> {'met' if goal < 60 else 'NOT met'}")


if __name__ == "__main__":
    main()
