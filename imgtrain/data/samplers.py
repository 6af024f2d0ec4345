"""Training samplers for imbalanced data (`data.sampler`).

- `random` (default): a shuffle, every image once per epoch.
- `balanced`: each draw picks a class uniformly, then one of its images, with replacement, as
  many draws as images ("class-balanced sampling", Kang et al., ICLR 2020).
- `per_class`: "P x K" batches (Hermans et al. 2017) of `batch_size / images_per_class` classes
  drawn uniformly, `images_per_class` images each, taken from a per-class shuffle that is
  reshuffled when used up, so every tail-class image comes round before any repeats.

Both draw from the generator they are given, the train loader's, which the trainer re-seeds
every epoch, so a resumed run draws the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler

from imgtrain.config import RecipeError


def class_balanced_weights(targets: torch.Tensor) -> torch.Tensor:
    """Per-image draw weights 1 / count(class): each present class gets the same total weight."""
    counts = torch.bincount(targets.long())
    return 1.0 / counts[targets.long()].double()


class ClassBalancedSampler(WeightedRandomSampler):
    """Indices drawn class-uniformly, then image-uniformly within the class (with replacement)."""

    def __init__(self, targets: torch.Tensor, num_samples: int | None = None,
                 generator: torch.Generator | None = None):
        targets = torch.as_tensor(targets, dtype=torch.long)
        if len(targets) == 0:
            raise ValueError("the balanced sampler needs at least one training image")
        # torch's stubs say Sequence[float]; the sampler converts with torch.as_tensor, a tensor is fine
        super().__init__(cast(Sequence[float], class_balanced_weights(targets)), num_samples or len(targets),
                         replacement=True, generator=generator)


class PerClassBatchSampler(Sampler[list[int]]):
    """len(targets) // batch_size (at least one) full batches of `batch_size // images_per_class`
    classes x `images_per_class` images each."""

    def __init__(self, targets: torch.Tensor, batch_size: int, images_per_class: int,
                 generator: torch.Generator | None = None):
        targets = torch.as_tensor(targets, dtype=torch.long)
        if images_per_class < 1 or batch_size % images_per_class:
            raise ValueError(f"batch_size {batch_size} must be a multiple of images_per_class "
                             f"{images_per_class}")
        self.classes_per_batch = batch_size // images_per_class
        self.images_per_class = images_per_class
        self.batch_size = batch_size
        self.generator = generator
        order = torch.argsort(targets, stable=True)
        counts = torch.bincount(targets)
        # indices of each present class's images
        self.members = [m for m in torch.split(order, counts.tolist()) if len(m)]
        if self.classes_per_batch > len(self.members):
            raise ValueError(f"a batch needs {self.classes_per_batch} classes but the data has "
                             f"{len(self.members)}")
        self.num_batches = max(1, len(targets) // batch_size)
        self.targets = targets

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        g = self.generator
        # drawn in full up front: the epoch's batches depend only on the generator's state
        queues = [m[torch.randperm(len(m), generator=g)] for m in self.members]
        cursors = [0] * len(self.members)
        batches = []
        for _ in range(self.num_batches):
            chosen = torch.randperm(len(self.members), generator=g)[:self.classes_per_batch].tolist()
            batch: list[int] = []
            for c in chosen:
                taken: list[int] = []
                while len(taken) < self.images_per_class:
                    if cursors[c] == len(queues[c]):  # used up: reshuffle, start again
                        queues[c] = self.members[c][torch.randperm(len(self.members[c]), generator=g)]
                        cursors[c] = 0
                    step = min(self.images_per_class - len(taken), len(queues[c]) - cursors[c])
                    taken += queues[c][cursors[c]:cursors[c] + step].tolist()
                    cursors[c] += step
                batch += taken
            batches.append(batch)
        return iter(batches)


def train_sampling(cfg: Any, targets: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
    """DataLoader arguments for the train split's order, per `data.sampler` (cfg: recipe.data); a batch
    sampler comes alone, as DataLoader refuses batch_size, shuffle and drop_last alongside it."""
    if cfg.sampler == "random":
        return {"batch_size": cfg.batch_size, "shuffle": True}
    if cfg.sampler == "balanced":
        return {"batch_size": cfg.batch_size, "sampler": ClassBalancedSampler(targets, generator=generator)}
    if cfg.sampler == "per_class":
        k, batch = cfg.images_per_class, cfg.batch_size
        labels = torch.as_tensor(targets, dtype=torch.long)
        present = int((torch.bincount(labels) > 0).sum()) if len(labels) else 0
        if batch % k:
            raise RecipeError(f"sampler per_class needs data.batch_size ({batch}) to be a multiple of "
                              f"images_per_class ({k}); e.g. images_per_class: {_divisor_near(batch, k)}",
                              key="data.images_per_class")
        if batch // k > present:
            raise RecipeError(f"sampler per_class: a batch of {batch} with {k} images per class needs "
                              f"{batch // k} classes, but the training split has {present}; set "
                              f"data.images_per_class to at least {_smallest_fitting(batch, present)} "
                              "or lower data.batch_size",
                              key="data.images_per_class")
        return {"batch_sampler": PerClassBatchSampler(targets, batch, k, generator=generator)}
    raise RecipeError(f"unknown sampler {cfg.sampler!r}; expected random, balanced or per_class",
                      key="data.sampler")


def with_train_sampler(loader: DataLoader, cfg: Any, targets: torch.Tensor) -> TrainLoader:
    """The train loader `build_loaders` made with a shuffle, drawing its order from `data.sampler`."""
    return loader_with_sampling(loader, **train_sampling(cfg, targets, loader.generator))


def loader_with_sampling(loader: DataLoader, dataset: Any = None, **sampling: Any) -> TrainLoader:
    """The same loader (workers, pinning, prefetch, collate, generator ...) with another order:
    `sampling` is DataLoader's `batch_size` with `shuffle` or `sampler`, or a `batch_sampler`."""
    if "batch_sampler" not in sampling:
        sampling["drop_last"] = loader.drop_last
    made = TrainLoader(loader.dataset if dataset is None else dataset, **sampling, num_workers=loader.num_workers,
                       collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
                       worker_init_fn=loader.worker_init_fn,
                       multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                       prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                       pin_memory_device=loader.pin_memory_device, in_order=loader.in_order)
    made.seed_per_sample = getattr(loader, "seed_per_sample", False)
    made.rank_place = getattr(loader, "rank_place", (0, 1))
    return made


