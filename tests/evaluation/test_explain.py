"""Grad-CAM explanations: heatmaps that point at the object, the layer chosen for CNNs and ViTs,
a model left as it was found, and `imgtrain explain` on files."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from imgtrain.api import load_trained, train
from imgtrain.cli import main
from imgtrain.config import load_recipe
from imgtrain.data.shapes import SHAPE_NAMES, generate_shapes
from imgtrain.evaluation.explain import (
    CAM_METHODS,
    ExplainError,
    TokensToGrid,
    cam_heatmaps,
    find_target_layer,
    overlay,
    resolve_class,
    target_layer,
)
from imgtrain.models import LogitOffset

# one upright, noiseless shape of 30-50% of the side on a plain background: the object is a
# known, small region of each image (its pixels differ from the background colour)
SHAPES = ["data.source=shapes", "data.shapes.train_size=800", "data.shapes.val_size=100", "data.shapes.test_size=0",
          "data.shapes.image_size=24", "data.shapes.min_scale=0.3", "data.shapes.max_scale=0.5",
          "data.shapes.noise=0", "data.shapes.rotation=0", "data.shapes.num_classes=4", "data.batch_size=32",
          "model.name=imgtrain_cnn_tiny", "train.threads=1", "train.epochs=6", "optim.name=adamw", "optim.lr=0.005",
          "output.progress=off", "output.plots=false"]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A tiny CNN trained on shapes (about 80% val accuracy), its val images and their object masks."""
    recipe = load_recipe(None, SHAPES)
    result = train(recipe, run_dir=tmp_path_factory.mktemp("explain") / "shapes")
    images, labels = generate_shapes(recipe.data.shapes)["val"]
    background = images[:, :, :1, :1].float()  # noise 0: the corner pixel is the background colour
    masks = ((images.float() - background).abs().amax(dim=1) > 20).numpy()
    return result, images, labels, masks


def model_inputs(run_dir, images):
    loaded = load_trained(run_dir)
    transform = loaded.eval_transform()
    return loaded, torch.stack([transform(image) for image in images])


def inside_outside(heat: np.ndarray, masks: np.ndarray):
    inside = np.array([h[m].mean() for h, m in zip(heat, masks)])
    outside = np.array([h[~m].mean() for h, m in zip(heat, masks)])
    return inside, outside


def test_gradcam_of_a_trained_cnn_is_hot_on_the_object(shapes_run):
    result, images, labels, masks = shapes_run
    assert result.history[-1]["val_acc"] > 0.6
    loaded, x = model_inputs(result.run_dir, images)
    assert find_target_layer(loaded.model)[0] == "stages.2"  # imgtrain_cnn_*: the last stage (feature_info)
    assert 0.1 < masks.mean() < 0.3  # the object covers a small part of each image
    heat = cam_heatmaps(loaded.model, x, labels.tolist())
    assert heat.shape == (100, 24, 24) and heat.dtype == np.float32
    inside, outside = inside_outside(heat, masks)
    # measured: 82% of images, mean heat 0.63 on the object against 0.26 off it
    assert (inside > outside).mean() >= 0.7
    assert inside.mean() > 1.8 * outside.mean()
    # an untrained net of the same shape (seed 0: 0.32 against 0.26) barely favours the object
    torch.manual_seed(0)
    untrained = timm.create_model("imgtrain_cnn_tiny", num_classes=4, in_chans=3).eval()
    inside_0, outside_0 = inside_outside(cam_heatmaps(untrained, x, labels.tolist()), masks)
    assert inside.mean() / outside.mean() > 1.4 * inside_0.mean() / outside_0.mean()


def test_logit_offset_wrapper_is_looked_through(shapes_run):
    result, images, labels, _ = shapes_run
    loaded, x = model_inputs(result.run_dir, images[:8])
    wrapped = LogitOffset(loaded.model, torch.tensor([3.0, -1.0, 0.5, 0.0])).eval()
    assert find_target_layer(wrapped)[0] == "stages.2"
    # a constant offset changes no gradient: the same heatmaps for the same classes
    np.testing.assert_allclose(cam_heatmaps(wrapped, x, labels[:8].tolist()),
                               cam_heatmaps(loaded.model, x, labels[:8].tolist()), atol=1e-5)


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_every_method_gives_a_heatmap_per_image(shapes_run, method):
    result, images, labels, _ = shapes_run
    loaded, x = model_inputs(result.run_dir, images[:4])
    heat = cam_heatmaps(loaded.model, x, labels[:4].tolist(), method=method)
    assert heat.shape == (4, 24, 24)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert all(h.max() - h.min() > 0.1 for h in heat)  # not flat
    assert not np.allclose(heat[0], heat[1])           # each image its own map


