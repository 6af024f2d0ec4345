"""`shapes`: a synthetic, deterministic dataset of coloured shapes on noisy backgrounds.

Tests a pipeline in seconds without downloads, and makes controlled problems (class imbalance,
scale and rotation variation, noise). Each image is one of the first `num_classes` shapes with
random size, rotation, position and colours. Drawing is vectorised: each pixel gets a signed
distance to the shape's edge in the shape's own frame, and clip(0.5 - d) is an anti-aliased edge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgtrain.config import ShapesConfig
from imgtrain.data.errors import DataError
from imgtrain.data.split import allocate

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "star", "hexagon", "ring", "diamond")
SPLITS = ("train", "val", "test")
_MIN_CONTRAST = 120.0  # RGB distance between shape and background colours, out of 441
_CHUNK = 512           # images drawn at once: bounds memory to ~25 MB at 64 px


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int) -> np.ndarray:
    # Inscribed in the unit circle, a vertex pointing up; distance to the farthest edge line.
    angles = np.pi / 2 + np.pi / sides + 2 * np.pi * np.arange(sides) / sides
    dist = np.full(u.shape, -np.inf, dtype=np.float32)
    for a in angles:
        dist = np.maximum(dist, u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)))
    return dist - np.float32(np.cos(np.pi / sides))


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    # radial distance: fold the angle into one half-spike [0, alpha], then the polar equation of
    # the edge from the tip (r=1) to the inner vertex (r=inner, angle alpha)
    alpha = np.pi / points
    rho = np.sqrt(u * u + v * v)
    phi = np.mod(np.arctan2(u, -v), 2 * alpha)  # 0 at the upward tip
    phi = np.where(phi > alpha, 2 * alpha - phi, phi)
    edge = inner * np.sin(alpha) / (np.sin(phi) + inner * np.sin(alpha - phi))
    return (rho - edge).astype(np.float32)


def _signed_distance(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance to the shape's edge in units of its radius (<0 inside)."""
    if name == "circle":
        return np.sqrt(u * u + v * v) - 1.0
    if name == "ring":
        rho = np.sqrt(u * u + v * v)
        return np.maximum(rho - 1.0, 0.55 - rho)
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.75
    if name == "triangle":
        return _regular_polygon(u, v, 3)
    if name == "hexagon":
        return _regular_polygon(u, v, 6)
    if name == "cross":
        bar1 = np.maximum(np.abs(u) - 0.28, np.abs(v) - 0.95)
        bar2 = np.maximum(np.abs(v) - 0.28, np.abs(u) - 0.95)
        return np.minimum(bar1, bar2)
    if name == "diamond":
        # A rhombus narrower than tall, so it differs from a square rotated 45 degrees.
        a, b = 0.55, 1.0
        return (np.abs(u) / a + np.abs(v) / b - 1.0) / np.float32(np.hypot(1 / a, 1 / b))
    if name == "star":
        return _star(u, v)
    raise ValueError(f"unknown shape {name!r}")


def class_counts(total: int, num_classes: int, imbalance: float) -> np.ndarray:
    """Per-class counts, geometric from class 0 (largest) to the last (largest / imbalance)."""
    weights = float(imbalance) ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    minimum = 1 if total >= num_classes else 0
    base = np.full(num_classes, minimum, dtype=np.int64)
    # Largest remainder on what is left after the minimum, so counts sum exactly to total.
    extra = allocate(np.round(weights * 1e6).astype(np.int64), total - int(base.sum()),
                     np.full(num_classes, total, dtype=np.int64))
    return base + extra


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    background = rng.uniform(0, 255, (n, 3))
    foreground = rng.uniform(0, 255, (n, 3))
    for _ in range(10):  # redraw low-contrast pairs so every shape is visible
        low = np.linalg.norm(foreground - background, axis=1) < _MIN_CONTRAST
        if not low.any():
            break
        foreground[low] = rng.uniform(0, 255, (int(low.sum()), 3))
    low = np.linalg.norm(foreground - background, axis=1) < _MIN_CONTRAST
    light = background.mean(axis=1) > 127
    foreground[low & light] = 0.0
    foreground[low & ~light] = 255.0
    return background.astype(np.float32), foreground.astype(np.float32)


