"""Training augmentation of whole batches on the device (`augment.device_transforms`; the README's
"Feeding the model fast"), with the distributions of the per-image path:

    uint8 -> float [0, 1] -> random resized crop | resize + centre crop, pad-crop shift and flips
    (one `grid_sample`) -> colour jitter -> random grayscale -> normalize -> random erasing

Only the pixel computation differs from torchvision's: a box filter where v2 antialiases, and one
random colour-operation order per batch (v2: per image). Random parameters are drawn on the CPU
from `generator`, so a seed gives the same crops on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from imgtrain.config import AugmentConfig
from imgtrain.data.transforms import (
    ERASING_RATIO,
    _normalizes,
    build_augmentation,
    eval_resize_size,
    requested_augmentations,
)

# the AUGMENTATIONS entries implemented here on whole batches; any other runs per image on the CPU
BATCHED_AUGMENTATIONS = ("random_resized_crop", "pad_crop", "hflip", "vflip", "color_jitter", "grayscale", "erasing")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
CROP_TRIES = 10                        # as v2.RandomResizedCrop and v2.RandomErasing


def _is_batched(name: str, aug: AugmentConfig, channels: int) -> bool:
    if name == "color_jitter" and channels == 3 and aug.hue > 0:
        return False  # hue needs an HSV round trip per image: left to torchvision
    return name in BATCHED_AUGMENTATIONS


def cpu_only_augmentations(aug: AugmentConfig, channels: int, img_size: int) -> list[str]:
    """The augmentations the recipe turns on that this module cannot run on batches."""
    return [name for name in requested_augmentations(aug, channels, img_size) if not _is_batched(name, aug, channels)]


def resolve_device_transforms(aug: AugmentConfig, channels: int, img_size: int, device: torch.device) -> bool:
    """augment.device_transforms: on, off, or auto (on for CUDA when everything requested is batched)."""
    if aug.device_transforms == "auto":
        return device.type == "cuda" and not cpu_only_augmentations(aug, channels, img_size)
    return aug.device_transforms == "on"


# ----------------------------------------------------------------------------- random parameters (CPU)

def _uniform(shape: tuple, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    # float32 draws, as torchvision's `torch.empty(1).uniform_`, then float64 arithmetic, as its `.item()`
    return torch.empty(shape).uniform_(low, high, generator=generator).double()


def _randint_below(high: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform integer in [0, high) per element (high >= 1)."""
    draw = torch.rand(high.shape, generator=generator, dtype=torch.float64)
    return (draw * high).floor().long().clamp_max(high - 1)


def _tried_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                 generator: torch.Generator | None, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CROP_TRIES candidate (h, w) per image: area fraction from `scale`, log-uniform aspect from `ratio`."""
    area = _uniform((n, CROP_TRIES), scale[0], scale[1], generator) * (height * width)
    log_ratio = torch.log(torch.tensor([float(ratio[0]), float(ratio[1])]))
    aspect = torch.exp(_uniform((n, CROP_TRIES), float(log_ratio[0]), float(log_ratio[1]), generator))
    w = torch.round(torch.sqrt(area * aspect))  # round half to even, as Python's round()
    h = torch.round(torch.sqrt(area / aspect))
    return (w, h) if transpose else (h, w)     # RandomErasing puts the aspect on the height


def _place_first_fit(ok: torch.Tensor, h: torch.Tensor, w: torch.Tensor, height: int, width: int,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """(top, left, h, w): each image's first try that fits, at a uniform position."""
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax: the first True
    h, w = (v.gather(1, first).squeeze(1).long() for v in (h, w))
    return _randint_below(height - h + 1, generator), _randint_below(width - w + 1, generator), h, w


