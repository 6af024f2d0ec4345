"""The Trainer: one readable training loop, with the engineering concerns inline.

Device placement, autocast and grad scaling, gradient accumulation, clipping,
channels_last and torch.compile are all visible here (the choices behind them, such as which
precision a device does well, are in engine/device.py); strategies plug in through the
events of engine/events.py, whose docstring shows this loop as pseudocode.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from imgtrain.engine.checkpoint import (capture_rng_state, load_training_state, restore_rng_state,
                                        save_training_state, save_weights)
from imgtrain.engine.device import (compile_model, configure_backends, peak_memory_mb, select_device,
                                    select_precision)
from imgtrain.engine.events import HookList
from imgtrain.engine.optim import build_optimizer, build_scheduler
from imgtrain.engine.state import TrainState
from imgtrain.data.loaders import with_batch_size
from imgtrain.losses import build_train_loss, eval_logit_offset
from imgtrain.strategies.progressive import EpochPlan
from imgtrain.strategies.transfer import transfer_param_groups

WORST_KEPT = 16  # validation images of highest loss kept per evaluation (the report's gallery)

# ----------------------------------------------------------------------------- the trainer

@dataclass
class TrainData:
    """What the loop reads: loaders, the train loader's generator (reseeded every epoch)."""
    train: Any
    val: Any
    train_generator: Optional[torch.Generator]
    classes: List[str]
    # applied to each batch right after it reaches the device (batch augmentation and
    # normalisation on the GPU, data/batch_transforms.py); None when the loader does it all
    train_batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    eval_batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    train_targets: Optional[torch.Tensor] = None   # labels of the training split (class weights)
    # per epoch: image size, batch size, lr scale (progressive resizing); None: data.batch_size throughout
    epoch_plans: Optional[List[EpochPlan]] = None


