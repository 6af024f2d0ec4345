"""build_splits for every source: layouts, carving, class checks, bad files, csv, subsets."""

import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgtrain.config import DataConfig, ShapesConfig
from imgtrain.data import SOURCES, DataError, FileImageDataset, build_splits, write_shapes_imagefolder
from imgtrain.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR


def counts(dataset, classes):
    return dict(zip(classes, torch.bincount(dataset.targets, minlength=len(classes)).tolist()))


def test_registry_lists_every_source():
    assert sorted(SOURCES) == sorted(["imagefolder", "csv", "fashion-mnist", "digits", "shapes", "streaming"])


# ----------------------------------------------------------------------------- imagefolder

def test_imagefolder_split_layout(make_folder):
    make_folder({"cat": 4, "dog": 3}, sub="train")
    make_folder({"cat": 2, "dog": 1}, sub="valid")
    root = make_folder({"cat": 1, "dog": 2}, sub="test")
    splits = build_splits(DataConfig(source="imagefolder", root=str(root), val_fraction=0.5))
    assert splits.classes == ["cat", "dog"]
    assert counts(splits.train, splits.classes) == {"cat": 4, "dog": 3}  # native val: nothing carved
    assert counts(splits.val, splits.classes) == {"cat": 2, "dog": 1}
    assert counts(splits.test, splits.classes) == {"cat": 1, "dog": 2}
    assert splits.channels == 3 and splits.native_size == 12 and splits.skipped == []
    image, label = splits.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 12) and label == 0


def test_imagefolder_split_layout_carves_missing_val(make_folder):
    root = make_folder({"a": 10, "b": 10}, sub="train")
    splits = build_splits(DataConfig(source="imagefolder", root=str(root), val_fraction=0.2))
    assert counts(splits.val, splits.classes) == {"a": 2, "b": 2}
    assert len(splits.train) == 16 and splits.test is None
    assert not set(splits.train.paths) & set(splits.val.paths)


def test_imagefolder_flat_is_split_stratified_and_seeded(make_folder):
    root = make_folder({"a": 20, "b": 10, "c": 10})
    cfg = DataConfig(source="imagefolder", root=str(root), val_fraction=0.2, test_fraction=0.1)
    splits = build_splits(cfg)
    assert counts(splits.val, splits.classes) == {"a": 4, "b": 2, "c": 2}
    assert counts(splits.test, splits.classes) == {"a": 2, "b": 1, "c": 1}
    assert len(splits.train) + len(splits.val) + len(splits.test) == 40
    assert len(set(splits.train.paths) | set(splits.val.paths) | set(splits.test.paths)) == 40
    assert build_splits(cfg).val.paths == splits.val.paths  # deterministic
    cfg.split_seed = 1
    assert build_splits(cfg).val.paths != splits.val.paths


def test_native_size_is_median_and_gray_channels(make_folder, tmp_path, write_image):
    root = tmp_path / "sizes"
    for i, size in enumerate([(10, 10), (20, 8), (30, 30)]):
        write_image(root / "x" / f"{i}.png", size=size, mode="L")
        write_image(root / "y" / f"{i}.png", size=size, mode="L")
    splits = build_splits(DataConfig(source="imagefolder", root=str(root), val_fraction=0.0))
    assert splits.native_size == 20 and splits.channels == 1
    assert splits.train[0][0].shape[0] == 1
    write_image(root / "y" / "colour.png", size=(20, 20), mode="RGB")  # one colour image -> RGB for all
    splits = build_splits(DataConfig(source="imagefolder", root=str(root), val_fraction=0.0))
    assert splits.channels == 3 and splits.train[0][0].shape[0] == 3


def test_class_mismatch_between_train_and_val(make_folder):
    make_folder({"cat": 2, "dog": 2}, sub="train")
    root = make_folder({"cat": 1, "bird": 1}, sub="val")
    with pytest.raises(DataError) as info:
        build_splits(DataConfig(source="imagefolder", root=str(root)))
    message = str(info.value)
    assert "val" in message and "missing in val: dog" in message and "only in val: bird" in message


def test_empty_class_folder_and_empty_root(make_folder, tmp_path):
    root = make_folder({"cat": 2})
    (root / "dog").mkdir()
    with pytest.raises(DataError, match="dog"):
        build_splits(DataConfig(source="imagefolder", root=str(root)))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        build_splits(DataConfig(source="imagefolder", root=str(tmp_path / "nothing")))
    with pytest.raises(DataError, match="not a folder"):
        build_splits(DataConfig(source="imagefolder", root=str(tmp_path / "missing")))


