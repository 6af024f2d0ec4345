"""The Python API: what the CLI calls, usable from a notebook or a script.

    import imgtrain
    recipe = imgtrain.load_recipe("configs/quickstart.yaml", ["train.epochs=3"])
    result = imgtrain.train(recipe)
    result.run_dir, result.history[-1]["val_acc"], result.summary["test_acc"]
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from imgtrain.config import Recipe, RecipeError, dump_recipe, duration_seconds, load_recipe
from imgtrain.data import DataError, build_splits
from imgtrain.data.bad_images import LoaderBadImages, watch_loader_files
from imgtrain.data.loaders import Loaders, stop_loader_workers, with_batch_size
from imgtrain.data.prepare import PreparedData, seed_everything
from imgtrain.data.prepare import prepare_data as prepare_plain_data
from imgtrain.data.samplers import shard_train_loader
from imgtrain.engine.checkpoint import (
    has_training_state,
    load_agreed_state,
    load_weights,
    new_run_info,
    read_run_info,
    write_run_info,
)
from imgtrain.engine.device import check_data_parallel, select_device
from imgtrain.engine.distributed import (
    DEFAULT_TIMEOUT_SECONDS,
    ShardedEvalSampler,
    barrier,
    broadcast_from_main,
    close_distributed,
    init_distributed,
    process_group_ready,
    world_info,
)
from imgtrain.engine.events import Hook, HookList
from imgtrain.engine.loop import Trainer, TrainParts
from imgtrain.engine.optim import LrScaling, peak_lr, scale_lr
from imgtrain.engine.preemption import TrainingPreempted
from imgtrain.engine.state import EpochPlan
from imgtrain.evaluation.teachers import load_teachers
from imgtrain.evaluation.tta import TTAModel, tta_config_for
from imgtrain.io import RunDirError, check_replaceable, looks_like_run, make_run_dir
from imgtrain.losses import build_train_loss, check_imbalance_recipe, eval_logit_offset
from imgtrain.models import check_input_size, count_parameters, create_model
from imgtrain.models.trained import LoadedModel, load_trained, resolve_checkpoint
from imgtrain.models.weights import load_initial_weights, resolve_weights_source
from imgtrain.strategies import StrategyContext, check_strategies, enabled_strategies
from imgtrain.strategies.budget import BudgetPlan, BudgetWatch, measure_speed, plan_for_budget, scale_stages
from imgtrain.strategies.lr_finder import CSV_NAME as LR_FIND_CSV
from imgtrain.strategies.lr_finder import LrFindResult, find_lr
from imgtrain.tracking import ReportInputs, ReportTracker, TrainLogTracker, build_trackers, read_summary, write_summary
from imgtrain.tracking.external import check_trackers

# keys that may change when resuming: how the run is executed, never what it computes
RESUME_OVERRIDABLE = ("train.device", "train.threads", "train.checkpoint_every.steps",
                      "train.checkpoint_every.minutes", "train.auto_resume", "data.workers", "data.pin_memory",
                      "data.prefetch_factor", "data.persistent_workers", "data.cache_dir",
                      "output.progress", "output.plots", "output.report",
                      # how a run is watched; skip lets a run stopped on a nan loss step over it
                      "diagnostics.grad_monitor_every", "diagnostics.vanishing_below",
                      "diagnostics.exploding_above", "diagnostics.nonfinite",
                      "diagnostics.nonfinite_check_every", "diagnostics.max_skipped_steps",
                      # more epochs than the run was planned with: a finished run is extended (README)
                      "train.epochs")


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    model: torch.nn.Module          # holds the best weights when a test split was evaluated


# ----------------------------------------------------------------------------- run folders

def plan_run_dir(recipe: Recipe, run_dir: str | Path | None, overwrite: bool) -> Path:
    """The run folder a new run will use; raises RunDirError when it may not. Touches nothing."""
    if run_dir is None:
        run_dir = auto_run_dir(recipe, None)
        if recipe.output.name is None and run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            # an automatic name never collides: quickstart, quickstart-2, quickstart-3 ...
            index = 2
            while run_dir.with_name(f"{run_dir.name}-{index}").exists():
                index += 1
            run_dir = run_dir.with_name(f"{run_dir.name}-{index}")
    run_dir = Path(run_dir)
    check_replaceable(run_dir, overwrite, ours=looks_like_run(run_dir),
                      refuse=f"run folder exists and is not empty; pass --overwrite to replace it, --resume "
                             f"{run_dir} to continue it, or choose another --run-dir",
                      foreign="the folder is not an imgtrain run (no config.yaml or checkpoints/)")
    return run_dir


def prepare_run_dir(recipe: Recipe, run_dir: str | Path | None, overwrite: bool) -> Path:
    """Create the run folder; never reuse a non-empty one unless `overwrite` (and it is a run)."""
    return make_run_dir(plan_run_dir(recipe, run_dir, overwrite))


# ----------------------------------------------------------------------------- training

def train(recipe: Recipe, run_dir: str | Path | None = None, resume: str | Path | None = None,
          overwrite: bool = False, console: Any = None, hooks: Sequence[Hook] = (),
          clock_started: float | None = None) -> TrainResult:
    """Train from a recipe; returns the run folder, the history and the summary.

    `resume=RUN_DIR` continues that run in place from its last training state (an epoch end, or a batch
    inside an epoch); a finished run is left as it is, unless `recipe.train.epochs` asks for more epochs
    than it was planned with (then they are added as a new schedule segment). `resume="auto"` (or
    `train.auto_resume: true`) resumes the recipe's run folder when it holds a training state and starts
    it otherwise. `hooks` (your `imgtrain.Hook`s) run on every event of the loop, after the recipe's
    strategies and before the trackers. `clock_started` (a `time.perf_counter()` value, default: now) is
    when `train.budget`'s clock started; the command line passes the moment it imported imgtrain.

    Started by torchrun (WORLD_SIZE > 1), every process calls this: each trains on its share of every
    epoch under DDP, and only rank 0 writes the run folder (README: "Several GPUs or machines")."""
    world_size = world_info()[1]
    if world_size <= 1:
        return _train(recipe, run_dir, resume, overwrite, console, hooks, clock_started)
    check_distributed_recipe(recipe, world_size)  # what this slice of DDP does not support yet, refused
    check_restartable(recipe, resume, int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")))
    owns_group = not process_group_ready()  # a group the caller made is the caller's to close
    init_distributed(select_device(recipe.train.device), DEFAULT_TIMEOUT_SECONDS)
    # a failing rank ends the job (torchrun)
    result = _train(recipe, run_dir, resume, overwrite, console, hooks, clock_started)
    if owns_group:
        barrier()  # no rank leaves while another still talks to it (gloo aborts a process whose peer vanished)
        close_distributed()
    return result


def _train(recipe: Recipe, run_dir: str | Path | None, resume: str | Path | None, overwrite: bool, console: Any,
           hooks: Sequence[Hook], clock_started: float | None = None) -> TrainResult:
    started = time.perf_counter() if clock_started is None else clock_started
    rank, world_size, _ = world_info()
    main = rank == 0
    if resume == "auto" or (resume is None and recipe.train.auto_resume):
        run_dir = auto_run_dir(recipe, run_dir)
        # rank 0's look at the folder decides for every rank (one that saw no state would start it again)
        resume = run_dir if broadcast_from_main(has_training_state(run_dir)) else None
        overwrite = overwrite or looks_like_run(run_dir)  # a run that never saved a state: start it again
    resume_file: dict[str, Any] | None = None  # the training state a resume continues from
    warnings: list[str] = []
    if resume is not None:
        run_dir = Path(resume)
        run_info = read_run_info(run_dir)
        # every rank loads the state rank 0 chose (each rank's own RNG states and BatchNorm statistics in it)
        resume_file, state_path, warnings = load_agreed_state(run_dir / "checkpoints", run_info.get("run_id"))
        for line in warnings:
            print(f"imgtrain: warning: {line}; resuming from {state_path} instead", file=sys.stderr)
        if recipe.train.budget is not None:  # the plan the run made, not the recipe's upper bound
            recipe = with_budget_epochs(recipe, load_recipe(run_dir / "config.yaml"))
        run_info, extended = _planned_segments(run_info, recipe, run_dir, resume_file)
        if not extended and _finished(run_dir, resume_file):
            return _finished_result(run_dir, resume_file)
        if recipe.optim.lr == "find":  # the lr the run chose is in its config.yaml
            recipe = with_lr(recipe, peak_lr(load_recipe(run_dir / "config.yaml").optim))
        _check_same_lr_scaling(run_info, scale_lr(recipe.optim, recipe.data.batch_size, recipe.train.grad_accum_steps,
                                                  world_size), run_dir)  # before the data is read
    else:
        # only planned: every check below runs before the folder is made, so bad input leaves no folder
        # behind and --overwrite deletes the old run only once the new one is ready to start
        run_dir = plan_run_dir(recipe, run_dir, overwrite)
        weights = resolve_weights_source(recipe.model)  # a wrong model.weights stops before data is read
        if overwrite and weights is not None and weights.path is not None:
            _check_not_overwritten(weights.path, run_dir)
        run_info = new_run_info(recipe.train.epochs)
    check_strategies(recipe)  # cross-section checks of every enabled strategy, before the data is read
    check_trackers(recipe)  # a tracker's package is missing: say which extra to install, before any work
    check_lr_scaling(recipe)
    check_data_parallel(recipe.train, select_device(recipe.train.device))
    seed_everything(recipe.train.seed)
    splits = build_splits(recipe.data)
    # before anything reads the images: the normalisation statistics, the LR finder, loader workers
    loader_bad_images = watch_loader_files(splits)
    check_imbalance_recipe(recipe, splits.classes)  # class weight list vs the data's classes
    device = select_device(recipe.train.device)
    context = StrategyContext(recipe=recipe, classes=list(splits.classes), channels=splits.channels,
                              img_size=recipe.augment.img_size or splits.native_size, device=device, splits=splits)
    context.plans = plan_segments(recipe, context, run_info["segments"])
    prepared = prepare_data(recipe, splits, device)
    bad_image_watch = None if loader_bad_images is None else LoaderBadImageWatch(loader_bad_images, recipe.data,
                                                                                  run_dir, main)
    if bad_image_watch is not None and recipe.data.on_bad_image == "error":
        bad_image_watch.check(None, "while the data was prepared (normalisation statistics)")
    if world_size > 1:
        prepared = dataclasses.replace(prepared, loaders=shard_loaders(prepared.loaders, rank, world_size))
    context.loaders, context.mean, context.std = prepared.loaders, prepared.mean, prepared.std
    context.notes = prepared.notes
    model = create_model(recipe.model, num_classes=len(splits.classes), in_chans=splits.channels)
    check_input_size(model, recipe.model.name, splits.channels,
                     {plan.img_size for plan in context.plans} | {prepared.img_size, prepared.eval_size})
    # starting weights only for a new run: a resumed one continues from its own checkpoint
    weights_report = None if resume_file is not None else load_initial_weights(
        model, recipe.model, num_classes=len(splits.classes), in_chans=splits.channels)
    context.model = model
    # optim.lr: find: the range test runs here (and puts the weights back); from here on the recipe
    # holds the lr it chose, so config.yaml, the checkpoints and a --resume have that number
    lr_found = None
    if recipe.optim.lr == "find" and resume_file is not None:  # the lr the run chose is in its config.yaml
        recipe = with_lr(recipe, peak_lr(load_recipe(run_dir / "config.yaml").optim))
    elif recipe.optim.lr == "find":
        # several processes: every rank runs the range test under DDP (the global batch), rank 0 chooses
        recipe, lr_found = broadcast_from_main(find_recipe_lr(recipe, model, prepared))
    # optim.lr_scaling: `recipe` stays as written (config.yaml, the checkpoints' metadata), `trained` holds the
    # lrs scaled to the global batch; everything that builds the optimizer, its groups or the schedule gets it
    scaling = scale_lr(recipe.optim, recipe.data.batch_size, recipe.train.grad_accum_steps, world_size)
    run_info["lr_scaling"] = scaling.record()
    trained = with_scaled_lrs(recipe, scaling)
    context.recipe = trained
    if recipe.distill.teacher is not None:  # loaded and checked against the data's classes before the run starts
        context.teacher = load_teachers(recipe, splits.classes, prepared.mean, prepared.std)
    context.clock_started = started
    if recipe.train.budget is not None:
        if resume_file is None:  # measure, plan, and train for the epochs that fit
            plan = plan_budget(trained, model, prepared, context, started)
            recipe, trained = (with_budget_epochs(r, None, plan.epochs, plan.stages) for r in (recipe, trained))
            context.recipe, run_info["segments"], run_info["budget"] = trained, [plan.epochs], plan.record()
            context.plans = plan_segments(trained, context, run_info["segments"])
            context.budget_plan = plan
            context.notes.append(plan.describe())
            if main:  # the plan replaces train.epochs: never silently
                print(f"imgtrain: {plan.describe()}", file=console if console is not None else sys.stderr)
        else:
            context.budget_plan = BudgetPlan.from_record(run_info.get("budget") or {}, recipe.train.budget)
    strategies = [hook for strategy in enabled_strategies(trained) for hook in strategy.build(trained, context)]
    metadata = {
        "model": {"name": recipe.model.name, "kwargs": recipe.model.kwargs, "drop_rate": recipe.model.drop_rate},
        "num_classes": len(splits.classes), "in_chans": splits.channels, "classes": list(splits.classes),
        "img_size": prepared.eval_size, "mean": list(prepared.mean), "std": list(prepared.std),
        "crop_pct": recipe.augment.crop_pct, "recipe": recipe.to_dict(),
    }
    # every rank has planned the run folder from the same files: only now may rank 0 change them
    barrier()
    if main:
        if resume_file is None:
            make_run_dir(run_dir)
        dump_recipe(recipe, run_dir / "config.yaml")  # a resume may have extended train.epochs
        write_run_info(run_dir, run_info)
    loaders = context.loaders
    report_inputs = ReportInputs(val_dataset=loaders.val.dataset if loaders.val is not None else None,
                                 mean=prepared.mean, std=prepared.std,
                                 eval_batch_transform=prepared.eval_batch_transform)
    # rank 0 alone tracks (files, console, TensorBoard ...); the numbers are the same on every rank
    trackers = build_trackers(recipe, run_dir, console_stream=console, report_inputs=report_inputs) if main else []
    if world_size > 1:
        # every rank built the same splits and model from train.seed; from here each draws its own
        # augmentation and dropout (DDP starts every rank from rank 0's weights)
        seed_everything(rank_seed(recipe.train.seed, rank))
    if bad_image_watch is not None:  # first: a bad file is dealt with before any strategy uses the batch
        strategies.insert(0, bad_image_watch)
    trainer = Trainer(trained, train_parts(trained, model, prepared, context.plans),
                      HookList(strategies=[*strategies, *hooks], trackers=trackers), run_dir, metadata,
                      run_id=run_info["run_id"])
    log = _tracker_logger(trackers)
    for line in warnings:
        log(f"warning: {line}; resumed from the state before it")
    log(f"data: {len(splits.train)} train, {len(splits.val) if splits.val is not None else 0} val, "
        f"{len(splits.test) if splits.test is not None else 0} test images, {len(splits.classes)} classes, "
        f"{splits.channels} channel(s), {prepared.img_size} px; model {recipe.model.name} "
        f"({count_parameters(model):,} parameters)")
    log(scaling.describe())
    if scaling.scaled_lr != scaling.lr and main:  # on the console too: the lr the run trains with is not the recipe's
        print(f"imgtrain: {scaling.describe()}", file=console if console is not None else sys.stderr)
    for line in weights_report.lines() if weights_report is not None else []:
        log(line)
    for line in weights_report.changes() if weights_report is not None and main else []:
        # on the console too: a new random head is why the first epochs' accuracy starts near chance
        print(f"imgtrain: {line}", file=console if console is not None else sys.stderr)
    for line in context.notes:
        log(line)
    if lr_found is not None:
        if main:
            lr_found.write(run_dir, chosen=recipe.lr_find.suggestion)
        for line in lr_found.lines(recipe.lr_find.suggestion):
            log(line)
    elif resume_file is not None and (run_dir / LR_FIND_CSV).is_file():  # for summary.json's lr_find
        lr_found = LrFindResult.read_csv(run_dir / LR_FIND_CSV, recipe.lr_find.steps, recipe.lr_find.start,
                                         recipe.lr_find.end)
    if splits.skipped and main:
        _write_skipped(run_dir, splits.skipped)
        log(f"skipped {len(splits.skipped)} unreadable image(s); listed in {run_dir / 'skipped_images.csv'}")
    try:
        state = trainer.fit(resume_from=resume_file)
    except TrainingPreempted as stop:
        if main:  # several processes: one message, with the command that resumes them all
            nproc = f" --nproc {world_size}" if world_size > 1 else ""
            print(f"\nimgtrain: {stop}. Continue with: imgtrain train --resume {run_dir}{nproc}", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        log("interrupted; the last saved training state is kept")
        print(f"\nimgtrain: interrupted. Continue with: imgtrain train --resume {run_dir}", file=sys.stderr)
        raise
    summary = dict(state.summary)
    summary["lr_scaling"] = scaling.record()
    if lr_found is not None:
        summary["lr_find"] = lr_found.summary(recipe.lr_find.suggestion)
    if loaders.test is not None:
        barrier()  # rank 0 has written best.safetensors: every rank tests the same weights
        summary.update(_test_best(trainer, loaders.test, run_dir))
        if bad_image_watch is not None:
            bad_image_watch.check(trainer.state, "while the best weights were tested")
    if loader_bad_images is not None:
        loader_bad_images.close()
    stop_loader_workers(loaders.train, loaders.val, loaders.test)
    for hook in strategies:
        if isinstance(hook, BudgetWatch):  # the budget used, the test pass included
            summary["budget"] = {**run_info.get("budget", {}), "used_seconds": hook.reading()}
    summary["run_dir"] = str(run_dir)
    # with the time of the processes before a resume (their fit; their start-up is not saved)
    summary["total_seconds"] = round(state.fit_seconds_before + time.perf_counter() - started, 3)
    if main:
        write_summary(run_dir, summary)
    for tracker in trackers:
        if isinstance(tracker, ReportTracker):
            tracker.finish(summary)  # the last draw: with the test numbers
    return TrainResult(run_dir=run_dir, history=state.history, summary=summary, model=trainer.model)


def check_distributed_recipe(recipe: Recipe, world_size: int) -> None:
    """Refuse what training under several processes cannot do: a RecipeError naming the key, before any
    process starts (with --nproc), instead of a run whose ranks disagree or hang. A strategy says what it
    cannot do there in its registry entry (Strategy.unsupported_across_processes)."""
    where = f"under {world_size} processes (torchrun / --nproc)"
    for strategy in enabled_strategies(recipe):
        key = strategy.unsupported_across_processes(recipe)
        if key is not None:
            raise RecipeError(f"{strategy.name} ({strategy.section}.*) cannot train {where}; turn it off, or "
                              "train in one process", key=key)
    if recipe.train.sync_bn and select_device(recipe.train.device).type != "cuda":
        raise RecipeError(f"train.sync_bn needs CUDA GPUs: torch's SyncBatchNorm does not run on the CPU. Leave "
                          f"it off {where} on the CPU: BatchNorm statistics are then averaged across the "
                          "processes at each epoch end", key="train.sync_bn")
    if recipe.train.data_parallel:
        raise RecipeError(f"train.data_parallel is one process on several GPUs; {where} each process already has "
                          "a GPU of its own (DDP). Set train.data_parallel=false", key="train.data_parallel")


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s global generators under several processes: its own augmentation draws, the
    same for the same world size (rank 0 keeps train.seed)."""
    return seed + 1_000_003 * rank