class RankShareSampler(Sampler[Any]):
    """Rank `rank`'s share of what the train sampler draws in one epoch, for training under several
    processes (DDP); any sampler of single images: the random shuffle, the balanced sampler, a curriculum's
    order (per_class's batches are sliced instead: RankSliceBatchSampler).

    Every rank runs the same `inner` sampler from the train generator (the trainer seeds it alike on every
    rank, once per epoch), so all draw the same sequence, and each takes every `world_size`-th item from
    `rank` on. The sequence is first padded with its own start to a multiple of `world_size` (as torch's
    `DistributedSampler` pads), so every rank gets the same number of images and batches: DDP needs every
    rank to take the same optimizer steps. The shares interleave, so with per-rank batch B the ranks'
    batches k together hold positions [k*B*W, (k+1)*B*W) of the sequence: the batch one process with
    batch B*W draws. The order is a pure function of the generator, so `TrainLoader.batches_from`
    resumes it inside an epoch. Without `inner`, a shuffle of range(length) (what RandomSampler draws)."""

    def __init__(self, length: int, rank: int, world_size: int, generator: torch.Generator | None,
                 inner: Iterable[Any] | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size at least 1, not rank {rank} "
                             f"of {world_size}")
        self.length, self.rank, self.world_size, self.generator = length, rank, world_size, generator
        self.inner = inner

    def __len__(self) -> int:
        return -(-self.length // self.world_size)  # ceil: the padded share

    def __iter__(self) -> Iterator[Any]:
        if self.inner is None:
            order: list[Any] = torch.randperm(self.length, generator=self.generator).tolist()
        else:
            order = list(self.inner)
        return iter(rank_share(order, self.rank, self.world_size))


def rank_share(order: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Items rank, rank + W, rank + 2W ... of `order` padded with its start to a multiple of W: what
    RankShareSampler gives one rank (a curriculum uses it to know which images its rank's batches hold)."""
    items = list(order)
    padded = -(-len(items) // world_size) * world_size
    while len(items) < padded and items:  # repeat the start (more than once only when length < world)
        items += items[:padded - len(items)]
    return items[rank:padded:world_size]


def global_per_class_batches(per_rank: Any, world_size: int) -> PerClassBatchSampler:
    """per_class under several processes: P x K batches of the global batch (data.batch_size x processes),
    as one process with that batch draws them; RankSliceBatchSampler hands each rank its slice (whole
    classes when the per-rank batch is a multiple of images_per_class, as data.batch_size must be)."""
    if not isinstance(per_rank, PerClassBatchSampler):
        raise TypeError(f"the train loader's batch sampler is a {type(per_rank).__name__}, not the per_class sampler")
    batch, k = per_rank.batch_size * world_size, per_rank.images_per_class
    present = len(per_rank.members)
    if batch // k > present:
        raise RecipeError(f"sampler per_class under {world_size} processes: the global batch of {batch} "
                          f"(data.batch_size {per_rank.batch_size} x {world_size}) with {k} images per class needs "
                          f"{batch // k} classes, but the training split has {present}; set data.images_per_class to "
                          f"at least {_smallest_fitting(batch, present)} or lower data.batch_size",
                          key="data.images_per_class")
    return PerClassBatchSampler(per_rank.targets, batch, k, generator=per_rank.generator)


class RankSliceBatchSampler(Sampler[list[int]]):
    """Rank `rank`'s slice [rank*B/W, (rank+1)*B/W) of every batch of `batch_sampler` (batches of B images,
    B a multiple of W): the ranks' batches k together are the batch k one process draws."""

    def __init__(self, batch_sampler: Any, rank: int, world_size: int):
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        return (batch[len(batch) * self.rank // self.world_size:len(batch) * (self.rank + 1) // self.world_size]
                for batch in self.batch_sampler)


class RankWorkerSeeds:
    """worker_init_fn of a rank's train loader: every rank's loader draws its workers' base seed from the
    same train generator, so without this worker k of every rank would augment with the same random draws.
    Reseeds torch, Python and NumPy in the worker from torch's seed for it and the rank."""

    def __init__(self, rank: int, then: Any = None):
        self.rank, self.then = rank, then

    def __call__(self, worker_id: int) -> None:
        seed = (torch.initial_seed() + self.rank * 1_000_003) % 2**63
        torch.manual_seed(seed)
        random.seed(seed)
        numpy_seed(seed)
        if self.then is not None:
            self.then(worker_id)


def numpy_seed(seed: int) -> None:
    import numpy as np
    np.random.seed(seed % 2**32)


def shard_train_loader(loader: TrainLoader, rank: int, world_size: int) -> TrainLoader:
    """The train loader of one rank under several processes: its RankShareSampler share of whatever the
    loader's sampler draws (per_class: its slice of each global P x K batch), with per-rank augmentation draws (worker
    seeds by RankWorkerSeeds; per-image seeds numbered by the image's place in the whole epoch)."""
    generator = loader.generator
    if loader.batch_size is None:  # per_class: P x K batches of the global batch, a slice to each rank
        sharded = loader_with_sampling(loader, batch_sampler=RankSliceBatchSampler(
            global_per_class_batches(loader.batch_sampler, world_size), rank, world_size))
    else:
        inner = loader.sampler
        images: Any = loader.dataset
        share = RankShareSampler(len(images), rank, world_size, generator, inner=inner)
        sharded = loader_with_sampling(loader, batch_size=loader.batch_size, sampler=share)
    sharded.rank_place = (rank, world_size)
    if sharded.num_workers:
        sharded.worker_init_fn = RankWorkerSeeds(rank, loader.worker_init_fn)
    return sharded


class TrainLoader(DataLoader):
    """The train split's DataLoader: an epoch can start at any batch (`batches_from`: a mid-epoch resume)
    without loading the images before it, and draws exactly what a whole pass would from there on.

    The order is a pure function of the generator, which the trainer re-seeds every epoch, so skipping
    means drawing the skipped batches' indices and dropping them. With workers = 0, augmentation draws
    from torch's global RNG, which a checkpoint saves. With workers > 0, each worker's RNG depends on the
    batches it was dealt, so `seed_per_sample` (deterministic mode with workers) seeds every image's
    augmentation from its place in the epoch instead: the same image, the same draw, whichever worker
    takes it and wherever the epoch started."""

    seed_per_sample = False
    rank_place = (0, 1)  # (rank, world size) of a rank's share under several processes (shard_train_loader)

    def __iter__(self) -> Any:
        return self.batches_from(0) if self.seed_per_sample else super().__iter__()

    def batches_from(self, start: int) -> Iterator[Any]:
        """Iterate the epoch from batch `start` on."""
        seeds = self.generator if self.seed_per_sample else None
        batches = SkippedBatches(self.batch_sampler, start, seeds, *self.rank_place)
        dataset = SeededSamples(self.dataset) if seeds is not None else None
        return DataLoader.__iter__(loader_with_sampling(self, dataset, batch_sampler=batches))


class SkippedBatches(Sampler[list[Any]]):
    """The batches of `batch_sampler` from batch `start` on; with `seed_generator`, each index paired with
    the seed of its place in the epoch (one base drawn from the generator per pass). Under several
    processes (`rank` of `world_size`) the place is counted in the whole epoch, p * world_size + rank, so
    no two ranks give the same seed."""

    def __init__(self, batch_sampler: Any, start: int, seed_generator: torch.Generator | None = None,
                 rank: int = 0, world_size: int = 1):
        self.batch_sampler, self.start, self.seed_generator = batch_sampler, start, seed_generator
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.start, 0)

    def __iter__(self) -> Iterator[list[Any]]:
        # not a generator function: the inner sampler starts here, when the DataLoader asks for it, as it
        # would without this wrapper (a sampler that draws its whole epoch in __iter__ draws it now)
        base = None
        if self.seed_generator is not None:
            base = int(torch.randint(2**62, (1,), generator=self.seed_generator))
        return self._batches(iter(self.batch_sampler), base)

    def _batches(self, batches: Iterator[list[int]], base: int | None) -> Iterator[list[Any]]:
        place, world, rank = 0, self.world_size, self.rank
        for number, batch in enumerate(batches):
            if number >= self.start:
                yield batch if base is None else [(index, base + (place + i) * world + rank)
                                                  for i, index in enumerate(batch)]
            place += len(batch)


class SeededSamples:
    """A dataset whose items are asked for as (index, seed): the global RNGs of the (worker) process are
    seeded before the item is made, so its random augmentation depends on the seed alone."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        torch.manual_seed(seed)
        random.seed(seed)
        return self.dataset[index]


def _divisor_near(n: int, k: int) -> int:
    """The divisor of n closest to k (ties: the larger)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), -d))


def _smallest_fitting(batch: int, classes: int) -> int:
    """The smallest divisor k of batch with batch / k <= classes."""
    return next(d for d in range(1, batch + 1) if batch % d == 0 and batch // d <= max(classes, 1))


__all__ = [
    "ClassBalancedSampler",
    "PerClassBatchSampler",
    "RankShareSampler",
    "RankSliceBatchSampler",
    "RankWorkerSeeds",
    "SeededSamples",
    "SkippedBatches",
    "TrainLoader",
    "class_balanced_weights",
    "global_per_class_batches",
    "loader_with_sampling",
    "rank_share",
    "shard_train_loader",
    "train_sampling",
    "with_train_sampler",
]
