"""Shared test helpers: a simulated Ctrl-C, passed to a real `imgtrain.api.train` as a public hook."""

from __future__ import annotations

import pytest

from imgtrain.engine.events import Hook


class InterruptAt(Hook):
    """Raises KeyboardInterrupt at the start of a given batch, as Ctrl-C would."""

    name = "interrupt"

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def batch_start(self, state):
        if state.epoch == self.epoch and state.batch_index == self.batch:
            raise KeyboardInterrupt


@pytest.fixture(scope="session")  # a class, not state: module-scoped fixtures may use it too
def interrupt_at():
    """`train(recipe, hooks=[interrupt_at(epoch, batch)])`: that run stops there, as Ctrl-C would."""
    return InterruptAt
