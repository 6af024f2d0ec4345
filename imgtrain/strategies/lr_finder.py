"""LR finder: the learning-rate range test (Smith 2015; fastai's `lr_find`), to pick the peak lr.

`find_lr` trains `steps` optimizer steps on the real Trainer (`LrFinderHook`) while the lr grows
exponentially from `start` to `end`, until the smoothed loss passes `diverge` x its best, then puts
back all it changed. Hooks that change the batch or the loss (mixing ...) do not run. Suggestions
come from the smoothed curve without its first tenth and last 5 points: `steep`, `valley` (fastai's
default) and `min10` (a tenth of the lowest loss's lr; our default: in benchmarks/lr_finder.py it
trains within a point of the best grid lr, where `valley` lands two decades low).

    lrs = lr_schedule(1e-7, 10, 100)
    smoothed = smooth_losses(raw_losses, beta=0.98)
    lr, index = valley(lrs, smoothed)
    result = find_lr(recipe, parts)    # LrFindResult: lrs, losses, smoothed, suggestions
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgtrain.config import RecipeError
from imgtrain.data.loaders import CycledLoader
from imgtrain.engine.checkpoint import capture_rng_state, restore_rng_state
from imgtrain.engine.events import Hook, HookList
from imgtrain.engine.loop import Trainer
from imgtrain.strategies.base import Strategy

CSV_NAME = "lr_find.csv"
PLOT_NAME = "lr_find.png"
SKIP_END = 5          # points dropped from the end of the curve before suggesting (fastai's skip_end)


def lr_schedule(start: float, end: float, steps: int) -> list[float]:
    """`steps` learning rates from `start` to `end` (both included), evenly spaced in log lr."""
    if not 0 < start < end:
        raise ValueError(f"the range test goes up: need 0 < start < end, got start {start:g}, end {end:g}")
    if steps < 2:
        raise ValueError(f"the range test needs at least 2 steps, got {steps}")
    ratio = end / start
    return [start * ratio ** (i / (steps - 1)) for i in range(steps)]


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average with bias correction (beta 0: the losses themselves)."""
    average, out = 0.0, []
    for count, loss in enumerate(losses, start=1):
        average = beta * average + (1.0 - beta) * loss
        out.append(average / (1.0 - beta ** count))
    return out


def diverged(smoothed: float, best: float, factor: float = 4.0) -> bool:
    """Stop the test: the smoothed loss is not finite or has passed `factor` x the best so far."""
    return not math.isfinite(smoothed) or smoothed > factor * best


def steepest(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, int]:
    """The lr where the loss falls fastest against log lr: (lr, index)."""
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
              for i in range(len(lrs) - 1)]
    index = min(range(len(slopes)), key=slopes.__getitem__) if slopes else 0
    return float(lrs[index]), index


def valley(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, int]:
    """fastai's valley: the longest decreasing run of losses (a longest decreasing subsequence,
    ending at its first longest end), then two thirds of the way down it: (lr, index)."""
    n = len(losses)
    longest = [1] * n  # longest[i]: length of the longest decreasing subsequence ending at i
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j]:
                longest[i] = max(longest[i], longest[j] + 1)
    end = max(range(n), key=lambda i: (longest[i], -i))  # the first index with the longest run
    begin = end - longest[end]                           # fastai's start (one before the run)
    third = (end - begin) / 3
    index = min(max(begin + int(third) + int(third / 2), 0), n - 1)
    return float(lrs[index]), index


def minimum_tenth(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, int]:
    """A tenth of the lr with the lowest loss: (lr / 10, index of the minimum)."""
    index = min(range(len(losses)), key=losses.__getitem__)
    return float(lrs[index]) / 10.0, index


SUGGESTIONS: dict[str, Callable[[Sequence[float], Sequence[float]], tuple[float, int]]] = {
    "valley": valley, "steep": steepest, "min10": minimum_tenth,
}


def suggest(lrs: Sequence[float], smoothed: Sequence[float], steps: int) -> dict[str, float]:
    """Every suggestion on the curve up to its first non-finite loss, without the first steps // 10
    points (still settling) and the last 5 (diverging) as fastai reads it, unless that is too short."""
    finite = next((i for i, v in enumerate(smoothed) if not math.isfinite(v)), len(smoothed))
    lrs, smoothed = list(lrs[:finite]), list(smoothed[:finite])
    if not lrs:
        raise ValueError("the range test recorded no finite loss; lower lr_find.start")
    first, last = steps // 10, len(lrs) - SKIP_END
    if last - first >= 3:
        lrs, smoothed = lrs[first:last], smoothed[first:last]
    return {name: func(lrs, smoothed)[0] for name, func in SUGGESTIONS.items()}


