"""`imgtrain compare`: runs side by side, the table training projects put in their READMEs.

Each argument is a run folder, a study folder of `imgtrain tune` (its best trial, or every trial with
`all_trials`) or an ensemble folder of `imgtrain ensemble --save` (evaluated with `imgtrain evaluate`).
A run evaluated with test-time augmentation (`imgtrain evaluate RUN --tta`) adds a second row.

One row per run: the strategy (the recipe keys whose values differ between the runs), model and
parameters, best and final validation metric, test accuracy, epochs, wall time, images/s, epochs and
time until the validation metric first reached `target`, and peak memory. Times are seconds of
training from its start (validation included, start-up and the final test pass not), read from
events.jsonl, so a resumed run counts only the time its epochs took.

Written as text (the console), Markdown, CSV or one self-contained HTML page that also overlays the
validation curves against epochs and against wall time.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from imgtrain.io import RunDirError, atomic_write_text
from imgtrain.tracking.plots import overlay_chart, svg_element

FORMATS = (".md", ".html", ".csv")
# recipe keys that say where things are written or how they are shown, not how the model was trained
IGNORED_PREFIXES = ("output.", "search.")
IGNORED_KEYS = {"model.name", "data.workers", "data.cache_dir", "data.prefetch_factor", "data.persistent_workers",
                "train.threads"}
BEST_TRIAL = re.compile(r"# The best trial \((\d+):")


@dataclass
class ComparedRun:
    """One row of the comparison, with the validation curve behind its time-to-target columns."""
    label: str
    path: Path
    kind: str                                   # run | trial | tta | ensemble
    config: dict[str, Any] = field(default_factory=dict)   # the resolved recipe, as dotted keys
    model: str = ""
    parameters: int | None = None
    best_val: float | None = None
    final_val: float | None = None
    test_acc: float | None = None
    epochs: int | None = None
    wall_seconds: float | None = None
    images_per_second: float | None = None
    peak_memory_mb: float | None = None
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (epoch, seconds, metric)
    strategy: str = ""
    note: str = ""
    metric: str = "val_acc"                     # the validation column of the curve

    def reached(self, target: float) -> tuple[int, float] | None:
        """(epoch, seconds) when the validation metric first reached `target` (a loss: fell to it);
        None if it never did."""
        lower = lower_is_better(self.metric)
        for epoch, seconds, value in self.curve:
            if (value <= target) if lower else (value >= target):
                return epoch, seconds
        return None


def lower_is_better(metric: str) -> bool:
    """A loss (val_loss, ...) is better when lower; accuracies and the rest when higher."""
    return "loss" in metric


# ----------------------------------------------------------------------------- reading

def flatten(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; lists and other values stay as they are."""
    flat: dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: cannot read it ({exc})") from None
    return data if isinstance(data, dict) else {}


def _events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line cut by a kill: the lines before it still count
            continue
    return events


