"""Test-time augmentation: predict each image as several views and merge the predictions
(README "Test-time augmentation" has what each eval.tta entry adds, the merge rules, the recipe
keys and the measurements).

    settings = tta_config_for(recipe, ["hflip", "five_crop:0.8"])    # or True: the recipe's eval.tta
    model = TTAModel(trained_model, settings)     # batch -> merged logits, like the model itself
    views = tta_views(batch, ["hflip"])           # [batch, flipped batch]
    logits = merge_predictions([net(v) for v in views], "mean_probs")

Views act on the transformed batch (N, C, H, W) on its device, all images at once, and keep its
size. The original batch is always the first view; a view equal to one already there is not run
twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import center_crop

from imgtrain.config import RecipeError
from imgtrain.tta_views import TTAView, parse_tta_view

DEFAULT_VIEWS = ("hflip",)  # tta=True on a recipe whose eval.tta is empty
MERGE_RULES = {"mean_probs": "mean of probabilities", "mean_logits": "mean of logits", "max": "max probability"}
RATIO = (3 / 4, 4 / 3)  # random: aspect-ratio range of the crops (torchvision's RandomResizedCrop default)


# ----------------------------------------------------------------------------- the views as operations

@dataclass(frozen=True)
class ViewOp:
    """One view: a transform of the whole batch that keeps its size. Sizes stay fractions of the
    side until applied, so one ViewOp serves any input size.

    kind: identity | flip (the axes `dims`) | crop (`box` (top, left, height, width), or the
    five_crop `corner` of side `fraction`; `pre_flip` / `post_flip`: hflip before / after) |
    scale (`factor`) | shift (`shift` (dy, dx): pixels when `pixels`, else fractions of the side)"""
    kind: str
    dims: tuple[int, ...] = ()
    fraction: float = 1.0
    corner: str = ""
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    pre_flip: bool = False
    post_flip: bool = False
    factor: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    pixels: bool = False

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return batch
        if self.kind == "flip":
            return torch.flip(batch, dims=self.dims)
        if self.kind == "crop":
            return _crop_view(batch, self)
        if self.kind == "scale":
            return scale_batch(batch, self.factor)
        if self.kind == "shift":
            height, width = batch.shape[-2:]
            dy, dx = self.shift
            if not self.pixels:
                dy, dx = math.copysign(round(abs(dy) * height), dy), math.copysign(round(abs(dx) * width), dx)
            return shift_batch(batch, int(dy), int(dx))
        raise ValueError(f"unknown view kind {self.kind!r}")

    def is_identity(self) -> bool:
        return (self.kind == "identity" or (self.kind == "scale" and self.factor == 1.0)
                or (self.kind == "shift" and self.shift == (0.0, 0.0)))


def five_crop_boxes(height: int, width: int, fraction: float) -> dict:
    """corner -> (top, left, crop height, crop width) in pixels, as torchvision's five_crop places them."""
    ch, cw = max(1, round(fraction * height)), max(1, round(fraction * width))
    centre_top, centre_left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
    return {"tl": (0, 0, ch, cw), "tr": (0, width - cw, ch, cw), "bl": (height - ch, 0, ch, cw),
            "br": (height - ch, width - cw, ch, cw), "center": (centre_top, centre_left, ch, cw)}


