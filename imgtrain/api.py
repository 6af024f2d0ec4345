"""The Python API: what the CLI calls, usable from a notebook or a script.

    import imgtrain
    recipe = imgtrain.load_recipe("configs/quickstart.yaml", ["train.epochs=3"])
    result = imgtrain.train(recipe)
    result.run_dir, result.history[-1]["val_acc"], result.summary["test_acc"]
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from imgtrain.config import Recipe, RecipeError, dump_recipe, load_recipe, recipe_from_dict
from imgtrain.data import (TensorImageDataset, build_eval_transform, build_loaders, build_splits,
                           build_train_transform, resolve_normalization)
from imgtrain.data.batch_transforms import build_batch_pipelines, resolve_device_transforms
from imgtrain.data.cache import apply_cache, cache_resolution
from imgtrain.engine.checkpoint import CheckpointError, load_weights
from imgtrain.engine.events import HookList
from imgtrain.engine.device import select_device
from imgtrain.engine.loop import TrainData, Trainer
from imgtrain.losses import check_imbalance_recipe
from imgtrain.models import LogitOffset, count_parameters, create_model
from imgtrain.models.weights import load_initial_weights, resolve_weights_source
from imgtrain.strategies import build_strategies, prepare_curriculum
from imgtrain.strategies.distillation import check_teacher_sources, load_teachers
from imgtrain.strategies.early_stopping import check_early_stop
from imgtrain.strategies.lr_finder import CSV_NAME as LR_FIND_CSV
from imgtrain.strategies.lr_finder import LrFindResult, check_lr_find, find_lr
from imgtrain.strategies.progressive import (check_progressive_recipe, describe_plans, eval_size, plan_epochs,
                                             progressive_enabled)
from imgtrain.strategies.transfer import TransferHook, check_transfer_recipe, transfer_enabled
from imgtrain.tracking import ReportInputs, ReportTracker, build_trackers, write_summary

# keys that may change when resuming: how the run is executed, never what it computes
RESUME_OVERRIDABLE = ("train.device", "train.threads", "data.workers", "data.pin_memory",
                      "data.prefetch_factor", "data.persistent_workers", "data.cache_dir",
                      "output.progress", "output.plots", "output.report",
                      # how a run is watched; skip lets a run stopped on a nan loss step over it
                      "diagnostics.grad_monitor_every", "diagnostics.vanishing_below",
                      "diagnostics.exploding_above", "diagnostics.nonfinite",
                      "diagnostics.nonfinite_check_every", "diagnostics.max_skipped_steps")


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


def plan_run_dir(recipe: Recipe, run_dir: Optional[Union[str, Path]], overwrite: bool) -> Path:
    """The run folder a new run will use; raises RunDirError when it may not. Touches nothing."""
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
    check_replaceable(run_dir, overwrite, ours=_looks_like_run(run_dir),
                      refuse=f"run folder exists and is not empty; pass --overwrite to replace it, --resume "
                             f"{run_dir} to continue it, or choose another --run-dir",
                      foreign="the folder is not an imgtrain run (no config.yaml or checkpoints/)")
    return run_dir


def check_replaceable(folder: Path, overwrite: bool, ours: bool, refuse: str, foreign: str) -> None:
    """A folder a command is about to write must be absent or empty, or, with --overwrite, one that
    command wrote (`ours`); RunDirError says which rule failed (`refuse`, `foreign`)."""
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise RunDirError(f"{folder}: {refuse}")
        if not ours:
            raise RunDirError(f"{folder}: --overwrite refused: {foreign}, so nothing in it is deleted")


def make_run_dir(run_dir: Path) -> Path:
    """Create a planned run folder, replacing the old run there (plan_run_dir allowed it)."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def prepare_run_dir(recipe: Recipe, run_dir: Optional[Union[str, Path]], overwrite: bool) -> Path:
    """Create the run folder; never reuse a non-empty one unless `overwrite` (and it is a run)."""
    return make_run_dir(plan_run_dir(recipe, run_dir, overwrite))


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
        # the folder is only planned here: every check below (weights, data, model, strategies)
        # runs before it is created, so bad input leaves no folder behind and --overwrite
        # deletes the old run only once the new one is ready to start
        run_dir = plan_run_dir(recipe, run_dir, overwrite)
        weights = resolve_weights_source(recipe.model)  # a wrong model.weights stops before data is read
        if overwrite and weights is not None and weights.path is not None:
            _check_not_overwritten(weights.path, run_dir)
        resume_file = None
    check_teacher_sources(recipe)  # a missing distill.teacher stops before the data is read
    check_lr_find(recipe)  # optim.lr: find with keys it cannot work with
    seed_everything(recipe.train.seed)
    splits = build_splits(recipe.data)
    check_imbalance_recipe(recipe, splits.classes)  # class weight list vs the data's classes
    # stage sizes vs the size the data pipeline makes, stage epochs vs train.epochs
    check_progressive_recipe(recipe, recipe.augment.img_size or splits.native_size,
                             batch_sampler=recipe.data.sampler == "per_class")
    device = select_device(recipe.train.device)
    prepared = prepare_data(recipe, splits, device)
    img_size, mean, std, loaders = prepared.img_size, prepared.mean, prepared.std, prepared.loaders
    model = create_model(recipe.model, num_classes=len(splits.classes), in_chans=splits.channels)
    # starting weights only for a new run: a resumed one continues from its own checkpoint
    weights_report = None if resume_file is not None else load_initial_weights(
        model, recipe.model, num_classes=len(splits.classes), in_chans=splits.channels)
    # optim.lr: find: the range test runs here, on this run's data and starting weights, and puts
    # them back; from here on the recipe holds the lr it chose (config.yaml, the checkpoints, and
    # so a --resume, which reads config.yaml, trains on the same number)
    lr_found = None
    if recipe.optim.lr == "find" and resume_file is not None:  # the lr the run chose is in its config.yaml
        recipe = with_lr(recipe, load_recipe(run_dir / "config.yaml").optim.lr)
    elif recipe.optim.lr == "find":
        recipe, lr_found = find_recipe_lr(recipe, model, prepared)
    check_transfer_recipe(model, recipe)  # layer groups vs transfer.* (freeze_layers, group_lrs ...)
    check_early_stop(recipe.early_stop, has_val=loaders.val is not None, file=recipe.source_file)
    # distill.teacher: loaded and checked against the data's classes (normalisation from `mean`/`std`)
    teacher = load_teachers(recipe, splits.classes, mean, std)
    if teacher is not None:
        prepared.notes.append(f"distill: alpha {recipe.distill.alpha}, T {recipe.distill.temperature}, "
                              f"teacher(s) {teacher.describe()}")
    epoch_plans = plan_epochs(recipe, img_size) if progressive_enabled(recipe) else None
    if epoch_plans is not None:
        prepared.notes.append("progressive resizing: " + describe_plans(epoch_plans)
                              + f"; evaluation at {prepared.eval_size} px")
    strategies = build_strategies(recipe, teacher=teacher, epoch_plans=epoch_plans)
    # curriculum.*: scores the training images (reference, csv) and installs its sampler in loaders.train
    prepared.notes += prepare_curriculum(strategies, recipe, splits, loaders, device)
    metadata = {
        "model": {"name": recipe.model.name, "kwargs": recipe.model.kwargs, "drop_rate": recipe.model.drop_rate},
        "num_classes": len(splits.classes), "in_chans": splits.channels, "classes": list(splits.classes),
        "img_size": prepared.eval_size, "mean": list(mean), "std": list(std), "crop_pct": recipe.augment.crop_pct,
        "recipe": recipe.to_dict(),
    }
    if resume_file is None:
        make_run_dir(run_dir)
        dump_recipe(recipe, run_dir / "config.yaml")
    report_inputs = ReportInputs(val_dataset=loaders.val.dataset if loaders.val is not None else None,
                                 mean=prepared.mean, std=prepared.std, eval_batch_transform=prepared.eval_batch_transform)
    trackers = build_trackers(recipe, run_dir, console_stream=console, report_inputs=report_inputs)
    hooks = HookList(strategies=strategies, trackers=trackers)
    data = TrainData(train=loaders.train, val=loaders.val, train_generator=loaders.train_generator,
                     classes=splits.classes, train_targets=splits.train.targets,
                     train_batch_transform=prepared.train_batch_transform,
                     eval_batch_transform=prepared.eval_batch_transform, epoch_plans=epoch_plans)
    trainer = Trainer(recipe, model, data, run_dir, hooks, metadata)
    log = _tracker_logger(trackers)
    log(f"data: {len(splits.train)} train, {len(splits.val) if splits.val is not None else 0} val, "
        f"{len(splits.test) if splits.test is not None else 0} test images, {len(splits.classes)} classes, "
        f"{splits.channels} channel(s), {img_size} px; model {recipe.model.name} "
        f"({count_parameters(model):,} parameters)")
    for line in weights_report.lines() if weights_report is not None else []:
        log(line)
    for line in prepared.notes:
        log(line)
    if lr_found is not None:
        lr_found.write(run_dir, chosen=recipe.lr_find.suggestion)
        for line in lr_found.lines(recipe.lr_find.suggestion):
            log(line)
    elif resume_file is not None and (run_dir / LR_FIND_CSV).is_file():  # for summary.json's lr_find
        lr_found = LrFindResult.read_csv(run_dir / LR_FIND_CSV, recipe.lr_find.steps, recipe.lr_find.start,
                                         recipe.lr_find.end)
    if splits.skipped:
        _write_skipped(run_dir, splits.skipped)
        log(f"skipped {len(splits.skipped)} unreadable image(s); listed in {run_dir / 'skipped_images.csv'}")
    try:
        state = trainer.fit(resume_from=resume_file)
    except KeyboardInterrupt:
        log("interrupted; the last finished epoch is saved")
        print(f"\nimgtrain: interrupted. Continue with: imgtrain train --resume {run_dir}", file=sys.stderr)
        raise
    summary = dict(state.summary)
    if lr_found is not None:
        summary["lr_find"] = lr_found.summary(recipe.lr_find.suggestion)
    if loaders.test is not None:
        summary.update(_test_best(trainer, loaders.test, run_dir))
    summary["run_dir"] = str(run_dir)
    summary["total_seconds"] = round(time.perf_counter() - started, 3)
    write_summary(run_dir, summary)
    for tracker in trackers:
        if isinstance(tracker, ReportTracker):
            tracker.finish(summary)  # the last draw: with the test numbers
    return TrainResult(run_dir=run_dir, history=state.history, summary=summary, model=trainer.model)


