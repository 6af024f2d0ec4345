"""Weights & Biases: one W&B run per run folder, its files in `run_dir/wandb/`.

`WANDB_MODE=offline` needs no account: the run is written to `run_dir/wandb/offline-run-*/` and
`wandb sync run_dir/wandb/offline-run-*` uploads it later; online, W&B uses your `wandb login`.
The project is `WANDB_PROJECT` (default "imgtrain"). The recipe goes in as the run's config, each epoch's
history row at the optimizer step (W&B's own step, so charts share one x-axis and steps only grow), images
as `wandb.Image`, and the best and last checkpoints as one "model" artifact at fit_end. A resumed run
reopens the same W&B run id (resume="allow"); offline, each process writes its own offline-run folder of
that id and `wandb sync` joins them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgtrain.config import RecipeError
from imgtrain.tracking.external import TrackerBackend, TrackerRun

DEFAULT_PROJECT = "imgtrain"
WANDB_DIR = "wandb"  # W&B makes it inside the `dir` it is given


class WandbBackend(TrackerBackend):
    name = "wandb"

    def __init__(self) -> None:
        self.run: Any = None

    def open(self, run: TrackerRun) -> str:
        import wandb

        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=run.name, dir=str(run.run_dir),
                id=run.run_id, resume="allow" if run.run_id is not None else None,
                # the console and the machine's statistics are ours to show (train.log, summary.json)
                settings=wandb.Settings(console="off", x_disable_stats=True),
                reinit="create_new")
        except Exception as exc:
            # no login and not offline, a project it may not write to ...: what to do, not W&B's traceback
            raise RecipeError(f"W&B could not start its run: {exc}. Log in with `wandb login`, or set "
                             f"WANDB_MODE=offline to write the run to {run.run_dir / WANDB_DIR} and upload "
                             f"it later with `wandb sync`", key="output.trackers") from None
        # every process, a resume too: offline, each process's file is read (and synced) on its own; a resume
        # that extends train.epochs changes a value
        self.run.config.update(run.recipe, allow_val_change=True)
        return str(self.run.id)

    def logged_through(self) -> int:
        # online, a resumed run starts at the step after the last one the server holds; offline at 0 (unknown)
        return int(self.run.step) - 1

    def log_params(self, params: dict[str, Any], recipe: dict[str, Any]) -> None:
        return None  # the run's config, set in open (nested, as W&B shows it)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(image)}, step=step)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        import wandb

        artifact = wandb.Artifact(f"{self.run.id}-model", type="model")
        for path in paths:
            artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
