"""report.html: one self-contained page per run, redrawn at epoch ends (README: The run report).

Everything is inline (PNG data URIs, the charts as SVG, no scripts, no network), so the file can be
mailed as it is; while the run trains it reloads itself every 30 s. `ReportTracker` draws it on the
plots' time budget and `finish` adds the test numbers api.train measured; `rebuild_report(run_dir)`
(`imgtrain report`) draws it again from the run folder, evaluating the best checkpoint on validation.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgtrain.data.transforms import denormalize
from imgtrain.engine.device import peak_memory_mb
from imgtrain.io import RunDirError, atomic_write_bytes, atomic_write_text
from imgtrain.tracking.history import HISTORY_FILE, read_history
from imgtrain.tracking.plots import PLOTS_DIR, REDRAW_BUDGET_FACTOR, BudgetedRedraw, PlotTracker, chart_svgs
from imgtrain.tracking.summary import SUMMARY_FILE, read_summary

REPORT_FILE = "report.html"
REFRESH_SECONDS = 30       # while the run trains, the page reloads itself this often
SAMPLES_SHOWN = 32         # training images in the grid
WORST_SHOWN = 8            # worst-classified validation images (each gets a Grad-CAM)
SAMPLES_FILE = "train_samples.png"  # in plots/: the grid of augmented training images
CONFUSION_TABLE_LIMIT = 40  # up to this many classes the confusion matrix is an HTML table, past it a PNG
MIN_TILE = 96              # small images (8x8 digits) are upscaled to at least this many pixels


@dataclass
class ReportInputs:
    """What the live report needs besides the TrainState: the validation data and its normalisation."""
    val_dataset: Any                 # indexable: the transformed (C, H, W) image and its label; None: no val split
    mean: Sequence[float]
    std: Sequence[float]
    eval_batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class ReportContent:
    """Everything on the page, already drawn; `render_html` only lays it out."""
    title: str
    status: str
    live: bool
    recipe_text: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    confusion: list[list[int]] | None = None
    confusion_note: str = ""
    charts: dict[str, str] = field(default_factory=dict)         # chart name -> inline SVG (plots.py)
    confusion_png: bytes | None = None                        # only past CONFUSION_TABLE_LIMIT classes
    samples_png: bytes | None = None
    samples_note: str = ""
    worst: list[dict[str, Any]] = field(default_factory=list)    # image/cam PNGs, true, predicted, prob, loss
    worst_note: str = ""
    resources: dict[str, Any] = field(default_factory=dict)


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) -> (H, W, 3) array."""
    array = image.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def upscale(array: np.ndarray, min_side: int = MIN_TILE) -> np.ndarray:
    """Nearest-neighbour upscale by a whole factor so tiny images stay visible and crisp."""
    factor = max(1, math.ceil(min_side / max(1, min(array.shape[:2]))))
    return array.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else array