def check_restartable(recipe: Recipe, resume: str | Path | None, max_restarts: int) -> None:
    """torchrun --max-restarts N (N > 0) starts the same command again after a process fails: it must
    resume the run (`--resume auto`, `train.auto_resume: true` or `--resume RUN_DIR`), or each restart
    would start a new run from scratch (in a `-2` folder, or refused: the folder exists)."""
    if max_restarts > 0 and resume is None and not recipe.train.auto_resume:
        raise RecipeError(f"restarts ({max_restarts}) are allowed, but a restart of this command would start "
                          "the run again from scratch: add --resume auto (or train.auto_resume=true), so that "
                          "each restart continues from the last training state", key="train.auto_resume")


def shard_loaders(loaders: Loaders, rank: int, world_size: int) -> Loaders:
    """The loaders of one rank: its interleaved share of every epoch's draws from the train sampler (the
    same on every rank, data/samplers.py shard_train_loader; a streaming source's LitData loader deals
    each rank its own chunks) and its contiguous, unpadded share of val and test (ShardedEvalSampler:
    every image counted once). data.batch_size stays per process."""
    train: Any = loaders.train

    def sharded(loader: DataLoader | None) -> DataLoader | None:
        if loader is None:
            return None
        workers, images = loader.num_workers, loader.dataset
        assert isinstance(images, Sized), "the evaluation splits are map-style datasets of known length"
        return DataLoader(images, batch_size=loader.batch_size,
                          sampler=ShardedEvalSampler(len(images), rank, world_size), num_workers=workers,
                          pin_memory=loader.pin_memory, prefetch_factor=loader.prefetch_factor if workers else None,
                          persistent_workers=loader.persistent_workers)

    if getattr(train, "shards_by_rank", False):  # data.source streaming: LitData deals each rank its chunks
        return dataclasses.replace(loaders, val=sharded(loaders.val), test=sharded(loaders.test))
    return dataclasses.replace(loaders, train=shard_train_loader(train, rank, world_size),
                               val=sharded(loaders.val), test=sharded(loaders.test))


