"""DataLoaders for the splits, with the reproducibility the trainer's resume relies on.

The train loader shuffles with its own `torch.Generator` (`Loaders.train_generator`).
The trainer re-seeds it before every epoch (`manual_seed(seed + epoch)`), which fixes
that epoch's order and the base seed of its worker processes, so epoch k after a resume
sees the same batches as epoch k of an uninterrupted run.

With workers > 0, workers normally stay alive between epochs (`persistent_workers`,
which saves their start-up every epoch), but then their augmentation random streams
are seeded once, when they start, and a resumed run would augment differently. So with
`train.deterministic: true` workers restart every epoch, seeded from the re-seeded
generator, and a resume is exact. With workers = 0, augmentation draws from the global
torch RNG, which the trainer saves and restores. `data.persistent_workers: false` restarts
workers every epoch in any case (it frees their memory between epochs);
`data.prefetch_factor` is how many batches each worker prepares ahead.

workers: "auto" -> min(4, usable CPUs - 1), and 0 with 2 or fewer CPUs: there a worker
process competes with the training process for the same cores, and the images here
(decoded tensors, small files) are cheap enough to prepare inline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from imgtrain.data.datasets import ImageDataset
from imgtrain.data.errors import DataError
from imgtrain.data.samplers import loader_with_sampling, with_train_sampler
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


@dataclass
class LoaderSettings:
    """How every loader of a run reads (from recipe.data, resolved)."""
    workers: int
    pin_memory: bool
    prefetch_factor: int   # batches each worker prepares ahead; only with workers > 0
    persistent: bool       # keep workers between epochs


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, settings: LoaderSettings,
            generator: torch.Generator | None = None, drop_last: bool = False) -> DataLoader:
    workers = settings.workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=settings.pin_memory, drop_last=drop_last, generator=generator,
                      prefetch_factor=settings.prefetch_factor if workers > 0 else None,
                      persistent_workers=settings.persistent and workers > 0)


def build_loaders(recipe: Any, splits: DataSplits, device: torch.device, drop_last: bool = False) -> Loaders:
    """Loaders over the splits' datasets as they are (set transforms with `with_transform` first).

    recipe: an `imgtrain.config.Recipe` (uses recipe.data and recipe.train).
    drop_last: the train loader drops its last incomplete batch; api.train asks for it with mixing on
    (mix.*), since a batch of one or two images mixes only with itself, a noisy step.
    """
    cfg = recipe.data
    settings = LoaderSettings(workers=resolve_workers(cfg.workers),
                              pin_memory=resolve_pin_memory(cfg.pin_memory, device),
                              prefetch_factor=cfg.prefetch_factor,
                              # deterministic: workers restart each epoch (see the module docstring)
                              persistent=cfg.persistent_workers and not recipe.train.deterministic)
    eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size  # no gradients: twice the batch fits
    if drop_last and len(splits.train) < cfg.batch_size:
        raise DataError(f"the train split has {len(splits.train)} images, fewer than data.batch_size "
                        f"({cfg.batch_size}); with mixing on (mix.*) the last incomplete batch is dropped, "
                        "so no batch would remain. Lower data.batch_size.")
    generator = torch.Generator()
    generator.manual_seed(recipe.train.seed)
    train = _loader(splits.train, cfg.batch_size, True, settings, generator, drop_last)
    if cfg.sampler != "random":  # class-balanced draws or P x K batches, same loader settings
        train = with_train_sampler(train, cfg, splits.train.targets)
    val = _loader(splits.val, eval_batch, False, settings) if splits.val is not None else None
    test = _loader(splits.test, eval_batch, False, settings) if splits.test is not None else None
    return Loaders(train=train, val=val, test=test, train_generator=generator)


def with_batch_size(loader: DataLoader, batch_size: int) -> DataLoader:
    """The same loader (dataset, sampler and its generator, workers, pinning ...) with another batch
    size: progressive resizing's stages. A loader that draws whole batches (data.sampler per_class)
    has no batch size to change."""
    if loader.batch_size is None:
        raise DataError("this train loader builds its own batches (data.sampler per_class): its batch "
                        "size cannot change between stages")
    return loader_with_sampling(loader, batch_size=batch_size, sampler=loader.sampler)


class CycledLoader:
    """`batches` batches of a loader, pass after pass: the LR finder and doctor train for a number of
    steps, not epochs."""

    def __init__(self, loader: Any, batches: int):
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Any]:
        served = 0
        while served < self.batches:
            empty = True
            for batch in self.loader:
                empty = False
                yield batch
                served += 1
                if served == self.batches:
                    return
            if empty:
                raise ValueError("the train loader yields no batches (fewer images than one batch with drop_last?)")


def _class_counts(dataset: ImageDataset | None, classes: list[str]) -> dict[str, Any] | None:
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
