"""`imgtrain show-augment`: the PNG grid, its size, and labels that match the images shown."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from imgtrain.cli import main
from imgtrain.config import load_recipe
from imgtrain.data import build_splits
from imgtrain.tools.preview import CELL, COLUMNS, LABEL_LINES, LINE_HEIGHT, PAD, grid_size, show_augment


def test_grid_size_by_hand():
    assert (COLUMNS, CELL, PAD, LINE_HEIGHT, LABEL_LINES) == (8, 112, 4, 12, 2)
    assert grid_size(32) == (8 * 120, 4 * 144)
    assert grid_size(10) == (8 * 120, 2 * 144)
    assert grid_size(3) == (3 * 120, 144)


def test_cli_writes_png_of_expected_size(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["show-augment", "quickstart", "augment.pad_crop=1", "augment.hflip=0.5", "--n", "10",
                 "--output", str(out)]) == 0
    assert f"wrote 10 augmented training images to {out} (960x288 px)" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (960, 288)


def test_unmixed_labels_are_the_class_names(tmp_path):
    recipe = load_recipe("quickstart", ["augment.rotation=10"])
    preview = show_augment(recipe, n=12, output=tmp_path / "g.png")
    train = build_splits(recipe.data).train
    assert preview.labels == [train.classes[int(train.targets[i])] for i in preview.indices]
    assert len(set(preview.indices)) == 12
    # the first cell shows the first image: 8x8 digits enlarged 14x (nearest), normalisation undone
    with Image.open(tmp_path / "g.png") as image:
        tile = torch.from_numpy(np.array(image.convert("L")))
    factor = CELL // 8
    samples = tile[PAD + factor // 2:PAD + CELL:factor, PAD + factor // 2:PAD + CELL:factor]
    assert torch.equal(samples, preview.pixels[0, 0])
    assert preview.pixels[0].float().std() > 30  # a digit, not a blank cell


def test_normalisation_is_undone_for_display(tmp_path):
    recipe = load_recipe("quickstart", ["augment.pad_crop=0", "augment.hflip=0", "augment.rotation=0"])
    preview = show_augment(recipe, n=5, output=tmp_path / "g.png")
    train = build_splits(recipe.data).train
    for k, index in enumerate(preview.indices):
        raw = train[index][0]  # the stored uint8 image, no transform
        assert (preview.pixels[k].int() - raw.int()).abs().max() <= 1  # float rounding only


def test_mixed_labels_name_both_images_with_their_weights(tmp_path):
    recipe = load_recipe("quickstart", ["mix.cutmix_alpha=1.0", "train.label_smoothing=0.1"])
    preview = show_augment(recipe, n=16, output=tmp_path / "g.png")
    train = build_splits(recipe.data).train
    labels = [train.classes[int(train.targets[i])] for i in preview.indices]
    partners = labels[::-1]  # each image is mixed with its mirror in the batch
    mixed = 0
    for text, own, partner, _weights in zip(preview.labels, labels, partners, preview.targets):
        if own == partner:
            assert text == own
            continue
        parts = re.fullmatch(r"(\d\.\d\d) (\S+) / (\d\.\d\d) (\S+)", text)
        assert parts, text
        assert {parts[2], parts[4]} == {own, partner}
        assert float(parts[1]) + float(parts[3]) == pytest.approx(1.0, abs=0.011)
        assert float(parts[1]) >= float(parts[3])  # the dominant label first
        mixed += 1
    assert mixed >= 8
    # the label weights are the blend (no smoothing shown) and sum to one
    assert torch.allclose(preview.targets.sum(1), torch.ones(16))
    assert ((preview.targets > 0).sum(1) <= 2).all()


def test_bad_n_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["show-augment", "quickstart", "--n", "0"])
    assert info.value.code == 2
    assert "expected a whole number >= 1, got 0" in capsys.readouterr().err