def auto_run_dir(recipe: Recipe, run_dir: str | Path | None) -> Path:
    """The recipe's own run folder: --run-dir, else output.root / (output.name or the recipe's name). A new
    run moves on to `-2`, `-3` ... when it is taken (plan_run_dir); `--resume auto` never does, so rerunning
    the same command finds the same run."""
    if run_dir is not None:
        return Path(run_dir)
    return Path(recipe.output.root) / (recipe.output.name or (Path(recipe.source_file).stem if recipe.source_file
                                                              else "run"))


def _planned_segments(info: dict[str, Any], recipe: Recipe, run_dir: Path,
                      saved: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """run.json's schedule segments, with one more (and True) when the resumed recipe asks for more epochs."""
    if not info:  # a run from before run.json: one segment, the epochs its config.yaml planned
        info = {"run_id": saved.get("run_id"), "segments": [load_recipe(run_dir / "config.yaml").train.epochs]}
    planned = sum(info["segments"])
    if recipe.train.epochs < planned:
        raise RecipeError(f"train.epochs {recipe.train.epochs}: the run is planned for {planned} epochs; a resume "
                          "can add epochs, not remove them", key="train.epochs")
    if recipe.train.epochs == planned:
        return info, False
    return {**info, "segments": [*info["segments"], recipe.train.epochs - planned]}, True


def _finished(run_dir: Path, saved: dict[str, Any]) -> bool:
    """The state is the run's final one: saved at an epoch end, with summary.json written after it (all
    epochs, or fewer when early stopping ended the run)."""
    if saved.get("mid_epoch") is not None or not (run_dir / "summary.json").is_file():
        return False
    return read_summary(run_dir).get("epochs_run") == saved["epoch"]


def _finished_result(run_dir: Path, saved: dict[str, Any]) -> TrainResult:
    summary = read_summary(run_dir)
    print(f"imgtrain: {run_dir} already finished ({summary.get('epochs_run')} epochs); nothing to do. To train it "
          f"longer: imgtrain train --resume {run_dir} train.epochs=N (N > {summary.get('epochs_run')})",
          file=sys.stderr)
    return TrainResult(run_dir=run_dir, history=list(saved["history"]), summary=summary,
                       model=load_trained(run_dir).model)


def with_budget_epochs(recipe: Recipe, planned: Recipe | None, epochs: int = 0,
                       stages: list[dict[str, Any]] | None = None) -> Recipe:
    """`recipe` with the epochs (and progressive stages) a time budget planned: given, or those of the
    run's config.yaml (`planned`, on a resume)."""
    if planned is not None:
        epochs, stages = planned.train.epochs, planned.progressive.stages or None
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, epochs=epochs))
    if stages:
        recipe = dataclasses.replace(recipe, progressive=dataclasses.replace(recipe.progressive, stages=stages))
    return recipe


