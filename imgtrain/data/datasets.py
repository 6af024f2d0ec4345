"""Two map-style datasets: decoded images in one uint8 tensor, or image files read on demand.

Items are `(image, label)`, image a uint8 (C, H, W) tensor unless a transform is set.
`with_transform(t)` shares the images, so train and eval views of the same data cost no memory.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from imgtrain.data.images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, load_image

Transform = Callable[[torch.Tensor], torch.Tensor] | None
Indices = Sequence[int] | torch.Tensor | np.ndarray  # what subset() takes (stratified splits give arrays)
D = TypeVar("D", bound="ImageDataset")


def _as_index(indices: Indices) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long).reshape(-1)


def _as_targets(targets: Sequence[int] | torch.Tensor, count: int, num_classes: int) -> torch.Tensor:
    out = torch.as_tensor(targets, dtype=torch.long).reshape(-1).clone()
    if len(out) != count:
        raise ValueError(f"{len(out)} targets for {count} images")
    if len(out) and (int(out.min()) < 0 or int(out.max()) >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes - 1}], got {int(out.min())}..{int(out.max())}")
    return out


class ImageDataset(Dataset):
    """What imgtrain's datasets share (this module's two and data/cache.py's CachedImageDataset):
    `(image, label)` items, `.targets`, `.classes`, `with_transform` and `subset`."""

    targets: torch.Tensor   # LongTensor (N,)
    classes: list[str]
    transform: Transform

    def __len__(self) -> int:
        raise NotImplementedError

    def with_transform(self: D, transform: Transform) -> D:
        """A view with another transform that shares the images (a shallow copy)."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone

    def subset(self, indices: Indices) -> ImageDataset:
        """The items at `indices`, in that order."""
        raise NotImplementedError


class TensorImageDataset(ImageDataset):
    """Images already decoded into a uint8 tensor of shape (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int] | torch.Tensor,
                 classes: Sequence[str], transform: Transform = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.classes: list[str] = list(classes)
        self.targets = _as_targets(targets, len(images), len(self.classes))
        self.transform = transform

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def subset(self, indices: Indices) -> TensorImageDataset:
        index = _as_index(indices)
        return TensorImageDataset(self.images[index], self.targets[index], self.classes, self.transform)

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape[1:])
        return f"TensorImageDataset({len(self)} images {shape}, {len(self.classes)} classes)"


class FileImageDataset(ImageDataset):
    """Image files decoded on each access with `load_image(path, channels, max_pixels)`.

    max_pixels (data.max_image_pixels) is an attribute, so the limit goes with the dataset into
    loader worker processes, where Pillow's global setting of the main process does not reach.

    bad_images: None (a file that fails to decode raises BadImageError), or a `LoaderBadImages`
    (data/bad_images.py, set by training): the file is recorded there and the item is `replacement`'s."""

    bad_images: Any = None

    def __init__(self, paths: Sequence[str | Path], targets: Sequence[int] | torch.Tensor,
                 classes: Sequence[str], channels: int, transform: Transform = None,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.paths: list[str] = [str(p) for p in paths]
        self.classes: list[str] = list(classes)
        self.targets = _as_targets(targets, len(self.paths), len(self.classes))
        self.channels = channels
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.paths[index], self.channels, self.max_pixels)
        except BadImageError as exc:
            if self.bad_images is None:
                raise
            self.bad_images.record(exc.path, exc.reason)
            index, image = self.replacement(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def replacement(self, index: int) -> tuple[int, torch.Tensor]:
        """(index, image) of the first file after `index` (wrapping round) that decodes.

        Replacing, not dropping: every batch keeps its size (BatchNorm, mixing, the steps per epoch and a
        mid-epoch resume count on it), and the choice depends only on the index and the files, not on
        which worker loads it, so a rerun or a resume draws the same batches. Files that fail on the way
        are recorded too."""
        for step in range(1, len(self.paths)):
            candidate = (index + step) % len(self.paths)
            try:
                return candidate, load_image(self.paths[candidate], self.channels, self.max_pixels)
            except BadImageError as exc:
                if self.bad_images is not None:
                    self.bad_images.record(exc.path, exc.reason)
        raise BadImageError(self.paths[index], "no file of its split decodes, nothing can replace it")

    def subset(self, indices: Indices) -> FileImageDataset:
        index = _as_index(indices)
        paths = [self.paths[i] for i in index.tolist()]
        subset = FileImageDataset(paths, self.targets[index], self.classes, self.channels, self.transform,
                                  self.max_pixels)
        subset.bad_images = self.bad_images
        return subset

    def __repr__(self) -> str:
        return f"FileImageDataset({len(self)} files, {self.channels} channels, {len(self.classes)} classes)"
