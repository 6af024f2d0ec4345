"""Strategies: one file each, a pure function plus a thin Hook.

`build_strategies(recipe, teacher=None, epoch_plans=None)` returns the hooks a recipe asks for, in
the order they run (`teacher`: the frozen teachers `load_teachers` loaded and checked, when
`distill.teacher` is set; `epoch_plans`: `plan_epochs(recipe, img_size)` with progressive resizing).
The order is declared here, once:

1. transfer (transfer.*): sets which layer groups train at epoch_start, before any batch;
2. curriculum (curriculum.*): picks the epoch's images at epoch_start (its sampler's order),
   after transfer and before anything sees a batch; reads the logits at after_forward (self_paced);
3. progressive resizing (progressive.*): shrinks the batch to the epoch's size at batch_start
   (the Trainer follows its plan for the batch size and lr scale);
4. mixing (mix.*): replaces the batch at batch_start, after resizing (cheaper at the small size);
5. distillation (distill.*): replaces the loss at after_loss; its teacher sees the batch as
   mixing (and resizing) left it;
6. ema (ema.*): averages the weights after each optimizer step, once they are final;
7. training diagnostics (diagnostics.*): the gradient monitor reads the final gradients at
   before_step; the non-finite guard checks the loss at after_backward, after every hook that
   changes it, and stops the run or skips the step;
8. early stopping (early_stop.*): reads the finished epoch's row at epoch_end, after the
   EMA, and may end the run (and restore the best weights at fit_end).

The LR finder (lr_finder.py) is no hook: its range test runs before training (`optim.lr: find`,
`imgtrain lr-find`) and leaves the model, optimizer and data order as it found them.
"""

from __future__ import annotations

from typing import Any, List, Optional

from imgtrain.config import RecipeError
from imgtrain.engine.events import Hook
from imgtrain.strategies.curriculum import (CurriculumHook, curriculum_enabled, easiest, pacing_fraction,
                                             prepare_curriculum)
from imgtrain.strategies.diagnostics import (GradientMonitorHook, NonFiniteGuardHook, NonFiniteLossError,
                                             build_diagnostics, check_diagnostics, classify_gradients,
                                             first_nonfinite_gradient, gradient_norms)
from imgtrain.strategies.distillation import DistillationHook, TeacherEnsemble, distillation_loss, load_teachers
from imgtrain.strategies.early_stopping import EarlyStoppingHook, should_stop
from imgtrain.strategies.ema import EmaHook, ema_decay, ema_update
from imgtrain.strategies.mixing import MixingHook, cutmix_box, mix_batch, sample_lam
from imgtrain.strategies.progressive import (EpochPlan, ProgressiveResizingHook, plan_epochs, progressive_enabled,
                                             resize_batch)
from imgtrain.strategies.transfer import TransferHook, freeze_until, layer_groups, transfer_enabled


def mixing_enabled(recipe: Any) -> bool:
    mix = recipe.mix
    return bool(mix.mixup_alpha or mix.cutmix_alpha) and mix.prob > 0


def build_strategies(recipe: Any, teacher: Optional[TeacherEnsemble] = None,
                     epoch_plans: Optional[List[EpochPlan]] = None) -> list[Hook]:
    """The strategy hooks of a recipe, in declared order (see the module docstring).

    epoch_plans: `plan_epochs(recipe, img_size)` when progressive resizing is on."""
    hooks: list[Hook] = []
    if transfer_enabled(recipe):
        hooks.append(TransferHook(recipe.transfer))
    if curriculum_enabled(recipe):
        hooks.append(CurriculumHook(recipe.curriculum, seed=recipe.train.seed))
    if progressive_enabled(recipe):
        if epoch_plans is None:
            raise ValueError("progressive.* is set: pass epoch_plans=plan_epochs(recipe, img_size)")
        hooks.append(ProgressiveResizingHook(epoch_plans, channels_last=recipe.train.channels_last))
    if mixing_enabled(recipe):
        if recipe.data.batch_size < 2:
            raise RecipeError("Mixup/CutMix blend images within a batch: data.batch_size must be >= 2 "
                              f"(got {recipe.data.batch_size}), or turn mixing off",
                              file=recipe.source_file, key="data.batch_size")
        # mixing draws from its own generator, offset from the train seed so it does not
        # replay the shuffle's stream
        hooks.append(MixingHook(recipe.mix, recipe.train.label_smoothing, seed=recipe.train.seed + 1))
    if recipe.distill.teacher is not None:
        if teacher is None:
            raise ValueError("distill.teacher is set: pass teacher=load_teachers(recipe, classes, mean, std)")
        hooks.append(DistillationHook(recipe.distill, teacher))
    if recipe.ema.enabled:
        hooks.append(EmaHook(recipe.ema.decay, warmup=recipe.ema.warmup, validate=recipe.ema.validate))
    check_diagnostics(recipe.diagnostics, file=recipe.source_file)
    hooks.extend(build_diagnostics(recipe.diagnostics))  # gradient monitor, non-finite guard
    if recipe.early_stop.monitor is not None:
        hooks.append(EarlyStoppingHook(recipe.early_stop))
    return hooks


__all__ = ["GradientMonitorHook", "NonFiniteGuardHook", "NonFiniteLossError", "build_diagnostics",
           "check_diagnostics", "classify_gradients", "first_nonfinite_gradient", "gradient_norms",
           "CurriculumHook", "curriculum_enabled", "easiest", "pacing_fraction", "prepare_curriculum", "DistillationHook", "distillation_loss", "load_teachers", "EarlyStoppingHook", "EmaHook", "MixingHook", "should_stop", "TransferHook", "build_strategies", "freeze_until", "layer_groups",
           "transfer_enabled", "cutmix_box", "ema_decay", "ema_update",
           "mix_batch", "mixing_enabled", "sample_lam", "ProgressiveResizingHook", "plan_epochs",
           "progressive_enabled", "resize_batch"]
