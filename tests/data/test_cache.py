"""The decoded cache: the same pixels as direct decoding, rebuilt when a file changes, never a
partial cache reused, bad input refused with a clear message, and training on it."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

import imgtrain
from imgtrain.api import prepare_data
from imgtrain.config import AugmentConfig, DataConfig, ShapesConfig
from imgtrain.data import DataError, FileImageDataset, build_splits, load_image, write_shapes_imagefolder
from imgtrain.data.cache import CachedImageDataset, apply_cache, build_cache, cache_resolution
from imgtrain.tracking import read_summary


@pytest.fixture
def mixed_files(tmp_path, write_image):
    """Files of several sizes and modes: square at the cache size, wide, tall, grey, RGBA."""
    folder = tmp_path / "imgs"
    files = [write_image(folder / "square.png", size=(12, 12), seed=1),
             write_image(folder / "wide.jpg", size=(30, 14), seed=2),
             write_image(folder / "tall.png", size=(9, 21), seed=3),
             write_image(folder / "grey.png", size=(16, 16), mode="L", seed=4),
             write_image(folder / "small.bmp", size=(5, 7), seed=5)]
    rgba = folder / "alpha.png"
    from PIL import Image
    Image.new("RGBA", (20, 12), (200, 10, 30, 128)).save(rgba)
    return [str(p) for p in files + [rgba]]


def _direct(path: str, channels: int, size: int) -> torch.Tensor:
    """What the cache promises: load_image, shorter side resized to size, centre-cropped square."""
    image = load_image(path, channels)
    image = v2.Resize(size, antialias=True)(image)
    return v2.CenterCrop(size)(image)


@pytest.mark.parametrize("mode", ["memory", "disk"])
@pytest.mark.parametrize("channels", [1, 3])
def test_cache_returns_the_same_pixels_as_direct_decoding(tmp_path, mixed_files, mode, channels):
    cache = build_cache(mixed_files, channels, 12, mode, str(tmp_path / "cache"))
    assert cache.images.shape == (len(mixed_files), channels, 12, 12) and cache.images.dtype == torch.uint8
    for path in mixed_files:
        row = int(cache.rows([path])[0])
        assert torch.equal(cache.images[row], _direct(path, channels, 12)), path
    square = mixed_files[0]  # already 12 x 12: stored exactly as decoded
    assert torch.equal(cache.images[int(cache.rows([square])[0])], load_image(square, channels))


def test_cached_splits_yield_what_the_file_splits_yield(tmp_path):
    shapes = ShapesConfig(num_classes=3, image_size=20, train_size=60, val_size=15, test_size=15)
    write_shapes_imagefolder(shapes, tmp_path / "data", fmt="mixed")
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "data"), cache="memory")
    files = build_splits(cfg)
    cached = build_splits(cfg)
    cache = apply_cache(cached, cfg, 20)
    assert cache is not None and len(cache.paths) == 90 and cache.size == 20
    for name in ("train", "val", "test"):
        plain, fast = getattr(files, name), getattr(cached, name)
        assert isinstance(plain, FileImageDataset) and isinstance(fast, CachedImageDataset)
        assert torch.equal(fast.targets, plain.targets) and fast.classes == plain.classes
        assert fast.paths == [os.path.abspath(p) for p in plain.paths]
        for i in range(len(plain)):
            assert torch.equal(fast[i][0], plain[i][0]) and fast[i][1] == plain[i][1]
    # views share the cache: a transform and a subset cost no pixels
    flipped = cached.train.with_transform(v2.RandomHorizontalFlip(1.0))
    assert flipped.cache is cached.train.cache and torch.equal(flipped[0][0], files.train[0][0].flip(-1))
    part = cached.train.subset([5, 2])
    assert part.cache is cache and torch.equal(part[1][0], files.train[2][0]) and part.targets.tolist() == [
        int(files.train.targets[5]), int(files.train.targets[2])]


def test_cache_resolution_is_the_largest_size_the_run_reads():
    assert cache_resolution(AugmentConfig(), 32) == 32
    assert cache_resolution(AugmentConfig(crop_pct=0.875), 224) == 256  # eval resizes to 256, crops 224
    assert cache_resolution(AugmentConfig(crop_pct=0.9), 64) == 71


def test_disk_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, mixed_files, write_image):
    cache_dir = tmp_path / "cache"
    first = build_cache(mixed_files, 3, 12, "disk", str(cache_dir))
    assert not first.reused and first.file.is_file() and first.build_seconds > 0
    again = build_cache(list(reversed(mixed_files)), 3, 12, "disk", str(cache_dir))  # order does not matter
    assert again.reused and again.file == first.file and torch.equal(again.images, first.images)
    # rewrite one file with other pixels (and a later mtime): a new key, rebuilt, old version deleted
    changed = mixed_files[1]
    write_image(Path(changed), size=(30, 14), seed=99)
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = build_cache(mixed_files, 3, 12, "disk", str(cache_dir))
    assert not rebuilt.reused and rebuilt.file != first.file
    row = int(rebuilt.rows([changed])[0])
    assert torch.equal(rebuilt.images[row], _direct(changed, 3, 12))
    assert not torch.equal(rebuilt.images[row], first.images[row])
    assert sorted(p.name for p in cache_dir.iterdir()) == [rebuilt.file.name]
    # another resolution or channel count is another cache
    assert build_cache(mixed_files, 3, 10, "disk", str(cache_dir)).file != rebuilt.file
    assert build_cache(mixed_files, 1, 12, "disk", str(cache_dir)).file != rebuilt.file


def test_interrupted_build_leaves_nothing_that_could_be_reused(tmp_path, mixed_files):
    cache_dir = tmp_path / "cache"
    broken = Path(mixed_files[2])
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 3])  # truncated after the sources scanned it
    # the build goes on: the file's row stays blank and is listed beside the cache (apply_cache decides)
    blank = build_cache(mixed_files, 3, 12, "disk", str(cache_dir))
    assert [path for path, _ in blank.bad] == [str(broken)] and "truncated" in blank.bad[0][1]
    row = int(blank.rows([str(broken)])[0])
    assert int(blank.images[row].abs().sum()) == 0
    assert sorted(p.name for p in cache_dir.iterdir()) == [blank.file.name, blank.file.name + ".bad.json"]
    assert build_cache(mixed_files, 3, 12, "disk", str(cache_dir)).bad == blank.bad  # reused, with its list
    broken.write_bytes(good)
    cache = build_cache(mixed_files, 3, 12, "disk", str(cache_dir))
    assert sorted(p.name for p in cache_dir.iterdir()) == [cache.file.name]  # the old version and its list gone
    assert not cache.reused and not cache.bad and torch.equal(cache.images[int(cache.rows([str(broken)])[0])],
                                            _direct(str(broken), 3, 12))
    # a partial file from a build that died (its process is gone) is removed, never read
    stale = cache_dir / f"{cache.file.name.split('-')[0]}-0123456789abcdef.u8.tmp-999999999"
    stale.write_bytes(b"partial")
    write = Path(mixed_files[0])
    os.utime(write, ns=(os.stat(write).st_atime_ns, os.stat(write).st_mtime_ns + 10**9))
    newer = build_cache(mixed_files, 3, 12, "disk", str(cache_dir))
    assert sorted(p.name for p in cache_dir.iterdir()) == [newer.file.name]


def test_disk_cache_pickles_without_its_pixels(tmp_path, mixed_files):
    """Workers started with spawn get the dataset pickled: the file is re-opened, not copied."""
    cache = build_cache(mixed_files, 3, 12, "disk", str(tmp_path / "cache"))
    dataset = CachedImageDataset(cache, torch.arange(len(mixed_files)), torch.zeros(len(mixed_files)), ["a"])
    blob = pickle.dumps(dataset)
    assert len(blob) < cache.nbytes
    copy = pickle.loads(blob)
    assert all(torch.equal(copy[i][0], dataset[i][0]) for i in range(len(dataset)))


def test_bad_cache_settings_get_clear_errors(tmp_path, mixed_files, monkeypatch):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    with pytest.raises(DataError, match=r"data.cache_dir .*not_a_folder.*writable folder"):
        build_cache(mixed_files, 3, 12, "disk", str(a_file))

    class Tiny:
        available = 1000

    import psutil
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(DataError, match=r"data.cache: memory needs 2.5 KiB for 6 images at 12 px, but only "
                                        r"1000 B of RAM is available. Use data.cache: disk"):
        build_cache(mixed_files, 3, 12, "memory")
    with pytest.raises(DataError, match="off, memory or disk"):
        build_cache(mixed_files, 3, 12, "ram")


def test_in_memory_sources_and_cache_off_are_left_alone(make_folder):
    digits = build_splits(DataConfig(source="digits", cache="memory"))
    train = digits.train
    assert apply_cache(digits, DataConfig(source="digits", cache="memory"), 8) is None and digits.train is train
    recipe = imgtrain.load_recipe("quickstart", ["data.cache=memory"])
    prepared = prepare_data(recipe, build_splits(recipe.data), torch.device("cpu"))
    assert prepared.cache is None
    assert prepared.notes == ["data.cache: memory ignored: digits images are already decoded in memory"]
    files = build_splits(DataConfig(source="imagefolder", root=str(make_folder({"a": 4, "b": 4}))))
    assert apply_cache(files, DataConfig(cache="off"), 12) is None and isinstance(files.train, FileImageDataset)


def _digits_folder(root: Path) -> Path:
    """scikit-learn's digits as 8x8 PNG files in class folders: a file source that learns in seconds."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for k, (pixels, label) in enumerate(zip(bunch.images, bunch.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * (255 / 16)).round().astype("uint8"), mode="L").save(folder / f"{k:04d}.png")
    return root


