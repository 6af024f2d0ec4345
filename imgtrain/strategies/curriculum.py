"""Curriculum learning: train on the easiest images first, then let the harder ones in.

Each epoch draws only from the easiest `fraction(epoch)` of the training images; the pacing grows
that fraction from `start_fraction` (s) to 1.0 by `end_point` of training:

    progress p = min(1, epoch / (end_point * epochs))          (epoch 0-based)
    linear:  s + (1 - s) * p
    root:    sqrt(s^2 + (1 - s^2) * p)        (grows fast early, when the model learns fastest)
    step:    s + (1 - s) * floor(p * step_count) / step_count

The difficulty is a reference model's loss, a CSV column or, self-paced, each image's running loss.
An epoch is still len(train split) draws (repeats of the pool), so the lr schedule is unchanged; pools
are seeded by (train.seed, epoch), so a resumed run draws the same images.

    fraction = pacing_fraction(epoch, epochs, start_fraction=0.3, end_point=0.5, kind="root")
    pool = easiest(scores, fraction, generator)          # indices of the easiest images
    order = repeat_pool(pool, len(scores), generator)    # one epoch's draws
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from imgtrain.config import RecipeError
from imgtrain.data.samplers import RankShareSampler, loader_with_sampling, rank_share
from imgtrain.engine.distributed import is_distributed, sum_across, world_info
from imgtrain.engine.events import Hook
from imgtrain.models.trained import load_trained
from imgtrain.strategies.base import Strategy, StrategyContext, require_context

PACINGS = ("linear", "root", "step")
#: offsets the curriculum's generator from the shuffle's and mixing's (train.seed, train.seed + 1)
SEED_OFFSET = 2


def pacing_fraction(epoch: int, epochs: int, start_fraction: float, end_point: float, kind: str = "linear",
                    step_count: int = 3) -> float:
    """Fraction of the training images (the easiest ones) used at `epoch` (0-based) of `epochs`."""
    if not 0 < start_fraction <= 1 or not 0 < end_point <= 1:
        raise ValueError(f"start_fraction and end_point must lie in (0, 1], "
                         f"got {start_fraction}, {end_point}")
    progress = min(1.0, epoch / (end_point * epochs))
    s = start_fraction
    if kind == "linear":
        fraction = s + (1 - s) * progress
    elif kind == "root":
        fraction = math.sqrt(s * s + (1 - s * s) * progress)
    elif kind == "step":
        # + 1e-9: 0.6 * 5 is 2.9999999999999996 in floating point, and must count as step 3
        fraction = s + (1 - s) * math.floor(progress * step_count + 1e-9) / step_count
    else:
        raise ValueError(f"unknown pacing {kind!r}; expected one of {', '.join(PACINGS)}")
    return min(1.0, fraction)


def pool_size(fraction: float, total: int) -> int:
    """How many images a fraction keeps: at least one, rounded up."""
    return max(1, min(total, math.ceil(fraction * total - 1e-9)))


def easiest(scores: torch.Tensor, fraction: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the easiest (lowest-scoring) `ceil(fraction * n)` images, easiest first, ties at random."""
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    shuffled = torch.randperm(len(scores), generator=generator)
    # a stable sort of randomly permuted scores: ties keep the random order
    ranked = shuffled[torch.argsort(scores[shuffled], stable=True)]
    return ranked[:pool_size(fraction, len(scores))]


