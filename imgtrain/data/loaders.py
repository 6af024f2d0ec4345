"""DataLoaders for the splits, with the reproducibility the trainer's resume relies on.

The train loader shuffles with its own generator (`Loaders.train_generator`), which the trainer
re-seeds before every epoch (`seed + epoch`): that fixes the epoch's order and its workers' base
seed, so epoch k after a resume sees the same batches as without one. Persistent workers seed
their augmentation once, at start, so `train.deterministic: true` restarts them every epoch
(`data.persistent_workers: false` always does); with workers = 0 augmentation draws from torch's
global RNG, which checkpoints save.

workers "auto": min(4, usable CPUs - 1), and 0 with 2 CPUs or fewer (a worker would compete with
training for the same cores).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from imgtrain.data.datasets import ImageDataset
from imgtrain.data.errors import DataError
from imgtrain.data.images import usable_cpus
from imgtrain.data.samplers import TrainLoader, loader_with_sampling, with_train_sampler
from imgtrain.data.sources import DataSplits
from imgtrain.data.streaming import ShardDataset, StreamingTrainLoader


@dataclass
class Loaders:
    train: TrainLoader | StreamingTrainLoader
    val: DataLoader | None
    test: DataLoader | None
    train_generator: torch.Generator  # the train loader's shuffle generator; re-seed per epoch


def resolve_workers(workers: int | str) -> int:
    if workers != "auto":
        return int(workers)
    cpus = usable_cpus()
    return 0 if cpus <= 2 else min(4, cpus - 1)


def resolve_pin_memory(pin_memory: bool | str, device: torch.device) -> bool:
    return device.type == "cuda" if pin_memory == "auto" else bool(pin_memory)


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

    drop_last: drop the last incomplete train batch (mix.*: one or two images mix only with themselves)."""
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
    val = _loader(splits.val, eval_batch, False, settings) if splits.val is not None else None
    test = _loader(splits.test, eval_batch, False, settings) if splits.test is not None else None
    if isinstance(splits.train, ShardDataset):  # data.source streaming: LitData reads the train shards
        streamed = StreamingTrainLoader(splits.train, cfg.batch_size, settings.workers, generator, drop_last,
                                        settings.pin_memory)
        return Loaders(train=streamed, val=val, test=test, train_generator=generator)
    shuffled = _loader(splits.train, cfg.batch_size, True, settings, generator, drop_last)
    train = loader_with_sampling(shuffled, batch_size=cfg.batch_size, sampler=shuffled.sampler)
    # workers' RNGs depend on which batches they were dealt: seed each image instead (TrainLoader)
    train.seed_per_sample = settings.workers > 0 and recipe.train.deterministic
    if cfg.sampler != "random":  # class-balanced draws or P x K batches, same loader settings
        train = with_train_sampler(train, cfg, splits.train.targets)
    return Loaders(train=train, val=val, test=test, train_generator=generator)


def with_batch_size(loader: Any, batch_size: int) -> TrainLoader | StreamingTrainLoader:
    """The same loader with another batch size (progressive resizing's stages)."""
    if isinstance(loader, StreamingTrainLoader):
        return loader.with_batch_size(batch_size)
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


def stop_loader_workers(*loaders: Any) -> None:
    """Stop the worker processes persistent loaders keep between epochs, now: a loader dropped with its
    workers alive stops them when the garbage collector reaches it, which can be mid-way through
    something else and waits for every worker (torch's DataLoader.__del__)."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None
