"""Optimizers (SGD with Nesterov, AdamW) and learning-rate schedules stepped per batch.

Norm and bias parameters (every 1-D parameter) get no weight decay by default, as in timm: decaying
them only shrinks the scale of normalised activations and hurts accuracy (Goyal et al. 2017, "Bag of
Tricks" 2019). Schedules count optimizer steps; keys in epochs are converted, so a recipe means the same
at any batch size or accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from imgtrain.config import OptimConfig, ScheduleConfig


def gets_weight_decay(param: torch.Tensor, decay_norm_and_bias: bool = False) -> bool:
    """Norm and bias parameters (every 1-D parameter) get none unless asked."""
    return decay_norm_and_bias or param.ndim > 1


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float,
                              decay_norm_and_bias: bool = False) -> list[dict]:
    """Two groups: decayed weights, and (unless asked) undecayed norm/bias parameters."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if gets_weight_decay(param, decay_norm_and_bias) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "group_name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "group_name": "no_decay"})
    return groups


def peak_lr(cfg: OptimConfig) -> float:
    """optim.lr as a number. `find` never reaches an optimizer: the LR finder replaces it first."""
    if isinstance(cfg.lr, str):
        raise ValueError(f"optim.lr is {cfg.lr!r}: the LR finder must set a number before an optimizer is built")
    return cfg.lr


@dataclass(frozen=True)
class LrScaling:
    """How optim.lr was scaled to the global batch a run trains with (optim.lr_scaling).

    `lr` is the recipe's (as config.yaml records it, so a resume or a copied recipe never scales twice),
    `scaled_lr` the peak lr the optimizer, the schedule and transfer's per-group lrs start from."""
    rule: str                 # none | linear | sqrt
    lr: float                 # optim.lr as written (or as the LR finder chose it)
    scaled_lr: float
    global_batch: int         # data.batch_size x processes x train.grad_accum_steps
    reference_batch: int      # optim.reference_batch, or the recipe's global batch in one process
    processes: int

    def describe(self) -> str:
        """The log line: what the lr became and why."""
        if self.scaled_lr == self.lr:
            return (f"lr {self.lr:g} for a global batch of {self.global_batch} (optim.lr_scaling {self.rule}, "
                    f"reference {self.reference_batch})")
        how = "linearly" if self.rule == "linear" else "by the square root"
        return (f"lr {self.lr:g} scaled {how} to {self.scaled_lr:g} for a global batch of {self.global_batch} "
                f"(reference {self.reference_batch})")

    def record(self) -> dict[str, float | int | str]:
        """For summary.json and run.json."""
        return {"rule": self.rule, "lr": self.lr, "scaled_lr": self.scaled_lr, "global_batch": self.global_batch,
                "reference_batch": self.reference_batch, "processes": self.processes}


