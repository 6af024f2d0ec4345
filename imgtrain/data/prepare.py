"""The data side of a run, built one way for `train`, `lr-find`, `doctor`, `bench-data` and `show-augment`.

    seed_everything(recipe.train.seed)
    splits = build_splits(recipe.data)
    prepared = prepare_data(recipe, splits, device)   # cache -> normalisation -> transforms -> loaders

What a strategy changes about the data (the evaluation size of progressive resizing, dropping the
last incomplete batch for mixing) arrives as arguments: the data package knows no strategy.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imgtrain.data.batch_transforms import build_batch_pipelines, resolve_device_transforms
from imgtrain.data.cache import apply_cache, cache_resolution
from imgtrain.data.datasets import TensorImageDataset
from imgtrain.data.loaders import build_loaders
from imgtrain.data.transforms import build_eval_transform, build_train_transform, resolve_normalization


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators, from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class PreparedData:
    """The data side of a run, as `train` builds it (also what `imgtrain bench-data` measures)."""
    splits: Any                     # DataSplits, the datasets with their per-image transforms set
    loaders: Any                    # Loaders
    img_size: int                   # the side training images are made at
    mean: list[float]
    std: list[float]
    eval_size: int = 0              # the side validation/test images are made at (progressive.eval_size)
    cache: Any = None               # the DecodedCache with data.cache on a file source
    train_batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # device_transforms on
    eval_batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)  # lines for train.log


def prepare_data(recipe: Any, splits: Any, device: torch.device, eval_size: int | None = None,
                 drop_last: bool = False) -> PreparedData:
    """splits -> decoded cache -> normalization -> per-image and per-batch transforms -> loaders.

    eval_size: the side of val/test images when not the training size; drop_last: see `build_loaders`."""
    aug, channels = recipe.augment, splits.channels
    img_size = aug.img_size or splits.native_size
    notes: list[str] = [splits.scan.describe()] if getattr(splits, "scan", None) is not None else []
    cache = apply_cache(splits, recipe.data, cache_resolution(aug, img_size))
    if cache is not None:
        notes.append(cache.describe())
    elif recipe.data.cache != "off":
        notes.append(f"data.cache: {recipe.data.cache} ignored: {recipe.data.source} images are already "
                     "decoded in memory")
    mean, std = resolve_normalization(aug, splits)
    # images all of one size (in-memory sources, the cache): at that size the pipelines skip resizing
    native = cache.size if cache is not None else (
        splits.native_size if isinstance(splits.train, TensorImageDataset) else None)
    train_batch = eval_batch = None
    test_size = eval_size or img_size
    if resolve_device_transforms(aug, channels, img_size, device):
        pipelines = build_batch_pipelines(aug, channels, img_size, mean, std, native)
        train_tf, eval_tf = pipelines.train_item, pipelines.eval_item
        train_batch, eval_batch = pipelines.train_batch, pipelines.eval_batch
        if test_size != img_size:
            at_test_size = build_batch_pipelines(aug, channels, test_size, mean, std, native)
            eval_tf, eval_batch = at_test_size.eval_item, at_test_size.eval_batch
        cpu_first = f"; per image on the CPU first: {', '.join(pipelines.cpu_only)}" if pipelines.cpu_only else ""
        notes.append(f"augmentation per batch on {device.type}: {pipelines.train_batch}{cpu_first}")
    else:
        train_tf = build_train_transform(aug, channels, img_size, mean, std, native)
        eval_tf = build_eval_transform(aug, channels, test_size, mean, std, native)
    splits.train = splits.train.with_transform(train_tf)
    splits.val = splits.val.with_transform(eval_tf) if splits.val is not None else None
    splits.test = splits.test.with_transform(eval_tf) if splits.test is not None else None
    return PreparedData(splits=splits, loaders=build_loaders(recipe, splits, device, drop_last=drop_last),
                        img_size=img_size, eval_size=test_size, mean=list(mean), std=list(std), cache=cache,
                        train_batch_transform=train_batch, eval_batch_transform=eval_batch, notes=notes)


__all__ = ["PreparedData", "prepare_data", "seed_everything"]
