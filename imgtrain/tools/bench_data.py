"""`imgtrain bench-data`: how fast does a recipe's input pipeline feed the model?

The data is built as `imgtrain train` builds it, and each batch is loaded, moved to the device and
augmented there (augment.device_transforms), with no model. Epoch 1 pays the one-off costs (worker
start-up, a cold page cache); the steady state is the median of the later epochs. Far above a training
epoch's images/s (history.csv): the model is the bottleneck; close to it: the model waits for data.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from imgtrain.api import prepare_data
from imgtrain.data.loaders import resolve_workers
from imgtrain.data.prepare import seed_everything
from imgtrain.data.sources import build_splits


@dataclass
class BenchResult:
    description: str                     # what was measured (source, sizes, settings)
    setup_seconds: float                 # sources, cache, normalization, loaders
    cache: str | None                    # the decoded cache: size, built in how long or reused
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_images: list[int] = field(default_factory=list)

    @property
    def images_per_second(self) -> list[float]:
        return [n / s if s > 0 else float("inf") for n, s in zip(self.epoch_images, self.epoch_seconds)]

    @property
    def steady_images_per_second(self) -> float:
        """Median images/s of epochs 2+ (epoch 1 when it is the only one)."""
        rates = self.images_per_second
        return statistics.median(rates[1:] if len(rates) > 1 else rates)

    def table(self) -> str:
        lines = [self.description,
                 f"setup {self.setup_seconds:.2f} s (sources, cache, normalization, loaders)"]
        if self.cache is not None:
            lines.append(self.cache)
        lines.append(f"{'epoch':>5}  {'seconds':>8}  {'images/s':>9}")
        for k, (seconds, rate) in enumerate(zip(self.epoch_seconds, self.images_per_second), start=1):
            note = "  (start-up, first pass)" if k == 1 else ""
            lines.append(f"{k:>5}  {seconds:>8.2f}  {rate:>9.0f}{note}")
        which = "epochs 2.." + str(len(self.epoch_seconds)) if len(self.epoch_seconds) > 1 else "epoch 1"
        lines.append(f"steady state: {self.steady_images_per_second:.0f} images/s (median of {which})")
        return "\n".join(lines)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_data(recipe: Any, epochs: int = 3, max_batches: int | None = None) -> BenchResult:
    """Time `epochs` passes over the train loader of `recipe`, as the trainer feeds it, without a model;
    `max_batches` cuts each pass short."""
    from imgtrain.engine.device import configure_backends, select_device

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    cfg = recipe.train
    device = select_device(cfg.device)
    configure_backends(device, cfg.deterministic, cfg.threads)
    seed_everything(cfg.seed)
    started = time.perf_counter()
    splits = build_splits(recipe.data)
    prepared = prepare_data(recipe, splits, device)
    setup = time.perf_counter() - started
    cache, transform, loaders = prepared.cache, prepared.train_batch_transform, prepared.loaders
    where = f"per batch on {device.type}" if transform is not None else "per image in the loader"
    description = (f"{recipe.data.source}: {len(splits.train)} train images, {splits.channels} channel(s), "
                   f"{prepared.img_size} px, batch {recipe.data.batch_size}, "
                   f"workers {resolve_workers(recipe.data.workers)}, "
                   f"cache {recipe.data.cache if cache else 'off'}, augmentation {where}")
    result = BenchResult(description=description, setup_seconds=setup,
                         cache=None if cache is None else cache.describe())
    for epoch in range(epochs):
        loaders.train_generator.manual_seed(cfg.seed + epoch)  # as the trainer does
        seen = 0
        _synchronize(device)
        begin = time.perf_counter()
        for index, (inputs, _targets) in enumerate(loaders.train):
            if max_batches is not None and index >= max_batches:
                break
            inputs = inputs.to(device, non_blocking=True)
            if transform is not None:
                inputs = transform(inputs)
            seen += inputs.shape[0]
        _synchronize(device)
        result.epoch_seconds.append(time.perf_counter() - begin)
        result.epoch_images.append(seen)
    return result


__all__ = ["BenchResult", "bench_data"]
