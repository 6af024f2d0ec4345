"""LR finder: the suggestions on curves with known answers, the divergence stop, a real range test
on digits that leaves training exactly as it was, `optim.lr: find` end to end (and resumed), and
`imgtrain lr-find`."""

from __future__ import annotations

import csv
import dataclasses
import math
import random

import pytest
import torch

from imgtrain.api import plan_epochs, prepare_data, seed_everything, train, train_parts
from imgtrain.cli import main
from imgtrain.config import LrFindConfig, RecipeError, load_recipe
from imgtrain.data import build_splits
from imgtrain.engine.checkpoint import load_training_state
from imgtrain.engine.loop import Trainer
from imgtrain.models import create_model
from imgtrain.strategies import StrategyContext
from imgtrain.strategies.lr_finder import (
    diverged,
    find_lr,
    lr_schedule,
    minimum_tenth,
    smooth_losses,
    steepest,
    suggest,
    valley,
)


def digits(*overrides: str):
    return load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "output.progress=off",
                                      "output.plots=false", "train.threads=1", *overrides])


# ----------------------------------------------------------------------------- the pure functions

def test_the_lr_sequence_is_log_spaced_from_start_to_end():
    assert lr_schedule(1e-4, 1.0, 5) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0], rel=1e-12)
    for start, end, steps in ((1.0, 1.0, 10), (1.0, 0.1, 10), (1e-3, 1.0, 1)):
        with pytest.raises(ValueError):
            lr_schedule(start, end, steps)


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smooth_losses([2.0] * 5, beta=0.98) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    # beta 0.5: avg 0.5 -> 0.5/0.5 = 1; avg 0.25 + 1 = 1.25 -> 1.25/0.75
    assert smooth_losses([1.0, 2.0], beta=0.5) == pytest.approx([1.0, 1.25 / 0.75])
    assert smooth_losses([3.0, 1.0, 2.0], beta=0.0) == [3.0, 1.0, 2.0]


def test_the_divergence_stop_is_four_times_the_best():
    assert not diverged(3.99, best=1.0) and diverged(4.01, best=1.0)
    assert diverged(float("nan"), best=1.0) and diverged(math.inf, best=1.0)
    assert not diverged(10.0, best=math.inf)  # the first step
    assert diverged(2.5, best=1.0, factor=2.0)


def test_steepest_and_minimum_on_a_known_curve():
    lrs = [10 ** (-5 + i / 10) for i in range(60)]
    # flat, then down 0.02 a step with one drop of 0.3 between steps 30 and 31, lowest at step 45, then up
    losses = [2.0] * 20
    for i in range(20, 46):
        losses.append(losses[-1] - (0.3 if i == 31 else 0.02))
    losses += [losses[-1] + 0.05 * k for k in range(1, 15)]
    assert steepest(lrs, losses) == (lrs[30], 30)
    assert minimum_tenth(lrs, losses) == (pytest.approx(lrs[45] / 10), 45)


def test_valley_is_two_thirds_down_the_longest_decreasing_run():
    losses = [3, 3, 3, 3, 2.5, 2, 1.5, 1, 0.5, 0.4, 0.3, 1, 5]
    lrs = [float(i + 1) for i in range(len(losses))]
    # the run 3 (index 3) .. 0.3 (index 10) has 8 points; fastai's start is 10 - 8 = 2, a third
    # of 8 is 2.67: index 2 + 2 + int(1.33) = 5
    assert valley(lrs, losses) == (6.0, 5)


