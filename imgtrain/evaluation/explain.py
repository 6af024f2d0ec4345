"""Explanations: where in an image a trained classifier looked, as a Grad-CAM heatmap (the
grad-cam package's methods, CAM_METHODS; README "Explanations" compares them).

    records = explain("runs/shapes", ["cat.png", "photos/"], method=["gradcam", "eigencam"])
    heat = cam_heatmaps(model, batch)            # (N, H, W) in [0, 1], any model, mid-training too
    png = overlay(image_uint8, heat[0])          # H x W x 3 uint8, the heatmap over the image

The default layer is the last convolutional stage (`find_target_layer`); ViT tokens are laid out
on the patch grid (`TokensToGrid`). `cam_heatmaps` leaves the model exactly as it found it, so the
run report can call it in the middle of training.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_grad_cam
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from imgtrain.data import BadImageError, load_image
from imgtrain.data.transforms import denormalize as data_denormalize
from imgtrain.io import atomic_write_bytes
from imgtrain.models import LogitOffset, ModelError
from imgtrain.models.trained import load_trained

# name -> grad-cam class; every entry runs on the CPU with imgtrain's nets and timm CNNs and ViTs
CAM_METHODS: dict[str, type] = {
    "gradcam": pytorch_grad_cam.GradCAM,
    "gradcam++": pytorch_grad_cam.GradCAMPlusPlus,
    "hirescam": pytorch_grad_cam.HiResCAM,
    "xgradcam": pytorch_grad_cam.XGradCAM,
    "layercam": pytorch_grad_cam.LayerCAM,
    "eigencam": pytorch_grad_cam.EigenCAM,
    "eigengradcam": pytorch_grad_cam.EigenGradCAM,
    "scorecam": pytorch_grad_cam.ScoreCAM,
    "ablationcam": pytorch_grad_cam.AblationCAM,
}

PANEL_SIZE = 224        # px: the longer side of each half of a written PNG
BATCH_SIZE = 16         # images per forward/backward pass in `explain`
_OVERLAY_ALPHA = 0.5    # share of the heatmap colour in an overlay pixel


class ExplainError(ModelError):
    """A layer, method or class that explain cannot use (a ModelError: the CLI exits with 2)."""


# ----------------------------------------------------------------------------- models and layers

def network(model: nn.Module) -> nn.Module:
    """The classifier inside the wrappers imgtrain puts around it (DDP, torch.compile,
    LogitOffset): the module whose names `--layer` and `--list-layers` use."""
    model = _forward_model(model)
    return model.model if isinstance(model, LogitOffset) else model


def _forward_model(model: nn.Module) -> nn.Module:
    # DDP and torch.compile wrap the same modules; hooks must see eager forwards of the real ones.
    # LogitOffset stays: it is part of what the model predicts (it does not change gradients).
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _model_name(net: nn.Module) -> str:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(net).__name__


def _is_vit(net: nn.Module) -> bool:
    return (isinstance(getattr(net, "blocks", None), (nn.Sequential, nn.ModuleList)) and hasattr(net, "patch_embed")
            and isinstance(getattr(net, "num_prefix_tokens", None), int))


def find_target_layer(model: nn.Module, example: torch.Tensor | None = None) -> tuple[str, nn.Module]:
    """(name, module) of the layer to explain: for a ViT `blocks[-1].norm1` (every patch token still
    reaches the output through attention there), for timm CNNs and imgtrain's nets the last
    `feature_info` entry, else the last module with a spatial (N, C, H, W) output on `example`."""
    net = network(model)
    if _is_vit(net):
        blocks: Any = net.blocks  # an nn.Sequential or nn.ModuleList (_is_vit)
        name = f"blocks.{len(blocks) - 1}"
        if isinstance(getattr(net.get_submodule(name), "norm1", None), nn.Module):
            name += ".norm1"
        return name, net.get_submodule(name)
    info = getattr(net, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        with contextlib.suppress(AttributeError):
            return info[-1]["module"], net.get_submodule(info[-1]["module"])
    shapes = _probe_shapes(model, example if example is not None else _example_input(net))
    spatial = [name for name, shape in shapes.items() if name and len(shape) == 4]
    wide = [name for name in spatial if shapes[name][2] * shapes[name][3] > 1]  # a 1x1 map shows nothing
    if not spatial:
        raise ExplainError(f"{_model_name(net)}: no module gives a spatial (N, C, H, W) activation to explain; "
                           "choose one with --layer (`imgtrain explain CHECKPOINT --list-layers` lists them)")
    name = (wide or spatial)[-1]
    return name, net.get_submodule(name)


def resolve_layer(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """(name, module) for a dotted module name such as `stages.2` or `blocks.11.norm1`."""
    net = network(model)
    names = [n for n, _ in net.named_modules() if n]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ExplainError(f"--layer {name!r}: {_model_name(net)} has no module of that name.{hint} "
                           "`imgtrain explain CHECKPOINT --list-layers` lists the layers with their output shapes")
    return name, net.get_submodule(name)


def layer_candidates(model: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, type, output shape) of the modules worth explaining, in forward order: convolutions,
    norms and blocks/stages whose output is spatial (or, in a ViT, patch tokens)."""
    net = network(model)
    shapes = _probe_shapes(model, example if example is not None else _example_input(net))
    tokens = _is_vit(net)
    modules = dict(net.named_modules())
    rows = []
    for name, shape in shapes.items():
        module = modules[name]  # every name _probe_shapes records is one of these
        kind = type(module).__name__
        useful = isinstance(module, nn.modules.conv._ConvNd) or "Norm" in kind or len(list(module.children())) > 0
        if name and useful and (len(shape) == 4 or (tokens and len(shape) == 3)):
            rows.append((name, kind, tuple(shape)))
    return rows


