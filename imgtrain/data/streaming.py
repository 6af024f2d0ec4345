"""Sharded data that outgrows one machine: `imgtrain shard` writes it, `data.source: streaming` trains on it.

Library: LitData (`litdata.optimize` writes chunk files + index.json; `StreamingDataset` and
`StreamingDataLoader` read them from a local folder, a shared filesystem or object storage such as
`s3://bucket/prefix`). Chosen over Mosaic Streaming and WebDataset because it deals each rank and each
loader worker its own chunks by itself (it reads the rank and world size from torch.distributed, which
`torchrun` + imgtrain set up before the data is built) and resumes an epoch exactly from a loader state
that is a function of how many samples were yielded: WebDataset has no exact mid-epoch resume, and Mosaic
Streaming's resume needs its own shared-memory coordination between the processes of a node.

Layout of a shard folder DST:

    DST/imgtrain_shards.json     classes, channels, native size, per-split counts and labels, skipped files
    DST/train/                   LitData chunks of the train split (index.json, chunk-*.bin)
    DST/val/, DST/test/          the same, for the splits the source has or carves (data.val_fraction ...)

Each sample holds the image file's own bytes (JPEG/PNG as written, no re-encoding) and its class index;
images are decoded when read, with the channels the metadata names.

Exact mid-epoch resume: the trainer re-seeds the train generator every epoch; the loader draws the
epoch's shuffle seed from it, and `batches_from(start)` hands LitData the loader state it saves itself
after `start` batches (`StreamingDataLoader.state_dict`: samples yielded, last worker), so LitData skips
to that point at the chunk index without reading the images before it. The position therefore needs no
extra field in the training state: the engine's `batches_done` is enough.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgtrain.config import DataConfig
from imgtrain.data.datasets import FileImageDataset, ImageDataset, Indices, Transform, _as_index
from imgtrain.data.errors import DataError
from imgtrain.data.images import DEFAULT_MAX_IMAGE_PIXELS, _decode, to_8bit

METADATA_FILE = "imgtrain_shards.json"
SHARD_FORMAT = 1
SPLITS = ("train", "val", "test")
CHUNK_BYTES = "64MB"  # LitData's advice: chunks of tens of MB stream well from object storage


def is_remote(root: str) -> bool:
    """s3://, gs://, ... : read through LitData's own downloaders, not the local filesystem."""
    return "://" in root and not root.startswith("local:")


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else str(Path(root) / name)


# ----------------------------------------------------------------------------- writing (imgtrain shard)

def _sample(item: tuple[str, int]) -> dict[str, Any]:
    """One optimize input -> one sample: the file's bytes as written and its class index."""
    path, label = item
    return {"image": Path(path).read_bytes(), "label": int(label)}


@dataclass
class ShardSummary:
    """What `write_shards` wrote, for the command's output."""
    dst: Path
    counts: dict[str, int]
    classes: list[str]
    skipped: list[tuple[str, str]]