def _history(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def validation_curve(run_dir: Path, metric: str) -> list[tuple[int, float, float]]:
    """(epoch, seconds since training started, metric) per epoch. The seconds come from events.jsonl's
    timestamps, restarting at each fit_start of a resumed run from where the run had got to; without
    events, the sum of history.csv's epoch_seconds (training only)."""
    points: dict[int, tuple[float, float]] = {}
    base = segment_start = None
    for event in _events(run_dir):
        stamp = _time(event.get("time"))
        if event.get("event") == "fit_start" and stamp is not None:
            segment_start = stamp
            base = max((s for s, _ in points.values()), default=0.0)
        elif event.get("event") == "epoch_end" and segment_start is not None and stamp is not None:
            value = _number(event.get(metric))
            if value is not None and isinstance(event.get("epoch"), int):
                points[event["epoch"]] = ((base or 0.0) + (stamp - segment_start).total_seconds(), value)
    if not points:  # no event log: training seconds from the history
        elapsed = 0.0
        for row in _history(run_dir):
            elapsed += _number(row.get("epoch_seconds")) or 0.0
            value, epoch = _number(row.get(metric)), _number(row.get("epoch"))
            if value is not None and epoch is not None:
                points[int(epoch)] = (elapsed, value)
    return [(epoch, seconds, value) for epoch, (seconds, value) in sorted(points.items())]


def _time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def read_run(run_dir: Path, metric: str, kind: str = "run", label: str | None = None) -> ComparedRun:
    """A training run folder as one row (a run still training, or killed, gives what it has so far)."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise RunDirError(f"{run_dir}: not a run folder (no config.yaml)")
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RunDirError(f"{config_file}: not readable YAML ({exc})") from None
    summary = _json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    start = next((e for e in _events(run_dir) if e.get("event") == "fit_start"), {})
    curve = validation_curve(run_dir, metric)
    values = [value for _, _, value in curve]
    row = ComparedRun(label=label or run_dir.name, path=run_dir, kind=kind, config=flatten(config),
                      model=str(config.get("model", {}).get("name", "")), parameters=start.get("parameters"),
                      curve=curve, metric=metric)
    row.best_val = (min(values) if lower_is_better(metric) else max(values)) if values else None
    row.final_val = values[-1] if values else None
    row.test_acc = _number(summary.get("test_acc"))
    row.epochs = summary.get("epochs_run", len(curve) or None)
    row.wall_seconds = _number(summary.get("wall_seconds")) or (curve[-1][1] if curve else None)
    row.images_per_second = _number(summary.get("images_per_second"))
    row.peak_memory_mb = _number(summary.get("peak_device_memory_mb")) or _number(summary.get("peak_host_memory_mb"))
    if not summary:
        row.note = "no summary.json: still training or stopped"
    return row


def tta_row(run: ComparedRun) -> ComparedRun | None:
    """A second row for a run whose saved test evaluation (`imgtrain evaluate RUN --tta`) used TTA."""
    path = run.path / "evaluation" / "test" / "metrics.json"
    if not path.is_file():
        return None
    metrics = _json(path)
    if not metrics.get("tta") or _number(metrics.get("acc")) is None:
        return None
    views = metrics["tta"] if isinstance(metrics["tta"], str) else "+".join(map(str, metrics["tta"]))
    return ComparedRun(label=f"{run.label} + TTA", path=run.path, kind="tta", config=run.config, model=run.model,
                       parameters=run.parameters, test_acc=_number(metrics["acc"]), epochs=run.epochs,
                       wall_seconds=run.wall_seconds, peak_memory_mb=run.peak_memory_mb,
                       strategy=f"test-time augmentation: {views}",
                       note=f"without TTA {_number(metrics.get('without_tta', {}).get('acc')) or 0:.4f}")


def read_ensemble(folder: Path, metric: str) -> ComparedRun:
    """An ensemble folder: its test accuracy from `imgtrain evaluate DIR`, the members' costs summed."""
    spec = yaml.safe_load((folder / "ensemble.yaml").read_text(encoding="utf-8")) or {}
    members = spec.get("members") or []
    evaluated = folder / "evaluation" / "test" / "metrics.json"
    row = ComparedRun(label=folder.name, path=folder, kind="ensemble",
                      model=" + ".join(str(m.get("model", "?")) for m in members),
                      test_acc=_number(_json(evaluated).get("acc")) if evaluated.is_file() else None,
                      strategy=f"ensemble of {len(members)} ({spec.get('vote', 'soft')} vote)")
    runs = []
    for member in members:  # source: the member's checkpoint in its run folder (RUN/checkpoints/x.safetensors)
        source = Path(str(member.get("source", "")))
        if (source.parent.parent / "config.yaml").is_file():
            runs.append(read_run(source.parent.parent, metric))
    if runs and len(runs) == len(members):
        row.parameters = sum(r.parameters or 0 for r in runs) or None
        row.wall_seconds = sum(r.wall_seconds or 0.0 for r in runs)
        row.epochs = sum(r.epochs or 0 for r in runs)
        row.note = "time and epochs: the members' together"
    if row.test_acc is None:
        row.note = f"not evaluated yet: imgtrain evaluate {folder}"
    return row


def study_runs(folder: Path, all_trials: bool) -> list[Path]:
    """The trial run folders of a study: its best trial (named in best.yaml), or all of them."""
    trials = sorted(p for p in folder.glob("trial-*") if (p / "config.yaml").is_file())
    if all_trials or not (folder / "best.yaml").is_file():
        return trials
    first = (folder / "best.yaml").read_text(encoding="utf-8").splitlines()[:1]
    match = BEST_TRIAL.match(first[0]) if first else None
    best = folder / f"trial-{int(match.group(1)):04d}" if match else None
    return [best] if best is not None and best.is_dir() else trials


def collect(paths: Sequence[str | Path], metric: str = "val_acc", all_trials: bool = False) -> list[ComparedRun]:
    """The rows for `paths` (run, study or ensemble folders), labelled so that no two are the same."""
    rows: list[ComparedRun] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise RunDirError(f"{path}: no such folder (give run folders, `imgtrain tune` study folders or "
                              "`imgtrain ensemble --save` folders)")
        if (path / "ensemble.yaml").is_file():
            rows.append(read_ensemble(path, metric))
        elif (path / "recipe.yaml").is_file() and (path / "study.csv").is_file():
            trials = study_runs(path, all_trials)
            if not trials:
                raise RunDirError(f"{path}: a study folder without any trial run folder yet")
            rows += [read_run(t, metric, kind="trial", label=f"{path.name}/{t.name}") for t in trials]
        elif (path / "config.yaml").is_file():
            rows.append(read_run(path, metric))
        else:
            raise RunDirError(f"{path}: not a run folder (config.yaml), a study folder (recipe.yaml and "
                              "study.csv) or an ensemble folder (ensemble.yaml)")
        if rows and rows[-1].kind == "run" and (extra := tta_row(rows[-1])) is not None:
            rows.append(extra)
    _unique_labels(rows)
    _describe_strategies(rows)
    return rows


def _unique_labels(rows: list[ComparedRun]) -> None:
    """Rows of the same name get their parent folder's name in front, then a number if still the same."""
    counts = Counter(row.label for row in rows)
    for row in rows:
        if counts[row.label] > 1 and row.path.parent.name:
            row.label = f"{row.path.parent.name}/{row.label}"
    seen: Counter[str] = Counter()
    for row in rows:
        seen[row.label] += 1
        if seen[row.label] > 1:
            row.label = f"{row.label} #{seen[row.label]}"


def differing_keys(rows: Sequence[ComparedRun]) -> list[str]:
    """The recipe keys whose value is not the same in every run (where things are written, and the model's
    name, which has its own column: not counted)."""
    configs = [row.config for row in rows if row.kind in ("run", "trial")]
    keys = sorted({key for config in configs for key in config})
    keys = [k for k in keys if not k.startswith(IGNORED_PREFIXES) and k not in IGNORED_KEYS]
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def _describe_strategies(rows: list[ComparedRun]) -> None:
    """Each run's strategy: the keys where its recipe differs from the first run's (that one: all keys
    that differ anywhere, so a reader sees what the others change)."""
    keys = differing_keys(rows)
    runs = [row for row in rows if row.kind in ("run", "trial")]
    for index, row in enumerate(runs):
        changed = keys if index == 0 else [k for k in keys if _same(row.config.get(k), runs[0].config.get(k)) is False]
        row.strategy = ", ".join(f"{k}={_short(row.config.get(k))}" for k in changed) or (
            "the same recipe" if row.model == runs[0].model else "the same recipe, another model")
        if index == 0 and len(runs) > 1:
            row.strategy = "baseline" + (f": {row.strategy}" if changed and len(changed) <= 3 else "")


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str).replace(" ", "")
    return str(value)


