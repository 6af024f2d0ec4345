"""Per-image transforms (torchvision.transforms.v2) on uint8 (C, H, W) tensors, and normalization.

Train: [RandomResizedCrop | Resize + CenterCrop] -> pad-crop -> flips -> ColorJitter ->
RandomGrayscale -> float in [0, 1] -> Normalize. Eval: Resize(img_size / crop_pct) ->
CenterCrop(img_size) -> float -> Normalize (timm's eval recipe).

Geometry runs on uint8 (torchvision's fast path) and the float conversion comes last, so
a worker moves 4x fewer bytes through the augmentations.

Sizes: both builders take an optional `native_size`. Pass it only when every image is
exactly native_size x native_size (the tensor sources); then a pipeline at the native
size skips resizing altogether. Without it the Resize/CenterCrop steps stay in: they
make file images of mixed sizes batchable, and cost nothing on an image that already
has the target size (torchvision returns it unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.transforms import v2

from imgtrain.config import AugmentConfig
from imgtrain.data.errors import DataError

if TYPE_CHECKING:  # only for the annotation; sources does not import this module
    from imgtrain.data.sources import DataSplits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATION_SAMPLE = 5000  # images used to compute mean/std: plenty for 3 decimals


def _is_identity(mean: Sequence[float] | None, std: Sequence[float] | None) -> bool:
    return mean is None or std is None or (all(m == 0 for m in mean) and all(s == 1 for s in std))


def _finish(steps: list[v2.Transform], mean: Sequence[float] | None, std: Sequence[float] | None,
            channels: int) -> v2.Compose:
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if not _is_identity(mean, std):
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"normalization has {len(mean)} mean / {len(std)} std values for {channels}-channel "
                            "images; give one value per channel")
        steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def build_train_transform(aug: AugmentConfig, channels: int, img_size: int,
                          mean: Sequence[float] | None, std: Sequence[float] | None,
                          native_size: int | None = None) -> v2.Compose:
    """Training augmentation -> float32 (C, img_size, img_size), normalized.

    mean/std None (or all 0 / all 1) skips Normalize. Saturation and hue need colour, so
    for 1-channel images ColorJitter only changes brightness and contrast, and
    RandomGrayscale is left out (it would do nothing).
    """
    steps: list[v2.Transform] = []
    if aug.random_resized_crop:
        steps.append(v2.RandomResizedCrop(img_size, scale=tuple(aug.scale), ratio=tuple(aug.ratio), antialias=True))
    elif native_size != img_size:
        steps += [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
    if aug.pad_crop > 0:
        steps.append(v2.RandomCrop(img_size, padding=aug.pad_crop, fill=0))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        steps.append(v2.RandomVerticalFlip(aug.vflip))
    jitter = aug.color_jitter
    if channels == 3 and (jitter > 0 or aug.hue > 0):
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=aug.hue))
    elif channels == 1 and jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter))
    if channels == 3 and aug.grayscale > 0:
        steps.append(v2.RandomGrayscale(aug.grayscale))  # keeps 3 channels (grey in each)
    return _finish(steps, mean, std, channels)


def build_eval_transform(aug: AugmentConfig, channels: int, img_size: int,
                         mean: Sequence[float] | None, std: Sequence[float] | None,
                         native_size: int | None = None) -> v2.Compose:
    """Deterministic eval pipeline: Resize(floor(img_size / crop_pct)) + CenterCrop(img_size)."""
    steps: list[v2.Transform] = []
    if not (aug.crop_pct == 1.0 and native_size == img_size):
        # +1e-6: 224 / 0.875 must give 256, not 255.99999.
        resize = math.floor(img_size / aug.crop_pct + 1e-6)
        steps += [v2.Resize(resize, antialias=True), v2.CenterCrop(img_size)]
    return _finish(steps, mean, std, channels)


def _raw_images(dataset, indices: np.ndarray):
    """Yield uint8 (C, H, W) images of a dataset without its transform."""
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        for start in range(0, len(indices), 1024):  # batches: one Python step per 1024 images
            yield images[torch.as_tensor(indices[start:start + 1024])]
        return
    raw = dataset.with_transform(None) if hasattr(dataset, "with_transform") else dataset
    for i in indices.tolist():
        yield raw[i][0].unsqueeze(0)


def compute_mean_std(dataset, channels: int, limit: int = NORMALIZATION_SAMPLE,
                     seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) over up to `limit` images, a seeded sample."""
    n = len(dataset)
    if n == 0:
        raise DataError("cannot compute normalization statistics: the training set is empty")
    indices = np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for batch in _raw_images(dataset, indices):
        x = batch.to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    # A constant channel would divide by zero; leave it unscaled instead.
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def resolve_normalization(aug: AugmentConfig, splits: DataSplits) -> tuple[list[float], list[float]]:
    """(mean, std), one value per channel, on the 0..1 scale, from augment.normalize.

    compute: measured on (up to 5000 of) the training images; imagenet: the ImageNet
    statistics (averaged to one value for 1-channel data); none: mean 0, std 1 (the
    transform builders then skip Normalize); given: augment.mean / augment.std.
    """
    channels = splits.channels
    if aug.normalize == "compute":
        return compute_mean_std(splits.train, channels)
    if aug.normalize == "imagenet":
        if channels == 1:
            return [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if aug.normalize == "none":
        return [0.0] * channels, [1.0] * channels
    mean, std = list(aug.mean or []), list(aug.std or [])
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"augment.mean/std have {len(mean)}/{len(std)} values but the images have {channels} "
                        f"channel(s); give {channels} value(s) each")
    return mean, std
