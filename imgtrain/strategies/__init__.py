"""Strategies: one file each, a pure function plus a thin Hook.

`build_strategies(recipe)` returns the hooks a recipe asks for, in the order they run.
The order is declared here, once:

1. transfer (transfer.*): sets which layer groups train at epoch_start, before any batch;
2. mixing (mix.*): replaces the batch at batch_start, before anything reads it;
3. ema (ema.*): averages the weights after each optimizer step, once they are final;
4. early stopping (early_stop.*): reads the finished epoch's row at epoch_end, after the
   EMA, and may end the run (and restore the best weights at fit_end).
"""

from __future__ import annotations

from typing import Any

from imgtrain.config import RecipeError
from imgtrain.engine.events import Hook
from imgtrain.strategies.early_stopping import EarlyStoppingHook, should_stop
from imgtrain.strategies.ema import EmaHook, ema_decay, ema_update
from imgtrain.strategies.mixing import MixingHook, cutmix_box, mix_batch, sample_lam
from imgtrain.strategies.transfer import TransferHook, freeze_until, layer_groups, transfer_enabled


def mixing_enabled(recipe: Any) -> bool:
    mix = recipe.mix
    return bool(mix.mixup_alpha or mix.cutmix_alpha) and mix.prob > 0


def build_strategies(recipe: Any) -> list[Hook]:
    """The strategy hooks of a recipe, in declared order (see the module docstring)."""
    hooks: list[Hook] = []
    if transfer_enabled(recipe):
        hooks.append(TransferHook(recipe.transfer))
    if mixing_enabled(recipe):
        if recipe.data.batch_size < 2:
            raise RecipeError("Mixup/CutMix blend images within a batch: data.batch_size must be >= 2 "
                              f"(got {recipe.data.batch_size}), or turn mixing off",
                              file=recipe.source_file, key="data.batch_size")
        # mixing draws from its own generator, offset from the train seed so it does not
        # replay the shuffle's stream
        hooks.append(MixingHook(recipe.mix, recipe.train.label_smoothing, seed=recipe.train.seed + 1))
    if recipe.ema.enabled:
        hooks.append(EmaHook(recipe.ema.decay, warmup=recipe.ema.warmup, validate=recipe.ema.validate))
    if recipe.early_stop.monitor is not None:
        hooks.append(EarlyStoppingHook(recipe.early_stop))
    return hooks


__all__ = ["EarlyStoppingHook", "EmaHook", "MixingHook", "should_stop", "TransferHook", "build_strategies", "freeze_until", "layer_groups",
           "transfer_enabled", "cutmix_box", "ema_decay", "ema_update",
           "mix_batch", "mixing_enabled", "sample_lam"]