def _fastai_valley_index(losses):
    """fastai.callback.schedule.valley's loops, transcribed as the reference."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


def test_valley_matches_fastai_on_random_curves():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(4, 40)
        losses = [round(rng.uniform(0, 3), 1) for _ in range(n)]  # ties included
        expected = min(max(_fastai_valley_index(losses), 0), n - 1)
        assert valley(list(range(1, n + 1)), losses)[1] == expected, losses


def test_suggestions_ignore_the_first_tenth_and_the_last_five_points():
    lrs = lr_schedule(1e-6, 1.0, 100)
    # a plunge in the first 10 points, a plateau, the real fall from step 60 (steepest from 70 to
    # 71), and a steeper plunge in the last 5 points: the first and the last are not read
    losses = [5.0 - 0.3 * i for i in range(10)] + [2.3] * 50
    for i in range(60, 100):
        losses.append(losses[-1] - (0.5 if i >= 95 else 0.28 if i == 71 else 0.02))
    found = suggest(lrs, losses, steps=100)
    assert found["steep"] == lrs[70]
    assert found["min10"] == pytest.approx(lrs[94] / 10)
    # a cut at the first non-finite point
    found = suggest(lrs[:40], [2.0 - 0.01 * i for i in range(30)] + [math.nan] * 10, steps=100)
    assert found["min10"] == pytest.approx(lrs[24] / 10)


# ----------------------------------------------------------------------------- the range test

def build_parts(recipe):
    """The Trainer's pieces assembled as api.train does."""
    seed_everything(recipe.train.seed)
    splits = build_splits(recipe.data)
    prepared = prepare_data(recipe, splits, torch.device("cpu"))
    model = create_model(recipe.model, num_classes=len(splits.classes), in_chans=splits.channels)
    context = StrategyContext(recipe=recipe, classes=splits.classes, channels=splits.channels,
                              img_size=prepared.img_size, device=torch.device("cpu"))
    return train_parts(recipe, model, prepared, plan_epochs(recipe, context))


class CountingLoader:
    def __init__(self, loader):
        self.loader, self.batches = loader, 0

    def __iter__(self):
        for batch in self.loader:
            self.batches += 1
            yield batch

    def __len__(self):
        return len(self.loader)


def test_a_range_test_leaves_training_exactly_as_without_it(tmp_path):
    # BatchNorm, shifted crops (global RNG), class weights, accumulation: all touched by the test
    recipe = digits("train.deterministic=true", "train.epochs=2", "train.max_steps_per_epoch=6",
                    "train.grad_accum_steps=2", "imbalance.class_weights=inverse", "output.save_best=false",
                    "output.save_last=false", "data.test_fraction=0", "augment.pad_crop=2")
    plain = Trainer(recipe, build_parts(recipe))
    plain_state = plain.fit()

    parts = build_parts(recipe)
    weights = {k: v.clone() for k, v in parts.model.state_dict().items()}
    rng, shuffle = torch.get_rng_state(), parts.train_generator.get_state()
    counter = CountingLoader(parts.loader_for(recipe.data.batch_size))
    counted = dataclasses.replace(parts, loader_for=lambda batch_size: counter)
    result = find_lr(recipe, counted, LrFindConfig(start=1e-2, end=3.0, steps=12))
    assert len(result.lrs) == 12 and counter.batches == 24  # one lr per optimizer step of 2 batches
    assert result.lrs == pytest.approx(lr_schedule(1e-2, 3.0, 12))
    assert result.smoothed == pytest.approx(smooth_losses(result.losses, 0.98))
    assert min(result.losses[-4:]) < result.losses[0] - 0.1  # it trained: the loss fell as the lr grew
    after = parts.model.state_dict()
    assert all(torch.equal(after[k], weights[k]) for k in weights)  # incl. BatchNorm running stats
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(parts.train_generator.get_state(), shuffle)
    probed = Trainer(recipe, parts)
    probed_state = probed.fit()

    assert [r["train_loss"] for r in probed_state.history] == [r["train_loss"] for r in plain_state.history]
    assert [r["val_loss"] for r in probed_state.history] == [r["val_loss"] for r in plain_state.history]
    final, expected = probed.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_the_range_test_stops_when_the_loss_diverges(tmp_path):
    recipe = digits("optim.name=sgd")
    result = find_lr(recipe, build_parts(recipe), LrFindConfig(start=1e-3, end=1e4, steps=40))
    assert result.stopped_early and len(result.lrs) < 40
    last, best = result.smoothed[-1], min(result.smoothed[:-1])
    assert not math.isfinite(last) or last > 4 * best
    assert all(math.isfinite(v) and v <= 4 * min(result.smoothed[:i + 1])
               for i, v in enumerate(result.smoothed[:-1]))  # it stopped at the first diverged step
    assert result.summary("valley")["steps_run"] == len(result.lrs)


