"""Time budget: `train.budget: 10m` plans the run to end within the budget, start-up and test included.

Before the first epoch, `measure_speed` trains a few steps on the real Trainer at each image size the
plan uses (progressive stages), with the hooks that change a step's cost (mixing, SAM, distillation,
EMA), and times a few validation batches; then it puts back everything those steps changed, as the
LR finder does. `plan_for_budget` turns the time left into the most epochs that fit (at most
`train.epochs`), with progressive stages scaled to keep their shares, so the lr schedule, built for that
many epochs, reaches its end when the budget does ("Budgeted Training", Li, Yumer and Ramanan, ICLR
2020: a schedule that decays to its end within the budget beats one cut short; `schedule.name: linear`
is their budget-aware linear decay). A budget too small for one epoch is refused, with the smallest that fits.

`BudgetWatch` keeps the clock: it adds `elapsed_seconds` (of the budget, since the run started) to
every epoch's row, and ends the run at an epoch end when the next epoch would not fit (a slower
machine than measured). Its clock is in the training state, so a resumed run has what was left.

    speed = measure_speed(recipe, parts, context, strategies)          # Speed: seconds per image
    plan = plan_for_budget(600.0, spent=20.0, speed=speed, epoch_images=54000, val_images=6000,
                           test_images=10000, max_epochs=30)              # BudgetPlan
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from imgtrain.config import RecipeError, duration_seconds
from imgtrain.data.loaders import CycledLoader
from imgtrain.engine.events import Hook, HookList
from imgtrain.engine.loop import Trainer
from imgtrain.engine.state import EpochPlan
from imgtrain.strategies.base import Strategy, StrategyContext
from imgtrain.strategies.lr_finder import restore_training, snapshot_training
from imgtrain.strategies.progressive import ProgressiveResizingHook

WARMUP_STEPS = 3            # steps not timed: the loader's first batches, allocator and kernel warm-up
TIMED_STEPS = 12            # steps timed at each image size
VAL_BATCHES = 4             # validation batches timed
MARGIN = 0.03               # of the budget, kept free: the last writes, timing noise
EPOCH_SLACK = 0.10          # added to each planned epoch: the measured steps had no checkpoint, trackers or
                            # loader start; a busy machine's slower epochs are the watch's to catch
MIN_MARGIN_SECONDS = 3.0
FINAL_SECONDS = 2.0         # after the test pass: summary, the report's last draw
COST_SHAPING = ("mixing", "sam", "distillation", "ema")  # strategies whose hooks change a step's cost


@dataclass
class Speed:
    """Measured seconds per image: training at each image size, evaluation at the evaluation size."""
    train: dict[int, float]
    eval: float
    seconds: float = 0.0    # what measuring took


@dataclass
class BudgetPlan:
    budget: float                      # seconds
    spent: float                       # seconds of the budget gone when the plan was made
    reserve: float                     # seconds kept for the test pass, the last writes and the margin
    epochs: int
    predicted: float                   # seconds the run should take in all
    epoch_seconds: list[float] = field(default_factory=list)  # planned, per epoch (training + validation)
    stages: list[dict[str, Any]] | None = None  # progressive stages scaled to `epochs`
    capped: bool = False               # train.epochs, not the budget, limited the plan
    speed: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"budget_seconds": round(self.budget, 1), "planned_epochs": self.epochs,
                "spent_before_training": round(self.spent, 1), "reserved_seconds": round(self.reserve, 1),
                "predicted_seconds": round(self.predicted, 1), "capped_by_train_epochs": self.capped,
                "images_per_second": self.speed, "epoch_seconds": [round(s, 2) for s in self.epoch_seconds]}

    @classmethod
    def from_record(cls, record: dict[str, Any], budget: str) -> BudgetPlan:
        """The plan run.json keeps (a resumed run watches the clock against it); the budget as the recipe
        gives it now."""
        seconds = [float(s) for s in record.get("epoch_seconds", [])]
        return cls(budget=duration_seconds(budget), spent=float(record.get("spent_before_training", 0.0)),
                   reserve=float(record.get("reserved_seconds", 0.0)), epochs=len(seconds),
                   predicted=float(record.get("predicted_seconds", 0.0)), epoch_seconds=seconds,
                   speed=record.get("images_per_second", {}))

    def describe(self) -> str:
        cap = " (train.epochs caps it: raise it to use the whole budget)" if self.capped else ""
        speeds = ", ".join(f"{size} px {ips:.0f} img/s" for size, ips in self.speed.get("train", {}).items())
        return (f"budget {_clock(self.budget)}: {_clock(self.spent)} spent on start-up and measuring "
                f"({speeds}; evaluation {self.speed.get('eval', 0):.0f} img/s); {self.epochs} epoch(s) planned"
                f"{cap}, about {_clock(self.predicted)} in all, {_clock(self.reserve)} kept for the test pass "
                "and the last writes")


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def scale_stages(stages: Sequence[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """Progressive stages with their epochs scaled to `epochs` in all, keeping their shares (largest
    remainders); the last (full-size) stage keeps at least one epoch, earlier ones may drop out."""
    total = sum(int(s["epochs"]) for s in stages)
    exact = [int(s["epochs"]) * epochs / total for s in stages]
    counts = [math.floor(x) for x in exact]
    for index in sorted(range(len(stages)), key=lambda i: exact[i] - counts[i], reverse=True):
        if sum(counts) >= epochs:
            break
        counts[index] += 1
    if counts[-1] == 0:  # the run must end at the full size
        donor = max(range(len(counts) - 1), key=lambda i: counts[i])
        counts[donor], counts[-1] = counts[donor] - 1, 1
    return [{**stage, "epochs": count} for stage, count in zip(stages, counts) if count > 0]


def plan_for_budget(budget: float, spent: float, speed: Speed, epoch_images: int, val_images: int,
                    test_images: int, max_epochs: int, stages: Sequence[dict[str, Any]] | None = None,
                    sizes_for: Callable[[int], list[int]] | None = None) -> BudgetPlan:
    """The most epochs (at most `max_epochs`) whose training and validation fit in what is left of the
    budget after `spent` and the reserve (the test pass, the last writes, a margin). `sizes_for(epochs)`:
    the training image size of each epoch when the run has that many (progressive resizing); default:
    the one measured size."""
    reserve = test_images * speed.eval + FINAL_SECONDS + max(MIN_MARGIN_SECONDS, MARGIN * budget)
    only = next(iter(speed.train))
    sizes = sizes_for or (lambda n: [only] * n)

    def costs(epochs: int) -> list[float]:
        return [(1.0 + EPOCH_SLACK) * (epoch_images * speed.train[size] + val_images * speed.eval)
                for size in sizes(epochs)]

    available = budget - spent - reserve
    epochs = 0
    while epochs < max_epochs and sum(costs(epochs + 1)) <= available:
        epochs += 1
    if epochs == 0:
        smallest = spent + reserve + sum(costs(1))
        raise RecipeError(
            f"a budget of {_clock(budget)} is too small for one epoch here: start-up and measuring took "
            f"{_clock(spent)}, one epoch takes about {_clock(sum(costs(1)))} and the test pass with the last "
            f"writes {_clock(reserve)}; the smallest budget that fits is about {math.ceil(smallest / 10) * 10}s "
            "(or train on less: data.train_subset, a smaller model or augment.img_size)", key="train.budget")
    planned = costs(epochs)
    return BudgetPlan(budget=budget, spent=spent, reserve=reserve, epochs=epochs, predicted=spent + sum(planned)
                      + reserve, epoch_seconds=planned, stages=scale_stages(stages, epochs) if stages else None,
                      capped=epochs == max_epochs,
                      speed={"train": {size: round(1.0 / s, 1) for size, s in speed.train.items()},
                             "eval": round(1.0 / speed.eval, 1) if speed.eval > 0 else 0.0})


# ----------------------------------------------------------------------------- measuring

class _StepClock(Hook):
    """Times the steps after the first few (data loading included: the time between batch starts), and puts
    back at fit_end what the steps changed (weights, optimizer, RNG states), as the LR finder does."""

    name = "budget_step_clock"

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self.starts: list[float] = []
        self.images: list[int] = []
        self.saved: dict[str, Any] = {}

    def fit_start(self, state: Any) -> None:
        self.saved = snapshot_training(state, self.generator)

    def batch_start(self, state: Any) -> None:
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        self.starts.append(time.perf_counter())
        self.images.append(int(state.inputs.shape[0]))

    def fit_end(self, state: Any) -> None:
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        self.starts.append(time.perf_counter())
        state.optimizer.zero_grad(set_to_none=True)
        restore_training(state, self.saved, self.generator)

    def seconds_per_image(self) -> float:
        """Seconds per image over the timed steps. A step's time runs from its batch start to the next one's
        (its data loading included); the last interval, which also holds the probe epoch's end (first-use
        imports, metrics: a second that is no part of a training step), is left out."""
        end = len(self.images) - 1
        if end <= WARMUP_STEPS:  # fewer batches than the warm-up: time what ran
            return (self.starts[-1] - self.starts[0]) / max(sum(self.images), 1)
        return (self.starts[end] - self.starts[WARMUP_STEPS]) / max(sum(self.images[WARMUP_STEPS:end]), 1)


def measure_speed(recipe: Any, parts: Any, context: StrategyContext, strategies: Sequence[Strategy]) -> Speed:
    """Seconds per image of training at each image size of `parts.plans` (the real Trainer, the hooks of the
    cost-shaping strategies), and of evaluation on a few validation batches; everything is put back."""
    started = time.perf_counter()
    # no run folder, so no checkpoints; every timed batch a whole step
    probe_recipe = dataclasses.replace(recipe, train=dataclasses.replace(
        recipe.train, max_steps_per_epoch=None, grad_accum_steps=1))
    quiet = dataclasses.replace(context, notes=[])
    hooks = [hook for strategy in strategies if strategy.name in COST_SHAPING
             for hook in strategy.build(recipe, quiet)]
    train_seconds: dict[int, float] = {}
    trainer = None
    for plan in _one_plan_per_size(parts.plans):
        loader = parts.loader_for(plan.batch_size)
        probe_parts = dataclasses.replace(parts, val=None, plans=[plan], loader_for=lambda batch_size, loader=loader:
                                          CycledLoader(loader, WARMUP_STEPS + TIMED_STEPS))
        clock = _StepClock(parts.train_generator)
        resize = [ProgressiveResizingHook([plan], channels_last=recipe.train.channels_last)]
        trainer = Trainer(probe_recipe, probe_parts, HookList(strategies=[*resize, *hooks, clock]))
        trainer.fit()
        train_seconds[plan.img_size] = clock.seconds_per_image()
    eval_seconds = 0.0
    if parts.val is not None and trainer is not None:
        batches = min(VAL_BATCHES, len(parts.val))
        result = trainer.evaluate(CycledLoader(parts.val, batches))
        eval_seconds = result["seconds"] / max(sum(map(sum, result["confusion"])), 1)
    return Speed(train=train_seconds, eval=eval_seconds, seconds=time.perf_counter() - started)


def _one_plan_per_size(plans: Sequence[EpochPlan]) -> list[EpochPlan]:
    seen: dict[int, EpochPlan] = {}
    for plan in plans:
        seen.setdefault(plan.img_size, plan)
    return list(seen.values())


# ----------------------------------------------------------------------------- the clock during training

class BudgetWatch(Hook):
    """The budget's clock: `elapsed_seconds` in every epoch's row; a stop at the epoch end after which the
    next epoch (at the speed the last one ran) and the reserve would not fit."""

    name = "time_budget"

    def __init__(self, budget: float, reserve: float, clock_started: float, planned: Sequence[float]):
        self.budget, self.reserve, self.planned = budget, reserve, list(planned)
        self.clock_started = clock_started   # time.perf_counter() when this process's train() began
        self.used_before = 0.0               # seconds of the budget the processes before a resume used
        self.epoch_started = 0.0
        self.stopped_early: str | None = None

    def elapsed(self) -> float:
        return self.used_before + time.perf_counter() - self.clock_started

    def reading(self) -> float:
        """The clock as written (history's elapsed_seconds, summary.json's used_seconds): one rounding, so a
        later reading is never below an earlier one."""
        return round(self.elapsed(), 2)

    def epoch_start(self, state: Any) -> None:
        self.epoch_started = time.perf_counter()

    def eval_end(self, state: Any) -> None:
        state.epoch_metrics["elapsed_seconds"] = self.reading()

    def epoch_end(self, state: Any) -> None:
        done = state.epoch + 1  # epochs finished, this one included
        if done >= len(self.planned) or state.stop_training:
            return
        took = time.perf_counter() - self.epoch_started
        # the next epoch at the pace this one ran, relative to the plan (a smaller next stage is cheaper)
        pace = took / max(self.planned[done - 1], 1e-9)
        needed = self.planned[done] * pace
        if self.elapsed() + needed + self.reserve > self.budget:
            self.stopped_early = (f"time budget: stopped after epoch {done} of {len(self.planned)}: the next would "
                                  f"take about {_clock(needed)}, and {_clock(self.budget - self.elapsed())} "
                                  f"of the budget is left with {_clock(self.reserve)} kept for the test pass")
            state.stop_training = True
            state.summary["budget_stopped_early"] = self.stopped_early

    def state_dict(self) -> dict[str, Any]:
        return {"used_seconds": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the budget a resumed run has left: what the processes before it used (their start-up included)
        self.used_before = float(state.get("used_seconds", 0.0))
        self.clock_started = time.perf_counter()


class TimeBudget(Strategy):
    name, section = "time_budget", "train"

    def enabled(self, recipe: Any) -> bool:
        return recipe.train.budget is not None

    def check(self, recipe: Any) -> None:
        duration_seconds(recipe.train.budget)  # the recipe's own check has run: this cannot fail

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        if context is None or context.budget_plan is None:
            return []  # built outside api.train (a probe): nothing to watch
        plan: BudgetPlan = context.budget_plan
        return [BudgetWatch(plan.budget, plan.reserve, context.clock_started, plan.epoch_seconds)]


__all__ = ["BudgetPlan", "BudgetWatch", "Speed", "TimeBudget", "measure_speed", "plan_for_budget", "scale_stages"]
