"""How much faster does imgtrain feed a model than a stock torchvision DataLoader?

Data: 10,000 JPEG images at 64 px, 4 classes, written once with
`imgtrain.data.write_shapes_imagefolder` into a folder that later runs reuse
(default: <temp>/imgtrain_bench/shapes64-10000).

    (a) the stock pipeline: torchvision.datasets.ImageFolder, PIL transforms
        (RandomResizedCrop(64), RandomHorizontalFlip, ToTensor, Normalize) and a DataLoader
        with 2 workers, batch 256, shuffled: the file is read and decoded every epoch.
    (b) imgtrain: data.cache: memory (decoded once, before the first epoch) and
        augment.device_transforms: on, run on the CPU: the loader gathers uint8 images,
        TrainBatchTransform crops, flips and normalizes each batch of 256 at once. The
        same augmentation distributions as (a) (scale 0.08..1, ratio 3/4..4/3, flip 0.5).
        Measured with `imgtrain.tools.bench_data.bench_data`, the code behind `imgtrain bench-data`.

Both iterate full epochs and count images/s of epochs 2+ (epoch 1 pays worker start-up);
the setup (the sources' check of every file, the cache build) is reported on its own line.
Rounds alternate (a, b, a, b ...) so a noisy neighbour hits both alike; each side reports its
median. (b) runs in one process with torch's default threads (one per core), as `imgtrain
train` does, where (a) runs two worker processes: both use the machine's cores. `--threads N`
sets (b)'s.

    python benchmarks/data_pipeline.py [--epochs 3] [--rounds 2] [--threads N] [--data DIR]

Goal (issue 3): (b) at 5x the images/s of (a) or more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from imgtrain.data.loaders import usable_cpus

GOAL = 5.0
IMAGES = 10_000
SIZE = 64
BATCH = 256
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def ensure_data(folder: Path) -> Path:
    from imgtrain.config import ShapesConfig
    from imgtrain.data import write_shapes_imagefolder

    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == IMAGES:
        return folder
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"{folder} exists but does not hold the {IMAGES} benchmark images; remove it or pass --data")
    started = time.perf_counter()
    shapes = ShapesConfig(num_classes=4, image_size=SIZE, train_size=IMAGES, val_size=0, test_size=0)
    write_shapes_imagefolder(shapes, folder, fmt="jpg", layout="flat")
    print(f"wrote {IMAGES} JPEGs to {folder} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return folder


def stock_rate(folder: Path, epochs: int) -> float:
    """(a): median images/s of epochs 2+ of torchvision's ImageFolder + PIL transforms, 2 workers."""
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)
    rates = []
    for epoch in range(epochs):
        started = time.perf_counter()
        seen = sum(images.shape[0] for images, _ in loader)
        rates.append(seen / (time.perf_counter() - started))
        print(f"  (a) epoch {epoch + 1}: {rates[-1]:.0f} images/s", file=sys.stderr)
    del loader  # stops the persistent workers before (b) runs
    return statistics.median(rates[1:])


def imgtrain_rate(folder: Path, epochs: int, threads: int | None) -> tuple[float, str]:
    """(b): steady images/s of imgtrain's cached pipeline with batch transforms on the CPU, and its setup."""
    from imgtrain.config import load_recipe
    from imgtrain.tools.bench_data import bench_data

    recipe = load_recipe(None, [
        "data.source=imagefolder", f"data.root={folder}", "data.val_fraction=0.0", "data.test_fraction=0.0",
        "data.cache=memory", f"data.batch_size={BATCH}", "data.workers=0",
        f"augment.img_size={SIZE}", "augment.random_resized_crop=true", "augment.hflip=0.5",
        "augment.normalize=given", f"augment.mean={MEAN}", f"augment.std={STD}",
        "augment.device_transforms=on",
        "train.device=cpu", *([f"train.threads={threads}"] if threads else []),
    ])
    result = bench_data(recipe, epochs=epochs)
    for epoch, rate in enumerate(result.images_per_second, start=1):
        print(f"  (b) epoch {epoch}: {rate:.0f} images/s", file=sys.stderr)
    setup = (f"{result.setup_seconds:.1f} s: the sources check every file (one decode each), then the "
             f"{result.cache}")
    return result.steady_images_per_second, setup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per round (>= 2; epoch 1 not counted)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (a) then (b)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of (b) (default: torch's)")
    parser.add_argument("--data", type=Path, help="image folder (default: <temp>/imgtrain_bench/...)",
                        default=Path(tempfile.gettempdir()) / "imgtrain_bench" / "shapes64-10000")
    args = parser.parse_args()
    if args.epochs < 2 or args.rounds < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--epochs must be >= 2, --rounds and --threads >= 1")
    folder = ensure_data(args.data)
    stock, ours, setups = [], [], []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
        stock.append(stock_rate(folder, args.epochs))
        rate, setup = imgtrain_rate(folder, args.epochs, args.threads)
        ours.append(rate)
        setups.append(setup)
    a, b = statistics.median(stock), statistics.median(ours)
    ratio = b / a
    rows = [
        ("(a) torchvision ImageFolder + PIL transforms, DataLoader 2 workers", a),
        (f"(b) imgtrain cache=memory + batch transforms on the CPU ({torch.get_num_threads()} thread(s))", b),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{IMAGES} JPEGs at {SIZE} px, batch {BATCH}, RandomResizedCrop + flip + normalize; "
          f"median of {args.rounds} round(s), epochs 2..{args.epochs} of each; torch {torch.__version__}, "
          f"{usable_cpus()} CPU(s)")
    print(f"{'pipeline':<{width}}  {'images/s':>9}")
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>9.0f}")
    print(f"(b) setup, not in images/s: {setups[-1]}")
    print(f"ratio (b) / (a): {ratio:.1f}x, goal {GOAL:.0f}x: {'met' if ratio >= GOAL else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