@dataclass
class PreparedData:
    """The data side of a run, as `train` builds it (also what `imgtrain bench-data` measures)."""
    splits: Any                     # DataSplits, the datasets with their per-image transforms set
    loaders: Any                    # Loaders
    img_size: int                   # the side training images are made at
    mean: List[float]
    std: List[float]
    eval_size: int = 0              # the side validation/test images are made at (progressive.eval_size)
    cache: Any = None               # the DecodedCache with data.cache on a file source
    train_batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # device_transforms on
    eval_batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    notes: List[str] = field(default_factory=list)  # lines for train.log


def prepare_data(recipe: Recipe, splits: Any, device: torch.device) -> PreparedData:
    """splits -> decoded cache -> normalization -> per-image and per-batch transforms -> loaders."""
    aug, channels = recipe.augment, splits.channels
    img_size = aug.img_size or splits.native_size
    notes: List[str] = []
    cache = apply_cache(splits, recipe.data, cache_resolution(aug, img_size))
    if cache is not None:
        notes.append(cache.describe())
    elif recipe.data.cache != "off":
        notes.append(f"data.cache: {recipe.data.cache} ignored: {recipe.data.source} images are already "
                     "decoded in memory")
    mean, std = resolve_normalization(aug, splits)
    # images all of one size (in-memory sources, the cache): at that size the pipelines skip resizing
    native = cache.size if cache is not None else (
        splits.native_size if isinstance(splits.train, TensorImageDataset) else None)
    train_batch = eval_batch = None
    # validation and test images: the training size, or progressive.eval_size / its last stage's size
    test_size = eval_size(recipe, img_size)
    if resolve_device_transforms(aug, channels, img_size, device):
        pipelines = build_batch_pipelines(aug, channels, img_size, mean, std, native)
        train_tf, eval_tf = pipelines.train_item, pipelines.eval_item
        train_batch, eval_batch = pipelines.train_batch, pipelines.eval_batch
        if test_size != img_size:
            at_test_size = build_batch_pipelines(aug, channels, test_size, mean, std, native)
            eval_tf, eval_batch = at_test_size.eval_item, at_test_size.eval_batch
        cpu_first = f"; per image on the CPU first: {', '.join(pipelines.cpu_only)}" if pipelines.cpu_only else ""
        notes.append(f"augmentation per batch on {device.type}: {pipelines.train_batch}{cpu_first}")
    else:
        train_tf = build_train_transform(aug, channels, img_size, mean, std, native)
        eval_tf = build_eval_transform(aug, channels, test_size, mean, std, native)
    splits.train = splits.train.with_transform(train_tf)
    splits.val = splits.val.with_transform(eval_tf) if splits.val is not None else None
    splits.test = splits.test.with_transform(eval_tf) if splits.test is not None else None
    return PreparedData(splits=splits, loaders=build_loaders(recipe, splits, device), img_size=img_size,
                        eval_size=test_size,
                        mean=list(mean), std=list(std), cache=cache, train_batch_transform=train_batch,
                        eval_batch_transform=eval_batch, notes=notes)