def sample_crop_boxes(n: int, height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
                      ratio: Sequence[float] = (3 / 4, 4 / 3),
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 4) long tensor of (top, left, height, width): `v2.RandomResizedCrop.make_params` for n images
    (the first of 10 tries that fits, else the central crop with the aspect ratio clamped into `ratio`)."""
    h, w = _tried_boxes(n, height, width, scale, ratio, generator, transpose=False)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    boxes = torch.stack(_place_first_fit(ok, h, w, height, width, generator), dim=1)
    found = ok.any(dim=1)
    if bool(found.all()):
        return boxes
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw])
    return torch.where(found[:, None], boxes, fallback)


def sample_erasing_boxes(n: int, height: int, width: int, p: float, scale: Sequence[float],
                         ratio: Sequence[float] = ERASING_RATIO,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 4) long (top, left, height, width): `v2.RandomErasing(p, scale, ratio)` for n images;
    height 0 where nothing is erased (not drawn, probability 1 - p, or none of the 10 tries fits)."""
    apply = torch.rand(n, generator=generator) < p
    h, w = _tried_boxes(n, height, width, scale, ratio, generator, transpose=True)
    ok = (h < height) & (w < width)
    top, left, h, w = _place_first_fit(ok, h, w, height, width, generator)
    h = torch.where(apply & ok.any(dim=1), h, torch.zeros_like(h))
    return torch.stack([top, left, h, w], dim=1)


# ----------------------------------------------------------------------------- pixel operations (any device)

def _resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after v2.Resize(size): the shorter side becomes size."""
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)  # torchvision's rounding of the longer side
    return (size, new_long) if height <= width else (new_long, size)


def center_box(height: int, width: int, size: int) -> tuple[float, float, float, float]:
    """(top, left, height, width) of the source region that v2.Resize(size) + v2.CenterCrop(size) keep."""
    new_h, new_w = _resized_shape(height, width, size)
    sy, sx = height / new_h, width / new_w  # source pixels per resized pixel
    return round((new_h - size) / 2.0) * sy, round((new_w - size) / 2.0) * sx, size * sy, size * sx


def _axis(start: torch.Tensor, length: torch.Tensor, extent: int, size: int, samples: int,
          flip: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Normalised grid coordinates (n, size * samples) along one axis (align_corners=False)."""
    m = size * samples
    frac = (torch.arange(m, dtype=torch.float64) + 0.5) / m   # sub-pixel centres across the output
    frac = torch.where(flip[:, None], 1 - frac, frac) + shift[:, None] / size
    edge = start[:, None] + frac * length[:, None]             # source edge coordinates: pixel p is [p, p+1]
    return (2 * edge / extent - 1).float()


def _grid_sample(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor,
                 w: torch.Tensor, size: int, samples: int, vflip: torch.Tensor, hflip: torch.Tensor,
                 shift: torch.Tensor) -> torch.Tensor:
    n, _, height, width = images.shape
    # the grid is separable: (n, m) coordinates per axis cross the bus, the (n, m, m, 2) grid is built there
    ys = _axis(top, h, height, size, samples, vflip, shift[0]).to(images.device)
    xs = _axis(left, w, width, size, samples, hflip, shift[1]).to(images.device)
    m = size * samples
    grid = torch.stack([xs[:, None, :].expand(n, m, m), ys[:, :, None].expand(n, m, m)], dim=-1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, samples) if samples > 1 else out


