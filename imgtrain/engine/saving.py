"""When and what the Trainer saves: the checkpoints of each epoch end, mid-epoch training states
(`train.checkpoint_every`), the state saved when a stop signal arrives, and where a resumed epoch starts.

`RunSaver` holds the policy (the files themselves are engine/checkpoint.py's); the Trainer calls it at
three points: after each optimizer step (`after_step`), at each epoch end (`epoch_end`) and when a
signal interrupts validation (`stop_in_validation`). Only the Trainer's main loop stays in loop.py.

Under several processes (DDP) every rank keeps the same policy and takes the same decisions (a stop
signal or a due time-based checkpoint on any rank counts on all: `agree_any`), but only rank 0 writes.
What differs per rank is gathered to rank 0 with each training state, and a resume gives each rank its
own back (so a resumed job continues exactly as one never stopped): its RNG states (`checkpoint.rank_state`)
and, inside an epoch, its running loss and accuracy sums (`rank_epoch_sums`). The weights, optimizer,
schedule and (averaged before each save) BatchNorm statistics are the same on every rank: rank 0's are saved.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from imgtrain.engine import checkpoint
from imgtrain.engine.distributed import agree_any, gather_to_main, is_distributed, is_main_process, world_info
from imgtrain.engine.preemption import StopSignals, TrainingPreempted


class StopNow(Exception):
    """A stop signal arrived during validation: the epoch's training is saved, its validation is redone."""


def batches_from(loader: Any, start: int) -> Iterable:
    """The loader's batches from batch `start` on, drawn as an uninterrupted pass would draw them.

    A loader with `batches_from` (data/samplers.py TrainLoader) skips at the sampler, without loading the
    skipped images. Any other loader is read and the skipped batches dropped, under a saved and restored
    RNG, so the augmentation of the batches that follow is drawn as it would have been."""
    if start == 0:
        return loader
    if hasattr(loader, "batches_from"):
        return loader.batches_from(start)
    rng = checkpoint.capture_rng_state()
    iterator = iter(loader)
    for _ in itertools.islice(iterator, start):
        pass
    checkpoint.restore_rng_state(rng)
    return iterator


