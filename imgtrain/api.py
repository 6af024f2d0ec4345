"""The Python API: what the CLI calls, usable from a notebook or a script.

    import imgtrain
    recipe = imgtrain.load_recipe("configs/quickstart.yaml", ["train.epochs=3"])
    result = imgtrain.train(recipe)
    result.run_dir, result.history[-1]["val_acc"], result.summary["test_acc"]
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from imgtrain.config import Recipe, RecipeError, dump_recipe, load_recipe, recipe_from_dict
from imgtrain.data import (build_eval_transform, build_loaders, build_splits, build_train_transform,
                           resolve_normalization)
from imgtrain.engine.checkpoint import CheckpointError, load_weights
from imgtrain.engine.events import HookList
from imgtrain.engine.loop import TrainData, Trainer, select_device
from imgtrain.models import count_parameters, create_model
from imgtrain.tracking import build_trackers, write_summary

# keys that may change when resuming: how the run is executed, never what it computes
RESUME_OVERRIDABLE = ("train.device", "train.threads", "data.workers", "data.pin_memory",
                      "output.progress", "output.plots")


class RunDirError(ValueError):
    """A run folder that cannot be used as asked (exists, or is not a run folder)."""


@dataclass
class TrainResult:
    run_dir: Path
    history: List[Dict[str, Any]]
    summary: Dict[str, Any]
    model: torch.nn.Module          # holds the best weights when a test split was evaluated


# ----------------------------------------------------------------------------- run folders

def _looks_like_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def prepare_run_dir(recipe: Recipe, run_dir: Optional[Union[str, Path]], overwrite: bool) -> Path:
    """Create the run folder; never reuse a non-empty one unless `overwrite` (and it is a run)."""
    if run_dir is None:
        base = Path(recipe.output.root)
        name = recipe.output.name or (Path(recipe.source_file).stem if recipe.source_file else "run")
        run_dir = base / name
        if recipe.output.name is None and run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            # an automatic name never collides: quickstart, quickstart-2, quickstart-3 ...
            index = 2
            while (base / f"{name}-{index}").exists():
                index += 1
            run_dir = base / f"{name}-{index}"
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"{run_dir}: run folder exists and is not empty; pass --overwrite to replace "
                              f"it, --resume {run_dir} to continue it, or choose another --run-dir")
        if not _looks_like_run(run_dir):
            raise RunDirError(f"{run_dir}: --overwrite refused: the folder is not an imgtrain run "
                              "(no config.yaml or checkpoints/), so nothing in it is deleted")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- training

def train(recipe: Recipe, run_dir: Optional[Union[str, Path]] = None, resume: Optional[Union[str, Path]] = None,
          overwrite: bool = False, console: Any = None) -> TrainResult:
    """Train from a recipe; returns the run folder, the history and the summary.

    With `resume=RUN_DIR`, continue that run in place from its last finished epoch.
    """
    started = time.perf_counter()
    if resume is not None:
        run_dir = Path(resume)
        resume_file = run_dir / "checkpoints" / "last.state.pt"
        if not resume_file.is_file():
            raise CheckpointError(f"{run_dir}: nothing to resume: {resume_file} does not exist")
    else:
        run_dir = prepare_run_dir(recipe, run_dir, overwrite)
        resume_file = None
    seed_everything(recipe.train.seed)
    splits = build_splits(recipe.data)
    img_size = recipe.augment.img_size or splits.native_size
    mean, std = resolve_normalization(recipe.augment, splits)
    train_tf = build_train_transform(recipe.augment, splits.channels, img_size, mean, std)
    eval_tf = build_eval_transform(recipe.augment, splits.channels, img_size, mean, std)
    splits.train = splits.train.with_transform(train_tf)
    splits.val = splits.val.with_transform(eval_tf) if splits.val is not None else None
    splits.test = splits.test.with_transform(eval_tf) if splits.test is not None else None
    device = select_device(recipe.train.device)
    loaders = build_loaders(recipe, splits, device)
    model = create_model(recipe.model, num_classes=len(splits.classes), in_chans=splits.channels)
    metadata = {
        "model": {"name": recipe.model.name, "kwargs": recipe.model.kwargs, "drop_rate": recipe.model.drop_rate},
        "num_classes": len(splits.classes), "in_chans": splits.channels, "classes": list(splits.classes),
        "img_size": img_size, "mean": list(mean), "std": list(std), "crop_pct": recipe.augment.crop_pct,
        "recipe": recipe.to_dict(),
    }
    if resume_file is None:
        dump_recipe(recipe, run_dir / "config.yaml")
    trackers = build_trackers(recipe, run_dir, console_stream=console)
    hooks = HookList(strategies=[], trackers=trackers)
    data = TrainData(train=loaders.train, val=loaders.val, train_generator=loaders.train_generator,
                     classes=splits.classes)
    trainer = Trainer(recipe, model, data, run_dir, hooks, metadata)
    log = _tracker_logger(trackers)
    log(f"data: {len(splits.train)} train, {len(splits.val) if splits.val is not None else 0} val, "
        f"{len(splits.test) if splits.test is not None else 0} test images, {len(splits.classes)} classes, "
        f"{splits.channels} channel(s), {img_size} px; model {recipe.model.name} "
        f"({count_parameters(model):,} parameters)")
    if splits.skipped:
        _write_skipped(run_dir, splits.skipped)
        log(f"skipped {len(splits.skipped)} unreadable image(s); listed in {run_dir / 'skipped_images.csv'}")
    state = trainer.fit(resume_from=resume_file)
    summary = dict(state.summary)
    if loaders.test is not None:
        summary.update(_test_best(trainer, loaders.test, run_dir))
    summary["run_dir"] = str(run_dir)
    summary["total_seconds"] = round(time.perf_counter() - started, 3)
    write_summary(run_dir, summary)
    return TrainResult(run_dir=run_dir, history=state.history, summary=summary, model=trainer.model)


def _tracker_logger(trackers: Sequence[Any]) -> Any:
    for tracker in trackers:
        if hasattr(tracker, "log") and type(tracker).__name__ == "TrainLogTracker":
            return tracker.log
    return lambda message: None


def _write_skipped(run_dir: Path, skipped: Sequence[tuple]) -> None:
    import csv
    with open(run_dir / "skipped_images.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)


def _test_best(trainer: Trainer, test_loader: Any, run_dir: Path) -> Dict[str, Any]:
    """Evaluate the best checkpoint (or the final weights) on the test split."""
    best = run_dir / "checkpoints" / "best.safetensors"
    which = "final"
    if best.is_file():
        tensors, _ = load_weights(best)
        trainer.model.load_state_dict(tensors, strict=False)
        which = "best"
    result = trainer.evaluate(test_loader)
    return {"test_acc": result["acc"], "test_loss": result["loss"], "test_weights": which}


# ----------------------------------------------------------------------------- loading trained models

@dataclass
class LoadedModel:
    """A trained model with what it needs to take images: classes and its eval transform."""
    model: torch.nn.Module
    classes: List[str]
    channels: int
    img_size: int
    mean: List[float]
    std: List[float]
    recipe: Recipe
    path: Path

    def eval_transform(self) -> Any:
        return build_eval_transform(self.recipe.augment, self.channels, self.img_size, self.mean, self.std)


def resolve_checkpoint(target: Union[str, Path]) -> Path:
    """A run folder (its best, else last, weights) or a .safetensors file."""
    path = Path(target)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: no checkpoints/best.safetensors or last.safetensors in this folder")
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint file")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a run folder or a .safetensors file written by imgtrain")
    return path


def load_trained(target: Union[str, Path], device: Union[str, torch.device] = "cpu") -> LoadedModel:
    path = resolve_checkpoint(target)
    tensors, meta = load_weights(path)
    if not meta or "model" not in meta:
        raise CheckpointError(f"{path}: has no imgtrain metadata (model, classes); it was not written by imgtrain")
    recipe = recipe_from_dict(meta["recipe"], file=str(path))
    model = create_model(recipe.model, num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {recipe.model.name}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.to(device).eval()
    return LoadedModel(model=model, classes=list(meta["classes"]), channels=meta["in_chans"],
                       img_size=meta["img_size"], mean=meta["mean"], std=meta["std"], recipe=recipe, path=path)


__all__ = ["train", "TrainResult", "load_recipe", "prepare_run_dir", "RunDirError", "load_trained",
           "LoadedModel", "resolve_checkpoint", "RecipeError", "RESUME_OVERRIDABLE"]