def resample(images: torch.Tensor, boxes: torch.Tensor, size: int, vflip: torch.Tensor | None = None,
             hflip: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image to its box, resize to size x size, shift and flip, in one resampling.

    boxes: (n, 4) (top, left, height, width) in source pixels, fractional allowed; then, in v2's
    order, shift (2, n) (dy, dx) output pixels with zero fill, vflip and hflip (n,) bools. A box
    shrinking by k = round(box / size) >= 2 averages k x k bilinear samples per output pixel (as
    roi_align) in place of v2's antialiasing.
    """
    n = images.shape[0]
    boxes = boxes.to(torch.float64).cpu()
    none = torch.zeros(n, dtype=torch.bool)
    vflip = none if vflip is None else vflip.cpu()
    hflip = none if hflip is None else hflip.cpu()
    shift = torch.zeros(2, n, dtype=torch.long) if shift is None else shift.cpu()
    # about one sample per source pixel: 1 up to 1.5x shrinking, where bilinear alone barely aliases
    samples = torch.round(boxes[:, 2:].amax(1) / size).long().clamp_min(1)
    top, left, h, w = boxes.unbind(1)
    groups = samples.unique().tolist()
    if len(groups) == 1:
        out = _grid_sample(images, top, left, h, w, size, groups[0], vflip, hflip, shift)
    else:
        out = images.new_empty((n, images.shape[1], size, size))
        for k in groups:
            pick = (samples == k).nonzero().squeeze(1)
            on = pick.to(images.device)
            out[on] = _grid_sample(images[on], top[pick], left[pick], h[pick], w[pick], size, k, vflip[pick],
                                   hflip[pick], shift[:, pick])
    if bool(shift.any()):  # pixels shifted in from outside the crop are 0, as v2's padding
        pixel = torch.arange(size)
        rows = torch.where(vflip[:, None], size - 1 - pixel, pixel) + shift[0][:, None]
        cols = torch.where(hflip[:, None], size - 1 - pixel, pixel) + shift[1][:, None]
        inside_rows = ((rows >= 0) & (rows < size))[:, None, :, None]
        inside_cols = ((cols >= 0) & (cols < size))[:, None, None, :]
        out = out * (inside_rows & inside_cols).to(out.device)
    return out


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """v2.Resize(size) (shorter side, antialiased) + v2.CenterCrop(size) on a float batch (eval)."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    new = _resized_shape(height, width, size)
    if new != (height, width):
        images = F.interpolate(images, size=new, mode="bilinear", align_corners=False, antialias=True)
    return v2.functional.center_crop(images, [size, size])


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of a float RGB batch (a 1-channel batch is returned as it is)."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # factor * image + (1 - factor) * other, clamped to [0, 1]: torchvision's _blend
    factor = factor.to(images.device, images.dtype).view(-1, 1, 1, 1)
    return (images * factor + other * (1 - factor)).clamp_(0, 1)


def color_jitter(images: torch.Tensor, brightness: torch.Tensor | None, contrast: torch.Tensor | None,
                 saturation: torch.Tensor | None, order: Sequence[int] = (0, 1, 2)) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors (None: leave out), on [0, 1] floats,
    in `order` (indices into those three). Saturation is skipped on 1-channel batches."""
    for op in order:
        if op == 0 and brightness is not None:
            images = (images * brightness.to(images.device, images.dtype).view(-1, 1, 1, 1)).clamp_(0, 1)
        elif op == 1 and contrast is not None:
            mean = to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
            images = _blend(images, mean, contrast)
        elif op == 2 and saturation is not None and images.shape[1] == 3:
            images = _blend(images, to_grayscale(images), saturation)
    return images


def erase(images: torch.Tensor, boxes: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """Set each image's (top, left, height, width) box to 0, or to `values` (same shape as images)."""
    height, width = images.shape[-2:]
    boxes = boxes.to(images.device)
    top, left, h, w = (t[:, None] for t in boxes.unbind(1))
    ys = torch.arange(height, device=images.device)[None]
    xs = torch.arange(width, device=images.device)[None]
    rows = (ys >= top) & (ys < top + h)
    cols = (xs >= left) & (xs < left + w)
    mask = rows[:, None, :, None] & cols[:, None, None, :]
    if values is None:
        return images.masked_fill(mask, 0.0)
    return torch.where(mask, values, images)


# ----------------------------------------------------------------------------- the batch transforms

class _Normalizer:
    """uint8 -> float in [0, 1] and (x - mean) / std, with the constants kept per device."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None, channels: int):
        normalizes = _normalizes(mean, std, channels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) if normalizes else None
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) if normalizes else None
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}

    def to_float(self, images: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """A float copy in [0, 1] (uint8 is divided by 255, float is taken as [0, 1] already).
        scratch: into a buffer the next call reuses, for a caller that only reads it (on the CPU a
        fresh float batch per step costs page faults as long as the resampling itself)."""
        if scratch:
            key = (tuple(images.shape), images.device)
            if key not in self._scratch:
                if len(self._scratch) >= 2:  # full batches and the last, smaller one
                    self._scratch.clear()
                self._scratch[key] = torch.empty(images.shape, dtype=torch.float32, device=images.device)
            out = self._scratch[key].copy_(images)
        else:
            out = images.to(torch.float32, copy=True)  # a copy, so in-place ops leave the input alone
        return out.div_(255) if images.dtype == torch.uint8 else out

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:  # set together
            return images
        if images.device not in self._on:
            self._on[images.device] = (self.mean.to(images.device), self.std.to(images.device))
        mean, std = self._on[images.device]
        return images.sub_(mean).div_(std)


class EvalBatchTransform:
    """Eval batches: uint8 -> float, resize + centre crop when the size differs, normalize."""

    def __init__(self, img_size: int, mean: Sequence[float] | None, std: Sequence[float] | None, channels: int):
        self.img_size = img_size
        self.norm = _Normalizer(mean, std, channels)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = resize_center_crop(self.norm.to_float(images), self.img_size).contiguous()
        return self.norm.normalize(images)


class TrainBatchTransform:
    """The batched registry entries of `aug`, on any device: uint8 (or [0, 1] float) (B, C, H, W)
    -> normalized float32 (B, C, img_size, img_size). generator: for the random parameters."""

    def __init__(self, aug: AugmentConfig, channels: int, img_size: int, mean: Sequence[float] | None,
                 std: Sequence[float] | None, generator: torch.Generator | None = None):
        on = set(requested_augmentations(aug, channels, img_size))
        self.aug, self.channels, self.img_size, self.generator = aug, channels, img_size, generator
        self.crop = "random_resized_crop" in on
        self.pad = aug.pad_crop if "pad_crop" in on else 0
        self.hflip = aug.hflip if "hflip" in on else 0.0
        self.vflip = aug.vflip if "vflip" in on else 0.0
        batched_jitter = "color_jitter" in on and _is_batched("color_jitter", aug, channels)
        jitter = aug.color_jitter if batched_jitter else 0.0
        self.jitter = (max(0.0, 1 - jitter), 1 + jitter) if jitter > 0 else None
        self.grayscale = aug.grayscale if "grayscale" in on else 0.0
        self.erasing = aug.erasing if "erasing" in on else 0.0
        self.norm = _Normalizer(mean, std, channels)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        g, n = self.generator, images.shape[0]
        x = self._geometry(images, g)
        if self.jitter is not None:
            brightness, contrast, saturation = [torch.empty(n).uniform_(*self.jitter, generator=g) for _ in range(3)]
            x = color_jitter(x, brightness, contrast, saturation, order=torch.randperm(3, generator=g).tolist())
        if self.grayscale:
            gray = (torch.rand(n, generator=g) < self.grayscale).to(x.device).view(-1, 1, 1, 1)
            x = torch.where(gray, to_grayscale(x).expand_as(x), x)
        x = self.norm.normalize(x)
        if self.erasing:
            boxes = sample_erasing_boxes(n, x.shape[-2], x.shape[-1], self.erasing, self.aug.erasing_scale,
                                         ERASING_RATIO, g)
            values = None
            if self.aug.erasing_value == "random":
                seed = int(torch.randint(0, 2**62, (1,), generator=g))
                noise_gen = torch.Generator(device=x.device).manual_seed(seed)
                values = torch.randn(x.shape, generator=noise_gen, device=x.device)
            x = erase(x, boxes, values)
        return x

    def _geometry(self, images: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Float [0, 1] at img_size: crop or resize, pad-crop shift, flips (v2's order), one resampling."""
        n, _, height, width = images.shape
        size = self.img_size
        boxes = None
        if self.crop:
            boxes = sample_crop_boxes(n, height, width, self.aug.scale, self.aug.ratio, g)
        elif (height, width) != (size, size):
            boxes = torch.tensor(center_box(height, width, size), dtype=torch.float64).expand(n, 4)
        moves = self.pad or self.hflip or self.vflip
        if boxes is None and not moves:
            return self.norm.to_float(images)  # nothing to resample: the float copy is the result
        # the resampling writes a new tensor and only reads its input: a reused buffer serves
        x = self.norm.to_float(images, scratch=True)
        shift = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g) - self.pad if self.pad else None
        vflip = torch.rand(n, generator=g) < self.vflip if self.vflip else None
        hflip = torch.rand(n, generator=g) < self.hflip if self.hflip else None
        if boxes is None:
            boxes = torch.tensor([0.0, 0.0, height, width], dtype=torch.float64).expand(n, 4)
        return resample(x, boxes, size, vflip, hflip, shift)

    def __repr__(self) -> str:
        steps = (self.crop, self.pad, self.hflip, self.vflip, self.jitter, self.grayscale, self.erasing)
        parts = [name for name, on in zip(BATCHED_AUGMENTATIONS, steps) if on]
        return f"TrainBatchTransform({', '.join(parts) or 'normalize only'}, {self.img_size} px)"