def _check_not_overwritten(weights: Path, run_dir: Union[str, Path]) -> None:
    """--overwrite deletes the run folder: never the one the starting weights are read from."""
    run_dir = Path(run_dir).resolve()
    if run_dir == weights.resolve() or run_dir in weights.resolve().parents:
        raise RunDirError(f"{run_dir}: --overwrite would delete the starting weights (model.weights: {weights}) "
                          "before they are read; choose another --run-dir, or copy the weights out first")


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
    if best.is_file():
        tensors, _ = load_weights(best)
        trainer.model.load_state_dict(tensors, strict=False)
        result, which = trainer.evaluate(test_loader, model=trainer.forward_model), "best"
    else:  # the validated weights as they are now: the EMA's when there is one
        result, which = trainer.evaluate(test_loader), "final"
    out = {"test_acc": result["acc"], "test_loss": result["loss"],
           "test_balanced_acc": result["balanced_acc"], "test_weights": which}
    if trainer.recipe.eval.tta:  # the same weights again, with the recipe's test-time augmentation
        from imgtrain.evaluation.tta import TTAModel, tta_config_for  # here: imgtrain.evaluation imports api
        settings = tta_config_for(trainer.recipe, True)
        model = trainer.forward_model if which == "best" else trainer.eval_model()
        tta = trainer.evaluate(test_loader, model=TTAModel(model, settings))
        out.update({"test_acc_tta": tta["acc"], "test_loss_tta": tta["loss"],
                    "test_balanced_acc_tta": tta["balanced_acc"], "test_tta": settings.describe()})
    return out


