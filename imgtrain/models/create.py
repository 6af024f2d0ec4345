"""One factory for every model: `timm.create_model` with the data's classes and channels."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import timm
import torch

from imgtrain.config import ModelConfig
from imgtrain.models import nets  # noqa: F401  (registers our nets in timm's registry)
from imgtrain.models.nets import OUR_MODELS


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name, missing weights)."""


def create_model(cfg: ModelConfig, num_classes: int, in_chans: int) -> torch.nn.Module:
    """Build `cfg.name` with `num_classes` outputs taking `in_chans` input channels, randomly initialised.

    A new run's starting weights are loaded afterwards (`imgtrain.models.weights.load_initial_weights`)."""
    if not timm.is_model(cfg.name):
        import difflib
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " `imgtrain models PATTERN` lists them."
        raise ModelError(f"model.name: unknown model {cfg.name!r}.{hint}")
    try:
        return timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                 **model_kwargs(cfg))
    except TypeError as exc:
        raise ModelError(f"model.kwargs: {cfg.name} does not accept these arguments ({exc})") from None
    except ValueError as exc:  # an argument it takes, with a value it refuses (imgtrain nets' norm)
        raise ModelError(f"model.kwargs: {cfg.name}: {exc}") from None


def check_input_size(model: torch.nn.Module, name: str, in_chans: int, sizes: Iterable[int]) -> None:
    """One blank image through the model at each size it will see: a network that downsamples more than
    the images allow (or takes one size only, as a ViT does) fails here with a ModelError that says so,
    not mid-training with torch's message. Eval mode and no gradients: no statistics or RNG state change."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for size in sorted(set(sizes)):
                try:
                    model(torch.zeros(1, in_chans, size, size))
                except (RuntimeError, AssertionError, ValueError) as exc:
                    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise ModelError(
                        f"model.name: {name} cannot take {size}x{size} px images ({detail}). Give a larger "
                        "augment.img_size (and progressive stages), or a model that downsamples less "
                        "(imgtrain_cnn_small, resnet10t: `imgtrain models` lists them)") from None
    finally:
        model.train(was_training)


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The keyword arguments `timm.create_model` gets for `cfg` besides classes and channels."""
    kwargs = dict(cfg.kwargs)
    if cfg.drop_rate:
        kwargs["drop_rate"] = cfg.drop_rate
    if cfg.drop_path_rate > 0:
        # stochastic depth: timm nets with residual blocks take it (resnet, convnext, vit ...);
        # our plain nets have no residual branch to drop and ignore it
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    return kwargs


def list_models(pattern: str = "*") -> list[str]:
    """Our nets first, then timm's, matching a shell-style pattern."""
    ours = [name for name in OUR_MODELS if fnmatch.fnmatch(name, pattern)]
    theirs = [name for name in timm.list_models(pattern) if name not in OUR_MODELS]
    return ours + theirs


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class LogitOffset(torch.nn.Module):
    """A model whose logits get a fixed per-class offset (post-hoc logit adjustment, losses.py)."""

    def __init__(self, model: torch.nn.Module, offset: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("offset", offset.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float() + self.offset