class RunSaver:
    """The saving policy of one fit. run_dir None: nothing is saved (the LR finder, doctor)."""

    def __init__(self, recipe: Any, run_dir: Path | None, hooks: Any, metadata: dict[str, Any],
                 run_id: str | None, best_mode: str):
        self.recipe, self.run_dir, self.hooks, self.metadata = recipe, run_dir, hooks, metadata
        self.run_id, self.best_mode = run_id, best_mode
        self.signals: StopSignals | None = None  # set while fit runs with a run folder to save into
        self.last_save = time.perf_counter()
        # several processes: rank 0 writes the run folder, the others only take part in the decisions
        self.writes = run_dir is not None and is_main_process()
        # several processes: called on every rank before a mid-epoch state is taken (Trainer._sync_ranks)
        self.before_save: Any = None

    # ------------------------------------------------------------------ signals

    def stop_signals(self) -> StopSignals | None:
        """Handlers for SIGTERM/SIGINT while fit runs, when there is a run folder to save a state into."""
        saving = self.run_dir is not None and self.recipe.output.save_last
        self.signals = StopSignals() if saving else None
        self.last_save = time.perf_counter()
        return self.signals

    def agree_signal(self) -> None:
        """Several processes: a signal any rank received counts on every rank, so all stop at the same point
        (torchrun forwards SIGTERM to every worker, but not at the same instant). Every rank must call it."""
        if self.signals is None or not is_distributed():
            return
        (received,) = agree_any(self.signals.received is not None)
        if received and self.signals.received is None:
            self.signals.received = "SIGTERM"  # another rank's signal

    @property
    def stop_requested(self) -> str | None:
        return self.signals.received if self.signals is not None else None

    def stopped_at_epoch_end(self, state: Any) -> TrainingPreempted:
        """A signal that arrived while an epoch ended: its checkpoint is already saved."""
        assert self.stop_requested is not None
        return TrainingPreempted(self.stop_requested, self.state_file, state.epoch, 0)

    # ------------------------------------------------------------------ inside an epoch

    def after_step(self, state: Any, batches_done: int, batches: int) -> None:
        """After an optimizer step: save a mid-epoch state when train.checkpoint_every says so, or when a
        stop signal arrived (then stop). The epoch's last step is left to the epoch-end checkpoint."""
        if self.signals is None:
            return
        every = self.recipe.train.checkpoint_every
        minutes_due = every.minutes is not None and time.perf_counter() - self.last_save >= every.minutes * 60
        if is_distributed():  # one rank's clock or signal decides for all: they save (a collective) together
            self.agree_signal()
            (minutes_due,) = agree_any(minutes_due)
        if self.signals.received:
            self.save_mid_epoch(state, batches_done)
            raise self.preempted(state, batches_done)
        if batches_done >= batches:
            return
        steps_due = every.steps is not None and state.step % every.steps == 0
        if steps_due or minutes_due:
            self.save_mid_epoch(state, batches_done)

    def stop_in_validation(self, state: Any, batches: int) -> TrainingPreempted:
        """A signal during validation: the epoch's training is saved (all its batches) and validated again
        on resume."""
        self.save_mid_epoch(state, batches)
        return self.preempted(state, batches)

    def save_mid_epoch(self, state: Any, batches_done: int) -> None:
        assert self.run_dir is not None and state.loss_sum is not None and state.correct_sum is not None
        if self.before_save is not None:
            self.before_save()
        sums = {"loss_sum": state.loss_sum.detach().cpu(), "correct_sum": state.correct_sum.detach().cpu(),
                "images_seen": state.images_seen}
        # every rank's running sums and RNG states, on rank 0 (a collective: every rank saves at the same
        # step); without a process group, this process's alone
        ranks = gather_to_main({**checkpoint.rank_state(), "sums": sums}) if is_distributed() else None
        if not self.writes:
            return
        self.check_run_dir()
        rank_sums = [part.pop("sums") for part in ranks] if ranks is not None else [sums]
        position = {"epoch": state.epoch, "batches_done": batches_done,
                    # the whole job's sums so far (what the epoch's row would count now), and each rank's
                    "images_seen": sum(part["images_seen"] for part in rank_sums),
                    "loss_sum": sum_tensors([part["loss_sum"] for part in rank_sums]),
                    "correct_sum": sum_tensors([part["correct_sum"] for part in rank_sums]),
                    "ranks": rank_sums if ranks is not None else None,
                    "seconds": time.perf_counter() - state.epoch_start_time,
                    "metrics": dict(state.epoch_metrics), "details": dict(state.epoch_details)}
        checkpoint.save_training_state(self.run_dir / "checkpoints", self.training_state(state, position, ranks))
        self.last_save = time.perf_counter()
        state.note(f"saved a mid-epoch training state: epoch {state.epoch + 1}, {batches_done} batches done, "
                   f"step {state.step}", "mid_epoch_checkpoint", epoch=state.epoch + 1, batches_done=batches_done,
                   step=state.step)

    def preempted(self, state: Any, batches_done: int) -> TrainingPreempted:
        assert self.stop_requested is not None
        error = TrainingPreempted(self.stop_requested, self.state_file, state.epoch, batches_done)
        state.note(f"{error}", "preempted", signal=error.signal_name, epoch=state.epoch + 1,
                   batches_done=batches_done, step=state.step)
        return error

    @property
    def state_file(self) -> Path | None:
        return self.run_dir / "checkpoints" / checkpoint.STATE_FILE if self.run_dir is not None else None

    def check_run_dir(self) -> None:
        """Before anything writes into the run folder: it must still be there (never made again, partial)."""
        if self.writes and self.run_dir is not None and not self.run_dir.is_dir():
            raise checkpoint.CheckpointSaveError(
                f"the run folder {self.run_dir} no longer exists (deleted while training?): nothing more can be "
                "saved, so training stops here rather than write a partial run folder")

    # ------------------------------------------------------------------ epoch ends

    def epoch_end(self, state: Any, row: dict[str, Any], model: torch.nn.Module) -> None:
        """The best (by output.best_metric) and last weights, and the training state, after an epoch."""
        out = self.recipe.output
        metric = out.best_metric if out.best_metric in row else "train_loss"
        if metric != out.best_metric:
            self.best_mode = "min"  # no val split: the best epoch is the one with the lowest train loss
        value = float(row[metric])
        best = state.best_value
        better = best is None or math.isnan(best) or (value > best if self.best_mode == "max" else value < best)
        is_best = not math.isnan(value) and better
        if is_best:
            state.best_value, state.best_epoch = value, row["epoch"]
        # several processes: every rank's RNG states to rank 0 (a collective, before only rank 0 goes on)
        saving_state = self.run_dir is not None and out.save_last
        ranks = gather_to_main(checkpoint.rank_state()) if saving_state and is_distributed() else None
        if self.run_dir is None or not self.writes:
            return
        ckpt_dir = self.run_dir / "checkpoints"
        meta = dict(self.metadata, epoch=row["epoch"], metrics={k: v for k, v in row.items() if k != "epoch"})
        if is_best and out.save_best:
            checkpoint.save_weights(model, ckpt_dir / "best.safetensors", meta)
        if out.save_last:
            checkpoint.save_weights(model, ckpt_dir / "last.safetensors", meta)
            checkpoint.save_training_state(ckpt_dir, self.training_state(state, None, ranks))
            self.last_save = time.perf_counter()

    def training_state(self, state: Any, mid_epoch: dict[str, Any] | None = None,
                       ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        fit_seconds = state.fit_seconds_before + time.perf_counter() - state.fit_started
        return checkpoint.training_state(state, self.best_mode, self.hooks, self.run_id, mid_epoch, fit_seconds,
                                         ranks)


def sum_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors added up in the order given (rank order: the same float sum wherever it is computed)."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


def rank_epoch_sums(position: dict[str, Any], device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(images seen, loss sum, correct sum) this process continues a mid-epoch state's epoch from: its own,
    when the state holds every rank's (the epoch-end sum across ranks then adds the very numbers an
    uninterrupted epoch adds), else (a state of the first DDP slice, which kept only the job's sums) the
    job's on rank 0 and zero on the others, so every image still counts once."""
    rank, world, _ = world_info()
    ranks = position.get("ranks")
    if ranks is not None and len(ranks) == world:
        own = ranks[rank]
        return int(own["images_seen"]), own["loss_sum"].to(device), own["correct_sum"].to(device)
    loss_sum, correct_sum = position["loss_sum"].to(device), position["correct_sum"].to(device)
    if rank == 0:
        return int(position["images_seen"]), loss_sum, correct_sum
    return 0, torch.zeros_like(loss_sum), torch.zeros_like(correct_sum)
