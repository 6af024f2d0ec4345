"""Stopping on a signal without losing work: SIGTERM (a preemptible machine, Slurm, Kubernetes) and
SIGINT (Ctrl-C) ask the Trainer to save a mid-epoch training state at the next safe point (after the
optimizer step under way, or at once during validation) and to stop with `TrainingPreempted`.

The handlers are installed only while `fit` runs with a run folder to save into, and only on the main
thread (Python delivers signals there). A second Ctrl-C interrupts at once, as Ctrl-C always did.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; the state is saved and `--resume` continues
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C, as a shell reports it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingPreempted(Exception):
    """Training stopped on a signal after saving its state."""

    def __init__(self, signal_name: str, state_file: Path | None, epoch: int, batches_done: int):
        self.signal_name, self.state_file = signal_name, state_file
        self.epoch, self.batches_done = epoch, batches_done
        where = f"epoch {epoch + 1}, after {batches_done} batches"
        saved = f"training state saved to {state_file}" if state_file else "no training state saved"
        super().__init__(f"stopped by {signal_name} in {where}; {saved}")

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT_CODE if self.signal_name == "SIGINT" else PREEMPTED_EXIT_CODE


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT set `received` (the signal's name) instead of
    ending the process; the Trainer checks it at its safe points."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
