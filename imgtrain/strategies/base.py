"""What a strategy is to the rest of imgtrain: a registry entry that builds hooks from a recipe.

For each enabled entry of `STRATEGIES` (strategies/__init__.py), `api.train` calls `check(recipe)`
before any data is read, then `plan_epochs` and `param_groups`, then `build(recipe, context)` once
the data and the model exist, all before the run folder is made. strategies/ema.py is the shortest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from imgtrain.engine.events import Hook
from imgtrain.engine.state import EpochPlan


@dataclass
class StrategyContext:
    """What api.train knows when it builds the strategies' hooks."""
    recipe: Any
    classes: list[str]
    channels: int
    img_size: int                      # the side the data pipeline makes training images at
    device: torch.device
    model: torch.nn.Module | None = None   # created, starting weights loaded
    splits: Any = None                 # DataSplits
    loaders: Any = None                # Loaders; a strategy may replace loaders.train (curriculum's sampler)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    plans: list[EpochPlan] = field(default_factory=list)
    teacher: Any = None                # distill.teacher loaded and checked (evaluation/teachers.py)
    notes: list[str] = field(default_factory=list)  # lines for train.log
    budget_plan: Any = None            # train.budget: the BudgetPlan (strategies/budget.py) api.train made
    clock_started: float = 0.0         # time.perf_counter() when train() began: the budget's clock


class Strategy:
    """A registry entry; override what the strategy needs."""

    name: str = ""
    section: str = ""          # the recipe section it reads
    # its hooks also run in the LR finder's range test (transfer's frozen layers); others change what it measures
    in_lr_find: bool = False

    def enabled(self, recipe: Any) -> bool:
        return False

    def check(self, recipe: Any) -> None:
        """Checks across recipe sections, before any data is read (RecipeError: file, key, line)."""

    def plan_epochs(self, recipe: Any, context: StrategyContext) -> list[EpochPlan] | None:
        """Per-epoch image size, batch size, lr scale and schedule segment; None: the plain plan."""
        return None

    def eval_size(self, recipe: Any, train_size: int) -> int | None:
        """The side validation and test images are made at, when the strategy changes it; None: train_size."""
        return None

    def drops_last_batch(self, recipe: Any) -> bool:
        """Whether the train loader must drop its last incomplete batch (mixing needs full batches)."""
        return False

    def unsupported_across_processes(self, recipe: Any) -> str | None:
        """The recipe key that keeps this strategy from training under several processes (DDP), or None
        when it runs there (every registered strategy does: a new one that keeps per-process state merges it
        at the `sync_ranks` event, or says here which key it cannot support)."""
        return None

    def param_groups(self, recipe: Any, model: torch.nn.Module) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups; None: the plain decay / no-decay groups."""
        return None

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        """The hooks that carry the strategy out in the loop. `context` is None when the caller has
        no data or model (build_strategies without one); strategies that need it say so."""
        return []


def require_context(context: StrategyContext | None, strategy: str) -> StrategyContext:
    """`context`, for a strategy whose hooks need the data or the model api.train builds."""
    if context is None:
        raise ValueError(f"{strategy}: building its hooks needs the StrategyContext api.train builds "
                         "(the data and the model)")
    return context


__all__ = ["Strategy", "StrategyContext", "require_context"]