def _example_input(net: nn.Module) -> torch.Tensor:
    """A dummy batch of one image for shape probes: the net's input channels and size."""
    first_conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    size: Any = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if size is None:
        size = ((getattr(net, "pretrained_cfg", None) or {}).get("input_size") or (3, 32, 32))[1:]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    device = next(net.parameters()).device
    return torch.zeros(1, channels, max(int(height), 8), max(int(width), 8), device=device)


def _probe_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape of every module of `network(model)` on `example`, in the order they finish
    (eval mode, no gradients; the model is left as it was)."""
    net, forward = network(model), _forward_model(model)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def recorder(name: str) -> Callable:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                shapes.pop(name, None)  # a module run twice counts where it last finished
                shapes[name] = tuple(output.shape)
        return record

    with preserved_state(forward):
        try:
            for name, module in net.named_modules():
                handles.append(module.register_forward_hook(recorder(name)))
            forward.eval()
            with torch.no_grad():
                forward(example[:1].to(next(net.parameters()).device))
        finally:
            for handle in handles:
                handle.remove()
    return shapes


# ----------------------------------------------------------------------------- reshaping activations

class TokensToGrid:
    """ViT tokens (N, prefix + gh*gw, C) -> (N, C, gh, gw): drops the class/register/distillation
    tokens and lays the patch tokens out on the patch grid, row by row (timm's order)."""

    def __init__(self, num_prefix_tokens: int, grid: tuple[int, int]):
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.num_prefix_tokens:, :]
        return patches.reshape(patches.shape[0], self.grid[0], self.grid[1], patches.shape[2]).permute(0, 3, 1, 2)


