"""Stratified splitting: index-level (`stratified_split_indices`) and folder-level (`split_folder`).

The sources' val/test carving and `imgtrain split` share one allocation, so both agree: per
class a seeded shuffle, parts taken from its front, each class's share by largest remainder (a
part totals round(fraction x N) even with small classes); every class keeps one image in train.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imgtrain.data.errors import DataError, format_list
from imgtrain.data.images import IMAGE_EXTENSIONS, is_image_file

PathLike = str | Path


def allocate(counts: np.ndarray, total: int, capacity: np.ndarray) -> np.ndarray:
    """Split `total` over classes proportionally to `counts` (largest remainder), within `capacity`."""
    counts = np.asarray(counts, dtype=np.int64)
    capacity = np.asarray(capacity, dtype=np.int64)
    n = int(counts.sum())
    if n == 0 or total <= 0:
        return np.zeros_like(counts)
    quota = counts * (total / n)
    out = np.minimum(np.floor(quota).astype(np.int64), capacity)
    remainder = quota - np.floor(quota)
    order = np.argsort(-remainder, kind="stable")  # ties: the earlier class first
    left = total - int(out.sum())
    while left > 0 and (out < capacity).any():
        for k in order:
            if left > 0 and out[k] < capacity[k]:
                out[k] += 1
                left -= 1
    return out


def stratified_split_indices(targets: Sequence[int] | np.ndarray | torch.Tensor,
                             fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Split item indices by class. Returns [rest, part_1, ..., part_k] (sorted index arrays).

    Part i holds about fractions[i] of every class; `rest` keeps at least one item per class. Parts
    are taken in order from each class's seeded shuffle: a later fraction does not change part 1.
    """
    y = targets.cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if any(f < 0 for f in fractions) or sum(fractions) >= 1.0:
        raise ValueError(f"fractions must be >= 0 and sum to less than 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    labels = np.unique(y)
    orders = [rng.permutation(np.flatnonzero(y == c)) for c in labels]
    counts = np.array([len(o) for o in orders], dtype=np.int64)
    capacity = counts - 1  # keep one per class for train
    taken = np.zeros_like(counts)
    parts: list[list[np.ndarray]] = []
    for fraction in fractions:
        want = int(np.floor(fraction * len(y) + 0.5))
        share = allocate(counts, want, capacity - taken)
        parts.append([orders[k][taken[k]:taken[k] + share[k]] for k in range(len(labels))])
        taken += share
    rest = [orders[k][taken[k]:] for k in range(len(labels))]
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in [rest, *parts]]


def stratified_subset_indices(targets: Sequence[int] | np.ndarray | torch.Tensor, n: int,
                              seed: int = 0) -> np.ndarray:
    """Sorted indices of min(n, N) items, every class its share of n (largest remainder).

    Each class's items come from the front of the same seeded shuffle as `stratified_split_indices`
    uses, so this is the part it would carve for the fraction n / N, except that a class may be
    taken whole: the result always has exactly n items (`data.train_subset`, `val_subset`, `test_subset`).
    """
    y = targets.cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    counts = np.array([len(o) for o in orders], dtype=np.int64)
    share = allocate(counts, min(n, len(y)), counts)
    parts = [order[:k] for order, k in zip(orders, share.tolist())]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def list_class_images(folder: PathLike) -> dict[str, list[str]]:
    """{class folder name: sorted image paths under it (recursively)} for each subfolder."""
    folder = Path(folder)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    out: dict[str, list[str]] = {}
    root = Path(os.path.realpath(folder))
    for name in classes:
        files: list[str] = []
        top = Path(os.path.realpath(folder / name))
        seen: dict[Path, str] = {}  # real path of each folder read -> the path it was read under
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            real = Path(os.path.realpath(dirpath))
            if real in seen or (real != top and top.is_relative_to(real)):
                where = f"{seen[real]}, a folder already read" if real in seen else f"{real}, a folder that holds it"
                raise DataError(f"{dirpath}: a symbolic link leads back to {where}: a link loop; remove the link")
            if real.is_relative_to(root) and not real.is_relative_to(top):
                raise DataError(f"{dirpath}: a symbolic link leads into another class folder ({real}): its images "
                                f"would be labelled {name}; remove the link")
            seen[real] = dirpath
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
        out[name] = sorted(files)
    return out


def split_folder(src: PathLike, dst: PathLike, val: float = 0.1, test: float = 0.1,
                 seed: int = 0, link: bool = False) -> dict[str, dict[str, int]]:
    """Split a flat `src/<class>/<images>` folder into `dst/{train,val,test}/<class>/`.

    Stratified, seeded; files copied, or symlinked (absolute) with `link=True`. A split with fraction
    0 is not created; the others get every class folder, even empty. Returns {split: {class: count}}.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"split: source folder {src} does not exist")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError(f"split: destination {dst} exists and is not empty; choose a new folder "
                        "(nothing is overwritten)")
    if val < 0 or test < 0 or val + test >= 1.0:
        raise DataError(f"split: val ({val}) and test ({test}) must be >= 0 and sum to less than 1")
    by_class = list_class_images(src)
    if not by_class:
        raise DataError(f"split: {src} has no class folders; expected {src}/<class>/<image files>")
    empty = [name for name, files in by_class.items() if not files]
    if empty:
        raise DataError(f"split: these class folders of {src} have no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}):\n{format_list(empty)}")
    classes = list(by_class)
    paths = [p for name in classes for p in by_class[name]]
    targets = np.array([k for k, name in enumerate(classes) for _ in by_class[name]])
    rest, val_idx, test_idx = stratified_split_indices(targets, [val, test], seed)
    plan = {"train": rest}
    if val > 0:
        plan["val"] = val_idx
    if test > 0:
        plan["test"] = test_idx
    counts: dict[str, dict[str, int]] = {}
    for split, indices in plan.items():
        counts[split] = {name: 0 for name in classes}
        for name in classes:
            (dst / split / name).mkdir(parents=True, exist_ok=True)
        for i in indices.tolist():
            name = classes[targets[i]]
            source = Path(paths[i])
            target = dst / split / name / source.relative_to(src / name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if link:
                os.symlink(source.resolve(), target)
            else:
                shutil.copy2(source, target)
            counts[split][name] += 1
    return counts