def test_passes(recipe: Recipe) -> int:
    """Passes over the test split at the end of a run: the plain one, plus eval.tta's views (each a pass)."""
    return 1 + (tta_config_for(recipe, True).passes if recipe.eval.tta else 0)


def plan_budget(recipe: Recipe, model: torch.nn.Module, prepared: PreparedData, context: StrategyContext,
                started: float) -> BudgetPlan:
    """train.budget: measure this model's speed on this data (strategies/budget.py, everything put back)
    and plan the epochs that fit in what is left; under several processes rank 0's plan is every rank's."""
    rank, world_size, _ = world_info()
    parts = train_parts(recipe, model, prepared, context.plans)
    speed = measure_speed(recipe, parts, context, enabled_strategies(recipe))
    batch = recipe.data.batch_size
    epoch_images = min(len(parts.loader_for(batch)), recipe.train.max_steps_per_epoch or 2**62) * batch
    splits = prepared.splits
    stages = recipe.progressive.stages or None

    def sizes_for(epochs: int) -> list[int]:
        planned = with_budget_epochs(recipe, None, epochs, scale_stages(stages, epochs) if stages else None)
        return [plan.img_size for plan in plan_segments(planned, context, [epochs])]

    def share(images: int) -> int:  # each process evaluates its share
        return math.ceil(images / world_size)

    outcome: tuple[str, Any] = ("", None)
    if rank == 0:
        try:
            outcome = ("plan", plan_for_budget(
                duration_seconds(str(recipe.train.budget)), time.perf_counter() - started, speed, epoch_images,
                share(len(splits.val)) if splits.val is not None else 0,
                # the test pass runs once plainly and, with eval.tta, once more per view
                share(len(splits.test)) * test_passes(recipe) if splits.test is not None else 0,
                max_epochs=recipe.train.epochs, stages=stages, sizes_for=sizes_for))
        except RecipeError as exc:  # every rank stops with the message, none waits for a plan
            outcome = ("error", str(exc))  # "train.budget: ..." already
    kind, value = broadcast_from_main(outcome)
    if kind == "error":
        raise RecipeError(value)
    return value


