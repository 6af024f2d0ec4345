"""`imgtrain profile RECIPE`: where a training step's time goes.

It runs the real `imgtrain.train` (the recipe's strategies, trackers, loaders and device) for one epoch
cut to `warmup + steps` steps, under `torch.profiler` for the last `steps` of them, and splits each step's
wall time into the ranges the loop marks (engine/loop.py, engine/events.py):

    data        imgtrain/data        waiting for the next batch from the loader (decode, augment, collate)
    to device   imgtrain/to_device   the copy to the device, the batch transforms there, channels_last
    forward     imgtrain/forward     the model and the loss (and what strategies add there: a teacher)
    backward    imgtrain/backward    autograd
    optimizer   imgtrain/optimizer   clipping, the optimizer and the schedule
    hooks       imgtrain/hook/*      strategies and trackers (progress bar, history, EMA, ...)
    other                            the rest of the loop: metrics, checkpoint checks, profiler steps

Each range counts its own time, not that of ranges inside it (a hook fired in the forward pass counts as
hooks). Times are the host's; on CUDA the device runs behind the host, so the table's forward/backward are
launch times and the device time per operator is in the operator table and the trace. The run folder gets
trace.json (chrome://tracing or https://ui.perfetto.dev) and profile.txt (the printed tables).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imgtrain.api import train
from imgtrain.config import Recipe, RecipeError
from imgtrain.engine.events import Hook
from imgtrain.io import atomic_write_text

PHASES = {"data": "data", "to_device": "to device", "forward": "forward", "backward": "backward",
          "optimizer": "optimizer", "hook": "hooks"}
TRACE_FILE, TABLE_FILE = "trace.json", "profile.txt"
TOP_OPERATORS = 15


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Kineto (torch's profiler library) prints a line on the process's stderr at every start and stop
    whatever its log level; this silences file descriptor 2 around those two calls only."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class ProfilerHook(Hook):
    """Runs torch.profiler over the optimizer steps after the first `warmup`, for `steps` steps."""

    name = "profiler"

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.done = 0
        self.window: list[float] = []          # perf_counter at the start and the end of the profiled steps
        self.profiler: torch.profiler.profile | None = None

    def fit_start(self, state: Any) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if state.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.cuda = state.device if state.device.type == "cuda" else None
        self.profiler = torch.profiler.profile(activities=activities, schedule=torch.profiler.schedule(
            wait=max(self.warmup - 1, 0), warmup=min(self.warmup, 1), active=self.steps, repeat=1))
        with _quiet_native_stderr():
            self.profiler.start()
        if self.warmup == 0:
            self.window.append(time.perf_counter())

    def after_step(self, state: Any) -> None:
        if self.profiler is None:
            return
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)  # a step's time is the device's too
        self.done += 1
        if self.done == self.warmup:
            self.window.append(time.perf_counter())
        with _quiet_native_stderr():  # the schedule starts and stops the recording inside step()
            self.profiler.step()
        if self.done == self.warmup + self.steps:
            self.window.append(time.perf_counter())
            self._stop()
            state.stop_training = True

    def fit_end(self, state: Any) -> None:
        if self.profiler is not None:  # fewer batches than asked for: what ran
            self.window.append(time.perf_counter())
            self._stop()

    def _stop(self) -> None:
        assert self.profiler is not None
        with _quiet_native_stderr():
            self.profiler.stop()
        self.result, self.profiler = self.profiler, None

    @property
    def profiled_steps(self) -> int:
        return max(self.done - self.warmup, 0)


@dataclass
class ProfileResult:
    run_dir: Path
    steps: int
    step_ms: float                            # wall milliseconds per profiled step
    images_per_second: float
    phases: dict[str, float] = field(default_factory=dict)  # phase -> ms per step (host)
    operators: str = ""
    files: list[Path] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'phase':<12s}{'ms/step':>10s}{'share':>8s}"]
        for phase, ms in self.phases.items():
            lines.append(f"{phase:<12s}{ms:>10.2f}{100 * ms / self.step_ms:>7.1f}%")
        lines.append(f"{'step':<12s}{self.step_ms:>10.2f}{100.0:>7.1f}%   ({self.steps} steps profiled, "
                     f"{self.images_per_second:.0f} images/s)")
        return "\n".join(lines)


def phase_milliseconds(events: Iterable[Any]) -> dict[str, float]:
    """Host milliseconds in each phase, summed over `events` (torch.profiler FunctionEvents): each
    imgtrain/* range without the imgtrain/* ranges inside it."""
    totals = dict.fromkeys(PHASES.values(), 0.0)
    for event in events:
        key = _phase(event.name)
        if key is None:
            continue
        inner = sum(child.cpu_time_total for child in _nearest_ranges(event))
        totals[key] += max(event.cpu_time_total - inner, 0.0) / 1000.0
    return totals


def _phase(name: str) -> str | None:
    if not name.startswith("imgtrain/"):
        return None
    return PHASES.get(name[len("imgtrain/"):].split("/")[0])


def _nearest_ranges(event: Any) -> list[Any]:
    found, stack = [], list(event.cpu_children)
    while stack:
        child = stack.pop()
        if _phase(child.name) is not None:
            found.append(child)
        else:
            stack.extend(child.cpu_children)
    return found


def profile_recipe(recipe: Recipe, steps: int = 100, warmup: int = 10, run_dir: str | Path | None = None,
                   overwrite: bool = False) -> ProfileResult:
    """Train `warmup + steps` optimizer steps of `recipe` under the profiler; write trace.json and
    profile.txt into the run folder (default output.root/<recipe name>-profile)."""
    if steps < 1 or warmup < 0:
        raise RecipeError(f"--steps {steps} --warmup {warmup}: give at least 1 step to profile and 0 or more "
                          "warm-up steps", file="command line")
    total = steps + warmup
    cfg = dataclasses.replace(recipe.train, epochs=1, max_steps_per_epoch=total * recipe.train.grad_accum_steps,
                              budget=None)
    name = recipe.output.name or (Path(recipe.source_file).stem if recipe.source_file else "run")
    recipe = dataclasses.replace(recipe, train=cfg, output=dataclasses.replace(
        recipe.output, name=f"{name}-profile", plots=False, report=False))
    hook = ProfilerHook(warmup, steps)
    result = train(recipe, run_dir=run_dir, overwrite=overwrite, hooks=[hook])
    profiled = getattr(hook, "result", None)
    if profiled is None or hook.profiled_steps == 0:
        raise RecipeError(f"an epoch of this recipe has {hook.done} step(s): fewer than --warmup {warmup}; lower "
                          "--warmup", file="command line")
    count = hook.profiled_steps
    wall_ms = 1000.0 * (hook.window[-1] - hook.window[0]) / count
    phases = {phase: ms / count for phase, ms in phase_milliseconds(profiled.events()).items()}
    phases["other"] = max(wall_ms - sum(phases.values()), 0.0)
    sort = "self_cuda_time_total" if torch.cuda.is_available() and result.summary.get("device", "").startswith(
        "cuda") else "self_cpu_time_total"
    averages = [e for e in profiled.key_averages() if not e.key.startswith(("imgtrain/", "ProfilerStep"))]
    operators = _operator_table(averages, sort, count)
    images = recipe.data.batch_size * recipe.train.grad_accum_steps
    out = ProfileResult(run_dir=result.run_dir, steps=count, step_ms=wall_ms,
                        images_per_second=1000.0 * images / wall_ms, phases=phases, operators=operators)
    trace = result.run_dir / TRACE_FILE
    profiled.export_chrome_trace(str(trace))
    atomic_write_text(result.run_dir / TABLE_FILE, out.table() + "\n\n" + operators + "\n")
    out.files = [trace, result.run_dir / TABLE_FILE]
    return out


def _operator_table(averages: list[Any], sort: str, steps: int) -> str:
    device = sort.startswith("self_cuda")
    rows = sorted(averages, key=lambda e: getattr(e, "self_device_time_total" if device else "self_cpu_time_total",
                                                 0.0), reverse=True)[:TOP_OPERATORS]
    header = f"{'operator':<44s}{'calls/step':>11s}{'self ms/step':>14s}" + (f"{'device ms/step':>16s}" if device
                                                                           else "")
    lines = [f"top {len(rows)} operators by their own {'device' if device else 'host'} time", header]
    for e in rows:
        line = f"{e.key[:43]:<44s}{e.count / steps:>11.1f}{e.self_cpu_time_total / 1000 / steps:>14.3f}"
        if device:
            line += f"{getattr(e, 'self_device_time_total', 0.0) / 1000 / steps:>16.3f}"
        lines.append(line)
    return "\n".join(lines)
