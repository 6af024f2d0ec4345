"""EMA of weights: validate and keep an exponential moving average of the model's weights.

After every optimizer step, ema = decay * ema + (1 - decay) * weights (parameters and BatchNorm
buffers), with timm's `ModelEmaV3`; with `ema.warmup` the decay at step t is
min(decay, 1 - (1 + t) ** (-2/3)), so the EMA does not stay near the initial weights.
`EmaHook` updates at `after_step`; with `ema.validate` it sets `state.eval_model`, so validation,
the checkpoints and the test score use the EMA. Its state goes into last.state.pt for resumes.

    decay = ema_decay(step, 0.9998, warmup=True)
    ema_update(list(ema_model.parameters()), list(model.parameters()), decay)   # your own loop
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.utils import ModelEmaV3

from imgtrain.engine.events import Hook
from imgtrain.strategies.base import Strategy, StrategyContext

WARMUP_POWER = 2 / 3   # timm's default; reaches decay 0.999 after ~31.6k steps
WARMUP_GAMMA = 1.0     # timm's default


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """The decay used at optimizer step `step` (1-based, counted after the step), as ModelEmaV3."""
    elapsed = max(0, step - 1)
    if elapsed == 0:
        return 0.0  # the first update copies the weights
    if not warmup:
        return decay
    return min(decay, 1 - (1 + elapsed / WARMUP_GAMMA) ** -WARMUP_POWER)


@torch.no_grad()
def ema_update(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], decay: float) -> None:
    """In place: ema = decay * ema + (1 - decay) * value for float tensors; others are copied."""
    for ema_value, value in zip(ema_tensors, tensors):
        if ema_value.is_floating_point():
            ema_value.lerp_(value.to(ema_value.dtype), 1.0 - decay)
        else:
            ema_value.copy_(value)


class EmaHook(Hook):
    """Keeps timm's ModelEmaV3 of `state.model`, updated after each optimizer step."""

    name = "ema"

    def __init__(self, decay: float, warmup: bool = True, validate: bool = True):
        self.decay, self.warmup, self.validate = decay, warmup, validate
        self.ema: ModelEmaV3 | None = None
        self.updates = 0                                 # optimizer steps averaged so far
        self._pending: dict[str, Any] | None = None   # state loaded before the model is known

    def fit_start(self, state: Any) -> None:
        # built once the Trainer has moved the model and loaded resumed weights
        self.ema = ModelEmaV3(state.model, decay=self.decay, use_warmup=self.warmup,
                              warmup_gamma=WARMUP_GAMMA, warmup_power=WARMUP_POWER)
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None
        if self.validate:
            state.eval_model = self.ema.module

    def after_step(self, state: Any) -> None:
        assert self.ema is not None, "built at fit_start"
        self.ema.update(state.model, step=state.step)
        self.updates += 1

    @property
    def module(self) -> torch.nn.Module:
        if self.ema is None:
            raise RuntimeError("the EMA is built when training starts (fit_start)")
        return self.ema.module

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return dict(self._pending) if self._pending is not None else {}
        weights = {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}
        return {"weights": weights, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is None:
            self._pending = state  # the Trainer restores hooks before fit_start builds the EMA
        else:
            self._apply(state)

    def _apply(self, state: dict[str, Any]) -> None:
        assert self.ema is not None, "called once the EMA is built"
        self.ema.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


class Ema(Strategy):
    name, section = "ema", "ema"

    def enabled(self, recipe: Any) -> bool:
        return recipe.ema.enabled

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        return [EmaHook(recipe.ema.decay, warmup=recipe.ema.warmup, validate=recipe.ema.validate)]


__all__ = ["Ema", "EmaHook", "ema_decay", "ema_update"]
