"""Mixup and CutMix: train on blends of two images with a blend of their labels.

Mixup (Zhang et al. 2018) replaces each image by lam * x_i + (1 - lam) * x_j; CutMix (Yun et al.
2019) pastes a box of x_j into x_i; the target is the same blend of the two one-hot labels. As in
timm's batch mode: one lam per batch, image i paired with image N-1-i, label smoothing folded into
the soft targets; CutMix's lam is recomputed from the area actually pasted.

    inputs, soft_targets = mix_batch(inputs, targets, num_classes=10, mixup_alpha=0.2,
                                     label_smoothing=0.1, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from timm.data.mixup import mixup_target

from imgtrain.config import RecipeError
from imgtrain.engine.events import Hook
from imgtrain.strategies.base import Strategy, StrategyContext


def sample_lam(alpha: float, generator: torch.Generator | None = None) -> float:
    """One draw from Beta(alpha, alpha), determined by a torch generator (or torch's global RNG):
    torch's Beta sampler takes no generator, so NumPy draws it from a seed the generator gives."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def cutmix_box(height: int, width: int, lam: float,
               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of area ~(1 - lam), centred uniformly, clipped at the border."""
    cut = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, (1,), generator=generator).item())
    cx = int(torch.randint(0, width, (1,), generator=generator).item())
    top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return top, bottom, left, right


def mix_batch(inputs: torch.Tensor, targets: torch.Tensor, num_classes: int, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0, switch_prob: float = 0.5, prob: float = 1.0,
              label_smoothing: float = 0.0, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch (N, C, H, W) with class indices (N,): (mixed inputs, soft targets (N, num_classes)).
    CutMix is used with probability `switch_prob` when both alphas are > 0; a batch is mixed at all
    with probability `prob` (else it gets smoothed one-hot targets). The inputs are not changed."""
    if targets.ndim != 1:
        raise ValueError(f"mix_batch takes class indices (N,), got targets of shape {tuple(targets.shape)}")
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    lam = 1.0
    apply = (use_mixup or use_cutmix) and float(torch.rand((), generator=generator)) < prob
    if apply:
        cutmix = use_cutmix and (not use_mixup or float(torch.rand((), generator=generator)) < switch_prob)
        lam = sample_lam(cutmix_alpha if cutmix else mixup_alpha, generator)
        partner = inputs.flip(0)
        if cutmix:
            height, width = inputs.shape[-2:]
            top, bottom, left, right = cutmix_box(height, width, lam, generator)
            inputs = inputs.clone()
            inputs[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)  # the area actually pasted
        elif inputs.is_floating_point():
            inputs = inputs * lam + partner * (1.0 - lam)
        else:  # uint8 images (a preview, a custom loop): blend in float, round back
            inputs = (inputs.float() * lam + partner.float() * (1.0 - lam)).round().to(inputs.dtype)
    soft = mixup_target(targets, num_classes, lam=lam, smoothing=label_smoothing)
    return inputs, soft


class MixingHook(Hook):
    """Replaces each training batch by its Mixup/CutMix blend, up to `mix.off_epoch`; its generator
    is saved in checkpoints, so a resumed run draws the same lams and boxes."""

    name = "mixing"

    def __init__(self, mix: Any, label_smoothing: float, seed: int):
        self.mix, self.label_smoothing = mix, label_smoothing
        self.generator = torch.Generator().manual_seed(seed)

    def batch_start(self, state: Any) -> None:
        off = self.mix.off_epoch
        if off is not None and state.epoch >= off:
            return  # hard targets again: the loss applies train.label_smoothing itself
        state.inputs, state.targets = mix_batch(
            state.inputs, state.targets, len(state.classes), mixup_alpha=self.mix.mixup_alpha or 0.0,
            cutmix_alpha=self.mix.cutmix_alpha or 0.0, switch_prob=self.mix.switch_prob, prob=self.mix.prob,
            label_smoothing=self.label_smoothing, generator=self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def mixing_enabled(recipe: Any) -> bool:
    mix = recipe.mix
    return bool(mix.mixup_alpha or mix.cutmix_alpha) and mix.prob > 0


class Mixing(Strategy):
    name, section = "mixing", "mix"

    def enabled(self, recipe: Any) -> bool:
        return mixing_enabled(recipe)

    def drops_last_batch(self, recipe: Any) -> bool:
        return True  # a last batch of one or two images mixes only with itself: a noisy step

    def check(self, recipe: Any) -> None:
        if recipe.data.batch_size < 2:
            raise RecipeError("Mixup/CutMix blend images within a batch: data.batch_size must be >= 2 "
                              f"(got {recipe.data.batch_size}), or turn mixing off",
                              file=recipe.source_file, key="data.batch_size")

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        # seed + 1: not the shuffle's stream
        return [MixingHook(recipe.mix, recipe.train.label_smoothing, seed=recipe.train.seed + 1)]


__all__ = ["Mixing", "MixingHook", "cutmix_box", "mix_batch", "sample_lam"]
