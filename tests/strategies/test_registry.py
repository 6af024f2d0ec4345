"""DESIGN rule 6 for the strategy registry: every registered strategy trains on digits, is killed
mid-epoch and resumed, and ends with the history of an uninterrupted run."""

from __future__ import annotations

import pytest

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
KEEP = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(load_recipe("quickstart", [*BASE, "train.epochs=1"]), run_dir=run)
    return run


def recipe_for(name: str, teacher_dir):
    extra = (f"distill.teacher={teacher_dir}",) if name == "distillation" else ()
    return load_recipe("quickstart", [*BASE, *ON[name], *extra])


def test_every_registered_strategy_has_a_recipe_here():
    assert sorted(s.name for s in STRATEGIES) == sorted(name for name in ON if name in {s.name for s in STRATEGIES})
    assert {s.name for s in STRATEGIES} <= set(ON), "add the new strategy's recipe lines to ON"


@pytest.mark.parametrize("name", [s.name for s in STRATEGIES])
def test_a_strategy_killed_and_resumed_gives_the_same_history(name, teacher, tmp_path, interrupt_at):
    recipe = recipe_for(name, teacher)
    assert name in [s.name for s in enabled_strategies(recipe)]
    full = train(recipe, run_dir=tmp_path / "full")
    assert len(full.history) == 3 or name == "early_stopping"
    with pytest.raises(KeyboardInterrupt):
        train(recipe_for(name, teacher), run_dir=tmp_path / "cut", hooks=[interrupt_at(1, 2)])
    resumed = train(recipe_for(name, teacher), resume=tmp_path / "cut")
    rows = [{k: r.get(k) for k in KEEP} for r in resumed.history]
    assert rows == [{k: r.get(k) for k in KEEP} for r in full.history]
    # it learned in a few steps: a fresh 10-class model scores log(10) = 2.30 on val
    assert max(r["val_acc"] for r in resumed.history) > 0.2
