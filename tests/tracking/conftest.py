"""A fake minimal training loop for tracker tests, handed to tests as fixtures.

(Fixtures rather than imports: a test module importing `conftest` could get another test
folder's conftest.) `make_state` builds a real TrainState around a tiny Linear model and an SGD optimizer;
`FakeLoop` fires the events in the loop's order (engine/events.py) and fills in the
fields trackers read: images_seen, loss_sum, correct_sum, step, batch_index, lr (through a
real scheduler) and the history row appended before epoch_end. The numbers are chosen so
tests can assert on exact values: the running loss of epoch e is 1 / (e + 1) and the
running accuracy is 0.5 + 0.125 * e (whole images of a batch of 16).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from imgtrain.config import Recipe
from imgtrain.engine.events import Hook, HookList
from imgtrain.engine.state import TrainState

BATCH = 16  # images per fake batch


def _make_state(run_dir: Path, epochs: int = 3, steps_per_epoch: int = 8) -> TrainState:
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_epoch, gamma=0.5)
    return TrainState(
        recipe=Recipe(), run_dir=run_dir, device=torch.device("cpu"), model=model,
        optimizer=optimizer, scheduler=scheduler, scaler=None, amp_dtype=None,
        classes=["a", "b", "c"], epochs=epochs, steps_per_epoch=steps_per_epoch,
    )


def _epoch_row(epoch: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The history row of 0-based `epoch`; matches what FakeLoop accumulates."""
    row = {"epoch": epoch + 1, "train_loss": 1.0 / (epoch + 1), "train_acc": 0.5 + 0.125 * epoch,
           "val_loss": 0.8 / (epoch + 1), "val_acc": 0.55 + 0.1 * epoch, "lr": 0.1 * 0.5 ** epoch,
           "momentum": 0.9, "epoch_seconds": 2.5, "images_per_second": 51.2}
    row.update(extra or {})
    return row


class FakeLoop:
    """Fires the loop's events on `hooks` over `state`, like engine/loop.py does."""

    def __init__(self, state: TrainState, hooks: Sequence[Hook], on_step: Callable[[], None] | None = None):
        self.state = state
        self.on_step = on_step  # called before each after_step (tests advance a fake clock here)
        self.hooks = HookList(strategies=[], trackers=list(hooks))

    def run_epoch(self, extra: dict[str, Any] | None = None) -> None:
        state = self.state
        state.images_seen = 0
        state.loss_sum = torch.zeros(())
        state.correct_sum = torch.zeros((), dtype=torch.long)
        state.epoch_metrics = {}
        self.hooks.fire("epoch_start", state)
        loss_per_image = 1.0 / (state.epoch + 1)
        acc = 0.5 + 0.125 * state.epoch
        for batch_index in range(state.steps_per_epoch):
            state.batch_index = batch_index
            state.images_seen += BATCH
            state.loss_sum += loss_per_image * BATCH
            state.correct_sum += round(acc * BATCH)
            self.hooks.fire("before_step", state)
            state.optimizer.step()
            state.scheduler.step()
            state.step += 1
            if self.on_step is not None:
                self.on_step()
            self.hooks.fire("after_step", state)
        row = _epoch_row(state.epoch, extra)
        state.epoch_metrics = dict(row)
        self.hooks.fire("eval_end", state)
        state.history.append(row)
        self.hooks.fire("epoch_end", state)
        state.epoch += 1

    def fit(self, epochs: int | None = None,
            extras: list[dict[str, Any] | None] | None = None) -> TrainState:
        """fit_start, `epochs` epochs from state.epoch (default: to the end), fit_end."""
        state = self.state
        self.hooks.fire("fit_start", state)
        todo = (state.epochs - state.epoch) if epochs is None else epochs
        for i in range(todo):
            self.run_epoch((extras or [None] * todo)[i])
        state.summary = {"epochs_run": len(state.history), "best_val_acc": state.history[-1]["val_acc"]}
        self.hooks.fire("fit_end", state)
        return state


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def make_state(run_dir: Path):
    """make_state(epochs=3, steps_per_epoch=8) -> a fresh TrainState writing to run_dir."""
    def make(epochs: int = 3, steps_per_epoch: int = 8) -> TrainState:
        return _make_state(run_dir, epochs, steps_per_epoch)
    return make


@pytest.fixture
def fake_loop():
    """The FakeLoop class: fake_loop(state, hooks).fit()."""
    return FakeLoop


@pytest.fixture
def expected_row():
    """expected_row(epoch0, extra=None) -> the history row FakeLoop appends for that epoch."""
    return _epoch_row
