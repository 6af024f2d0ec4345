"""Shared test helpers: extra hooks in a real `imgtrain.api.train`, and a simulated Ctrl-C."""

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


@pytest.fixture
def extra_hooks(monkeypatch):
    """`extra_hooks(h1, h2)`: every later `api.train` of the test also runs these hooks (before its
    trackers); `extra_hooks()` goes back to the plain trackers."""
    from imgtrain import api
    real_build = api.build_trackers

    def use(*hooks: Hook) -> None:
        monkeypatch.setattr(api, "build_trackers", lambda *a, **k: [*hooks, *real_build(*a, **k)])
    return use


@pytest.fixture
def interrupt_at(extra_hooks):
    """`interrupt_at(epoch, batch)`: the next `api.train` stops there; later ones run through."""
    def stop(epoch: int, batch: int) -> None:
        extra_hooks(InterruptAt(epoch, batch))
    return stop