def repeat_pool(pool: torch.Tensor, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`length` draws from `pool`: shuffled copies of it in a row (each image once before any twice)."""
    copies = math.ceil(length / len(pool))
    return torch.cat([pool[torch.randperm(len(pool), generator=generator)] for _ in range(copies)])[:length]


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample (no smoothing): class indices (N,) or soft targets (N, C)."""
    logits = outputs.detach().float()
    if targets.ndim == 2:  # Mixup/CutMix: cross-entropy with the blended label probabilities
        return -(targets.float() * F.log_softmax(logits, dim=1)).sum(1)
    return F.cross_entropy(logits, targets, reduction="none")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The curriculum's generator for one epoch: depends on (seed, epoch) alone."""
    return torch.Generator().manual_seed((seed + SEED_OFFSET) * 1_000_003 + epoch)


def _names(items: Sequence[Any], limit: int = 3) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (", ..." if len(items) > limit else "")


def csv_difficulty(path: str, column: str, id_column: str | None, dataset: Any,
                   search_dirs: Sequence[str] = (), file: str | None = None) -> torch.Tensor:
    """Difficulty of every image of `dataset` (the train split) from a CSV column, rows matched by
    `id_column`: a file path (absolute, or relative to the CSV's folder, the working folder or one of
    `search_dirs`) or the row index in the train split. A training image without a row is an error."""
    csv_path = Path(path).expanduser()
    if not csv_path.is_file():
        raise RecipeError(f"{csv_path}: no such file (relative paths start in the working folder)",
                          file=file, key="curriculum.csv")
    paths = getattr(dataset, "paths", None)
    id_column = id_column or ("path" if paths is not None else "index")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for key, name in (("curriculum.column", column), ("curriculum.id_column", id_column)):
            if name not in header:
                columns = ", ".join(header) or "none"
                raise RecipeError(f"{csv_path} has no column {name!r}; its columns are {columns}",
                                  file=file, key=key)
        rows = [(line, row[id_column], row[column]) for line, row in enumerate(reader, start=2)]
    total = len(dataset)
    if paths is not None:
        lookup = {os.path.abspath(p): i for i, p in enumerate(paths)}
        bases = [csv_path.parent, Path.cwd(), *(Path(d) for d in search_dirs)]

        def locate(text: str) -> int | None:
            candidate = Path(text).expanduser()
            for where in ([candidate] if candidate.is_absolute() else [b / candidate for b in bases]):
                found = lookup.get(os.path.abspath(where))
                if found is not None:
                    return found
            return None
    else:
        def locate(text: str) -> int | None:
            try:
                index = int(text)
            except ValueError:
                raise RecipeError(f"{csv_path}: {id_column} {text!r} is not a row index of the train split "
                                  f"(0..{total - 1})", file=file, key="curriculum.id_column") from None
            return index if 0 <= index < total else None

    scores = torch.full((total,), math.nan, dtype=torch.float64)
    for line, name, value in rows:
        index = locate(name)
        if index is None:
            continue  # an image of another split, or not in this run's training subset
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise RecipeError(f"{csv_path}, line {line}: {column} {value!r} is not a finite number",
                              file=file, key="curriculum.column")
        if not math.isnan(float(scores[index])):
            raise RecipeError(f"{csv_path}, line {line}: a second row for {name!r}; give each image one row",
                              file=file, key="curriculum.csv")
        scores[index] = score
    missing = torch.nonzero(torch.isnan(scores)).flatten().tolist()
    if missing:
        names = [paths[i] for i in missing] if paths is not None else [f"index {i}" for i in missing]
        raise RecipeError(f"{csv_path} has no row for {len(missing)} of the {total} training images "
                          f"(first: {_names(names)}); every training image needs a {column} "
                          f"(matched by the {id_column!r} column)", file=file, key="curriculum.csv")
    return scores.float()


@torch.no_grad()
def reference_difficulty(target: str, dataset: Any, classes: Sequence[str], channels: int,
                         device: torch.device, batch_size: int = 256,
                         file: str | None = None) -> torch.Tensor:
    """Per-image cross-entropy on `dataset` of a trained model, in eval mode with its own eval transform."""
    from imgtrain.engine.checkpoint import CheckpointError
    try:
        reference = load_trained(target, device=device)
    except CheckpointError as exc:
        raise RecipeError(f"{exc} (a run folder or a .safetensors file written by imgtrain)",
                          file=file, key="curriculum.reference") from None
    if len(reference.classes) != len(classes):
        raise RecipeError(f"{target} was trained on {len(reference.classes)} classes, this data has "
                          f"{len(classes)}; the reference must be trained on the same classes",
                          file=file, key="curriculum.reference")
    if list(reference.classes) != list(classes):
        raise RecipeError(f"{target} was trained on the classes {_names(reference.classes, 5)}, this data "
                          f"has {_names(list(classes), 5)}; the reference must be trained on the same ones",
                          file=file, key="curriculum.reference")
    if reference.channels != channels:
        raise RecipeError(f"{target} takes {reference.channels}-channel images, this data has {channels} "
                          "channel(s)", file=file, key="curriculum.reference")
    loader = DataLoader(dataset.with_transform(reference.eval_transform()), batch_size=batch_size, shuffle=False)
    return torch.cat([per_sample_loss(reference.model(inputs.to(device)), targets.to(device)).cpu()
                      for inputs, targets in loader])


class CurriculumSampler(Sampler[int]):
    """Yields the epoch's `order` that `CurriculumHook` sets at epoch_start (the sampler is iterated
    in the main process when the epoch starts); without one, a plain shuffle."""

    def __init__(self, length: int, generator: torch.Generator | None = None):
        self.length = length
        self.generator = generator
        self.order: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        order = self.order if self.order is not None else torch.randperm(self.length, generator=self.generator)
        return iter(order.tolist())


class CurriculumHook(Hook):
    """Picks each epoch's pool and order at epoch_start; records the fraction in history.csv;
    keeps the self-paced running loss up to date at after_forward."""

    name = "curriculum"

    def __init__(self, cfg: Any, seed: int):
        self.cfg, self.seed = cfg, seed  # seed: train.seed (the pools and orders derive from it)
        self.sampler: CurriculumSampler | None = None
        self.scores: torch.Tensor | None = None      # difficulty per image (self_paced: on the device)
        self.seen: torch.Tensor | None = None        # self_paced: images measured at least once
        self.order: torch.Tensor | None = None       # this epoch's draws (dataset indices)
        self.cursor = 0                              # draws of this epoch already in a batch (this rank's)
        self.touched: torch.Tensor | None = None     # self_paced, several processes: scored here since the last merge
        self._share: torch.Tensor | None = None      # several processes: this rank's share of `order`
        self._share_of: torch.Tensor | None = None   # the order `_share` was taken from

    @property
    def self_paced(self) -> bool:
        return self.cfg.difficulty == "self_paced"

    def attach(self, sampler: CurriculumSampler, scores: torch.Tensor | None) -> None:
        """The sampler installed in the train loader, and the scores (None for self_paced)."""
        self.sampler = sampler
        if scores is not None:
            self.scores = scores.float().cpu()

    def fit_start(self, state: Any) -> None:
        if self.sampler is None:
            raise RuntimeError("CurriculumHook has no sampler: call prepare_curriculum before training")
        if self.self_paced:
            if self.scores is None:
                self.scores = torch.zeros(len(self.sampler))
                self.seen = torch.zeros(len(self.sampler), dtype=torch.bool)
            assert self.seen is not None, "self-paced scores are saved and restored with their seen mask"
            # kept on the device: updating them each batch costs no host sync
            self.scores, self.seen = self.scores.to(state.device), self.seen.to(state.device)

    def ranking_scores(self) -> torch.Tensor:
        """The scores the pool is chosen by (self_paced: unseen images at the mean of the seen)."""
        assert self.scores is not None, "scores are set by attach (given scores) or fit_start (self_paced)"
        scores = self.scores.detach().cpu().double()
        if not self.self_paced:
            return scores
        assert self.seen is not None, "self_paced: set at fit_start with the scores"
        seen = self.seen.cpu()
        fill = scores[seen].mean() if seen.any() else torch.zeros((), dtype=torch.float64)
        return torch.where(seen, scores, fill)

    def epoch_start(self, state: Any) -> None:
        assert self.sampler is not None, "fit_start checked it"
        if state.resumed_batches:
            # a mid-epoch resume: the pool was chosen from the scores before this epoch changed them;
            # the saved order and cursor go on (the history row's columns were saved with the epoch's)
            self.sampler.order = self.order
            return
        fraction = pacing_fraction(state.epoch, state.epochs, self.cfg.start_fraction, self.cfg.end_point,
                                   self.cfg.pacing, self.cfg.step_count)
        generator = epoch_generator(self.seed, state.epoch)
        pool = easiest(self.ranking_scores(), fraction, generator)
        self.order = repeat_pool(pool, len(self.sampler), generator)
        self.sampler.order = self.order
        self.cursor = 0
        # the loop reset epoch_metrics just before this event: these land in the history row
        state.epoch_metrics["curriculum_fraction"] = round(fraction, 6)
        state.epoch_metrics["curriculum_images"] = len(pool)

    def batch_indices(self, count: int) -> torch.Tensor:
        """Dataset indices of the current batch: the next `count` of the epoch's order (under several
        processes, of this rank's share of it: the loader draws that share, RankShareSampler)."""
        assert self.order is not None, "set at epoch_start"
        rank, world, _ = world_info()
        if world > 1 and self._share_of is not self.order:  # once per epoch order
            self._share = torch.tensor(rank_share(self.order.tolist(), rank, world), dtype=torch.long)
            self._share_of = self.order
        order = self.order if world == 1 or self._share is None else self._share
        return order[self.cursor:self.cursor + count]

    def sync_ranks(self, state: Any) -> None:
        """Several processes: each rank scored the images of its own batches since the last merge; every
        image's score becomes the mean over the ranks that scored it (the others kept the same score), so
        every rank chooses the next pool from the same scores."""
        if not self.self_paced or self.touched is None:
            return
        assert self.scores is not None and self.seen is not None, "self_paced: set at fit_start"
        counts = sum_across(self.touched.long())
        totals = sum_across(torch.where(self.touched, self.scores, torch.zeros_like(self.scores)))
        scored = counts > 0
        self.scores = torch.where(scored, totals / counts.clamp(min=1), self.scores)
        self.seen = self.seen | scored
        self.touched.zero_()

    def after_forward(self, state: Any) -> None:
        if state.pass_index:  # a replay of the group's batches (SAM): scored and counted at the first pass
            return
        count = state.outputs.shape[0]
        if self.self_paced:
            index = self.batch_indices(count)
            # an image drawn twice in one batch keeps its last loss: one write per image, deterministic
            where, inverse = torch.unique(index, return_inverse=True)
            last = torch.full((len(where),), -1, dtype=torch.long).scatter_reduce(
                0, inverse, torch.arange(count), reduce="amax")
            losses = per_sample_loss(state.outputs, state.targets)[last.to(state.outputs.device)]
            assert self.scores is not None and self.seen is not None, "self_paced: set at fit_start"
            where = where.to(self.scores.device)
            momentum = self.cfg.momentum
            running = momentum * self.scores[where] + (1 - momentum) * losses
            self.scores[where] = torch.where(self.seen[where], running, losses)
            self.seen[where] = True
            if is_distributed():
                if self.touched is None:
                    self.touched = torch.zeros_like(self.seen)
                self.touched[where] = True
        self.cursor += count

    def state_dict(self) -> dict[str, Any]:
        # tensors and ints only: last.state.pt is loaded with weights_only=True. The epoch's order and
        # cursor matter to a state saved inside an epoch.
        tensors = {"scores": self.scores, "seen": self.seen, "order": self.order}
        saved: dict[str, Any] = {key: value.detach().cpu().clone() for key, value in tensors.items()
                                 if value is not None}
        return {**saved, "cursor": self.cursor} if saved else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "order" in state:
            self.order, self.cursor = state["order"], int(state["cursor"])
        if "scores" not in state:
            return
        device = self.scores.device if self.scores is not None else torch.device("cpu")
        self.scores = state["scores"].to(device)
        if "seen" in state:
            self.seen = state["seen"].to(device)


def curriculum_enabled(recipe: Any) -> bool:
    return recipe.curriculum.difficulty not in (None, "none")


def prepare_curriculum(hooks: Sequence[Hook], recipe: Any, splits: Any, loaders: Any,
                       device: torch.device) -> list[str]:
    """Scores the training images, installs the curriculum sampler in `loaders.train` and hands it to
    the `CurriculumHook` among `hooks`; returns lines for train.log. Runs before the run folder exists."""
    hook = next((h for h in hooks if isinstance(h, CurriculumHook)), None)
    if hook is None:
        return []
    cfg, file = recipe.curriculum, recipe.source_file
    _check_sampler(recipe)
    dataset = splits.train
    scores: torch.Tensor | None = None
    if cfg.difficulty == "csv":
        search = [d for d in (recipe.data.image_root, recipe.data.root) if d]
        if recipe.data.root and Path(recipe.data.root).is_file():  # a csv source: its manifest's folder
            search.append(str(Path(recipe.data.root).parent))
        scores = csv_difficulty(cfg.csv, cfg.column, cfg.id_column, dataset, search, file=file)
        source = f"column {cfg.column!r} of {cfg.csv}"
    elif cfg.difficulty == "reference":
        batch = recipe.data.eval_batch_size or 2 * recipe.data.batch_size
        scores = reference_difficulty(cfg.reference, dataset, splits.classes, splits.channels, device, batch,
                                      file=file)
        source = f"the loss of {cfg.reference} (mean {float(scores.mean()):.4f})"
    else:
        source = f"the model's own running loss (momentum {cfg.momentum})"
    sampler = CurriculumSampler(len(dataset), generator=loaders.train.generator)
    loaders.train = loader_with_sampler(loaders.train, sampler)
    hook.attach(sampler, scores)
    line = (f"curriculum: {cfg.pacing} pacing from {cfg.start_fraction:g} of the {len(dataset)} training "
            f"images to all of them by {cfg.end_point:g} of the epochs; difficulty: {source}")
    return [line]


def _check_sampler(recipe: Any) -> None:
    """A curriculum needs data.sampler: random (both choose the images each epoch draws)."""
    if recipe.data.sampler != "random":
        raise RecipeError(f"curriculum learning chooses which images each epoch draws, and so does "
                          f"data.sampler: {recipe.data.sampler}; use one "
                          "(data.sampler: random with a curriculum)",
                          file=recipe.source_file, key="curriculum.difficulty")


def loader_with_sampler(loader: DataLoader, sampler: Sampler) -> DataLoader:
    """The train loader, same settings, drawing the curriculum's order (under several processes, this rank's
    share of it, as the loader it replaces drew its share of the shuffle)."""
    rank, world = getattr(loader, "rank_place", (0, 1))
    if world > 1:
        sampler = RankShareSampler(len(sampler), rank, world, loader.generator, inner=sampler)  # type: ignore[arg-type]
    return loader_with_sampling(loader, batch_size=loader.batch_size, sampler=sampler)


class Curriculum(Strategy):
    name, section = "curriculum", "curriculum"

    def enabled(self, recipe: Any) -> bool:
        return curriculum_enabled(recipe)

    def check(self, recipe: Any) -> None:
        _check_sampler(recipe)

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        context = require_context(context, self.name)
        hook = CurriculumHook(recipe.curriculum, seed=recipe.train.seed)
        context.notes += prepare_curriculum([hook], recipe, context.splits, context.loaders, context.device)
        return [hook]


__all__ = ["Curriculum", "CurriculumHook", "CurriculumSampler", "csv_difficulty", "curriculum_enabled", "easiest",
           "epoch_generator", "pacing_fraction", "per_sample_loss", "pool_size", "prepare_curriculum",
           "reference_difficulty", "repeat_pool"]
