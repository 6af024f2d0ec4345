"""Classification metrics from predicted probabilities, computed with torchmetrics.

    suite = MetricSuite(num_classes=10)
    for probs, targets in batches:
        suite.update(probs, targets)
    metrics = suite.compute(classes)   # a plain dict: see `MetricSuite.compute`

Under DDP torchmetrics all-reduces its states, so the numbers are the whole split's. Per-class
scores and balanced accuracy follow scikit-learn (balanced accuracy averages recall over the
classes that occur in the targets; an undefined precision or F1 is 0).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from imgtrain.io import atomic_write_bytes, atomic_write_text

ECE_BINS = 15
TOP5 = 5  # top-5 accuracy is reported when there are more classes than this
PROB_FLOOR = 1e-12  # -log(0) is inf: a hard vote can give the true class probability 0


class MetricSuite:
    """Accumulates predictions batch by batch; `compute` gives every metric the tools report."""

    def __init__(self, num_classes: int, device: str | torch.device = "cpu"):
        if num_classes < 2:
            raise ValueError(f"classification metrics need at least 2 classes, got {num_classes}")
        # imported here: torchmetrics costs a second at start-up, which a command that fails on its input,
        # or that never evaluates, should not pay
        from torchmetrics import MeanMetric
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassCalibrationError,
            MulticlassConfusionMatrix,
        )

        self.num_classes = num_classes
        self.confusion = MulticlassConfusionMatrix(num_classes).to(device)
        self.top5 = MulticlassAccuracy(num_classes, top_k=TOP5, average="micro").to(device) \
            if num_classes > TOP5 else None
        self.ece = MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm="l1").to(device)
        self.loss = MeanMetric().to(device)

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        """probs: (N, C) probabilities (rows sum to 1); targets: (N,) class indices."""
        if probs.dim() != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must have shape (N, {self.num_classes}), got {tuple(probs.shape)}")
        probs, targets = probs.float(), targets.long()
        self.confusion.update(probs.argmax(dim=1), targets)
        if self.top5 is not None:
            self.top5.update(probs, targets)
        self.ece.update(probs, targets)
        picked = probs.gather(1, targets[:, None]).squeeze(1)
        self.loss.update(-picked.clamp_min(PROB_FLOOR).log())

    def compute(self, classes: Sequence[str]) -> dict[str, Any]:
        """images, loss (mean NLL), acc, top5_acc (more than 5 classes), balanced_acc, macro_f1,
        ece, per_class {name: precision, recall, f1, support}, confusion (rows: true class)."""
        if len(classes) != self.num_classes:
            raise ValueError(f"{len(classes)} class names for {self.num_classes} classes")
        matrix = self.confusion.compute().long().cpu()
        seen = int(matrix.sum())
        if seen == 0:
            raise ValueError("no predictions to compute metrics from")
        result: dict[str, Any] = {"images": seen, "loss": float(self.loss.compute()),
                                  "acc": int(matrix.diagonal().sum()) / seen}
        if self.top5 is not None:
            result["top5_acc"] = float(self.top5.compute())
        per_class = per_class_scores(matrix, classes)
        recalls = [row["recall"] for row in per_class.values() if row["support"] > 0]
        result.update(balanced_acc=sum(recalls) / len(recalls),
                      macro_f1=sum(row["f1"] for row in per_class.values()) / len(per_class),
                      ece=float(self.ece.compute()), per_class=per_class, confusion=matrix.tolist())
        return result


def per_class_scores(matrix: torch.Tensor, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows: true)."""
    matrix = matrix.double()
    true_pos, support, predicted = matrix.diagonal(), matrix.sum(dim=1), matrix.sum(dim=0)
    precision = torch.where(predicted > 0, true_pos / predicted, 0.0)  # an undefined score is 0
    recall = torch.where(support > 0, true_pos / support, 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    columns = zip(classes, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist())
    return {str(name): {"precision": p, "recall": r, "f1": f, "support": int(s)} for name, p, r, f, s in columns}


def compute_metrics(probs: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """All metrics of one set of predictions at once (a MetricSuite fed one batch)."""
    suite = MetricSuite(len(classes))
    suite.update(probs, targets)
    return suite.compute(classes)


# ----------------------------------------------------------------------------- files

def write_csv(path: str | Path, header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> Path:
    """`header` and `rows` as a CSV file, written atomically."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def write_confusion_csv(path: str | Path, confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> Path:
    """The matrix with a header row of predicted classes and a first column of true classes."""
    return write_csv(path, ["true \\ predicted"] + [str(c) for c in classes],
                     [[str(name)] + [int(v) for v in row] for name, row in zip(classes, confusion)])


def read_confusion_csv(path: str | Path) -> tuple:
    """(classes, matrix) back from `write_confusion_csv`'s file."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0][1:], [[int(v) for v in row[1:]] for row in rows[1:]]


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str = "confusion matrix"):
    """A matplotlib Figure of the matrix, each row normalised to the class's recall (colour) with
    the counts written in the cells (up to 30 classes; past that the cells are too small)."""
    from matplotlib.figure import Figure

    matrix = torch.tensor(confusion, dtype=torch.float64)
    rows = matrix.sum(dim=1, keepdim=True).clamp_min(1)
    share = (matrix / rows).numpy()
    n = len(classes)
    side = min(3.5 + 0.3 * n, 14)
    fig = Figure(figsize=(side + 1.0, side), dpi=80)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), [str(c) for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i, j in matrix.nonzero().tolist():
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str = "confusion matrix") -> bytes:
    """`confusion_figure` as PNG bytes."""
    buffer = io.BytesIO()
    confusion_figure(confusion, classes, title).savefig(buffer, format="png")
    return buffer.getvalue()


def save_confusion_png(path: str | Path, confusion: Sequence[Sequence[int]], classes: Sequence[str],
                       title: str = "confusion matrix") -> Path:
    atomic_write_bytes(path, confusion_png(confusion, classes, title))
    return Path(path)


def format_metrics(metrics: dict[str, Any], per_class: bool = True, limit: int | None = 50) -> str:
    """The metrics as a person reads them: headline numbers, then a per-class table."""
    lines = [f"images {metrics['images']}  loss {metrics['loss']:.4f}  acc {metrics['acc']:.2%}"
             + (f"  top5 {metrics['top5_acc']:.2%}" if "top5_acc" in metrics else "")
             + f"  balanced {metrics['balanced_acc']:.2%}  macro F1 {metrics['macro_f1']:.4f}"
             + f"  ECE {metrics['ece']:.4f}"]
    if per_class:
        rows: list[dict[str, Any]] = [dict(name=k, **v) for k, v in metrics["per_class"].items()]
        width = max(8, max(len(r["name"]) for r in rows))
        lines.append(f"{'class':<{width}}  precision  recall      f1  support")
        for row in rows[:limit]:
            lines.append(f"{row['name']:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
                         f"{row['f1']:6.4f}  {row['support']:7d}")
        if limit is not None and len(rows) > limit:
            lines.append(f"... {len(rows) - limit} more classes (--json or the per_class.csv file has them all)")
    return "\n".join(lines)


__all__ = ["ECE_BINS", "MetricSuite", "compute_metrics", "confusion_figure", "confusion_png", "format_metrics",
           "per_class_scores", "read_confusion_csv", "save_confusion_png", "write_confusion_csv"]
