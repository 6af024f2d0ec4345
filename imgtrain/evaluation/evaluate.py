"""Evaluate a trained model on a split of its recipe's data or on any folder / CSV of images."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F

from imgtrain.api import LoadedModel, load_trained
from imgtrain.data import DataError, build_splits


@torch.no_grad()
def evaluate_dataset(loaded: LoadedModel, dataset: Any, batch_size: int = 256,
                     device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Loss, top-1 (and top-5 with more than 5 classes) accuracy and per-class accuracy."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    model = loaded.model.to(device).eval()
    num_classes = len(loaded.classes)
    loss_sum, seen = 0.0, 0
    correct1 = correct5 = 0
    per_class_correct = torch.zeros(num_classes, dtype=torch.long)
    per_class_total = torch.zeros(num_classes, dtype=torch.long)
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs).float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, num_classes), dim=1).indices
        hit1 = top[:, 0] == targets
        correct1 += int(hit1.sum())
        correct5 += int((top == targets[:, None]).any(dim=1).sum())
        per_class_total += torch.bincount(targets.cpu(), minlength=num_classes)
        per_class_correct += torch.bincount(targets[hit1].cpu(), minlength=num_classes)
        seen += targets.shape[0]
    if seen == 0:
        raise DataError("nothing to evaluate: the split has no images")
    result: Dict[str, Any] = {"images": seen, "loss": loss_sum / seen, "acc": correct1 / seen}
    if num_classes > 5:
        result["top5_acc"] = correct5 / seen
    recall = {name: (int(c) / int(t) if int(t) else None)
              for name, c, t in zip(loaded.classes, per_class_correct, per_class_total)}
    present = [v for v in recall.values() if v is not None]
    result["balanced_acc"] = sum(present) / len(present)
    result["per_class_acc"] = recall
    return result


def evaluate(target: Union[str, Path], split: str = "test", data: Optional[Union[str, Path]] = None,
             batch_size: int = 256, device: str = "cpu") -> Dict[str, Any]:
    """Evaluate a run folder or checkpoint on `split` of its recipe's data, or on `data`
    (an image folder of class subfolders, or a path,label CSV)."""
    loaded = load_trained(target, device=device)
    data_cfg = loaded.recipe.data
    if data is not None:
        data_path = Path(data)
        if not data_path.exists():
            raise DataError(f"--data {data_path}: no such folder or CSV file")
        source = "csv" if data_path.suffix.lower() == ".csv" else "imagefolder"
        # everything in the given folder is evaluated: no val or test carved out of it
        data_cfg = replace(data_cfg, source=source, root=str(data_path), image_root=None, val_fraction=0.0,
                           test_fraction=0.0, train_subset=None)
        split = "train"
    splits = build_splits(data_cfg)
    dataset = {"train": splits.train, "val": splits.val, "test": splits.test}.get(split)
    if dataset is None:
        raise DataError(f"--split {split}: the recipe's data ({data_cfg.source}) has no {split} split; "
                        "choose another --split or pass --data")
    _check_classes(loaded.classes, splits.classes, data_cfg.root or data_cfg.source)
    dataset = dataset.with_transform(loaded.eval_transform())
    result = evaluate_dataset(loaded, dataset, batch_size=batch_size, device=device)
    result.update({"checkpoint": str(loaded.path), "split": split if data is None else str(data)})
    return result


def _check_classes(model_classes: List[str], data_classes: List[str], where: str) -> None:
    if list(model_classes) != list(data_classes):
        extra = sorted(set(data_classes) - set(model_classes))
        missing = sorted(set(model_classes) - set(data_classes))
        raise DataError(f"{where}: its classes differ from the model's: not in the model {extra}, "
                        f"missing from the data {missing}" if (extra or missing) else
                        f"{where}: same classes as the model but in another order ({data_classes} vs {model_classes})")
