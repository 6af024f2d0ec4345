"""stratified_split_indices and split_folder: counts per class, seeds, safety."""

import os

import numpy as np
import pytest

from imgtrain.data import DataError, split_folder, stratified_split_indices
from imgtrain.data.split import stratified_subset_indices


def test_stratified_indices_partition_by_class():
    targets = np.repeat([0, 1, 2], [50, 30, 20])
    rest, val, test = stratified_split_indices(targets, [0.2, 0.1], seed=0)
    assert len(val) == 20 and len(test) == 10 and len(rest) == 70
    assert sorted(np.concatenate([rest, val, test]).tolist()) == list(range(100))
    assert np.bincount(targets[val]).tolist() == [10, 6, 4]
    assert np.bincount(targets[test]).tolist() == [5, 3, 2]
    again = stratified_split_indices(targets, [0.2, 0.1], seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, [rest, val, test]))
    other = stratified_split_indices(targets, [0.2, 0.1], seed=1)
    assert not np.array_equal(other[1], val)
    # val does not depend on the test fraction
    assert np.array_equal(stratified_split_indices(targets, [0.2, 0.3], seed=0)[1], val)


def test_small_classes_keep_a_train_image_and_totals_hold():
    targets = np.array([0] * 1 + [1] * 2 + [2] * 7)
    rest, val = stratified_split_indices(targets, [0.4], seed=0)
    assert len(val) == 4
    assert set(targets[rest].tolist()) == {0, 1, 2}  # every class keeps >= 1 train item
    with pytest.raises(ValueError):
        stratified_split_indices(targets, [0.6, 0.5], seed=0)


def test_split_folder_counts_seeds_and_links(make_folder, tmp_path):
    src = make_folder({"a": 20, "b": 10, "c": 1})
    counts = split_folder(src, tmp_path / "out", val=0.2, test=0.1, seed=0)
    assert counts["train"] == {"a": 14, "b": 7, "c": 1}
    assert counts["val"] == {"a": 4, "b": 2, "c": 0}
    assert counts["test"] == {"a": 2, "b": 1, "c": 0}
    assert len(list((tmp_path / "out" / "val" / "a").iterdir())) == 4
    assert (tmp_path / "out" / "test" / "c").is_dir()  # every class folder exists in every split
    val_a = sorted(p.name for p in (tmp_path / "out" / "val" / "a").iterdir())
    split_folder(src, tmp_path / "same", val=0.2, test=0.1, seed=0)
    assert sorted(p.name for p in (tmp_path / "same" / "val" / "a").iterdir()) == val_a
    split_folder(src, tmp_path / "seed1", val=0.2, test=0.1, seed=1)
    assert sorted(p.name for p in (tmp_path / "seed1" / "val" / "a").iterdir()) != val_a
    linked = split_folder(src, tmp_path / "links", val=0.2, test=0.0, link=True)
    assert "test" not in linked and not (tmp_path / "links" / "test").exists()
    first = next((tmp_path / "links" / "train" / "a").iterdir())
    assert first.is_symlink() and first.resolve().parent == (src / "a").resolve()


def test_split_folder_refuses_non_empty_destination(make_folder, tmp_path):
    src = make_folder({"a": 3, "b": 3})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        split_folder(src, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_stratified_subset_is_exact_stratified_and_matches_the_split():
    targets = np.repeat([0, 1, 2], [50, 30, 20])
    keep = stratified_subset_indices(targets, 10, seed=0)
    assert np.bincount(targets[keep]).tolist() == [5, 3, 2]
    # the same items as the part stratified_split_indices carves for that fraction
    assert np.array_equal(keep, stratified_split_indices(targets, [0.1], seed=0)[1])
    assert not np.array_equal(keep, stratified_subset_indices(targets, 10, seed=1))
    # a small class may be taken whole, so the total is always N (a split keeps one per class for train)
    small = np.array([0] * 2 + [1] * 10)
    assert len(stratified_subset_indices(small, 11, seed=0)) == 11
    assert len(stratified_split_indices(small, [11 / 12], seed=0)[1]) == 10
    assert stratified_subset_indices(small, 50, seed=0).tolist() == list(range(12))


def test_class_folders_follow_links_but_refuse_loops_and_links_into_another_class(tmp_path):
    from PIL import Image

    from imgtrain.data.split import list_class_images

    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder in (root / "a", root / "b", elsewhere):
        folder.mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(folder / "0.png")
    os.symlink(elsewhere, root / "a" / "more")  # a linked folder outside the data: followed
    assert list_class_images(root) == {"a": [str(root / "a" / "0.png"), str(root / "a" / "more" / "0.png")],
                                       "b": [str(root / "b" / "0.png")]}
    os.symlink(root / "b", root / "a" / "bs")  # b's images would also be labelled a
    with pytest.raises(DataError, match=r"a/bs: a symbolic link leads into another class folder"):
        list_class_images(root)
    (root / "a" / "bs").unlink()
    os.symlink("..", root / "a" / "up")  # a/up/a/up/...: a loop
    with pytest.raises(DataError, match=r"a/up: a symbolic link leads back to .*: a link loop"):
        list_class_images(root)