class ChannelsLastToFirst:
    """(N, H, W, C) stage outputs (Swin and other NHWC timm models) -> (N, C, H, W)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def _token_grid(net: nn.Module, tokens: int, input_hw: tuple[int, int], exact: bool = False) -> tuple[int, int]:
    """The patch grid of `tokens` patch tokens for an input of `input_hw` pixels (`exact`: only the
    patch embedding's grid, no square guess)."""
    patch_embed = net.patch_embed
    grid: Any = None
    # timm: the grid of this input size (getattr: Module's stubs type attributes as Tensor | Module)
    dynamic_feat_size = getattr(patch_embed, "dynamic_feat_size", None)
    if dynamic_feat_size is not None:
        with contextlib.suppress(Exception):
            grid = tuple(dynamic_feat_size(input_hw))
    if grid is None or grid[0] * grid[1] != tokens:
        grid = tuple(getattr(patch_embed, "grid_size", None) or (0, 0))
    if grid[0] * grid[1] != tokens:
        side = math.isqrt(max(tokens, 0))
        if exact or side * side != tokens:
            raise ExplainError(f"{_model_name(net)}: cannot lay {tokens} patch tokens out on a grid for a "
                               f"{input_hw[0]}x{input_hw[1]} input; choose another --layer")
        grid = (side, side)
    return int(grid[0]), int(grid[1])


def _reshape_for(net: nn.Module, layer: nn.Module, shape: tuple[int, ...], input_hw: tuple[int, int],
                 name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The grad-cam reshape_transform that makes the layer's output (N, C, H, W), or None."""
    if len(shape) == 3 and hasattr(net, "patch_embed"):
        prefix = int(getattr(net, "num_prefix_tokens", 0) or 0)
        with contextlib.suppress(ExplainError):  # patch_embed's own output has no prefix tokens yet
            return TokensToGrid(0, _token_grid(net, shape[1], input_hw, exact=True))
        return TokensToGrid(prefix, _token_grid(net, shape[1] - prefix, input_hw))
    if len(shape) == 4:
        nhwc = getattr(net, "output_fmt", "NCHW") == "NHWC" and not isinstance(layer, nn.modules.conv._ConvNd)
        return ChannelsLastToFirst() if nhwc else None
    raise ExplainError(f"--layer {name!r}: its output has shape {tuple(shape)}, not a spatial (N, C, H, W) map or "
                       "ViT patch tokens, so there is nothing to draw; choose a convolutional stage "
                       "(`imgtrain explain CHECKPOINT --list-layers` lists them)")


# ----------------------------------------------------------------------------- heatmaps

@dataclass
class TargetLayer:
    """The layer a heatmap is taken from, as cam_heatmaps uses it."""
    name: str                       # dotted module name in `network(model)`
    module: nn.Module
    shape: tuple[int, ...]          # its output for one input image
    reshape: Callable[[torch.Tensor], torch.Tensor] | None  # to (N, C, H, W) for grad-cam; None: already


def target_layer(model: nn.Module, inputs: torch.Tensor, layer: str | None = None) -> TargetLayer:
    """The named layer (`resolve_layer`) or the automatic one (`find_target_layer`), with its output
    shape on `inputs[:1]` and the reshape that lays that output out as (N, C, H, W)."""
    net = network(model)
    inputs = inputs.detach().to(next(net.parameters()).device)
    name, module = find_target_layer(model, inputs[:1]) if layer is None else resolve_layer(model, layer)
    shape = _probe_shapes(model, inputs[:1]).get(name)
    if shape is None:
        raise ExplainError(f"--layer {name!r}: {_model_name(net)} does not run this module in its forward pass; "
                           "choose another (`imgtrain explain CHECKPOINT --list-layers`)")
    reshape = _reshape_for(net, module, shape, (inputs.shape[-2], inputs.shape[-1]), name)
    return TargetLayer(name=name, module=module, shape=shape, reshape=reshape)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Put back, on exit, what explaining touches: every module's train/eval mode, every
    parameter's requires_grad and .grad (grad-cam calls model.zero_grad())."""
    modes = [(module, module.training) for module in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad, grad in params:
            param.requires_grad_(requires_grad)
            param.grad = grad


def cam_heatmaps(model: nn.Module, inputs: torch.Tensor, target_classes: int | Sequence[int] | None = None,
                 method: str = "gradcam", layer: str | None = None) -> np.ndarray:
    """Heatmaps (N, H, W) float32 in [0, 1] for a batch already transformed for the model.

    target_classes: one class index for all images, one per image, or None for each image's
    predicted class. method: a CAM_METHODS name. layer: a module name (`resolve_layer`), or None
    for `find_target_layer`'s choice. The model is left exactly as it was (`preserved_state`).
    """
    if method not in CAM_METHODS:
        raise ExplainError(f"unknown explanation method {method!r}; choose from {', '.join(CAM_METHODS)}")
    if inputs.ndim != 4:
        raise ExplainError(f"expected a batch of images (N, C, H, W), got shape {tuple(inputs.shape)}")
    net, forward = network(model), _forward_model(model)
    inputs = inputs.detach().to(next(net.parameters()).device)
    chosen = target_layer(model, inputs, layer)
    targets = _targets(target_classes, len(inputs))
    with preserved_state(forward):
        for param in forward.parameters():
            # gradients are only needed with respect to the layer's activations: the input
            # requires grad instead, so no parameter .grad is written and frozen nets work too
            param.requires_grad_(False)
        extra: dict[str, Any] = {}
        if method == "ablationcam":  # a fresh ablation layer each call (grad-cam's default is shared)
            vit = isinstance(chosen.reshape, TokensToGrid)
            extra["ablation_layer"] = AblationLayerVit() if vit else AblationLayer()
        cam = CAM_METHODS[method](model=forward, target_layers=[chosen.module], reshape_transform=chosen.reshape,
                                 **extra)
        try:
            # the report may call this inside torch.no_grad() or autocast: grad-cam needs gradients,
            # and float32 activations (it converts them to numpy, which has no bfloat16)
            with torch.enable_grad(), torch.autocast(inputs.device.type, enabled=False):
                heat = cam(input_tensor=inputs.float().clone().requires_grad_(True), targets=targets)
        finally:
            # not `with cam:`: grad-cam's __exit__ swallows IndexError; release removes its hooks
            cam.activations_and_grads.release()
            if net.get_submodule(chosen.name) is not chosen.module:  # ablationcam swaps the layer in and out
                parent, _, child = chosen.name.rpartition(".")
                setattr(net.get_submodule(parent), child, chosen.module)
    return np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0.0, 1.0)


def _targets(target_classes: int | Sequence[int] | None, count: int) -> list[Any] | None:
    if target_classes is None:
        return None
    if isinstance(target_classes, (int, np.integer)):
        target_classes = [int(target_classes)] * count
    classes = [int(c) for c in target_classes]  # a list, an array or a 1-d tensor
    if len(classes) != count:
        raise ExplainError(f"{len(classes)} target classes for {count} images")
    return [ClassifierOutputTarget(c) for c in classes]


# ----------------------------------------------------------------------------- pictures

def _to_hwc_rgb(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 H x W x 3 from H x W, H x W x C or C x H x W (C x H x W when the first axis is 1 or 3
    and the last is not); grey becomes RGB."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"expected an image H x W, H x W x C or C x H x W, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] != 3:
        array = np.repeat(array.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(array, 0, 255).astype(np.uint8)


def _resize_heat(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float heatmap resized bilinearly to (height, width)."""
    if heat.shape == size:
        return heat.astype(np.float32)
    resized = Image.fromarray(heat.astype(np.float32), mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def overlay(image: np.ndarray | torch.Tensor, heatmap: np.ndarray, alpha: float = _OVERLAY_ALPHA) -> np.ndarray:
    """The heatmap (values in [0, 1], resized to the image when it differs) coloured with the jet
    map over a uint8 image (H x W, H x W x C or C x H x W); uint8 H x W x 3."""
    from matplotlib import colormaps  # the colormap only: no figure, no backend

    rgb = _to_hwc_rgb(image)
    heat = _resize_heat(np.asarray(heatmap, dtype=np.float32), rgb.shape[:2])
    colour = colormaps["jet"](heat)[..., :3] * 255.0
    mixed = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colour
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def denormalize(inputs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Transformed images (N, C, H, W) back to uint8 (N, H, W, C): the images as the model sees them."""
    return data_denormalize(inputs, mean, std).permute(0, 2, 3, 1).numpy()


def render_panel(image: np.ndarray, heatmap: np.ndarray, title: Sequence[str], size: int = PANEL_SIZE) -> Image.Image:
    """The image (nearest-neighbour upscaled, so its pixels stay visible) next to its overlay,
    each `size` px on the longer side, under a title of one or more lines."""
    rgb = _to_hwc_rgb(image)
    height, width = rgb.shape[:2]
    scale = size / max(height, width)
    shown = (max(1, round(width * scale)), max(1, round(height * scale)))
    big = np.asarray(Image.fromarray(rgb).resize(shown, Image.Resampling.NEAREST))
    mixed = overlay(big, heatmap)
    try:
        font: Any = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the small bitmap font only
        font = ImageFont.load_default()
    line_height, gap = 17, 8
    band = line_height * len(title) + gap
    panel = Image.new("RGB", (2 * shown[0] + 3 * gap, shown[1] + band + gap), "white")
    draw = ImageDraw.Draw(panel)
    for index, line in enumerate(title):
        draw.text((gap, gap // 2 + index * line_height), line, fill="black", font=font)
    panel.paste(Image.fromarray(big), (gap, band))
    panel.paste(Image.fromarray(mixed), (2 * gap + shown[0], band))
    return panel


# ----------------------------------------------------------------------------- explain files

@dataclass
class ExplainRecord:
    """One image explained with one method (or the reason it could not be)."""
    path: str
    method: str
    png: str | None = None
    explained_class: str | None = None
    predicted_class: str | None = None
    probability: float | None = None     # of the predicted class
    error: str = ""


def resolve_class(class_: int | str | None, classes: Sequence[str]) -> int | None:
    """A class name, or an index 0..N-1 (a name wins when a class is called e.g. "3"); None stays None."""
    if class_ is None:
        return None
    text = str(class_)
    if text in classes:
        return list(classes).index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(classes):
        return int(text)
    shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
    raise ExplainError(f"--class {text!r}: not a class of this model; give a name ({shown}) "
                       f"or an index 0..{len(classes) - 1}")


def _methods(method: str | Sequence[str]) -> list[str]:
    names = [method] if isinstance(method, str) else list(method)
    names = [part.strip() for name in names for part in name.split(",") if part.strip()]
    unknown = [name for name in names if name not in CAM_METHODS]
    if unknown or not names:
        raise ExplainError(f"--method {', '.join(unknown) or '(none)'}: unknown; choose from {', '.join(CAM_METHODS)}")
    return list(dict.fromkeys(names))


def _png_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct file stem per image: its own, then -2, -3 ... when two images share one."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


def explain(target: str | Path, images: Sequence[str | Path], method: str | Sequence[str] = "gradcam",
            class_: int | str | None = None, layer: str | None = None,
            output_dir: str | Path = "explain", device: str = "cpu") -> list[ExplainRecord]:
    """Write `OUTPUT_DIR/<image stem>_<method>.png` (`render_panel`) for every image and method.

    target: a run folder or .safetensors file. images: files, folders or CSV manifests (a `path`
    column). class_: a name or index; default: each image's predicted class. An image that cannot
    be decoded gets a record with `error`; the others still run.
    """
    from imgtrain.evaluation.predict import collect_paths

    methods = _methods(method)
    loaded = load_trained(target, device=device)
    class_index = resolve_class(class_, loaded.classes)
    if layer is not None:
        resolve_layer(loaded.model, layer)  # a wrong name stops before any image is read
    transform = loaded.eval_transform()
    paths = collect_paths(images)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[ExplainRecord] = []
    stems = _png_stems(paths)
    for start in range(0, len(paths), BATCH_SIZE):
        # records in the order the images were given: image by image, its methods in order
        slots: list[list[ExplainRecord]] = []
        good: list[tuple[Path, str, list[ExplainRecord]]] = []
        tensors: list[torch.Tensor] = []
        for path, stem in zip(paths[start:start + BATCH_SIZE], stems[start:start + BATCH_SIZE]):
            slots.append([])
            try:
                tensors.append(transform(load_image(path, loaded.channels)))
                good.append((path, stem, slots[-1]))
            except BadImageError as exc:
                slots[-1].extend(ExplainRecord(path=str(path), method=name, error=exc.reason) for name in methods)
        if good:
            _explain_batch(loaded, torch.stack(tensors).to(device), good, methods, class_index, layer, out_dir)
        records.extend(record for slot in slots for record in slot)
    return records


def _explain_batch(loaded: Any, batch: torch.Tensor, good: Sequence[tuple[Path, str, list[ExplainRecord]]],
                   methods: Sequence[str], class_index: int | None, layer: str | None, out_dir: Path) -> None:
    """Heatmaps and PNGs for one batch of decoded images; appends each image's records to its list."""
    with torch.no_grad():
        probs = loaded.model(batch).float().softmax(dim=1).cpu()
    predicted = probs.argmax(dim=1)
    explained = predicted if class_index is None else torch.full_like(predicted, class_index)
    shown = denormalize(batch, loaded.mean, loaded.std)
    heats = {name: cam_heatmaps(loaded.model, batch, explained.tolist(), method=name, layer=layer) for name in methods}
    for i, (path, stem, records) in enumerate(good):
        pred, want = int(predicted[i]), int(explained[i])
        for name in methods:
            png = out_dir / f"{stem}_{name}.png"
            record = ExplainRecord(path=str(path), method=name, explained_class=loaded.classes[want],
                                   predicted_class=loaded.classes[pred], probability=float(probs[i, pred]),
                                   png=str(png))
            title = [f"{path.name}  ({name})",
                     (f"predicted {record.predicted_class} {record.probability:.1%}   "
                      f"explained {record.explained_class}")]
            buffer = io.BytesIO()
            render_panel(shown[i], heats[name][i], title).save(buffer, format="PNG")
            atomic_write_bytes(png, buffer.getvalue())  # never a half-written PNG
            records.append(record)


def list_layers(target: str | Path, device: str = "cpu") -> list[str]:
    """`imgtrain explain CHECKPOINT --list-layers`: one line per candidate layer, the automatic
    choice marked."""
    loaded = load_trained(target, device=device)
    example = torch.zeros(1, loaded.channels, loaded.img_size, loaded.img_size, device=device)
    auto, _ = find_target_layer(loaded.model, example)
    rows = layer_candidates(loaded.model, example)
    width = max((len(name) for name, _, _ in rows), default=10)
    lines = [f"{name:<{width}s}  {kind:<20s} {'x'.join(str(s) for s in shape[1:])}"
             + ("   <- default" if name == auto else "") for name, kind, shape in rows]
    lines.append(f"{len(rows)} layers of {_model_name(network(loaded.model))} at {loaded.img_size} px; "
                 f"default: {auto}; choose one with --layer NAME")
    return lines


__all__ = ["CAM_METHODS", "ExplainError", "ExplainRecord", "TargetLayer", "cam_heatmaps", "denormalize",
           "explain", "find_target_layer", "layer_candidates", "list_layers", "network", "overlay",
           "preserved_state", "render_panel", "resolve_class", "resolve_layer", "target_layer"]