@dataclass
class LrFindResult:
    """What a range test recorded: one row per optimizer step it took, and its suggestions."""
    lrs: list[float]
    losses: list[float]            # raw training loss of the step (mean over its accumulated batches)
    smoothed: list[float]
    steps: int                     # steps asked for; fewer were run when the loss diverged
    start: float
    end: float
    suggestions: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0           # wall time of the test

    def __post_init__(self) -> None:
        if not self.suggestions:
            self.suggestions = suggest(self.lrs, self.smoothed, self.steps)

    @property
    def stopped_early(self) -> bool:
        return len(self.lrs) < self.steps

    def summary(self, chosen: str) -> dict[str, Any]:
        """For summary.json: the lr used, which suggestion it is, all of them, how the test went."""
        return {"lr": self.suggestions[chosen], "suggestion": chosen, "suggestions": dict(self.suggestions),
                "start": self.start, "end": self.end, "steps": self.steps, "steps_run": len(self.lrs),
                "stopped_early": self.stopped_early, "seconds": round(self.seconds, 3)}

    def lines(self, chosen: str | None = None) -> list[str]:
        """Human lines for the console and train.log."""
        how = (f"stopped at step {len(self.lrs)}: the smoothed loss diverged" if self.stopped_early
               else "ran every step")
        how += f" ({self.seconds:.1f} s)" if self.seconds else ""
        out = [f"lr_find: {self.steps} steps from {self.start:.1e} to {self.end:.1e}, {how}",
               "lr_find: suggestions " + ", ".join(f"{name} {lr:.2e}" for name, lr in self.suggestions.items())]
        if chosen is not None:
            out.append(f"lr_find: using {chosen} (lr_find.suggestion): optim.lr = {self.suggestions[chosen]:.3g}")
        return out

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["lr", "loss", "smoothed"])
            writer.writerows((repr(a), repr(b), repr(c)) for a, b, c in zip(self.lrs, self.losses, self.smoothed))

    @classmethod
    def read_csv(cls, path: Path, steps: int, start: float, end: float) -> LrFindResult:
        """A test written by write_csv (the suggestions are computed again: the same numbers)."""
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return cls(lrs=[float(r["lr"]) for r in rows], losses=[float(r["loss"]) for r in rows],
                   smoothed=[float(r["smoothed"]) for r in rows], steps=steps, start=start, end=end)

    def plot(self, path: Path, chosen: str | None = None) -> None:
        """Smoothed (and raw) loss against lr on a log axis, each suggestion marked on the curve."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.0, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(self.lrs, self.losses, color="0.8", linewidth=0.8, label="loss")
        ax.plot(self.lrs, self.smoothed, color="C0", label="smoothed loss")
        log_lrs = [math.log(v) for v in self.lrs]
        for color, (name, lr) in zip(("C1", "C2", "C3"), self.suggestions.items()):
            loss = float(np.interp(math.log(lr), log_lrs, self.smoothed))
            label = f"{name} {lr:.1e}" + (" (used)" if name == chosen else "")
            ax.plot([lr], [loss], "o", color=color, markersize=9 if name == chosen else 6, label=label)
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if finite:  # keep the explosion at the end from flattening the useful part
            low, first = min(finite), finite[0]
            ax.set_ylim(low - 0.1 * abs(first - low) - 1e-3, max(first, low) + 0.6 * abs(first - low) + 1e-3)
        ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        tmp = Path(path).with_suffix(".tmp.png")
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)

    def write(self, out_dir: Path, chosen: str | None = None) -> list[Path]:
        """lr_find.csv and lr_find.png in `out_dir`."""
        csv_path, png_path = Path(out_dir) / CSV_NAME, Path(out_dir) / PLOT_NAME
        self.write_csv(csv_path)
        self.plot(png_path, chosen)
        return [csv_path, png_path]


class LrFinderHook(Hook):
    """The range test on the real Trainer (fastai's LRFinder callback): sets each step's lr, records
    its loss, stops once the smoothed loss diverges, and at fit_end puts back what the test changed."""

    name = "lr_finder"

    def __init__(self, settings: Any, generator: torch.Generator | None = None):
        self.cfg, self.generator = settings, generator
        self.schedule = lr_schedule(settings.start, settings.end, settings.steps)
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.ratios: list[float] = []
        self.momenta: list[dict[str, Any]] = []
        self.saved: dict[str, Any] = {}
        self.best, self.seconds = math.inf, 0.0
        self.step_loss: torch.Tensor | None = None
        self.step_batches = 0

    def fit_start(self, state: Any) -> None:
        self.saved = snapshot_training(state, self.generator)
        self.started = time.perf_counter()
        # layer groups keep their ratio to the first group's peak lr (the head's: the recipe's optim.lr)
        peaks = [group.get("max_lr", group.get("initial_lr", group["lr"])) for group in state.optimizer.param_groups]
        self.ratios = [peak / peaks[0] for peak in peaks]
        # momentum stays what the schedule starts with (one-cycle: max_momentum) for the whole test
        self.momenta = [{key: group[key] for key in ("momentum", "betas") if key in group}
                        for group in state.optimizer.param_groups]

    def after_backward(self, state: Any) -> None:
        if state.pass_index:  # a replay of the group (a SAM hook passed in): the step's loss is the first pass's
            return
        loss = state.loss.detach().float()
        self.step_loss = loss if self.step_loss is None else self.step_loss + loss
        self.step_batches += 1

    def before_step(self, state: Any) -> None:
        lr = self.schedule[len(self.lrs)]
        for group, ratio, momentum in zip(state.optimizer.param_groups, self.ratios, self.momenta):
            group["lr"] = lr * ratio
            group.update(momentum)

    def after_step(self, state: Any) -> None:
        assert self.step_loss is not None, "after_backward ran for the step's batches"
        value = float(self.step_loss) / max(self.step_batches, 1)  # the mean over the step's batches
        self.step_loss, self.step_batches = None, 0
        self.lrs.append(self.schedule[len(self.lrs)])
        self.losses.append(value)
        smooth = smooth_losses(self.losses, self.cfg.smoothing)[-1]  # each step: the test stops as it diverges
        self.smoothed.append(smooth)
        if diverged(smooth, self.best, self.cfg.diverge) or len(self.lrs) == len(self.schedule):
            state.stop_training = True
        self.best = min(self.best, smooth)

    def fit_end(self, state: Any) -> None:
        state.optimizer.zero_grad(set_to_none=True)
        restore_training(state, self.saved, self.generator)
        self.seconds = time.perf_counter() - self.started

    def result(self) -> LrFindResult:
        return LrFindResult(lrs=list(self.lrs), losses=list(self.losses), smoothed=list(self.smoothed),
                            steps=self.cfg.steps, start=self.cfg.start, end=self.cfg.end, seconds=self.seconds)


def find_lr(recipe: Any, parts: Any, settings: Any = None, hooks: Sequence[Hook] = ()) -> LrFindResult:
    """Run the range test on the `TrainParts` training would use (without validation or checkpoints)
    and put everything back; `hooks` run before the test's own (transfer: frozen layers stay frozen)."""
    cfg = settings if settings is not None else recipe.lr_find
    accum = recipe.train.grad_accum_steps
    # one epoch of exactly the test's steps (the hook sets every step's lr, whatever the schedule says)
    probe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, max_steps_per_epoch=None))
    plan = parts.plans[0]
    loader = parts.loader_for(plan.batch_size)
    test_parts = dataclasses.replace(parts, val=None, plans=[plan],
                                     loader_for=lambda batch_size: CycledLoader(loader, cfg.steps * accum))
    finder = LrFinderHook(cfg, generator=parts.train_generator)
    Trainer(probe, test_parts, HookList(strategies=[*hooks, finder])).fit()
    return finder.result()


