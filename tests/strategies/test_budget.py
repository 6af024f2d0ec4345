"""train.budget: the plan from measured speeds (pure functions, exact), a budgeted run on digits that ends
within its budget with the schedule run to its end, the error for a budget too small, the clock kept
across a resume, and --budget on the command line."""

from __future__ import annotations

import json

import pytest

from imgtrain.api import train
from imgtrain.cli import main
from imgtrain.config import RecipeError, duration_seconds, load_recipe
from imgtrain.strategies.budget import EPOCH_SLACK, Speed, plan_for_budget, scale_stages
from imgtrain.tracking import read_history

TINY = ["model.name=imgtrain_cnn_tiny", "train.threads=1", "output.progress=off", "output.plots=false",
        "output.report=false", "data.batch_size=64"]


def test_durations():
    assert [duration_seconds(t) for t in ("90s", "10m", "1.5h", "1h30m", "45", "2m 30s")] == \
        [90, 600, 5400, 5400, 45, 150]
    for bad in ("ten minutes", "0", "-5s", "5d"):
        with pytest.raises(ValueError, match="duration"):
            duration_seconds(bad)
    with pytest.raises(RecipeError, match=r"train.budget: expected a duration such as 90s"):
        load_recipe("quickstart", ["train.budget=soon"])


def test_the_plan_is_the_most_epochs_that_fit():
    # 1,000 images an epoch at 1 ms each, 200 val images at 0.5 ms: 1.1 s an epoch, +10% slack
    speed = Speed(train={28: 1e-3}, eval=5e-4)
    plan = plan_for_budget(60.0, spent=10.0, speed=speed, epoch_images=1000, val_images=200, test_images=400,
                           max_epochs=100)
    epoch = (1.0 + EPOCH_SLACK) * 1.1
    reserve = 400 * 5e-4 + 2.0 + 3.0  # the test pass, the last writes, the margin (3 s: 3% of 60 s is less)
    assert plan.reserve == pytest.approx(reserve)
    assert plan.epochs == int((60.0 - 10.0 - reserve) / epoch) == 37
    assert plan.predicted <= 60.0 and not plan.capped
    assert plan.epoch_seconds == pytest.approx([epoch] * 37)
    # train.epochs caps the plan, and says so
    capped = plan_for_budget(60.0, 10.0, speed, 1000, 200, 400, max_epochs=12)
    assert capped.epochs == 12 and capped.capped and "train.epochs caps it" in capped.describe()


def test_the_reserve_counts_the_tta_test_passes(tmp_path):
    """eval.tta tests the images once more per view after the plain test pass: the reserve keeps time for all
    of them (hflip: the plain pass, then the original and the flipped view)."""
    from imgtrain.api import test_passes

    assert test_passes(load_recipe("quickstart")) == 1
    assert test_passes(load_recipe("quickstart", ["eval.tta=[hflip]"])) == 3
    # the original, its flip and five crops
    assert test_passes(load_recipe("quickstart", ["eval.tta=[hflip, 'five_crop: 0.875']"])) == 1 + 7
    # a real budgeted run with flip TTA ends within its budget, the TTA test pass included
    summary = train(load_recipe("quickstart", ["train.budget=15s", "train.epochs=40", "train.threads=1",
                                               "eval.tta=[hflip]", "output.progress=off", "output.plots=false",
                                               "output.report=false"]), run_dir=tmp_path / "tta").summary
    assert "test_acc_tta" in summary and summary["budget"]["used_seconds"] <= 15.0, summary["budget"]


def test_a_budget_too_small_says_the_smallest_that_fits():
    speed = Speed(train={28: 1e-2}, eval=1e-3)  # 10 s an epoch
    with pytest.raises(RecipeError) as error:
        plan_for_budget(12.0, spent=4.0, speed=speed, epoch_images=1000, val_images=0, test_images=1000,
                        max_epochs=5)
    message = str(error.value)
    assert message.startswith("train.budget: a budget of 12s is too small for one epoch here")
    # 4 s spent + 11 s epoch + (1 s test + 2 s + 3 s margin) = 21 s: rounded up to 30 s
    assert "the smallest budget that fits is about 30s" in message