# ----------------------------------------------------------------------------- the table

COLUMNS = ("run", "strategy", "model", "parameters", "best val", "final val", "test acc", "epochs", "wall s",
           "images/s", "epochs to target", "s to target", "peak MB")


def table_rows(rows: Sequence[ComparedRun], target: float | None, metric: str = "val_acc") -> list[list[Any]]:
    """The table's cells, raw (None where unknown), in COLUMNS order."""
    cells = []
    for row in rows:
        reached = row.reached(target) if target is not None and row.curve else None
        cells.append([row.label, row.strategy, row.model, row.parameters, row.best_val, row.final_val, row.test_acc,
                      row.epochs, row.wall_seconds, row.images_per_second,
                      reached[0] if reached else None, reached[1] if reached else None, row.peak_memory_mb])
    return cells


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("best val", "final val", "test acc"):
        return f"{value:.4f}"
    if column == "parameters":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:,}"
    if column in ("wall s", "s to target"):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    if column in ("images/s", "peak MB"):
        return f"{value:.0f}"
    return str(value)


def format_text(rows: Sequence[ComparedRun], target: float | None, metric: str = "val_acc") -> str:
    """An aligned plain-text table for the console, with a line on what 'target' means."""
    header = _header(metric, target)
    body = [[_cell(c, v) for c, v in zip(COLUMNS, cells)] for cells in table_rows(rows, target, metric)]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines) + "\n" + _footnote(metric, target)


