"""Predictors: what evaluate, predict, ensemble and the report run images through.

A predictor (ModelPredictor here, EnsemblePredictor in ensemble.py) turns a dataset of raw images
(uint8 (C, H, W), no transform yet) into class probabilities through its own eval pipeline:

    predictor = load_predictor("runs/fmnist", tta=True)     # or an ensemble folder
    probs, targets = predictor.probabilities(dataset)        # (N, C) and (N,)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from imgtrain.data import DataError, build_splits
from imgtrain.evaluation.metrics import compute_metrics
from imgtrain.models.trained import LoadedModel

ENSEMBLE_FILE = "ensemble.yaml"  # marks a folder written by `imgtrain ensemble --save`
TTAArg = None | bool | Any  # None/False: off; True: the recipe's eval.tta (or the default); a TTAConfig


class ImageListDataset(Dataset):
    """Decoded images held in a list (what predict reads from files), with a swappable transform."""

    def __init__(self, images: Sequence[torch.Tensor], targets: Sequence[int] | None = None, transform: Any = None):
        self.images = list(images)
        self.targets = list(targets) if targets is not None else [-1] * len(self.images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), self.targets[index]

    def with_transform(self, transform: Any) -> ImageListDataset:
        return ImageListDataset(self.images, self.targets, transform)


class ModelPredictor:
    """One trained model and its eval pipeline; with `tta`, each batch is also seen as the
    configured views and the predictions merged (evaluation/tta.py)."""

    def __init__(self, loaded: LoadedModel, tta: TTAArg = None):
        self.loaded = loaded
        self.classes: list[str] = list(loaded.classes)
        self.channels = loaded.channels
        self.recipe = loaded.recipe
        self.source = str(loaded.path)
        self.tta = resolve_tta(loaded.recipe, tta)

    def describe(self) -> str:
        return (f"{self.loaded.recipe.model.name} at {self.loaded.img_size} px ({self.source})"
                + (f" with TTA {self.tta.describe()}" if self.tta is not None else ""))

    def module(self) -> torch.nn.Module:
        """The network that maps a transformed batch to logits (TTA-wrapped when asked)."""
        if self.tta is None:
            return self.loaded.model
        from imgtrain.evaluation.tta import TTAModel
        return TTAModel(self.loaded.model, self.tta)

    def without_tta(self) -> ModelPredictor:
        return ModelPredictor(self.loaded, tta=None)

    @torch.no_grad()
    def probabilities(self, dataset: Any, batch_size: int = 256, device: str | torch.device = "cpu",
                      num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) probabilities on the CPU and the dataset's (N,) targets, in dataset order."""
        return run_model(self.module(), dataset.with_transform(self.loaded.eval_transform()),
                         batch_size=batch_size, device=device, num_workers=num_workers)


@torch.no_grad()
def run_model(model: torch.nn.Module, dataset: Any, batch_size: int = 256,
              device: str | torch.device = "cpu", num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of `model` over a transformed dataset, in order; (probs, targets) on the CPU."""
    device = torch.device(device)
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    probs, targets = [], []
    for inputs, labels in loader:
        probs.append(model(inputs.to(device, non_blocking=True)).float().softmax(dim=1).cpu())
        targets.append(torch.as_tensor(labels).long())
    if not probs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(probs), torch.cat(targets)


def resolve_tta(recipe: Any, tta: TTAArg) -> Any:
    """None when TTA is off; the TTAConfig to use otherwise (True means the recipe's
    `eval.tta`, or the default views when the recipe names none)."""
    from imgtrain.evaluation.tta import tta_config_for
    return tta_config_for(recipe, tta)


def is_ensemble_dir(target: str | Path) -> bool:
    return Path(target).is_dir() and (Path(target) / ENSEMBLE_FILE).is_file()


def metrics_of(probs: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    if probs.shape[0] == 0:
        raise DataError("nothing to evaluate: the split has no images")
    return compute_metrics(probs, targets, classes)


def evaluation_data(recipe: Any, split: str = "test", data: str | Path | None = None) -> Any:
    """`split` of the recipe's data, or everything in `data` (an image folder of class
    subfolders, or a path,label CSV), as a dataset of raw images."""
    data_cfg = recipe.data
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
    return dataset, splits.classes, str(data_cfg.root or data_cfg.source)


def check_classes(model_classes: list[str], data_classes: list[str], where: str) -> None:
    if list(model_classes) != list(data_classes):
        extra = sorted(set(data_classes) - set(model_classes))
        missing = sorted(set(model_classes) - set(data_classes))
        raise DataError(f"{where}: its classes differ from the model's: not in the model {extra}, "
                        f"missing from the data {missing}" if (extra or missing) else
                        f"{where}: same classes as the model but in another order ({data_classes} vs {model_classes})")


__all__ = ["ENSEMBLE_FILE", "ImageListDataset", "ModelPredictor", "check_classes", "evaluation_data",
           "is_ensemble_dir", "metrics_of", "resolve_tta", "run_model"]
