"""Early stopping: end training when a monitored metric stops improving (Prechelt 1998).

After `patience` epochs in a row whose monitored history.csv column does not beat the best by more
than `min_delta`, the run ends (that epoch is still saved). With `restore_best` the best epoch's
weights (the EMA's when it is validated) are put back at the end, as Keras' `restore_best_weights`.
The counter, best value and epoch, and kept weights are the hook's state, for resumes.

    stop, best, wait = should_stop(value, best, wait, mode="min", patience=5, min_delta=0.0)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from imgtrain.config import RecipeError
from imgtrain.engine.events import Hook
from imgtrain.strategies.base import Strategy, StrategyContext, require_context


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Does `value` beat `best` by more than `min_delta` in direction `mode` (min|max)?"""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def should_stop(value: float, best: float | None, wait: int, mode: str, patience: int,
                min_delta: float) -> tuple[bool, float | None, int]:
    """One epoch of early stopping: (stop now?, new best, epochs without improvement)."""
    if improved(value, best, mode, min_delta):
        return False, value, 0
    wait += 1
    return wait >= patience, best, wait


def check_early_stop(cfg: Any, has_val: bool, file: str | None = None) -> None:
    """The monitored metric must be one the run logs: checked before training starts."""
    if cfg.monitor is None:
        return
    logged = ["train_loss", "train_acc", "lr", "momentum", "epoch_seconds", "images_per_second",
              "trainable_params"]
    if has_val:
        logged[2:2] = ["val_loss", "val_acc", "val_balanced_acc"]
    if cfg.monitor not in logged:
        why = " (this run has no validation split)" if cfg.monitor.startswith("val_") and not has_val else ""
        raise RecipeError(f"{cfg.monitor!r} is not a metric this run logs{why}; choose one of "
                          f"{', '.join(logged)}", file=file, key="early_stop.monitor")


def monitor_mode(monitor: str, mode: str) -> str:
    """auto: min for losses, max for everything else (accuracies)."""
    if mode != "auto":
        return mode
    return "min" if "loss" in monitor else "max"


class EarlyStoppingHook(Hook):
    """Ends the run after `patience` epochs without improvement of `monitor`."""

    name = "early_stopping"

    def __init__(self, cfg: Any):
        self.monitor = cfg.monitor
        self.mode = monitor_mode(cfg.monitor, cfg.mode)
        self.patience, self.min_delta, self.restore_best = cfg.patience, cfg.min_delta, cfg.restore_best
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    def epoch_end(self, state: Any) -> None:
        row = state.history[-1]
        if self.monitor not in row:
            raise RecipeError(f"early_stop.monitor: {self.monitor!r} is not logged by this run; it logs "
                              f"{', '.join(k for k in row if k != 'epoch')}", key="early_stop.monitor")
        stop, self.best, self.wait = should_stop(float(row[self.monitor]), self.best, self.wait, self.mode,
                                                 self.patience, self.min_delta)
        if self.wait == 0:  # this epoch is the new best
            self.best_epoch = row["epoch"]
            if self.restore_best:
                model = state.eval_model if state.eval_model is not None else state.model
                self.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        elif stop and state.epoch + 1 < state.epochs:
            state.stop_training = True
            self.stopped_epoch = row["epoch"]

    def fit_end(self, state: Any) -> None:
        if self.stopped_epoch is not None:
            state.summary["early_stopped_epoch"] = self.stopped_epoch
        state.summary["early_stop_best_epoch"] = self.best_epoch
        if self.restore_best and self.best_weights is not None:
            model = state.eval_model if state.eval_model is not None else state.model
            model.load_state_dict(self.best_weights)
            state.summary["restored_best_epoch"] = self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        # plain values and tensors: last.state.pt is loaded with weights_only=True
        out: dict[str, Any] = {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                               "stopped_epoch": self.stopped_epoch}
        if self.best_weights is not None:
            out["best_weights"] = self.best_weights
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
        self.wait, self.stopped_epoch = int(state.get("wait", 0)), state.get("stopped_epoch")
        self.best_weights = state.get("best_weights")


class EarlyStopping(Strategy):
    name, section = "early_stopping", "early_stop"

    def enabled(self, recipe: Any) -> bool:
        return recipe.early_stop.monitor is not None

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        context = require_context(context, self.name)
        check_early_stop(recipe.early_stop, has_val=context.loaders.val is not None, file=recipe.source_file)
        return [EarlyStoppingHook(recipe.early_stop)]


__all__ = ["EarlyStopping", "EarlyStoppingHook", "check_early_stop", "improved", "monitor_mode", "should_stop"]