def _draw_split(cfg: ShapesConfig, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W, 3) uint8 images for the given labels."""
    n, side = len(labels), cfg.image_size
    scale = rng.uniform(cfg.min_scale, cfg.max_scale, n)
    radius = scale * side / 2.0
    cx = rng.uniform(0, 1, n) * (side - 2 * radius) + radius  # keep the shape inside
    cy = rng.uniform(0, 1, n) * (side - 2 * radius) + radius
    theta = np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation, n))
    background, foreground = _colours(rng, n)
    grid = np.arange(side, dtype=np.float32) + 0.5  # pixel centres
    out = np.empty((n, side, side, 3), dtype=np.uint8)
    names = SHAPE_NAMES[:cfg.num_classes]
    for label, name in enumerate(names):
        members = np.flatnonzero(labels == label)
        for start in range(0, len(members), _CHUNK):
            idx = members[start:start + _CHUNK]
            r = radius[idx].astype(np.float32)[:, None, None]
            dx = grid[None, None, :] - cx[idx].astype(np.float32)[:, None, None]
            dy = grid[None, :, None] - cy[idx].astype(np.float32)[:, None, None]
            cos = np.cos(theta[idx]).astype(np.float32)[:, None, None]
            sin = np.sin(theta[idx]).astype(np.float32)[:, None, None]
            u = (dx * cos + dy * sin) / r
            v = (-dx * sin + dy * cos) / r
            coverage = np.clip(0.5 - _signed_distance(name, u, v) * r, 0.0, 1.0)[..., None]
            # In-place steps from here: the (B, S, S, 3) float arrays dominate the run time.
            image = coverage * (foreground[idx] - background[idx])[:, None, None, :]
            image += background[idx][:, None, None, :]
            if cfg.noise > 0:
                noise = rng.standard_normal(image.shape, dtype=np.float32)
                noise *= np.float32(cfg.noise * 255.0)
                image += noise
            np.clip(image, 0.0, 255.0, out=image)
            image += 0.5  # round half up: values are >= 0, so truncation after +0.5 rounds
            out[idx] = image.astype(np.uint8)
    return out


def generate_shapes(cfg: ShapesConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (uint8 images (N, 3, S, S), int64 labels (N,))} for train/val/test (empty splits left out).

    Seeded, one random stream per split (val_size does not change train); `imbalance` is train's only.
    """
    if not 2 <= cfg.num_classes <= len(SHAPE_NAMES):
        raise DataError(f"data.shapes.num_classes must be 2..{len(SHAPE_NAMES)}, got {cfg.num_classes}")
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    out = {}
    for split_id, split in enumerate(SPLITS):
        if sizes[split] <= 0:
            continue
        rng = np.random.default_rng([cfg.seed, split_id])
        ratio = cfg.imbalance if split == "train" else 1.0
        counts = class_counts(sizes[split], cfg.num_classes, ratio)
        labels = rng.permutation(np.repeat(np.arange(cfg.num_classes), counts))
        images = _draw_split(cfg, labels, rng)
        out[split] = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))
    return out


def shape_classes(cfg: ShapesConfig) -> list[str]:
    return list(SHAPE_NAMES[:cfg.num_classes])


def write_shapes_imagefolder(cfg: ShapesConfig, out_dir: str | Path, fmt: str = "png",
                             layout: str = "split") -> dict[str, dict[str, int]]:
    """Write the shapes dataset as image files (fmt png, jpg or mixed), to exercise the file sources.

    layout "split": out_dir/{train,val,test}/<class>/<split>_<n>.<ext>; "flat": out_dir/<class>/...
    (all splits together). Refuses a non-empty out_dir. Returns {split: {class: count}}.
    """
    if fmt not in ("png", "jpg", "mixed"):
        raise DataError(f"fmt must be png, jpg or mixed, got {fmt!r}")
    if layout not in ("split", "flat"):
        raise DataError(f"layout must be split or flat, got {layout!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not empty; choose a new folder (nothing is overwritten)")
    classes = shape_classes(cfg)
    counts: dict[str, dict[str, int]] = {}
    for split, (images, labels) in generate_shapes(cfg).items():
        counts[split] = {name: 0 for name in classes}
        base = out_dir / split if layout == "split" else out_dir
        for name in classes:
            (base / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist())):
            ext = fmt if fmt != "mixed" else ("png", "jpg")[i % 2]
            path = base / classes[label] / f"{split}_{i:05d}.{ext}"
            if ext == "jpg":
                Image.fromarray(image).save(path, quality=95)
            else:
                Image.fromarray(image).save(path)
            counts[split][classes[label]] += 1
    return counts
