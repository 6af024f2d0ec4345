"""Charts of a run, drawn by matplotlib once per redraw: plots/*.png and report.html's inline SVG.

One function per chart builds a `Figure` from the history rows (lr and momentum per optimizer step
when recorded, else per epoch); each figure is rendered both as `plots/NAME.png` and as the SVG
report.html inlines, so the page and the files agree. No pyplot: plain `Figure`s have no global state.

`PlotTracker` records the lr and momentum (or Adam's beta1) of each optimizer step, at most
`max_points` of them: when full it keeps every other point and from then on records every 2nd step
(then 4th, ...), so memory, checkpoint size and drawing time stay bounded. The record is in its
`state_dict`, so a resumed run's lr chart still starts at step 0. It redraws at epoch ends on a time
budget, by default on a background thread (the loop's torch ops release the GIL); `fit_end` waits.
"""

from __future__ import annotations

import html
import io
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from imgtrain.engine.events import Hook
from imgtrain.tracking.summary import atomic_write_bytes

PLOTS_DIR = "plots"
FIGSIZE = (6.0, 4.0)   # inches: 480x320 px as PNG, 576x384 CSS px as SVG
DPI = 80
MAX_POINTS = 2000      # per-step points kept and drawn per curve
REDRAW_BUDGET_FACTOR = 150  # wait at least 150x the last redraw's cost before the next (README: The run folder)
FIRST_DRAW_COST = 0.4      # seconds; what the budget assumes before the first redraw has been timed
MARKER_LIMIT = 30      # per-epoch curves get point markers up to this many epochs
SERIES_ID = "series-"  # + the column name: each curve's gid, an id in the SVG that tests can find
# no date or creator in the SVG: the page would differ at every redraw for nothing
SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}

Rows = Sequence[dict[str, Any]]  # history rows (accuracies as fractions)
Steps = Sequence[tuple[float, float]]  # (optimizer step, value) pairs


def plottable(value: Any) -> float:
    """A plottable float; missing, non-numeric and infinite values become NaN (a gap)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def decimate(points: Steps, max_points: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most about `max_points` evenly spaced points, always keeping the last one."""
    points = list(points)
    if len(points) <= max_points:
        return points
    stride = math.ceil(len(points) / max_points)
    kept = points[::stride]
    if kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)  # attaches itself to fig; savefig then renders PNGs with Agg
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    # fixed margins instead of tight_layout: same result for these short labels, less time
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.91)
    return fig, ax


def _epoch_chart(rows: Rows, keys: Sequence[str], title: str, ylabel: str, scale: float = 1.0) -> Figure | None:
    """One line per key present in any row, against the epoch; None when no key has data."""
    series = {}
    for key in keys:
        values = [plottable(row.get(key)) * scale for row in rows]
        if any(not math.isnan(v) for v in values):
            series[key] = values
    if not series:
        return None
    epochs = [plottable(row.get("epoch", i + 1)) for i, row in enumerate(rows)]
    fig, ax = _new_axes(title, "epoch", ylabel)
    marker = "o" if len(rows) <= MARKER_LIMIT else None
    for key, values in series.items():
        ax.plot(epochs, values, marker=marker, markersize=3, label=key, gid=SERIES_ID + key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    if len(series) > 1:
        ax.legend()
    return fig


def _step_chart(rows: Rows, steps: Steps, key: str, name: str, ylabel: str, log_when_wide: bool) -> Figure | None:
    """`key` per optimizer step from `steps`, else per epoch from the history; None without data."""
    if not steps:
        return _epoch_chart(rows, (key,), f"{name} per epoch", ylabel)
    points = [(float(s), plottable(v)) for s, v in decimate(steps)]
    fig, ax = _new_axes(f"{name} per optimizer step", "optimizer step", ylabel)
    ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2, label=key, gid=SERIES_ID + key)
    values = [v for _, v in points if not math.isnan(v)]
    # a one-cycle or cosine lr spans several decades; on a linear axis its tail looks like 0
    if log_when_wide and values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    return fig


def loss_chart(rows: Rows) -> Figure | None:
    return _epoch_chart(rows, ("train_loss", "val_loss"), "Loss", "loss")


def accuracy_chart(rows: Rows) -> Figure | None:
    return _epoch_chart(rows, ("train_acc", "val_acc", "val_balanced_acc"), "Accuracy", "accuracy (%)", 100.0)


