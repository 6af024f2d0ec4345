"""Small, fast CNNs for CPU training, registered in timm's registry.

`timm.create_model("imgtrain_cnn_small", num_classes=10, in_chans=1)` builds them, and they keep
timm's model contract (`forward_features`, `forward_head(pre_logits=...)`, `get_classifier`,
`reset_classifier`, `group_matcher`, `num_features`, `head_hidden_size`, `feature_info`,
`features_only=True`, TorchScript, FX), so transfer learning, Grad-CAM and timm's tools work.

A stem conv, stages of 3x3 conv-BN-ReLU blocks with 2x max-pooling between them, pooling, dropout,
a linear head: VGG-style plain stacks are the fastest per accuracy point at 8-64 px on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, register_model
from torch import nn

NORMS = ("batch", "group", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """batch: BatchNorm (statistics of each batch); group: GroupNorm of up to 8 groups (per image: the same
    with any batch size, as on several processes with small per-process batches); none: no normalisation."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, not {kind!r} (the norm entry of model.kwargs)")


def conv_bn_relu(in_channels: int, out_channels: int, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none"),
        norm_layer(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class SmallConvNet(nn.Module):
    """A plain conv net: stem, `len(widths)` stages, pooled linear head."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128), depths: Sequence[int] = (1, 2, 2),
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 global_pool: str = "avg", norm: str = "batch"):
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} must have the same length")
        self.drop_rate = drop_rate
        self.stem = conv_bn_relu(in_chans, widths[0], norm)
        stages = []
        previous = widths[0]
        for index, (width, depth) in enumerate(zip(widths, depths)):
            # pool at the start of every stage but the first: the stem keeps full resolution
            blocks: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if index > 0 else []
            for _ in range(depth):
                blocks.append(conv_bn_relu(previous, width, norm))
                previous = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # no hidden pre-logits layer: the head sees the pooled last stage, as in timm's ResNets
        self.num_features = self.head_hidden_size = previous
        self.head_drop = nn.Dropout(drop_rate)
        self._set_head(num_classes, global_pool)
        # timm's FeatureListNet (features_only=True) and Grad-CAM read this: one entry per stage,
        # reduction = total stride (stage 0 keeps the input size, each later one halves it)
        self.feature_info = [{"num_chs": width, "reduction": 2 ** index, "module": f"stages.{index}"}
                             for index, width in enumerate(widths)]

    def _set_head(self, num_classes: int, global_pool: str) -> None:
        # timm's pooling module (no parameters): `global_pool` means what it does for timm nets
        if not global_pool and num_classes > 0:
            raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, not {num_classes}: "
                             "a linear head takes pooled features")
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        # feat_mult: "catavgmax" concatenates two poolings, doubling the head's inputs
        in_features = self.num_features * self.global_pool.feat_mult()
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head with `num_classes` outputs; 0 leaves none, so the model returns pooled features
        (or, with global_pool="", the last feature map)."""
        self._set_head(num_classes, self.global_pool.pool_type if global_pool is None else global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # no url or hf_hub_id: timm lists these nets as having no pretrained weights. first_conv and
    # classifier name the layers that starting weights adapt (input channels) and replace (class count).
    return dict(url="", num_classes=1000, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0,
                first_conv="stem.0", classifier="fc", **kwargs)


# read by timm's @register_model below (so it must come first): timm.get_pretrained_cfg(name) works
default_cfgs = {name: _cfg() for name in ("imgtrain_cnn_tiny", "imgtrain_cnn_small", "imgtrain_cnn_medium")}


def _create(name: str, default_widths: Sequence[int], default_depths: Sequence[int], pretrained: bool,
            **kwargs: Any) -> SmallConvNet:
    # the recipe's model.kwargs may reshape a named net (model.kwargs: {widths: [32, 64, 128], depths: [0, 1, 1]})
    widths = tuple(kwargs.pop("widths", default_widths))
    depths = tuple(kwargs.pop("depths", default_depths))
    if pretrained:
        raise ValueError("imgtrain's own nets have no published pretrained weights; "
                         "start from a run folder or a .safetensors file instead")
    # timm's builder sets pretrained_cfg and wraps features_only=True in a FeatureListNet, which
    # walks top-level children: flatten_sequential lets it stop after any stage. drop_path_rate is
    # dropped: a plain net has no residual branch.
    feature_cfg = {"flatten_sequential": True, "out_indices": tuple(range(len(widths)))}
    return build_model_with_cfg(SmallConvNet, name, pretrained, widths=widths, depths=depths,
                                feature_cfg=feature_cfg, kwargs_filter=("drop_path_rate",), **kwargs)


@register_model
def imgtrain_cnn_tiny(pretrained: bool = False, **kwargs: Any) -> SmallConvNet:
    """16-32-64 channels, ~26k parameters: tests and smoke runs."""
    return _create("imgtrain_cnn_tiny", (16, 32, 64), (1, 1, 1), pretrained, **kwargs)


@register_model
def imgtrain_cnn_small(pretrained: bool = False, **kwargs: Any) -> SmallConvNet:
    """32-64-128 channels, ~0.3M parameters: digits, Fashion-MNIST, small shapes on a CPU."""
    return _create("imgtrain_cnn_small", (32, 64, 128), (1, 2, 2), pretrained, **kwargs)


@register_model
def imgtrain_cnn_medium(pretrained: bool = False, **kwargs: Any) -> SmallConvNet:
    """64-128-256 channels, ~1.1M parameters: a stronger CPU net (e.g. a distillation teacher)."""
    return _create("imgtrain_cnn_medium", (64, 128, 256), (1, 2, 2), pretrained, **kwargs)


OUR_MODELS = ("imgtrain_cnn_tiny", "imgtrain_cnn_small", "imgtrain_cnn_medium")
