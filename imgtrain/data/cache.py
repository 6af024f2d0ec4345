"""The decoded cache (`data.cache`, the README's "Feeding the model fast"): decode each file once.

Every file of every split (file sources only) is decoded once into one uint8 array (N, C, S, S) and
the splits become `CachedImageDataset`s over its rows. Each file is stored as `load_image` decodes
it, shorter side resized to S = `cache_resolution` and centre-cropped square.

- memory: one tensor in RAM, built each run; refused when it would not fit in the available RAM.
- disk: a memory-mapped file in `data.cache_dir`, shared by workers and runs. Its name hashes the
  sorted files with their sizes and mtimes, S, the channels and `CACHE_FORMAT`, so any change
  rebuilds it; it is written under a temporary name and renamed when complete.

A file that fails to decode while the cache is built (one `data.verify: header` or `off` let through)
leaves its row blank and is listed in `DecodedCache.bad` (on disk: beside the cache, NAME.bad.json);
`apply_cache` then applies `data.on_bad_image` as the scan does: stop naming it, or leave it out of
the splits and list it with the skipped files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from imgtrain.config import AugmentConfig
from imgtrain.data.datasets import FileImageDataset, ImageDataset, Indices, Transform
from imgtrain.data.errors import DataError, format_bad_files
from imgtrain.data.images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, ScanProgress, load_image, usable_cpus
from imgtrain.data.transforms import eval_resize_size

CACHE_FORMAT = 1        # bump when decoding or resizing changes: every older disk cache then misses
MEMORY_HEADROOM = 0.8   # a memory cache may take at most this share of the available RAM
SUFFIX = ".u8"          # raw uint8 rows, C-order (N, C, S, S)


def cache_resolution(aug: AugmentConfig, img_size: int) -> int:
    """Side S of the cached images: the largest resolution the run reads (eval's resize)."""
    return max(img_size, eval_resize_size(aug, img_size))


def decode_for_cache(path: str, channels: int, size: int,
                     max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """One file as the cache stores it: decoded, shorter side resized to `size`, centre-cropped square."""
    image = load_image(path, channels, max_pixels)
    image = v2.functional.resize(image, size, antialias=True)  # returns the image itself when already there
    return v2.functional.center_crop(image, [size, size])


@dataclass
class DecodedCache:
    """Decoded images of a sorted list of files: `images[row]` is the file `paths[row]`."""
    images: torch.Tensor                 # uint8 (N, C, S, S); memory-mapped when `file` is set
    paths: list[str]
    file: Path | None = None             # disk: the cache file
    build_seconds: float = 0.0           # 0 when an existing disk cache was reused
    reused: bool = False
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files whose rows are blank
    _row: dict[str, int] = field(init=False, repr=False)  # path -> row, derived from paths

    def __post_init__(self):
        self._row = {p: i for i, p in enumerate(self.paths)}

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def rows(self, paths: Sequence[str]) -> torch.Tensor:
        """Row of each file (paths as given to `build_cache`, relative or absolute)."""
        return torch.tensor([self._row[os.path.abspath(p)] for p in paths], dtype=torch.long)

    def describe(self) -> str:
        where = f"disk {self.file}" if self.file is not None else "memory"
        how = "reused" if self.reused else f"built in {self.build_seconds:.1f} s"
        return (f"decoded cache ({where}): {len(self.paths)} images at {self.size} px, "
                f"{_size(self.nbytes)}, {how}")

    def __getstate__(self) -> dict[str, Any]:
        # a worker started with spawn re-opens the file instead of receiving a pickled copy of it
        state = dict(self.__dict__)
        if self.file is not None:
            state["images"] = tuple(self.images.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.file is not None:  # __getstate__ saved the image tensor's shape in its place
            self.images = _open(self.file, state["images"])


class CachedImageDataset(ImageDataset):
    """Rows of a `DecodedCache` (shared by `with_transform` and `subset`), read like `TensorImageDataset`."""

    def __init__(self, cache: DecodedCache, rows: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
                 transform: Transform = None):
        self.cache = cache
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.classes: list[str] = list(classes)
        self.transform = transform
        # numpy views of the same memory: indexing them per item costs a tenth of a tensor's
        self._rows, self._labels = self.rows.numpy(), self.targets.numpy()

    @classmethod
    def of(cls, dataset: FileImageDataset, cache: DecodedCache) -> CachedImageDataset:
        return cls(cache, cache.rows(dataset.paths), dataset.targets, dataset.classes, dataset.transform)

    @property
    def channels(self) -> int:
        return int(self.cache.images.shape[1])

    @property
    def paths(self) -> list[str]:
        return [self.cache.paths[r] for r in self.rows.tolist()]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        image = self.cache.images[int(self._rows[index])]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self._labels[index])

    def subset(self, indices: Indices) -> CachedImageDataset:
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return CachedImageDataset(self.cache, self.rows[index], self.targets[index], self.classes,
                                  self.transform)

    def __repr__(self) -> str:
        return (f"CachedImageDataset({len(self)} images {self.channels}x{self.cache.size}x{self.cache.size}, "
                f"{len(self.classes)} classes)")


# ----------------------------------------------------------------------------- building

def _decode_all(paths: Sequence[str], channels: int, size: int, out: torch.Tensor,
                max_pixels: int | None) -> list[tuple[str, str]]:
    """Fill `out`; the (path, reason) of the files that fail to decode (their rows are left as they are)."""
    def decode(row: int) -> tuple[str, str] | None:
        try:
            out[row] = decode_for_cache(paths[row], channels, size, max_pixels)
        except BadImageError as exc:
            return (exc.path, exc.reason)
        return None

    bad: list[tuple[str, str]] = []
    progress = ScanProgress(len(paths), "building the decoded cache")  # shown past 2 s only
    # threads: decoding and resizing release the GIL
    with ThreadPoolExecutor(max_workers=max(1, min(8, usable_cpus()))) as pool:
        for done, failed in enumerate(pool.map(decode, range(len(paths))), start=1):
            if failed is not None:
                bad.append(failed)
            progress.update(done)
    progress.done()
    return bad


def _size(n: float) -> str:
    """Bytes for people: 1000 B, 2.6 KiB, 117 MiB, 1.4 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def _memory_cache(paths: list[str], channels: int, size: int, max_pixels: int | None) -> DecodedCache:
    import psutil

    need = len(paths) * channels * size * size
    available = psutil.virtual_memory().available
    if need > MEMORY_HEADROOM * available:
        raise DataError(f"data.cache: memory needs {_size(need)} for {len(paths)} images at {size} px, "
                        f"but only {_size(available)} of RAM is available. Use data.cache: disk (a "
                        "memory-mapped file in data.cache_dir), a smaller augment.img_size, or "
                        "data.cache: off.")
    started = time.perf_counter()
    images = torch.zeros((len(paths), channels, size, size), dtype=torch.uint8)  # zeros: a bad file's blank row
    bad = _decode_all(paths, channels, size, images, max_pixels)
    return DecodedCache(images, paths, build_seconds=time.perf_counter() - started, bad=bad)


def cache_key(paths: Sequence[str], channels: int, size: int) -> tuple[str, str]:
    """(list key, full key): the sorted files alone, and with their sizes, mtimes, size and channels."""
    stats = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"data.cache: cannot read {path} ({exc.strerror}); was it moved or "
                            "deleted?") from None
        stats.append((path, st.st_size, st.st_mtime_ns))
    listing = hashlib.sha256(json.dumps(list(paths)).encode()).hexdigest()[:16]
    full = hashlib.sha256(json.dumps([CACHE_FORMAT, size, channels, stats]).encode()).hexdigest()[:16]
    return listing, full


def _open(file: Path, shape: tuple) -> torch.Tensor:
    # mode "c": copy-on-write, so the tensor is writable (no torch warning) and the file never changes
    return torch.from_numpy(np.memmap(file, dtype=np.uint8, mode="c", shape=shape))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but not ours
    return True


def _remove_stale(folder: Path, listing: str, keep: Path) -> None:
    """Older versions of this file list, and partial files of builds that died."""
    for old in folder.glob(f"{listing}-*"):
        if old in (keep, _bad_list(keep)):
            continue
        if ".tmp-" in old.name:
            pid = old.name.rsplit(".tmp-", 1)[1]
            if pid.isdigit() and _pid_alive(int(pid)):
                continue  # another run is building it right now
        old.unlink(missing_ok=True)


def _disk_cache(paths: list[str], channels: int, size: int, cache_dir: str,
                max_pixels: int | None) -> DecodedCache:
    folder = Path(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir {folder}: cannot create the folder ({exc.strerror}); "
                        "set data.cache_dir to a writable folder") from None
    if not os.access(folder, os.W_OK):
        raise DataError(f"data.cache_dir {folder}: not writable; set data.cache_dir to a writable folder")
    listing, key = cache_key(paths, channels, size)
    file = folder / f"{listing}-{key}{SUFFIX}"
    shape = (len(paths), channels, size, size)
    need = int(np.prod(shape))
    if file.is_file() and file.stat().st_size == need:
        return DecodedCache(_open(file, shape), paths, file=file, reused=True, bad=_read_bad_list(file))
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DataError(f"data.cache: disk needs {_size(need)} in {folder} for {len(paths)} images at "
                        f"{size} px, but only {_size(free)} is free. Point data.cache_dir at a bigger "
                        "disk, or use a smaller augment.img_size.")
    started = time.perf_counter()
    partial = folder / f"{file.name}.tmp-{os.getpid()}"
    try:
        array = np.memmap(partial, dtype=np.uint8, mode="w+", shape=shape)
        bad = _decode_all(paths, channels, size, torch.from_numpy(array), max_pixels)
        array.flush()
        del array
        if bad:  # before the cache itself: a cache file never exists without its list of blank rows
            partial_list = folder / f"{_bad_list(file).name}.tmp-{os.getpid()}"
            partial_list.write_text(json.dumps(bad), encoding="utf-8")
            os.replace(partial_list, _bad_list(file))
        os.replace(partial, file)  # atomic: the key name exists only for a complete cache
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _remove_stale(folder, listing, keep=file)
    return DecodedCache(_open(file, shape), paths, file=file, build_seconds=time.perf_counter() - started, bad=bad)


def _bad_list(file: Path) -> Path:
    return file.with_name(file.name + ".bad.json")


def _read_bad_list(file: Path) -> list[tuple[str, str]]:
    """The blank rows of a disk cache; a damaged list makes the cache unusable (a blank row would train)."""
    listing = _bad_list(file)
    if not listing.is_file():
        return []
    try:
        return [(str(path), str(reason)) for path, reason in json.loads(listing.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"data.cache: cannot read {listing}, the list of files the cache {file} holds no image "
                        f"for ({exc}); delete both files and run again to rebuild the cache") from None


def build_cache(paths: Sequence[str], channels: int, size: int, mode: str, cache_dir: str = ".imgtrain_cache",
                max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedCache:
    """Decode `paths` (any order; stored sorted) at `size` px: mode "memory" or "disk".

    max_pixels: data.max_image_pixels, as in `load_image`."""
    if mode not in ("memory", "disk"):
        raise DataError(f"data.cache must be off, memory or disk, got {mode!r}")
    if channels not in (1, 3):
        raise DataError(f"the cache stores 1- or 3-channel images, got channels={channels!r}")
    ordered = sorted({os.path.abspath(p) for p in paths})
    if mode == "memory":
        return _memory_cache(ordered, channels, size, max_pixels)
    return _disk_cache(ordered, channels, size, cache_dir, max_pixels)


def apply_cache(splits: Any, cfg: Any, size: int) -> DecodedCache | None:
    """Replace file-backed splits by cached ones sharing one cache (`cfg`: recipe.data).

    None when nothing is cached (in-memory sources, data.cache: off)."""
    datasets = {name: getattr(splits, name) for name in ("train", "val", "test")}
    present = [d for d in datasets.values() if d is not None]
    if cfg.cache == "off" or not all(isinstance(d, FileImageDataset) for d in present):
        return None
    paths = [p for d in present for p in d.paths]
    cache = build_cache(paths, splits.channels, size, cfg.cache, cfg.cache_dir, cfg.max_image_pixels)
    blank = {path for path, _ in cache.bad}
    if blank and cfg.on_bad_image == "error":
        raise DataError(f"data.cache: {len(blank)} image file(s) cannot be decoded (data.verify: {cfg.verify} "
                        f"did not decode them before):\n{format_bad_files(cache.bad)}\nFix or delete them, or set "
                        "data.on_bad_image: skip to train without them (`imgtrain scan` lists them all).")
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        if blank:  # left out, as the scan leaves out the bad files it finds
            keep = [i for i, path in enumerate(dataset.paths) if os.path.abspath(path) not in blank]
            if not keep:
                raise DataError(f"data.cache: no image of the {name} split decodes:\n{format_bad_files(cache.bad)}")
            dataset = dataset.subset(keep)
        setattr(splits, name, CachedImageDataset.of(dataset, cache))
    known = {path for path, _ in splits.skipped}
    splits.skipped.extend((path, reason) for path, reason in cache.bad if path not in known)
    return cache


__all__ = ["CACHE_FORMAT", "CachedImageDataset", "DecodedCache", "apply_cache", "build_cache", "cache_key",
           "cache_resolution", "decode_for_cache"]
