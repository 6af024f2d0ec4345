"""plots/*.png: loss, accuracy, learning rate and momentum curves, redrawn every epoch.

`PlotTracker` records the learning rate and momentum (or Adam's beta1) of the first param
group that each optimizer step uses (read at `before_step`), and at every `epoch_end` redraws into `run_dir/plots/`:

- `loss.png`      train_loss and val_loss per epoch
- `accuracy.png`  train_acc and val_acc per epoch, in %
- `lr.png`        learning rate per optimizer step (log scale when it spans > 2 decades)
- `momentum.png`  momentum / beta1 per optimizer step

The per-step record keeps at most `max_points` points however long the run: when full it
drops every other point and from then on records every 2nd step (then 4th, ...), so memory,
checkpoint size and drawing time stay bounded and the kept points stay evenly spaced. It is
part of the hook's `state_dict`, so a resumed run's lr plot still starts at step 0.

Drawing uses `matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, so no global
figure registry or backend switching (safe next to a user's own pyplot use and in threads).
Small figures (6x4 in at 80 dpi) keep four redraws well under a second. Each PNG is
saved to a temporary file and `os.replace`d, so a viewer never reads half an image.

By default the hook draws on a background thread from a snapshot of the history, so the
training loop goes on while matplotlib renders (most of the loop's time is in torch ops that
release the GIL); at most one draw runs at a time, and `fit_end` waits for the last one, so
every file is complete when `fit` returns. `background=False` draws in the loop's thread.

`plot_history(rows, lr_steps, momentum_steps, out_dir)` draws the same files without a hook.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from imgtrain.engine.events import Hook

PLOTS_DIR = "plots"
FIGSIZE = (6.0, 4.0)   # inches
DPI = 80
MAX_POINTS = 2000      # per-step points kept and drawn per curve
REDRAW_BUDGET_FACTOR = 50  # wait at least 50x the last redraw's cost before the next (<= ~2% of time)
FIRST_DRAW_COST = 0.4      # seconds; what the budget assumes before the first redraw has been timed
MARKER_LIMIT = 30      # per-epoch curves get point markers up to this many epochs


# ----------------------------------------------------------------------------- drawing

def plottable(value: Any) -> float:
    """A plottable float; missing, non-numeric and infinite values become NaN (a gap)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def decimate(points: Sequence[Tuple[float, float]],
             max_points: int = MAX_POINTS) -> List[Tuple[float, float]]:
    """At most about `max_points` evenly spaced points, always keeping the last one."""
    points = list(points)
    if len(points) <= max_points:
        return points
    stride = math.ceil(len(points) / max_points)
    kept = points[::stride]
    if kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def _new_axes(title: str, xlabel: str, ylabel: str) -> Tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)  # attaches itself to fig; savefig then renders with Agg
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    # fixed margins instead of tight_layout: same result for these short labels, less time
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.91)
    return fig, ax


