"""The fault suite (issue 13 part 6): real `imgtrain train` processes, real signals, real files.

Every case runs `python -m imgtrain.cli ...` as a subprocess (with a timeout: a hang is a failure) on a
tiny digits run, and records one row of the table printed at the end of `python -m pytest tests/faults`:
the fault, how many runs met it, how many survived (the run recovered to the uninterrupted result, or
stopped with a clear error) and how many lost data (a final history or weights that differ from the
uninterrupted run, a state that cannot be loaded, a run folder that cannot be resumed).
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from imgtrain.tracking import read_history

REPO = Path(__file__).resolve().parents[2]
# every process imports this checkout (not an installed copy) and writes its lines at once
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
EPOCHS, STEPS = 3, 8  # 24 optimizer steps, a training state after each one
RUN_ARGS = ("quickstart", "model.name=imgtrain_cnn_tiny", "augment.img_size=8", f"train.epochs={EPOCHS}",
            f"train.max_steps_per_epoch={STEPS}", "data.test_fraction=0", "output.plots=false",
            "output.report=false", "output.progress=log", "train.threads=1", "train.deterministic=true",
            "train.checkpoint_every.steps=1")
TIMING = ("epoch_seconds", "images_per_second")
TIMEOUT = 120  # seconds for one process: far more than a tiny run needs, so only a hang reaches it
TRACEBACK = "Traceback (most recent call last)"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgtrain.cli", *args]


def train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return cli("train", *RUN_ARGS, *extra, "--run-dir", str(run_dir))


def resume_cmd(run_dir: Path, *extra: str) -> list[str]:
    return cli("train", "--resume", str(run_dir), "train.threads=1", *extra)


def run(cmd: list[str], timeout: float = TIMEOUT, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run to the end; a process still running after `timeout` fails the test as a hang."""
    try:
        return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang: {' '.join(cmd)} still running after {timeout} s")


def run_all(cmds: list[list[str]], timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Several independent processes at once (the suite's time is mostly each process importing torch)."""
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    done = []
    deadline = time.monotonic() + timeout
    for cmd, proc in zip(cmds, procs):
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"hang: {' '.join(cmd)} still running after {timeout} s")
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def start(cmd: list[str]) -> subprocess.Popen:
    """A process whose stderr (progress lines, `output.progress=log`) the test reads as it runs."""
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, prefix: str, count: int = 1) -> list[str]:
    """Read stderr until the `count`-th line starting with `prefix`; returns the lines read."""
    assert proc.stderr is not None
    seen, lines = 0, []
    deadline = time.monotonic() + TIMEOUT
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(prefix):
            seen += 1
            if seen == count:
                return lines
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"no line {count}x {prefix!r} from {' '.join(map(str, proc.args))}:\n{''.join(lines)[-3000:]}")


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for a started process; its exit code and the rest of its stderr."""
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"hang: {' '.join(map(str, proc.args))} still running after {TIMEOUT} s")
    return proc.returncode, err


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """history.csv without the timing columns."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_history(run_dir / "history.csv")]


def same_run(run_dir: Path, reference: Path) -> bool:
    """The same history (every column but the timings) and the same last weights, to the bit."""
    if not (run_dir / "history.csv").is_file() or metrics(run_dir) != metrics(reference):
        return False
    last = [load_file(str(folder / "checkpoints" / "last.safetensors")) for folder in (run_dir, reference)]
    return last[0].keys() == last[1].keys() and all(torch.equal(last[0][k], last[1][k]) for k in last[0])


def tmp_files(ckpt_dir: Path) -> list[str]:
    """Temporary files a write left behind (only a kill inside that write leaves one)."""
    return sorted(p.name for p in ckpt_dir.glob(".*.tmp")) if ckpt_dir.is_dir() else []


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- inotify

IN_CREATE, IN_MOVED_TO = 0x100, 0x80


class DirWatch:
    """Linux inotify on a run folder and, once it appears, its checkpoints/: `wait_tmp(n)` returns at the
    n-th temporary file created in checkpoints/, the moment a checkpoint write has begun."""

    def __init__(self, run_dir: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.run_dir = run_dir
        self.run_wd = self._watch(run_dir)
        self.ckpt_wd: int | None = None
        self.tmp_seen = 0

    def _watch(self, folder: Path) -> int:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_CREATE | IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        return int(wd)

    def wait_tmp(self, n: int, proc: subprocess.Popen, timeout: float = TIMEOUT) -> bool:
        """True at the n-th temporary file in checkpoints/; False when the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                if proc.poll() is not None:
                    return False
                continue
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                wd, mask, _, size = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16: offset + 16 + size].rstrip(b"\0").decode()
                offset += 16 + size
                if wd == self.run_wd and name == "checkpoints" and self.ckpt_wd is None:
                    self.ckpt_wd = self._watch(self.run_dir / "checkpoints")
                elif wd == self.ckpt_wd and mask & IN_CREATE and name.endswith(".tmp"):
                    self.tmp_seen += 1
                    if self.tmp_seen >= n:
                        return True
        return False

    def close(self) -> None:
        os.close(self.fd)


def kill_now(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)


# ----------------------------------------------------------------------------- the table

@dataclass
class FaultRow:
    runs: int = 0
    survived: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)


class FaultTable:
    """fault -> runs, survived, data lost; printed by pytest_terminal_summary."""

    def __init__(self) -> None:
        self.rows: dict[str, FaultRow] = {}

    def add(self, fault: str, survived: bool, lost: bool = False, note: str = "") -> None:
        row = self.rows.setdefault(fault, FaultRow())
        row.runs += 1
        row.survived += int(survived)
        row.lost += int(lost)
        if note and note not in row.notes:
            row.notes.append(note)

    def markdown(self) -> list[str]:
        lines = ["| fault | runs | survived | data lost | notes |", "|---|---:|---:|---:|---|"]
        for fault, row in self.rows.items():
            lines.append(f"| {fault} | {row.runs} | {row.survived} | {row.lost} | {'; '.join(row.notes)} |")
        return lines


TABLE_KEY = pytest.StashKey[FaultTable]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[TABLE_KEY] = FaultTable()


@pytest.fixture(scope="session")
def faults(request: pytest.FixtureRequest) -> FaultTable:
    return request.config.stash[TABLE_KEY]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    table = config.stash.get(TABLE_KEY, None)
    if table is None or not table.rows:
        return
    terminalreporter.section("fault table")
    for line in table.markdown():
        terminalreporter.write_line(line)


# ----------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every recovered run must end as (one for the whole suite)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = run(train_cmd(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["epoch"] for row in read_history(run_dir / "history.csv")] == list(range(1, EPOCHS + 1))
    return run_dir


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """A run stopped by SIGTERM inside epoch 2 (its exit code and stderr): a last and a previous training
    state, both mid-epoch. Tests copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    proc = start(train_cmd(run_dir))
    wait_for_line(proc, f"epoch 2/{EPOCHS} ")
    kill_now(proc, signal.SIGTERM)
    code, err = finish(proc)
    return run_dir, code, err
