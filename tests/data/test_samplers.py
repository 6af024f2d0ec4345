"""Class-balanced and per-class batch samplers: frequencies over many draws, determinism, wiring."""

from __future__ import annotations

import pytest
import torch

from imgtrain.config import RecipeError, load_recipe
from imgtrain.data import build_loaders, build_splits
from imgtrain.data.samplers import ClassBalancedSampler, PerClassBatchSampler, train_sampling

# 900 / 90 / 10 images: a 90x imbalance
TARGETS = torch.cat([torch.zeros(900), torch.ones(90), torch.full((10,), 2)]).long()


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_balanced_sampler_draws_classes_equally_over_many_draws():
    draws = 60_000
    indices = torch.tensor(list(ClassBalancedSampler(TARGETS, num_samples=draws, generator=generator())))
    freq = torch.bincount(TARGETS[indices], minlength=3).double() / draws
    # binomial std of a frequency of 1/3 over 60,000 draws is 0.0019: 0.01 is over 5 sigma
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01), freq
    # within a class the image is uniform: each of the 10 tail images gets ~1/10 of that class's draws
    tail = torch.bincount(indices[TARGETS[indices] == 2] - 990, minlength=10).double()
    assert torch.allclose(tail / tail.sum(), torch.full((10,), 0.1, dtype=torch.float64), atol=0.02)
    # an epoch is as long as the split, by default
    assert len(ClassBalancedSampler(TARGETS)) == len(TARGETS)


def test_balanced_sampler_follows_its_generator():
    g = generator(5)
    sampler = ClassBalancedSampler(TARGETS, generator=g)
    first = list(sampler)
    g.manual_seed(5)  # what the trainer does before every epoch
    assert list(sampler) == first
    g.manual_seed(6)
    assert list(sampler) != first


def test_per_class_batches_hold_p_classes_of_k_images():
    sampler = PerClassBatchSampler(TARGETS, batch_size=6, images_per_class=2, generator=generator())
    batches = list(sampler)
    assert len(batches) == len(sampler) == 1000 // 6
    for batch in batches:
        assert len(batch) == 6
        per_class = torch.bincount(TARGETS[torch.tensor(batch)], minlength=3)
        assert per_class.tolist() == [2, 2, 2]
        assert len(set(batch)) == 6   # no image twice in a batch


def test_per_class_batches_draw_classes_equally_and_cycle_the_tail():
    sampler = PerClassBatchSampler(TARGETS, batch_size=4, images_per_class=2, generator=generator(1))
    batches = list(sampler)   # 250 batches of 2 of the 3 classes
    labels = TARGETS[torch.tensor(batches)]
    freq = torch.bincount(labels.flatten(), minlength=3).double() / labels.numel()
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.04), freq
    # the 10 tail images are used in shuffled rounds: their use counts differ by at most one
    tail_uses = torch.bincount(torch.tensor(batches).flatten()[labels.flatten() == 2] - 990, minlength=10)
    assert int(tail_uses.max() - tail_uses.min()) <= 1


def test_per_class_sampler_is_deterministic_per_seed():
    g = generator(3)
    sampler = PerClassBatchSampler(TARGETS, batch_size=6, images_per_class=3, generator=g)
    first = list(sampler)
    g.manual_seed(3)
    assert list(sampler) == first


def data_recipe(*overrides: str):
    return load_recipe(None, ["data.source=shapes", "data.shapes.train_size=600", "data.shapes.val_size=0",
                              "data.shapes.test_size=0", "data.shapes.image_size=8",
                              "data.shapes.imbalance=20", "data.batch_size=32", *overrides])


def test_build_loaders_balanced_sampler_evens_out_an_imbalanced_split():
    recipe = data_recipe("data.sampler=balanced")
    splits = build_splits(recipe.data)
    counts = torch.bincount(splits.train.targets)
    assert counts.max() / counts.min() >= 15
    loaders = build_loaders(recipe, splits, torch.device("cpu"))
    labels = torch.cat([targets for _, targets in zip(range(100), _epochs(loaders))])
    freq = torch.bincount(labels, minlength=4).double() / len(labels)
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03), freq


def _epochs(loaders):
    """Label batches over epochs, re-seeding the generator as the trainer does."""
    epoch = 0
    while True:
        loaders.train_generator.manual_seed(epoch)
        for _, targets in loaders.train:
            yield targets
        epoch += 1


def test_build_loaders_per_class_batches():
    recipe = data_recipe("data.sampler=per_class", "data.images_per_class=16")
    loaders = build_loaders(recipe, build_splits(recipe.data), torch.device("cpu"))
    batches = [targets for _, targets in loaders.train]
    assert len(batches) == 600 // 32
    for targets in batches:
        assert sorted(torch.bincount(targets, minlength=4).tolist()) == [0, 0, 16, 16]
    loaders.train_generator.manual_seed(7)
    again = [t for _, t in loaders.train]
    loaders.train_generator.manual_seed(7)
    assert all(torch.equal(a, b) for a, b in zip(again, [t for _, t in loaders.train]))


def test_per_class_sampler_recipe_errors_say_what_to_set():
    recipe = data_recipe("data.sampler=per_class", "data.images_per_class=5")
    targets = torch.arange(4).repeat(10)
    with pytest.raises(RecipeError, match=r"data.images_per_class.*multiple of images_per_class \(5\).*: 4"):
        train_sampling(recipe.data, targets, generator())
    recipe = data_recipe("data.sampler=per_class", "data.images_per_class=4")   # 32 / 4 = 8 classes > 4
    with pytest.raises(RecipeError, match=r"needs 8 classes.*has 4.*at least 8"):
        train_sampling(recipe.data, targets, generator())
