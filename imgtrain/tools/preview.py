"""`imgtrain show-augment`: a PNG grid of what the model sees in training.

n seeded training images go through the recipe's training transforms and, when it mixes, Mixup/CutMix
as the loop does; each cell is labelled with its class or the mixed label weights ("0.62 Coat / 0.38
Shirt"), without label smoothing so that the weights read as the fraction of each image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from imgtrain.api import prepare_data
from imgtrain.data.sources import build_splits
from imgtrain.data.transforms import denormalize
from imgtrain.strategies import mix_batch, mixing_enabled

COLUMNS = 8          # cells per row (fewer when n is smaller)
CELL = 112           # image area of a cell, pixels (small images are enlarged by a whole factor)
PAD = 4              # around each image, pixels
LINE_HEIGHT = 12     # one label line, pixels (Pillow's default font is 10 px)
LABEL_LINES = 2      # a mixed label has two classes, one per line
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


@dataclass
class AugmentPreview:
    path: Path
    labels: list[str]              # one per image, e.g. "Coat" or "0.62 Coat / 0.38 Shirt"
    indices: list[int]             # which training images, in grid order
    targets: torch.Tensor          # (n, classes): the label weights shown
    pixels: torch.Tensor           # (n, C, H, W) uint8: the images drawn, normalisation undone
    size: tuple                    # (width, height) of the PNG, pixels


def grid_size(n: int) -> tuple:
    """(width, height) in pixels of the grid for n images."""
    columns = min(n, COLUMNS)
    rows = math.ceil(n / columns)
    return columns * (CELL + 2 * PAD), rows * (CELL + 2 * PAD + LABEL_LINES * LINE_HEIGHT)


def label_text(weights: torch.Tensor, classes: Sequence[str]) -> str:
    """"Coat" for a single label, "0.62 Coat / 0.38 Shirt" for a blend (largest first)."""
    order = torch.argsort(weights, descending=True).tolist()
    parts = [(float(weights[i]), classes[i]) for i in order if float(weights[i]) > 0]
    if len(parts) == 1:
        return parts[0][1]
    return " / ".join(f"{w:.2f} {name}" for w, name in parts)


def show_augment(recipe: Any, n: int = 32, output: str | Path = "augment.png") -> AugmentPreview:
    """Write a grid of n augmented (and, when the recipe mixes, mixed) training images."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    splits = build_splits(recipe.data)  # the data side as a training run builds it
    prepared = prepare_data(recipe, splits, torch.device("cpu"))
    train, mean, std = prepared.splits.train, prepared.mean, prepared.std
    n = min(n, len(train))
    # torchvision's transforms draw from the global RNG: seeded here, the caller's state given back after
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        generator = torch.Generator().manual_seed(recipe.train.seed)
        indices = torch.randperm(len(train), generator=generator)[:n].tolist()
        samples = [train[i] for i in indices]
        images = torch.stack([image for image, _ in samples])
        if prepared.train_batch_transform is not None:
            images = prepared.train_batch_transform(images)
        labels = torch.as_tensor([int(label) for _, label in samples])
        mix = recipe.mix
        num_classes = len(splits.classes)
        if mixing_enabled(recipe) and mix.off_epoch != 0:
            images, targets = mix_batch(images, labels, num_classes, mixup_alpha=mix.mixup_alpha or 0.0,
                                        cutmix_alpha=mix.cutmix_alpha or 0.0, switch_prob=mix.switch_prob,
                                        prob=mix.prob, generator=generator)
        else:
            targets = torch.nn.functional.one_hot(labels, num_classes).float()
    texts = [label_text(t, splits.classes) for t in targets]
    pixels = denormalize(images, mean, std)
    path = Path(output)
    size = draw_grid(pixels, texts, path)
    return AugmentPreview(path=path, labels=texts, indices=indices, targets=targets, pixels=pixels, size=size)


def _fit(image: Image.Image) -> Image.Image:
    side = max(image.size)
    if side <= CELL:
        factor = CELL // side  # whole factor, nearest neighbour: pixels stay square and sharp
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    scale = CELL / side
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BILINEAR)


def draw_grid(pixels: torch.Tensor, texts: list[str], path: Path) -> tuple:
    """Write uint8 images (N, C, H, W) as a labelled PNG grid (`imgtrain doctor` draws its batch with it
    too); returns its (width, height)."""
    path = Path(path)
    width, height = grid_size(len(texts))
    columns = min(len(texts), COLUMNS)
    cell_w, cell_h = CELL + 2 * PAD, CELL + 2 * PAD + LABEL_LINES * LINE_HEIGHT
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, (image, text) in enumerate(zip(pixels, texts)):
        x0, y0 = (k % columns) * cell_w, (k // columns) * cell_h
        array = image.permute(1, 2, 0).numpy()
        gray = array.shape[2] == 1
        tile = _fit(Image.fromarray(array[..., 0], "L").convert("RGB") if gray else Image.fromarray(array, "RGB"))
        canvas.paste(tile, (x0 + PAD + (CELL - tile.width) // 2, y0 + PAD + (CELL - tile.height) // 2))
        for line_no, line in enumerate(text.split(" / ")[:LABEL_LINES]):
            while len(line) > 1 and draw.textlength(line, font=font) > cell_w - 2:
                line = line[:-1]  # a long class name is cut to the cell, never drawn over the next one
            draw.text((x0 + PAD, y0 + CELL + 2 * PAD + line_no * LINE_HEIGHT), line, fill=TEXT, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return canvas.size


__all__ = ["AugmentPreview", "denormalize", "draw_grid", "grid_size", "label_text", "show_augment"]