def image_grid(images: torch.Tensor, columns: int = 8, gap: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> one (H', W', 3) grid, tiles upscaled to at least MIN_TILE px."""
    tiles = [upscale(to_rgb(img)) for img in images]
    h, w = tiles[0].shape[:2]
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return grid


def worst_gallery(model: torch.nn.Module, inputs: torch.Tensor, targets: Sequence[int], losses: Sequence[float],
                  classes: Sequence[str], mean: Sequence[float], std: Sequence[float]) -> tuple:
    """Rows of the worst-images table: the image, its Grad-CAM for the predicted class, the
    true and predicted class, the probability and the loss. (rows, note)"""
    with torch.no_grad():
        was_training = model.training
        model.eval()
        probs = model(inputs).float().softmax(dim=1)
        model.train(was_training)
    predicted = probs.argmax(dim=1)
    pixels = denormalize(inputs, mean, std)
    note = "Grad-CAM of the predicted class on the model's last convolutional stage"
    overlays: list[Any]
    try:
        from imgtrain.evaluation.explain import cam_heatmaps, overlay
        heatmaps = cam_heatmaps(model, inputs, target_classes=predicted.tolist())
        overlays = [upscale(overlay(to_rgb(img), heat)) for img, heat in zip(pixels, heatmaps)]
    except Exception as exc:
        overlays = [None] * len(pixels)
        note = f"no Grad-CAM: {type(exc).__name__}: {exc}"
    rows = [{"image": png_bytes(upscale(to_rgb(img))),
             "cam": png_bytes(overlays[i]) if overlays[i] is not None else None,
             "true": str(classes[int(targets[i])]), "predicted": str(classes[int(predicted[i])]),
             "probability": float(probs[i, predicted[i]]), "true_probability": float(probs[i, int(targets[i])]),
             "loss": float(losses[i])} for i, img in enumerate(pixels)]
    return rows, note


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.status{color:#555}.live{color:#b35c00}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td.name,th.name{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:8px}.figs figure{margin:0}svg.chart{max-width:100%;height:auto}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
.headline td{font-size:1.1em}
table.confusion td{min-width:2.2em;text-align:center}
img.pixel{image-rendering:pixelated}
"""


def _img(data: bytes | None, alt: str, css: str = "") -> str:
    if not data:
        return "<em>none</em>"
    encoded = base64.b64encode(data).decode("ascii")
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)) and not (isinstance(value, float) and not math.isfinite(value)):
        if "acc" in key and isinstance(value, float) and 0.0 <= value <= 1.0:
            return f"{value:.2%}"
        if isinstance(value, int):
            return str(value)
        if key in ("lr",) or (abs(value) < 1e-3 and value != 0):
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str, keys: Sequence[str] = ()) -> str:
    keys = list(keys) or list(header)
    head = "".join(f'<th class="name">{html.escape(h)}</th>' if i == 0 else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = "".join(f'<td class="name">{_fmt(keys[i], v)}</td>' if i == 0 else f"<td>{_fmt(keys[i], v)}</td>"
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


HEADLINE_KEYS = [("best validation accuracy", "best_val_acc"), ("test accuracy", "test_acc"),
                 ("test accuracy with TTA", "test_acc_tta"), ("test balanced accuracy", "test_balanced_acc"),
                 ("test balanced accuracy with TTA", "test_balanced_acc_tta"), ("best epoch", "best_epoch"),
                 ("epochs run", "epochs_run"), ("device", "device"), ("precision", "amp")]


def render_html(content: ReportContent) -> str:
    """The whole page as one string."""
    from imgtrain.evaluation.metrics import per_class_scores

    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">']
    if content.live:
        parts.append(f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">')
    parts.append(f"<title>{html.escape(content.title)}</title><style>{CSS}</style></head><body>")
    parts.append(f"<h1>{html.escape(content.title)}</h1>")
    live = " live" if content.live else ""
    parts.append(f'<p class="status{live}" id="status">{html.escape(content.status)}</p>')

    summary = dict(content.summary)
    if content.history and "best_val_acc" not in summary and any("val_acc" in r for r in content.history):
        summary["best_val_acc"] = max(r.get("val_acc", 0.0) for r in content.history)
    parts.append('<h2 id="summary">Summary</h2>')
    # each value formatted by its own key: accuracies as %, the rest as they are
    body = "".join(f'<tr><td class="name">{html.escape(label)}</td><td>{_fmt(key, summary[key])}</td></tr>'
                   for label, key in HEADLINE_KEYS if key in summary)
    if body:
        if "test_tta" in summary:
            body += f'<tr><td class="name">TTA views</td><td>{html.escape(str(summary["test_tta"]))}</td></tr>'
        parts.append(f'<table id="summary-table" class="headline"><thead><tr><th class="name"></th><th>value</th>'
                     f"</tr></thead><tbody>{body}</tbody></table>")
    else:
        parts.append("<p>No epoch has finished yet.</p>")

    parts.append('<h2 id="curves">Curves</h2><div class="figs">')
    parts.extend(f"<figure>{svg}</figure>" for svg in content.charts.values())  # each chart carries its title
    parts.append("</div>")

    if content.history:
        columns = [c for c in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr",
                               "img_size", "batch_size", "epoch_seconds", "images_per_second")
                   if any(c in r for r in content.history)]
        parts.append('<h2 id="history">History</h2>')
        parts.append(_table(columns, [[r.get(c) for c in columns] for r in content.history], "history-table"))

    parts.append('<h2 id="per-class">Per class</h2>')
    if content.confusion is not None:
        parts.append(f"<p>{html.escape(content.confusion_note)}</p>")
        scores = per_class_scores(torch.tensor(content.confusion), content.classes)
        rows = [(name, s["precision"], s["recall"], s["f1"], s["support"]) for name, s in scores.items()]
        parts.append(_table(["class", "precision", "recall", "F1", "support"], rows, "per-class-table",
                            ["class", "precision", "recall", "f1", "support"]))
        parts.append('<h2 id="confusion">Confusion matrix</h2>')
        if content.confusion_png is not None:
            parts.append(_img(content.confusion_png, "confusion matrix"))
        else:
            parts.append(confusion_table(content.confusion, content.classes))
    else:
        parts.append("<p>No validation split: nothing to show per class.</p>")

    parts.append('<h2 id="samples">Training images as augmented</h2>')
    parts.append(f"<p>{html.escape(content.samples_note)}</p>" if content.samples_note else "")
    parts.append(_img(content.samples_png, "training samples", "pixel"))

    parts.append('<h2 id="worst">Worst-classified validation images</h2>')
    if content.worst:
        parts.append(f"<p>{html.escape(content.worst_note)}</p>")
        cells = [f"<tr><td class=\"name\">{i}</td><td>{_img(row['image'], 'image ' + str(i), 'pixel')}</td>"
                 f"<td>{_img(row['cam'], 'Grad-CAM ' + str(i))}</td>"
                 f"<td>{html.escape(row['true'])}</td><td>{html.escape(row['predicted'])}</td>"
                 f"<td>{row['probability']:.2%}</td><td>{row['true_probability']:.2%}</td>"
                 f"<td>{row['loss']:.4f}</td></tr>" for i, row in enumerate(content.worst, start=1)]
        parts.append('<table id="worst-table"><thead><tr><th class="name">#</th><th>image</th><th>Grad-CAM</th>'
                     "<th>true</th><th>predicted</th><th>p(predicted)</th><th>p(true)</th><th>loss</th></tr></thead>"
                     f"<tbody>{''.join(cells)}</tbody></table>")
    else:
        parts.append("<p>None yet.</p>")

    parts.append('<h2 id="timing">Timing and memory</h2>')
    if content.resources:
        body = "".join(f'<tr><td class="name">{html.escape(k.replace("_", " "))}</td><td>{_fmt(k, v)}</td></tr>'
                       for k, v in content.resources.items())
        parts.append(f'<table id="timing-table"><tbody>{body}</tbody></table>')

    parts.append('<h2 id="recipe">Recipe</h2>')
    parts.append(f"<pre>{html.escape(content.recipe_text)}</pre>")
    parts.append(f"<p class=\"status\">drawn {time.strftime('%Y-%m-%d %H:%M:%S')}</p></body></html>")
    return "\n".join(p for p in parts if p)


def confusion_table(confusion: list[list[int]], classes: Sequence[str]) -> str:
    """Rows: true class, columns: predicted; each cell shaded by its share of the true class."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in classes)
    rows = []
    for name, row in zip(classes, confusion):
        total = max(sum(row), 1)
        cells = []
        for count in row:
            share = count / total
            colour = "#fff" if share > 0.5 else "#222"
            cells.append(f'<td style="background:rgba(31,119,180,{share:.3f});color:{colour}">{count}</td>')
        rows.append(f'<tr><th class="name">{html.escape(str(name))}</th>{"".join(cells)}</tr>')
    return ('<table id="confusion-table" class="confusion"><thead><tr><th class="name">true \\ predicted</th>'
            f'{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def write_report(run_dir: str | Path, content: ReportContent) -> Path:
    """run_dir/report.html, replaced atomically (a browser reloading it never sees half a page)."""
    path = Path(run_dir) / REPORT_FILE
    atomic_write_text(path, render_html(content))
    return path


def resources_of(history: Sequence[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    seconds: list[float] = [r["epoch_seconds"] for r in history if isinstance(r.get("epoch_seconds"), (int, float))]
    if seconds:
        out["training seconds (epochs)"] = round(sum(seconds), 1)
        out["mean epoch seconds"] = round(sum(seconds) / len(seconds), 2)
    if "images_per_second" in summary:
        out["training images per second"] = summary["images_per_second"]
    elif history and "images_per_second" in history[-1]:
        out["training images per second"] = history[-1]["images_per_second"]
    for key in ("total_seconds", "peak_host_memory_mb", "peak_device_memory_mb"):
        if key in summary:
            out[key] = summary[key]
    return out


class ReportTracker(BudgetedRedraw):
    """Redraws run_dir/report.html at epoch ends (on a time budget; the last epoch always)."""

    name = "report"

    def __init__(self, run_dir: str | Path, inputs: ReportInputs | None = None,
                 plots: PlotTracker | None = None, redraw_budget_factor: float | None = None):
        super().__init__(REDRAW_BUDGET_FACTOR if redraw_budget_factor is None else redraw_budget_factor)
        self.run_dir = Path(run_dir)
        self.inputs = inputs
        self.plots = plots  # draws the charts (once, for plots/ and this page); None: drawn here
        self.content: ReportContent | None = None
        self.samples_png: bytes | None = None
        self.samples_note = ""

    def after_forward(self, state: Any) -> None:
        # the first batch the model trains on, after every batch strategy: one copy to the host per run
        if self.samples_png is not None or self.inputs is None or state.inputs is None:
            return
        batch = state.inputs[:SAMPLES_SHOWN]
        self.samples_png = png_bytes(image_grid(denormalize(batch, self.inputs.mean, self.inputs.std)))
        self.samples_note = (f"the first training batch of epoch {state.epoch + 1} as the model received it: "
                             f"{tuple(batch.shape[1:])} per image, after augmentation and batch strategies")
        # kept on disk too, for `imgtrain report` to rebuild the page from the run folder
        atomic_write_bytes(self.run_dir / PLOTS_DIR / SAMPLES_FILE, self.samples_png)

    def fit_end(self, state: Any) -> None:
        if self._pending or self.content is None:
            self.redraw(state)

    def redraw(self, state: Any) -> None:
        started = time.perf_counter()
        self._pending = False
        self.content = self.live_content(state)
        write_report(self.run_dir, self.content)
        self._drawn(started)

    def finish(self, summary: dict[str, Any]) -> Path | None:
        """The final page, with the test numbers api.train measured after fit."""
        if self.content is None:
            return None
        self.content.summary = dict(summary)
        self.content.live = False
        self.content.status = f"finished: {len(self.content.history)} epochs, {summary.get('total_seconds', 0):.0f} s"
        self.content.resources = resources_of(self.content.history, summary)
        return write_report(self.run_dir, self.content)

    def live_content(self, state: Any) -> ReportContent:
        history = [dict(r) for r in state.history]
        epoch = len(history)
        config = self.run_dir / "config.yaml"
        recipe_text = config.read_text(encoding="utf-8") if config.is_file() else str(state.recipe)
        content = ReportContent(title=f"imgtrain run {self.run_dir.name}",
                                status=f"training: epoch {epoch} of {state.epochs} finished",
                                live=True, recipe_text=recipe_text,
                                history=history, summary=dict(state.summary), classes=list(state.classes),
                                samples_png=self.samples_png, samples_note=self.samples_note)
        content.resources = resources_of(history, peak_memory_mb(state.device))
        if state.val_confusion is not None:
            content.confusion = state.val_confusion
            accuracy = history[-1].get("val_acc", 0)
            content.confusion_note = f"validation split after epoch {epoch} ({accuracy:.2%} accurate)"
            if len(content.classes) > CONFUSION_TABLE_LIMIT:
                from imgtrain.evaluation.metrics import confusion_png  # matplotlib: only when it is drawn
                content.confusion_png = confusion_png(content.confusion, content.classes, f"validation, epoch {epoch}")
        if state.val_worst and self.inputs is not None and self.inputs.val_dataset is not None:
            content.worst, content.worst_note = self._worst(state)
        # last: the PlotTracker draws on its own thread while the rest of the page is made
        content.charts = self.plots.current_charts(state) if self.plots is not None else chart_svgs(history)
        return content

    def _worst(self, state: Any) -> tuple:
        assert self.inputs is not None, "the report shows worst images only when it was given the val images"
        chosen = state.val_worst[:WORST_SHOWN]
        items = [self.inputs.val_dataset[entry["index"]] for entry in chosen]
        inputs = torch.stack([torch.as_tensor(image) for image, _ in items]).to(state.device)
        if self.inputs.eval_batch_transform is not None:
            inputs = self.inputs.eval_batch_transform(inputs)
        model = state.eval_model if state.eval_model is not None else state.model
        try:
            return worst_gallery(model, inputs, [int(t) for _, t in items], [e["loss"] for e in chosen],
                                 state.classes, self.inputs.mean, self.inputs.std)
        except Exception:
            return [], "could not draw the worst images:\n" + traceback.format_exc(limit=2)


def _recorded_steps(run_dir: Path) -> tuple:
    """The per-step lr and momentum the PlotTracker kept in checkpoints/last.state.pt, if any."""
    from imgtrain.engine.checkpoint import CheckpointError, load_training_state

    path = run_dir / "checkpoints" / "last.state.pt"
    if not path.is_file():
        return (), ()
    try:
        record = load_training_state(path).get("hooks", {}).get("plots", {})
    except CheckpointError:
        return (), ()
    steps = record.get("steps", [])
    return list(zip(steps, record.get("lr", []))), list(zip(steps, record.get("momentum", [])))


def rebuild_report(run_dir: str | Path, device: str = "cpu", batch_size: int = 256) -> Path:
    """Draw run_dir/report.html from its files: config.yaml, history.csv, summary.json, plots/,
    and the best (else last) checkpoint evaluated on the recipe's validation split."""
    from imgtrain.evaluation.evaluate import evaluation_data
    from imgtrain.evaluation.inference import run_model
    from imgtrain.evaluation.metrics import PROB_FLOOR, compute_metrics, confusion_png
    from imgtrain.models.trained import load_trained

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: not a run folder (no config.yaml)")
    history = read_history(run_dir / HISTORY_FILE) if (run_dir / HISTORY_FILE).is_file() else []
    summary = read_summary(run_dir) if (run_dir / SUMMARY_FILE).is_file() else {}
    loaded = load_trained(run_dir, device=device)
    content = ReportContent(title=f"imgtrain run {run_dir.name}",
                            status=(f"finished: {len(history)} epochs, {summary.get('total_seconds', 0):.0f} s"
                                    if summary else f"unfinished: {len(history)} epochs in history.csv"),
                            live=False, recipe_text=(run_dir / "config.yaml").read_text(encoding="utf-8"),
                            history=history, summary=summary, classes=list(loaded.classes))
    lr_steps, momentum_steps = _recorded_steps(run_dir)
    content.charts = chart_svgs(history, lr_steps, momentum_steps)  # the charts of plots/*.png
    content.resources = resources_of(history, summary)
    samples = run_dir / PLOTS_DIR / SAMPLES_FILE
    if samples.is_file():
        content.samples_png = samples.read_bytes()
    else:
        content.samples_note = "the training images are drawn during training only"
    try:
        dataset, _, _ = evaluation_data(loaded.recipe, "val")
    except Exception:
        dataset = None
    if dataset is not None and len(dataset):
        transformed = dataset.with_transform(loaded.eval_transform())
        probs, targets = run_model(loaded.model, transformed, batch_size=batch_size, device=device)
        metrics = compute_metrics(probs, targets, loaded.classes)  # as `imgtrain evaluate --split val` counts
        content.confusion = metrics["confusion"]
        which = loaded.path.name
        content.confusion_note = f"validation split, {which} ({metrics['acc']:.2%} accurate)"
        if len(content.classes) > CONFUSION_TABLE_LIMIT:
            content.confusion_png = confusion_png(content.confusion, content.classes, f"validation, {which}")
        losses = -probs.gather(1, targets[:, None]).squeeze(1).clamp_min(PROB_FLOOR).log()
        worst = losses.topk(min(WORST_SHOWN, len(losses))).indices.tolist()
        inputs = torch.stack([transformed[i][0] for i in worst]).to(device)
        content.worst, content.worst_note = worst_gallery(loaded.model, inputs, [int(targets[i]) for i in worst],
                                                          [float(losses[i]) for i in worst], loaded.classes,
                                                          loaded.mean, loaded.std)
    return write_report(run_dir, content)


__all__ = ["REPORT_FILE", "ReportContent", "ReportInputs", "ReportTracker", "image_grid",
           "rebuild_report", "render_html", "worst_gallery", "write_report"]
