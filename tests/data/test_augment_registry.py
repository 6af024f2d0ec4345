"""The augmentation registry: every entry on RGB and grayscale uint8 images, the pipeline
order (erasing after Normalize), and the recipe errors for bad augmentation settings."""

from __future__ import annotations

import pytest
import torch

from imgtrain.config import AugmentConfig, RecipeError, load_recipe
from imgtrain.data.transforms import (
    AUGMENTATIONS,
    FLOAT_AUGMENTATIONS,
    build_augmentation,
    build_train_transform,
)

SIZE = 20

# the settings that turn each registry entry on (strongly, so its effect is visible)
ON = {
    "random_resized_crop": {"random_resized_crop": True, "scale": [0.2, 0.6]},
    "pad_crop": {"pad_crop": 4},
    "hflip": {"hflip": 1.0},
    "vflip": {"vflip": 1.0},
    "rotation": {"rotation": 30.0},
    "affine": {"translate": [0.2, 0.2], "affine_scale": [0.7, 1.3], "shear": 15.0},
    "perspective": {"perspective": 1.0},
    "randaugment": {"policy": "randaugment", "num_ops": 3, "magnitude": 15},
    "autoaugment": {"policy": "autoaugment", "autoaugment_policy": "cifar10"},
    "trivialaugment": {"policy": "trivialaugment"},
    "augmix": {"policy": "augmix", "augmix_severity": 5},
    "color_jitter": {"color_jitter": 0.6, "hue": 0.2},
    "grayscale": {"grayscale": 1.0},
    "erasing": {"erasing": 1.0, "erasing_scale": [0.1, 0.3], "erasing_value": "random"},
}


def test_every_registry_entry_has_settings_here():
    assert set(ON) == set(AUGMENTATIONS)


def _image(channels: int) -> torch.Tensor:
    # a smooth gradient plus a bright square: flips, crops and colour ops all change it
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    base = (x * 6 + y * 3).clamp(max=200).to(torch.uint8)
    image = base.expand(channels, SIZE, SIZE).clone()
    image[:, 3:8, 11:17] = 250
    if channels == 3:
        image[1] = image[1] // 2
        image[2] = 255 - image[2]
    return image


@pytest.mark.parametrize("channels", [1, 3], ids=["grayscale", "rgb"])
@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_each_augmentation_runs_on_rgb_and_grayscale(name, channels):
    aug = AugmentConfig(**ON[name])
    transform = build_augmentation(name, aug, channels, SIZE)
    if name == "grayscale" and channels == 1:
        assert transform is None  # already grey: left out rather than a no-op step
        return
    assert transform is not None
    torch.manual_seed(0)
    image = _image(channels)
    if name in FLOAT_AUGMENTATIONS:
        image = (image.float() / 255 - 0.5) / 0.25  # erasing sees the normalized float image
    outputs = [transform(image) for _ in range(10)]
    for out in outputs:
        assert out.shape == (channels, SIZE, SIZE) and out.dtype == image.dtype
    changed = sum(not torch.equal(out, image) for out in outputs)
    assert changed >= 5, f"{name} left the image unchanged in {10 - changed} of 10 draws"
    # and the whole training pipeline with it runs to a normalized float image
    pipeline = build_train_transform(aug, channels, SIZE, [0.5] * channels, [0.25] * channels)
    out = pipeline(_image(channels))
    assert out.shape == (channels, SIZE, SIZE) and out.dtype == torch.float32


def test_off_by_default():
    aug = AugmentConfig()
    assert all(build(aug, 3, SIZE) is None for build in AUGMENTATIONS.values())


def test_erasing_runs_after_normalize_and_fills_the_mean():
    aug = AugmentConfig(erasing=1.0, erasing_scale=[0.25, 0.25], erasing_value="zero")
    tf = build_train_transform(aug, 1, SIZE, [0.5], [0.25], native_size=SIZE)
    assert type(tf.transforms[-1]).__name__ == "RandomErasing"
    assert type(tf.transforms[-2]).__name__ == "Normalize"
    image = torch.full((1, SIZE, SIZE), 255, dtype=torch.uint8)  # normalizes to 2.0 everywhere
    torch.manual_seed(0)
    out = tf(image)
    erased = (out == 0).float().mean().item()  # 0 after Normalize is the mean colour
    assert 0.2 <= erased <= 0.3  # a quarter of the image, up to rounding of the box sides
    assert set(out.unique().tolist()) == {0.0, 2.0}


def test_affine_translate_shifts_by_at_most_the_fraction():
    aug = AugmentConfig(translate=[0.25, 0.0])
    tf = build_augmentation("affine", aug, 1, SIZE)
    image = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    image[:, :, SIZE // 2] = 255  # one bright column in the middle
    torch.manual_seed(0)
    shifts = set()
    for _ in range(60):
        out = tf(image)
        column = int(out[0].float().sum(0).argmax())
        shifts.add(column - SIZE // 2)
        assert torch.all(out[0, :, column] == 255)  # dy is 0: the column stays whole, top to bottom
    assert max(abs(s) for s in shifts) <= 0.25 * SIZE
    assert len(shifts) > 4  # it really moves


def test_unknown_registry_name_is_a_recipe_error():
    with pytest.raises(RecipeError, match="unknown augmentation 'randaugmnt'; did you mean randaugment"):
        build_augmentation("randaugmnt", AugmentConfig(), 3, SIZE)


@pytest.mark.parametrize("override, message", [
    ("augment.policy=randaugmnt", ("augment.policy: 'randaugmnt' is not one of none, randaugment, autoaugment, "
                                  "trivialaugment, augmix, did you mean randaugment?")),
    ("augment.policy=cutout", "augment.policy: 'cutout' is not one of none, randaugment"),
    ("augment.magnitude=31", "augment.magnitude: 31 is out of range: expected a value <= 30"),
    ("augment.magnitude=-1", "augment.magnitude: -1 is out of range: expected a value >= 0"),
    ("augment.num_ops=0", "augment.num_ops: 0 is out of range: expected a value >= 1"),
    ("augment.augmix_severity=11", "augment.augmix_severity: 11 is out of range: expected a value <= 10"),
    ("augment.autoaugment_policy=cifar", "augment.autoaugment_policy: 'cifar' is not one of imagenet, cifar10, svhn"),
    ("augment.rotation=200", "augment.rotation: 200.0 is out of range: expected a value <= 180"),
    ("augment.erasing=1.5", "augment.erasing: 1.5 is out of range: expected a value <= 1"),
    ("augment.erasing_scale=[0.5,0.1]", "augment.erasing_scale: expected [low, high] with 0.0 <= low <= high"),
    ("augment.erasing_value=noise", "augment.erasing_value: 'noise' is not one of zero, random"),
    ("augment.translate=[0.5,1.5]", "augment.translate: expected [max_dx, max_dy], fractions"),
    ("augment.affine_scale=[0,1]", "augment.affine_scale: expected [low, high] with 0.01 <= low <= high"),
    ("augment.perspective=2", "augment.perspective: 2.0 is out of range: expected a value <= 1"),
])
def test_bad_augmentation_settings_are_recipe_errors(override, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [override])
    assert message in str(info.value)
    assert str(info.value).startswith("command line: ")
