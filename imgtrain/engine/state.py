"""`TrainState`: everything the loop knows, handed to every hook at every event.

Hooks read it (trackers) or change it (strategies: replace `inputs`, `targets` or
`loss`, set `stop_training`). Fields are grouped by how long they live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from imgtrain.engine.device import peak_memory_mb


class SizedIterable(Protocol):
    """What a train loader must be: iterable, with a length in batches (a DataLoader)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains with (progressive resizing plans several; a plain run repeats one)."""
    stage: int                # 0-based stage (a ramp: one stage per distinct size)
    img_size: int             # training image side, pixels
    batch_size: int           # images per step
    lr_scale: float = 1.0     # multiplies the schedule's learning rate
    schedule_segment: int = 0  # epochs of one segment share one lr schedule (a new segment restarts it)


@dataclass
class TrainState:
    # --- the whole run
    recipe: Any                                  # imgtrain.config.Recipe
    run_dir: Path | None                      # None: no run folder (the LR finder, doctor)
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any                               # torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None             # None: full precision
    classes: list[str]
    epochs: int                                  # total epochs of the run
    steps_per_epoch: int                         # batches per epoch (after max_steps_per_epoch)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    best_value: float | None = None           # of recipe.output.best_metric
    best_epoch: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)        # filled at fit_end
    stop_training: bool = False                  # a hook sets it to end after this epoch
    wall_seconds_before: float = 0.0             # training time spent before a resume
    fit_seconds_before: float = 0.0              # wall time of fit in the processes before a resume
    fit_started: float = 0.0                     # perf_counter() when this process's fit started
    eval_model: torch.nn.Module | None = None  # validated and saved instead of `model` (an EMA)
    val_per_class_recall: dict[str, Any] = field(default_factory=dict)  # of the last validation
    val_confusion: list[list[int]] | None = None  # of the last validation; rows: true class
    val_worst: list[dict[str, Any]] = field(default_factory=list)  # its highest-loss images: index, loss
    epoch_details: dict[str, Any] = field(default_factory=dict)  # per-epoch values too wide for history.csv

    # --- the current epoch (epoch is 0-based; history rows say epoch + 1)
    epoch: int = 0
    epoch_start_time: float = 0.0
    images_seen: int = 0                         # training images this epoch so far
    loss_sum: torch.Tensor | None = None      # sum of per-image loss this epoch (on device)
    correct_sum: torch.Tensor | None = None   # correct top-1 this epoch (on device)
    epoch_metrics: dict[str, Any] = field(default_factory=dict)  # the history row being built
    # batches of this epoch trained before a mid-epoch resume (0 otherwise): an epoch_start hook that
    # sets up per-epoch work keeps what its restored state already holds when this is > 0
    resumed_batches: int = 0

    # --- the current batch
    step: int = 0                                # optimizer steps taken in the whole run
    batch_index: int = 0                         # within the epoch
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    loss: torch.Tensor | None = None          # this batch's loss (the loop divides it for accumulation)
    loss_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named terms of `loss` (e.g. ce, kd), per batch
    skip_step: bool = False                      # a hook sets it: the next optimizer step is not taken
    skipped_steps: int = 0                       # optimizer steps skipped so far in the run
    # a hook sets it at after_backward of a group's last batch: the loop replays the accumulation
    # group's batches (as batch_start left them) through forward and backward once more before the
    # optimizer step (sharpness-aware minimisation's second pass); pass_index says which pass runs
    repeat_group: bool = False
    pass_index: int = 0
    group_end: bool = False                      # this batch completes an accumulation group

    # --- what hooks may use to read data the way the loop does
    train_loader: Any = None                     # this epoch's train loader
    # a loader's input batch -> on the device, batch-transformed, in the model's memory format
    prepare_batch: Callable[[torch.Tensor], torch.Tensor] | None = None
    # where note() lines go (train.log, events.jsonl): set by the Trainer to its hooks' on_note
    note_sink: Callable[[str, str | None, dict[str, Any]], None] | None = None
    # where log_image() images go (the experiment trackers): set by the Trainer to its hooks' on_image
    image_sink: Callable[[str, Any, int], None] | None = None

    def note(self, message: str, event: str | None = None, **fields: Any) -> None:
        """A line for the run's log (train.log), and a record in events.jsonl when `event` is given:
        how a strategy reports what it did without knowing the trackers."""
        if self.note_sink is not None:
            self.note_sink(message, event, fields)

    def log_metric(self, name: str, value: Any) -> None:
        """A metric of your own for this epoch's history row: history.csv, events.jsonl and every experiment
        tracker get it at the epoch's end, at the epoch's optimizer step. Call it during the epoch or at
        eval_end/epoch_end (hooks run before the trackers); the last value of an epoch wins."""
        if not isinstance(name, str) or not name or name == "epoch" or name.startswith("_"):
            raise ValueError(f"log_metric: a metric name is a non-empty string that is not 'epoch' and does not "
                             f"start with '_', got {name!r}")
        if hasattr(value, "item") and callable(value.item):  # a 0-d tensor or numpy scalar
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"log_metric({name!r}): the value must be a number, got {type(value).__name__}")
        self.epoch_metrics[name] = value
        # at epoch_end the loop has already appended this epoch's row (epochs are 1-based there)
        if self.history and self.history[-1].get("epoch") == self.epoch + 1:
            self.history[-1][name] = value

    def log_image(self, name: str, image: Any) -> None:
        """An image for the experiment trackers (TensorBoard, MLflow, W&B) at the current optimizer step:
        a uint8 (H, W, C) or (C, H, W) array or tensor, or a matplotlib Figure. Rendered and written off the
        training thread; without trackers it goes nowhere."""
        if self.image_sink is not None:
            self.image_sink(name, image, self.step)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def momentum(self) -> float:
        """SGD momentum or Adam's beta1 of the first param group (0 when neither)."""
        group = self.optimizer.param_groups[0]
        if "betas" in group:
            return float(group["betas"][0])
        return float(group.get("momentum", 0.0))


def run_summary(state: TrainState, best_metric: str, amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """summary.json's training numbers, from the history and the state at the end of fit."""
    rows = state.history
    summary: dict[str, Any] = {"epochs_run": len(rows), "best_epoch": state.best_epoch,
                               "best_metric": best_metric, "best_value": state.best_value}
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
    summary["device"] = str(state.device)
    summary["amp"] = str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
    summary.update(peak_memory_mb(state.device))
    return summary
