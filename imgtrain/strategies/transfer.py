"""Transfer learning: frozen backbones, partial freezing, discriminative learning rates and
gradual unfreezing.

The model is split into layer groups by timm's group matcher (stem first, head last);
`freeze_backbone`, `freeze_layers`, `freeze_epochs` (fastai's `fine_tune`) and `unfreeze_epochs`
(ULMFiT) choose which train, `layer_decay` or `group_lrs` their lrs (group i of n: lr x
decay^(n-1-i)). A frozen parameter stays in the optimizer with `requires_grad=False` (no gradient,
no step), and its BatchNorm layers are in eval mode. Which groups train is a pure function of the
epoch (`first_trainable_group`), so a resume needs no state.

    groups = layer_groups(model)                       # [[param names of the stem], ..., [head]]
    freeze_until(model, groups, first_trainable=len(groups) - 1)   # head only
"""

from __future__ import annotations

from typing import Any

import torch

from imgtrain.config import RecipeError
from imgtrain.engine.events import Hook
from imgtrain.engine.optim import gets_weight_decay
from imgtrain.strategies.base import Strategy, StrategyContext, require_context


def layer_groups(model: torch.nn.Module, by: str = "stage") -> list[list[str]]:
    """Parameter names per layer group, stem first, head last, by timm's group matcher ("stage":
    coarse, "block": one per block); without one, two groups: all but the classifier, the classifier."""
    from timm.models import group_parameters

    names = [name for name, _ in model.named_parameters()]
    matcher = getattr(model, "group_matcher", None)
    head = _classifier_names(model)
    if matcher is not None:
        grouped = group_parameters(model, matcher(coarse=(by == "stage")))
        groups = [list(params) for _, params in sorted(grouped.items())]
    else:
        if not head:
            raise RecipeError(f"transfer: {type(model).__name__} has neither timm's group_matcher nor a "
                              "get_classifier(); its layer groups cannot be found", key="transfer")
        groups = [[n for n in names if n not in head], [n for n in names if n in head]]
    # the head must be a group of its own for "head only" to mean the classifier
    if head and len(groups) > 1 and not set(head) <= set(groups[-1]):
        raise RecipeError(f"transfer: the last layer group of {type(model).__name__} does not hold its classifier "
                          f"({sorted(head)[:2]}); the group matcher does not fit this model", key="transfer")
    return [g for g in groups if g]


def _classifier_names(model: torch.nn.Module) -> set:
    get = getattr(model, "get_classifier", None)
    if get is None:
        return set()
    classifier = get()
    ids = {id(p) for p in classifier.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def group_lr_multipliers(num_groups: int, lr: float, layer_decay: float | None = None,
                         group_lrs: list[float] | None = None) -> list[float]:
    """The lr of each group, stem first: lr x decay^(groups above it), or the explicit list."""
    if group_lrs is not None:
        if len(group_lrs) != num_groups:
            raise RecipeError(f"the model has {num_groups} layer groups (stem ... head) but "
                              f"{len(group_lrs)} learning rates were given; give one per group",
                              key="transfer.group_lrs")
        return [float(v) for v in group_lrs]
    decay = 1.0 if layer_decay is None else layer_decay
    return [lr * decay ** (num_groups - 1 - i) for i in range(num_groups)]


def first_trainable_group(cfg: Any, epoch: int, num_groups: int) -> int:
    """Index of the lowest group that trains in `epoch` (0-based); groups below it are frozen."""
    head = num_groups - 1
    if cfg.freeze_backbone:
        first = head
    elif cfg.freeze_epochs:
        first = head if epoch < cfg.freeze_epochs else 0
    elif cfg.unfreeze_epochs:
        unfrozen = sum(epoch >= e for e in cfg.unfreeze_epochs)  # groups below the head now training
        first = head - unfrozen
    else:
        first = 0
    return max(first, cfg.freeze_layers)


def check_transfer(cfg: Any, num_groups: int, model_name: str, file: str | None = None) -> None:
    """Settings that need the model's group count: clear errors before training."""
    body = num_groups - 1  # groups below the head
    if cfg.freeze_layers > body:
        raise RecipeError(f"{model_name} has {num_groups} layer groups by {cfg.groups} ({body} below the head); "
                          f"freeze_layers must be <= {body}, got {cfg.freeze_layers}",
                          file=file, key="transfer.freeze_layers")
    if len(cfg.unfreeze_epochs) > body - cfg.freeze_layers:
        raise RecipeError(f"{model_name} has {body - cfg.freeze_layers} layer group(s) below the head that can "
                          f"unfreeze, but unfreeze_epochs lists {len(cfg.unfreeze_epochs)} epochs; "
                          "list at most that many (or transfer.groups: block for finer groups)",
                          file=file, key="transfer.unfreeze_epochs")


def freeze_until(model: torch.nn.Module, groups: list[list[str]], first_trainable: int) -> None:
    """requires_grad False for the groups below `first_trainable`, True from it up."""
    frozen = {name for group in groups[:first_trainable] for name in group}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)


