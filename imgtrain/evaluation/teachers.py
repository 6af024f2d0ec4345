"""Teachers for knowledge distillation, loaded and checked against the data (`distill.teacher`).

A teacher is an imgtrain run folder or `.safetensors` checkpoint, an `imgtrain ensemble --save`
folder (its members, with the ensemble's weights), or a timm model name with its pretrained weights.
It lives here, beside TTA and ensembles, because a teacher is a trained model predicting:
strategies/distillation.py only runs the `TeacherEnsemble` that `load_teachers` hands it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm

from imgtrain.config import ModelConfig, RecipeError
from imgtrain.engine.checkpoint import CheckpointError, read_metadata
from imgtrain.evaluation.ensemble import flat_members
from imgtrain.evaluation.inference import is_ensemble_dir
from imgtrain.evaluation.tta import TTAModel, tta_config_for
from imgtrain.models.create import ModelError, create_model
from imgtrain.models.nets import OUR_MODELS
from imgtrain.models.trained import load_trained, resolve_checkpoint
from imgtrain.models.weights import load_initial_weights, resolve_weights_source
from imgtrain.strategies.distillation import KEY, LoadedTeacher, TeacherEnsemble, class_list, is_path, teacher_sources


def load_teacher(source: str, classes: Sequence[str], file: str | None = None) -> LoadedTeacher:
    """Load one teacher and check it predicts the data's classes; a RecipeError naming KEY if not.

    The class count (and, for imgtrain checkpoints, the class names and their order) is read from
    the checkpoint's metadata or timm's pretrained config before any weights are loaded."""
    def fail(message: str) -> RecipeError:
        return RecipeError(message, file=file, key=KEY)

    if is_path(source):
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
                       f"teacher {class_list(meta['classes'])}, data {class_list(classes)}")
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
    if pretrained is None:  # every registered timm model has one; the stubs say it may be missing
        raise fail(f"{name}: timm has no pretrained configuration for it")
    cfg = ModelConfig(name=name, weights="timm")
    try:
        resolve_weights_source(cfg)  # timm has weights for it
    except ModelError as exc:
        raise fail(str(exc).removeprefix("model.weights: ")) from None
    num_classes = int(pretrained.num_classes)
    if num_classes != len(classes):
        raise fail(f"{name}: timm's weights predict {num_classes} classes and this data has {len(classes)} "
                   f"{class_list(classes)}; a teacher must predict the data's classes (fine-tune it with "
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
    settings = tta_config_for(teacher.recipe, True)
    return dataclasses.replace(teacher, model=TTAModel(teacher.model, settings), tta=settings.describe())


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
        if is_path(source) and is_ensemble_folder(source):
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
    return is_ensemble_dir(Path(source).expanduser())


def load_ensemble_teachers(source: str, classes: Sequence[str],
                           file: str | None = None) -> list[tuple[LoadedTeacher, float]]:
    """The members of an `imgtrain ensemble --save` folder as teachers, with the ensemble's weights
    (nested ensembles expanded, weights multiplied through). Always its soft vote: a teacher hands
    on probabilities, and a hard vote's are nearly one-hot, what distillation means to avoid. The
    folder's own TTA setting is not used (distill.teacher_tta decides)."""
    try:
        spec, members = flat_members(Path(source).expanduser())
    except CheckpointError as exc:
        raise RecipeError(str(exc), file=file, key=KEY) from None
    if list(spec.classes) != list(classes):
        how = ("the same classes in another order" if sorted(spec.classes) == sorted(classes)
               else f"{len(spec.classes)} classes against {len(classes)}")
        raise RecipeError(f"{source}: the ensemble was trained on other classes than this data has ({how}): "
                          f"ensemble {class_list(spec.classes)}, data {class_list(classes)}", file=file, key=KEY)
    return [(load_teacher(str(path), classes, file=file), weight) for path, weight in members]


__all__ = ["is_ensemble_folder", "load_ensemble_teachers", "load_teacher", "load_teachers", "with_tta"]
