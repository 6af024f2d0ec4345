"""SWA: stochastic weight averaging, an equal average of the weights at the end of the last epochs.

From `swa.start_epoch` (0-based) on, the weights at the end of every epoch join a running mean; with
`swa.lr`, torch's `SWALR` replaces the schedule there (Izmailov et al. 2018). The average's BatchNorm
statistics are recomputed after every update with one forward pass over the epoch's training batches
(not mixed, not resized), none for a model without BatchNorm.

    averaged = torch.optim.swa_utils.AveragedModel(model)             # your own loop
    for epoch in range(epochs):
        train_one_epoch(model, ...)
        if epoch >= start_epoch:
            swa_update(averaged, model, train_loader, prepare=lambda x: x.to(device))
    evaluate(averaged.module, ...)

`SwaHook` averages at `before_eval` and sets `state.eval_model`, so validation, the checkpoints and
the test score use the average; its state goes into last.state.pt, so a resume continues it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, Literal, cast

import torch
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from imgtrain.config import RecipeError
from imgtrain.engine.events import Hook
from imgtrain.recipe_files import key_origin
from imgtrain.strategies.base import Strategy, StrategyContext


def prepared_inputs(batches: Iterable, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    limit: int | None = None) -> Iterator[torch.Tensor]:
    """The inputs of the first `limit` (inputs, targets) batches, each through `prepare` (to the device)."""
    for inputs, _targets in islice(batches, limit):
        yield prepare(inputs) if prepare is not None else inputs


@torch.no_grad()
def update_bn_with(model: torch.nn.Module, batches: Iterable,
                   prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, limit: int | None = None) -> None:
    """Recompute `model`'s BatchNorm running statistics over the batches (an equal average over
    them; torch's `update_bn`). Returns at once, reading no batch, when the model has no BatchNorm."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn:
        update_bn(prepared_inputs(batches, prepare, limit), model)


def swa_update(averaged: AveragedModel, model: torch.nn.Module, batches: Iterable,
               prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, limit: int | None = None) -> None:
    """One SWA point: add `model` to the equal average, then recompute the average's BatchNorm statistics."""
    averaged.update_parameters(model)
    update_bn_with(averaged.module, batches, prepare, limit)


def anneal_steps(anneal_epochs: float, batches_per_epoch: int, grad_accum_steps: int = 1) -> int:
    """swa.anneal_epochs in scheduler steps (one per optimizer step: SWALR counts whatever it is stepped by)."""
    return int(round(anneal_epochs * math.ceil(batches_per_epoch / grad_accum_steps)))


def swa_lrs(group_lrs: list[float], swa_lr: float) -> list[float]:
    """The constant lr of each parameter group: swa_lr for the group(s) training fastest now, the
    others in the same ratio as now (transfer's discriminative lrs stay discriminative)."""
    top = max(group_lrs)
    return [swa_lr * lr / top if top > 0 else swa_lr for lr in group_lrs]


def swa_lr_at(step: int, start_lr: float, swa_lr: float, steps: int, strategy: str = "cos") -> float:
    """SWALR's lr after `step` scheduler steps from `start_lr` (closed form, for checking it)."""
    t = 1.0 if steps == 0 else min(1.0, step / steps)
    alpha = (1 - math.cos(math.pi * t)) / 2 if strategy == "cos" else t
    return swa_lr * alpha + start_lr * (1 - alpha)


class SwaSchedule:
    """`state.scheduler` during SWA: steps SWALR, and checkpoints the schedule it replaced (a resume
    loads that into the recipe's schedule; SwaHook keeps SWALR's state)."""

    def __init__(self, swalr: SWALR, replaced: Any):
        self.swalr, self.replaced = swalr, replaced

    def step(self) -> None:
        self.swalr.step()

    def get_last_lr(self) -> list[float]:
        return [float(lr) for lr in self.swalr.get_last_lr()]

    def state_dict(self) -> dict[str, Any]:
        return self.replaced.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replaced.load_state_dict(state)