def scale_lr(cfg: OptimConfig, batch_size: int, grad_accum_steps: int, processes: int) -> LrScaling:
    """optim.lr scaled from optim.reference_batch to the global batch (`batch_size` images per process and
    forward pass x `processes` x `grad_accum_steps`): linear (Goyal et al. 2017, "Accurate, Large Minibatch
    SGD", for SGD) multiplies it by global / reference, sqrt by the square root of that (Krizhevsky 2014,
    "One weird trick"; often the better rule for Adam). The default reference is the recipe's own global batch
    in one process, so a one-process run keeps its lr whatever the rule and only the processes scale it."""
    global_batch = batch_size * processes * grad_accum_steps
    reference = cfg.reference_batch or batch_size * grad_accum_steps
    ratio = global_batch / reference
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]
    lr = peak_lr(cfg)
    return LrScaling(rule=cfg.lr_scaling, lr=lr, scaled_lr=lr * factor, global_batch=global_batch,
                     reference_batch=reference, processes=processes)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                    param_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW over `param_groups` (each may carry its own lr; default: `param_groups_weight_decay`)."""
    groups = param_groups if param_groups is not None else param_groups_weight_decay(
        model, cfg.weight_decay, cfg.decay_norm_and_bias)
    if cfg.name == "sgd":
        # nesterov is invalid without momentum in torch: only ask for it when it applies
        return torch.optim.SGD(groups, lr=peak_lr(cfg), momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adamw":
        # config validation guarantees exactly two betas
        return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")  # config validation prevents this


def epochs_to_steps(epoch_steps: Sequence[int]) -> Callable[[float], int]:
    """Position (in optimizer steps) of a point given in epochs, for epochs of varying length
    (progressive resizing changes the batch size, so the steps per epoch, between stages)."""
    starts = [0]
    for steps in epoch_steps:
        starts.append(starts[-1] + steps)

    def at(epochs: float) -> int:
        whole = int(epochs)
        if whole >= len(epoch_steps):  # past the run: extend with the last epoch's length
            return int(round(starts[-1] + (epochs - len(epoch_steps)) * epoch_steps[-1]))
        return int(round(starts[whole] + (epochs - whole) * epoch_steps[whole]))
    return at


def lr_factor_fn(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int, peak_lr: float,
                 epoch_steps: Sequence[int] | None = None) -> Callable[[int], float]:
    """The multiplier of the peak lr at optimizer step `s` (for LambdaLR), for non-one-cycle schedules.
    `epoch_steps`: the optimizer steps of each epoch when they differ (default: `steps_per_epoch` each)."""
    at = epochs_to_steps(epoch_steps) if epoch_steps else (lambda e: int(round(e * steps_per_epoch)))
    warmup = at(cfg.warmup_epochs)
    start = cfg.warmup_start_factor
    min_factor = cfg.min_lr / peak_lr if peak_lr > 0 else 0.0

    def warm(step: int) -> float:
        """The linear warmup factor; every caller asks only for steps before `warmup`."""
        return start + (1.0 - start) * step / warmup

    if cfg.name == "constant":
        return lambda s: warm(s) if s < warmup else 1.0
    if cfg.name == "step":
        if not epoch_steps:
            every = max(1, at(cfg.step_epochs))
            return lambda s: warm(s) if s < warmup else cfg.gamma ** (s // every)
        decays = int(len(epoch_steps) // cfg.step_epochs) + 1
        step_bounds = [at(k * cfg.step_epochs) for k in range(1, decays + 1)]
        return lambda s: warm(s) if s < warmup else cfg.gamma ** sum(s >= b for b in step_bounds)
    if cfg.name == "multistep":
        bounds = [at(m) for m in cfg.milestones]
        return lambda s: warm(s) if s < warmup else cfg.gamma ** sum(s >= b for b in bounds)
    if cfg.name in ("cosine", "warmup_cosine"):
        decay_steps = max(1, total_steps - warmup)

        def cosine(s: int) -> float:
            if s < warmup:
                return warm(s)
            progress = min(1.0, (s - warmup) / decay_steps)
            return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return cosine
    if cfg.name == "linear":  # budget-aware linear decay (Li et al., "Budgeted Training", ICLR 2020)
        decay_steps = max(1, total_steps - warmup)
        return lambda s: (warm(s) if s < warmup
                          else min_factor + (1.0 - min_factor) * max(0.0, 1.0 - (s - warmup) / decay_steps))
    raise ValueError(f"schedule.name: {cfg.name!r} has no factor function")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, peak_lr: float,
                    total_steps: int, steps_per_epoch: int, epoch_steps: Sequence[int] | None = None
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler to step once after every optimizer step (epoch_steps: see lr_factor_fn)."""
    if cfg.name == "onecycle":
        # lr from peak/div_factor up to peak over pct_start, then cosine down to
        # peak/(div_factor*final_div_factor); each group peaks at its own lr (discriminative lrs)
        total_steps = max(total_steps, 2)
        pct_start = cfg.pct_start
        if abs(pct_start * total_steps - 1.0) < 1e-9:
            # torch's first phase would end at step 0 and divide by zero (a run of few steps)
            pct_start *= 1.0 + 1e-6
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps, pct_start=pct_start,
            anneal_strategy="cos", div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
            cycle_momentum=cfg.cycle_momentum and _has_momentum(optimizer),
            base_momentum=cfg.base_momentum, max_momentum=cfg.max_momentum)
    factor = lr_factor_fn(cfg, total_steps, steps_per_epoch, peak_lr, epoch_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    group = optimizer.param_groups[0]
    return "betas" in group or group.get("momentum", 0.0) > 0
