"""Per-image transforms (torchvision.transforms.v2) on uint8 (C, H, W) tensors, and normalization.

Train: the `AUGMENTATIONS` registry in order (crop, geometry, policy, colour on uint8, the fast
path; then float, Normalize, erasing). Eval: Resize(img_size / crop_pct) -> CenterCrop(img_size)
-> float -> Normalize (timm's eval recipe).

`native_size`: pass it only when every image is exactly that square size (tensor sources); a
pipeline at that size then skips resizing. Otherwise Resize/CenterCrop stay in to make files of
mixed sizes batchable (a no-op on an image already at the target size).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.transforms import v2

from imgtrain.config import AugmentConfig, RecipeError
from imgtrain.data.errors import DataError

if TYPE_CHECKING:  # only for the annotation; sources does not import this module
    from imgtrain.data.sources import DataSplits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATION_SAMPLE = 5000  # images used to compute mean/std: plenty for 3 decimals


def _normalizes(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> bool:
    """Whether mean/std ask for a Normalize (None, or all 0 and all 1, do not); checks their lengths."""
    if mean is None or std is None or (all(m == 0 for m in mean) and all(s == 1 for s in std)):
        return False
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"normalization has {len(mean)} mean / {len(std)} std values for {channels}-channel "
                        "images; give one value per channel")
    return True


def _finish(steps: list[v2.Transform], mean: Sequence[float] | None, std: Sequence[float] | None,
            channels: int, after: Sequence[v2.Transform] = ()) -> v2.Compose:
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if _normalizes(mean, std, channels):
        assert mean is not None and std is not None
        steps.append(v2.Normalize(list(mean), list(std)))
    steps.extend(after)
    return v2.Compose(steps)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised float (N, C, H, W) back to uint8 pixels on the CPU, for display (values outside
    0..1, such as erased or mixed pixels, are clipped)."""
    images = images.detach().float().cpu()
    m = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- the augmentation registry
# name -> builder(aug, channels, img_size) returning a v2 transform, or None when the recipe
# leaves that augmentation off. Entries run in the order listed. The uint8 ones run before
# the float conversion (torchvision's fast path, and the policies need uint8); erasing runs
# after Normalize, so its "zero" fill is the dataset's mean colour (as in timm and the paper).

AugmentBuilder = Callable[[AugmentConfig, int, int], v2.Transform | None]

PERSPECTIVE_DISTORTION = 0.5   # torchvision's default: corners move up to half the way inwards
ERASING_RATIO = (0.3, 1 / 0.3)  # aspect ratios of the erased box (Zhong et al. 2017)