def plan_segments(recipe: Recipe, context: StrategyContext, segments: list[int]) -> list[EpochPlan]:
    """The epochs' plans: the recipe's for the first segment, then each added segment repeats the last
    plan on a new schedule segment (the lr schedule starts again from the current weights)."""
    first = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, epochs=segments[0]))
    plans = plan_epochs(first, context)
    for extra in segments[1:]:
        last = plans[-1]
        plans = [*plans, *[dataclasses.replace(last, schedule_segment=last.schedule_segment + 1)] * extra]
    return plans


def plan_epochs(recipe: Recipe, context: StrategyContext) -> list[EpochPlan]:
    """One plan per epoch: the first enabled strategy that plans epochs (progressive resizing), else
    the recipe's image and batch size every epoch."""
    plans = (strategy.plan_epochs(recipe, context) for strategy in enabled_strategies(recipe))
    default = [EpochPlan(0, context.img_size, recipe.data.batch_size)] * recipe.train.epochs
    return next((plan for plan in plans if plan is not None), default)


def param_groups(recipe: Recipe, model: torch.nn.Module) -> list[dict[str, Any]] | None:
    """The optimizer's parameter groups: the first enabled strategy that sets them (transfer's
    per-layer-group lrs), else None (the plain decay / no-decay groups)."""
    answers = (strategy.param_groups(recipe, model) for strategy in enabled_strategies(recipe))
    return next((groups for groups in answers if groups is not None), None)