# ----------------------------------------------------------------------------- LR finder

def with_lr(recipe: Recipe, lr: float) -> Recipe:
    """A copy of the recipe with optim.lr set to a number."""
    return dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, lr=lr))


def find_recipe_lr(recipe: Recipe, model: torch.nn.Module, prepared: PreparedData) -> tuple:
    """Run the range test (lr_find.*) on this model and data; (recipe with optim.lr = the chosen
    suggestion, LrFindResult). The model, RNG states and data order are as they were before."""
    # the Trainer's own pieces (loss, autocast, scaler, accumulation, layer-group lr ratios), built
    # at a placeholder peak lr of 1.0; the test sets the lr of every step itself
    probe = with_lr(recipe, 1.0)
    loaders, splits = prepared.loaders, prepared.splits
    data = TrainData(train=loaders.train, val=None, train_generator=loaders.train_generator,
                     classes=splits.classes, train_targets=splits.train.targets,
                     train_batch_transform=prepared.train_batch_transform)
    trainer = Trainer(probe, model, data, Path(probe.output.root), HookList(), checkpoint_metadata={})
    setup = None
    if transfer_enabled(recipe):
        # groups frozen in the first epoch (freeze_backbone, freeze_epochs ...) stay frozen in the test
        hook = TransferHook(recipe.transfer)

        def setup() -> None:
            hook.fit_start(trainer.state)
            hook.epoch_start(trainer.state)
    result = find_lr(trainer, recipe.lr_find, setup=setup)
    return with_lr(recipe, result.suggestions[recipe.lr_find.suggestion]), result


