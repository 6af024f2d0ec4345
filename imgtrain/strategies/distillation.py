"""Knowledge distillation: a student learns from the labels and from a frozen teacher's predictions.

The loss is Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network"), exactly:

    alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The teacher's softened probabilities say which wrong classes look like the right one (a shirt
is closer to a T-shirt than to a sandal); that "dark knowledge" is a richer target than a
one-hot label, so a small student trained this way usually beats the same student trained on
labels alone, most of all when the student is much smaller than the teacher, the data is
limited, or the labels are noisy. It costs one teacher forward pass per batch.

    loss = distillation_loss(student_logits, teacher_logits, labels, alpha=0.5, temperature=4.0)

`DistillationHook` applies it to every training batch at `after_loss` (inside autocast, so the
teacher runs in the loop's precision). The CE term is the run's own training loss as the loop
computed it (label smoothing, class weights, focal ... included) and the targets are whatever
the batch holds, so Mixup/CutMix and progressive resizing, which run earlier, compose with it:
the teacher sees the same mixed, resized images as the student.

Teachers (`distill.teacher`: one, or a list) are an imgtrain run folder or `.safetensors`
checkpoint, or a timm model name with its pretrained weights (from the Hugging Face cache, as
`model.weights: timm` loads them). They are frozen (no gradients, never in the optimizer or
the checkpoints), in eval mode, under `torch.no_grad`. Each gets the batch as it would expect
it: un-normalised with the student's mean/std and re-normalised with its own; resized
(bilinear, antialiased when shrinking) to its own input size (or `distill.teacher_img_size`);
grey images repeated to 3 channels for an RGB teacher, RGB turned grey (ITU-R 601 luma, as
PIL's "L") for a grey one. Several teachers are averaged in probability at temperature T (the
ensemble's arithmetic mean, Hinton et al.'s choice for ensembles), handed on as the logits
T * log(mean_k softmax(z_k / T)), whose softmax at T is that mean exactly.

A folder written by `imgtrain ensemble --save` is a teacher too: its members become teachers with
the ensemble's weights (T * log(sum_k w_k softmax(z_k / T))), always as a soft vote whatever the
folder's `vote` says, since a hard vote's nearly one-hot output is what distillation avoids. Next to
other teachers in a list, each list entry has an equal share and the folder splits its share by
its weights.

With `distill.teacher_tta: true` each teacher predicts with test-time augmentation
(evaluation/tta.py's TTAModel, after the batch is adapted to it): the views and merge rule of its
run's `eval.tta` (hflip and the mean of probabilities when it names none, or for a timm model).
Its merged logits (log of the mean probability by default) are then softened by T like any
teacher's. It costs one teacher forward pass per view.

The hook holds no state a resume needs: the teachers are reloaded from disk and are fixed,
and its per-epoch sums start again with the epoch a resume restarts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from imgtrain.config import ModelConfig, RecipeError
from imgtrain.engine.events import Hook
from imgtrain.losses import distillation_kl, distillation_loss

KEY = "distill.teacher"
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses


# ----------------------------------------------------------------------------- pure functions

def ensemble_logits(logits: Sequence[torch.Tensor], temperature: float,
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """Logits whose softmax at `temperature` is the (weighted) mean of the teachers' softmaxes at it.

    T * log(sum_k w_k softmax(z_k / T)), w_k = 1/K without `weights` (which must sum to 1): one
    teacher gives back its own logits up to a constant per image (which softmax ignores)."""
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
    """A batch normalised one way (the student's) as another model expects it.

    Un-normalise with (from_mean, from_std), convert the channels (1 -> 3 repeats the grey
    plane; 3 -> 1 takes the luma), resize to size x size (bilinear, antialiased when
    shrinking; None keeps the size), normalise with (to_mean, to_std). Each step is skipped
    when it would change nothing."""
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


# ----------------------------------------------------------------------------- teachers

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
    """Frozen teacher(s) taking the student's normalised batch; returns (ensembled) logits.

    Not a submodule of the student, so its weights are never in the optimizer or a checkpoint.
    `train()` cannot switch it out of eval mode: BatchNorm and dropout stay as evaluated."""

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
        parts = [f"{t.source} ({t.img_size if self.img_size is None else self.img_size} px, {t.channels} ch"
                 + (f", TTA {t.tta}" if t.tta else "")
                 + (f", weight {self.weights[i]:.3f})" if self.weights is not None else ")")
                 for i, t in enumerate(self.teachers)]
        return ", ".join(parts)

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


def _is_path(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or path.suffix == ".safetensors" or "/" in source or "\\" in source


def _class_list(classes: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(str(c) for c in list(classes)[:limit])
    return "[" + shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "") + "]"


def check_teacher_sources(recipe: Any) -> None:
    """Cheap, before any data is read: every path `distill.teacher` names exists, every other
    name is a timm model. (Classes and weights are checked by `load_teachers`.)"""
    file = getattr(recipe, "source_file", None)
    for source in teacher_sources(recipe.distill):
        if _is_path(source):
            if not Path(source).expanduser().exists():
                raise RecipeError(f"{source}: no such run folder or checkpoint file (relative paths start in "
                                  "the working folder)", file=file, key=KEY)
        elif not timm.is_model(source):
            raise RecipeError(f"{source!r}: no such run folder or .safetensors file, and not a timm model name "
                              "(relative paths start in the working folder; `imgtrain models PATTERN` lists "
                              "timm's)", file=file, key=KEY)


def load_teacher(source: str, classes: Sequence[str], file: str | None = None) -> LoadedTeacher:
    """Load one teacher and check it predicts the data's classes; a RecipeError naming KEY if not.

    The class count (and, for imgtrain checkpoints, the class names and their order) is read from
    the checkpoint's metadata or timm's pretrained config before any weights are loaded."""
    from imgtrain.api import load_trained, resolve_checkpoint  # here: imgtrain.api imports this package
    from imgtrain.engine.checkpoint import CheckpointError, read_metadata
    from imgtrain.models.create import ModelError, create_model
    from imgtrain.models.nets import OUR_MODELS
    from imgtrain.models.weights import load_initial_weights, resolve_weights_source

    def fail(message: str) -> RecipeError:
        return RecipeError(message, file=file, key=KEY)

    if _is_path(source):
        try:
            path = resolve_checkpoint(Path(source).expanduser())
            meta = read_metadata(path)
        except CheckpointError as exc:
            raise fail(f"{exc} (relative paths start in the working folder)") from None
        if not meta or "classes" not in meta:
            raise fail(f"{path}: has no imgtrain metadata (classes, input size, normalisation); a teacher file "
                       "must be written by imgtrain (a run folder or its checkpoints/*.safetensors)")
        if list(meta["classes"]) != list(classes):
            how = ("the same classes in another order" if sorted(meta["classes"]) == sorted(classes)
                   else f"{len(meta['classes'])} classes against {len(classes)}")
            raise fail(f"{source}: the teacher was trained on other classes than this data has ({how}): "
                       f"teacher {_class_list(meta['classes'])}, data {_class_list(classes)}")
        try:
            loaded = load_trained(path)
        except (CheckpointError, ModelError) as exc:
            raise fail(str(exc)) from None
        return LoadedTeacher(model=loaded.model, source=source, num_classes=len(loaded.classes),
                             classes=loaded.classes, channels=loaded.channels, img_size=loaded.img_size,
                             mean=list(loaded.mean), std=list(loaded.std), recipe=loaded.recipe)
    name = source
    if name.split(".")[0] in OUR_MODELS:
        raise fail(f"{name} is one of imgtrain's own nets, which have no published weights: train it first "
                   f"(imgtrain train ...) and give its run folder, e.g. {KEY}=runs/teacher")
    if not timm.is_model(name):
        raise fail(f"{name!r}: no such run folder or .safetensors file, and not a timm model name "
                   "(relative paths start in the working folder; `imgtrain models PATTERN` lists timm's)")
    pretrained = timm.models.get_pretrained_cfg(name)
    cfg = ModelConfig(name=name, weights="timm")
    try:
        resolve_weights_source(cfg)  # timm has weights for it
    except ModelError as exc:
        raise fail(str(exc).removeprefix("model.weights: ")) from None
    num_classes = int(pretrained.num_classes)
    if num_classes != len(classes):
        raise fail(f"{name}: timm's weights predict {num_classes} classes and this data has {len(classes)} "
                   f"{_class_list(classes)}; a teacher must predict the data's classes (fine-tune it with "
                   f"imgtrain train ... model.name={name} model.weights=timm, then give that run folder)")
    channels, size = int(pretrained.input_size[0]), int(pretrained.input_size[-1])
    model = create_model(cfg, num_classes=num_classes, in_chans=channels)
    try:
        load_initial_weights(model, cfg, num_classes=num_classes, in_chans=channels)
    except ModelError as exc:
        raise fail(str(exc).removeprefix("model.weights: ")) from None
    model.eval()
    return LoadedTeacher(model=model, source=source, num_classes=num_classes, classes=None, channels=channels,
                         img_size=size, mean=[float(v) for v in pretrained.mean],
                         std=[float(v) for v in pretrained.std])


def with_tta(teacher: LoadedTeacher) -> LoadedTeacher:
    """The teacher predicting with test-time augmentation (evaluation/tta.py): its run's eval.tta
    views and merge rule, or hflip and the mean of probabilities when it names none (a timm model)."""
    from imgtrain.evaluation.tta import TTAModel, tta_config_for  # here: imgtrain.evaluation imports api

    settings = tta_config_for(teacher.recipe, True)
    return dataclasses.replace(teacher, model=TTAModel(teacher.model, settings),
                               tta=settings.describe())


def load_teachers(recipe: Any, classes: Sequence[str], mean: Sequence[float],
                  std: Sequence[float]) -> TeacherEnsemble | None:
    """The teachers `distill.teacher` names, checked against the data; None when distillation is off.

    Called by api.train before the run folder is made, so a wrong teacher costs nothing."""
    cfg, file = recipe.distill, getattr(recipe, "source_file", None)
    sources = teacher_sources(cfg)
    if not sources:
        return None
    teachers: list[LoadedTeacher] = []
    weights: list[float] = []
    for source in sources:  # each source has an equal share; an ensemble folder splits its own
        if _is_path(source) and is_ensemble_folder(source):
            for teacher, weight in load_ensemble_teachers(source, classes, file=file):
                teachers.append(teacher)
                weights.append(weight / len(sources))
        else:
            teachers.append(load_teacher(source, classes, file=file))
            weights.append(1.0 / len(sources))
    if cfg.teacher_tta:
        teachers = [with_tta(teacher) for teacher in teachers]
    uniform = all(abs(w - weights[0]) < 1e-12 for w in weights)
    return TeacherEnsemble(teachers, mean, std, cfg.temperature, cfg.teacher_img_size,
                           weights=None if uniform else weights)


def is_ensemble_folder(source: str) -> bool:
    from imgtrain.evaluation.inference import is_ensemble_dir  # here: imgtrain.evaluation imports imgtrain.api
    return is_ensemble_dir(Path(source).expanduser())


def load_ensemble_teachers(source: str, classes: Sequence[str],
                           file: str | None = None) -> list[tuple[LoadedTeacher, float]]:
    """The members of an `imgtrain ensemble --save` folder as teachers, with the ensemble's weights
    (nested ensembles expanded, weights multiplied through). Always its soft vote: a teacher hands
    on probabilities, and a hard vote's are nearly one-hot, what distillation means to avoid. The
    folder's own TTA setting is not used (distill.teacher_tta decides)."""
    from imgtrain.engine.checkpoint import CheckpointError
    from imgtrain.evaluation.ensemble import flat_members

    try:
        spec, members = flat_members(Path(source).expanduser())
    except CheckpointError as exc:
        raise RecipeError(str(exc), file=file, key=KEY) from None
    if list(spec.classes) != list(classes):
        how = ("the same classes in another order" if sorted(spec.classes) == sorted(classes)
               else f"{len(spec.classes)} classes against {len(classes)}")
        raise RecipeError(f"{source}: the ensemble was trained on other classes than this data has ({how}): "
                          f"ensemble {_class_list(spec.classes)}, data {_class_list(classes)}", file=file, key=KEY)
    return [(load_teacher(str(path), classes, file=file), weight) for path, weight in members]


# ----------------------------------------------------------------------------- the hook

class DistillationHook(Hook):
    """Replaces each batch's loss by the distillation loss; logs its two terms per epoch."""

    name = "distillation"

    def __init__(self, cfg: Any, teacher: TeacherEnsemble):
        self.alpha, self.temperature = cfg.alpha, cfg.temperature
        self.teacher = teacher
        self.ce_sum: torch.Tensor | None = None
        self.kd_sum: torch.Tensor | None = None
        self.seen = 0

    def fit_start(self, state: Any) -> None:
        self.teacher.to(state.device)
        if state.recipe.train.channels_last:
            self.teacher.to(memory_format=torch.channels_last)

    def epoch_start(self, state: Any) -> None:
        # sums stay on the device: no host sync per batch, one .item() per epoch
        self.ce_sum = torch.zeros((), device=state.device)
        self.kd_sum = torch.zeros((), device=state.device)
        self.seen = 0

    def after_loss(self, state: Any) -> None:
        teacher_logits = self.teacher(state.inputs)  # no_grad, eval mode; in the loop's autocast
        ce = state.loss
        kd = distillation_kl(state.outputs, teacher_logits, self.temperature)
        # distillation_loss's formula, with its two terms kept for the history
        state.loss = self.alpha * ce + (1.0 - self.alpha) * kd
        state.loss_parts["ce"], state.loss_parts["kd"] = ce, kd
        count = state.inputs.shape[0]
        self.ce_sum += ce.detach().float() * count
        self.kd_sum += kd.detach().float() * count
        self.seen += count

    def eval_end(self, state: Any) -> None:
        if self.seen:
            state.epoch_metrics["train_ce"] = self.ce_sum.item() / self.seen
            state.epoch_metrics["train_kd"] = self.kd_sum.item() / self.seen

    def fit_end(self, state: Any) -> None:
        state.summary["distill_teachers"] = [t.source for t in self.teacher.teachers]


__all__ = ["DistillationHook", "LoadedTeacher", "TeacherEnsemble", "adapt_batch", "check_teacher_sources",
           "distillation_kl",
           "distillation_loss", "ensemble_logits", "load_ensemble_teachers", "load_teacher", "load_teachers",
           "teacher_sources", "with_tta"]