def train_parts(recipe: Recipe, model: torch.nn.Module, prepared: PreparedData,
                plans: list[EpochPlan]) -> TrainParts:
    """What the Trainer takes, built from the recipe: loss, parameter groups, loaders, plans."""
    splits, loaders = prepared.splits, prepared.loaders
    targets = splits.train.targets
    loaders_by_size = {recipe.data.batch_size: loaders.train}

    def loader_for(batch_size: int) -> Any:
        # a plan with another batch size (progressive stages) gets its own loader over the same sampler
        if batch_size not in loaders_by_size:
            loaders_by_size[batch_size] = with_batch_size(loaders.train, batch_size)
        return loaders_by_size[batch_size]

    return TrainParts(model=model, loss_fn=build_train_loss(recipe, targets, len(splits.classes)),
                      loader_for=loader_for, plans=plans, classes=list(splits.classes), val=loaders.val,
                      param_groups=param_groups(recipe, model), train_generator=loaders.train_generator,
                      train_batch_transform=prepared.train_batch_transform,
                      eval_batch_transform=prepared.eval_batch_transform,
                      # imbalance.posthoc_adjust: -tau*log(prior) added to the logits at evaluation
                      logit_offset=eval_logit_offset(recipe, targets, len(splits.classes)))


def prepare_data(recipe: Recipe, splits: Any, device: torch.device) -> PreparedData:
    """data/prepare.py's prepare_data with what the recipe's strategies change about the data: the
    evaluation size (progressive resizing) and dropping the last incomplete batch (mixing)."""
    img_size = recipe.augment.img_size or splits.native_size
    sizes = [size for strategy in enabled_strategies(recipe) if (size := strategy.eval_size(recipe, img_size))]
    return prepare_plain_data(recipe, splits, device, eval_size=sizes[0] if sizes else None,
                              drop_last=any(s.drops_last_batch(recipe) for s in enabled_strategies(recipe)))


def _check_not_overwritten(weights: Path, run_dir: str | Path) -> None:
    """--overwrite deletes the run folder: never the one the starting weights are read from."""
    run_dir = Path(run_dir).resolve()
    if run_dir == weights.resolve() or run_dir in weights.resolve().parents:
        raise RunDirError(f"{run_dir}: --overwrite would delete the starting weights (model.weights: {weights}) "
                          "before they are read; choose another --run-dir, or copy the weights out first")


