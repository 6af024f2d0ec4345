"""Batch transforms on the device (run here on the CPU): the same distributions as the per-image
v2 path on a fixed seed, the same pixels for the same parameters, the CPU/device split, and a
training run that learns with them."""

import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import v2

import imgtrain
from imgtrain.config import AugmentConfig
from imgtrain.data import build_eval_transform, build_train_transform
from imgtrain.data.batch_transforms import (
    TrainBatchTransform,
    build_batch_pipelines,
    color_jitter,
    cpu_only_augmentations,
    resample,
    resolve_device_transforms,
    sample_crop_boxes,
    sample_erasing_boxes,
)
from imgtrain.tracking import read_summary

N = 3000
# two-sample KS critical value at alpha = 0.001 for n = m = N is 1.95 * sqrt(2 / N) = 0.050
KS_LIMIT = 0.05


def _ks(a, b) -> float:
    return float(ks_2samp(torch.as_tensor(a).double().numpy(), torch.as_tensor(b).double().numpy()).statistic)


@pytest.mark.parametrize("height,width,scale,ratio", [
    (40, 40, (0.08, 1.0), (3 / 4, 4 / 3)),   # ImageNet defaults
    (30, 60, (0.5, 1.0), (0.5, 2.0)),        # wide images, wide ratios: many tries fail
    (64, 64, (0.9, 1.0), (2.5, 3.0)),        # nothing fits: torchvision's central fallback
])
def test_crop_boxes_have_torchvision_distribution(height, width, scale, ratio):
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(16, scale=scale, ratio=ratio)
    image = torch.zeros(3, height, width)
    ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                        for p in (crop.make_params([image]) for _ in range(N))])
    ours = sample_crop_boxes(N, height, width, scale, ratio, torch.Generator().manual_seed(1))
    assert ours.dtype == torch.long and ours.shape == (N, 4)
    assert bool(((ours[:, 0] + ours[:, 2] <= height) & (ours[:, 1] + ours[:, 3] <= width)).all())
    for column in range(4):  # top, left, height, width
        assert _ks(ref[:, column], ours[:, column]) < KS_LIMIT
    if scale[1] - scale[0] > 0.2:  # the test can tell distributions apart: a smaller scale range fails it
        other = sample_crop_boxes(N, height, width, (scale[0], scale[1] * 0.8), ratio,
                                  torch.Generator().manual_seed(1))
        assert _ks(ref[:, 2] * ref[:, 3], other[:, 2] * other[:, 3]) > 2 * KS_LIMIT


def test_erasing_boxes_have_torchvision_distribution():
    torch.manual_seed(0)
    erasing = v2.RandomErasing(1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3))
    ref = torch.tensor([[p["i"], p["j"], p["h"], p["w"]]
                        for p in (erasing.make_params([torch.zeros(3, 32, 32)]) for _ in range(N))])
    ours = sample_erasing_boxes(N, 32, 32, 1.0, (0.02, 0.33), (0.3, 3.3), torch.Generator().manual_seed(1))
    for column in range(4):
        assert _ks(ref[:, column], ours[:, column]) < KS_LIMIT
    some = sample_erasing_boxes(N, 32, 32, 0.3, (0.02, 0.33), generator=torch.Generator().manual_seed(2))
    assert (some[:, 2] > 0).float().mean().item() == pytest.approx(0.3, abs=0.03)


def _coordinate_image(side: int) -> torch.Tensor:
    """Float (3, side, side): channel 0 is x / (side-1), channel 1 is y / (side-1), channel 2 is 1
    (padding turns it to 0). Linear ramps survive bilinear resampling exactly, so each output
    tells which source window it shows."""
    ramp = torch.arange(side, dtype=torch.float32) / (side - 1)
    return torch.stack([ramp.expand(side, side), ramp[:, None].expand(side, side), torch.ones(side, side)])


