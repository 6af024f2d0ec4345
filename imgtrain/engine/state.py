"""`TrainState`: everything the loop knows, handed to every hook at every event.

Hooks read it (trackers) or change it (strategies: replace `inputs`, `targets` or
`loss`, set `stop_training`). Fields are grouped by how long they live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch


@dataclass
class TrainState:
    # --- the whole run
    recipe: Any                                  # imgtrain.config.Recipe
    run_dir: Path
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any                               # torch.optim.lr_scheduler.LRScheduler
    scaler: Optional[torch.amp.GradScaler]
    amp_dtype: Optional[torch.dtype]             # None: full precision
    classes: List[str]
    epochs: int                                  # total epochs of the run
    steps_per_epoch: int                         # batches per epoch (after max_steps_per_epoch)
    history: List[Dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    best_value: Optional[float] = None           # of recipe.output.best_metric
    best_epoch: Optional[int] = None
    summary: Dict[str, Any] = field(default_factory=dict)        # filled at fit_end
    stop_training: bool = False                  # a hook sets it to end after this epoch
    wall_seconds_before: float = 0.0             # training time spent before a resume
    eval_model: Optional[torch.nn.Module] = None  # validated and saved instead of `model` (an EMA)
    val_per_class_recall: Dict[str, Any] = field(default_factory=dict)  # of the last validation
    val_confusion: Optional[List[List[int]]] = None  # of the last validation; rows: true class
    val_worst: List[Dict[str, Any]] = field(default_factory=list)  # its highest-loss images: index, loss
    epoch_details: Dict[str, Any] = field(default_factory=dict)  # per-epoch values too wide for history.csv

    # --- the current epoch (epoch is 0-based; history rows say epoch + 1)
    epoch: int = 0
    epoch_start_time: float = 0.0
    images_seen: int = 0                         # training images this epoch so far
    loss_sum: Optional[torch.Tensor] = None      # sum of per-image loss this epoch (on device)
    correct_sum: Optional[torch.Tensor] = None   # correct top-1 this epoch (on device)
    epoch_metrics: Dict[str, Any] = field(default_factory=dict)  # the history row being built

    # --- the current batch
    step: int = 0                                # optimizer steps taken in the whole run
    batch_index: int = 0                         # within the epoch
    inputs: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    outputs: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None          # this batch's loss (the loop divides it for accumulation)
    loss_parts: Dict[str, torch.Tensor] = field(default_factory=dict)  # named terms of `loss` (e.g. ce, kd), per batch
    skip_step: bool = False                      # a hook sets it: the next optimizer step is not taken
    skipped_steps: int = 0                       # optimizer steps skipped so far in the run

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