def _tracker_logger(trackers: Sequence[Any]) -> Any:
    return next((tracker.log for tracker in trackers if isinstance(tracker, TrainLogTracker)), lambda message: None)


def _write_skipped(run_dir: Path, skipped: Sequence[tuple], append: bool = False) -> None:
    file = run_dir / "skipped_images.csv"
    header = not (append and file.is_file())
    with open(file, "a" if append else "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(["path", "reason"])
        writer.writerows(skipped)


class LoaderBadImageWatch(Hook):
    """data.on_bad_image for the files the loader fails to decode during the run (data/bad_images.py: the
    loader recorded the file and served the next one of its split). Checked before every step and after
    every evaluation: `error` stops the run before a step or a checkpoint uses the replaced batch, so the
    last saved training state stays the run's; `skip` appends the file to skipped_images.csv (rank 0)
    and notes it in train.log and events.jsonl, and training goes on."""

    name = "bad_images"

    def __init__(self, record: LoaderBadImages, data: Any, run_dir: Path, main: bool):
        self.record, self.data, self.run_dir, self.main = record, data, run_dir, main
        self.seen: set[str] = set()

    def batch_start(self, state: Any) -> None:
        self.check(state, f"in epoch {state.epoch + 1}, batch {state.batch_index + 1}")

    def eval_end(self, state: Any) -> None:
        self.check(state, f"in the validation after epoch {state.epoch + 1}")

    def check(self, state: Any, where: str) -> None:
        """Apply data.on_bad_image to the files recorded since the last check (`where`: for the message)."""
        new = []
        for path, reason in self.record.new_records():
            if path not in self.seen:
                self.seen.add(path)
                new.append((path, reason))
        if not new:
            return
        if self.data.on_bad_image == "error":
            path, reason = new[0]
            if state is None:  # before training: nothing of the run is written yet
                stopped, then = "before training started", "then run the same command again"
            elif not has_training_state(self.run_dir):
                stopped = "before any step used it, in its first epoch: no training state was saved yet"
                then = "then start it again (the same command with --overwrite)"
            else:
                stopped = f"before any step used it: the last saved training state in {self.run_dir} is intact"
                then = f"then continue with `imgtrain train --resume {self.run_dir}`"
            raise DataError(f"{path}: {reason}. The loader met this file {where}; the start-up scan (data.verify: "
                            f"{self.data.verify}) had passed it. data.on_bad_image: error stopped the run {stopped}. "
                            f"Fix or replace the file, {then}; or train with data.on_bad_image: skip (such a file is "
                            "replaced by the next one of its split and listed in skipped_images.csv). "
                            "`imgtrain scan RECIPE` decodes every file and lists the bad ones")
        if self.main:
            _write_skipped(self.run_dir, new, append=True)
        for path, reason in new:
            state.note(f"skipped an unreadable image the loader met {where}: {path}: {reason}; the next "
                       "file of its split took its place; listed in skipped_images.csv",
                       event="bad_image", path=path, reason=reason)


def _test_best(trainer: Trainer, test_loader: Any, run_dir: Path) -> dict[str, Any]:
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
        settings = tta_config_for(trainer.recipe, True)
        model = trainer.forward_model if which == "best" else trainer.eval_model()
        tta = trainer.evaluate(test_loader, model=TTAModel(model, settings))
        out.update({"test_acc_tta": tta["acc"], "test_loss_tta": tta["loss"],
                    "test_balanced_acc_tta": tta["balanced_acc"], "test_tta": settings.describe()})
    return out


# ----------------------------------------------------------------------------- lr scaling

def check_lr_scaling(recipe: Recipe) -> None:
    """optim.lr: find measures the lr at the batch the run trains with (the global batch, under several
    processes: every process runs the range test): that lr needs no scaling, and scaling it would count the
    batch twice."""
    if recipe.optim.lr == "find" and recipe.optim.lr_scaling != "none":
        raise RecipeError(f"optim.lr_scaling {recipe.optim.lr_scaling} with optim.lr: find: the LR finder measures "
                          "the lr at the global batch this run trains with (data.batch_size x processes x "
                          "train.grad_accum_steps), so there is nothing to scale; set optim.lr_scaling: none",
                          file=recipe.source_file, key="optim.lr_scaling")


def with_scaled_lrs(recipe: Recipe, scaling: LrScaling) -> Recipe:
    """The recipe as it trains under optim.lr_scaling: every lr it writes (optim.lr, schedule.min_lr,
    swa.lr, transfer.group_lrs, progressive.stages[].lr) times the same factor, since all were tuned for the
    reference batch; lr_scaling none in the copy, so nothing scales it again. The recipe itself when the
    factor is 1."""
    if scaling.scaled_lr == scaling.lr:
        return recipe
    factor = scaling.scaled_lr / scaling.lr
    group_lrs = recipe.transfer.group_lrs
    stages = [{**stage, "lr": stage["lr"] * factor} if stage.get("lr") is not None else stage
              for stage in recipe.progressive.stages]
    return dataclasses.replace(
        recipe,
        optim=dataclasses.replace(recipe.optim, lr=scaling.scaled_lr, lr_scaling="none", reference_batch=None),
        schedule=dataclasses.replace(recipe.schedule, min_lr=recipe.schedule.min_lr * factor),
        swa=dataclasses.replace(recipe.swa, lr=recipe.swa.lr * factor if recipe.swa.lr is not None else None),
        transfer=dataclasses.replace(recipe.transfer, group_lrs=[lr * factor for lr in group_lrs]
                                     if group_lrs is not None else None),
        progressive=dataclasses.replace(recipe.progressive, stages=stages))


def _check_same_lr_scaling(run_info: dict[str, Any], scaling: LrScaling, run_dir: Path) -> None:
    """A resume continues the optimizer and schedule saved at the lr the run started with: under another
    number of processes, optim.lr_scaling would ask for another lr, which the restored schedule would
    silently ignore. Refused; under none (or the same global batch) the lr is the same and any count goes."""
    before = run_info.get("lr_scaling")
    if not isinstance(before, dict) or before.get("scaled_lr") == scaling.scaled_lr:
        return
    raise RecipeError(f"--resume {run_dir}: the run started under {before.get('processes')} process(es), a global "
                      f"batch of {before.get('global_batch')} and optim.lr_scaling {before.get('rule')} "
                      f"(lr {before.get('scaled_lr'):g}); under {scaling.processes} its lr would be "
                      f"{scaling.scaled_lr:g}. Resume it with {before.get('processes')} process(es) "
                      f"(--nproc {before.get('processes')}, or torchrun --nproc-per-node)", key="optim.lr_scaling")


# ----------------------------------------------------------------------------- LR finder

def with_lr(recipe: Recipe, lr: float) -> Recipe:
    """A copy of the recipe with optim.lr set to a number."""
    return dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, lr=lr))