def lr_chart(rows: Rows, steps: Steps = ()) -> Figure | None:
    return _step_chart(rows, steps, "lr", "Learning rate", "lr", log_when_wide=True)


def momentum_chart(rows: Rows, steps: Steps = ()) -> Figure | None:
    return _step_chart(rows, steps, "momentum", "Momentum", "momentum / beta1", log_when_wide=False)


def throughput_chart(rows: Rows) -> Figure | None:
    return _epoch_chart(rows, ("images_per_second",), "Throughput", "training images / s")


def epoch_time_chart(rows: Rows) -> Figure | None:
    return _epoch_chart(rows, ("epoch_seconds",), "Epoch time", "seconds")


def draw_charts(rows: Rows, lr_steps: Steps = (), momentum_steps: Steps = ()) -> dict[str, Figure]:
    """name -> Figure for every chart that has data, in the report's order; lr and momentum per
    epoch when their steps are empty."""
    figures = {
        "loss": loss_chart(rows),
        "accuracy": accuracy_chart(rows),
        "lr": lr_chart(rows, lr_steps),
        "momentum": momentum_chart(rows, momentum_steps),
        "throughput": throughput_chart(rows),
        "epoch_time": epoch_time_chart(rows),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}


def worst_images_figure(images: Sequence[Any], captions: Sequence[str], title: str) -> Figure:
    """The worst-classified images in a row (or two), each captioned "true -> predicted (p)":
    `images` are uint8 (H, W, 3) arrays."""
    columns = min(len(images), 8)
    rows = max(1, math.ceil(len(images) / max(columns, 1)))
    fig = Figure(figsize=(1.3 * max(columns, 1), 1.5 * rows + 0.4), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=9)
    for i, (image, caption) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(image, interpolation="nearest")  # tiny images stay crisp
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    return fig


def figure_rgb(fig: Figure) -> Any:
    """The figure rendered with Agg as a uint8 (H, W, 3) numpy array (what TensorBoard, MLflow and W&B
    take as an image)."""
    import numpy as np

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[:, :, :3])