def snapshot_training(state: Any, generator: torch.Generator | None) -> dict[str, Any]:
    """Everything the range test changes, copied (the weights and optimizer state deep)."""
    model = state.model
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},  # BatchNorm stats too
        "optimizer": copy.deepcopy(state.optimizer.state_dict()),
        "scaler": copy.deepcopy(state.scaler.state_dict()) if state.scaler is not None else None,
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "rng": capture_rng_state(),
        "generator": generator.get_state() if generator is not None else None,
    }


def restore_training(state: Any, saved: dict[str, Any], generator: torch.Generator | None) -> None:
    model = state.model
    model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])  # drops the momentum the test built up
    if state.scaler is not None:
        state.scaler.load_state_dict(saved["scaler"])
    for module, training in zip(model.modules(), saved["modes"]):
        module.training = training
    for param, flag in zip(model.parameters(), saved["requires_grad"]):
        param.requires_grad_(flag)
    if generator is not None:
        generator.set_state(saved["generator"])
    restore_rng_state(saved["rng"])


def check_lr_find(recipe: Any) -> None:
    """optim.lr: find with keys it cannot work with, checked before any work."""
    if recipe.optim.lr == "find" and recipe.transfer.group_lrs is not None:
        raise RecipeError("transfer.group_lrs sets every layer group's lr, so optim.lr: find has nothing to "
                          "set; use transfer.layer_decay with optim.lr: find, or give optim.lr a number",
                          file=recipe.source_file, key="optim.lr")


class LrFinder(Strategy):
    """optim.lr: find: the range test runs before training (api.find_recipe_lr), with no hook in it."""
    name, section = "lr_finder", "lr_find"

    def enabled(self, recipe: Any) -> bool:
        return recipe.optim.lr == "find"

    def check(self, recipe: Any) -> None:
        check_lr_find(recipe)


__all__ = ["CSV_NAME", "LrFinder", "LrFinderHook", "PLOT_NAME", "LrFindResult", "SUGGESTIONS", "check_lr_find",
           "diverged", "find_lr", "lr_schedule", "minimum_tenth", "smooth_losses", "steepest", "suggest", "valley"]