def _save(fig: Figure, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _epoch_plot(rows: Sequence[Dict[str, Any]], keys: Sequence[str], scale: float,
                title: str, ylabel: str, path: Path) -> bool:
    """One line per key present in any row, against the epoch; False when no key has data."""
    series = {}
    for key in keys:
        values = [plottable(row.get(key)) * scale for row in rows]
        if any(not math.isnan(v) for v in values):
            series[key] = values
    if not series:
        return False
    epochs = [plottable(row.get("epoch", i + 1)) for i, row in enumerate(rows)]
    fig, ax = _new_axes(title, "epoch", ylabel)
    marker = "o" if len(rows) <= MARKER_LIMIT else None
    for key, values in series.items():
        ax.plot(epochs, values, marker=marker, markersize=3, label=key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.legend()
    _save(fig, path)
    return True


def _step_plot(points: Sequence[Tuple[float, float]], title: str, ylabel: str, path: Path,
               log_when_wide: bool) -> bool:
    """A per-step curve; False when there are no points."""
    points = [(float(s), plottable(v)) for s, v in decimate(points)]
    if not points:
        return False
    fig, ax = _new_axes(title, "optimizer step", ylabel)
    ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2)
    values = [v for _, v in points if not math.isnan(v)]
    # a one-cycle or cosine lr spans several decades; on a linear axis its tail looks like 0
    if log_when_wide and values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    _save(fig, path)
    return True


def plot_history(rows: Sequence[Dict[str, Any]],
                 lr_steps: Sequence[Tuple[float, float]],
                 momentum_steps: Sequence[Tuple[float, float]],
                 out_dir: Union[str, Path]) -> List[Path]:
    """Draw loss.png, accuracy.png, lr.png and momentum.png into `out_dir`.

    rows: history rows (dicts with epoch, train_loss, val_acc ...; accuracies as fractions).
    lr_steps, momentum_steps: (optimizer step, value) pairs.
    A plot with no data is not written. Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if _epoch_plot(rows, ("train_loss", "val_loss"), 1.0, "Loss", "loss", out / "loss.png"):
        written.append(out / "loss.png")
    if _epoch_plot(rows, ("train_acc", "val_acc"), 100.0, "Accuracy", "accuracy (%)", out / "accuracy.png"):
        written.append(out / "accuracy.png")
    if _step_plot(lr_steps, "Learning rate", "lr", out / "lr.png", log_when_wide=True):
        written.append(out / "lr.png")
    if _step_plot(momentum_steps, "Momentum", "momentum / beta1", out / "momentum.png", log_when_wide=False):
        written.append(out / "momentum.png")
    return written


# ----------------------------------------------------------------------------- the hook

class PlotTracker(Hook):
    """Records per-step lr and momentum; redraws `run_dir/plots/*.png` at every epoch end."""

    name = "plots"

    def __init__(self, run_dir: Union[str, Path], max_points: int = MAX_POINTS,
                 redraw_budget_factor: float = REDRAW_BUDGET_FACTOR, background: bool = True):
        if max_points < 2:
            raise ValueError(f"max_points must be at least 2, got {max_points}")
        self.out_dir = Path(run_dir) / PLOTS_DIR
        self.max_points = max_points
        self.redraw_budget_factor = redraw_budget_factor  # 0: redraw at every epoch end
        self.steps: List[int] = []
        self.lr: List[float] = []
        self.momentum: List[float] = []
        self.stride = 1  # record steps that are multiples of this; doubles when the record is full
        self.last_written: List[Path] = []
        self._last_draw_end: Optional[float] = None
        self._last_cost = 0.0
        self._pending = False  # an epoch's redraw was skipped and not yet made up
        self.background = background
        self._worker: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def before_step(self, state: Any) -> None:
        # before_step, not after_step: by after_step the scheduler has already moved on, so
        # the lr read there is the next step's (a one-cycle plot would miss its warmup start
        # and show a jump after the last step). Here it is the lr this optimizer step uses.
        step = state.step + 1  # 1-based number of the step being taken, as after_step counts
        # the second test skips a step already recorded (e.g. a repeated event)
        if step % self.stride or (self.steps and step <= self.steps[-1]):
            return
        self.steps.append(step)
        self.lr.append(state.lr)
        self.momentum.append(state.momentum)
        if len(self.steps) > self.max_points:
            self._thin()

    def _thin(self) -> None:
        """Keep the points on multiples of twice the stride (about half), then record that often."""
        self.stride *= 2
        keep = [i for i, s in enumerate(self.steps) if s % self.stride == 0]
        self.steps = [self.steps[i] for i in keep]
        self.lr = [self.lr[i] for i in keep]
        self.momentum = [self.momentum[i] for i in keep]

    def fit_start(self, state: Any) -> None:
        # the budget runs from the start of training: the first redraw is due once
        # redraw_budget_factor x FIRST_DRAW_COST seconds (20 s) have passed
        if self._last_draw_end is None:
            self._last_draw_end, self._last_cost = time.perf_counter(), FIRST_DRAW_COST

    def epoch_end(self, state: Any) -> None:
        # A redraw of the four plots costs 0.3-1 s of CPU. On long epochs that is nothing and
        # every epoch is drawn; on epochs of a few seconds it would be a visible slowdown, so a
        # redraw is skipped while less than redraw_budget_factor x its last cost has passed
        # since the previous one, or while the previous one is still drawing (training pays at
        # most ~2%). The last epoch and fit_end always draw.
        now = time.perf_counter()
        final = state.epoch + 1 >= state.epochs or state.stop_training
        busy = self._worker is not None and self._worker.is_alive()
        if not final and (busy or (self._last_draw_end is not None
                                   and now - self._last_draw_end < self.redraw_budget_factor * self._last_cost)):
            self._pending = True
            return
        self.redraw(state)

    def fit_end(self, state: Any) -> None:
        if self._pending:
            self.redraw(state)
        self.wait()

    def redraw(self, state: Any) -> None:
        """Draw every plot from the state's history now (on the background thread when enabled)."""
        self.wait()  # one draw at a time; the newer snapshot replaces the files the older one wrote
        rows = [dict(row) for row in state.history]
        lr, momentum = self.lr_steps(), self.momentum_steps()
        self._pending = False
        if not self.background:
            self._draw(rows, lr, momentum)
            return
        self._worker = threading.Thread(target=self._draw, args=(rows, lr, momentum),
                                        name="imgtrain-plots", daemon=True)
        self._worker.start()

    def wait(self) -> None:
        """Block until a background draw has finished; re-raise what it raised."""
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _draw(self, rows: List[Dict[str, Any]], lr: List[Tuple[int, float]],
              momentum: List[Tuple[int, float]]) -> None:
        started = time.perf_counter()
        try:
            self.last_written = plot_history(rows, lr, momentum, self.out_dir)
        except BaseException as error:  # noqa: BLE001 - handed to the loop's thread by wait()
            self._error = error
        self._last_draw_end = time.perf_counter()
        self._last_cost = self._last_draw_end - started

    def lr_steps(self) -> List[Tuple[int, float]]:
        return list(zip(self.steps, self.lr, strict=True))

    def momentum_steps(self) -> List[Tuple[int, float]]:
        return list(zip(self.steps, self.momentum, strict=True))

    def state_dict(self) -> Dict[str, Any]:
        # plain lists and ints only: checkpoints are loaded with torch.load(weights_only=True)
        return {"steps": list(self.steps), "lr": list(self.lr), "momentum": list(self.momentum),
                "stride": self.stride}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        steps, lr, momentum = state.get("steps", []), state.get("lr", []), state.get("momentum", [])
        if not len(steps) == len(lr) == len(momentum):
            raise ValueError(f"PlotTracker state is inconsistent: {len(steps)} steps, {len(lr)} lr "
                             f"and {len(momentum)} momentum values; the checkpoint may be damaged")
        self.steps = [int(s) for s in steps]
        self.lr = [float(v) for v in lr]
        self.momentum = [float(v) for v in momentum]
        self.stride = int(state.get("stride", 1))