def test_progressive_stages_keep_their_shares_and_cost_less():
    stages = [{"img_size": 16, "epochs": 4}, {"img_size": 22, "epochs": 4}, {"img_size": 28, "epochs": 4}]
    assert [s["epochs"] for s in scale_stages(stages, 7)] == [3, 2, 2] or \
        [s["epochs"] for s in scale_stages(stages, 7)] == [2, 3, 2]
    assert sum(s["epochs"] for s in scale_stages(stages, 7)) == 7
    assert [s["img_size"] for s in scale_stages(stages, 1)] == [28]  # one epoch: the full size
    assert [s["epochs"] for s in scale_stages(stages, 2)][-1] >= 1
    # small images are cheaper: more epochs fit than at the full size every epoch
    speed = Speed(train={16: 0.33e-3, 22: 0.66e-3, 28: 1e-3}, eval=0.0)

    def sizes_for(epochs):
        return [s["img_size"] for s in scale_stages(stages, epochs) for _ in range(s["epochs"])]

    plain = plan_for_budget(30.0, 0.0, Speed(train={28: 1e-3}, eval=0.0), 1000, 0, 0, max_epochs=100)
    staged = plan_for_budget(30.0, 0.0, speed, 1000, 0, 0, max_epochs=100, stages=stages, sizes_for=sizes_for)
    assert staged.epochs > plain.epochs and sum(s["epochs"] for s in staged.stages) == staged.epochs


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    run = tmp_path_factory.mktemp("budget") / "run"
    recipe = load_recipe("quickstart", [*TINY, "train.budget=10s", "train.epochs=200", "schedule.name=linear"])
    return train(recipe, run_dir=run)


def test_a_budgeted_run_ends_within_its_budget_with_its_schedule_ended(budgeted):
    summary, history = budgeted.summary, read_history(budgeted.run_dir / "history.csv")
    plan = summary["budget"]
    assert plan["budget_seconds"] == 10.0 and 1 < plan["planned_epochs"] < 200
    assert summary["total_seconds"] <= 10.0 + 1.0  # the run's own clock; the CLI's imports come before it
    assert plan["used_seconds"] <= 10.0 + 1.0
    # config.yaml holds the plan: a resume or a rerun of it trains the same epochs
    assert load_recipe(budgeted.run_dir / "config.yaml").train.epochs == plan["planned_epochs"]
    elapsed = [row["elapsed_seconds"] for row in history]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= 10.0
    if "budget_stopped_early" not in summary:  # the machine ran as measured: the linear decay reached its end
        assert len(history) == plan["planned_epochs"]
        assert history[-1]["lr"] < 0.05 * max(row["lr"] for row in history)
    else:  # slower than measured (a busy machine): stopped at an epoch end, and said why
        assert "time budget: stopped after epoch" in summary["budget_stopped_early"]
    log = (budgeted.run_dir / "train.log").read_text()
    assert f"{plan['planned_epochs']} epoch(s) planned" in log


def test_a_budget_too_small_is_refused_before_any_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "quickstart", *TINY, "train.epochs=50", "--budget", "2s", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "train.budget: a budget of 2s is too small for one epoch here" in err and "smallest budget" in err
    assert "Traceback" not in err and not run.exists()
    assert main(["train", "quickstart", "--budget", "soon", "--run-dir", str(run)]) == 2
    assert "train.budget: expected a duration such as 90s" in capsys.readouterr().err


def test_resume_keeps_the_plan_and_the_clock(tmp_path, interrupt_at):
    run = tmp_path / "run"
    recipe = load_recipe("quickstart", [*TINY, "train.budget=30s", "train.epochs=8"])
    with pytest.raises(KeyboardInterrupt):
        train(recipe, run_dir=run, hooks=[interrupt_at(2, 1)])
    before = read_history(run / "history.csv")
    planned = json.loads((run / "run.json").read_text())["budget"]
    assert len(before) == 2 and planned["planned_epochs"] == 8  # capped at train.epochs
    result = train(recipe, resume=run)
    history = read_history(run / "history.csv")
    assert len(history) == 8 and history[:2] == before
    # the clock goes on from what the first process used, not from zero
    assert history[2]["elapsed_seconds"] > before[1]["elapsed_seconds"]
    assert result.summary["budget"]["used_seconds"] >= history[-1]["elapsed_seconds"]
    assert result.summary["budget"]["planned_epochs"] == 8
