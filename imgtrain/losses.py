"""Training losses: cross-entropy, focal and logit-adjusted, with class weights (the README's
"Class imbalance"); distillation.

`build_train_loss(recipe, train_targets, num_classes)` is what the Trainer calls. Targets are
class indices (N,) or probabilities (N, C) (Mixup/CutMix, smoothing already folded in, so
label smoothing applies to hard targets only); every loss here takes both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from imgtrain.config import RecipeError

# ----------------------------------------------------------------------------- pure functions

def class_counts(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class (long, (C,)) of hard labels (N,) or of soft targets (N, C) (summed)."""
    if targets.ndim == 2:
        return targets.sum(dim=0).round().long()
    return torch.bincount(targets.long().reshape(-1), minlength=num_classes)[:num_classes]


def class_prior(counts: torch.Tensor) -> torch.Tensor:
    """Class frequencies (float, sum 1) from counts; an empty class counts as one image."""
    counts = counts.double().clamp_min(1)
    return (counts / counts.sum()).float()


def class_weights_from_counts(counts: torch.Tensor | Sequence[int], mode: str = "inverse",
                              beta: float = 0.999) -> torch.Tensor:
    """Per-class weights (float, (C,), mean 1) from training counts: mode `inverse` 1 / n_c, mode
    `effective` (1 - beta) / (1 - beta^n_c) (Cui et al. 2019; beta 0: equal weights, -> 1: inverse)."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1)
    if mode == "inverse" or (mode == "effective" and beta >= 1.0):
        weights = 1.0 / n
    elif mode == "effective":
        # (1 - beta) / (1 - beta^n); -expm1(n*log(beta)) keeps 1 - beta^n exact when beta^n ~ 1
        weights = (1.0 - beta) / -torch.expm1(n * torch.log(torch.tensor(beta, dtype=torch.float64))) \
            if beta > 0 else torch.ones_like(n)
    else:
        raise ValueError(f"unknown class weight mode {mode!r}; expected inverse or effective")
    return (weights / weights.mean()).float()


def logit_adjustment(prior: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """tau * log(prior): added to the logits in training (the loss), subtracted at evaluation."""
    return tau * torch.log(prior.float())


def posthoc_adjust_logits(logits: torch.Tensor, prior: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Logits of a model trained on the long-tailed data, re-aimed at balanced accuracy."""
    return logits.float() - logit_adjustment(prior, tau).to(logits.device)


def soft_targets(targets: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """(N, C) probabilities: hard labels one-hot and smoothed as F.cross_entropy does; soft as given."""
    if targets.ndim == 2:
        return targets.float()
    one_hot = F.one_hot(targets.long(), num_classes).float()
    if label_smoothing:
        one_hot = one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return one_hot


def _weighted_mean(per_class_loss: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """sum of t_ic * w_c * loss_ic over sum of t_ic * w_c: F.cross_entropy's weighted mean for one-hot t."""
    mass = targets if weight is None else targets * weight.to(targets.dtype)
    return (mass * per_class_loss).sum() / mass.sum().clamp_min(torch.finfo(mass.dtype).tiny)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean (or class-weighted mean) cross-entropy on hard (N,) or soft (N, C) targets."""
    logits = logits.float()
    if targets.ndim == 1 and (weight is None or not label_smoothing):
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)
    # weights with smoothing: F.cross_entropy divides by the labels' weights only; the soft
    # form divides by the weight of all target mass, so hard and Mixup targets agree
    target = soft_targets(targets, logits.shape[1], label_smoothing)
    return _weighted_mean(-F.log_softmax(logits, dim=1), target, weight)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float | None = None,
               weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Focal loss on hard (N,) or soft (N, C) targets.

    alpha None: softmax form, sum_c t_c (1 - p_c)^gamma (-log p_c) per image (gamma 0: cross-entropy).
    alpha in [0, 1]: sigmoid form, one binary problem per class, positives weighted alpha, negatives
    1 - alpha. `weight` (C,) weights each image by t . w; the batch loss is the weighted mean.
    """
    logits = logits.float()
    target = soft_targets(targets, logits.shape[1], label_smoothing)
    if alpha is None:
        log_p = F.log_softmax(logits, dim=1)
        per_class = (1.0 - log_p.exp()).pow(gamma) * -log_p
        return _weighted_mean(per_class, target, weight)
    per_image = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="none").sum(dim=1)
    if weight is None:
        return per_image.mean()
    return _weighted_mean(per_image, target @ weight.to(target.dtype), None)  # each image weighted t . w


def logit_adjusted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor,
                                 tau: float = 1.0, weight: torch.Tensor | None = None,
                                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on logits + tau * log(prior) (Menon et al. 2021, the loss form)."""
    adjusted = logits.float() + logit_adjustment(prior, tau).to(logits.device)
    return cross_entropy(adjusted, targets, weight=weight, label_smoothing=label_smoothing)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over images, in float32.

    T^2 keeps this term's gradient on the label loss's scale whatever T is (Hinton et al. 2015)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float = 0.5, temperature: float = 4.0,
                      label_loss: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * CE(student, targets) + (1 - alpha) * `distillation_kl` (Hinton et al. 2015).

    `label_loss`, when given, replaces the CE term (the Trainer's loss, with smoothing or weights)."""
    if label_loss is None:
        label_loss = cross_entropy(student_logits, targets)
    return alpha * label_loss + (1.0 - alpha) * distillation_kl(student_logits, teacher_logits, temperature)


# ----------------------------------------------------------------------------- modules

class ClassificationLoss(nn.Module):
    """Mean cross-entropy; `label_smoothing` for hard targets, `weight` per class."""

    weight: torch.Tensor | None  # a registered buffer

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets, weight=self.weight, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """`focal_loss` as a module (buffers follow the model to its device)."""

    weight: torch.Tensor | None  # a registered buffer

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, label_smoothing: float = 0.0,
                 weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma, self.alpha, self.label_smoothing = gamma, alpha, label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.gamma, self.alpha, self.weight, self.label_smoothing)