def write_shards(found: Any, dst: str | Path, workers: int = 1, splits: Sequence[str] = SPLITS,
                 overwrite: bool = False, seed: int = 0) -> ShardSummary:
    """Shards of `found` (the DataSplits of an imagefolder or csv source, as `build_splits` reads it: bad
    images skipped and listed) in `dst`, written by `workers` processes; `seed` orders the images. Written
    into a temporary folder beside `dst` and renamed at the end: an interrupted run leaves no half-written
    shard folder."""
    from litdata import optimize

    if not isinstance(found.train, FileImageDataset):
        raise DataError("imgtrain shard reads image files: an image folder or a CSV manifest")
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        if not overwrite:
            raise DataError(f"{dst} exists and is not empty; choose a new folder or pass --overwrite to replace it")
    chosen = [s for s in SPLITS if s in splits and getattr(found, s) is not None]
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        meta: dict[str, Any] = {"format": SHARD_FORMAT, "classes": found.classes, "channels": found.channels,
                                "native_size": found.native_size, "counts": {}, "labels": {},
                                "skipped": [list(s) for s in found.skipped]}
        for split in chosen:
            dataset = getattr(found, split)
            assert isinstance(dataset, FileImageDataset), "imagefolder and csv give file datasets"
            # written in a seeded random order: LitData shuffles chunks and the images inside each chunk, so
            # a source listed class by class would otherwise give chunks (and batches) of one or two classes
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
            dataset = dataset.subset(order)
            inputs = list(zip(dataset.paths, dataset.targets.tolist()))
            # keep_data_ordered: sample k of the split is input k, so the labels below line up with the chunks
            optimize(fn=_sample, inputs=inputs, output_dir=str(work / split), chunk_bytes=CHUNK_BYTES,
                     num_workers=max(1, min(workers, len(inputs))), keep_data_ordered=True, verbose=False,
                     start_method="fork" if os.name == "posix" else None)
            meta["counts"][split] = len(inputs)
            meta["labels"][split] = dataset.targets.tolist()
        (work / METADATA_FILE).write_text(json.dumps(meta) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        work.rename(dst)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return ShardSummary(dst=dst, counts=dict(meta["counts"]), classes=list(found.classes), skipped=found.skipped)


# ----------------------------------------------------------------------------- reading

def read_metadata(root: str) -> dict[str, Any]:
    """DST/imgtrain_shards.json, from a local folder or object storage (LitData's downloader)."""
    where = _join(root, METADATA_FILE)
    try:
        if is_remote(root):
            from litdata.streaming.downloader import get_downloader

            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / METADATA_FILE
                get_downloader(root, tmp, []).download_file(where, str(local))
                text = local.read_text()
        else:
            text = Path(where).read_text()
        meta = json.loads(text)
    except (OSError, ValueError) as exc:
        raise DataError(f"data.root {root}: cannot read {METADATA_FILE} ({exc}). Point data.root at a folder "
                        "written by `imgtrain shard SRC DST`") from None
    if meta.get("format") != SHARD_FORMAT:
        raise DataError(f"{where}: shard format {meta.get('format')!r}, this imgtrain reads {SHARD_FORMAT}; "
                        "write the shards again with `imgtrain shard`")
    return meta


def decode_image(data: bytes, channels: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """An image file's bytes -> uint8 (C, H, W) with `channels`, decoded as `load_image` decodes files
    (orientation, 8 bits, the same grey/RGB conversion). `imgtrain shard` wrote only images its scan read."""
    img = to_8bit(_decode(io.BytesIO(data), max_pixels))  # type: ignore[arg-type]  # Pillow opens a buffer
    if channels == 1 and img.mode != "L":
        img = img.convert("L")
    elif channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.array(img)
    return torch.from_numpy(arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1)))


