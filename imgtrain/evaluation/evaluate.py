"""Evaluate a trained model or ensemble on a split of its recipe's data or on any folder / CSV;
`write_evaluation` saves metrics.json, per_class.csv, confusion.csv and confusion.png.

    result = evaluate("runs/fmnist", split="test", tta=True, output_dir="runs/fmnist/evaluation/test")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from imgtrain.evaluation.ensemble import load_predictor
from imgtrain.evaluation.inference import TTAArg, check_classes, evaluation_data, metrics_of
from imgtrain.evaluation.metrics import save_confusion_png, write_confusion_csv, write_csv
from imgtrain.io import atomic_write_text, json_safe

HEADLINE = ("images", "loss", "acc", "top5_acc", "balanced_acc", "macro_f1", "ece")


def evaluate_dataset(predictor: Any, dataset: Any, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every metric of `predictor` (see inference.py) on a dataset of raw images."""
    probs, targets = predictor.probabilities(dataset, batch_size=batch_size, device=device)
    return metrics_of(probs, targets, predictor.classes)


def evaluate(target: str | Path, split: str = "test", data: str | Path | None = None,
             batch_size: int = 256, device: str = "cpu", tta: TTAArg = None,
             output_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a run folder, checkpoint or ensemble folder on `split` of its recipe's data, or
    on `data`. With TTA the result also holds `without_tta`: the headline numbers of the same
    model(s) without it, measured on the same images."""
    predictor = load_predictor(target, tta=tta, device=device)
    dataset, data_classes, where = evaluation_data(predictor.recipe, split, data)
    check_classes(predictor.classes, data_classes, where)
    result = evaluate_dataset(predictor, dataset, batch_size=batch_size, device=device)
    if getattr(predictor, "tta", None) is not None:
        plain = evaluate_dataset(predictor.without_tta(), dataset, batch_size=batch_size, device=device)
        result["tta"] = predictor.tta.describe()
        result["without_tta"] = {key: plain[key] for key in HEADLINE if key in plain}
    result.update({"target": str(target), "model": predictor.describe(),
                   "split": split if data is None else str(data), "classes": list(predictor.classes)})
    if output_dir is not None:
        result["files"] = [str(p) for p in write_evaluation(result, output_dir)]
    return result


def write_evaluation(result: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """metrics.json, per_class.csv, confusion.csv and confusion.png in `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = result["classes"]
    atomic_write_text(out / "metrics.json", json.dumps(json_safe(result), indent=2) + "\n")
    rows = [[name, f"{row['precision']:.6f}", f"{row['recall']:.6f}", f"{row['f1']:.6f}", row["support"]]
            for name, row in result["per_class"].items()]
    title = f"confusion matrix: {result['split']} ({result['acc']:.2%} accurate)"
    return [out / "metrics.json",
            write_csv(out / "per_class.csv", ["class", "precision", "recall", "f1", "support"], rows),
            write_confusion_csv(out / "confusion.csv", result["confusion"], classes),
            save_confusion_png(out / "confusion.png", result["confusion"], classes, title=title)]


__all__ = ["HEADLINE", "check_classes", "evaluate", "evaluate_dataset", "evaluation_data", "metrics_of",
           "write_evaluation"]
