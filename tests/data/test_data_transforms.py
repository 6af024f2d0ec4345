"""Train/eval pipelines (shapes, dtypes, value ranges) and normalization statistics."""

import pytest
import torch

from imgtrain.config import AugmentConfig, DataConfig, ShapesConfig
from imgtrain.data import (
    DataError,
    TensorImageDataset,
    build_eval_transform,
    build_splits,
    build_train_transform,
    resolve_normalization,
)
from imgtrain.data.sources import DataSplits
from imgtrain.data.transforms import compute_mean_std

FULL_AUG = AugmentConfig(random_resized_crop=True, scale=[0.3, 1.0], pad_crop=2, hflip=0.5, vflip=0.5,
                         color_jitter=0.4, hue=0.1, grayscale=0.2)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("aug", [AugmentConfig(), FULL_AUG, AugmentConfig(pad_crop=4, color_jitter=0.3, hflip=1.0)])
def test_train_transform_shapes_and_dtypes(channels, aug):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, channels, 20, 28), dtype=torch.uint8)
    mean, std = [0.5] * channels, [0.25] * channels
    tf = build_train_transform(aug, channels, 16, mean, std)
    for image in images:
        out = tf(image)
        assert out.shape == (channels, 16, 16) and out.dtype == torch.float32
        assert out.min() >= -2.0 - 1e-5 and out.max() <= 2.0 + 1e-5  # (x - 0.5) / 0.25 for x in [0, 1]


def test_train_transform_at_native_size_keeps_pixels():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    tf = build_train_transform(AugmentConfig(), 3, 16, [0.0] * 3, [1.0] * 3, native_size=16)
    assert len(tf.transforms) == 1  # only ToDtype: no resize, identity normalization skipped
    assert torch.allclose(tf(image), image.float() / 255)
    hflip = build_train_transform(AugmentConfig(hflip=1.0), 3, 16, None, None, native_size=16)
    assert torch.allclose(hflip(image), image.flip(-1).float() / 255)


@pytest.mark.parametrize("channels", [1, 3])
def test_eval_transform_resize_and_centre_crop(channels):
    image = torch.randint(0, 256, (channels, 30, 40), dtype=torch.uint8)
    tf = build_eval_transform(AugmentConfig(crop_pct=0.875), channels, 28, [0.5] * channels, [0.5] * channels)
    out = tf(image)
    assert out.shape == (channels, 28, 28) and out.dtype == torch.float32
    assert tf.transforms[0].size == [32]  # 28 / 0.875
    same = build_eval_transform(AugmentConfig(), channels, 30, None, None, native_size=30)
    assert torch.allclose(same(image[:, :, :30]), image[:, :, :30].float() / 255)
    assert torch.equal(tf(image), tf(image))  # deterministic


def _splits(images):
    ds = TensorImageDataset(images, torch.zeros(len(images), dtype=torch.long), ["only"])
    return DataSplits(train=ds, val=None, test=None, classes=["only"], channels=images.shape[1],
                      native_size=images.shape[-1])


def test_computed_normalization_matches_the_data():
    gen = torch.Generator().manual_seed(0)
    images = torch.empty(300, 3, 8, 8, dtype=torch.uint8)
    images[:, 0] = torch.randint(0, 256, (300, 8, 8), generator=gen, dtype=torch.uint8)
    images[:, 1] = torch.randint(100, 151, (300, 8, 8), generator=gen, dtype=torch.uint8)
    images[:, 2] = 200  # constant channel: std falls back to 1
    mean, std = resolve_normalization(AugmentConfig(normalize="compute"), _splits(images))
    x = images.float() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-5)
    assert std[:2] == pytest.approx(x[:, :2].permute(1, 0, 2, 3).flatten(1).std(dim=1, unbiased=False).tolist(),
                                    abs=1e-5)
    assert std[2] == 1.0
    tf = build_eval_transform(AugmentConfig(), 3, 8, mean, std, native_size=8)
    normalized = torch.stack([tf(img) for img in images])
    assert normalized[:, 0].mean().item() == pytest.approx(0.0, abs=1e-4)
    assert normalized[:, 0].std().item() == pytest.approx(1.0, abs=1e-2)


def test_computed_normalization_on_files_and_sampled(tmp_path):
    from imgtrain.data import write_shapes_imagefolder

    shapes = ShapesConfig(num_classes=2, image_size=12, train_size=20, val_size=0, test_size=0)
    write_shapes_imagefolder(shapes, tmp_path / "s")
    files = build_splits(DataConfig(source="imagefolder", root=str(tmp_path / "s"), val_fraction=0.0))
    memory = build_splits(DataConfig(source="shapes", shapes=shapes))
    file_stats = resolve_normalization(AugmentConfig(), files)
    assert file_stats[0] == pytest.approx(resolve_normalization(AugmentConfig(), memory)[0], abs=1e-6)
    sample_mean, _ = compute_mean_std(memory.train, 3, limit=10)
    assert sample_mean == pytest.approx(file_stats[0], abs=0.1)  # a 10-image sample is close


def test_other_normalization_modes():
    gray = _splits(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    colour = _splits(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    mean, std = resolve_normalization(AugmentConfig(normalize="imagenet"), gray)
    assert mean == pytest.approx([0.449], abs=1e-3) and std == pytest.approx([0.226], abs=1e-3)
    assert resolve_normalization(AugmentConfig(normalize="imagenet"), colour)[0] == [0.485, 0.456, 0.406]
    assert resolve_normalization(AugmentConfig(normalize="none"), colour) == ([0.0] * 3, [1.0] * 3)
    given = AugmentConfig(normalize="given", mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5])
    assert resolve_normalization(given, colour) == ([0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    with pytest.raises(DataError, match="1 channel"):
        resolve_normalization(given, gray)