class ShardDataset(ImageDataset):
    """One split of a shard folder, by index (val/test loaders, class counts, `subset`): LitData's random
    access reads the chunk that holds an image (downloading it first from object storage)."""

    def __init__(self, root: str, split: str, meta: dict[str, Any], transform: Transform = None,
                 indices: torch.Tensor | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.root, self.split, self.meta = root, split, meta
        self.classes = list(meta["classes"])
        self.channels = int(meta["channels"])
        all_targets = torch.as_tensor(meta["labels"][split], dtype=torch.long)
        self.indices = indices if indices is not None else torch.arange(len(all_targets))
        self.targets = all_targets[self.indices]
        self.transform = transform
        self.max_pixels = max_pixels
        self._stream: Any = None  # opened on first access, in the process (worker) that reads

    @property
    def input_dir(self) -> str:
        return _join(self.root, self.split)

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stream": None}  # each worker opens its own reader

    def __getitem__(self, index: int):
        if self._stream is None:
            from litdata import StreamingDataset

            self._stream = StreamingDataset(self.input_dir)
        sample = self._stream[int(self.indices[index])]
        image = decode_image(sample["image"], self.channels, self.max_pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def subset(self, indices: Indices) -> ShardDataset:
        return ShardDataset(self.root, self.split, self.meta, self.transform, self.indices[_as_index(indices)],
                            self.max_pixels)

    def __repr__(self) -> str:
        return f"ShardDataset({len(self)} images of {self.input_dir}, {len(self.classes)} classes)"


_IMAGE_STREAM: type | None = None


def __getattr__(name: str) -> Any:
    # `ImageStream` is built on first use (importing litdata takes over a second, and it is an optional
    # extra); a module attribute all the same, so a spawned loader worker unpickles it by name
    if name == "ImageStream":
        return _stream_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stream_class() -> type:
    """LitData's StreamingDataset with imgtrain's decoding and augmentation."""
    global _IMAGE_STREAM
    if _IMAGE_STREAM is not None:
        return _IMAGE_STREAM
    from litdata import StreamingDataset

    class ImageStream(StreamingDataset):
        """Samples as (image, label), transformed; with `seed_base`, each image's augmentation is seeded
        from its index in the split (loader workers: the same draw wherever the epoch started)."""

        channels: int = 3
        image_transform: Transform = None  # not `transform`: LitData applies that one to the raw sample
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
        seed_base: int | None = None

        def __getitem__(self, index: Any) -> Any:
            sample = super().__getitem__(index)
            if self.seed_base is not None and hasattr(index, "index"):
                torch.manual_seed(self.seed_base + int(index.index))
            image = decode_image(sample["image"], self.channels, self.max_pixels)
            if self.image_transform is not None:
                image = self.image_transform(image)
            return image, int(sample["label"])

    ImageStream.__qualname__ = "ImageStream"
    _IMAGE_STREAM = ImageStream
    return ImageStream


class StreamingTrainLoader:
    """The train split streamed from its shards: each rank and each worker reads its own chunks (LitData),
    shuffled per epoch from the train generator, and an epoch can start at any batch (`batches_from`)."""

    shards_by_rank = True  # api.shard_loaders leaves the per-rank split to LitData

    def __init__(self, dataset: ShardDataset, batch_size: int, workers: int, generator: torch.Generator,
                 drop_last: bool = False, pin_memory: bool = False):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, workers
        self.generator, self.drop_last, self.pin_memory = generator, drop_last, pin_memory
        self._batches: int | None = None

    def _make(self, seed: int) -> Any:
        from litdata import StreamingDataLoader

        stream = _stream_class()(self.dataset.input_dir, shuffle=True, seed=seed, drop_last=None)
        stream.channels, stream.image_transform = self.dataset.channels, self.dataset.transform
        stream.max_pixels = self.dataset.max_pixels
        stream.seed_base = seed * 1_000_003 if self.num_workers > 0 else None
        # its own generator: without one, torch's DataLoader draws its workers' base seed from the global RNG
        # when an epoch's iterator starts, which a resume (restoring that RNG mid-epoch) would draw elsewhere
        return StreamingDataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                                   drop_last=self.drop_last, pin_memory=self.pin_memory,
                                   generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        """Batches per epoch on this rank: LitData's share of the chunks, which can differ between ranks by
        a batch; under several processes the smallest share, as every rank must take the same steps (the
        first call is a collective: the Trainer makes it on every rank at once, then it is kept)."""
        if self._batches is None:
            batches = len(self._make(0))
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                count = torch.tensor([batches], dtype=torch.long)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
                batches = int(count.item())
            self._batches = batches
        return self._batches

    def __iter__(self) -> Iterator[Any]:
        return self.batches_from(0)

    def batches_from(self, start: int) -> Iterator[Any]:
        """The epoch (shuffle seed drawn from the generator) from batch `start` on, exactly as a whole pass
        yields it: LitData gets the state its loader saves after `start` batches and skips to it."""
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
        loader = self._make(seed)
        loader.current_epoch = 0  # the epoch is in the seed; LitData's own counter stays at 1
        if start > 0:
            done = start * self.batch_size
            loader.load_state_dict({"dataset": loader.dataset.state_dict(done, self.num_workers, self.batch_size),
                                    "current_epoch": 1, "num_samples_yielded": done,
                                    "latest_worker_idx": (start - 1) % max(self.num_workers, 1)})
            loader.restore = True
        return iter(loader)

    def with_batch_size(self, batch_size: int) -> StreamingTrainLoader:
        return StreamingTrainLoader(self.dataset, batch_size, self.num_workers, self.generator, self.drop_last,
                                    self.pin_memory)


def open_shards(cfg: DataConfig) -> tuple[dict[str, Any], dict[str, ShardDataset]]:
    """`data.source: streaming`: the metadata of the shard folder data.root and a ShardDataset per split it
    holds (sources.py makes them DataSplits: classes and channels from the metadata, nothing carved)."""
    try:
        import litdata  # noqa: F401
    except ImportError:
        raise DataError("data.source streaming needs LitData: pip install 'imgtrain[streaming]'") from None
    root = str(cfg.root)
    if not is_remote(root) and not Path(root).is_dir():
        raise DataError(f"data.root {root} is not a folder; data.source streaming reads a folder written by "
                        "`imgtrain shard SRC DST` (or s3://bucket/prefix)")
    meta = read_metadata(root)
    if "train" not in meta["counts"]:
        raise DataError(f"{root} holds no train shards (splits: {', '.join(meta['counts'])}); write them with "
                        "`imgtrain shard SRC DST --split all`")
    return meta, {s: ShardDataset(root, s, meta, max_pixels=cfg.max_image_pixels) for s in SPLITS
                  if s in meta["counts"]}


__all__ = ["METADATA_FILE", "ShardDataset", "ShardSummary", "StreamingTrainLoader",
           "decode_image", "is_remote", "open_shards", "read_metadata", "write_shards"]