def _random_resized_crop(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    if not aug.random_resized_crop:
        return None
    return v2.RandomResizedCrop(img_size, scale=tuple(aug.scale), ratio=tuple(aug.ratio), antialias=True)


def _pad_crop(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    return v2.RandomCrop(img_size, padding=aug.pad_crop, fill=0) if aug.pad_crop > 0 else None


def _hflip(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    return v2.RandomHorizontalFlip(aug.hflip) if aug.hflip > 0 else None


def _vflip(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    return v2.RandomVerticalFlip(aug.vflip) if aug.vflip > 0 else None


def _rotation(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    return v2.RandomRotation(aug.rotation, interpolation=v2.InterpolationMode.BILINEAR) if aug.rotation > 0 else None


def _affine(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    """translate, affine_scale and shear: one RandomAffine (one resampling, not three)."""
    shift = any(t > 0 for t in aug.translate)
    zoom = aug.affine_scale != [1.0, 1.0]
    if not (shift or zoom or aug.shear > 0):
        return None
    return v2.RandomAffine(degrees=0, translate=tuple(aug.translate) if shift else None,
                           scale=tuple(aug.affine_scale) if zoom else None,
                           shear=aug.shear if aug.shear > 0 else None, interpolation=v2.InterpolationMode.BILINEAR)


def _perspective(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    return v2.RandomPerspective(PERSPECTIVE_DISTORTION, p=aug.perspective) if aug.perspective > 0 else None


def _color_jitter(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    # saturation and hue need colour: on 1-channel images only brightness and contrast change
    jitter = aug.color_jitter
    if channels == 3 and (jitter > 0 or aug.hue > 0):
        return v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=aug.hue)
    if channels == 1 and jitter > 0:
        return v2.ColorJitter(brightness=jitter, contrast=jitter)
    return None


def _grayscale(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    # keeps 3 channels (grey in each); on 1-channel images it would do nothing
    return v2.RandomGrayscale(aug.grayscale) if channels == 3 and aug.grayscale > 0 else None


def _randaugment(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    # magnitude is a bin of 31 (0..30), the scale of the RandAugment paper (Cubuk et al. 2020)
    if aug.policy != "randaugment":
        return None
    return v2.RandAugment(num_ops=aug.num_ops, magnitude=aug.magnitude, num_magnitude_bins=31)


def _autoaugment(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    return v2.AutoAugment(v2.AutoAugmentPolicy(aug.autoaugment_policy)) if aug.policy == "autoaugment" else None


def _trivialaugment(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    return v2.TrivialAugmentWide() if aug.policy == "trivialaugment" else None


def _augmix(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    return v2.AugMix(severity=aug.augmix_severity) if aug.policy == "augmix" else None


def _erasing(aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    if aug.erasing <= 0:
        return None
    value = "random" if aug.erasing_value == "random" else 0.0
    return v2.RandomErasing(aug.erasing, scale=tuple(aug.erasing_scale), ratio=ERASING_RATIO, value=value)


# per-image uint8 steps, after the crop/resize: geometry, then the policies (which pick their
# own colour and geometry ops, as timm places them), then colour
UINT8_AUGMENTATIONS: dict[str, AugmentBuilder] = {
    "random_resized_crop": _random_resized_crop,
    "pad_crop": _pad_crop,
    "hflip": _hflip,
    "vflip": _vflip,
    "rotation": _rotation,
    "affine": _affine,
    "perspective": _perspective,
    "randaugment": _randaugment,
    "autoaugment": _autoaugment,
    "trivialaugment": _trivialaugment,
    "augmix": _augmix,
    "color_jitter": _color_jitter,
    "grayscale": _grayscale,
}
# on the normalized float image
FLOAT_AUGMENTATIONS: dict[str, AugmentBuilder] = {
    "erasing": _erasing,
}
AUGMENTATIONS: dict[str, AugmentBuilder] = {**UINT8_AUGMENTATIONS, **FLOAT_AUGMENTATIONS}


def build_augmentation(name: str, aug: AugmentConfig, channels: int, img_size: int) -> v2.Transform | None:
    """One registry entry by name (None when `aug` leaves it off)."""
    if name not in AUGMENTATIONS:
        import difflib
        close = difflib.get_close_matches(name, list(AUGMENTATIONS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise RecipeError(f"unknown augmentation {name!r}; {hint}known: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name](aug, channels, img_size)


def build_train_transform(aug: AugmentConfig, channels: int, img_size: int,
                          mean: Sequence[float] | None, std: Sequence[float] | None,
                          native_size: int | None = None) -> v2.Compose:
    """The `AUGMENTATIONS` entries `aug` turns on, in order -> normalized float32 (C, img_size, img_size)."""
    steps: list[v2.Transform] = []
    if not aug.random_resized_crop and native_size != img_size:
        steps += [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
    steps += [t for t in (build(aug, channels, img_size) for build in UINT8_AUGMENTATIONS.values()) if t is not None]
    after = [t for t in (build(aug, channels, img_size) for build in FLOAT_AUGMENTATIONS.values()) if t is not None]
    return _finish(steps, mean, std, channels, after)


def build_eval_transform(aug: AugmentConfig, channels: int, img_size: int,
                         mean: Sequence[float] | None, std: Sequence[float] | None,
                         native_size: int | None = None) -> v2.Compose:
    """Deterministic eval pipeline: Resize(floor(img_size / crop_pct)) + CenterCrop(img_size)."""
    steps: list[v2.Transform] = []
    if not (aug.crop_pct == 1.0 and native_size == img_size):
        steps += [v2.Resize(eval_resize_size(aug, img_size), antialias=True), v2.CenterCrop(img_size)]
    return _finish(steps, mean, std, channels)


def eval_resize_size(aug: AugmentConfig, img_size: int) -> int:
    """floor(img_size / crop_pct), the side eval resizes to: the largest resolution a run reads."""
    return math.floor(img_size / aug.crop_pct + 1e-6)  # +1e-6: 224 / 0.875 must give 256, not 255.99999


def requested_augmentations(aug: AugmentConfig, channels: int, img_size: int) -> list[str]:
    """Names of the `AUGMENTATIONS` entries the recipe turns on, in pipeline order."""
    return [name for name, build in AUGMENTATIONS.items() if build(aug, channels, img_size) is not None]


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
    """(mean, std), one value per channel on the 0..1 scale, per augment.normalize.

    compute: measured on (up to 5000) training images; imagenet: ImageNet's (averaged for 1
    channel); none: mean 0, std 1 (Normalize skipped); given: augment.mean / augment.std.
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
