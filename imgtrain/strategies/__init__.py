"""Strategies: one file each, a pure function, a thin Hook and a registry entry (strategies/base.py).

`STRATEGIES` is the one declared list: api.train checks, plans and builds the enabled ones in this
order, and their hooks run in this order:

1. transfer: sets which layer groups train at epoch_start, before any batch;
2. curriculum: picks the epoch's images at epoch_start; reads the logits at after_forward (self_paced);
3. progressive resizing: plans each epoch's size and batch size, shrinks the batch at batch_start;
4. mixing: replaces the batch at batch_start, after resizing (cheaper at the small size);
5. sam: perturbs the weights at the group's last after_backward; the loop replays the mixed batches;
6. distillation: replaces the loss at after_loss; its teacher sees the batch as mixing left it;
7. ema: averages the weights after each optimizer step, once they are final;
8. swa: puts SWALR in place of the schedule at epoch_start, averages the weights at before_eval;
9. diagnostics: reads the final gradients at before_step, and the loss at after_backward, once final;
10. early stopping: reads the finished epoch's row at epoch_end, after the averages;
11. time budget (train.budget): plans the epochs before training (api.train measures the speed); at
    epoch_end stops the run when the next epoch would not fit;
12. the LR finder (optim.lr: find): its range test runs before training (`find_lr`).
"""

from __future__ import annotations

from typing import Any

from imgtrain.engine.events import Hook
from imgtrain.strategies.base import Strategy, StrategyContext
from imgtrain.strategies.budget import TimeBudget
from imgtrain.strategies.curriculum import (
    Curriculum,
    CurriculumHook,
    curriculum_enabled,
    easiest,
    pacing_fraction,
    prepare_curriculum,
)
from imgtrain.strategies.diagnostics import (
    Diagnostics,
    GradientMonitorHook,
    NonFiniteGuardHook,
    NonFiniteLossError,
    build_diagnostics,
    check_diagnostics,
    classify_gradients,
    first_nonfinite_gradient,
    gradient_norms,
)
from imgtrain.strategies.distillation import Distillation, DistillationHook, TeacherEnsemble, distillation_loss
from imgtrain.strategies.early_stopping import EarlyStopping, EarlyStoppingHook, should_stop
from imgtrain.strategies.ema import Ema, EmaHook, ema_decay, ema_update
from imgtrain.strategies.lr_finder import LrFinder, LrFinderHook, find_lr
from imgtrain.strategies.mixing import Mixing, MixingHook, cutmix_box, mix_batch, mixing_enabled, sample_lam
from imgtrain.strategies.progressive import (
    Progressive,
    ProgressiveResizingHook,
    plan_epochs,
    progressive_enabled,
    resize_batch,
)
from imgtrain.strategies.sam import Sam, SamHook, perturb_weights, restore_weights, sam_perturbation
from imgtrain.strategies.swa import Swa, SwaHook, swa_update, update_bn_with
from imgtrain.strategies.transfer import Transfer, TransferHook, freeze_until, layer_groups, transfer_enabled

# the order hooks run in (see the module docstring); a new strategy is one line here
STRATEGIES: list[Strategy] = [
    Transfer(),
    Curriculum(),
    Progressive(),
    Mixing(),
    Sam(),
    Distillation(),
    Ema(),
    Swa(),
    Diagnostics(),
    EarlyStopping(),
    TimeBudget(),
    LrFinder(),
]


def enabled_strategies(recipe: Any) -> list[Strategy]:
    """The registry entries a recipe turns on, in declared order."""
    return [strategy for strategy in STRATEGIES if strategy.enabled(recipe)]


def check_strategies(recipe: Any) -> None:
    """Every enabled strategy's recipe checks (before any data is read)."""
    for strategy in enabled_strategies(recipe):
        strategy.check(recipe)


def build_strategies(recipe: Any, context: StrategyContext | None = None) -> list[Hook]:
    """The hooks of a recipe's enabled strategies, in declared order (checks included); strategies
    that need the data or the model need the `context` api.train builds."""
    hooks: list[Hook] = []
    for strategy in enabled_strategies(recipe):
        strategy.check(recipe)
        hooks += strategy.build(recipe, context)
    return hooks


__all__ = ["STRATEGIES", "Strategy", "StrategyContext", "build_strategies", "check_strategies",
           "enabled_strategies", "GradientMonitorHook", "NonFiniteGuardHook", "NonFiniteLossError", "build_diagnostics",
           "check_diagnostics", "classify_gradients", "first_nonfinite_gradient", "gradient_norms",
           "CurriculumHook", "curriculum_enabled", "easiest", "pacing_fraction", "prepare_curriculum",
           "DistillationHook", "TeacherEnsemble", "distillation_loss", "EarlyStoppingHook", "EmaHook", "MixingHook",
           "should_stop", "TransferHook", "freeze_until", "layer_groups", "transfer_enabled", "cutmix_box",
           "ema_decay", "ema_update", "mix_batch", "mixing_enabled", "sample_lam", "ProgressiveResizingHook",
           "plan_epochs", "progressive_enabled", "resize_batch", "LrFinderHook", "find_lr", "SamHook",
           "perturb_weights", "restore_weights", "sam_perturbation", "SwaHook", "swa_update", "update_bn_with"]
