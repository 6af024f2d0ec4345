"""The fast recipes (configs/fashion_mnist_fast.yaml, configs/imagefolder_fast.yaml) train as documented:
the reshaped net, batch augmentation on the CPU, the decoded cache and flip TTA, on real images. Their
speed and accuracy are measured by benchmarks/time_to_accuracy.py, not here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from imgtrain.cli import main
from imgtrain.config import load_recipe

FASHION = Path("/usr/share/datasets/fashion-mnist")
QUIET = ["train.threads=1", "output.progress=off", "output.plots=false", "output.report=false"]


def test_imagefolder_fast_trains_from_the_cache_with_batch_augmentation_and_flip_tta(tmp_path, capsys):
    """scikit-learn's digits written as PNG files in class folders (real images, no download), at 16 px."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = tmp_path / "digits"
    bunch = load_digits()
    for index, (image, label) in enumerate(zip(bunch.images, bunch.target)):
        (data / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(np.round(image * 255 / 16))).save(data / str(label) / f"{index:04d}.png")
    run = tmp_path / "run"
    assert main(["train", "imagefolder_fast", f"data.root={data}", "augment.img_size=16", "train.epochs=6",
                 *QUIET, "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    log = (run / "train.log").read_text()
    assert summary["test_acc"] > 0.8 and summary["test_acc_tta"] > 0.8, summary  # 10 classes: chance is 0.1
    assert summary["test_tta"].startswith("hflip (2 views)")
    assert "cache" in log.lower() and "memory" in log.lower(), log
    recipe = load_recipe(str(run / "config.yaml"))
    assert recipe.augment.device_transforms == "on" and recipe.model.kwargs["depths"] == [1, 1, 1, 1]
    assert "with TTA" in capsys.readouterr().out


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_fast_learns_in_a_few_short_epochs(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "fashion_mnist_fast", "data.train_subset=3000", "data.val_subset=500",
                 "data.test_subset=1000", "data.batch_size=128", "train.epochs=4", *QUIET, "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_acc"] > 0.6, summary  # 10 classes: chance is 0.1