def svg_element(fig: Figure) -> str:
    """The figure as an `<svg class="chart">` element to inline in HTML, labelled with its title."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata=SVG_METADATA)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]  # the <?xml?> prolog and DOCTYPE do not belong inside HTML
    title = html.escape(fig.axes[0].get_title(), quote=True)
    return text.replace("<svg ", f'<svg class="chart" role="img" aria-label="{title}" ', 1)


def overlay_chart(series: dict[str, Sequence[tuple[float, float]]], title: str, xlabel: str,
                  ylabel: str) -> Figure | None:
    """One line per named series of (x, y) points on shared axes (`imgtrain compare`); None without data."""
    series = {name: points for name, points in series.items() if points}
    if not series:
        return None
    fig, ax = _new_axes(title, xlabel, ylabel)
    for name, points in series.items():
        marker = "o" if len(points) <= MARKER_LIMIT else None
        ax.plot([plottable(x) for x, _ in points], [plottable(y) for _, y in points], marker=marker,
                markersize=3, label=name, gid=SERIES_ID + name)
    ax.legend(fontsize="small")
    return fig


def write_pngs(figures: dict[str, Figure], out_dir: str | Path) -> list[Path]:
    """Write each figure as `out_dir/NAME.png`; returns the paths written."""
    written = []
    for name, fig in figures.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        path = Path(out_dir) / f"{name}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def chart_svgs(rows: Rows, lr_steps: Steps = (), momentum_steps: Steps = ()) -> dict[str, str]:
    """name -> inline SVG of every chart with data, without writing files."""
    return {name: svg_element(fig) for name, fig in draw_charts(rows, lr_steps, momentum_steps).items()}


def plot_history(rows: Rows, lr_steps: Steps, momentum_steps: Steps, out_dir: str | Path) -> list[Path]:
    """Draw NAME.png for every chart with data into `out_dir`; returns the paths written."""
    return write_pngs(draw_charts(rows, lr_steps, momentum_steps), out_dir)


class BudgetedRedraw(Hook):
    """Base of the trackers that redraw at epoch ends: a redraw is skipped (and made up later) while
    less than `redraw_budget_factor` x the last one's cost has passed since it ended (0: never), or
    while `busy()`. The budget runs from fit_start; the last epoch always draws."""

    def __init__(self, redraw_budget_factor: float):
        self.redraw_budget_factor = redraw_budget_factor
        self._last_draw_end: float | None = None
        self._last_cost = FIRST_DRAW_COST
        self._pending = False  # an epoch's redraw was skipped and not yet made up

    def redraw(self, state: Any) -> None:
        raise NotImplementedError

    def busy(self) -> bool:
        return False

    def fit_start(self, state: Any) -> None:
        if self._last_draw_end is None:
            self._last_draw_end = time.perf_counter()

    def epoch_end(self, state: Any) -> None:
        final = state.epoch + 1 >= state.epochs or state.stop_training
        recent = (self._last_draw_end is not None
                  and time.perf_counter() - self._last_draw_end < self.redraw_budget_factor * self._last_cost)
        if not final and (recent or self.busy()):
            self._pending = True
        else:
            self.redraw(state)

    def _drawn(self, started: float) -> None:
        """Time the redraw that began at `started` (time.perf_counter) and ends now."""
        self._last_draw_end = time.perf_counter()
        self._last_cost = self._last_draw_end - started


class PlotTracker(BudgetedRedraw):
    """Records per-step lr and momentum; redraws `run_dir/plots/*.png` and the SVGs in `charts` at epoch ends."""

    name = "plots"

    def __init__(self, run_dir: str | Path, max_points: int = MAX_POINTS,
                 redraw_budget_factor: float = REDRAW_BUDGET_FACTOR, background: bool = True):
        if max_points < 2:
            raise ValueError(f"max_points must be at least 2, got {max_points}")
        super().__init__(redraw_budget_factor)
        self.out_dir = Path(run_dir) / PLOTS_DIR
        self.max_points = max_points
        self.steps: list[int] = []
        self.lr: list[float] = []
        self.momentum: list[float] = []
        self.stride = 1  # record steps that are multiples of this; doubles when the record is full
        self.charts: dict[str, str] = {}  # name -> SVG of the last draw, for report.html
        self.background = background
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None

    def before_step(self, state: Any) -> None:
        # not after_step: by then the scheduler has moved on, and the lr read there is the next step's
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

    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def fit_end(self, state: Any) -> None:
        self.current_charts(state)  # makes up a skipped redraw and waits for the draw

    def redraw(self, state: Any) -> None:
        """Draw every chart from the state's history now (on the background thread when enabled)."""
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

    def current_charts(self, state: Any) -> dict[str, str]:
        """name -> SVG of the whole history, for the report: makes up a skipped redraw, waits for the draw."""
        if self._pending:
            self.redraw(state)
        self.wait()
        return dict(self.charts)

    def wait(self) -> None:
        """Block until a background draw has finished; re-raise what it raised."""
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _draw(self, rows: list[dict[str, Any]], lr: list[tuple[int, float]], momentum: list[tuple[int, float]]) -> None:
        started = time.perf_counter()
        try:
            figures = draw_charts(rows, lr, momentum)
            write_pngs(figures, self.out_dir)
            self.charts = {name: svg_element(fig) for name, fig in figures.items()}
        except BaseException as error:
            self._error = error
        self._drawn(started)

    def lr_steps(self) -> list[tuple[int, float]]:
        return list(zip(self.steps, self.lr, strict=True))

    def momentum_steps(self) -> list[tuple[int, float]]:
        return list(zip(self.steps, self.momentum, strict=True))

    def state_dict(self) -> dict[str, Any]:
        # plain lists and ints only: checkpoints are loaded with torch.load(weights_only=True)
        return {"steps": list(self.steps), "lr": list(self.lr), "momentum": list(self.momentum), "stride": self.stride}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        steps, lr, momentum = state.get("steps", []), state.get("lr", []), state.get("momentum", [])
        if not len(steps) == len(lr) == len(momentum):
            raise ValueError(f"PlotTracker state is inconsistent: {len(steps)} steps, {len(lr)} lr "
                             f"and {len(momentum)} momentum values; the checkpoint may be damaged")
        self.steps = [int(s) for s in steps]
        self.lr = [float(v) for v in lr]
        self.momentum = [float(v) for v in momentum]
        self.stride = int(state.get("stride", 1))

