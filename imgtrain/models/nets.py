"""Small, fast CNNs for CPU training, registered in timm's registry.

`timm.create_model("imgtrain_cnn_small", num_classes=10, in_chans=1)` builds them like
any timm model, so one factory serves timm's nets and ours. They follow timm's model
interface (`forward_features`, `forward_head`, `get_classifier`, `reset_classifier`,
`group_matcher`) so transfer learning, freezing and Grad-CAM treat them like timm nets.

Shape: a stem conv, then stages of 3x3 conv-BN-ReLU blocks with 2x max-pooling between
stages, global average pooling, dropout and a linear classifier. VGG-style plain stacks
are the fastest per accuracy point at 8-64 px on a CPU (few, wide, dense convolutions).
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import nn
from timm.models import register_model, resolve_pretrained_cfg


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallConvNet(nn.Module):
    """A plain conv net: stem, `len(widths)` stages, pooled linear head."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128), depths: Sequence[int] = (1, 2, 2),
                 in_chans: int = 3, num_classes: int = 1000, drop_rate: float = 0.0,
                 global_pool: str = "avg"):
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} must have the same length")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self.stem = conv_bn_relu(in_chans, widths[0])
        stages = []
        previous = widths[0]
        for index, (width, depth) in enumerate(zip(widths, depths)):
            # pool at the start of every stage but the first: the stem keeps full resolution
            blocks: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if index > 0 else []
            for _ in range(depth):
                blocks.append(conv_bn_relu(previous, width))
                previous = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = previous
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(previous, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=w, reduction=2 ** i, module=f"stages.{i}") for i, w in enumerate(widths)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # no url or hf_hub_id: timm lists these nets as having no pretrained weights. first_conv and
    # classifier name the layers that starting weights adapt (input channels) and replace (class count).
    return dict(url="", num_classes=1000, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0,
                first_conv="stem.0", classifier="fc", **kwargs)


# read by timm's @register_model below (so it must come first): timm.get_pretrained_cfg(name) works
default_cfgs = {name: _cfg() for name in ("imgtrain_cnn_tiny", "imgtrain_cnn_small", "imgtrain_cnn_medium")}


def _create(name: str, widths: Sequence[int], depths: Sequence[int], pretrained: bool,
            **kwargs: Any) -> SmallConvNet:
    if pretrained:
        raise ValueError("imgtrain's own nets have no published pretrained weights; "
                         "start from a run folder or a .safetensors file instead")
    pretrained_cfg = resolve_pretrained_cfg(name, kwargs.pop("pretrained_cfg", None),
                                            kwargs.pop("pretrained_cfg_overlay", None))
    for key in ("cache_dir", "drop_path_rate"):
        kwargs.pop(key, None)  # timm's factory passes these to every model
    model = SmallConvNet(widths=widths, depths=depths, **kwargs)
    # what timm's build_model_with_cfg sets on its own models
    model.pretrained_cfg = model.default_cfg = pretrained_cfg.to_dict()
    return model


@register_model
def imgtrain_cnn_tiny(pretrained: bool = False, **kwargs: Any) -> SmallConvNet:
    """16-32-64 channels, ~25k parameters: tests and smoke runs."""
    return _create("imgtrain_cnn_tiny", (16, 32, 64), (1, 1, 1), pretrained, **kwargs)


@register_model
def imgtrain_cnn_small(pretrained: bool = False, **kwargs: Any) -> SmallConvNet:
    """32-64-128 channels, ~0.3M parameters: digits, Fashion-MNIST, small shapes on a CPU."""
    return _create("imgtrain_cnn_small", (32, 64, 128), (1, 2, 2), pretrained, **kwargs)


@register_model
def imgtrain_cnn_medium(pretrained: bool = False, **kwargs: Any) -> SmallConvNet:
    """64-128-256 channels, ~2M parameters: a stronger CPU net (e.g. a distillation teacher)."""
    return _create("imgtrain_cnn_medium", (64, 128, 256), (1, 2, 2), pretrained, **kwargs)


OUR_MODELS = ("imgtrain_cnn_tiny", "imgtrain_cnn_small", "imgtrain_cnn_medium")
