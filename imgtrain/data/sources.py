"""Data sources -> `DataSplits` (train / val / test datasets plus what the model needs to know).

A source provides the splits it has natively (the README's table of sources); what it lacks is
carved from train, stratified and seeded (`data.val_fraction`, `data.test_fraction`,
`data.split_seed`). Then `data.train_subset`, `val_subset` and `test_subset` keep N images of
their split (stratified, seeded by `data.split_seed`). Data of fewer than 2 classes, or a train
split left with one, is refused. File sources check every image up front (data/scan.py,
`data.verify`: decode, header or trust; results remembered in the scan cache; images larger than
`data.max_image_pixels` are bad): `data.on_bad_image: error` lists the bad files, `skip` records
them in `DataSplits.skipped`.
"""

from __future__ import annotations

import csv
import gzip
import os
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgtrain.config import DataConfig
from imgtrain.data.datasets import FileImageDataset, ImageDataset, TensorImageDataset
from imgtrain.data.errors import DataError, format_bad_files, format_list
from imgtrain.data.images import IMAGE_EXTENSIONS
from imgtrain.data.scan import ScanResult, scan_cache_file, scan_files, summarize_info
from imgtrain.data.shapes import generate_shapes, shape_classes
from imgtrain.data.split import list_class_images, stratified_split_indices, stratified_subset_indices

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
VAL_FOLDER_NAMES = ("val", "valid", "validation")
SPLIT_NAMES = ("train", "val", "test")
_CSV_SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class DataSplits:
    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset | None
    classes: list[str]
    channels: int
    native_size: int  # image side in pixels (files: median of the train images' longer side)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), on_bad_image: skip
    scan: ScanResult | None = None  # file sources: what the start-up scan did (counts, the scan cache)


# ----------------------------------------------------------------------------- shared steps

def _carve(train: ImageDataset, cfg: DataConfig, need_val: bool, need_test: bool
           ) -> tuple[ImageDataset, ImageDataset | None, ImageDataset | None]:
    """Carve val and/or test from train (stratified by class, seeded by data.split_seed)."""
    val_fraction = cfg.val_fraction if need_val else 0.0
    test_fraction = cfg.test_fraction if need_test else 0.0
    if val_fraction == 0 and test_fraction == 0:
        return train, None, None
    rest, val_idx, test_idx = stratified_split_indices(train.targets, [val_fraction, test_fraction], cfg.split_seed)
    val = train.subset(val_idx) if len(val_idx) else None
    test = train.subset(test_idx) if len(test_idx) else None
    return train.subset(rest), val, test


def _apply_subsets(splits: DataSplits, cfg: DataConfig) -> None:
    """data.train_subset / val_subset / test_subset: N images of that split, stratified, seeded."""
    for name, n in (("train", cfg.train_subset), ("val", cfg.val_subset), ("test", cfg.test_subset)):
        dataset = getattr(splits, name)
        if dataset is not None and n is not None and n < len(dataset):
            setattr(splits, name, dataset.subset(stratified_subset_indices(dataset.targets, n, cfg.split_seed)))


ONE_CLASS_HINT = "A classifier needs images of at least 2 classes (with one, every prediction is right)."


def _one_class(where: str, found: str, fix: str) -> DataError:
    return DataError(f"{where}: {found}. {ONE_CLASS_HINT} {fix}")


def _check_train_classes(splits: DataSplits, cfg: DataConfig) -> None:
    """The train split, after carving and data.train_subset, must hold at least 2 classes."""
    present = torch.unique(splits.train.targets).tolist()
    if len(present) >= 2:
        return
    name = splits.classes[int(present[0])] if present else "none"
    where = f"{cfg.source} {cfg.root}" if cfg.root else f"data.source {cfg.source}"
    if cfg.train_subset is not None:
        raise _one_class(where, f"data.train_subset: {cfg.train_subset} keeps {len(splits.train)} training "
                         f"image(s), all of class {name}",
                         f"Raise data.train_subset to at least {len(splits.classes)} (the number of classes).")
    raise _one_class(where, f"the train split has images of one class only ({name})",
                     "Add training images of the other classes.")


def _check_same_classes(where: str, per_split: Mapping[str, Sequence[str]], hint: str) -> None:
    train = list(per_split["train"])
    for split, names in per_split.items():
        if split == "train" or list(names) == train:
            continue
        missing = [c for c in train if c not in names]
        extra = [c for c in names if c not in train]
        parts = []
        if missing:
            parts.append(f"missing in {split}: {', '.join(missing)}")
        if extra:
            parts.append(f"only in {split}: {', '.join(extra)}")
        raise DataError(f"{where}: the classes of the {split} split differ from train's "
                        f"({'; '.join(parts)}). {hint}")