def test_training_on_the_disk_cache_with_device_transforms(tmp_path):
    """A real run on image files through the disk cache and the batch path: learns, logs, reuses."""
    overrides = ["data.source=imagefolder", f"data.root={_digits_folder(tmp_path / 'digits')}", "data.cache=disk",
                 f"data.cache_dir={tmp_path / 'cache'}", "augment.device_transforms=on", "train.epochs=6",
                 "model.name=imgtrain_cnn_tiny", "output.plots=false", "output.progress=off", "train.threads=1"]
    first = imgtrain.train(imgtrain.load_recipe("quickstart", overrides), run_dir=tmp_path / "one")
    assert read_summary(first.run_dir)["test_acc"] > 0.9
    log = (first.run_dir / "train.log").read_text()
    assert "decoded cache (disk" in log and "1797 images at 8 px" in log and "built in" in log
    assert "augmentation per batch on cpu" in log
    second = imgtrain.train(imgtrain.load_recipe("quickstart", overrides), run_dir=tmp_path / "two")
    assert "1797 images at 8 px, 112 KiB, reused" in (second.run_dir / "train.log").read_text()
    assert read_summary(second.run_dir)["test_acc"] == read_summary(first.run_dir)["test_acc"]  # same pixels, seed


def test_cache_build_applies_data_max_image_pixels(make_folder, tmp_path):
    from PIL import Image

    root = make_folder({"a": 2, "b": 2})
    Image.new("RGB", (1200, 900), (10, 200, 30)).save(root / "a" / "large.png")  # 1.08 Mpx, a few KB
    splits = build_splits(DataConfig(source="imagefolder", root=str(root), val_fraction=0.0))
    cfg = DataConfig(source="imagefolder", root=str(root), cache="memory", max_image_pixels=1_000_000)
    with pytest.raises(DataError, match=r"1200 x 900 = 1,080,000 pixels, more than data.max_image_pixels"):
        apply_cache(splits, cfg, 12)
    cache = build_cache([str(root / "a" / "large.png")], 3, 12, "memory", max_pixels=None)
    assert cache.images[0, :, 6, 6].tolist() == [10, 200, 30]
