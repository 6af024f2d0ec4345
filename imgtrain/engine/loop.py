"""The Trainer: one readable training loop, with the engineering concerns inline.

Device placement, autocast and grad scaling, gradient accumulation, clipping, channels_last and
torch.compile and DDP are all visible here (the choices behind them, such as which precision a device does
well, are in engine/device.py). The Trainer knows no strategy, data source, model or loss by name:
it receives its pieces (`TrainParts`: model, loss function, parameter groups, per-epoch plans, a
loader per batch size) and its hooks, which plug in through the events of engine/events.py, whose
docstring shows this loop as pseudocode. This is the one place that calls backward() and step().
What is saved when (epoch ends, mid-epoch states, a stop signal) is engine/saving.py's `RunSaver`.

Under a process group of several ranks (torchrun) the forward and backward passes run through
DistributedDataParallel, which averages the gradients across ranks; the plain module stays what hooks,
evaluation and checkpoints see. Every rank takes the same decisions: a hook's `stop_training` and a
stop signal are agreed across ranks after each optimizer step and before each epoch (`agree_any`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function

from imgtrain.engine import checkpoint
from imgtrain.engine.device import (
    check_data_parallel,
    compile_model,
    configure_backends,
    data_parallel,
    select_device,
    select_precision,
)
from imgtrain.engine.distributed import (
    DistributedModel,
    ShardedEvalSampler,
    agree_any,
    average_buffers,
    is_distributed,
    sum_across,
    use_sync_batchnorm,
)
from imgtrain.engine.events import HookList
from imgtrain.engine.optim import build_optimizer, build_scheduler
from imgtrain.engine.saving import RunSaver, StopNow, batches_from, rank_epoch_sums
from imgtrain.engine.state import EpochPlan, SizedIterable, TrainState, run_summary
from imgtrain.engine.validate import evaluate_batches


@dataclass
class TrainParts:
    """What the Trainer trains with; api.train builds it from the recipe and the strategies."""
    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> mean loss
    loader_for: Callable[[int], SizedIterable]  # the train loader at a batch size (the plans may change it)
    plans: list[EpochPlan]                   # one per epoch: image size, batch size, lr scale, schedule segment
    classes: list[str]
    val: Iterable | None = None
    # optimizer parameter groups ({"params", "lr"?, "weight_decay"?}); None: every trainable parameter,
    # split into decay / no-decay (engine/optim.py)
    param_groups: list[dict[str, Any]] | None = None
    train_generator: torch.Generator | None = None  # the train loader's; reseeded every epoch
    # applied to each batch right after it reaches the device (batch augmentation and normalisation on
    # the device, data/batch_transforms.py); None when the loader does it all
    train_batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    eval_batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    logit_offset: torch.Tensor | None = None  # added to the logits at evaluation (post-hoc adjustment)


class Trainer:
    """run_dir None: no checkpoints (the LR finder and doctor train without a run folder).
    `run_id` names the run in its training states, so a resume never loads another run's."""

    def __init__(self, recipe: Any, parts: TrainParts, hooks: HookList | None = None,
                 run_dir: Path | None = None, metadata: dict[str, Any] | None = None, run_id: str | None = None):
        cfg = recipe.train
        self._resume_position: dict[str, Any] | None = None  # a mid-epoch state's place in its epoch
        self.recipe, self.parts, self.hooks = recipe, parts, hooks or HookList()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.metadata = dict(metadata or {})
        self.device = select_device(cfg.device)
        configure_backends(self.device, cfg.deterministic, cfg.threads)
        self.amp_dtype, use_scaler = select_precision(cfg.amp, self.device)
        self.model = parts.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.plans = list(parts.plans)
        # compile wraps the module; checkpoints and hooks keep using the plain one
        sizes = len({plan.img_size for plan in self.plans})
        self.forward_model = compile_model(self.model, sizes) if cfg.compile else self.model
        self.distributed = is_distributed()
        # several processes: the training passes run through DDP (rank 0's weights broadcast when it is built,
        # the gradients averaged in backward), rebuilt when the trainable parameters change
        self.ddp: DistributedModel | None = None
        self.train_model = self.forward_model
        if self.distributed:
            if cfg.sync_bn:
                self.model = use_sync_batchnorm(self.model, self.device)
            self.ddp = DistributedModel(self.model, self.device, wrap=(lambda ddp: compile_model(ddp, sizes))
                                        if cfg.compile else None)
            self.train_model = self.ddp.current()
        if cfg.data_parallel:  # one process, every GPU of this machine: each training batch split across them
            check_data_parallel(cfg, self.device)
            self.train_model = data_parallel(self.model, self.device, self.amp_dtype)
        self.train_loaders = {plan.batch_size: parts.loader_for(plan.batch_size) for plan in self.plans}
        self.epoch_batches = [min(len(self.train_loaders[p.batch_size]), cfg.max_steps_per_epoch or 2**62)
                              for p in self.plans]
        self.epoch_steps = [math.ceil(b / cfg.grad_accum_steps) for b in self.epoch_batches]  # optimizer steps
        self.lr_scaled = any(p.lr_scale != 1.0 for p in self.plans)
        optimizer = build_optimizer(self.model, recipe.optim, parts.param_groups)
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]
        scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.state = TrainState(recipe=recipe, run_dir=self.run_dir, device=self.device, model=self.model,
                                optimizer=optimizer, scheduler=None, scaler=scaler,
                                amp_dtype=self.amp_dtype, classes=list(parts.classes), epochs=len(self.plans),
                                steps_per_epoch=self.epoch_batches[0] if self.plans else 0,
                                prepare_batch=self._prepare_batch, note_sink=self.hooks.note,
                                image_sink=self.hooks.image)
        self.state.scheduler = self._build_scheduler(epoch=0)
        self.loss_fn = parts.loss_fn.to(self.device) if isinstance(parts.loss_fn, torch.nn.Module) else parts.loss_fn
        self.logit_offset = parts.logit_offset.to(self.device) if parts.logit_offset is not None else None
        if parts.logit_offset is not None:  # evaluate/predict from a checkpoint add the same offset
            self.metadata["logit_offset"] = [float(v) for v in parts.logit_offset]
        best_mode = recipe.output.best_mode
        if best_mode == "auto":
            best_mode = "min" if "loss" in recipe.output.best_metric else "max"
        self.saver = RunSaver(recipe, self.run_dir, self.hooks, self.metadata, run_id, best_mode)
        if self.distributed:  # a mid-epoch state holds one model: the ranks' statistics merged first
            self.saver.before_save = self._sync_ranks

    # ------------------------------------------------------------------ public

    def fit(self, resume_from: Path | dict[str, Any] | None = None) -> TrainState:
        """Train every planned epoch. `resume_from`: a training state (its file, or as loaded by
        `checkpoint.load_resumable_state`) to continue from, at an epoch end or inside an epoch."""
        state = self.state
        if resume_from is not None:
            self._resume(resume_from)
        state.fit_started = time.perf_counter()
        saver = self.saver
        self.hooks.fire("fit_start", state)
        try:
            with saver.stop_signals() or contextlib.nullcontext():
                while state.epoch < state.epochs and not self._agreed_stop():
                    if saver.stop_requested:  # a signal while the last epoch ended: its checkpoint is saved
                        raise saver.stopped_at_epoch_end(state)
                    self._train_epoch()
                    self.hooks.fire("before_eval", state)
                    if self.distributed and state.eval_model is not None:  # an average's statistics (EMA, SWA)
                        average_buffers(state.eval_model)
                    try:
                        state.epoch_metrics.update(self._validate())
                    except StopNow:
                        raise saver.stop_in_validation(state, self.epoch_batches[state.epoch]) from None
                    self.hooks.fire("eval_end", state)
                    row = {"epoch": state.epoch + 1, **state.epoch_metrics}
                    state.history.append(row)
                    state.wall_seconds_before += row["epoch_seconds"] + row.pop("_val_seconds")
                    # hooks first, so a checkpoint holds their state after this epoch (a patience
                    # counter, a plot's record); a kill in between only loses this epoch
                    saver.check_run_dir()  # before the trackers write into it
                    self.hooks.fire("epoch_end", state)
                    state.epoch += 1
                    saver.epoch_end(state, row, self._saved_model())
        finally:
            saver.signals = None
            state.summary["wall_seconds"] = round(state.fit_seconds_before + time.perf_counter() - state.fit_started, 3)
        state.summary.update(self._summarise())
        self.hooks.fire("fit_end", state)
        return state

    # ------------------------------------------------------------------ one epoch

    def _prepare_batch(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device, non_blocking=True)
        if self.parts.train_batch_transform is not None:
            inputs = self.parts.train_batch_transform(inputs)
        if self.recipe.train.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def _train_epoch(self) -> None:
        state, cfg = self.state, self.recipe.train
        accum, batches = cfg.grad_accum_steps, self.epoch_batches[state.epoch]
        plan, previous = self.plans[state.epoch], self.plans[max(state.epoch - 1, 0)]
        state.train_loader = loader = self.train_loaders[plan.batch_size]
        state.steps_per_epoch = batches
        position, self._resume_position = self._resume_position, None
        if plan.schedule_segment != previous.schedule_segment and position is None:
            state.scheduler = self._build_scheduler(state.epoch)
        self._scale_lr()
        self.model.train()
        if self.parts.train_generator is not None:
            # one seed per epoch: the shuffle and worker seeds of epoch k do not depend on
            # how many epochs ran in this process, so a resumed run draws the same batches
            self.parts.train_generator.manual_seed(cfg.seed * 100_003 + state.epoch)
        start = self._start_epoch_metrics(position)
        assert state.loss_sum is not None and state.correct_sum is not None, "set by _start_epoch_metrics"
        self.hooks.fire("epoch_start", state)
        if self.ddp is not None:  # a hook may have frozen or unfrozen layers
            self.train_model = self.ddp.current()
        state.optimizer.zero_grad(set_to_none=True)
        group: list[tuple[torch.Tensor, torch.Tensor]] = []  # kept only for hooks that replay it
        # closed when the epoch ends, however it ends: the loader's worker processes stop here, not when
        # the garbage collector finds them (DataLoader.__del__ then waits for each worker, seconds, mid-run)
        fetched = labelled(batches_from(loader, start))
        try:
            for batch_index, (inputs, targets) in enumerate(fetched, start=start):
                if batch_index >= batches:
                    break
                state.batch_index = batch_index
                with record_function("imgtrain/to_device"):  # the copy and the batch transforms on the device
                    state.inputs = self._prepare_batch(inputs)
                    state.targets = targets.to(self.device, non_blocking=True)
                self.hooks.fire("batch_start", state)
                # the last accumulation group of an epoch may hold fewer batches: scale by its size
                group_start = batch_index - batch_index % accum
                group_size = min(accum, batches - group_start)
                state.group_end = batch_index - group_start + 1 == group_size
                state.pass_index = 0
                self._forward_backward(group_size)
                assert state.loss is not None and state.outputs is not None, "set by _forward_backward"
                with torch.no_grad():
                    count = state.targets.shape[0]
                    hard = state.targets.argmax(1) if state.targets.ndim == 2 else state.targets
                    state.loss_sum += state.loss.detach().float() * count
                    state.correct_sum += (state.outputs.detach().argmax(1) == hard).sum()
                    state.images_seen += count
                if self.hooks.replays_group:
                    group.append((state.inputs, state.targets))
                if state.group_end:
                    self._replay(group, group_size)
                    group = []
                    self._optimizer_step()
                    if self.distributed:  # a hook's stop on any rank stops every rank at this step
                        (state.stop_training,) = agree_any(state.stop_training)
                    self.saver.after_step(state, batch_index + 1, batches)
                    if state.stop_training:  # a hook ends the run now (the LR finder's divergence)
                        break
        finally:
            fetched.close()
        seconds = time.perf_counter() - state.epoch_start_time
        loss_sum, correct_sum, images = state.loss_sum, state.correct_sum, state.images_seen
        if self.distributed:  # the row is the whole job's: every rank's images
            self._sync_ranks()
            loss_sum, correct_sum = sum_across(loss_sum), sum_across(correct_sum)
            images = int(sum_across(torch.tensor(images, dtype=torch.long)))
        seen = max(images, 1)
        state.epoch_metrics.update({
            "train_loss": loss_sum.item() / seen,
            "train_acc": correct_sum.item() / seen,
            "lr": state.lr,
            "momentum": state.momentum,
            "epoch_seconds": round(seconds, 3),
            "images_per_second": round(images / max(seconds, 1e-9), 1),
        })

    def _start_epoch_metrics(self, position: dict[str, Any] | None) -> int:
        """Zero the epoch's running metrics, or put back those of a mid-epoch state; returns the first
        batch to train (state.resumed_batches tells epoch_start hooks the same)."""
        state = self.state
        if position is None:
            state.epoch_metrics, state.epoch_details = {}, {}
            state.images_seen = 0
            state.loss_sum = torch.zeros((), device=self.device)
            state.correct_sum = torch.zeros((), device=self.device, dtype=torch.long)
            state.epoch_start_time = time.perf_counter()
            state.resumed_batches = 0
            return 0
        state.epoch_metrics, state.epoch_details = dict(position["metrics"]), dict(position["details"])
        state.images_seen = int(position["images_seen"])
        state.loss_sum = position["loss_sum"].to(self.device)
        state.correct_sum = position["correct_sum"].to(self.device)
        state.epoch_start_time = time.perf_counter() - float(position["seconds"])
        state.resumed_batches = int(position["batches_done"])
        if self.distributed:  # each rank continues from its own running sums (engine/saving.py)
            state.images_seen, state.loss_sum, state.correct_sum = rank_epoch_sums(position, self.device)
        return state.resumed_batches

    def _forward_backward(self, group_size: int) -> None:
        """The batch in state.inputs/targets through the model, the loss and backward: the one step."""
        state = self.state
        state.loss_parts = {}
        assert state.targets is not None, "set at batch_start, before the forward pass"
        # DDP: accumulation passes that do not step keep their gradients local (no all-reduce); the group's
        # last pass all-reduces the accumulated sum. no_sync must hold the forward pass as well
        with self.ddp.no_sync(local=not state.group_end) if self.ddp is not None else contextlib.nullcontext():
            self._forward_backward_pass(group_size)

    def _forward_backward_pass(self, group_size: int) -> None:
        state = self.state
        assert state.targets is not None, "set at batch_start, before the forward pass"
        with self._autocast(), record_function("imgtrain/forward"):
            state.outputs = self.train_model(state.inputs)
            self.hooks.fire("after_forward", state)
            state.loss = self.loss_fn(state.outputs, state.targets)
            # inside autocast and before the accumulation division: a hook that adds a term
            # (distillation) runs its own forward in the same precision, on the per-batch scale
            self.hooks.fire("after_loss", state)
        loss = state.loss / group_size
        with record_function("imgtrain/backward"):
            if state.scaler is not None:
                state.scaler.scale(loss).backward()
            else:
                loss.backward()
        self.hooks.fire("after_backward", state)

    def _replay(self, group: list[tuple[torch.Tensor, torch.Tensor]], group_size: int) -> None:
        """Further forward/backward passes over the group's batches, as long as a hook asks for them
        (state.repeat_group at after_backward of the group's last batch: SAM's second pass)."""
        state = self.state
        while state.repeat_group:
            state.repeat_group = False
            state.pass_index += 1
            for position, (inputs, targets) in enumerate(group):
                state.inputs, state.targets = inputs, targets
                state.group_end = position == len(group) - 1
                self._forward_backward(group_size)

    @record_function("imgtrain/optimizer")
    def _optimizer_step(self) -> None:
        state, cfg = self.state, self.recipe.train
        if state.scaler is not None:
            state.scaler.unscale_(state.optimizer)  # clip and hooks see true gradient norms
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
        self.hooks.fire("before_step", state)
        if state.skip_step:
            # a hook found this group's gradients unusable (non-finite): no update, but the
            # schedule still advances so the rest of the run keeps its shape
            state.skip_step = False
            state.skipped_steps += 1
            if state.scaler is not None:
                state.scaler.update()  # unscale_ ran above; without an update the next unscale_ raises
        elif state.scaler is not None:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        self._scale_lr()
        state.step += 1
        self.hooks.fire("after_step", state)

    def _build_scheduler(self, epoch: int) -> Any:
        """The lr schedule over the epochs of the plan segment holding `epoch` (one segment: the whole
        run). Built on the peak lrs, whatever the optimizer's lrs are now."""
        optimizer, plans = self.state.optimizer, self.plans
        if not plans:
            return None
        segment = plans[epoch].schedule_segment
        steps = [self.epoch_steps[e] for e in range(len(plans)) if plans[e].schedule_segment == segment]
        for group, peak in zip(optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak
        return build_scheduler(optimizer, self.recipe.schedule, self.recipe.optim.lr, total_steps=sum(steps),
                               steps_per_epoch=steps[0], epoch_steps=steps if len(set(steps)) > 1 else None)

    def _scale_lr(self) -> None:
        """Plans that change the batch size scale the schedule's lr (lr_scale)."""
        if self.lr_scaled:
            scale = self.plans[min(self.state.epoch, len(self.plans) - 1)].lr_scale
            for group, lr in zip(self.state.optimizer.param_groups, self.state.scheduler.get_last_lr()):
                group["lr"] = lr * scale

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated and saved: an average's (EMA, SWA) when a hook sets state.eval_model."""
        return self.state.eval_model if self.state.eval_model is not None else self.forward_model

    def evaluate(self, loader: Any, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """Loss, accuracy, per-class recall, confusion and worst images of `model` (default: the
        validated weights) on `loader` (engine/validate.py)."""
        model = model if model is not None else self.eval_model()
        # several processes: each rank evaluates its shard; the offset places its images in the whole set
        sampler = getattr(loader, "sampler", None)
        offset = sampler.offset if isinstance(sampler, ShardedEvalSampler) else 0
        result = evaluate_batches(model, self._eval_batches(loader), self.parts.classes, self.device,
                                  self._autocast, self.logit_offset, index_offset=offset)
        if model is not self.forward_model or self.state.eval_model is not None:
            self.model.train()  # an averaged copy was evaluated: the trained model stays as it was
        return result

    def _eval_batches(self, loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, targets in loader:
            # several processes: no stop inside validation, whose collectives every rank must reach; the
            # signal is agreed and honoured after it, at the epoch-end checkpoint (_agreed_stop)
            if self.saver.stop_requested and not self.distributed:
                raise StopNow
            inputs = inputs.to(self.device, non_blocking=True)
            if self.parts.eval_batch_transform is not None:
                inputs = self.parts.eval_batch_transform(inputs)
            if self.recipe.train.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            yield inputs, targets.to(self.device, non_blocking=True)

    def _validate(self) -> dict[str, Any]:
        if self.parts.val is None:
            return {"_val_seconds": 0.0}
        result = self.evaluate(self.parts.val)
        self.state.val_per_class_recall = result["per_class_recall"]
        self.state.val_confusion, self.state.val_worst = result["confusion"], result["worst"]
        return {"val_loss": result["loss"], "val_acc": result["acc"], "val_balanced_acc": result["balanced_acc"],
                "_val_seconds": result["seconds"]}

    # ------------------------------------------------------------------ checkpoints and resume

    def _sync_ranks(self) -> None:
        """Several processes, every rank at the same point (an epoch's end, before a mid-epoch state is
        saved): BatchNorm's statistics, gathered per process, averaged, so every rank holds the model that
        is saved; then the hooks merge what they kept per process (the `sync_ranks` event)."""
        average_buffers(self.model)
        if self.state.eval_model is not None:
            average_buffers(self.state.eval_model)
        self.hooks.fire("sync_ranks", self.state)

    def _agreed_stop(self) -> bool:
        """state.stop_training, and under several processes a stop signal, agreed by every rank."""
        if self.distributed:
            (self.state.stop_training,) = agree_any(self.state.stop_training)
            self.saver.agree_signal()
        return self.state.stop_training

    def _saved_model(self) -> torch.nn.Module:
        """The validated weights (an average's when there is one) without a torch.compile wrapper."""
        model = self.state.eval_model if self.state.eval_model is not None else self.model
        return getattr(model, "_orig_mod", model)

    def _resume(self, source: Path | dict[str, Any]) -> None:
        saved = source if isinstance(source, dict) else checkpoint.load_training_state(Path(source))
        self.model.load_state_dict(saved["model"])
        position = saved.get("mid_epoch")
        # the epoch whose schedule the saved scheduler state belongs to: the one under way, or the last finished
        epoch = saved["epoch"] if position is not None else saved["epoch"] - 1
        if epoch > 0 and self.plans[epoch].schedule_segment != self.plans[0].schedule_segment:
            # built before the optimizer's lrs are restored, since building one sets them
            self.state.scheduler = self._build_scheduler(epoch)
        self.saver.best_mode = checkpoint.restore_training_state(self.state, saved, self.hooks)
        self._resume_position = position

    def _summarise(self) -> dict[str, Any]:
        return run_summary(self.state, self.recipe.output.best_metric, self.amp_dtype)


def labelled(batches: Iterable) -> Generator:
    """The loader's batches, each fetch inside the profiler range `imgtrain/data` (`imgtrain profile`; the
    ranges cost microseconds when no profiler runs); closing it stops the epoch's loader workers."""
    iterator = iter(batches)
    try:
        while True:
            with record_function("imgtrain/data"):
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            yield batch
    finally:
        # an epoch's own iterator with worker processes (a train loader makes one per epoch): stop them now;
        # a persistent loader's iterator (the loader keeps it for the next epoch) stays
        if hasattr(iterator, "_shutdown_workers") and getattr(batches, "_iterator", None) is not iterator:
            iterator._shutdown_workers()
