"""Class imbalance end to end: balanced accuracy and per-class recall in the run folder, recipe errors."""

from __future__ import annotations

import json

import pytest
import torch

from imgtrain.api import load_trained, train
from imgtrain.config import RecipeError, load_recipe
from imgtrain.data import build_eval_transform, build_splits
from imgtrain.tracking import read_history


def shapes_recipe(*overrides: str):
    # 4x imbalance in train (391 / 246 / 155 / 98 images), balanced val; upright, noiseless shapes
    # so that 3 short epochs learn enough for the per-class recalls to differ
    return load_recipe(None, [
        "data.source=shapes", "data.shapes.train_size=800", "data.shapes.val_size=200",
        "data.shapes.test_size=0", "data.shapes.image_size=16", "data.shapes.imbalance=4",
        "data.shapes.rotation=0", "data.shapes.min_scale=0.6", "data.shapes.noise=0", "data.batch_size=32",
        "model.name=imgtrain_cnn_tiny",
        "train.epochs=3", "optim.name=adamw", "optim.lr=0.005", "output.progress=off", "output.plots=false",
        "output.best_metric=val_balanced_acc", *overrides])


def test_balanced_accuracy_and_per_class_recall_are_logged_every_epoch(tmp_path):
    result = train(shapes_recipe(), run_dir=tmp_path / "run")
    run = result.run_dir
    rows = read_history(run / "history.csv")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    epoch_ends = [e for e in events if e["event"] == "epoch_end"]
    assert [r["epoch"] for r in rows] == [e["epoch"] for e in epoch_ends] == [1, 2, 3]
    classes = ["circle", "square", "triangle", "cross"]
    for row, event in zip(rows, epoch_ends):
        recall = event["val_per_class_recall"]
        assert list(recall) == classes
        # balanced accuracy is the mean per-class recall of the same validation pass
        assert row["val_balanced_acc"] == pytest.approx(sum(recall.values()) / 4, abs=1e-5)

    # by hand: reload the best and the last checkpoints, predict the val split, count
    splits = build_splits(shapes_recipe().data)
    labels = splits.val.targets
    for name, epoch in (("best", result.summary["best_epoch"]), ("last", 3)):
        loaded = load_trained(run / "checkpoints" / f"{name}.safetensors")
        transform = build_eval_transform(loaded.recipe.augment, splits.channels, loaded.img_size, loaded.mean,
                                         loaded.std, splits.native_size)   # as imgtrain.api.train builds it
        val = splits.val.with_transform(transform)
        with torch.no_grad():
            predictions = loaded.model(torch.stack([val[i][0] for i in range(len(val))])).argmax(1)
        recall = [float((predictions[labels == c] == c).float().mean()) for c in range(4)]
        assert rows[epoch - 1]["val_balanced_acc"] == pytest.approx(sum(recall) / 4, abs=1e-5)
        assert list(epoch_ends[epoch - 1]["val_per_class_recall"].values()) == pytest.approx(recall, abs=1e-6)
        accuracy = float((predictions == labels).float().mean())
        assert rows[epoch - 1]["val_acc"] == pytest.approx(accuracy, abs=1e-5)
    # the numbers mean something: the model learned, and the tail class is recalled least
    final = list(epoch_ends[-1]["val_per_class_recall"].values())
    assert sum(final) / 4 > 0.5 and final[3] < final[0]


def test_class_weight_list_of_wrong_length_stops_before_training(tmp_path):
    with pytest.raises(RecipeError) as info:
        train(shapes_recipe("imbalance.class_weights=[1, 2, 3]"), run_dir=tmp_path / "run")
    message = str(info.value)
    assert "imbalance.class_weights" in message and "4 classes" in message
    assert "circle, square, triangle, cross" in message and "3 weight" in message
    assert not (tmp_path / "run" / "history.csv").exists()


def test_posthoc_adjustment_is_applied_in_validation_and_kept_in_the_checkpoint(tmp_path):
    """imbalance.posthoc_adjust: the same weights, logits shifted by -tau*log(prior) at every evaluation."""
    result = train(shapes_recipe("imbalance.posthoc_adjust=true", "train.epochs=2"), run_dir=tmp_path / "run")
    rows = read_history(result.run_dir / "history.csv")
    splits = build_splits(shapes_recipe().data)
    labels = splits.val.targets
    counts = torch.bincount(torch.as_tensor(splits.train.targets), minlength=4).double()
    expected_offset = -(counts / counts.sum()).log()
    loaded = load_trained(result.run_dir / "checkpoints" / "last.safetensors")
    assert loaded.model.offset.double() == pytest.approx(expected_offset.float().double(), abs=1e-5)
    transform = build_eval_transform(loaded.recipe.augment, splits.channels, loaded.img_size, loaded.mean,
                                     loaded.std, splits.native_size)
    val = splits.val.with_transform(transform)
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        adjusted = loaded.model(images)
        plain = loaded.model.model(images)
    assert torch.allclose(adjusted, plain + expected_offset.float(), atol=1e-5)
    # validation used the adjusted logits: the history's accuracy is theirs, not the plain ones'
    accuracy = float((adjusted.argmax(1) == labels).float().mean())
    assert rows[-1]["val_acc"] == pytest.approx(accuracy, abs=1e-5)
    # the offset favours the rare classes: they are predicted at least as often as without it
    assert accuracy != pytest.approx(float((plain.argmax(1) == labels).float().mean()), abs=1e-5)
    rare = labels.new_tensor([2, 3])
    assert int(torch.isin(adjusted.argmax(1), rare).sum()) >= int(torch.isin(plain.argmax(1), rare).sum())