def resize_batch(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a batch (antialiased when shrinking, as torchvision's resize)."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    shrinking = size[0] < batch.shape[-2] or size[1] < batch.shape[-1]
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def scale_batch(batch: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom about the centre keeping the size: resize by `factor`, then centre-crop (factor > 1)
    or zero-pad (factor < 1) back, as torchvision's center_crop does."""
    height, width = batch.shape[-2:]
    if factor == 1.0:
        return batch
    resized = resize_batch(batch, (max(1, round(factor * height)), max(1, round(factor * width))))
    return center_crop(resized, [height, width])


def shift_batch(batch: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move the content dy pixels down and dx right (negative: up / left); zeros fill what is uncovered."""
    if dy == 0 and dx == 0:
        return batch
    height, width = batch.shape[-2:]
    padded = F.pad(batch, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + height, left:left + width]


def _crop_view(batch: torch.Tensor, op: ViewOp) -> torch.Tensor:
    x = torch.flip(batch, dims=(-1,)) if op.pre_flip else batch
    height, width = x.shape[-2:]
    if op.corner:
        top, left, ch, cw = five_crop_boxes(height, width, op.fraction)[op.corner]
    else:
        ft, fl, fh, fw = op.box
        ch, cw = max(1, min(height, round(fh * height))), max(1, min(width, round(fw * width)))
        top, left = min(int(ft * height), height - ch), min(int(fl * width), width - cw)
    x = resize_batch(x[..., top:top + ch, left:left + cw], (height, width))
    return torch.flip(x, dims=(-1,)) if op.post_flip else x


def _random_ops(view: TTAView) -> list[ViewOp]:
    """`view.value` random resized crops (+ flips), drawn once from a generator seeded with view.seed."""
    generator = torch.Generator().manual_seed(view.seed)
    ops = []
    low, high = view.area
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(view.value):
        values = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
        area = low + (high - low) * values[0]
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * values[1])
        fw, fh = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
        top, left = (1.0 - fh) * values[2], (1.0 - fw) * values[3]
        ops.append(ViewOp("crop", box=(top, left, fh, fw), post_flip=view.flip and values[4] < 0.5))
    return ops


def view_ops(view: TTAView) -> list[ViewOp]:
    """The operations one eval.tta entry stands for (README "Test-time augmentation" has the table)."""
    name, value = view.name, view.value
    if name == "identity":
        return [ViewOp("identity")]
    if name in ("hflip", "vflip"):
        return [ViewOp("flip", dims=(-1,) if name == "hflip" else (-2,))]
    if name in ("five_crop", "ten_crop"):
        corners = ("tl", "tr", "bl", "br", "center")
        flips = (False, True) if name == "ten_crop" else (False,)
        return [ViewOp("crop", fraction=value, corner=c, pre_flip=f) for f in flips for c in corners]
    if name == "scale":
        return [ViewOp("scale", factor=float(f)) for f in value]
    if name == "translate":
        pixels = isinstance(value, int)
        d = float(value)
        return [ViewOp("shift", shift=s, pixels=pixels) for s in ((0.0, d), (0.0, -d), (d, 0.0), (-d, 0.0))]
    if name == "random":
        return _random_ops(view)
    raise ValueError(f"unknown view {name!r}")


def as_views(views: TTAConfig | Sequence[Any] | str) -> tuple[TTAView, ...]:
    """Parsed views from a TTAConfig, a list of specs (strings, mappings, TTAView) or a
    comma-separated string."""
    if isinstance(views, TTAConfig):
        return views.views
    if isinstance(views, str):
        views = [part for part in views.split(",") if part.strip()]
    parsed = []
    for index, spec in enumerate(views):
        try:
            parsed.append(spec if isinstance(spec, TTAView) else parse_tta_view(spec))
        except ValueError as exc:
            raise RecipeError(f"view {index + 1} ({spec!r}): {exc}", key="--tta") from None
    return tuple(parsed)


def build_ops(views: TTAConfig | Sequence[Any] | str) -> list[ViewOp]:
    """The original batch first, then every view's operations, each distinct one once."""
    ops = [ViewOp("identity")]
    for view in as_views(views):
        for op in view_ops(view):
            op = ViewOp("identity") if op.is_identity() else op
            if op not in ops:
                ops.append(op)
    return ops


# ----------------------------------------------------------------------------- pure functions

def iter_views(batch: torch.Tensor, views: TTAConfig | Sequence[Any] | str) -> Iterator[torch.Tensor]:
    """The views of a batch one at a time (only one extra copy of the batch alive at once)."""
    for op in build_ops(views):
        yield op(batch)


def tta_views(batch: torch.Tensor, views: TTAConfig | Sequence[Any] | str) -> list[torch.Tensor]:
    """Every view of a (N, C, H, W) batch, the batch itself first; each view is (N, C, H, W)."""
    return list(iter_views(batch, views))


def merge_predictions(logits_list: Sequence[torch.Tensor], rule: str = "mean_probs") -> torch.Tensor:
    """Merged logits (N, K) of the views' logits, by `rule` (see MERGE_RULES), in float32."""
    if rule not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {rule!r}; rules: {', '.join(MERGE_RULES)}")
    stacked = torch.stack([z.float() for z in logits_list])  # (views, N, K)
    if rule == "mean_logits":
        return stacked.mean(dim=0)
    log_probs = F.log_softmax(stacked, dim=-1)
    if rule == "mean_probs":
        return torch.logsumexp(log_probs, dim=0) - math.log(stacked.shape[0])
    return log_probs.max(dim=0).values


# ----------------------------------------------------------------------------- settings and the model

@dataclass(frozen=True)
class TTAConfig:
    """What TTAModel does: the views (parsed eval.tta entries) and the merge rule."""
    views: tuple[TTAView, ...] = field(default_factory=tuple)
    merge: str = "mean_probs"

    def ops(self) -> list[ViewOp]:
        return build_ops(self.views)

    @property
    def passes(self) -> int:
        """Forward passes per batch: one per distinct view, the original included."""
        return len(self.ops())

    def describe(self) -> str:
        """e.g. "hflip + five_crop(0.875) (7 views), mean of probabilities"."""
        names = " + ".join(v.label() for v in self.views) or "identity"
        return f"{names} ({self.passes} views), {MERGE_RULES[self.merge]}"


@overload
def tta_config_for(recipe: Any, tta: Literal[True] = True) -> TTAConfig: ...
@overload
def tta_config_for(recipe: Any, tta: Any = True) -> TTAConfig | None: ...
def tta_config_for(recipe: Any, tta: Any = True) -> TTAConfig | None:
    """The TTAConfig for a model trained with `recipe` (merge rule: its eval.tta_merge); None when
    `tta` is None or False. tta: True (the recipe's eval.tta, or DEFAULT_VIEWS), view specs (a list
    or a comma-separated string), or a TTAConfig (used as it is)."""
    if tta is None or tta is False:
        return None
    if isinstance(tta, TTAConfig):
        return tta
    eval_cfg = getattr(recipe, "eval", None)
    merge = getattr(eval_cfg, "tta_merge", "mean_probs")
    specs: Sequence[Any] | str
    if tta is True:
        specs = list(getattr(eval_cfg, "tta", None) or []) or list(DEFAULT_VIEWS)
    elif isinstance(tta, (str, list, tuple)):
        specs = tta
    else:
        raise TypeError(f"tta: expected True, a list of views or a TTAConfig, got {tta!r}")
    return TTAConfig(views=as_views(specs), merge=merge)


class TTAModel(nn.Module):
    """A model seen through test-time augmentation: (N, C, H, W) batch -> merged logits (N, K).
    Always in eval mode and without gradients (`train()` cannot switch it), so it can stand in for
    a trained model, a distillation teacher included. The views run one after another."""

    def __init__(self, model: nn.Module, settings: TTAConfig | Sequence[Any] | str, merge: str | None = None):
        super().__init__()
        if not isinstance(settings, TTAConfig):
            settings = TTAConfig(views=as_views(settings), merge=merge or "mean_probs")
        elif merge is not None:
            settings = TTAConfig(views=settings.views, merge=merge)
        if settings.merge not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {settings.merge!r}; rules: {', '.join(MERGE_RULES)}")
        self.model = model
        self.settings = settings
        self.view_ops = settings.ops()
        self.train(False)

    def train(self, mode: bool = True) -> TTAModel:
        return super().train(False)

    def describe(self) -> str:
        return self.settings.describe()

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if len(self.view_ops) == 1:  # identity only: exactly the plain model
            return self.model(inputs)
        return merge_predictions([self.model(op(inputs)) for op in self.view_ops], self.settings.merge)


__all__ = ["DEFAULT_VIEWS", "MERGE_RULES", "TTAConfig", "TTAModel", "ViewOp", "build_ops", "five_crop_boxes",
           "iter_views", "merge_predictions", "resize_batch", "scale_batch", "shift_batch", "tta_config_for",
           "tta_views", "view_ops"]
