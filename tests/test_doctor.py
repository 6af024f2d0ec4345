"""`imgtrain doctor`: every check passes on good data; a learning rate far too low or too high fails
the overfit check, and labels shuffled apart from their images fail the learn check, each with its
cause; the data, initial-loss and gradient checks on hand-made cases; exit codes."""

from __future__ import annotations

import csv
import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from imgtrain.cli import main
from imgtrain.config import load_recipe
from imgtrain.doctor import class_count_check, gradient_check, initial_loss_check, run_doctor

TINY = ["model.name=imgtrain_cnn_tiny", "train.threads=1", "data.batch_size=32"]


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory):
    """scikit-learn's digits as PNG files with two manifests: true labels, and training labels shuffled."""
    from sklearn.datasets import load_digits
    root = tmp_path_factory.mktemp("digits_png")
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    rows = []
    for rank, index in enumerate(order):
        pixels = (digits.images[index] * 255 / 16).round().astype(np.uint8)
        name = f"{index:04d}.png"
        Image.fromarray(pixels, "L").save(root / name)
        rows.append([name, str(digits.target[index]), "val" if rank < 400 else "train"])
    shuffled = [row[:] for row in rows]
    train = [row for row in shuffled if row[2] == "train"]
    labels = [row[1] for row in train]
    random.Random(0).shuffle(labels)
    for row, label in zip(train, labels):
        row[1] = label
    for name, table in (("true.csv", rows), ("shuffled.csv", shuffled)):
        with open(root / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "split"])
            writer.writerows(table)
    return root


def test_every_check_passes_on_good_data(tmp_path, capsys):
    code = main(["doctor", "quickstart", *TINY, "--output", str(tmp_path / "doc")])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "doc" / "doctor.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {"data": "PASS", "batch grid": "PASS", "initial loss": "PASS", "gradients": "PASS",
                        "overfit batch": "PASS", "learn": "PASS"}
    checks = {c["name"]: c["values"] for c in report["checks"]}
    assert abs(checks["initial loss"]["loss"] - math.log(10)) < 0.5
    assert checks["overfit batch"]["final"] < 0.05 and checks["overfit batch"]["accuracy"] == 1.0
    assert len(checks["overfit batch"]["curve"]) == 100
    assert checks["learn"]["accuracy"] > 0.5
    assert checks["gradients"]["layers"] == 9 and not checks["gradients"]["missing"]
    assert sum(checks["data"]["counts"]["train"]) == 1168
    grid = Image.open(tmp_path / "doc" / "batch.png")
    assert grid.size == (8 * 120, 4 * 144)  # 32 images, 8 per row
    assert "6 of 6 checks passed" in out and "PASS  overfit batch" in out


@pytest.mark.parametrize("lr, cause", [
    ("1.0e-6", "learning rate too low (optim.lr 1e-06)"),
    ("1.0e+4", "learning rate too high (optim.lr 10000): the loss diverges"),
])
def test_a_learning_rate_far_off_fails_the_overfit_check_with_its_cause(tmp_path, capsys, lr, cause):
    code = main(["doctor", "quickstart", *TINY, f"optim.lr={lr}", "diagnostics.doctor_learn_steps=10",
                 "--output", str(tmp_path / "doc")])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL  overfit batch" in out and f"likely cause: {cause}" in out
    assert "PASS  gradients" in out and "PASS  initial loss" in out  # the first step was still fine
    assert "FAIL  learn" in out and "the overfit check failed too" in out


def test_labels_shuffled_apart_from_images_fail_the_learn_check(tmp_path, digits_csv):
    common = [*TINY, "data.source=csv", "augment.img_size=8"]
    good = run_doctor(load_recipe("quickstart", [*common, f"data.root={digits_csv / 'true.csv'}"]), tmp_path / "good")
    bad = run_doctor(load_recipe("quickstart", [*common, f"data.root={digits_csv / 'shuffled.csv'}"]), tmp_path / "bad")
    assert good.ok and good.check("learn").status == "PASS"
    # one batch of shuffled labels can still be memorised; nothing of it carries to the val split
    assert bad.check("overfit batch").status == "PASS"
    learn = bad.check("learn")
    assert learn.status == "FAIL" and not bad.ok
    assert learn.values["accuracy"] < 0.2 < good.check("learn").values["accuracy"] - 0.5
    assert "images and labels shuffled apart (a data-loading bug)" in learn.cause


def test_the_data_check_flags_imbalance_and_fails_an_empty_class(tmp_path):
    report = run_doctor(load_recipe("quickstart", [*TINY, "data.source=shapes", "data.shapes.imbalance=20",
                                                   "data.shapes.image_size=16", "data.shapes.train_size=400",
                                                   "diagnostics.doctor_steps=5", "diagnostics.doctor_learn_steps=0"]),
                        tmp_path / "doc")
    data = report.check("data")
    assert data.status == "WARN" and "imbalance over 10x" in data.cause and data.values["imbalance"] > 10
    assert report.check("learn").status == "SKIP"
    splits = SimpleNamespace(classes=["a", "b", "c"], channels=1, native_size=8, val=None, test=None,
                             train=SimpleNamespace(targets=torch.tensor([0, 0, 2, 2])))
    empty = class_count_check(splits)
    assert empty.status == "FAIL" and "no training images for b" in empty.detail


def test_initial_loss_and_gradient_checks_on_hand_made_cases():
    assert initial_loss_check(2.3, 10, 0.5, pretrained=False).status == "PASS"
    high = initial_loss_check(9.0, 10, 0.5, pretrained=False)
    assert high.status == "FAIL" and "inputs not normalised" in high.cause
    assert initial_loss_check(0.2, 10, 0.5, pretrained=False).status == "FAIL"
    assert initial_loss_check(0.2, 10, 0.5, pretrained=True).status == "PASS"
    assert initial_loss_check(float("nan"), 10, 0.5, pretrained=False).cause.startswith("bad inputs")

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    unused = torch.nn.Linear(2, 2)
    net.add_module("unused", unused)  # in the model, not in the forward pass
    net[1](net[0](torch.randn(5, 4))).pow(2).mean().backward()
    missing = gradient_check(net, 1e-7, 100.0)
    assert missing.status == "FAIL" and "unused.weight" in missing.detail and "cut off from the loss" in missing.cause
    unused.requires_grad_(False)  # frozen on purpose: not a failure
    assert gradient_check(net, 1e-7, 100.0).status == "PASS"
    assert gradient_check(net, 10.0, 100.0).status == "FAIL"  # every layer below 10: "vanishing"


def test_bad_settings_exit_2_before_any_work(tmp_path, capsys):
    assert main(["doctor", "quickstart", "diagnostics.doctor_steps=0", "--output", str(tmp_path / "d")]) == 2
    assert "diagnostics.doctor_steps: 0 is out of range" in capsys.readouterr().err
    assert main(["doctor", "quickstart", "diagnostics.doctor_loss_below=-1", "--output", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()