def _add_bad_files(folder: Path, write_image):
    good = write_image(folder / "good.jpg", size=(64, 64))
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "noise.png").write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    (folder / "notes.jpg").write_text("not an image")
    good.unlink()
    return {str(folder / n) for n in ("truncated.jpg", "noise.png", "notes.jpg")}


def test_bad_images_error_lists_them(make_folder, write_image):
    root = make_folder({"cat": 4, "dog": 4})
    bad = _add_bad_files(root / "dog", write_image)
    with pytest.raises(DataError) as info:
        build_splits(DataConfig(source="imagefolder", root=str(root)))
    message = str(info.value)
    assert "3 of 11 image files" in message and "on_bad_image: skip" in message
    assert all(path in message for path in bad)
    assert "truncated" in message


def test_bad_images_skipped_and_recorded(make_folder, write_image):
    root = make_folder({"cat": 4, "dog": 4})
    bad = _add_bad_files(root / "dog", write_image)
    splits = build_splits(DataConfig(source="imagefolder", root=str(root), on_bad_image="skip", val_fraction=0.0))
    assert {path for path, _ in splits.skipped} == bad
    assert len(splits.train) == 8 and not set(splits.train.paths) & bad
    assert all(reason for _, reason in splits.skipped)


def test_bad_image_list_is_capped(make_folder):
    root = make_folder({"cat": 2, "dog": 2})  # two classes: one alone is refused before the scan
    for i in range(25):
        (root / "cat" / f"bad{i:02d}.png").write_text("x")
    with pytest.raises(DataError) as info:
        build_splits(DataConfig(source="imagefolder", root=str(root)))
    assert "... and 5 more" in str(info.value)
    listed = [line for line in str(info.value).splitlines() if ".png: " in line]
    assert len(listed) == 20  # the first 20 files, then the count of the rest


# ----------------------------------------------------------------------------- csv

def _manifest(tmp_path, rows, header="path,label,split"):
    path = tmp_path / "lists" / "manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_csv_relative_paths_and_split_column(tmp_path, write_image):
    for i in range(6):
        write_image(tmp_path / "lists" / "img" / f"{i}.png", seed=i)
    rows = [f"img/{i}.png,{'ship' if i % 2 else 'car'},{'train' if i < 4 else 'val'}" for i in range(6)]
    splits = build_splits(DataConfig(source="csv", root=str(_manifest(tmp_path, rows))))
    assert splits.classes == ["car", "ship"]
    assert len(splits.train) == 4 and len(splits.val) == 2 and splits.test is None
    assert splits.val.paths == [str(tmp_path / "lists" / "img" / "4.png"), str(tmp_path / "lists" / "img" / "5.png")]
    assert splits.val.targets.tolist() == [0, 1]


def test_csv_image_root_numeric_labels_and_carving(tmp_path, write_image):
    for i in range(20):
        write_image(tmp_path / "pics" / f"{i}.png", seed=i)
    rows = [f"{i}.png,{i % 2 * 8 + 2}" for i in range(20)]  # labels "2" and "10"
    manifest = _manifest(tmp_path, rows, header="path,label")
    splits = build_splits(DataConfig(source="csv", root=str(manifest), image_root=str(tmp_path / "pics"),
                                     val_fraction=0.2))
    assert splits.classes == ["2", "10"]  # numeric order, not "10" < "2"
    assert counts(splits.val, splits.classes) == {"2": 2, "10": 2}


def test_csv_missing_files_are_listed(tmp_path, write_image):
    write_image(tmp_path / "lists" / "a.png")
    rows = ["a.png,x,train", "gone1.png,x,train", "sub/gone2.png,y,val"]
    with pytest.raises(DataError) as info:
        build_splits(DataConfig(source="csv", root=str(_manifest(tmp_path, rows))))
    message = str(info.value)
    assert "2 listed image file(s) do not exist" in message
    assert "line 3" in message and "gone1.png" in message and "line 4" in message and "gone2.png" in message


def test_csv_bad_header_and_split_value(tmp_path, write_image):
    with pytest.raises(DataError, match="header"):
        build_splits(DataConfig(source="csv", root=str(_manifest(tmp_path, ["a.png,x"], header="file,class"))))
    write_image(tmp_path / "lists" / "a.png")
    with pytest.raises(DataError, match="line 2"):
        build_splits(DataConfig(source="csv", root=str(_manifest(tmp_path, ["a.png,x,holdout"]))))


