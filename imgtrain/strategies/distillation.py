"""Knowledge distillation: a student learns from the labels and from a frozen teacher's predictions.

The loss is Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network"), exactly:

    alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

    loss = distillation_loss(student_logits, teacher_logits, labels, alpha=0.5, temperature=4.0)

`DistillationHook` applies it at `after_loss` with the run's own training loss as CE; the teachers
(frozen, outside the optimizer and the checkpoints) see the batch as mixing and resizing left it,
each adapted to its own input (`adapt_batch`), several averaged in probability (`ensemble_logits`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from imgtrain.config import RecipeError
from imgtrain.engine.distributed import sum_across, world_info
from imgtrain.engine.events import Hook
from imgtrain.losses import distillation_kl, distillation_loss
from imgtrain.strategies.base import Strategy, StrategyContext, require_context

KEY = "distill.teacher"
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses


def ensemble_logits(logits: Sequence[torch.Tensor], temperature: float,
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """T * log(sum_k w_k softmax(z_k / T)), whose softmax at T is the (weighted) mean of the teachers'
    softmaxes at T; w_k = 1/K without `weights` (which must sum to 1). One teacher: its own logits."""
    if len(logits) == 1:
        return logits[0].float()
    log_probs = torch.stack([F.log_softmax(z.float() / temperature, dim=1) for z in logits])
    if weights is None:
        return temperature * (torch.logsumexp(log_probs, dim=0) - math.log(len(logits)))
    log_w = torch.tensor([math.log(w) if w > 0 else -math.inf for w in weights], device=log_probs.device,
                         dtype=log_probs.dtype).view(-1, 1, 1)
    return temperature * torch.logsumexp(log_probs + log_w, dim=0)


def adapt_batch(inputs: torch.Tensor, from_mean: Sequence[float], from_std: Sequence[float],
                to_mean: Sequence[float], to_std: Sequence[float], channels: int,
                size: int | None) -> torch.Tensor:
    """A batch normalised one way (the student's) as another model expects it: un-normalised, its
    channels converted (1 -> 3 repeats the grey plane; 3 -> 1 takes the luma), normalised again and
    resized to size x size (bilinear, antialiased when shrinking; None keeps the size)."""
    x = inputs
    same_norm = list(from_mean) == list(to_mean) and list(from_std) == list(to_std)
    if not same_norm or x.shape[1] != channels:
        mean = torch.tensor(from_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(from_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = x * std + mean
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            luma = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x * luma).sum(dim=1, keepdim=True)
        elif x.shape[1] != channels:
            raise ValueError(f"cannot turn {x.shape[1]}-channel images into {channels}-channel ones")
        mean = torch.tensor(to_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(to_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        shrinking = size < x.shape[-2] or size < x.shape[-1]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    return x


@dataclass
class LoadedTeacher:
    """One teacher and what it expects of its input."""
    model: nn.Module
    source: str                      # what distill.teacher said
    num_classes: int
    classes: list[str] | None     # None for a timm model (ImageNet-style class indices)
    channels: int
    img_size: int
    mean: list[float]
    std: list[float]
    recipe: Any = None               # the teacher run's recipe (its eval.tta); None for a timm model
    tta: str | None = None           # with distill.teacher_tta: its views and merge rule, described


class TeacherEnsemble(nn.Module):
    """Frozen teacher(s) taking the student's normalised batch; returns (ensembled) logits. Not part
    of the student (never in the optimizer or a checkpoint), and always in eval mode."""

    def __init__(self, teachers: Sequence[LoadedTeacher], student_mean: Sequence[float],
                 student_std: Sequence[float], temperature: float, img_size: int | None = None,
                 weights: Sequence[float] | None = None):
        super().__init__()
        self.teachers = list(teachers)
        # None: equal weights; else one per teacher, scaled to sum to 1 (an ensemble folder's weights)
        self.weights = None if weights is None else [float(w) / sum(weights) for w in weights]
        self.models = nn.ModuleList([t.model for t in self.teachers])
        self.student_mean, self.student_std = list(student_mean), list(student_std)
        self.temperature, self.img_size = temperature, img_size
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> TeacherEnsemble:
        return super().train(False)

    def describe(self) -> str:
        return ", ".join(f"{t.source} ({t.img_size if self.img_size is None else self.img_size} px, {t.channels} ch"
                         + (f", TTA {t.tta}" if t.tta else "")
                         + (f", weight {self.weights[i]:.3f})" if self.weights is not None else ")")
                         for i, t in enumerate(self.teachers))

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = []
        for teacher, model in zip(self.teachers, self.models):
            x = adapt_batch(inputs, self.student_mean, self.student_std, teacher.mean, teacher.std,
                            teacher.channels, self.img_size or teacher.img_size)
            logits.append(model(x))
        return ensemble_logits(logits, self.temperature, self.weights)


def teacher_sources(cfg: Any) -> list[str]:
    """distill.teacher as a list (empty when distillation is off)."""
    if cfg.teacher is None:
        return []
    return list(cfg.teacher) if isinstance(cfg.teacher, list) else [cfg.teacher]


def is_path(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or path.suffix == ".safetensors" or "/" in source or "\\" in source


def class_list(classes: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(str(c) for c in list(classes)[:limit])
    return "[" + shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "") + "]"


def check_teacher_sources(recipe: Any) -> None:
    """Before any data is read: every path `distill.teacher` names exists, every other name is a timm
    model (`load_teachers` checks classes and weights)."""
    file = getattr(recipe, "source_file", None)
    for source in teacher_sources(recipe.distill):
        if is_path(source):
            if not Path(source).expanduser().exists():
                raise RecipeError(f"{source}: no such run folder or checkpoint file (relative paths start in "
                                  "the working folder)", file=file, key=KEY)
        elif not timm.is_model(source):
            raise RecipeError(f"{source!r}: no such run folder or .safetensors file, and not a timm model name "
                              "(relative paths start in the working folder; `imgtrain models PATTERN` lists "
                              "timm's)", file=file, key=KEY)


class DistillationHook(Hook):
    """Replaces each batch's loss by the distillation loss; logs its two terms per epoch."""

    name = "distillation"

    def __init__(self, cfg: Any, teacher: TeacherEnsemble):
        self.alpha, self.temperature = cfg.alpha, cfg.temperature
        self.teacher = teacher
        # the epoch's sums of each term x images, and the images: this process's since the last merge
        self.ce_sum: torch.Tensor | None = None
        self.kd_sum: torch.Tensor | None = None
        self.seen = 0
        # several processes: the sums of every process up to the last merge (sync_ranks), equal on all
        self.merged = (0.0, 0.0, 0)

    def fit_start(self, state: Any) -> None:
        self.teacher.to(state.device)
        if state.recipe.train.channels_last:
            self.teacher.to(memory_format=torch.channels_last)

    def epoch_start(self, state: Any) -> None:
        if state.resumed_batches and self.ce_sum is not None and self.kd_sum is not None:  # restored sums go on
            self.ce_sum, self.kd_sum = self.ce_sum.to(state.device), self.kd_sum.to(state.device)
            return
        # sums stay on the device: no host sync per batch, one .item() per epoch
        self.ce_sum = torch.zeros((), device=state.device)
        self.kd_sum = torch.zeros((), device=state.device)
        self.seen, self.merged = 0, (0.0, 0.0, 0)

    def sync_ranks(self, state: Any) -> None:
        """Several processes: every process's sums so far go into `merged` (the same on every process)."""
        if self.ce_sum is None or self.kd_sum is None:
            return
        ce, kd, seen = sum_across(torch.stack([self.ce_sum.float(), self.kd_sum.float(),
                                                torch.tensor(float(self.seen), device=self.ce_sum.device)])).tolist()
        self.merged = (self.merged[0] + ce, self.merged[1] + kd, self.merged[2] + int(seen))
        self.ce_sum, self.kd_sum, self.seen = torch.zeros_like(self.ce_sum), torch.zeros_like(self.kd_sum), 0

    def totals(self) -> tuple[float, float, int]:
        """The epoch's sums so far: merged ones plus this process's since the merge."""
        assert self.ce_sum is not None and self.kd_sum is not None, "set at epoch_start"
        ce, kd, seen = self.merged
        return ce + self.ce_sum.item(), kd + self.kd_sum.item(), seen + self.seen

    def state_dict(self) -> dict[str, Any]:
        # the epoch's running sums, for a state saved inside an epoch (several processes: merged just before)
        if self.ce_sum is None or self.kd_sum is None:
            return {}
        ce, kd, seen = self.totals()
        return {"ce_sum": torch.tensor(ce), "kd_sum": torch.tensor(kd), "seen": seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ce_sum" in state:
            self.ce_sum, self.kd_sum, self.seen = state["ce_sum"], state["kd_sum"], int(state["seen"])
            self.merged = (0.0, 0.0, 0)
            if world_info()[0] != 0:  # the saved sums are every process's: rank 0 carries them on
                self.ce_sum, self.kd_sum, self.seen = torch.zeros(()), torch.zeros(()), 0

    def after_loss(self, state: Any) -> None:
        teacher_logits = self.teacher(state.inputs)  # no_grad, eval mode; in the loop's autocast
        ce = state.loss
        kd = distillation_kl(state.outputs, teacher_logits, self.temperature)
        # distillation_loss's formula, with its two terms kept for the history
        state.loss = self.alpha * ce + (1.0 - self.alpha) * kd
        state.loss_parts["ce"], state.loss_parts["kd"] = ce, kd
        if state.pass_index:  # a replay of the group (SAM's second pass): its batches are counted once
            return
        count = state.inputs.shape[0]
        self.ce_sum += ce.detach().float() * count
        self.kd_sum += kd.detach().float() * count
        self.seen += count

    def eval_end(self, state: Any) -> None:
        ce, kd, seen = self.totals()
        if seen:
            state.epoch_metrics["train_ce"] = ce / seen
            state.epoch_metrics["train_kd"] = kd / seen

    def fit_end(self, state: Any) -> None:
        state.summary["distill_teachers"] = [t.source for t in self.teacher.teachers]


class Distillation(Strategy):
    name, section = "distillation", "distill"

    def enabled(self, recipe: Any) -> bool:
        return recipe.distill.teacher is not None

    def check(self, recipe: Any) -> None:
        check_teacher_sources(recipe)  # a missing distill.teacher stops before the data is read

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        context = require_context(context, self.name)
        if context.teacher is None:
            raise ValueError("distill.teacher is set: api.train loads the teachers into context.teacher "
                             "(evaluation/teachers.py load_teachers)")
        context.notes.append(f"distill: alpha {recipe.distill.alpha}, T {recipe.distill.temperature}, "
                             f"teacher(s) {context.teacher.describe()}")
        return [DistillationHook(recipe.distill, context.teacher)]


__all__ = ["Distillation", "KEY", "DistillationHook", "LoadedTeacher", "TeacherEnsemble", "adapt_batch",
           "check_teacher_sources", "class_list", "distillation_kl", "distillation_loss", "ensemble_logits",
           "is_path", "teacher_sources"]