def _header(metric: str, target: float | None) -> list[str]:
    names = {"best val": f"best {metric}", "final val": f"final {metric}"}
    if target is not None:
        names |= {"epochs to target": f"epochs to {target:g}", "s to target": f"s to {target:g}"}
    return [names.get(c, c) for c in COLUMNS]


def _footnote(metric: str, target: float | None) -> str:
    lines = ["wall s: training from its start, validation included; strategy: the recipe keys that differ from "
             "the first run's"]
    if target is not None:
        lines.append(f"to {target:g}: the first epoch whose {metric} reached {target:g} ('-': never)")
    if lower_is_better(metric):
        lines.append(f"best {metric}: the lowest")
    return "\n".join(lines) + "\n"


def format_markdown(rows: Sequence[ComparedRun], target: float | None, metric: str = "val_acc") -> str:
    header = _header(metric, target)
    body = [[_cell(c, v).replace("|", "\\|") for c, v in zip(COLUMNS, cells)]
            for cells in table_rows(rows, target, metric)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n\n" + _footnote(metric, target)


def format_csv(rows: Sequence[ComparedRun], target: float | None, metric: str = "val_acc") -> str:
    """Every number unrounded, one row per run, with the run folder and the note."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*_header(metric, target), "path", "note"])
    for row, cells in zip(rows, table_rows(rows, target, metric)):
        writer.writerow([("" if v is None else v) for v in cells] + [str(row.path), row.note])
    return buffer.getvalue()


def format_html(rows: Sequence[ComparedRun], target: float | None, metric: str = "val_acc") -> str:
    """One self-contained page: the table and the validation curves against epochs and wall time."""
    header = _header(metric, target)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c, v))}</td>" for c, v in zip(COLUMNS, cells))
                   + "</tr>" for cells in table_rows(rows, target, metric))
    curves = {row.label: row.curve for row in rows if row.curve}
    charts = [overlay_chart({k: [(e, v) for e, _, v in c] for k, c in curves.items()},
                            f"{metric} per epoch", "epoch", metric),
              overlay_chart({k: [(s / 60, v) for _, s, v in c] for k, c in curves.items()},
                            f"{metric} against wall time", "minutes of training", metric)]
    svgs = "".join(svg_element(fig) for fig in charts if fig is not None)
    notes = "".join(f"<li>{html.escape(r.label)}: {html.escape(r.note)}</li>" for r in rows if r.note)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>imgtrain compare</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}"
        ".chart{max-width:100%;height:auto;margin:1em 1em 0 0}</style></head><body>"
        f"<h1>imgtrain compare: {len(rows)} runs</h1>"
        f"<table id=\"comparison\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<p>{html.escape(_footnote(metric, target)).replace(chr(10), '<br>')}</p>"
        + (f"<ul>{notes}</ul>" if notes else "") + f"<div id=\"curves\">{svgs}</div></body></html>\n")


def write_comparison(rows: Sequence[ComparedRun], path: str | Path, target: float | None,
                     metric: str = "val_acc") -> Path:
    """compare.md, .html or .csv by the file's suffix, written atomically."""
    path = Path(path)
    writers = {".md": format_markdown, ".html": format_html, ".csv": format_csv}
    if path.suffix.lower() not in writers:
        raise RunDirError(f"--output {path}: give a file ending in {', '.join(FORMATS)}")
    atomic_write_text(path, writers[path.suffix.lower()](rows, target, metric))
    return path