def _natural_key(name: str):
    # "2" < "10": numeric labels sort as numbers, others alphabetically.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _file_splits(where: str, native: dict[str, tuple[list[str], list[str]]], classes: list[str],
                 cfg: DataConfig) -> DataSplits:
    """Shared end of the file sources: scan, skip or fail, datasets, carving.

    native: {split: (paths, class names)} of the source's splits; classes: checked to agree between them.
    """
    all_paths = [p for paths, _ in native.values() for p in paths]
    scan = scan_files(all_paths, cfg.verify, cfg.max_image_pixels,
                      cache_file=scan_cache_file(cfg.cache_dir, cfg.source, cfg.root or ""))
    bad, info = scan.bad, scan.info
    if bad and cfg.on_bad_image == "error":
        raise DataError(f"{where}: {len(bad)} of {len(all_paths)} image files cannot be read:\n"
                        f"{format_bad_files(bad)}\n"
                        "Fix or delete them, or set data.on_bad_image: skip to train without them "
                        "(`imgtrain scan` lists them).")
    index = {name: k for k, name in enumerate(classes)}
    datasets: dict[str, tuple[list[str], list[int]]] = {}
    for split, (paths, labels) in native.items():
        kept = [(p, index[label]) for p, label in zip(paths, labels) if p in info]
        datasets[split] = ([p for p, _ in kept], [t for _, t in kept])
    train_paths, train_targets = datasets["train"]
    present = set(train_targets)
    empty = [name for k, name in enumerate(classes) if k not in present]
    if empty:
        raise DataError(f"{where}: no readable training images for class(es) {', '.join(empty)}"
                        + (f" ({len(bad)} unreadable file(s) were skipped)" if bad else "")
                        + ". Every class needs training images: add some or remove the class.")
    known = summarize_info(info, train_paths)  # verify off: its sample's files only
    if not known:  # verify off, and every sampled file was bad
        raise DataError(f"{where}: none of the image files sampled for their channels and size (data.verify: off) "
                        f"can be read:\n{format_bad_files(bad)}\nRun `imgtrain scan` to list every bad file.")
    channels = 3 if any(found[0] == 3 for found in known) else 1
    native_size = int(statistics.median_low([found[1] for found in known]))
    built = {split: FileImageDataset(paths, targets, classes, channels, max_pixels=cfg.max_image_pixels)
             for split, (paths, targets) in datasets.items() if paths}
    train, val, test = _carve(built["train"], cfg, "val" not in native, "test" not in native)
    return DataSplits(train=train, val=built.get("val", val), test=built.get("test", test),
                      classes=list(classes), channels=channels, native_size=native_size, skipped=bad, scan=scan)


def _tensor_splits(native: dict[str, tuple[torch.Tensor, torch.Tensor]], classes: list[str],
                   cfg: DataConfig, carve: bool) -> DataSplits:
    built = {split: TensorImageDataset(images, targets, classes) for split, (images, targets) in native.items()}
    train, val, test = _carve(built["train"], cfg, carve and "val" not in native, carve and "test" not in native)
    images = built["train"].images  # carving keeps the image shape: the channels and size are the same
    return DataSplits(train=train, val=built.get("val", val), test=built.get("test", test), classes=list(classes),
                      channels=int(images.shape[1]), native_size=int(max(images.shape[2], images.shape[3])))


# ----------------------------------------------------------------------------- imagefolder

