"""Predict classes for image files, folders or a CSV manifest with a trained model or ensemble.

    rows = predict("runs/fmnist", ["photos/", "more.csv"], topk=3, tta=True)
    write_predictions(rows, "preds.csv", topk=3)

One row per image, in the order given (folders sorted): `path`, `label` (from a CSV manifest),
`class_1`, `prob_1` ... up to `topk`, and `error` (why an image could not be read).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imgtrain.data import BadImageError, DataError, load_image
from imgtrain.evaluation.ensemble import load_predictor
from imgtrain.evaluation.inference import ImageListDataset, TTAArg
from imgtrain.evaluation.metrics import write_csv
from imgtrain.io import atomic_write_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CHUNK = 1024  # images decoded at once


def collect_inputs(inputs: Iterable[str | Path]) -> list[tuple[Path, str | None]]:
    """(path, label or None): files as given; folders searched recursively for images; a .csv
    manifest gives its `path` column (relative to the CSV's folder) and its `label` column if any."""
    found: list[tuple[Path, str | None]] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found.extend((p, None) for p in sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.suffix.lower() == ".csv":
            if not item.is_file():
                raise DataError(f"{item}: no such CSV manifest")
            with open(item, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or "path" not in reader.fieldnames:
                    raise DataError(f"{item}: a manifest needs a `path` column (header: path[,label])")
                found.extend((item.parent / row["path"], row.get("label")) for row in reader)  # None: no label column
        elif item.exists():
            found.append((item, None))
        else:
            raise DataError(f"{item}: no such file or folder")
    return found


def collect_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """The image paths `collect_inputs` finds, without labels."""
    return [path for path, _ in collect_inputs(inputs)]


def predict(target: str | Path, inputs: Iterable[str | Path], topk: int = 1,
            batch_size: int = 64, device: str = "cpu", tta: TTAArg = None) -> list[dict[str, Any]]:
    """One row per image: path, top-k classes and probabilities, or the reason it failed.
    `target`: a run folder, a .safetensors checkpoint or an ensemble folder."""
    if topk < 1:
        raise DataError(f"--topk {topk}: must be at least 1")
    predictor = load_predictor(target, tta=tta, device=device)
    k = min(topk, len(predictor.classes))
    items = collect_inputs(inputs)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(items), CHUNK):
        images, readable = [], []
        for path, label in items[start:start + CHUNK]:
            row: dict[str, Any] = {"path": str(path)}
            if label is not None:
                row["label"] = label
            row["error"] = ""
            rows.append(row)
            try:
                images.append(load_image(path, predictor.channels))
                readable.append(row)
            except BadImageError as exc:
                row["error"] = getattr(exc, "reason", None) or str(exc)
        if not images:
            continue
        probs, _ = predictor.probabilities(ImageListDataset(images), batch_size=batch_size, device=device)
        values, indices = probs.topk(k, dim=1)
        for row, vals, idxs in zip(readable, values.tolist(), indices.tolist()):
            for rank, (p, i) in enumerate(zip(vals, idxs), start=1):
                row[f"class_{rank}"] = predictor.classes[i]
                row[f"prob_{rank}"] = round(p, 6)
    return rows


def write_predictions(rows: list[dict[str, Any]], output: str | Path, topk: int) -> Path:
    """rows as .json (a list of objects) or .csv (one line per image), written atomically."""
    output = Path(output)
    if output.suffix.lower() not in (".csv", ".json"):
        raise DataError(f"--output {output}: give a .csv or .json file name")
    if not output.parent.is_dir():
        raise DataError(f"--output {output}: the folder {output.parent} does not exist")
    if output.suffix.lower() == ".json":
        atomic_write_text(output, json.dumps(rows, indent=2) + "\n")
        return output
    fields = ["path"] + (["label"] if any("label" in r for r in rows) else [])
    fields += [f"{kind}_{rank}" for rank in range(1, topk + 1) for kind in ("class", "prob")] + ["error"]
    return write_csv(output, fields, [[row.get(field, "") for field in fields] for row in rows])


def format_predictions(rows: list[dict[str, Any]], topk: int, limit: int | None = None) -> str:
    lines = []
    for row in rows[:limit]:
        if row["error"]:
            lines.append(f"{row['path']}: ERROR {row['error']}")
            continue
        guesses = ", ".join(f"{row[f'class_{r}']} {row[f'prob_{r}']:.1%}" for r in range(1, topk + 1)
                            if f"class_{r}" in row)
        truth = f"  (label {row['label']})" if row.get("label") is not None else ""
        lines.append(f"{row['path']}: {guesses}{truth}")
    return "\n".join(lines)


__all__ = ["CHUNK", "IMAGE_SUFFIXES", "collect_inputs", "collect_paths", "format_predictions", "predict",
           "write_predictions"]