class SwaHook(Hook):
    """Keeps torch's AveragedModel of `state.model` (one point per epoch from start_epoch) and, with a
    swa_lr, runs SWALR in place of the recipe's schedule from then on."""

    name = "swa"

    def __init__(self, start_epoch: int, swa_lr: float | None = None, anneal_epochs: float = 1.0,
                 anneal_strategy: str = "cos"):
        self.start_epoch, self.swa_lr = start_epoch, swa_lr
        self.anneal_epochs, self.anneal_strategy = anneal_epochs, anneal_strategy
        self.averaged: AveragedModel | None = None
        self.swalr: SWALR | None = None
        self.schedule: SwaSchedule | None = None
        self.group_swa_lrs: list[float] | None = None
        self._pending: dict[str, Any] | None = None   # state loaded before fit_start builds the average
        self._swalr_state: dict[str, Any] | None = None  # a resumed SWALR's, until epoch_start rebuilds it

    @property
    def models_averaged(self) -> int:
        return int(self.averaged.n_averaged) if self.averaged is not None else 0

    def fit_start(self, state: Any) -> None:
        # built once the model is moved and resumed; parameters only: BatchNorm statistics are recomputed
        self.averaged = AveragedModel(state.model)
        if self._pending is not None:
            if "averaged" in self._pending:
                self.averaged.load_state_dict(self._pending["averaged"])
            self.group_swa_lrs = self._pending.get("swa_lrs")
            self._swalr_state = self._pending.get("swalr")
            self._pending = None
        if self.models_averaged:  # resumed inside the SWA phase: validate the average right away
            state.eval_model = self.averaged.module

    def epoch_start(self, state: Any) -> None:
        if self.swa_lr is None or state.epoch < self.start_epoch or state.scheduler is self.schedule:
            return
        # SWALR takes over: at the first SWA epoch, after a resume, or at a new schedule segment
        groups = state.optimizer.param_groups
        if self.swalr is None:
            if self.group_swa_lrs is None:
                self.group_swa_lrs = swa_lrs([group["lr"] for group in groups], self.swa_lr)
            steps = anneal_steps(self.anneal_epochs, state.steps_per_epoch, state.recipe.train.grad_accum_steps)
            # SWALR takes one swa_lr per param group too (torch's annotation says float only)
            self.swalr = SWALR(state.optimizer, swa_lr=cast(float, self.group_swa_lrs), anneal_epochs=steps,
                               anneal_strategy=cast(Literal["cos", "linear"], self.anneal_strategy))
            if self._swalr_state is not None:
                self.swalr.load_state_dict(self._swalr_state)
                self._swalr_state = None
            else:
                state.note(f"swa: from epoch {state.epoch + 1}, lr annealed ({self.anneal_strategy}) over {steps} "
                           f"steps to {self.swa_lr:g}", event="swa_start", steps=steps, swa_lr=self.swa_lr)
        # put back SWALR's last lrs (building it steps it; a rebuilt schedule sets others): it computes the next
        for group, lr in zip(groups, self.swalr.get_last_lr()):
            group["lr"] = lr
        self.schedule = SwaSchedule(self.swalr, replaced=state.scheduler)
        state.scheduler = self.schedule

    def before_eval(self, state: Any) -> None:
        if state.epoch < self.start_epoch:
            return
        # the epoch's own batch count: a run with max_steps_per_epoch declared its epoch that long
        swa_update(self.module_average(), state.model, state.train_loader, state.prepare_batch,
                   limit=state.steps_per_epoch)
        state.eval_model = self.module

    def fit_end(self, state: Any) -> None:
        if self.models_averaged:
            state.summary["swa_models_averaged"] = self.models_averaged

    def module_average(self) -> AveragedModel:
        """The AveragedModel (built at fit_start)."""
        if self.averaged is None:
            raise RuntimeError("the SWA average is built when training starts (fit_start)")
        return self.averaged

    @property
    def module(self) -> torch.nn.Module:
        return self.module_average().module

    def state_dict(self) -> dict[str, Any]:
        if self.averaged is None:
            return dict(self._pending) if self._pending is not None else {}
        out: dict[str, Any] = {}
        if self.models_averaged:  # before the first point the average is a copy of the model: nothing to keep
            out["averaged"] = {k: v.detach().cpu().clone() for k, v in self.averaged.state_dict().items()}
        if self.swalr is not None:
            out["swalr"] = self.swalr.state_dict()
            out["swa_lrs"] = list(self.group_swa_lrs or [])
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the Trainer restores hooks before fit_start builds the average: kept until then
        self._pending = dict(state)


def check_swa(recipe: Any) -> None:
    """swa.start_epoch must leave an epoch to average; the EMA cannot be validated at the same time."""
    cfg = recipe.swa
    if cfg.start_epoch >= recipe.train.epochs:
        raise RecipeError(f"{cfg.start_epoch} is not an epoch of this run: train.epochs is {recipe.train.epochs} "
                          f"and epochs count from 0, so start SWA at {recipe.train.epochs - 1} or earlier "
                          f"(the paper starts at 75% of the epochs: {int(0.75 * recipe.train.epochs)})",
                          **key_origin(recipe, "swa.start_epoch"))
    if recipe.ema.enabled and recipe.ema.validate:
        raise RecipeError("SWA and ema.validate both choose the weights that are validated and saved; "
                          "turn one off (ema.enabled: false, or ema.validate: false to keep the EMA unvalidated)",
                          **key_origin(recipe, "swa.start_epoch"))


def check_swa_plans(recipe: Any, context: StrategyContext) -> None:
    """SWALR reads the optimizer's lrs to compute the next: a plan that rescales them every step
    (progressive resizing's lr per batch size) would compound into the schedule."""
    cfg = recipe.swa
    scaled = sorted({p.lr_scale for p in context.plans[cfg.start_epoch:] if p.lr_scale != 1.0})
    if cfg.lr is not None and scaled:
        raise RecipeError(f"the epoch plans scale the lr by {scaled} in the SWA epochs (progressive resizing "
                          "changes the batch size there), and SWALR cannot follow a scaled lr; leave swa.lr "
                          "null to keep the recipe's schedule, or keep the batch size from swa.start_epoch on",
                          **key_origin(recipe, "swa.lr"))


class Swa(Strategy):
    name, section = "swa", "swa"

    def enabled(self, recipe: Any) -> bool:
        return recipe.swa.start_epoch is not None

    def check(self, recipe: Any) -> None:
        check_swa(recipe)

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        if context is not None:
            check_swa_plans(recipe, context)
        cfg = recipe.swa
        return [SwaHook(cfg.start_epoch, swa_lr=cfg.lr, anneal_epochs=cfg.anneal_epochs,
                        anneal_strategy=cfg.anneal_strategy)]


__all__ = ["Swa", "SwaHook", "SwaSchedule", "anneal_steps", "check_swa", "check_swa_plans", "prepared_inputs",
           "swa_lr_at", "swa_lrs", "swa_update", "update_bn_with"]