def test_the_model_is_left_exactly_as_it_was(shapes_run):
    """What the run report needs to call it mid-training: modes, flags, gradients, weights, hooks."""
    result, images, labels, _ = shapes_run
    loaded, x = model_inputs(result.run_dir, images[:8])
    model = loaded.model
    model.train()
    model.stem.eval()  # a frozen part, as transfer learning leaves it
    for param in model.stem.parameters():
        param.requires_grad_(False)
    nn.functional.cross_entropy(model(x), labels[:8]).backward()  # gradients of a training step
    grads = {name: p.grad for name, p in model.named_parameters()}
    grad_values = {name: g.clone() for name, g in grads.items() if g is not None}
    weights = {name: t.clone() for name, t in model.state_dict().items()}  # BN running stats included
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    layer = model.get_submodule("stages.2")
    for method in ("gradcam", "ablationcam"):
        with torch.no_grad():  # as a hook might call it; the gradients it needs are turned back on
            heat = cam_heatmaps(model, x, method=method)
        assert heat.max() == pytest.approx(1.0)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert grads["stem.0.weight"] is None and grads["fc.weight"] is not None
    for name, param in model.named_parameters():
        assert param.grad is grads[name]  # the same tensors, with the same values
        if param.grad is not None:
            assert torch.equal(param.grad, grad_values[name])
    assert all(torch.equal(weights[name], t) for name, t in model.state_dict().items())
    assert model.get_submodule("stages.2") is layer  # ablationcam put the layer back
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks == 0


def test_a_net_without_feature_info_gets_its_last_spatial_layer_by_probe():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    # "4" (the pool) is 4-D too, but 1x1: nothing to show; "3" is the last map with a size
    assert find_target_layer(net, torch.zeros(1, 3, 12, 12))[0] == "3"
    heat = cam_heatmaps(net, torch.randn(2, 3, 12, 12), target_classes=1)
    assert heat.shape == (2, 12, 12) and heat.max() == pytest.approx(1.0)


def test_vit_tokens_are_laid_out_on_the_patch_grid():
    torch.manual_seed(0)
    # a 32x48 input of 8 px patches: a 4 x 6 grid; two register tokens and no class token
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=(32, 48), patch_size=8,
                            depth=2, reg_tokens=2, class_token=False, global_pool="avg").eval()
    x = torch.randn(3, 3, 32, 48)
    chosen = target_layer(vit, x)
    assert chosen.name == "blocks.1.norm1" and chosen.shape == (1, 2 + 24, 192)
    assert isinstance(chosen.reshape, TokensToGrid)
    assert (chosen.reshape.num_prefix_tokens, chosen.reshape.grid) == (2, (4, 6))
    # token 2 + k is patch k, row by row: (k // 6, k % 6)
    tokens = torch.arange(26, dtype=torch.float32).view(1, 26, 1).repeat(1, 1, 5)
    grid = chosen.reshape(tokens)
    assert grid.shape == (1, 5, 4, 6) and grid[0, 0, 1, 2].item() == 2 + 8 and grid[0, 3, 3, 5].item() == 25
    for method in ("gradcam", "eigencam"):
        heat = cam_heatmaps(vit, x, method=method)
        assert heat.shape == (3, 32, 48)
        assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0) and heat.std() > 0.05


def test_square_vit_with_a_class_token():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8,
                            depth=2).eval()
    chosen = target_layer(vit, torch.zeros(1, 3, 32, 32))
    assert (chosen.reshape.num_prefix_tokens, chosen.reshape.grid) == (1, (4, 4))
    heat = cam_heatmaps(vit, torch.randn(2, 3, 32, 32), target_classes=[0, 3], method="gradcam++")
    assert heat.shape == (2, 32, 32) and 0.0 <= heat.min() and heat.max() <= 1.0 and heat.std() > 0.05


