"""Transfer learning on real data: frozen groups stay bit-identical, unfreezing happens at the
listed epochs and survives a resume, per-group learning rates follow the schedule."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

from imgtrain.api import train
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.checkpoint import load_training_state, load_weights
from imgtrain.engine.events import Hook
from imgtrain.strategies.transfer import (
    first_trainable_group,
    freeze_until,
    frozen_norms_to_eval,
    group_lr_multipliers,
    layer_groups,
)
from imgtrain.tracking import read_history

# imgtrain_cnn_tiny by stage: stem, stages.0, stages.1, stages.2, head (fc) = 5 groups


def digits(*overrides: str):
    return load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "output.progress=off",
                                      "output.plots=false", "train.epochs=3", "model.drop_rate=0",
                                      "train.threads=1", *overrides])


def _snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, stem, head", [
    ("imgtrain_cnn_tiny", "stem.0.weight", "fc.weight"),
    ("resnet18", "conv1.weight", "fc.weight"),
    ("convnext_atto", "stem.0.weight", "head.fc.weight"),
    ("vit_tiny_patch16_224", "patch_embed.proj.weight", "head.weight"),
])
def test_layer_groups_run_from_the_stem_to_the_head(name, stem, head):
    model = timm.create_model(name, num_classes=10)
    groups = layer_groups(model, "stage")
    assert stem in groups[0] and head in groups[-1]
    # every parameter is in exactly one group
    names = [n for g in groups for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(layer_groups(model, "block")) >= len(groups)


def test_first_trainable_group_by_epoch():
    recipe = digits("transfer.unfreeze_epochs=[1,3]", "transfer.freeze_layers=1")
    assert [first_trainable_group(recipe.transfer, e, 5) for e in range(5)] == [4, 3, 3, 2, 2]
    recipe = digits("transfer.freeze_epochs=2")
    assert [first_trainable_group(recipe.transfer, e, 5) for e in range(4)] == [4, 4, 0, 0]
    assert first_trainable_group(digits("transfer.freeze_backbone=true").transfer, 7, 5) == 4
    assert first_trainable_group(digits("transfer.freeze_layers=2").transfer, 0, 5) == 2


def test_layer_decay_and_explicit_group_lrs():
    assert group_lr_multipliers(4, 0.1, layer_decay=0.5) == pytest.approx([0.0125, 0.025, 0.05, 0.1])
    assert group_lr_multipliers(3, 0.1, group_lrs=[0.001, 0.01, 0.1]) == [0.001, 0.01, 0.1]
    with pytest.raises(RecipeError, match="transfer.group_lrs: the model has 3 layer groups .* but 2"):
        group_lr_multipliers(3, 0.1, group_lrs=[0.01, 0.1])


def test_frozen_batchnorm_goes_to_eval_mode():
    model = timm.create_model("imgtrain_cnn_tiny", num_classes=4, in_chans=1)
    groups = layer_groups(model)
    model.train()
    freeze_until(model, groups, 2)  # stem and stages.0 frozen
    assert frozen_norms_to_eval(model) == 2
    assert not model.stem[1].training and not model.stages[0][0][1].training
    assert model.stages[1][1][1].training


def test_frozen_layers_and_their_batchnorm_statistics_do_not_move(tmp_path):
    snapshot = SnapshotAtFitStart()
    result = train(digits("transfer.freeze_layers=2", "optim.weight_decay=0.01"), run_dir=tmp_path / "run",
                   hooks=[snapshot])
    start = snapshot.weights
    final, _ = load_weights(result.run_dir / "checkpoints" / "last.safetensors")
    for key, value in start.items():
        if key.startswith(("stem.", "stages.0.")):   # weights, biases, running_mean/var, num_batches
            assert torch.equal(final[key], value), key
        elif key.endswith("weight") and value.ndim > 1:
            assert not torch.equal(final[key], value), f"{key} should have trained"
    rows = read_history(result.run_dir / "history.csv")
    assert {r["trainable_groups"] for r in rows} == {"3/5"}
    model = timm.create_model("imgtrain_cnn_tiny", num_classes=10, in_chans=1)
    expected = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("stem.", "stages.0.")))
    assert {r["trainable_params"] for r in rows} == {expected}


class SnapshotAtFitStart(Hook):
    name = "snapshot"

    def fit_start(self, state):
        self.weights = _snapshot(state.model)


class RecordGroupLrs(Hook):
    name = "record_lrs"

    def __init__(self):
        self.rows = []

    def before_step(self, state):
        self.rows.append({g["layer_group"]: g["lr"] for g in state.optimizer.param_groups})


def test_gradual_unfreezing_counts_and_group_lrs_follow_the_schedule(tmp_path):
    recorder = RecordGroupLrs()
    recipe = digits("train.epochs=4", "transfer.unfreeze_epochs=[1,2,3]", "transfer.layer_decay=0.5",
                    "schedule.name=cosine", "optim.lr=0.05")
    result = train(recipe, run_dir=tmp_path / "run", hooks=[recorder])
    rows = read_history(result.run_dir / "history.csv")
    model = timm.create_model("imgtrain_cnn_tiny", num_classes=10, in_chans=1)
    sizes = [sum(dict(model.named_parameters())[n].numel() for n in g) for g in layer_groups(model)]
    # epoch 0: head; then one more group from the top at epochs 1, 2, 3
    assert [r["trainable_params"] for r in rows] == [sum(sizes[4:]), sum(sizes[3:]), sum(sizes[2:]),
                                                      sum(sizes[1:])]
    assert [r["trainable_groups"] for r in rows] == ["1/5", "2/5", "3/5", "4/5"]
    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    per_group = [e["trainable_per_group"] for e in events if e["event"] == "epoch_end"]
    assert per_group[0] == [0, 0, 0, 0, sizes[4]] and per_group[3] == [0] + sizes[1:]
    # the history's lr is the head's; every group's lr is the head's x 0.5^(groups above it)
    steps = len(recorder.rows)
    for step, lrs in enumerate(recorder.rows):
        head = 0.05 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group, lr in lrs.items():
            assert lr == pytest.approx(head * 0.5 ** (4 - group), rel=1e-6, abs=1e-12)
    assert rows[-1]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * steps / steps)), abs=1e-9)


def test_onecycle_peaks_each_group_at_its_own_lr(tmp_path):
    recorder = RecordGroupLrs()
    group_lrs = [0.001, 0.002, 0.004, 0.008, 0.1]
    train(digits("train.epochs=1", f"transfer.group_lrs={group_lrs}", "schedule.name=onecycle"),
          run_dir=tmp_path / "run", hooks=[recorder])
    peaks = {g: max(r[g] for r in recorder.rows) for g in range(5)}
    assert [peaks[g] for g in range(5)] == pytest.approx(group_lrs, rel=0.02)


def test_resume_in_the_middle_of_gradual_unfreezing_gives_the_same_history(tmp_path, interrupt_at):
    overrides = ("train.deterministic=true", "train.epochs=4", "transfer.unfreeze_epochs=[1,2]",
                 "transfer.layer_decay=0.7", "optim.name=adamw", "optim.lr=0.01")
    full = train(digits(*overrides), run_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(digits(*overrides), run_dir=tmp_path / "cut", hooks=[interrupt_at(2, 4)])
    saved = load_training_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")
    assert saved["epoch"] == 2  # killed in epoch 2, the one where the third group from the top joins
    assert len(saved["optimizer"]["state"]) > 0
    resumed = train(digits(*overrides), resume=tmp_path / "cut")
    keys = ("train_loss", "val_acc", "lr", "trainable_params", "trainable_groups")
    assert [{k: r[k] for k in keys} for r in resumed.history] == [{k: r[k] for k in keys} for r in full.history]
    assert resumed.summary["test_acc"] == full.summary["test_acc"]


@pytest.mark.parametrize("overrides, message", [
    (("transfer.freeze_layers=5",), "transfer.freeze_layers: imgtrain_cnn_tiny has 5 layer groups by stage "
                                    "(4 below the head); freeze_layers must be <= 4, got 5"),
    (("transfer.unfreeze_epochs=[1,2,3,4,5]",), "transfer.unfreeze_epochs: imgtrain_cnn_tiny has 4 layer group(s) "
                                                "below the head that can unfreeze"),
    (("transfer.group_lrs=[0.1,0.1]",), "transfer.group_lrs: the model has 5 layer groups"),
])
def test_settings_the_model_cannot_take_stop_before_training(tmp_path, overrides, message):
    with pytest.raises(RecipeError) as info:
        train(digits(*overrides), run_dir=tmp_path / "run")
    assert message in str(info.value)
    assert not (tmp_path / "run").exists()  # checked before the run folder is made


@pytest.mark.parametrize("overrides, message", [
    (("transfer.freeze_backbone=true", "transfer.unfreeze_epochs=[2]"), "each decide when the backbone trains"),
    (("transfer.unfreeze_epochs=[2,2]",), "transfer.unfreeze_epochs: expected increasing epochs >= 1"),
    (("transfer.layer_decay=0",), "transfer.layer_decay"),
    (("transfer.layer_decay=0.5", "transfer.group_lrs=[0.1]"), "use one"),
])
def test_contradictory_transfer_recipes_are_recipe_errors(overrides, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        digits(*overrides)
