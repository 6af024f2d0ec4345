"""build_loaders: batch shapes, eval batch size, reproducible shuffling, worker settings, drop_last
with mixing; describe_data."""

import pytest
import torch

from imgtrain.config import DataConfig, Recipe, ShapesConfig
from imgtrain.data import DataError, build_eval_transform, build_loaders, build_splits, build_train_transform
from imgtrain.data.loaders import describe_data, resolve_pin_memory, resolve_workers, usable_cpus
from imgtrain.strategies import mixing_enabled


def _recipe():
    recipe = Recipe()
    recipe.data = DataConfig(source="shapes", batch_size=8, shapes=ShapesConfig(
        num_classes=3, image_size=12, train_size=30, val_size=12, test_size=6))
    return recipe


def test_loaders_batches_and_sizes():
    recipe = _recipe()
    splits = build_splits(recipe.data)
    splits.train = splits.train.with_transform(build_train_transform(recipe.augment, 3, 16, [0.5] * 3, [0.5] * 3))
    splits.val = splits.val.with_transform(build_eval_transform(recipe.augment, 3, 16, [0.5] * 3, [0.5] * 3))
    loaders = build_loaders(recipe, splits, torch.device("cpu"))
    images, targets = next(iter(loaders.train))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32 and targets.dtype == torch.long
    assert len(loaders.train) == 4  # 30 / 8, last batch kept
    assert loaders.val.batch_size == 16 and len(loaders.val) == 1
    assert loaders.test.dataset.transform is None  # datasets are used as given
    assert next(iter(loaders.test))[0].dtype == torch.uint8
    assert loaders.train.generator is loaders.train_generator


def test_train_order_is_reproducible_from_the_generator():
    recipe = _recipe()
    loaders = build_loaders(recipe, build_splits(recipe.data), torch.device("cpu"))

    def epoch_targets(seed):
        loaders.train_generator.manual_seed(seed)
        return torch.cat([t for _, t in loaders.train]).tolist()

    first = epoch_targets(5)
    assert epoch_targets(5) == first
    assert epoch_targets(6) != first
    assert sorted(first) == sorted(loaders.train.dataset.targets.tolist())


def test_worker_and_pin_memory_rules():
    assert resolve_workers(3) == 3
    auto = resolve_workers("auto")
    assert auto == (0 if usable_cpus() <= 2 else min(4, usable_cpus() - 1))
    assert resolve_pin_memory("auto", torch.device("cpu")) is False
    assert resolve_pin_memory("auto", torch.device("cuda")) is True
    assert resolve_pin_memory(False, torch.device("cuda")) is False


def test_describe_data_counts():
    summary = describe_data(build_splits(_recipe().data))
    assert summary["train"] == {"total": 30, "per_class": {"circle": 10, "square": 10, "triangle": 10}}
    assert summary["test"]["total"] == 6 and summary["channels"] == 3 and summary["skipped"] == 0


def test_mixed_size_files_batch_after_transforms(tmp_path, write_image):
    sizes = [(10, 10), (30, 12), (12, 40), (16, 16)]
    for i, size in enumerate(sizes):
        write_image(tmp_path / "ds" / "a" / f"{i}.png", size=size)
        write_image(tmp_path / "ds" / "b" / f"{i}.jpg", size=size, mode="L")
    recipe = Recipe()
    recipe.data = DataConfig(source="imagefolder", root=str(tmp_path / "ds"), batch_size=8, val_fraction=0.25)
    splits = build_splits(recipe.data)
    assert splits.channels == 3 and splits.native_size == 16  # median longer side of 10, 16, 30, 40 (low)
    size = splits.native_size
    splits.train = splits.train.with_transform(build_train_transform(recipe.augment, 3, size, None, None))
    splits.val = splits.val.with_transform(build_eval_transform(recipe.augment, 3, size, None, None))
    loaders = build_loaders(recipe, splits, torch.device("cpu"))
    train_images, _ = next(iter(loaders.train))
    val_images, _ = next(iter(loaders.val))
    assert train_images.shape == (6, 3, 16, 16) and val_images.shape == (2, 3, 16, 16)
    assert 0.0 <= float(train_images.min()) and float(train_images.max()) <= 1.0


def test_loader_settings_prefetch_persistent_workers():
    recipe = _recipe()
    recipe.data.workers = 2
    recipe.data.prefetch_factor = 5
    loaders = build_loaders(recipe, build_splits(recipe.data), torch.device("cpu"))
    assert loaders.train.prefetch_factor == 5 and loaders.train.persistent_workers is True
    assert loaders.val.prefetch_factor == 5 and loaders.val.persistent_workers is True
    assert len(torch.cat([t for _, t in loaders.train])) == 30  # the workers really serve it
    recipe.data.persistent_workers = False
    loaders = build_loaders(recipe, build_splits(recipe.data), torch.device("cpu"))
    assert loaders.train.persistent_workers is False and loaders.test.persistent_workers is False
    recipe.data.workers = 0  # no workers: no prefetching, nothing to keep
    loaders = build_loaders(recipe, build_splits(recipe.data), torch.device("cpu"))
    assert loaders.train.prefetch_factor is None and loaders.train.persistent_workers is False


def test_mixing_drops_the_last_incomplete_train_batch():
    recipe = _recipe()
    assert len(build_loaders(recipe, build_splits(recipe.data), torch.device("cpu")).train) == 4  # 30 / 8, kept
    recipe.mix.cutmix_alpha = 1.0  # api.train asks for drop_last when mixing is on (strategies.mixing_enabled)
    assert mixing_enabled(recipe)
    loaders = build_loaders(recipe, build_splits(recipe.data), torch.device("cpu"), drop_last=True)
    assert loaders.train.drop_last is True and len(loaders.train) == 3
    assert [len(t) for _, t in loaders.train] == [8, 8, 8]
    assert loaders.val.drop_last is False and len(torch.cat([t for _, t in loaders.val])) == 12  # eval sees all
    recipe.data.batch_size = 64
    with pytest.raises(DataError, match=r"30 images, fewer than data.batch_size \(64\).*Lower data.batch_size"):
        build_loaders(recipe, build_splits(recipe.data), torch.device("cpu"), drop_last=True)