# ----------------------------------------------------------------------------- built-in data

@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} "
                           "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist():
    splits = build_splits(DataConfig(source="fashion-mnist", val_fraction=0.1))
    assert len(splits.train) + len(splits.val) == 60000 and len(splits.test) == 10000
    assert len(splits.val) == 6000
    assert counts(splits.val, splits.classes) == {name: 600 for name in FASHION_MNIST_CLASSES}
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.test.targets.min() == 0 and splits.test.targets.max() == 9
    assert torch.bincount(splits.test.targets).tolist() == [1000] * 10
    assert splits.channels == 1 and splits.native_size == 28
    assert splits.classes[0] == "T-shirt/top" and splits.classes[9] == "Ankle boot"
    assert 60 < splits.test.images.float().mean() < 90  # Fashion-MNIST mean pixel is about 73


def test_fashion_mnist_missing_folder(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_splits(DataConfig(source="fashion-mnist", root=str(tmp_path)))


def test_digits_carves_val_and_test():
    splits = build_splits(DataConfig(source="digits", val_fraction=0.1, test_fraction=0.2))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert len(splits.val) == 180 and len(splits.test) == 359
    assert splits.train.images.shape[1:] == (1, 8, 8) and splits.native_size == 8
    assert int(splits.train.images.max()) == 255 and int(splits.train.images.min()) == 0
    assert splits.classes == [str(d) for d in range(10)]
    assert set(counts(splits.val, splits.classes).values()) <= {17, 18, 19}


def test_train_subset_is_stratified_and_deterministic():
    cfg = DataConfig(source="digits", val_fraction=0.1, train_subset=100)
    splits = build_splits(cfg)
    assert len(splits.train) == 100 and len(splits.val) == 180  # val untouched
    assert set(counts(splits.train, splits.classes).values()) <= {9, 10, 11}
    assert torch.equal(build_splits(cfg).train.images, splits.train.images)


def test_shapes_source_and_imagefolder_round_trip(tmp_path):
    shapes = ShapesConfig(num_classes=3, image_size=16, train_size=30, val_size=9, test_size=6, seed=3)
    memory = build_splits(DataConfig(source="shapes", shapes=shapes))
    assert (len(memory.train), len(memory.val), len(memory.test)) == (30, 9, 6)
    assert memory.classes == ["circle", "square", "triangle"] and memory.channels == 3
    written = write_shapes_imagefolder(shapes, tmp_path / "shapes", fmt="png")
    assert written["val"] == {"circle": 3, "square": 3, "triangle": 3}
    files = build_splits(DataConfig(source="imagefolder", root=str(tmp_path / "shapes")))
    assert isinstance(files.train, FileImageDataset)
    assert files.classes == memory.classes and files.native_size == 16 and files.channels == 3
    assert (len(files.train), len(files.val), len(files.test)) == (30, 9, 6)
    for path, target in zip(files.val.paths, files.val.targets.tolist()):
        index = int(Path(path).stem.split("_")[1])  # val_00004.png -> item 4 of the val split
        image, label = files.val[files.val.paths.index(path)]
        assert label == target == int(memory.val.targets[index])
        assert torch.equal(image, memory.val.images[index])  # PNG is lossless


def test_shapes_flat_mixed_formats(tmp_path):
    shapes = ShapesConfig(num_classes=2, image_size=16, train_size=10, val_size=4, test_size=0)
    write_shapes_imagefolder(shapes, tmp_path / "flat", fmt="mixed", layout="flat")
    suffixes = Counter(p.suffix for p in (tmp_path / "flat").rglob("*.*"))
    assert suffixes == {".png": 7, ".jpg": 7}
    splits = build_splits(DataConfig(source="imagefolder", root=str(tmp_path / "flat"), val_fraction=0.25))
    assert len(splits.train) + len(splits.val) == 14 and len(splits.val) in (3, 4)
    with pytest.raises(DataError, match="not empty"):
        write_shapes_imagefolder(shapes, tmp_path / "flat")


# ----------------------------------------------------------------------------- one class, subsets

def test_one_class_folder_is_refused_before_the_scan(make_folder):
    root = make_folder({"cat": 3})
    (root / "cat" / "broken.png").write_text("not an image")  # the scan would list it: it must not run
    with pytest.raises(DataError) as info:
        build_splits(DataConfig(source="imagefolder", root=str(root)))
    message = str(info.value)
    assert f"imagefolder {root}: one class folder found: cat ({root / 'cat'}, 4 images)" in message
    assert "at least 2 classes" in message and "broken.png" not in message


def test_one_class_in_train_folder_is_refused(make_folder):
    make_folder({"cat": 3}, sub="train")
    root = make_folder({"cat": 1}, sub="val")
    with pytest.raises(DataError, match=rf"train folder has one class folder: cat \({root / 'train' / 'cat'}\)"):
        build_splits(DataConfig(source="imagefolder", root=str(root)))


def test_one_label_in_a_manifest_is_refused(tmp_path, write_image):
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    manifest = _manifest(tmp_path, [f"imgs/{i}.png,cat" for i in range(3)], header="path,label")
    with pytest.raises(DataError) as info:
        build_splits(DataConfig(source="csv", root=str(manifest), image_root=str(tmp_path)))
    assert f"csv {manifest}: every row has the label 'cat'" in str(info.value)
    assert "at least 2 classes" in str(info.value)


def test_train_subset_leaving_one_class_is_refused():
    with pytest.raises(DataError) as info:
        build_splits(DataConfig(source="digits", train_subset=1))
    message = str(info.value)
    assert "data.source digits: data.train_subset: 1 keeps 1 training image(s), all of class" in message
    assert "at least 10 (the number of classes)" in message
    two = build_splits(DataConfig(source="digits", train_subset=2))
    assert len(two.train) == 2 and len(set(two.train.targets.tolist())) == 2  # two classes are enough


def test_val_and_test_subsets_fashion_mnist():
    cfg = DataConfig(source="fashion-mnist", train_subset=600, val_subset=200, test_subset=300)
    splits = build_splits(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (600, 200, 300)
    assert set(counts(splits.val, splits.classes).values()) == {20}   # stratified: 10 balanced classes
    assert set(counts(splits.test, splits.classes).values()) == {30}
    again = build_splits(cfg)
    assert torch.equal(again.val.images, splits.val.images) and torch.equal(again.test.images, splits.test.images)
    other = build_splits(DataConfig(source="fashion-mnist", val_subset=200, test_subset=300, split_seed=1))
    assert not torch.equal(other.test.images, splits.test.images)  # seeded by data.split_seed
    assert 50_000 < len(other.train)  # a val/test subset leaves train alone


def test_val_and_test_subsets_on_carved_splits_and_larger_than_the_split():
    full = build_splits(DataConfig(source="digits", val_fraction=0.1, test_fraction=0.2))
    cut = build_splits(DataConfig(source="digits", val_fraction=0.1, test_fraction=0.2, val_subset=57,
                                  test_subset=5000))
    assert len(cut.val) == 57 and set(counts(cut.val, cut.classes).values()) <= {5, 6}
    assert len(cut.test) == len(full.test) == 359  # N above the split's size: the whole split
    assert torch.equal(cut.train.images, full.train.images)  # carved before the subsets: train unchanged
    val_images = {tuple(x.flatten().tolist()) for x in full.val.images}
    assert all(tuple(x.flatten().tolist()) in val_images for x in cut.val.images)


# ----------------------------------------------------------------------------- data.max_image_pixels

def test_max_image_pixels_refuses_large_files_and_names_the_key(make_folder, write_image):
    root = make_folder({"cat": 3, "dog": 3})
    big = root / "dog" / "big.png"
    Image.new("L", (2000, 1500), 128).save(big)  # 3 Mpx in a few KB
    assert big.stat().st_size < 20_000
    cfg = DataConfig(source="imagefolder", root=str(root), val_fraction=0.0, max_image_pixels=1_000_000)
    with pytest.raises(DataError) as info:
        build_splits(cfg)
    assert f"{big}: image too large: 2000 x 1500 = 3,000,000 pixels, more than data.max_image_pixels " \
           "(1,000,000)" in str(info.value)
    skipped = build_splits(replace(cfg, on_bad_image="skip"))
    assert [p for p, _ in skipped.skipped] == [str(big)] and len(skipped.train) == 6
    assert skipped.train.max_pixels == 1_000_000  # the limit goes with the dataset (and its subsets)
    assert skipped.train.subset([0, 1]).max_pixels == 1_000_000
    for limit in (3_000_000, None):
        splits = build_splits(replace(cfg, max_image_pixels=limit))
        image, _ = splits.train[splits.train.paths.index(str(big))]
        assert image.shape == (3, 1500, 2000) and splits.train.max_pixels == limit