def find_recipe_lr(recipe: Recipe, model: torch.nn.Module, prepared: PreparedData) -> tuple[Recipe, LrFindResult]:
    """Run the range test (lr_find.*) on this model and data; (recipe with optim.lr = the chosen
    suggestion, LrFindResult). The model, RNG states and data order are as they were before."""
    # the Trainer's own pieces at a placeholder peak lr of 1.0 (the test sets every step's lr), on batches
    # of data.batch_size at the data's size whatever the first progressive stage says, as `imgtrain lr-find`
    probe = with_lr(recipe, 1.0)
    parts = train_parts(probe, model, prepared, [EpochPlan(0, prepared.img_size, recipe.data.batch_size)])
    # layers frozen in the first epoch (transfer.freeze_backbone, freeze_epochs ...) stay frozen in the test
    context = StrategyContext(recipe=probe, classes=parts.classes, channels=prepared.splits.channels,
                              img_size=prepared.img_size, device=select_device(recipe.train.device), model=model)
    freezing = [hook for strategy in enabled_strategies(probe) if strategy.in_lr_find
                for hook in strategy.build(probe, context)]
    result = find_lr(probe, parts, recipe.lr_find, hooks=freezing)
    return with_lr(recipe, result.suggestions[recipe.lr_find.suggestion]), result


@dataclass
class LrFindRun:
    result: LrFindResult
    out_dir: Path
    files: list[Path]
    suggestion: str                 # lr_find.suggestion: the one optim.lr: find would use


def lr_find(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False) -> LrFindRun:
    """`imgtrain lr-find`: the range test alone, on the recipe's data and model; writes lr_find.csv,
    lr_find.png and the recipe it ran (config.yaml) to `output` (default: output.root/lr_find/NAME)."""
    out_dir = plan_lr_find_dir(recipe, output, overwrite)
    check_strategies(recipe)
    seed_everything(recipe.train.seed)
    splits = build_splits(recipe.data)
    check_imbalance_recipe(recipe, splits.classes)
    prepared = prepare_data(recipe, splits, select_device(recipe.train.device))
    model = create_model(recipe.model, num_classes=len(splits.classes), in_chans=splits.channels)
    load_initial_weights(model, recipe.model, num_classes=len(splits.classes), in_chans=splits.channels)
    _, result = find_recipe_lr(recipe, model, prepared)
    make_run_dir(out_dir)
    dump_recipe(recipe, out_dir / "config.yaml")
    files = result.write(out_dir, chosen=recipe.lr_find.suggestion)
    return LrFindRun(result=result, out_dir=out_dir, files=files, suggestion=recipe.lr_find.suggestion)


def plan_lr_find_dir(recipe: Recipe, output: str | Path | None, overwrite: bool) -> Path:
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


__all__ = ["train", "TrainResult", "train_parts", "prepare_data", "PreparedData", "load_recipe", "prepare_run_dir",
           "plan_run_dir", "make_run_dir", "lr_find", "LrFindRun", "find_recipe_lr", "seed_everything",
           "RunDirError", "load_trained", "LoadedModel", "resolve_checkpoint", "RecipeError", "RESUME_OVERRIDABLE",
           "check_distributed_recipe", "check_restartable", "check_lr_scaling", "rank_seed", "shard_loaders",
           "with_scaled_lrs"]