def test_bad_layer_and_class_names_say_what_would_work(shapes_run):
    result, images, _, _ = shapes_run
    loaded, x = model_inputs(result.run_dir, images[:2])
    with pytest.raises(ExplainError, match=r"imgtrain_cnn_tiny has no module of that name\. Closest: stages\.2"):
        cam_heatmaps(loaded.model, x, layer="stages.20")
    with pytest.raises(ExplainError, match=r"'fc'.*shape \(1, 4\).*not a spatial"):
        cam_heatmaps(loaded.model, x, layer="fc")
    with pytest.raises(ExplainError, match=r"unknown explanation method 'gradcam\+'; choose from gradcam, gradcam\+\+"):
        cam_heatmaps(loaded.model, x, method="gradcam+")
    assert resolve_class("triangle", loaded.classes) == 2 and resolve_class(3, loaded.classes) == 3
    with pytest.raises(ExplainError, match=r"--class 'hexagon'.*circle, square, triangle, cross.*0\.\.3"):
        resolve_class("hexagon", loaded.classes)


def test_overlay_colours_hot_pixels_and_makes_grey_rgb():
    grey = np.full((4, 4), 100, dtype=np.uint8)
    heat = np.zeros((2, 2), dtype=np.float32)
    heat[0, 0] = 1.0
    out = overlay(grey, heat)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    # jet: 0 is dark blue (0, 0, 127.5), 1 dark red (127.5, 0, 0); half image, half colour
    assert tuple(out[0, 0]) == (114, 50, 50)
    assert tuple(out[3, 3]) == (50, 50, 114)
    chw = overlay(np.zeros((3, 4, 4), dtype=np.uint8), np.ones((4, 4), dtype=np.float32))
    assert chw.shape == (4, 4, 3) and tuple(chw[1, 1]) == (64, 0, 0)


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def image_files(shapes_run, tmp_path_factory):
    _, images, labels, _ = shapes_run
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(3):
        path = folder / f"{SHAPE_NAMES[int(labels[i])]}_{i}.png"
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


def test_cli_writes_one_png_per_image_and_method(shapes_run, image_files, tmp_path, capsys):
    result = shapes_run[0]
    out = tmp_path / "explained"
    assert main(["explain", str(result.run_dir), *map(str, image_files), "--method", "gradcam,eigencam",
                 "--output", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6
    for path in image_files:
        for method in ("gradcam", "eigencam"):
            png = out / f"{path.stem}_{method}.png"
            assert f"{png}: {method} of " in "\n".join(lines)
            with Image.open(png) as written:
                # two 224 px panels side by side (8 px margins) under a two-line title
                assert written.size == (2 * 224 + 3 * 8, 224 + 2 * 17 + 8 + 8)
                panel = np.asarray(written.convert("RGB"))
            # left: the 24 px image upscaled by nearest neighbour; right: coloured by the heatmap
            left, right = panel[42:266, 8:232], panel[42:266, 240:464]
            assert np.array_equal(left[::224 // 24 + 1][:, 0], left[::224 // 24 + 1][:, 1])
            assert np.abs(left.astype(int) - right.astype(int)).mean() > 10
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}_{m}.png" for p in image_files
                                                           for m in ("gradcam", "eigencam"))


def test_cli_class_by_name_and_a_broken_image(shapes_run, image_files, tmp_path, capsys):
    result = shapes_run[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "square"
    assert main(["explain", str(result.run_dir), str(image_files[0]), str(bad), str(image_files[1]),
                 "--class", "square", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[1] == f"{bad}: ERROR not an image Pillow can read (unknown format, or not an image file)"
    assert all(" gradcam of square (predicted " in line for line in (lines[0], lines[2]))
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}_gradcam.png" for p in image_files[:2])


def test_cli_bad_layer_exits_2_with_the_closest_names(shapes_run, image_files, tmp_path, capsys):
    result = shapes_run[0]
    code = main(["explain", str(result.run_dir), str(image_files[0]), "--layer", "stage.2",
                 "--output", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--layer 'stage.2'" in err and "Closest: stages.2" in err and "--list-layers" in err
    assert not (tmp_path / "none").exists()
    assert main(["explain", str(result.run_dir), str(image_files[0]), "--class", "7"]) == 2
    assert "--class '7': not a class of this model" in capsys.readouterr().err


def test_cli_lists_layers_with_shapes(shapes_run, capsys):
    assert main(["explain", str(shapes_run[0].run_dir), "--list-layers"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("stages.2 ") and "64x6x6" in line and "<- default" in line for line in lines)
    assert any(line.startswith("stem.0 ") and "Conv2d" in line and "16x24x24" in line for line in lines)
    assert lines[-1].startswith(f"{len(lines) - 1} layers of imgtrain_cnn_tiny at 24 px; default: stages.2")