@dataclass
class LrFindRun:
    result: LrFindResult
    out_dir: Path
    files: List[Path]
    suggestion: str                 # lr_find.suggestion: the one optim.lr: find would use


def lr_find(recipe: Recipe, output: Optional[Union[str, Path]] = None, overwrite: bool = False) -> LrFindRun:
    """`imgtrain lr-find`: the range test alone, on the recipe's data and model; writes lr_find.csv,
    lr_find.png and the recipe it ran (config.yaml) to `output` (default: output.root/lr_find/NAME)."""
    out_dir = plan_lr_find_dir(recipe, output, overwrite)
    check_lr_find(recipe)
    seed_everything(recipe.train.seed)
    splits = build_splits(recipe.data)
    check_imbalance_recipe(recipe, splits.classes)
    prepared = prepare_data(recipe, splits, select_device(recipe.train.device))
    model = create_model(recipe.model, num_classes=len(splits.classes), in_chans=splits.channels)
    load_initial_weights(model, recipe.model, num_classes=len(splits.classes), in_chans=splits.channels)
    check_transfer_recipe(model, with_lr(recipe, 1.0))
    _, result = find_recipe_lr(recipe, model, prepared)
    make_run_dir(out_dir)
    dump_recipe(recipe, out_dir / "config.yaml")
    files = result.write(out_dir, chosen=recipe.lr_find.suggestion)
    return LrFindRun(result=result, out_dir=out_dir, files=files, suggestion=recipe.lr_find.suggestion)


def plan_lr_find_dir(recipe: Recipe, output: Optional[Union[str, Path]], overwrite: bool) -> Path:
    """plan_run_dir's rules for lr-find's folder: an automatic name never collides (NAME-2 ...), a
    named non-empty folder needs --overwrite, and --overwrite only replaces an lr-find folder."""
    if output is None:
        base = Path(recipe.output.root) / "lr_find"
        name = recipe.output.name or (Path(recipe.source_file).stem if recipe.source_file else "run")
        out, index = base / name, 2
        while (out.exists() and any(out.iterdir())) and not overwrite:
            out, index = base / f"{name}-{index}", index + 1
    else:
        out = Path(output)
    check_replaceable(out, overwrite, ours=(out / LR_FIND_CSV).is_file(),
                      refuse="folder exists and is not empty; pass --overwrite to replace it, or choose "
                             "another --output",
                      foreign=f"the folder is not an lr-find output (no {LR_FIND_CSV})")
    return out


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
    if meta.get("logit_offset") is not None:  # trained with imbalance.posthoc_adjust
        offset = meta["logit_offset"]
        if len(offset) != meta["num_classes"]:
            raise CheckpointError(f"{path}: logit_offset has {len(offset)} values for {meta['num_classes']} classes")
        model = LogitOffset(model, torch.tensor(offset))
    model.to(device).eval()
    return LoadedModel(model=model, classes=list(meta["classes"]), channels=meta["in_chans"],
                       img_size=meta["img_size"], mean=meta["mean"], std=meta["std"], recipe=recipe, path=path)


__all__ = ["train", "TrainResult", "prepare_data", "PreparedData", "load_recipe", "prepare_run_dir",
           "plan_run_dir", "make_run_dir", "lr_find", "LrFindRun", "find_recipe_lr",
           "RunDirError", "load_trained", "LoadedModel", "resolve_checkpoint", "RecipeError", "RESUME_OVERRIDABLE"]
