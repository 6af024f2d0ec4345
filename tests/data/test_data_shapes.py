"""The synthetic shapes generator: determinism, imbalance, pixel statistics."""

import time

import torch

from imgtrain.config import ShapesConfig
from imgtrain.data.shapes import SHAPE_NAMES, class_counts, generate_shapes


def test_deterministic_and_seed_dependent():
    cfg = ShapesConfig(num_classes=8, image_size=24, train_size=64, val_size=16, test_size=16, seed=7)
    a, b = generate_shapes(cfg), generate_shapes(cfg)
    for split in ("train", "val", "test"):
        assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])
    assert a["train"][0].shape == (64, 3, 24, 24) and a["train"][0].dtype == torch.uint8
    cfg.seed = 8
    assert not torch.equal(generate_shapes(cfg)["train"][0], a["train"][0])
    cfg.seed, cfg.val_size = 7, 40  # another val size leaves train alone
    assert torch.equal(generate_shapes(cfg)["train"][0], a["train"][0])


def test_imbalance_ratio_and_balanced_eval_splits():
    cfg = ShapesConfig(num_classes=4, image_size=8, train_size=1000, val_size=40, test_size=0, imbalance=10.0)
    out = generate_shapes(cfg)
    train_counts = torch.bincount(out["train"][1], minlength=4).tolist()
    assert sum(train_counts) == 1000
    assert train_counts == sorted(train_counts, reverse=True)
    assert abs(train_counts[0] / train_counts[-1] - 10.0) < 0.3
    # geometric: each step divides by 10 ** (1/3)
    assert abs(train_counts[0] / train_counts[1] - 10 ** (1 / 3)) < 0.1
    assert torch.bincount(out["val"][1]).tolist() == [10, 10, 10, 10]
    assert "test" not in out
    assert class_counts(10, 4, 1.0).tolist() == [3, 3, 2, 2]


def test_shapes_are_visible_and_noise_has_the_configured_strength():
    clean = ShapesConfig(num_classes=2, image_size=32, train_size=20, val_size=0, test_size=0, noise=0.0)
    images = generate_shapes(clean)["train"][0].float()
    # the shape's colour is far from the background's (median pixel): a visible shape
    pixels = images.flatten(2)  # (N, 3, P)
    background = pixels.median(dim=2).values[:, :, None]
    farthest = (pixels - background).norm(dim=1).max(dim=1).values
    assert (farthest >= 119).all()  # _MIN_CONTRAST = 120, minus rounding
    noisy = ShapesConfig(**{**clean.__dict__, "noise": 0.1})
    diff = generate_shapes(noisy)["train"][0].float() - images
    inside = (images > 40) & (images < 215)  # away from clipping
    assert abs(diff[inside].std().item() - 25.5) < 2.0


def test_ten_thousand_images_generate_quickly():
    cfg = ShapesConfig(num_classes=len(SHAPE_NAMES), image_size=64, train_size=10000, val_size=0, test_size=0)
    start = time.perf_counter()
    images, labels = generate_shapes(cfg)["train"]
    elapsed = time.perf_counter() - start
    assert images.shape == (10000, 3, 64, 64) and labels.unique().tolist() == list(range(8))
    assert elapsed < 15.0, f"10k 64px shapes took {elapsed:.1f} s"
