"""TensorBoard: `run_dir/tensorboard/`, one event file per process, through `torch.utils.tensorboard`.

Scalars per epoch at the optimizer step, the resolved recipe in the hparams plugin of the same run (so the
HPARAMS tab lists this run with its val_acc and losses), images under `val/` and your own tags. A resumed
run writes into the same folder with `purge_step` one past the step it resumed from: whatever a killed
process logged after its last training state is hidden, so no step appears twice.
View: `tensorboard --logdir runs` (every run folder under it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgtrain.tracking.external import TrackerBackend, TrackerRun

TENSORBOARD_DIR = "tensorboard"
# the hparams table's metric columns, when the run logs them
HPARAM_METRICS = ("val_acc", "val_loss", "val_balanced_acc", "train_loss", "train_acc")


class TensorBoardBackend(TrackerBackend):
    name = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None
        self._held = -1

    def open(self, run: TrackerRun) -> str:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run.run_dir / TENSORBOARD_DIR
        purge = run.resume_step + 1 if run.run_id is not None and run.resume_step is not None else None
        # flush_secs: epoch rows reach the disk within a minute even without our flush after each epoch
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=60)
        self._held = run.resume_step if purge is not None and run.resume_step is not None else -1
        return TENSORBOARD_DIR

    def logged_through(self) -> int:
        # every row up to the checkpoint was flushed to the event file before the checkpoint was written
        return self._held

    def log_params(self, params: dict[str, Any], recipe: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # written into this run's own event file (SummaryWriter.add_hparams would open a second run)
        experiment, start, end = hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0))
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a kill after this epoch's checkpoint keeps its row

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        return None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
