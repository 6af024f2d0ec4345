"""DESIGN rule 6 for the strategy registry: every registered strategy (and every sampler) trains on
digits, is killed inside an epoch and resumed from its mid-epoch checkpoint, and ends with the history
and the weights of an uninterrupted run, to the bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from imgtrain.api import train
from imgtrain.config import load_recipe
from imgtrain.strategies import STRATEGIES, enabled_strategies

BASE = ("model.name=imgtrain_cnn_tiny", "augment.img_size=8", "output.progress=off", "output.plots=false",
        "output.report=false", "train.threads=1", "train.epochs=3", "train.max_steps_per_epoch=8",
        "train.deterministic=true", "data.test_fraction=0")

# the recipe lines that turn each registered strategy on; a new strategy must add its own here
ON = {
    "transfer": ("transfer.freeze_layers=1", "transfer.layer_decay=0.8"),
    "curriculum": ("curriculum.difficulty=self_paced", "curriculum.start_fraction=0.5"),
    "progressive_resizing": ("augment.img_size=12",
                             "progressive.stages=[{img_size: 8, epochs: 2}, {img_size: 12, epochs: 1}]"),
    "mixing": ("mix.mixup_alpha=0.4", "mix.cutmix_alpha=1.0"),
    "distillation": ("distill.alpha=0.3", "distill.temperature=2.0"),  # + the teacher fixture
    "ema": ("ema.enabled=true", "ema.decay=0.9"),
    "diagnostics": ("diagnostics.grad_monitor_every=2", "diagnostics.nonfinite=skip"),
    "early_stopping": ("early_stop.monitor=val_loss", "early_stop.patience=2"),
    "lr_finder": ("optim.lr=find", "lr_find.steps=16", "lr_find.start=1.0e-3", "lr_find.end=10.0"),
    "swa": ("swa.start_epoch=1", "swa.lr=0.02", "swa.anneal_epochs=1"),
    "sam": ("optim.sam={rho: 0.05, adaptive: true}",),
}
TIMING = ("epoch_seconds", "images_per_second")
# a state every 3 optimizer steps; the kill comes at batch 6 of epoch 2 (8 steps an epoch): the run
# resumes from step 12, after batch 4 of epoch 2, and redoes batch 5
MID_EPOCH = ("train.checkpoint_every.steps=3",)
# the samplers, and strategy settings that change between epochs beyond ON's
VARIANTS = {
    "balanced sampler": ("data.sampler=balanced",),
    "per_class sampler": ("data.sampler=per_class", "data.images_per_class=4", "data.batch_size=32"),
    "gradual unfreezing": ("transfer.unfreeze_epochs=[1, 2]",),  # the kill lands in the epoch that unfreezes
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(load_recipe("quickstart", [*BASE, "train.epochs=1"]), run_dir=run)
    return run


def _overrides(name: str, teacher_dir) -> list[str]:
    extra = (f"distill.teacher={teacher_dir}",) if name == "distillation" else ()
    return [*BASE, *ON[name], *extra]


def recipe_for(name: str, teacher_dir):
    return load_recipe("quickstart", _overrides(name, teacher_dir))


def test_every_registered_strategy_has_a_recipe_here():
    assert sorted(s.name for s in STRATEGIES) == sorted(name for name in ON if name in {s.name for s in STRATEGIES})
    assert {s.name for s in STRATEGIES} <= set(ON), "add the new strategy's recipe lines to ON"


def same_run(full, resumed) -> None:
    """The same history (every column but the timings) and the same final weights, to the bit."""
    def rows(result):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in result.history]
    assert rows(resumed) == rows(full)
    last = [load_file(result.run_dir / "checkpoints" / "last.safetensors") for result in (full, resumed)]
    assert last[0].keys() == last[1].keys()
    assert all(torch.equal(last[0][key], last[1][key]) for key in last[0])


def killed_and_resumed(recipe_of, tmp_path, interrupt_at):
    full = train(recipe_of(), run_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(recipe_of(), run_dir=tmp_path / "cut", hooks=[interrupt_at(1, 5)])
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.state.pt", weights_only=True)
    assert saved["mid_epoch"] is not None and saved["mid_epoch"]["batches_done"] == 4
    return full, train(recipe_of(), resume=tmp_path / "cut")


@pytest.mark.parametrize("name", [s.name for s in STRATEGIES])
def test_a_strategy_killed_mid_epoch_and_resumed_gives_the_same_run(name, teacher, tmp_path, interrupt_at):
    recipe = recipe_for(name, teacher)
    assert name in [s.name for s in enabled_strategies(recipe)]
    full, resumed = killed_and_resumed(lambda: load_recipe("quickstart", [*_overrides(name, teacher), *MID_EPOCH]),
                                       tmp_path, interrupt_at)
    assert len(full.history) == 3 or name == "early_stopping"
    same_run(full, resumed)
    # it learned in a few steps: a fresh 10-class model scores log(10) = 2.30 on val
    assert max(r["val_acc"] for r in resumed.history) > 0.2


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_sampler_killed_mid_epoch_resumes_to_the_same_run(variant, tmp_path, interrupt_at):
    full, resumed = killed_and_resumed(lambda: load_recipe("quickstart", [*BASE, *VARIANTS[variant], *MID_EPOCH]),
                                       tmp_path, interrupt_at)
    same_run(full, resumed)


def test_worker_processes_augment_a_resumed_epoch_as_an_uninterrupted_one(tmp_path, interrupt_at):
    """With data.workers > 0 a worker's RNG depends on which batches it was dealt; in deterministic mode
    each image is seeded from its place in the epoch instead (data/samplers.py TrainLoader), so a
    mid-epoch resume draws the same per-image augmentation (here RandAugment, in the workers)."""
    overrides = [*BASE, *MID_EPOCH, "data.workers=2", "augment.policy=randaugment", "augment.img_size=12"]
    full, resumed = killed_and_resumed(lambda: load_recipe("quickstart", overrides), tmp_path, interrupt_at)
    same_run(full, resumed)
