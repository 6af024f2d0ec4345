"""Shared test helpers: a simulated Ctrl-C, passed to a real `imgtrain.api.train` as a public hook, and a
headless browser (Debian's chromium) that renders the HTML pages imgtrain writes."""

from __future__ import annotations

import shutil
import subprocess

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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture
def headless_chromium():
    """`headless_chromium(*args, timeout=120)` runs chromium headless and returns its stdout (asserting it
    succeeded); the test is skipped where chromium is not installed."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")

    def run(*args: str, timeout: int = 120) -> str:
        done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *args], capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run
