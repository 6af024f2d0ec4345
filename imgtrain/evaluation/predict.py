"""Predict classes for image files, folders or a CSV manifest with a trained model."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import torch

from imgtrain.api import load_trained
from imgtrain.data import BadImageError, DataError, load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def collect_paths(inputs: Iterable[Union[str, Path]]) -> List[Path]:
    """Files as given; folders searched recursively for images; a .csv gives its `path` column."""
    paths: List[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.suffix.lower() == ".csv":
            with open(item, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or "path" not in reader.fieldnames:
                    raise DataError(f"{item}: a manifest needs a `path` column (header: path[,label])")
                paths.extend((item.parent / row["path"]) for row in reader)
        elif item.exists():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return paths


@torch.no_grad()
def predict(checkpoint: Union[str, Path], inputs: Iterable[Union[str, Path]], topk: int = 1,
            batch_size: int = 64, device: str = "cpu") -> List[Dict[str, Any]]:
    """One row per image: path, top-k classes and probabilities, or the reason it failed."""
    loaded = load_trained(checkpoint, device=device)
    transform = loaded.eval_transform()
    k = min(topk, len(loaded.classes))
    rows: List[Dict[str, Any]] = []
    batch: List[torch.Tensor] = []
    batch_rows: List[Dict[str, Any]] = []

    def flush() -> None:
        if not batch:
            return
        probs = loaded.model(torch.stack(batch).to(device)).float().softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        for row, vals, idxs in zip(batch_rows, values.tolist(), indices.tolist()):
            for rank, (p, i) in enumerate(zip(vals, idxs), start=1):
                row[f"class_{rank}"] = loaded.classes[i]
                row[f"prob_{rank}"] = round(p, 6)
        batch.clear()
        batch_rows.clear()

    for path in collect_paths(inputs):
        row: Dict[str, Any] = {"path": str(path), "error": ""}
        rows.append(row)
        try:
            image = load_image(path, loaded.channels)
        except BadImageError as exc:
            row["error"] = exc.reason if hasattr(exc, "reason") else str(exc)
            continue
        batch.append(transform(image))
        batch_rows.append(row)
        if len(batch) == batch_size:
            flush()
    flush()
    return rows


def write_predictions(rows: List[Dict[str, Any]], output: Path, topk: int) -> None:
    output = Path(output)
    if output.suffix.lower() == ".json":
        output.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        return
    fields = ["path"] + [f"{kind}_{rank}" for rank in range(1, topk + 1) for kind in ("class", "prob")] + ["error"]
    with open(output, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def format_predictions(rows: List[Dict[str, Any]], topk: int, limit: Optional[int] = None) -> str:
    lines = []
    for row in rows[:limit]:
        if row["error"]:
            lines.append(f"{row['path']}: ERROR {row['error']}")
            continue
        guesses = ", ".join(f"{row[f'class_{r}']} {row[f'prob_{r}']:.1%}" for r in range(1, topk + 1)
                            if f"class_{r}" in row)
        lines.append(f"{row['path']}: {guesses}")
    return "\n".join(lines)
