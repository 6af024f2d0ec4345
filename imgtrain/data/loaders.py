"""DataLoaders for the splits, with the reproducibility the trainer's resume relies on.

The train loader shuffles with its own `torch.Generator` (`Loaders.train_generator`).
The trainer re-seeds it before every epoch (`manual_seed(seed + epoch)`), which fixes
that epoch's order and the base seed of its worker processes, so epoch k after a resume
sees the same batches as epoch k of an uninterrupted run.

Two limits of that guarantee, both inherent to DataLoader: with workers > 0 we keep
workers alive between epochs (`persistent_workers`, saves the start-up per epoch), and
their augmentation random streams are seeded once, when they start; with workers = 0
augmentation draws from the global torch RNG, which the trainer seeds.

workers: "auto" -> min(4, usable CPUs - 1), and 0 with 2 or fewer CPUs: there a worker
process competes with the training process for the same cores, and the images here
(decoded tensors, small files) are cheap enough to prepare inline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from imgtrain.data.sources import DataSplits


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader | None
    test: DataLoader | None
    train_generator: torch.Generator  # the train loader's shuffle generator; re-seed per epoch


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset / container CPU limits
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(workers: int | str) -> int:
    if workers != "auto":
        return int(workers)
    cpus = usable_cpus()
    return 0 if cpus <= 2 else min(4, cpus - 1)


def resolve_pin_memory(pin_memory: bool | str, device: torch.device) -> bool:
    if pin_memory == "auto":
        return device.type == "cuda"
    return bool(pin_memory)


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int, pin: bool,
            generator: torch.Generator | None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=pin, drop_last=False, persistent_workers=workers > 0,
                      generator=generator)


def build_loaders(recipe: Any, splits: DataSplits, device: torch.device) -> Loaders:
    """Loaders over the splits' datasets as they are (set transforms with `with_transform` first).

    recipe: an `imgtrain.config.Recipe` (uses recipe.data and recipe.train.seed).
    """
    cfg = recipe.data
    workers = resolve_workers(cfg.workers)
    pin = resolve_pin_memory(cfg.pin_memory, device)
    eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size  # no gradients: twice the batch fits
    generator = torch.Generator()
    generator.manual_seed(recipe.train.seed)
    train = _loader(splits.train, cfg.batch_size, True, workers, pin, generator)
    val = _loader(splits.val, eval_batch, False, workers, pin, None) if splits.val is not None else None
    test = _loader(splits.test, eval_batch, False, workers, pin, None) if splits.test is not None else None
    return Loaders(train=train, val=val, test=test, train_generator=generator)


def _class_counts(dataset: Dataset | None, classes) -> dict[str, Any] | None:
    if dataset is None:
        return None
    counts = torch.bincount(dataset.targets, minlength=len(classes)).tolist()
    return {"total": len(dataset), "per_class": dict(zip(classes, counts))}


def describe_data(splits: DataSplits) -> dict[str, Any]:
    """Sizes and class counts per split, for logs and the run report."""
    return {
        "classes": list(splits.classes),
        "channels": splits.channels,
        "native_size": splits.native_size,
        "train": _class_counts(splits.train, splits.classes),
        "val": _class_counts(splits.val, splits.classes),
        "test": _class_counts(splits.test, splits.classes),
        "skipped": len(splits.skipped),
    }
