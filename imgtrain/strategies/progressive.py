"""Progressive resizing: train on small images first, then on larger ones (Howard 2018; FFCV).

Early epochs learn coarse shapes, which small images show as well at a fraction of the cost. A
recipe gives `stages` (each with an image size, epochs, and optionally a batch size and lr) or a
linear ramp from `min_size` to `max_size` (FFCV's). The data pipeline makes images at
`augment.img_size` and each batch is shrunk on the device (`resize_batch`); evaluation is at
`eval_size` (default: the last training size). A stage that changes the batch size without an lr
scales the lr (`lr_scaling`). The plan is a pure function of the epoch (`plan_epochs`), so a resume
needs no saved state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from imgtrain.config import RecipeError
from imgtrain.engine.events import Hook
from imgtrain.engine.state import EpochPlan
from imgtrain.strategies.base import Strategy, StrategyContext, require_context


def progressive_enabled(recipe: Any) -> bool:
    cfg = recipe.progressive
    return bool(cfg.stages) or cfg.min_size is not None


def ramp_size(epoch: int, epochs: int, min_size: int, max_size: int, ramp_start: float, ramp_end: float,
              multiple: int) -> int:
    """The image size of `epoch` (0-based): min_size up to ramp_start x epochs, max_size from ramp_end
    x epochs, linear in between, rounded to the nearest `multiple` (FFCV's `get_resolution`)."""
    start, end = ramp_start * epochs, ramp_end * epochs
    if end <= start:
        fraction = 1.0 if epoch >= end else 0.0
    else:
        fraction = min(1.0, max(0.0, (epoch - start) / (end - start)))
    size = round((min_size + fraction * (max_size - min_size)) / multiple) * multiple
    return max(min_size, min(max_size, size))


def lr_scale_for(batch_size: int, base_batch_size: int, rule: str) -> float:
    """Learning-rate multiplier for a batch of `batch_size` when the recipe's lr is for `base_batch_size`."""
    ratio = batch_size / base_batch_size
    return {"linear": ratio, "sqrt": math.sqrt(ratio)}.get(rule, 1.0)


def plan_epochs(recipe: Any, train_size: int) -> list[EpochPlan]:
    """One EpochPlan per epoch of the run (the same plan every epoch without progressive resizing);
    train_size: the side the data pipeline makes (augment.img_size or the native size)."""
    cfg, base_batch, epochs = recipe.progressive, recipe.data.batch_size, recipe.train.epochs

    def segment(stage: int) -> int:  # schedule: restart gives each stage a schedule of its own
        return stage if cfg.schedule == "restart" else 0

    if cfg.stages:
        plans: list[EpochPlan] = []
        for index, stage in enumerate(cfg.stages):
            batch = int(stage.get("batch_size", base_batch))
            scale = (float(stage["lr"]) / recipe.optim.lr if stage.get("lr") is not None
                     else lr_scale_for(batch, base_batch, cfg.lr_scaling))
            plans += [EpochPlan(index, int(stage["img_size"]), batch, scale, segment(index))] * int(stage["epochs"])
        return plans
    if cfg.min_size is not None:
        top = cfg.max_size or train_size
        sizes = [ramp_size(e, epochs, cfg.min_size, top, cfg.ramp_start, cfg.ramp_end, cfg.size_multiple)
                 for e in range(epochs)]
        distinct = sorted(set(sizes))
        return [EpochPlan(distinct.index(size), size, base_batch, 1.0, segment(distinct.index(size))) for size in sizes]
    return [EpochPlan(0, train_size, base_batch, 1.0)] * epochs


def eval_size(recipe: Any, train_size: int) -> int:
    """The side validation and test images are made at."""
    cfg = recipe.progressive
    if not progressive_enabled(recipe):
        return train_size
    if cfg.eval_size is not None:
        return cfg.eval_size
    return plan_epochs(recipe, train_size)[-1].img_size


def check_progressive_recipe(recipe: Any, train_size: int, batch_sampler: bool = False) -> None:
    """Checks that need the data's size and the rest of the recipe; run before training starts."""
    if not progressive_enabled(recipe):
        return
    cfg, file = recipe.progressive, recipe.source_file
    if cfg.stages:
        total = sum(int(stage["epochs"]) for stage in cfg.stages)
        if total != recipe.train.epochs:
            raise RecipeError(f"the stages add up to {total} epochs but train.epochs is {recipe.train.epochs}; "
                              f"set train.epochs: {total} or change the stages' epochs", file=file,
                              key="progressive.stages")
        largest = max(int(stage["img_size"]) for stage in cfg.stages)
        if batch_sampler and any("batch_size" in stage for stage in cfg.stages):
            raise RecipeError("data.sampler per_class builds its own batches of data.batch_size: stages "
                              "cannot change batch_size with it; drop batch_size from the stages",
                              file=file, key="progressive.stages")
    else:
        largest = cfg.max_size or train_size
        if cfg.min_size >= largest:
            raise RecipeError(f"min_size {cfg.min_size} must be smaller than the ramp's last size {largest} "
                              "(max_size, default augment.img_size)", file=file, key="progressive.min_size")
    if largest > train_size:
        raise RecipeError(f"a training size of {largest} px is larger than the {train_size} px images the data "
                          f"pipeline makes; set augment.img_size: {largest} (images are only ever shrunk "
                          "per batch)", file=file, key="progressive.stages" if cfg.stages else "progressive.max_size")


def describe_plans(plans: list[EpochPlan]) -> str:
    """'stage 1: 16 px, batch 256, 3 epochs; stage 2: ...' (one entry per run of equal plans)."""
    parts, run = [], 1
    for index, plan in enumerate(plans):
        if index + 1 < len(plans) and plans[index + 1] == plan:
            run += 1
            continue
        lr = f", lr x{plan.lr_scale:g}" if plan.lr_scale != 1.0 else ""
        parts.append(f"{plan.img_size} px, batch {plan.batch_size}{lr}, {run} epoch{'s' if run > 1 else ''}")
        run = 1
    return "; ".join(parts)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """A batch (B, C, H, W) at size x size: bilinear, antialiased when shrinking; unchanged at its size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrinking = size < images.shape[-1] or size < images.shape[-2]
    # float32: the antialiased kernel has no half-precision CPU version (autocast acts inside the model)
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=shrinking)
    return out.to(dtype=images.dtype)


class ProgressiveResizingHook(Hook):
    """Shrinks every training batch to its epoch's size and records stage, size and batch size."""

    name = "progressive_resizing"

    def __init__(self, plans: list[EpochPlan], channels_last: bool = False):
        self.plans, self.channels_last = plans, channels_last
        self.size: int | None = None

    def epoch_start(self, state: Any) -> None:
        plan = self.plans[min(state.epoch, len(self.plans) - 1)]
        self.size = plan.img_size
        state.epoch_metrics.update({"stage": plan.stage + 1, "img_size": plan.img_size,
                                    "batch_size": plan.batch_size})

    def batch_start(self, state: Any) -> None:
        if self.size is None or state.inputs.shape[-1] == self.size:
            return
        state.inputs = resize_batch(state.inputs, self.size)
        if self.channels_last:
            state.inputs = state.inputs.contiguous(memory_format=torch.channels_last)


class Progressive(Strategy):
    name, section = "progressive_resizing", "progressive"

    def enabled(self, recipe: Any) -> bool:
        return progressive_enabled(recipe)

    def plan_epochs(self, recipe: Any, context: StrategyContext) -> list[EpochPlan]:
        check_progressive_recipe(recipe, context.img_size, batch_sampler=recipe.data.sampler == "per_class")
        return plan_epochs(recipe, context.img_size)

    def eval_size(self, recipe: Any, train_size: int) -> int:
        return eval_size(recipe, train_size)

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        context = require_context(context, self.name)
        context.notes.append("progressive resizing: " + describe_plans(context.plans)
                             + f"; evaluation at {eval_size(recipe, context.img_size)} px")
        return [ProgressiveResizingHook(context.plans, channels_last=recipe.train.channels_last)]


__all__ = ["Progressive", "EpochPlan", "ProgressiveResizingHook", "check_progressive_recipe", "describe_plans",
           "eval_size", "lr_scale_for", "plan_epochs", "progressive_enabled", "ramp_size", "resize_batch"]
