"""Sharpness-aware minimisation (SAM) and its adaptive form (ASAM): minimise the worst loss nearby.

Each optimizer step first moves the weights w to the worst point of a small neighbourhood, to first
order, then takes the gradient there and applies it at w, so training prefers flat minima, which
generalise better (Foret et al. 2021; Kwon et al. 2021, ASAM, scale-invariant, with a larger rho):

    e(w) = rho * g / ||g||             SAM: g the gradient at w, ||.|| the L2 norm over all weights
    e(w) = rho * w^2 g / ||w g||       ASAM (adaptive): the neighbourhood scaled elementwise by |w|
    w <- optimizer step from w with the gradient at w + e(w)

In your own loop (two forward and backward passes per step):

    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn(model(x), y).backward()              # the gradient at w
    e = sam_perturbation(params, rho=0.05)       # None: a gradient is inf/nan (skip SAM this step)
    saved = perturb_weights(params, e)           # w -> w + e(w)
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()              # the gradient at w + e(w)
    restore_weights(params, saved)               # back to w, bit for bit
    optimizer.step()                             # weight decay is the optimizer's

`SamHook` does this in the Trainer's step (`state.repeat_group`: the loop replays the group's batches
at w + e(w)), so accumulation, clipping and AMP work as always; BatchNorm moves in the first pass only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from imgtrain.engine.events import Hook
from imgtrain.strategies.base import Strategy, StrategyContext

NORM_EPS = 1e-12  # keeps e(w) finite (zero) when the gradient is exactly zero


@torch.no_grad()
def sam_perturbation(params: Iterable[torch.Tensor], rho: float,
                     adaptive: bool = False) -> list[torch.Tensor | None] | None:
    """e(w) for each parameter from its `.grad` (None without one), the norm over all of them; None
    when a gradient is inf or nan (fp16 overflow: skip SAM this step) or none exists. A GradScaler's
    scale cancels out, so scaled gradients need no unscaling."""
    params = list(params)
    # the direction whose norm is taken: g, or |w| g for ASAM
    directions = [None if p.grad is None else (p.grad * p.abs() if adaptive else p.grad) for p in params]
    present = [d for d in directions if d is not None]
    if not present:
        return None
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d.float()) for d in present]))
    if not bool(torch.isfinite(norm)):  # one device sync per optimizer step
        return None
    scale = rho / (norm + NORM_EPS)  # a 0-dim tensor: the products keep each gradient's dtype
    return [None if d is None else (d * p.abs() * scale if adaptive else d * scale)
            for p, d in zip(params, directions)]


@torch.no_grad()
def perturb_weights(params: Sequence[torch.Tensor], perturbation: Sequence[torch.Tensor | None]) -> list:
    """Adds e to each parameter in place (w -> w + e); returns the weights before, for `restore_weights`.
    A copy, not e: w + e - e is not w in floating point, and the step must start from w exactly."""
    saved = []
    for p, e in zip(params, perturbation):
        saved.append(None if e is None else p.detach().clone())
        if e is not None:
            p.add_(e)
    return saved


@torch.no_grad()
def restore_weights(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor | None]) -> None:
    """Puts back the weights `perturb_weights` saved."""
    for p, weights in zip(params, saved):
        if weights is not None:
            p.copy_(weights)


class SamHook(Hook):
    """Perturbs the weights after a group's first backward pass, has the loop replay the group, and
    restores the weights after the replay's."""

    name = "sam"
    replays_group = True  # the loop keeps each accumulation group's batches for the second pass

    def __init__(self, rho: float, adaptive: bool = False):
        self.rho, self.adaptive = rho, adaptive
        self.unperturbed_steps = 0  # steps with a non-finite gradient at w, taken without SAM (this process)
        self._params: list[torch.Tensor] = []
        self._saved: list | None = None
        self._momenta: list[tuple[torch.nn.Module, Any]] = []

    def after_backward(self, state: Any) -> None:
        if not state.group_end:
            return
        if state.pass_index == 0:
            self._ascend(state)
        elif state.pass_index == 1 and self._saved is not None:
            self._restore(state)

    def _ascend(self, state: Any) -> None:
        # the optimizer's parameters: what the step updates; frozen ones have no gradient
        self._params = [p for group in state.optimizer.param_groups for p in group["params"] if p.requires_grad]
        perturbation = sam_perturbation(self._params, self.rho, self.adaptive)
        if perturbation is None:  # inf/nan at w: no replay; the GradScaler (or the guard) skips the step
            self.unperturbed_steps += 1
            return
        self._saved = perturb_weights(self._params, perturbation)
        del perturbation
        # the replay's forward at w + e(w) must not move the running statistics: momentum 0 keeps
        # them (also for momentum None, a cumulative average)
        self._momenta = [(m, m.momentum) for m in state.model.modules()
                         if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for module, _ in self._momenta:
            setattr(module, "momentum", 0.0)  # noqa: B010 (nn.Module's typed __setattr__ rejects a float)
        state.optimizer.zero_grad(set_to_none=True)
        state.repeat_group = True

    def _restore(self, state: Any) -> None:
        assert self._saved is not None, "restore without a perturbation"
        restore_weights(self._params, self._saved)
        for module, momentum in self._momenta:
            setattr(module, "momentum", momentum)  # noqa: B010
        self._saved, self._params, self._momenta = None, [], []


class Sam(Strategy):
    name, section = "sam", "optim"

    def enabled(self, recipe: Any) -> bool:
        return recipe.optim.sam is not None

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        return [SamHook(recipe.optim.sam.rho, adaptive=recipe.optim.sam.adaptive)]


__all__ = ["Sam", "SamHook", "perturb_weights", "restore_weights", "sam_perturbation"]
