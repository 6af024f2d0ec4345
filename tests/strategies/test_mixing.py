"""Mixup / CutMix: soft targets sum to one and match the mixed pixels; the hook trains for real."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imgtrain.api import train
from imgtrain.config import MixConfig, RecipeError, load_recipe
from imgtrain.losses import ClassificationLoss
from imgtrain.strategies import MixingHook, build_strategies, cutmix_box, mix_batch

N, C, H, W = 6, 6, 10, 14


def constant_batch():
    """Image i is filled with the value i + 1 and labelled class i: pixels tell whose they are."""
    values = torch.arange(1, N + 1, dtype=torch.float32)
    return values.view(N, 1, 1, 1).expand(N, 3, H, W).clone(), torch.arange(N)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["mixup", "cutmix", "both"])
def test_targets_sum_to_one(kind, smoothing):
    inputs, labels = constant_batch()
    alphas = {"mixup": (0.4, 0.0), "cutmix": (0.0, 1.0), "both": (0.4, 1.0)}[kind]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        _, targets = mix_batch(inputs, labels, C, *alphas, label_smoothing=smoothing, generator=gen)
        assert targets.shape == (N, C)
        assert torch.allclose(targets.sum(1), torch.ones(N), atol=1e-6)
        assert targets.min() >= smoothing / C - 1e-7


def test_mixup_target_weight_is_the_pixel_blend():
    inputs, labels = constant_batch()
    gen = torch.Generator().manual_seed(1)
    lams = []
    for _ in range(30):
        mixed, targets = mix_batch(inputs, labels, C, mixup_alpha=0.4, generator=gen)
        own, partner = labels.float() + 1, labels.flip(0).float() + 1
        for i in range(N):
            if own[i] == partner[i]:
                continue
            lam = (mixed[i, 0, 0, 0] - partner[i]) / (own[i] - partner[i])  # pixel = lam*own + (1-lam)*partner
            assert torch.allclose(mixed[i], torch.full_like(mixed[i], float(mixed[i, 0, 0, 0])))
            assert targets[i, labels[i]].item() == pytest.approx(lam.item(), abs=1e-5)
            assert targets[i, labels.flip(0)[i]].item() == pytest.approx(1 - lam.item(), abs=1e-5)
        lams.append(targets[0, 0].item())
    assert len({round(v, 4) for v in lams}) > 20  # a fresh lam every batch
    assert 0.3 < sum(lams) / len(lams) < 0.7  # Beta(a, a) is symmetric around 0.5


def test_cutmix_target_weight_is_the_pasted_area():
    inputs, labels = constant_batch()
    gen = torch.Generator().manual_seed(2)
    clipped = 0
    for _ in range(200):
        mixed, targets = mix_batch(inputs, labels, C, cutmix_alpha=1.0, generator=gen)
        partner = labels.flip(0)
        for i in range(N):
            if partner[i] == labels[i]:
                continue
            pasted = (mixed[i] == partner[i] + 1).float().mean().item()
            kept = (mixed[i] == labels[i] + 1).float().mean().item()
            assert pasted + kept == pytest.approx(1.0)  # pure pixels only: a box, not a blend
            assert targets[i, partner[i]].item() == pytest.approx(pasted, abs=1e-6)
            assert targets[i, labels[i]].item() == pytest.approx(kept, abs=1e-6)
        # the same box for the whole batch
        assert torch.equal(mixed[0] == labels.flip(0)[0] + 1, mixed[1] == labels.flip(0)[1] + 1)
    # boxes near the border are clipped; their lam was corrected (else the asserts above fail)
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        top, bottom, left, right = cutmix_box(H, W, 0.5, gen)
        clipped += (bottom - top) * (right - left) < int(H * 0.5 ** 0.5) * int(W * 0.5 ** 0.5)
    assert clipped > 50


def test_label_smoothing_folded_in_matches_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    _, targets = mix_batch(torch.zeros(8, 1, 4, 4), labels, 5, mixup_alpha=1.0, prob=0.0, label_smoothing=0.1)
    assert targets[torch.arange(8), labels].tolist() == pytest.approx([0.9 + 0.02] * 8)
    soft_loss = ClassificationLoss(label_smoothing=0.1)(logits, targets)  # soft: not smoothed again
    assert soft_loss.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), abs=1e-6)


def test_switch_and_application_probabilities():
    inputs, labels = constant_batch()
    gen = torch.Generator().manual_seed(4)
    kinds = {"none": 0, "mixup": 0, "cutmix": 0}
    for _ in range(600):
        mixed, _ = mix_batch(inputs, labels, C, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.25,
                             prob=0.6, generator=gen)
        if torch.equal(mixed, inputs):
            kinds["none"] += 1
        elif torch.all((mixed[0] == 1) | (mixed[0] == N)):
            kinds["cutmix"] += 1
        else:
            kinds["mixup"] += 1
    assert kinds["none"] / 600 == pytest.approx(0.4, abs=0.06)
    assert kinds["cutmix"] / (kinds["cutmix"] + kinds["mixup"]) == pytest.approx(0.25, abs=0.06)


def test_same_generator_same_mix_and_inputs_untouched():
    inputs, labels = constant_batch()
    before = inputs.clone()
    a = mix_batch(inputs, labels, C, 0.4, 1.0, generator=torch.Generator().manual_seed(7))
    b = mix_batch(inputs, labels, C, 0.4, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(inputs, before)


def test_uint8_mixup_blends_and_rounds():
    inputs = torch.stack([torch.full((1, 4, 4), 0, dtype=torch.uint8), torch.full((1, 4, 4), 200, dtype=torch.uint8)])
    mixed, targets = mix_batch(inputs, torch.tensor([0, 1]), 2, mixup_alpha=1.0,
                               generator=torch.Generator().manual_seed(0))
    assert mixed.dtype == torch.uint8
    assert mixed[0, 0, 0, 0].item() == round(200 * targets[0, 1].item())


class _State:
    def __init__(self, epoch):
        self.epoch, self.classes = epoch, [str(i) for i in range(C)]
        self.inputs, self.targets = constant_batch()


def test_hook_stops_at_off_epoch_and_resumes_its_stream():
    hook = MixingHook(MixConfig(mixup_alpha=0.4, off_epoch=2), label_smoothing=0.0, seed=0)
    hook.batch_start(_State(epoch=0))
    saved = hook.state_dict()           # what a checkpoint holds after some batches
    first = _State(epoch=1)
    hook.batch_start(first)
    hook.load_state_dict(saved)         # a resume
    again = _State(epoch=1)
    hook.batch_start(again)
    assert first.targets.shape == (N, C)
    assert torch.equal(again.inputs, first.inputs) and torch.equal(again.targets, first.targets)
    late = _State(epoch=2)              # from mix.off_epoch on: the batch is left alone
    hook.batch_start(late)
    assert late.targets.ndim == 1 and torch.equal(late.inputs, constant_batch()[0])


def test_mixing_trains_on_digits_with_soft_targets(tmp_path):
    recipe = load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.epochs=5",
                                        "mix.mixup_alpha=0.2", "mix.cutmix_alpha=1.0", "mix.off_epoch=4",
                                        "output.progress=off", "output.plots=false", "train.threads=1"])
    assert [h.name for h in build_strategies(recipe)] == ["mixing", "nonfinite_guard"]  # the guard is on by default
    result = train(recipe, run_dir=tmp_path / "run")
    assert result.summary["test_acc"] > 0.85
    rows = result.history
    # training accuracy is against the dominant label: a real accuracy, not ~0
    assert 0.3 < rows[3]["train_acc"] <= 1.0
    # the last epoch trains on plain labels again: its loss falls below the mixed epochs'
    assert rows[4]["train_loss"] < min(r["train_loss"] for r in rows[:4])


@pytest.mark.parametrize("override, message", [
    ("mix.mixup_alpha=0",
     "mix.mixup_alpha: alpha must be > 0 (it shapes Beta(alpha, alpha)), got 0.0; leave the key out"),
    ("mix.cutmix_alpha=0.0", "mix.cutmix_alpha: alpha must be > 0"),
    ("mix.cutmix_alpha=-1", "mix.cutmix_alpha: alpha must be > 0 (it shapes Beta(alpha, alpha)), got -1.0"),
    ("mix.switch_prob=1.5", "mix.switch_prob: 1.5 is out of range: expected a value <= 1"),
    ("mix.prob=-0.1", "mix.prob: -0.1 is out of range: expected a value >= 0"),
])
def test_bad_mixing_settings_are_recipe_errors(override, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [override])
    assert message in str(info.value)


def test_mixing_needs_two_images_per_batch():
    recipe = load_recipe("quickstart", ["mix.mixup_alpha=0.2", "data.batch_size=1"])
    with pytest.raises(RecipeError, match="data.batch_size: Mixup/CutMix blend images within a batch"):
        build_strategies(recipe)