def _recovered_crops(out: torch.Tensor, side: int) -> dict:
    """Integer crop parameters read back from outputs (N, 3, S, S) of the coordinate image.

    Per axis: the signed source extent (negative: flipped) and the source edge under output
    pixel 0, in 1/S pixels, both from a line fitted through the central half of the output
    (always inside the crop and the padding), and the padded rows/columns before and after.
    """
    size = out.shape[-1]
    centre = torch.arange(size // 4, 3 * size // 4, dtype=torch.float64)
    middle = slice(size // 4, 3 * size // 4)
    features = {}
    for axis, name in ((0, "x"), (1, "y")):
        coord = out[:, axis].double() * (side - 1)
        valid = out[:, 2] > 0.5
        profile = coord[:, size // 2, middle] if axis == 0 else coord[:, middle, size // 2]
        slope = ((centre - centre.mean()) * (profile - profile.mean(1, keepdim=True))).sum(1) / \
            ((centre - centre.mean()) ** 2).sum()
        at_zero = profile.mean(1) - slope * centre.mean()  # source pixel centre under output pixel 0
        line = valid[:, size // 2, :] if axis == 0 else valid[:, :, size // 2]
        features[f"extent_{name}"] = torch.round(slope * size).long()
        features[f"edge_{name}"] = torch.round((at_zero + 0.5 - slope / 2) * size).long()
        features[f"pad_before_{name}"] = (~line).long().cumprod(1).sum(1)
        features[f"pad_after_{name}"] = (~line).long().flip(1).cumprod(1).sum(1)
    return features


@pytest.mark.parametrize("aug,side", [
    (AugmentConfig(random_resized_crop=True, hflip=0.5, normalize="none"), 32),
    (AugmentConfig(random_resized_crop=True, scale=[0.3, 1.0], ratio=[0.5, 2.0], pad_crop=3, hflip=0.5, vflip=0.3,
                   normalize="none"), 32),
    (AugmentConfig(pad_crop=4, hflip=0.5, normalize="none"), 24),  # CIFAR style: resize 24 -> 32, shift, flip
])
def test_device_and_cpu_paths_give_the_same_distribution_of_crops(aug, side):
    """The whole train pipelines, per image (v2) and per batch, on fixed seeds: the crop
    windows, flips and padding read back from the pixels are distributed alike. Crops are
    enlarged to 32 px, where both paths are plain bilinear, so the read-back is exact for both
    (shrinking, v2's antialiasing filter bends the ramps near the crop edges)."""
    image = _coordinate_image(side)
    torch.manual_seed(0)
    per_image = build_train_transform(aug, 3, 32, None, None)
    cpu = torch.stack([per_image(image) for _ in range(N)])
    batched = TrainBatchTransform(aug, 3, 32, None, None, generator=torch.Generator().manual_seed(0))
    device = torch.cat([batched(image.expand(500, -1, -1, -1)) for _ in range(N // 500)])
    assert device.shape == cpu.shape == (N, 3, 32, 32) and device.dtype == torch.float32
    ours, ref = _recovered_crops(device, side), _recovered_crops(cpu, side)
    for name in ref:
        assert _ks(ref[name], ours[name]) < KS_LIMIT, name
    assert (ours["extent_x"] < 0).float().mean().item() == pytest.approx(aug.hflip, abs=0.03)
    assert (ours["extent_y"] < 0).float().mean().item() == pytest.approx(aug.vflip, abs=0.03)
    if aug.random_resized_crop:  # the test tells crops of another scale range apart
        other = TrainBatchTransform(AugmentConfig(**{**aug.__dict__, "scale": [0.5, 1.0]}), 3, 32, None, None,
                                    generator=torch.Generator().manual_seed(0))
        narrow = _recovered_crops(other(image.expand(N, -1, -1, -1)), side)
        assert _ks(ref["extent_x"].abs(), narrow["extent_x"].abs()) > 2 * KS_LIMIT


def test_same_parameters_give_torchvision_pixels():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 40, 40), generator=gen, dtype=torch.uint8)
    floats = images.float() / 255
    # smooth images (as photos are) for the shrinking comparison: random pixels are the worst case
    smooth = torch.nn.functional.avg_pool2d(floats, 5, stride=1, padding=2, count_include_pad=False)
    boxes = torch.tensor([[0, 0, 40, 40], [3, 5, 20, 30], [10, 0, 30, 17], [0, 12, 8, 8], [7, 7, 25, 25],
                          [1, 2, 16, 16]])
    out = resample(floats, boxes, 16)
    out_smooth = resample(smooth, boxes, 16)
    for image, image_smooth, (top, left, h, w), got, got_smooth in zip(floats, smooth, boxes.tolist(), out,
                                                                        out_smooth):
        if max(h, w) <= 24:  # up to 1.5x shrinking the batch path is plain bilinear, as v2 without antialias
            want = v2.functional.resized_crop(image, top, left, h, w, [16, 16], antialias=False)
            # at the crop's edge bilinear reads the pixel just outside the crop, v2 clamps to the
            # edge pixel; the image's own edge is clamped by both
            inner = slice(1, -1) if h < 16 else slice(None)
            assert torch.allclose(got[:, inner, inner], want[:, inner, inner], atol=1e-5)
        else:  # a larger shrink: a box filter where v2 antialiases; close on average
            want = v2.functional.resized_crop(image_smooth, top, left, h, w, [16, 16], antialias=True)
            assert (got_smooth - want).abs().mean().item() < 0.01
    # no random crop: v2.Resize (shorter side) + v2.CenterCrop, here of wide 20 x 40 images enlarged
    wide = floats[:, :, :20, :]
    got = TrainBatchTransform(AugmentConfig(normalize="none"), 3, 24, None, None)(wide)
    want = torch.stack([v2.CenterCrop(24)(v2.Resize(24, antialias=True)(image)) for image in wide])
    assert got.shape == (6, 3, 24, 24) and torch.allclose(got, want, atol=1e-5)
    # identity box + shifts (pad-crop) + flips: exactly v2's pad, crop and flip
    full = torch.tensor([[0, 0, 40, 40]]).expand(6, 4)
    shift = torch.tensor([[-3, 0, 2, 3, -1, 0], [1, -2, 0, 3, -3, 0]])
    vflip = torch.tensor([True, False, False, True, False, True])
    hflip = torch.tensor([False, True, False, True, True, False])
    out = resample(floats, full, 40, vflip, hflip, shift)
    for k, image in enumerate(floats):
        padded = torch.nn.functional.pad(image, (3, 3, 3, 3))
        want = padded[:, 3 + shift[0, k]:43 + shift[0, k], 3 + shift[1, k]:43 + shift[1, k]]
        want = want.flip(-1) if hflip[k] else want
        want = want.flip(-2) if vflip[k] else want
        assert torch.allclose(out[k], want, atol=1e-5)


def test_colour_jitter_grayscale_and_erasing_distributions():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, 8, 8), generator=gen, dtype=torch.uint8)
    aug = AugmentConfig(color_jitter=0.4, normalize="none")
    per_image = build_train_transform(aug, 3, 8, None, None, native_size=8)
    cpu = torch.stack([per_image(image) for image in images])
    device = TrainBatchTransform(aug, 3, 8, None, None, generator=torch.Generator().manual_seed(0))(images)
    for stat in (lambda x: x.mean(dim=(1, 2, 3)), lambda x: x.std(dim=(1, 2, 3)),
                 lambda x: (x[:, 0] - x[:, 1]).abs().mean(dim=(1, 2))):  # brightness, contrast, saturation
        assert _ks(stat(cpu), stat(device)) < KS_LIMIT
    # brightness alone on a constant image: the factor is uniform in [0.6, 1.4]
    grey = torch.full((N, 3, 4, 4), 0.5)
    factor = torch.empty(N).uniform_(0.6, 1.4, generator=gen)
    out = color_jitter(grey, factor, None, None)
    assert torch.allclose(out[:, 0, 0, 0], (0.5 * factor).clamp(0, 1))
    gray = TrainBatchTransform(AugmentConfig(grayscale=0.3, normalize="none"), 3, 8, None, None,
                               torch.Generator().manual_seed(0))(images)
    is_grey = (gray[:, 0] == gray[:, 1]).all(dim=(1, 2)) & (gray[:, 1] == gray[:, 2]).all(dim=(1, 2))
    assert is_grey.float().mean().item() == pytest.approx(0.3, abs=0.03)
    erased = TrainBatchTransform(AugmentConfig(erasing=0.5, normalize="given", mean=[0.5] * 3, std=[0.5] * 3),
                                 3, 8, [0.5] * 3, [0.5] * 3, torch.Generator().manual_seed(0))(images)
    normalized = (images.float() / 255 - 0.5) / 0.5
    changed = (erased != normalized).any(dim=1).float().mean(dim=(1, 2))
    assert (changed > 0).float().mean().item() == pytest.approx(0.5, abs=0.04)
    assert (erased[erased != normalized] == 0).all()  # erasing_value zero: the mean colour


def test_eval_batches_match_the_per_image_eval_transform():
    images = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8)
    aug = AugmentConfig(crop_pct=0.8)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    pipelines = build_batch_pipelines(aug, 3, 16, mean, std, source_size=20)
    batch = pipelines.eval_batch(torch.stack([pipelines.eval_item(image) for image in images]))
    want = torch.stack([build_eval_transform(aug, 3, 16, mean, std)(image) for image in images])
    assert batch.shape == (5, 3, 16, 16)
    assert torch.allclose(batch, want, atol=1e-5)


def test_seeded_generator_is_reproducible_and_inputs_are_untouched():
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    before = images.clone()
    aug = AugmentConfig(random_resized_crop=True, hflip=0.5, pad_crop=2, color_jitter=0.3, grayscale=0.2,
                        erasing=0.5, erasing_value="random")
    first = TrainBatchTransform(aug, 3, 10, [0.5] * 3, [0.2] * 3, torch.Generator().manual_seed(3))(images)
    second = TrainBatchTransform(aug, 3, 10, [0.5] * 3, [0.2] * 3, torch.Generator().manual_seed(3))(images)
    other = TrainBatchTransform(aug, 3, 10, [0.5] * 3, [0.2] * 3, torch.Generator().manual_seed(4))(images)
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert torch.equal(images, before)
    gray = TrainBatchTransform(AugmentConfig(random_resized_crop=True, color_jitter=0.5), 1, 10, [0.5], [0.2])
    assert gray(images[:, :1]).shape == (8, 1, 10, 10)


def test_which_augmentations_run_on_the_device():
    batched = AugmentConfig(random_resized_crop=True, hflip=0.5, color_jitter=0.3, grayscale=0.1, erasing=0.2)
    assert cpu_only_augmentations(batched, 3, 32) == []
    assert resolve_device_transforms(batched, 3, 32, torch.device("cuda")) is True
    assert resolve_device_transforms(batched, 3, 32, torch.device("cpu")) is False  # auto: CUDA only
    mixed = AugmentConfig(hflip=0.5, rotation=15, color_jitter=0.3, hue=0.1)
    assert cpu_only_augmentations(mixed, 3, 32) == ["rotation", "color_jitter"]  # hue is per image only
    assert cpu_only_augmentations(mixed, 1, 32) == ["rotation"]                  # no hue on grey images
    assert resolve_device_transforms(mixed, 3, 32, torch.device("cuda")) is False
    forced = AugmentConfig(hflip=0.5, rotation=15, device_transforms="on")
    assert resolve_device_transforms(forced, 3, 32, torch.device("cpu")) is True
    assert resolve_device_transforms(AugmentConfig(device_transforms="off"), 3, 32, torch.device("cuda")) is False
    # on with a CPU-only op: it runs per image first, after sizing mixed-size files to the cache side
    pipelines = build_batch_pipelines(AugmentConfig(hflip=0.5, rotation=15, crop_pct=0.8), 3, 16, None, None,
                                      source_size=None)
    assert [type(t).__name__ for t in pipelines.train_item.transforms] == ["Resize", "CenterCrop", "RandomRotation"]
    items = [pipelines.train_item(torch.randint(0, 256, (3, h, w), dtype=torch.uint8)) for h, w in ((30, 24), (20, 40))]
    assert all(item.shape == (3, 20, 20) and item.dtype == torch.uint8 for item in items)  # 16 / 0.8
    assert pipelines.train_batch(torch.stack(items)).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("overrides", [
    ["augment.pad_crop=1", "augment.color_jitter=0.2"],
    ["augment.random_resized_crop=true", "augment.scale=[0.6,1.0]", "augment.img_size=10"],
])
def test_training_with_device_transforms_learns_as_well(tmp_path, overrides):
    """Digits trained with the batch path on the CPU reach the accuracy of the per-image path."""
    accuracy = {}
    for mode in ("on", "off"):
        recipe = imgtrain.load_recipe("quickstart", [
            "model.name=imgtrain_cnn_tiny", "train.epochs=6", "output.plots=false", "output.progress=off",
            "train.threads=1", f"augment.device_transforms={mode}", *overrides])
        result = imgtrain.train(recipe, run_dir=tmp_path / mode)
        accuracy[mode] = read_summary(result.run_dir)["test_acc"]
        said = "augmentation per batch on cpu: TrainBatchTransform(" in (result.run_dir / "train.log").read_text()
        assert said == (mode == "on")
    assert accuracy["on"] > 0.9 and accuracy["off"] > 0.9
    assert accuracy["on"] == pytest.approx(accuracy["off"], abs=0.04)