class Trainer:
    def __init__(self, recipe: Any, model: torch.nn.Module, data: TrainData, run_dir: Path,
                 hooks: HookList, checkpoint_metadata: Dict[str, Any]):
        cfg = recipe.train
        self.recipe, self.data, self.run_dir, self.hooks = recipe, data, Path(run_dir), hooks
        self.metadata = checkpoint_metadata
        self.device = select_device(cfg.device)
        configure_backends(self.device, cfg.deterministic, cfg.threads)
        self.amp_dtype, use_scaler = select_precision(cfg.amp, self.device)
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # compile wraps the module; checkpoints and hooks keep using the plain one
        # the batch size (so the loader and the batches per epoch) may change between epochs
        # (progressive resizing's stages); everything below is planned per epoch up front
        self.plans = data.epoch_plans or [EpochPlan(0, 0, recipe.data.batch_size, 1.0)] * cfg.epochs
        sizes = len({plan.img_size for plan in self.plans})
        self.forward_model = compile_model(self.model, sizes) if cfg.compile else self.model
        self.train_loaders = {recipe.data.batch_size: data.train}
        for plan in self.plans:
            if plan.batch_size not in self.train_loaders:
                self.train_loaders[plan.batch_size] = with_batch_size(data.train, plan.batch_size)
        self.epoch_batches = [min(len(self.train_loaders[p.batch_size]), cfg.max_steps_per_epoch or math.inf)
                              for p in self.plans]
        self.epoch_steps = [math.ceil(b / cfg.grad_accum_steps) for b in self.epoch_batches]  # optimizer steps
        self.lr_scaled = any(p.lr_scale != 1.0 for p in self.plans)
        # transfer.*: per-layer-group learning rates (None: the plain decay / no-decay groups)
        optimizer = build_optimizer(self.model, recipe.optim, transfer_param_groups(self.model, recipe))
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]
        scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.state = TrainState(recipe=recipe, run_dir=self.run_dir, device=self.device, model=self.model,
                                optimizer=optimizer, scheduler=None, scaler=scaler,
                                amp_dtype=self.amp_dtype, classes=list(data.classes), epochs=cfg.epochs,
                                steps_per_epoch=self.epoch_batches[0])
        self.state.scheduler = self._build_scheduler(epoch=0)
        targets = data.train_targets if data.train_targets is not None else torch.zeros(0, dtype=torch.long)
        self.train_loss = build_train_loss(recipe, targets, len(data.classes)).to(self.device)
        # imbalance.posthoc_adjust: -tau*log(prior) added to the logits at evaluation, and kept in the
        # checkpoint's metadata so evaluate/predict from a checkpoint see the same adjusted logits
        offset = eval_logit_offset(recipe, targets, len(data.classes))
        self.logit_offset = offset.to(self.device) if offset is not None else None
        if offset is not None:
            self.metadata["logit_offset"] = [float(v) for v in offset]
        self.best_mode = recipe.output.best_mode
        if self.best_mode == "auto":
            self.best_mode = "min" if "loss" in recipe.output.best_metric else "max"

    # ------------------------------------------------------------------ public

    def fit(self, resume_from: Optional[Path] = None) -> TrainState:
        state = self.state
        if resume_from is not None:
            self._resume(Path(resume_from))
        fit_started = time.perf_counter()
        self.hooks.fire("fit_start", state)
        try:
            while state.epoch < state.epochs and not state.stop_training:
                self._train_epoch()
                state.epoch_metrics.update(self._validate())
                self.hooks.fire("eval_end", state)
                row = {"epoch": state.epoch + 1, **state.epoch_metrics}
                state.history.append(row)
                state.wall_seconds_before += row["epoch_seconds"] + row.pop("_val_seconds")
                # hooks first, so a checkpoint holds their state after this epoch (a patience
                # counter, a plot's record); a kill in between only loses this epoch
                self.hooks.fire("epoch_end", state)
                state.epoch += 1
                self._save_checkpoints(row)
        finally:
            state.summary["wall_seconds"] = round(time.perf_counter() - fit_started, 3)
        state.summary.update(self._summarise())
        self.hooks.fire("fit_end", state)
        return state

    # ------------------------------------------------------------------ one epoch

    def _train_epoch(self) -> None:
        state, cfg = self.state, self.recipe.train
        model, optimizer, scaler = self.forward_model, state.optimizer, state.scaler
        accum, batches = cfg.grad_accum_steps, self.epoch_batches[state.epoch]
        plan, previous = self.plans[state.epoch], self.plans[max(state.epoch - 1, 0)]
        loader = self.train_loaders[plan.batch_size]
        state.steps_per_epoch = batches
        if self.recipe.progressive.schedule == "restart" and plan.stage != previous.stage:
            state.scheduler = self._build_scheduler(state.epoch)
        self._scale_lr()
        self.model.train()
        if self.data.train_generator is not None:
            # one seed per epoch: the shuffle and worker seeds of epoch k do not depend on
            # how many epochs ran in this process, so a resumed run draws the same batches
            self.data.train_generator.manual_seed(cfg.seed * 100_003 + state.epoch)
        state.epoch_metrics, state.epoch_details = {}, {}
        state.images_seen = 0
        state.loss_sum = torch.zeros((), device=self.device)
        state.correct_sum = torch.zeros((), device=self.device, dtype=torch.long)
        state.epoch_start_time = time.perf_counter()
        self.hooks.fire("epoch_start", state)
        autocast = self._autocast()
        optimizer.zero_grad(set_to_none=True)
        for batch_index, (inputs, targets) in enumerate(loader):
            if batch_index >= batches:
                break
            state.batch_index = batch_index
            state.inputs = inputs.to(self.device, non_blocking=True)
            state.targets = targets.to(self.device, non_blocking=True)
            if self.data.train_batch_transform is not None:
                state.inputs = self.data.train_batch_transform(state.inputs)
            if cfg.channels_last:
                state.inputs = state.inputs.contiguous(memory_format=torch.channels_last)
            self.hooks.fire("batch_start", state)
            # the last accumulation group of an epoch may hold fewer batches: scale by its size
            group_start = batch_index - batch_index % accum
            group_size = min(accum, batches - group_start)
            state.loss_parts = {}
            with autocast:
                state.outputs = model(state.inputs)
                self.hooks.fire("after_forward", state)
                state.loss = self.train_loss(state.outputs, state.targets)
                # inside autocast and before the accumulation division: a hook that adds a
                # term (distillation) runs its own forward in the same precision, on the
                # per-batch scale
                self.hooks.fire("after_loss", state)
            loss = state.loss / group_size
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            self.hooks.fire("after_backward", state)
            with torch.no_grad():
                count = state.targets.shape[0]
                hard = state.targets.argmax(1) if state.targets.ndim == 2 else state.targets
                state.loss_sum += state.loss.detach().float() * count
                state.correct_sum += (state.outputs.detach().argmax(1) == hard).sum()
                state.images_seen += count
            if batch_index - group_start + 1 == group_size:
                self._optimizer_step()
        seconds = time.perf_counter() - state.epoch_start_time
        seen = max(state.images_seen, 1)
        state.epoch_metrics.update({
            "train_loss": state.loss_sum.item() / seen,
            "train_acc": state.correct_sum.item() / seen,
            "lr": state.lr,
            "momentum": state.momentum,
            "epoch_seconds": round(seconds, 3),
            "images_per_second": round(state.images_seen / max(seconds, 1e-9), 1),
        })

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
        """The lr schedule: one over the whole run, or (progressive.schedule: restart) one over the
        stage holding `epoch`. Built on the peak lrs, whatever the optimizer's lrs are now."""
        optimizer, plans = self.state.optimizer, self.plans
        epochs = range(len(plans))
        if self.recipe.progressive.schedule == "restart":
            epochs = [e for e in epochs if plans[e].stage == plans[epoch].stage]
        steps = [self.epoch_steps[e] for e in epochs]
        for group, peak in zip(optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak
        return build_scheduler(optimizer, self.recipe.schedule, self.recipe.optim.lr, total_steps=sum(steps),
                               steps_per_epoch=steps[0], epoch_steps=steps if len(set(steps)) > 1 else None)

    def _scale_lr(self) -> None:
        """Progressive stages that change the batch size scale the schedule's lr (lr_scale)."""
        if self.lr_scaled:
            scale = self.plans[min(self.state.epoch, len(self.plans) - 1)].lr_scale
            for group, lr in zip(self.state.optimizer.param_groups, self.state.scheduler.get_last_lr()):
                group["lr"] = lr * scale

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated and saved: an EMA's when a hook sets state.eval_model."""
        return self.state.eval_model if self.state.eval_model is not None else self.forward_model

    @torch.no_grad()
    def evaluate(self, loader: Any, model: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
        """Mean cross-entropy (no smoothing), top-1 and balanced accuracy, per-class recall, the
        confusion matrix (rows: true class) and the WORST_KEPT images of highest loss (their
        index in the loader's order: for the report's worst-classified gallery)."""
        model = model if model is not None else self.eval_model()
        model.eval()
        started = time.perf_counter()
        classes = len(self.data.classes)
        loss_sum = torch.zeros((), device=self.device)
        confusion = torch.zeros(classes * classes, device=self.device, dtype=torch.long)
        worst_loss = torch.zeros(0, device=self.device)
        worst_index = torch.zeros(0, device=self.device, dtype=torch.long)
        offset = 0
        for inputs, targets in loader:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.data.eval_batch_transform is not None:
                inputs = self.data.eval_batch_transform(inputs)
            if self.recipe.train.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                outputs = model(inputs)
            if self.logit_offset is not None:
                outputs = outputs.float() + self.logit_offset
            losses = F.cross_entropy(outputs.float(), targets, reduction="none")
            loss_sum += losses.sum()
            confusion += torch.bincount(targets * classes + outputs.argmax(1), minlength=classes * classes)
            # a running top-k on the device: no host sync per batch
            worst_loss, keep = torch.cat([worst_loss, losses]).topk(min(WORST_KEPT, len(worst_loss) + len(losses)))
            worst_index = torch.cat([worst_index, offset + torch.arange(len(losses), device=self.device)])[keep]
            offset += len(losses)
        if model is not self.forward_model or self.state.eval_model is not None:
            self.model.train()  # an EMA copy was evaluated: the trained model stays as it was
        matrix = confusion.view(classes, classes).cpu()
        total, correct = matrix.sum(dim=1), matrix.diagonal()
        seen = max(int(total.sum()), 1)
        present = total > 0
        recall = torch.where(present, correct.double() / total.clamp_min(1), torch.zeros(()))
        return {"loss": loss_sum.item() / seen, "acc": int(correct.sum()) / seen,
                "balanced_acc": float(recall[present].mean()) if present.any() else 0.0,
                "per_class_recall": {c: (float(r) if p else None)
                                     for c, r, p in zip(self.data.classes, recall, present)},
                "confusion": matrix.tolist(),
                "worst": [{"index": int(i), "loss": float(v)} for i, v in zip(worst_index.cpu(), worst_loss.cpu())],
                "seconds": time.perf_counter() - started}

    def _validate(self) -> Dict[str, Any]:
        if self.data.val is None:
            return {"_val_seconds": 0.0}
        result = self.evaluate(self.data.val)
        self.state.val_per_class_recall = result["per_class_recall"]
        self.state.val_confusion, self.state.val_worst = result["confusion"], result["worst"]
        return {"val_loss": result["loss"], "val_acc": result["acc"], "val_balanced_acc": result["balanced_acc"],
                "_val_seconds": result["seconds"]}

    # ------------------------------------------------------------------ checkpoints and resume

    def _is_better(self, value: float) -> bool:
        best = self.state.best_value
        if best is None or math.isnan(best):
            return True
        return value > best if self.best_mode == "max" else value < best

    def _save_checkpoints(self, row: Dict[str, Any]) -> None:
        state, out = self.state, self.recipe.output
        ckpt_dir = self.run_dir / "checkpoints"
        metric = out.best_metric if out.best_metric in row else "train_loss"
        if metric != out.best_metric:
            self.best_mode = "min"  # no val split: the best epoch is the one with the lowest train loss
        value = float(row[metric])
        meta = dict(self.metadata, epoch=row["epoch"], metrics={k: v for k, v in row.items() if k != "epoch"})
        if not math.isnan(value) and self._is_better(value):
            state.best_value, state.best_epoch = value, row["epoch"]
            if out.save_best:
                save_weights(self._saved_model(), ckpt_dir / "best.safetensors", meta)
        if out.save_last:
            save_weights(self._saved_model(), ckpt_dir / "last.safetensors", meta)
            save_training_state(ckpt_dir / "last.state.pt", self._training_state())

    def _saved_model(self) -> torch.nn.Module:
        """The validated weights (an EMA's when there is one) without a torch.compile wrapper."""
        model = self.state.eval_model if self.state.eval_model is not None else self.model
        return getattr(model, "_orig_mod", model)

    def _training_state(self) -> Dict[str, Any]:
        state = self.state
        return {
            "format": 1,
            "epoch": state.epoch,             # epochs finished = the next epoch to run
            "step": state.step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "rng": capture_rng_state(),
            "history": state.history,
            "best_value": state.best_value,
            "best_epoch": state.best_epoch,
            "best_mode": self.best_mode,
            "wall_seconds_before": state.wall_seconds_before,
            "skipped_steps": state.skipped_steps,
            "hooks": self.hooks.state_dict(),
        }

    def _resume(self, path: Path) -> None:
        saved = load_training_state(path)
        state = self.state
        self.model.load_state_dict(saved["model"])
        if self.recipe.progressive.schedule == "restart" and saved["epoch"] > 0:
            # the stage schedule of the last finished epoch; built before the optimizer's lrs are
            # restored, since building one sets them
            state.scheduler = self._build_scheduler(saved["epoch"] - 1)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        if state.scaler is not None and saved["scaler"] is not None:
            state.scaler.load_state_dict(saved["scaler"])
        self.hooks.load_state_dict(saved["hooks"])
        state.epoch, state.step = saved["epoch"], saved["step"]
        state.history = list(saved["history"])
        state.best_value, state.best_epoch = saved["best_value"], saved["best_epoch"]
        self.best_mode = saved["best_mode"]
        state.wall_seconds_before = saved["wall_seconds_before"]
        state.skipped_steps = int(saved.get("skipped_steps", 0))
        restore_rng_state(saved["rng"])  # last: everything above may have drawn random numbers

    def _summarise(self) -> Dict[str, Any]:
        state = self.state
        rows = state.history
        summary: Dict[str, Any] = {"epochs_run": len(rows), "best_epoch": state.best_epoch,
                                   "best_metric": self.recipe.output.best_metric,
                                   "best_value": state.best_value}
        if rows and "val_acc" in rows[-1]:
            summary["best_val_acc"] = max(r["val_acc"] for r in rows)
            summary["final_val_acc"] = rows[-1]["val_acc"]
        if rows:
            summary["final_train_loss"] = rows[-1]["train_loss"]
            total_images = sum(r["images_per_second"] * r["epoch_seconds"] for r in rows)
            summary["images_per_second"] = round(total_images / max(sum(r["epoch_seconds"] for r in rows), 1e-9), 1)
        summary["training_seconds"] = round(state.wall_seconds_before, 3)
        if state.skipped_steps:
            summary["skipped_steps"] = state.skipped_steps
        summary["device"] = str(self.device)
        summary["amp"] = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"
        summary.update(peak_memory_mb(self.device))
        return summary