# ----------------------------------------------------------------------------- optim.lr: find

def test_optim_lr_find_trains_with_the_suggestion_and_a_resume_keeps_it(tmp_path, interrupt_at):
    overrides = ("optim.lr=find", "lr_find.steps=20", "lr_find.start=1.0e-4", "lr_find.end=10.0",
                 "train.epochs=2", "train.max_steps_per_epoch=6", "train.deterministic=true")
    found = train(digits(*overrides), run_dir=tmp_path / "found")
    info = found.summary["lr_find"]
    lr = info["lr"]
    assert info["suggestion"] == "min10" and lr == info["suggestions"]["min10"] and 1e-4 <= lr <= 10
    config = load_recipe(found.run_dir / "config.yaml")
    assert config.optim.lr == lr  # the number, not "find": a rerun or --resume trains the same
    rows = list(csv.DictReader((found.run_dir / "lr_find.csv").read_text().splitlines()))
    assert list(rows[0]) == ["lr", "loss", "smoothed"] and 5 < len(rows) <= 20
    assert (found.run_dir / "lr_find.png").stat().st_size > 5000
    log = (found.run_dir / "train.log").read_text()
    assert f"lr_find: using min10 (lr_find.suggestion): optim.lr = {lr:.3g}" in log

    # the test put the weights, RNG and data order back: the same run as giving the number
    given = train(digits(*overrides[4:], f"optim.lr={lr!r}"), run_dir=tmp_path / "given")
    assert [r["val_loss"] for r in given.history] == [r["val_loss"] for r in found.history]

    with pytest.raises(KeyboardInterrupt):
        train(digits(*overrides), run_dir=tmp_path / "cut", hooks=[interrupt_at(1, 3)])
    assert load_training_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")["epoch"] == 1
    resumed = train(load_recipe(tmp_path / "cut" / "config.yaml"), resume=tmp_path / "cut")  # as the CLI does
    assert resumed.summary["lr_find"]["lr"] == lr
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in found.history]


def test_bad_lr_settings_stop_before_any_work(tmp_path):
    with pytest.raises(RecipeError, match="optim.lr: expected a number > 0 or find"):
        digits("optim.lr=fast")
    with pytest.raises(RecipeError, match=r"lr_find.start: the range test goes up .* must be below end"):
        digits("optim.lr=find", "lr_find.start=1.0", "lr_find.end=0.1")
    recipe = digits("optim.lr=find", "transfer.group_lrs=[0.1, 0.1, 0.1, 0.1]")
    with pytest.raises(RecipeError, match="transfer.group_lrs sets every layer group's lr"):
        train(recipe, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- imgtrain lr-find

def test_the_lr_find_command_writes_its_files_and_refuses_a_bad_range(tmp_path, capsys):
    out = tmp_path / "lrf"
    args = ["lr-find", "quickstart", "model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.threads=1",
            "--start", "1e-5", "--end", "10", "--steps", "25"]
    assert main([*args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lr_find: suggestions valley" in printed and "optim.lr: find would use min10" in printed
    rows = list(csv.DictReader((out / "lr_find.csv").read_text().splitlines()))
    assert float(rows[0]["lr"]) == pytest.approx(1e-5) and len(rows) <= 25
    assert (out / "lr_find.png").is_file() and load_recipe(out / "config.yaml").lr_find.steps == 25

    assert main([*args, "--output", str(out)]) == 2  # never overwritten silently
    assert "folder exists and is not empty; pass --overwrite" in capsys.readouterr().err
    for bad, message in ((["--start", "1", "--end", "0.1"], "start (1) must be below end (0.1)"),
                         (["--steps", "1"], "lr_find.steps: 1 is out of range")):
        assert main(["lr-find", "quickstart", *bad, "--output", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
