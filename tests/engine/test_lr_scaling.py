"""optim.lr_scaling: the lr scaled from optim.reference_batch to the global batch, once, where the recipe's
lrs become the optimizer's; config.yaml keeps the lr as written. (Two processes: tests/engine/test_ddp.py.)"""

from __future__ import annotations

import math

import pytest

from imgtrain.api import check_lr_scaling, train, with_scaled_lrs
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.optim import scale_lr
from imgtrain.tracking import read_history, read_summary

FAST = ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.threads=1", "train.epochs=1",
        "train.max_steps_per_epoch=4", "output.progress=off", "output.plots=false", "output.report=false"]


def digits(*overrides: str):
    return load_recipe("quickstart", [*FAST, *overrides])


@pytest.mark.parametrize(("rule", "reference", "processes", "accum", "expected"), [
    ("none", 16, 4, 1, 0.1),                       # none: the lr as written, whatever the batch
    ("linear", None, 1, 2, 0.1),                   # default reference: the recipe's own batch in one process
    ("linear", None, 4, 1, 0.4),                   # ... so only the processes scale it
    ("linear", 64, 2, 2, 0.2),                     # global 32 x 2 x 2 = 128, twice the reference
    ("sqrt", None, 4, 1, 0.1 * 2.0),               # sqrt(4)
    ("sqrt", 64, 1, 1, 0.1 * math.sqrt(0.5)),      # a smaller global batch than the reference lowers it
])
def test_scale_lr_multiplies_by_the_global_over_the_reference_batch(rule, reference, processes, accum, expected):
    recipe = load_recipe(None, ["optim.lr=0.1", "data.batch_size=32", f"optim.lr_scaling={rule}",
                                f"optim.reference_batch={'null' if reference is None else reference}"])
    scaling = scale_lr(recipe.optim, recipe.data.batch_size, accum, processes)
    assert scaling.scaled_lr == pytest.approx(expected, rel=1e-12)
    assert scaling.global_batch == 32 * processes * accum
    assert scaling.reference_batch == (reference or 32 * accum)
    assert scaling.lr == 0.1


def test_every_lr_the_recipe_writes_scales_by_the_same_factor():
    recipe = load_recipe(None, ["optim.lr=0.1", "data.batch_size=32", "optim.lr_scaling=linear",
                                "optim.reference_batch=8", "schedule.min_lr=0.001", "swa.start_epoch=1",
                                "swa.lr=0.02", "transfer.group_lrs=[0.01,0.1]",
                                "progressive.stages=[{img_size: 8, epochs: 1}, {img_size: 16, epochs: 1, lr: 0.05}]"])
    trained = with_scaled_lrs(recipe, scale_lr(recipe.optim, 32, 1, 1))  # 32 / 8: x4
    assert trained.optim.lr == pytest.approx(0.4)
    assert trained.schedule.min_lr == pytest.approx(0.004)
    assert trained.swa.lr == pytest.approx(0.08)
    assert trained.transfer.group_lrs == pytest.approx([0.04, 0.4])
    assert [stage.get("lr") for stage in trained.progressive.stages] == [None, pytest.approx(0.2)]
    # the copy trains as it is: it says so, and scaling it again changes nothing
    assert trained.optim.lr_scaling == "none"
    assert scale_lr(trained.optim, 32, 1, 1).scaled_lr == trained.optim.lr
    assert recipe.optim.lr == 0.1 and recipe.swa.lr == 0.02  # the recipe as written is untouched


def test_one_process_with_a_smaller_reference_batch_trains_at_the_scaled_lr(tmp_path):
    recipe = digits("data.batch_size=32", "schedule.name=constant", "optim.lr=0.05", "optim.lr_scaling=linear",
                    "optim.reference_batch=16", "train.epochs=2")
    result = train(recipe, run_dir=tmp_path / "run")
    lrs = [row["lr"] for row in read_history(result.run_dir / "history.csv")]
    assert lrs == pytest.approx([0.1, 0.1])  # 0.05 x 32 / 16
    record = read_summary(result.run_dir)["lr_scaling"]
    assert record == {"rule": "linear", "lr": 0.05, "scaled_lr": 0.1, "global_batch": 32, "reference_batch": 16,
                      "processes": 1}
    # config.yaml keeps the recipe as written: a resume or a copy of it scales once, from 0.05
    saved = load_recipe(result.run_dir / "config.yaml")
    assert (saved.optim.lr, saved.optim.lr_scaling, saved.optim.reference_batch) == (0.05, "linear", 16)
    log = (result.run_dir / "train.log").read_text(encoding="utf-8")
    assert "lr 0.05 scaled linearly to 0.1 for a global batch of 32 (reference 16)" in log
    # a resume that extends the run scales the same lr once more, not twice: 0.1 again
    longer = train(load_recipe(result.run_dir / "config.yaml", ["train.epochs=3"]), resume=result.run_dir)
    assert [row["lr"] for row in read_history(longer.run_dir / "history.csv")] == pytest.approx([0.1, 0.1, 0.1])


def test_the_default_keeps_the_lr_of_one_process(tmp_path):
    result = train(digits("schedule.name=constant", "optim.lr=0.05", "optim.lr_scaling=sqrt"),
                   run_dir=tmp_path / "run")
    assert read_history(result.run_dir / "history.csv")[0]["lr"] == pytest.approx(0.05)
    assert read_summary(result.run_dir)["lr_scaling"]["reference_batch"] == 64  # quickstart's batch


def test_lr_find_with_lr_scaling_is_refused():
    """The LR finder measures the lr at the global batch the run trains with: scaling it would count it twice."""
    with pytest.raises(RecipeError, match="the LR finder measures the lr at the global batch") as error:
        check_lr_scaling(digits("optim.lr=find", "optim.lr_scaling=linear"))
    assert error.value.key == "optim.lr_scaling"
    check_lr_scaling(digits("optim.lr=find", "optim.lr_scaling=none"))  # the finder's lr as measured
    check_lr_scaling(digits("optim.lr=0.1", "optim.lr_scaling=linear", "optim.reference_batch=256"))