# ----------------------------------------------------------------------------- what runs where

@dataclass
class BatchPipelines:
    """What runs where when augment.device_transforms is on."""
    train_item: v2.Compose | None      # per image in the loader (uint8 -> uint8): CPU-only entries, sizing
    eval_item: v2.Compose | None       # per image in the loader (uint8 -> uint8): resize + centre crop
    train_batch: TrainBatchTransform   # per batch on the device
    eval_batch: EvalBatchTransform     # per batch on the device
    cpu_only: list[str]                # registry entries left per image (empty with auto)


def build_batch_pipelines(aug: AugmentConfig, channels: int, img_size: int, mean: Sequence[float] | None,
                          std: Sequence[float] | None, source_size: int | None,
                          generator: torch.Generator | None = None) -> BatchPipelines:
    """Split the recipe's augmentation between the loader (CPU, per image) and the device (per batch).
    source_size: the side of the datasets' images when all are one square size (data.cache, in-memory
    sources); None for files of mixed sizes, which the loader makes `eval_resize_size` squares."""
    side = eval_resize_size(aug, img_size)
    train_steps: list[v2.Transform] = []
    if source_size is None:
        train_steps += [v2.Resize(side, antialias=True), v2.CenterCrop(side)]
    cpu_only = cpu_only_augmentations(aug, channels, img_size)
    train_steps += [build_augmentation(name, aug, channels, img_size) for name in cpu_only]
    eval_steps: list[v2.Transform] = []
    if not (aug.crop_pct == 1.0 and source_size == img_size):
        eval_steps += [v2.Resize(side, antialias=True), v2.CenterCrop(img_size)]
    return BatchPipelines(
        train_item=v2.Compose(train_steps) if train_steps else None,
        eval_item=v2.Compose(eval_steps) if eval_steps else None,
        train_batch=TrainBatchTransform(aug, channels, img_size, mean, std, generator),
        eval_batch=EvalBatchTransform(img_size, mean, std, channels),
        cpu_only=cpu_only,
    )


__all__ = ["BATCHED_AUGMENTATIONS", "BatchPipelines", "EvalBatchTransform", "TrainBatchTransform",
           "build_batch_pipelines", "color_jitter", "cpu_only_augmentations", "erase", "resize_center_crop",
           "resample", "resolve_device_transforms", "sample_crop_boxes", "sample_erasing_boxes",
           "center_box", "to_grayscale"]
