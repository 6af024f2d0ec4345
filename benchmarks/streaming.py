"""Images/s of the train loader reading LitData shards (`data.source: streaming`) against the same images
as an image folder, decoded once into memory (`data.cache: memory`, the fastest file path) and decoded
from their files every epoch (`data.cache: off`).

The data: a stratified subset of Fashion-MNIST's training images (Debian's dataset-fashion-mnist) written
as PNG files in class folders, then `imgtrain shard` of that folder. Each side builds its train loader as
`imgtrain train` does (per-image augmentation `pad_crop: 2` and `hflip: 0.5`, batch 128) and reads every
batch of an epoch without training, so the number is the data pipeline's alone; epochs alternate between
the sides and each reports its median.

    python benchmarks/streaming.py [--images 10000] [--epochs 3] [--workers 0]

About a minute of 2 CPU cores with the defaults (most of it writing the PNG files and the shards).

What to expect: shards hold the image files' own bytes and decode every image every epoch, as the file
path does, so they cannot reach the decoded cache, which decodes once; they beat reading the files (one
sequential chunk read instead of one file open per image). Their point is data that fits neither in
memory nor on one machine's disk, where the cache cannot be used at all.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgtrain.api import prepare_data
from imgtrain.config import load_recipe
from imgtrain.data import build_splits
from imgtrain.data.sources import FASHION_MNIST_CLASSES, read_idx
from imgtrain.data.split import stratified_subset_indices
from imgtrain.data.streaming import write_shards

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_folder(out: Path, images: int) -> None:
    """`images` stratified Fashion-MNIST training images as PNGs in one folder per class."""
    pixels = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / "train-labels-idx1-ubyte.gz").astype(np.int64)
    for i in stratified_subset_indices(torch.from_numpy(labels), images, 0):
        folder = out / FASHION_MNIST_CLASSES[labels[i]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(folder / f"{i:05d}.png")


def epoch_speed(loader, generator: torch.Generator, epoch: int) -> float:
    """Images/s of one pass over the train loader."""
    generator.manual_seed(epoch)
    seen, start = 0, time.perf_counter()
    for images, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000, help="training images (stratified subset)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="loader workers (data.workers)")
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"needs Debian's dataset-fashion-mnist in {FASHION} (apt-get install -y dataset-fashion-mnist)")
    torch.set_num_threads(1)
    common = ["augment.pad_crop=2", "augment.hflip=0.5", "data.batch_size=128", "data.val_fraction=0",
              f"data.workers={args.workers}", "augment.device_transforms=off"]
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        write_folder(folder, args.images)
        start = time.perf_counter()
        write_shards(build_splits(load_recipe(None, ["data.source=imagefolder", f"data.root={folder}",
                                                     "data.val_fraction=0"]).data), shards, workers=2)
        print(f"imgtrain shard: {args.images} images in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        sides = {"image folder, decoded (cache memory)": ["data.source=imagefolder", f"data.root={folder}",
                                                          "data.cache=memory"],
                 "image folder, files (cache off)": ["data.source=imagefolder", f"data.root={folder}"],
                 "shards (data.source streaming)": ["data.source=streaming", f"data.root={shards}"]}
        loaders = {}
        for name, keys in sides.items():
            recipe = load_recipe(None, [*common, *keys])
            prepared = prepare_data(recipe, build_splits(recipe.data), torch.device("cpu"))
            loaders[name] = (prepared.loaders.train, prepared.loaders.train_generator)
        speeds: dict[str, list[float]] = {name: [] for name in sides}
        for epoch in range(args.epochs):
            for name, (loader, generator) in loaders.items():
                speeds[name].append(epoch_speed(loader, generator, epoch))
            print(f"epoch {epoch + 1}: " + ", ".join(f"{s[-1]:.0f}" for s in speeds.values()), file=sys.stderr)
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    base = medians["image folder, decoded (cache memory)"]
    print(f"\nstreaming: Fashion-MNIST, {args.images} training images as 28x28 PNGs, {args.epochs} alternating "
          f"epochs, {args.workers} loader workers, batch 128")
    print(f"{'train loader':<40s}{'images/s (median)':>20s}{'ratio':>8s}")
    for name, value in medians.items():
        print(f"{name:<40s}{value:>20.0f}{value / base:>8.3f}")
    files = medians["image folder, files (cache off)"]
    print(f"shards against the files: {medians['shards (data.source streaming)'] / files:.2f}x")


if __name__ == "__main__":
    main()
