"""Trained models back from disk: a run folder or a checkpoint file, with what they need to take images.

`load_trained(RUN_DIR | file.safetensors)` rebuilds the network from the checkpoint's recipe, loads its
weights, and returns it with its classes, channels, image size and normalisation: the one way every
command that uses a trained model reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgtrain.config import Recipe, recipe_from_dict
from imgtrain.data.transforms import build_eval_transform
from imgtrain.engine.checkpoint import CheckpointError, load_weights
from imgtrain.models.create import LogitOffset, create_model


@dataclass
class LoadedModel:
    """A trained model with what it needs to take images: classes and its eval transform."""
    model: torch.nn.Module
    classes: list[str]
    channels: int
    img_size: int
    mean: list[float]
    std: list[float]
    recipe: Recipe
    path: Path

    def eval_transform(self) -> Any:
        return build_eval_transform(self.recipe.augment, self.channels, self.img_size, self.mean, self.std)


def resolve_checkpoint(target: str | Path) -> Path:
    """A run folder (its best, else last, weights) or a .safetensors file."""
    path = Path(target)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: no checkpoints/best.safetensors or last.safetensors in this folder")
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint file")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a run folder or a .safetensors file written by imgtrain")
    return path


def load_trained(target: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a run folder or checkpoint, in eval mode on `device`."""
    path = resolve_checkpoint(target)
    tensors, meta = load_weights(path)
    if not meta or "model" not in meta:
        raise CheckpointError(f"{path}: has no imgtrain metadata (model, classes); it was not written by imgtrain")
    recipe = recipe_from_dict(meta["recipe"], file=str(path))
    model = create_model(recipe.model, num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {recipe.model.name}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if meta.get("logit_offset") is not None:  # trained with imbalance.posthoc_adjust
        offset = meta["logit_offset"]
        if len(offset) != meta["num_classes"]:
            raise CheckpointError(f"{path}: logit_offset has {len(offset)} values for {meta['num_classes']} classes")
        model = LogitOffset(model, torch.tensor(offset))
    model.to(device).eval()
    return LoadedModel(model=model, classes=list(meta["classes"]), channels=meta["in_chans"],
                       img_size=meta["img_size"], mean=meta["mean"], std=meta["std"], recipe=recipe, path=path)


__all__ = ["LoadedModel", "load_trained", "resolve_checkpoint"]