def frozen_norms_to_eval(model: torch.nn.Module) -> int:
    """BatchNorm layers whose parameters are all frozen go to eval mode; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
                count += 1
    return count


def trainable_counts(model: torch.nn.Module, groups: list[list[str]]) -> list[int]:
    """Trainable parameter count (elements) of each group."""
    params = dict(model.named_parameters())
    return [sum(params[n].numel() for n in group if params[n].requires_grad) for group in groups]


def _checked_groups(model: torch.nn.Module, recipe: Any) -> tuple[list[list[str]], list[float]]:
    """The model's layer groups and their lrs, once every transfer.* setting is checked against them."""
    cfg = recipe.transfer
    groups = layer_groups(model, cfg.groups)
    check_transfer(cfg, len(groups), recipe.model.name, recipe.source_file)
    return groups, group_lr_multipliers(len(groups), recipe.optim.lr, cfg.layer_decay, cfg.group_lrs)


def check_transfer_recipe(model: torch.nn.Module, recipe: Any) -> None:
    """Every transfer.* setting the model's layer groups must allow, checked before training."""
    if transfer_enabled(recipe):
        _checked_groups(model, recipe)


def transfer_param_groups(model: torch.nn.Module, recipe: Any) -> list[dict[str, Any]] | None:
    """Optimizer param groups (decayed and undecayed) per layer group, head first so that the lr in
    the history is the head's, the recipe's optim.lr; None without transfer (the plain groups)."""
    if not transfer_enabled(recipe):
        return None
    optim = recipe.optim
    groups, lrs = _checked_groups(model, recipe)
    params = dict(model.named_parameters())
    out: list[dict[str, Any]] = []
    for index in reversed(range(len(groups))):
        decay = [params[n] for n in groups[index] if gets_weight_decay(params[n], optim.decay_norm_and_bias)]
        no_decay = [params[n] for n in groups[index] if not gets_weight_decay(params[n], optim.decay_norm_and_bias)]
        for kind, members, wd in (("decay", decay, optim.weight_decay), ("no_decay", no_decay, 0.0)):
            if members:
                out.append({"params": members, "weight_decay": wd, "lr": lrs[index],
                            "group_name": f"layer{index}_{kind}", "layer_group": index})
    return out


def transfer_enabled(recipe: Any) -> bool:
    cfg = recipe.transfer
    return bool(cfg.freeze_backbone or cfg.freeze_layers or cfg.freeze_epochs or cfg.unfreeze_epochs
                or cfg.layer_decay is not None or cfg.group_lrs is not None)


class TransferHook(Hook):
    """Sets which layer groups train at every epoch start; records trainable counts per epoch."""

    name = "transfer"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.groups: list[list[str]] = []
        self.first_trainable = 0

    def fit_start(self, state: Any) -> None:
        self.groups = layer_groups(state.model, self.cfg.groups)

    def epoch_start(self, state: Any) -> None:
        # the loop has just called model.train(): set requires_grad, then BatchNorm modes
        self.first_trainable = first_trainable_group(self.cfg, state.epoch, len(self.groups))
        freeze_until(state.model, self.groups, self.first_trainable)
        if self.cfg.bn_frozen_eval:
            frozen_norms_to_eval(state.model)

    def eval_end(self, state: Any) -> None:
        # before the loop turns epoch_metrics into the history row: the counts land in history.csv
        counts = trainable_counts(state.model, self.groups)
        state.epoch_metrics["trainable_params"] = sum(counts)
        state.epoch_metrics["trainable_groups"] = f"{len(self.groups) - self.first_trainable}/{len(self.groups)}"
        state.epoch_details["trainable_per_group"] = counts


class Transfer(Strategy):
    name, section = "transfer", "transfer"
    in_lr_find = True

    def enabled(self, recipe: Any) -> bool:
        return transfer_enabled(recipe)

    def param_groups(self, recipe: Any, model: torch.nn.Module) -> list[dict[str, Any]] | None:
        return transfer_param_groups(model, recipe)

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        context = require_context(context, self.name)
        if context.model is None:
            raise ValueError("transfer: checking transfer.* against the layer groups needs context.model")
        check_transfer_recipe(context.model, recipe)
        return [TransferHook(recipe.transfer)]


__all__ = ["Transfer", "TransferHook", "check_transfer", "check_transfer_recipe", "first_trainable_group",
           "freeze_until", "frozen_norms_to_eval", "group_lr_multipliers", "layer_groups", "trainable_counts",
           "transfer_enabled", "transfer_param_groups"]