class LogitAdjustedLoss(nn.Module):
    """`logit_adjusted_cross_entropy` as a module, with the training prior as a buffer."""

    prior: torch.Tensor  # registered buffers
    weight: torch.Tensor | None

    def __init__(self, prior: torch.Tensor, tau: float = 1.0, label_smoothing: float = 0.0,
                 weight: torch.Tensor | None = None):
        super().__init__()
        self.tau, self.label_smoothing = tau, label_smoothing
        self.register_buffer("prior", prior.float(), persistent=False)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_cross_entropy(logits, targets, self.prior, self.tau, self.weight, self.label_smoothing)


# A loss builder takes (the recipe, per-class weights or None, the training prior).
LossBuilder = Callable[[Any, torch.Tensor | None, torch.Tensor], nn.Module]

LOSSES: dict[str, LossBuilder] = {
    "ce": lambda recipe, weight, prior: ClassificationLoss(recipe.train.label_smoothing, weight),
    "focal": lambda recipe, weight, prior: FocalLoss(recipe.imbalance.focal_gamma, recipe.imbalance.focal_alpha,
                                                     recipe.train.label_smoothing, weight),
    "logit_adjusted": lambda recipe, weight, prior: LogitAdjustedLoss(prior, recipe.imbalance.tau,
                                                                      recipe.train.label_smoothing, weight),
}


# ----------------------------------------------------------------------------- from a recipe

def _format_classes(classes: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(str(c) for c in list(classes)[:limit])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")


def check_imbalance_recipe(recipe: Any, classes: Sequence[str]) -> None:
    """Checks of the `imbalance` section that need the data's classes (RecipeError); run before training."""
    cfg, file = recipe.imbalance, getattr(recipe, "source_file", None)
    weights = cfg.class_weights
    if isinstance(weights, list):
        if len(weights) != len(classes):
            raise RecipeError(
                f"expected one weight per class: the data has {len(classes)} classes "
                f"({_format_classes(classes)}), the list has {len(weights)} weight(s). Give {len(classes)} "
                "weights in that order, or use inverse / effective to compute them from the training counts",
                file=file, key="imbalance.class_weights")
        if not any(w > 0 for w in weights):
            raise RecipeError("at least one class weight must be > 0", file=file, key="imbalance.class_weights")
    if cfg.posthoc_adjust and cfg.loss == "logit_adjusted":
        raise RecipeError("posthoc_adjust with loss: logit_adjusted adjusts the logits twice; the loss form "
                          "already makes the plain logits balanced. Use one of the two",
                          file=file, key="imbalance.posthoc_adjust")


def resolve_class_weights(recipe: Any, train_targets: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """The per-class weights the recipe asks for (None for `none`)."""
    cfg = recipe.imbalance
    if isinstance(cfg.class_weights, list):
        return torch.tensor(cfg.class_weights, dtype=torch.float32)
    if cfg.class_weights == "none":
        return None
    return class_weights_from_counts(_training_counts(train_targets, num_classes, "imbalance.class_weights"),
                                     cfg.class_weights, cfg.effective_beta)


def _training_counts(train_targets: torch.Tensor, num_classes: int, key: str) -> torch.Tensor:
    if train_targets is None or len(train_targets) == 0:
        raise ValueError(f"{key} needs the training labels: pass the training split's labels (train_targets)")
    return class_counts(train_targets, num_classes)


def build_train_loss(recipe: Any, train_targets: torch.Tensor, num_classes: int) -> nn.Module:
    """The loss a recipe asks for: `imbalance.loss`, with `imbalance.class_weights`."""
    cfg = recipe.imbalance
    # api.train runs this check with the class names before training; this covers a Trainer
    # assembled by hand, which knows only the number of classes
    check_imbalance_recipe(recipe, [f"class {i}" for i in range(num_classes)])
    weight = resolve_class_weights(recipe, train_targets, num_classes)
    prior = (class_prior(_training_counts(train_targets, num_classes, "imbalance.loss: logit_adjusted"))
             if cfg.loss == "logit_adjusted" else torch.full((num_classes,), 1.0 / num_classes))
    return LOSSES[cfg.loss](recipe, weight, prior)


def eval_logit_offset(recipe: Any, train_targets: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """What to add to the logits at evaluation: -tau * log(prior) with `posthoc_adjust`, else None."""
    cfg = recipe.imbalance
    if not cfg.posthoc_adjust:
        return None
    prior = class_prior(_training_counts(train_targets, num_classes, "imbalance.posthoc_adjust"))
    return -logit_adjustment(prior, cfg.tau)


__all__ = ["LOSSES", "ClassificationLoss", "FocalLoss", "LogitAdjustedLoss", "build_train_loss",
           "check_imbalance_recipe", "class_counts", "class_prior", "class_weights_from_counts",
           "cross_entropy", "distillation_kl", "distillation_loss", "eval_logit_offset", "focal_loss",
           "logit_adjusted_cross_entropy", "logit_adjustment", "posthoc_adjust_logits", "resolve_class_weights",
           "soft_targets"]
