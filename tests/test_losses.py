"""Losses and class-imbalance tools: class weights, focal, logit adjustment, the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imgtrain.config import RecipeError, load_recipe
from imgtrain.losses import (
    LOSSES,
    build_train_loss,
    check_imbalance_recipe,
    class_counts,
    class_prior,
    class_weights_from_counts,
    cross_entropy,
    eval_logit_offset,
    focal_loss,
    logit_adjusted_cross_entropy,
    logit_adjustment,
    posthoc_adjust_logits,
    soft_targets,
)

COUNTS = torch.tensor([800, 150, 40, 10])


def recipe(*overrides: str):
    return load_recipe(None, list(overrides))


def long_tailed_labels(n: int, prior: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(prior, n, replacement=True, generator=g)


# ----------------------------------------------------------------------------- class weights

def test_inverse_weights_are_one_over_count_with_mean_one():
    weights = class_weights_from_counts(COUNTS, "inverse")
    expected = (1 / COUNTS.double()) / (1 / COUNTS.double()).mean()
    assert torch.allclose(weights.double(), expected, rtol=1e-6)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert weights[3] / weights[0] == pytest.approx(80.0, rel=1e-5)


def test_effective_number_weights_match_cui_et_al():
    beta = 0.99
    effective = [(1 - beta ** n) / (1 - beta) for n in COUNTS.tolist()]   # E(n) of the paper
    expected = torch.tensor([1 / e for e in effective], dtype=torch.float64)
    expected = expected / expected.mean()
    weights = class_weights_from_counts(COUNTS, "effective", beta)
    assert torch.allclose(weights.double(), expected, rtol=1e-5)
    # the two limits: beta = 0 weighs classes equally, beta -> 1 tends to inverse frequency
    assert torch.allclose(class_weights_from_counts(COUNTS, "effective", 0.0), torch.ones(4))
    assert torch.allclose(class_weights_from_counts(COUNTS, "effective", 1 - 1e-9),
                          class_weights_from_counts(COUNTS, "inverse"), rtol=1e-3)


def test_class_weights_give_equal_weighted_class_frequencies_over_many_draws():
    # labels drawn from a long-tailed prior: inverse weights make each class carry 1/C of the
    # total weight; effective-number weights make class c carry n_c / E(n_c) of it
    prior = COUNTS.double() / COUNTS.sum()
    labels = long_tailed_labels(200_000, prior)
    counts = class_counts(labels, 4)
    assert torch.allclose(counts.double() / len(labels), prior, atol=0.005)
    inverse = class_weights_from_counts(counts, "inverse")
    share = torch.bincount(labels, weights=inverse[labels].double(), minlength=4)
    assert torch.allclose(share / share.sum(), torch.full((4,), 0.25, dtype=torch.float64), atol=1e-6)
    beta = 0.999
    effective = class_weights_from_counts(counts, "effective", beta).double()
    share = torch.bincount(labels, weights=effective[labels], minlength=4)
    e_n = (1 - beta ** counts.double()) / (1 - beta)
    expected = (counts / e_n) / (counts / e_n).sum()
    assert torch.allclose(share / share.sum(), expected, atol=1e-6)


def test_weighted_loss_is_the_weighted_mean_and_soft_targets_agree():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(64, 4, generator=g), torch.randint(0, 4, (64,), generator=g)
    weight = class_weights_from_counts(COUNTS, "inverse")
    per_image = -F.log_softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    expected = (weight[labels] * per_image).sum() / weight[labels].sum()
    assert cross_entropy(logits, labels, weight).item() == pytest.approx(expected.item(), rel=1e-5)
    soft = F.one_hot(labels, 4).float()
    assert cross_entropy(logits, soft, weight).item() == pytest.approx(expected.item(), rel=1e-5)


def test_empty_class_counts_as_one_image():
    weights = class_weights_from_counts(torch.tensor([100, 0]), "inverse")
    assert torch.isfinite(weights).all() and weights[1] / weights[0] == pytest.approx(100.0)
    assert torch.isfinite(torch.log(class_prior(torch.tensor([100, 0])))).all()


# ----------------------------------------------------------------------------- focal loss

def test_focal_softmax_matches_hand_computation_and_reduces_to_ce():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    p = F.softmax(logits, 1)
    gamma = 2.0
    hand = [-(1 - p[i, y]) ** gamma * math.log(p[i, y]) for i, y in enumerate(labels.tolist())]
    assert focal_loss(logits, labels, gamma).item() == pytest.approx(sum(hand) / 2, rel=1e-5)
    ce = F.cross_entropy(logits, labels).item()
    assert focal_loss(logits, labels, 0.0).item() == pytest.approx(ce, rel=1e-6)
    # an easy example (p = 0.79) loses far more of its loss than a hard one (p = 0.37)
    easy, hard = [focal_loss(logits[i:i + 1], labels[i:i + 1], gamma)
                  / F.cross_entropy(logits[i:i + 1], labels[i:i + 1]) for i in range(2)]
    assert easy < 0.05 and hard > 0.39


def test_focal_on_soft_targets_is_the_mix_of_the_two_hard_losses():
    # Mixup targets: lam * onehot(a) + (1 - lam) * onehot(b); the softmax focal loss is linear in them
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 5, generator=g)
    a, b = torch.randint(0, 5, (16,), generator=g), torch.randint(0, 5, (16,), generator=g)
    lam = 0.7
    mixed = lam * F.one_hot(a, 5).float() + (1 - lam) * F.one_hot(b, 5).float()
    expected = lam * focal_loss(logits, a, 2.0) + (1 - lam) * focal_loss(logits, b, 2.0)
    assert focal_loss(logits, mixed, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    smoothed = soft_targets(a, 5, 0.1)
    assert torch.allclose(smoothed.sum(1), torch.ones(16)) and smoothed.max().item() == pytest.approx(0.92)
    assert focal_loss(logits, a, 2.0, label_smoothing=0.1).item() == pytest.approx(
        focal_loss(logits, smoothed, 2.0).item(), rel=1e-6)


def test_focal_with_alpha_is_the_papers_sigmoid_form():
    logits = torch.tensor([[1.5, -0.5, 0.0]])
    label = torch.tensor([1])
    alpha, gamma = 0.25, 2.0
    s = torch.sigmoid(logits[0])
    hand = 0.0
    for c in range(3):
        if c == 1:   # positive: -alpha (1 - p)^gamma log p
            hand += -alpha * (1 - s[c]) ** gamma * math.log(s[c])
        else:        # negative: -(1 - alpha) p^gamma log(1 - p)
            hand += -(1 - alpha) * s[c] ** gamma * math.log(1 - s[c])
    assert focal_loss(logits, label, gamma, alpha).item() == pytest.approx(float(hand), rel=1e-5)


# ----------------------------------------------------------------------------- logit adjustment

def test_logit_adjusted_loss_is_ce_on_shifted_logits():
    prior = class_prior(COUNTS)
    assert torch.allclose(logit_adjustment(prior, 0.5), 0.5 * torch.log(prior))
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    label = torch.tensor([3])
    # uniform logits: the loss is -log of the adjusted softmax, i.e. -log(prior[3]) at tau = 1
    assert logit_adjusted_cross_entropy(logits, label, prior, 1.0).item() == pytest.approx(
        -math.log(prior[3].item()), rel=1e-5)
    assert logit_adjusted_cross_entropy(logits, label, prior, 0.0).item() == pytest.approx(math.log(4),
                                                                                           rel=1e-6)
    # a tail-class label costs more than a head-class one: the model must beat the prior
    assert logit_adjusted_cross_entropy(logits, torch.tensor([0]), prior).item() < 0.25


def test_posthoc_adjustment_makes_the_bayes_classifier_balanced():
    # two 1-D Gaussians, 95% vs 5%: the Bayes posterior favours the head class; subtracting
    # log(prior) leaves the likelihoods, which maximise balanced accuracy (Menon et al. 2021)
    g = torch.Generator().manual_seed(3)
    prior = torch.tensor([0.95, 0.05])
    labels = long_tailed_labels(50_000, prior, seed=3)
    x = torch.randn(len(labels), generator=g) + 1.5 * labels
    log_lik = torch.stack([-(x - 0.0) ** 2 / 2, -(x - 1.5) ** 2 / 2], dim=1)
    posterior_logits = log_lik + torch.log(prior)

    def balanced_acc(logits):
        pred = logits.argmax(1)
        return sum(float((pred[labels == c] == c).float().mean()) for c in range(2)) / 2

    before = balanced_acc(posterior_logits)
    after = balanced_acc(posthoc_adjust_logits(posterior_logits, prior))
    assert after > before + 0.15 and after > 0.75


def test_eval_logit_offset_only_with_posthoc_adjust():
    labels = torch.repeat_interleave(torch.arange(4), COUNTS)
    assert eval_logit_offset(recipe(), labels, 4) is None
    offset = eval_logit_offset(recipe("imbalance.posthoc_adjust=true", "imbalance.tau=0.5"), labels, 4)
    assert torch.allclose(offset, -0.5 * torch.log(COUNTS.float() / COUNTS.sum()))


# ----------------------------------------------------------------------------- the registry

def _imbalanced_digits():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x, y = torch.tensor(bunch.data, dtype=torch.float32) / 16, torch.tensor(bunch.target)
    keep = torch.cat([torch.nonzero(y == c).squeeze(1)[:max(8, 180 >> (c // 2))] for c in range(10)])
    return x[keep], y[keep]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_trains_a_classifier_on_long_tailed_digits(name):
    x, y = _imbalanced_digits()
    counts = class_counts(y, 10)
    assert counts.max() / counts.min() > 10
    # each loss on its own: stacked with inverse weights, logit adjustment corrects twice
    loss_fn = build_train_loss(recipe(f"imbalance.loss={name}", "train.label_smoothing=0.05"), y, 10)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    first = None
    for _ in range(150):
        loss = loss_fn(model(x), y)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pred = model(x).argmax(1)
    recall = [float((pred[y == c] == c).float().mean()) for c in range(10)]
    assert loss.item() < 0.5 * first
    assert sum(recall) / 10 > 0.9, recall
    # soft targets with smoothing folded in give the same loss as hard targets with smoothing
    hard = loss_fn(model(x), y)
    soft = loss_fn(model(x), soft_targets(y, 10, 0.05))
    assert soft.item() == pytest.approx(hard.item(), rel=1e-5)


def test_build_train_loss_picks_the_recipe_loss_and_weights():
    labels = torch.repeat_interleave(torch.arange(4), COUNTS)
    focal = recipe("imbalance.loss=focal", "imbalance.focal_gamma=1.5", "imbalance.class_weights=effective",
                   "imbalance.effective_beta=0.99")
    loss = build_train_loss(focal, labels, 4)
    assert type(loss).__name__ == "FocalLoss" and loss.gamma == 1.5
    assert torch.allclose(loss.weight, class_weights_from_counts(COUNTS, "effective", 0.99))
    loss = build_train_loss(recipe("imbalance.class_weights=[1, 2, 3, 4]"), labels, 4)
    assert loss.weight.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert build_train_loss(recipe(), labels, 4).weight is None
    loss = build_train_loss(recipe("imbalance.loss=logit_adjusted", "imbalance.tau=2"), labels, 4)
    assert torch.allclose(loss.prior, COUNTS.float() / COUNTS.sum()) and loss.tau == 2.0


# ----------------------------------------------------------------------------- recipe errors

def test_class_weight_list_of_wrong_length_is_a_recipe_error():
    bad = recipe("imbalance.class_weights=[1.0, 2.0, 3.0]")
    with pytest.raises(RecipeError) as info:
        check_imbalance_recipe(bad, ["cat", "dog", "bird", "fish"])
    message = str(info.value)
    assert info.value.key == "imbalance.class_weights"
    assert "imbalance.class_weights" in message and "4 classes" in message and "3 weight" in message
    assert "cat, dog, bird, fish" in message
    with pytest.raises(RecipeError, match="imbalance.class_weights.*2 classes"):
        build_train_loss(bad, torch.tensor([0, 1, 1]), 2)
    with pytest.raises(RecipeError, match="at least one class weight"):
        check_imbalance_recipe(recipe("imbalance.class_weights=[0, 0]"), ["a", "b"])


def test_posthoc_on_top_of_the_logit_adjusted_loss_is_a_recipe_error():
    with pytest.raises(RecipeError, match="imbalance.posthoc_adjust.*twice"):
        check_imbalance_recipe(recipe("imbalance.loss=logit_adjusted", "imbalance.posthoc_adjust=true"),
                               ["a", "b"])