def _class_folder_split(folder: Path, split: str, allow_empty: bool) -> tuple[list[str], list[str], list[str]]:
    """(class names, paths, labels) of one folder of class folders."""
    by_class = list_class_images(folder)
    if not by_class:
        raise DataError(f"{folder} has no class folders; expected {folder}/<class name>/<image files>")
    empty = [str(folder / name) for name, files in by_class.items() if not files]
    if empty and not allow_empty:
        raise DataError(f"class folder(s) of the {split} split with no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}):\n{format_list(empty)}\n"
                        "Add images or remove the folders.")
    paths = [p for files in by_class.values() for p in files]
    labels = [name for name, files in by_class.items() for _ in files]
    if not paths:
        raise DataError(f"the {split} split {folder} has class folders but no images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return list(by_class), paths, labels


def _imagefolder(cfg: DataConfig) -> DataSplits:
    root = Path(cfg.root or "")
    if not root.is_dir():
        hint = " (a .csv file: use data.source: csv)" if root.suffix.lower() == ".csv" else ""
        raise DataError(f"data.root {root} is not a folder{hint}. For data.source imagefolder, point it at a "
                        "folder of class folders (root/<class>/*.jpg) or of train/val/test folders of class folders.")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    where = f"imagefolder {root}"
    if "train" not in subdirs:
        # Flat layout: every subfolder is a class; val/test are carved automatically.
        classes, paths, labels = _class_folder_split(root, "train", allow_empty=False)
        if len(classes) < 2:  # before the scan: a big single folder would be decoded for nothing
            raise _one_class(where, f"one class folder found: {classes[0]} ({root / classes[0]}, {len(paths)} "
                             "images)", f"Give each class its own folder beside it: {root}/<class name>/<images> "
                             f"(if {root / classes[0]} holds the images of every class, sort them into one "
                             "folder per class).")
        return _file_splits(where, {"train": (paths, labels)}, classes, cfg)
    val_dirs = [d for d in subdirs if d in VAL_FOLDER_NAMES]
    if len(val_dirs) > 1:
        raise DataError(f"{where} has more than one validation folder ({', '.join(val_dirs)}); keep one")
    unexpected = [d for d in subdirs if d not in ("train", "test") + VAL_FOLDER_NAMES]
    if unexpected:
        raise DataError(f"{where} has a train/ folder, so it is read as train/val/test folders, but it also has "
                        f"{', '.join(unexpected)}. Move those into train/ (if they are classes) or out of {root}.")
    folders = {"train": root / "train"}
    if val_dirs:
        folders["val"] = root / val_dirs[0]
    if "test" in subdirs:
        folders["test"] = root / "test"
    native, class_lists = {}, {}
    for split, folder in folders.items():
        # An empty class folder is fine in val/test (a small class may have none to spare).
        names, paths, labels = _class_folder_split(folder, split, allow_empty=split != "train")
        native[split], class_lists[split] = (paths, labels), names
    _check_same_classes(where, class_lists, "Every split needs the same class folders "
                        "(an empty class folder is allowed in val and test).")
    if len(class_lists["train"]) < 2:
        name = class_lists["train"][0]
        raise _one_class(where, f"its train folder has one class folder: {name} ({folders['train'] / name})",
                         f"Give each class its own folder in every split: {root}/train/<class name>/<images>.")
    return _file_splits(where, native, class_lists["train"], cfg)


# ----------------------------------------------------------------------------- csv

def _read_manifest(manifest: Path) -> list[tuple[int, str, str, str | None]]:
    """Rows as (line, path, label, split or None)."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # -sig: Excel writes a BOM
    except OSError as exc:
        raise DataError(f"cannot read the manifest {manifest} ({exc.strerror}); "
                        "set data.root to the CSV file") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if "path" not in header or "label" not in header:
        raise DataError(f"{manifest}, line 1: the header must name the columns path and label "
                        f"(optional: split), got {', '.join(header) or 'nothing'}")
    col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    rows = []
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        cells = {name: (row[i].strip() if i < len(row) else "") for name, i in col.items()}
        if not cells["path"] or not cells["label"]:
            raise DataError(f"{manifest}, line {line}: every row needs a path and a label, got {row}")
        split = None
        if "split" in col:
            split = _CSV_SPLIT_VALUES.get(cells["split"].lower())
            if split is None:
                raise DataError(f"{manifest}, line {line}: split must be train, val or test, got {cells['split']!r}")
        rows.append((line, cells["path"], cells["label"], split))
    if not rows:
        raise DataError(f"{manifest} lists no images (only a header)")
    return rows


def _csv(cfg: DataConfig) -> DataSplits:
    manifest = Path(cfg.root or "")
    if not manifest.is_file():
        raise DataError(f"data.root {manifest} is not a file; data.source csv needs the manifest CSV "
                        "(columns path,label and optionally split)")
    rows = _read_manifest(manifest)
    base = Path(cfg.image_root) if cfg.image_root else manifest.parent
    native: dict[str, tuple[list[str], list[str]]] = {}
    missing = []
    escaping = [f"line {line}: {rel}" for line, rel, _, _ in rows if not Path(rel).is_absolute()
                and not Path(os.path.normpath(base / rel)).is_relative_to(os.path.normpath(base))]
    if escaping:  # a manifest from elsewhere must not read files outside its folder by `..`
        raise DataError(f"{manifest}: {len(escaping)} relative path(s) leave {base} through '..':\n"
                        f"{format_list(escaping)}\nWrite them inside it (or set data.image_root to a folder that "
                        "holds them); an absolute path is taken as written")
    for line, rel, label, split in rows:
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        if not path.is_file():
            missing.append(f"line {line}: {path}")
        paths, labels = native.setdefault(split or "train", ([], []))
        paths.append(str(path))
        labels.append(label)
    if missing:
        raise DataError(f"{manifest}: {len(missing)} listed image file(s) do not exist "
                        f"(paths are relative to {base}; set data.image_root to change that):\n{format_list(missing)}")
    if "train" not in native:
        raise DataError(f"{manifest}: no rows with split train; the train split cannot be empty")
    where = f"csv {manifest}"
    class_lists = {split: sorted(set(labels), key=_natural_key) for split, (_, labels) in native.items()}
    _check_same_classes(where, class_lists, "Every split needs images of the same classes.")
    if len(class_lists["train"]) < 2:
        split_rows = " of the train split" if len(native) > 1 else ""
        raise _one_class(where, f"every row{split_rows} has the label {class_lists['train'][0]!r}",
                         "List images of the other classes in the manifest (columns path,label).")
    return _file_splits(where, native, class_lists["train"], cfg)


# ----------------------------------------------------------------------------- fashion-mnist

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format; gzip-compressed if the name ends in .gz) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path} ({exc}); the file may be incomplete, download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (wrong magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, "
                        f"found {len(data) - offset}; the file is truncated, download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _fashion_mnist(cfg: DataConfig) -> DataSplits:
    folder = Path(cfg.root or FASHION_MNIST_DIR)
    native = {}
    for split, stems in FASHION_MNIST_FILES.items():
        arrays = []
        for stem in stems:
            found = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
            if found is None:
                raise DataError(f"Fashion-MNIST: {stem}.gz not found in {folder}. Install it with "
                                "`apt-get install dataset-fashion-mnist`, or set data.root to the folder "
                                "holding the four IDX .gz files (train-images-idx3-ubyte.gz ...).")
            arrays.append(read_idx(found))
        images, labels = arrays
        if len(images) != len(labels) or images.ndim != 3:
            raise DataError(f"Fashion-MNIST {split} in {folder}: {len(images)} images but {len(labels)} labels")
        native[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return _tensor_splits(native, FASHION_MNIST_CLASSES, cfg, carve=True)


# ----------------------------------------------------------------------------- digits, shapes

def _digits(cfg: DataConfig) -> DataSplits:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    # Pixel values are 0..16 (counts of set pixels in 4x4 blocks): scale to 0..255.
    images = np.round(bunch.data.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    native = {"train": (torch.from_numpy(images), torch.from_numpy(bunch.target.astype(np.int64)))}
    return _tensor_splits(native, [str(d) for d in range(10)], cfg, carve=True)


def _shapes(cfg: DataConfig) -> DataSplits:
    # The configured sizes are the splits; val_size: 0 means no val, nothing is carved.
    return _tensor_splits(generate_shapes(cfg.shapes), shape_classes(cfg.shapes), cfg, carve=False)


def _streaming(cfg: DataConfig) -> DataSplits:
    # imported when used: it loads LitData, an optional extra
    from imgtrain.data.streaming import open_shards

    meta, built = open_shards(cfg)
    return DataSplits(train=built["train"], val=built.get("val"), test=built.get("test"),
                      classes=list(meta["classes"]), channels=int(meta["channels"]),
                      native_size=int(meta["native_size"]),
                      skipped=[(str(path), str(reason)) for path, reason in meta.get("skipped", [])])


SOURCES: dict[str, Callable[[DataConfig], DataSplits]] = {
    "imagefolder": _imagefolder,
    "csv": _csv,
    "fashion-mnist": _fashion_mnist,
    "digits": _digits,
    "shapes": _shapes,
    "streaming": _streaming,
}


def build_splits(cfg: DataConfig) -> DataSplits:
    """The train/val/test datasets of `cfg.source` (see the module docstring for the rules)."""
    builder = SOURCES.get(cfg.source)
    if builder is None:
        raise DataError(f"unknown data.source {cfg.source!r}; choose one of {', '.join(SOURCES)}")
    splits = builder(cfg)
    _apply_subsets(splits, cfg)
    _check_train_classes(splits, cfg)
    return splits
