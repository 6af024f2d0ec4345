"""Stochastic weight averaging (strategies/swa.py): real runs on digits, checked against a hand
computation of the average, of the BatchNorm statistics and of SWALR's lrs; kills inside the SWA phase."""

from __future__ import annotations

import copy
import math
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel

from imgtrain.api import train
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.events import Hook
from imgtrain.evaluation import evaluate
from imgtrain.strategies import STRATEGIES, enabled_strategies
from imgtrain.strategies.swa import Swa, anneal_steps, swa_lr_at, swa_lrs, swa_update, update_bn_with

BASE = ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "augment.pad_crop=0", "output.progress=off",
        "output.plots=false", "output.report=false", "train.threads=1", "train.epochs=3",
        "train.max_steps_per_epoch=8", "train.deterministic=true"]
SWA = ["swa.start_epoch=1", "swa.lr=0.02", "swa.anneal_epochs=1"]
KEEP = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def is_bn(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


class Recorder(Hook):
    """Reads a run the way a user's hook can: lrs per step, the raw weights each epoch, the validated
    weights each epoch, and the BatchNorm statistics recomputed by hand from the same batches."""

    name = "recorder"

    def __init__(self, start_epoch: int):
        self.start_epoch = start_epoch
        self.lrs: list[tuple[int, float]] = []
        self.raw: list[dict[str, torch.Tensor]] = []          # parameters at the end of each SWA epoch
        self.validated: dict[int, dict[str, torch.Tensor]] = {}   # history epoch -> eval weights
        self.bn_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (swa's, recomputed) per BN buffer
        self.raw_bn: list[torch.Tensor] = []
        self.shuffle_state: torch.Tensor | None = None

    def before_step(self, state):
        self.lrs.append((state.epoch, state.lr))  # the lr this step uses

    def after_step(self, state):
        # the shuffle generator as the epoch left it: SwaHook's BatchNorm pass starts from here
        self.shuffle_state = state.train_loader.generator.get_state()

    def before_eval(self, state):  # runs after SwaHook's (user hooks follow the strategies)
        if state.epoch < self.start_epoch:
            assert state.eval_model is None
            return
        self.raw.append({k: v.detach().clone() for k, v in state.model.named_parameters()})
        swa = state.eval_model
        again = copy.deepcopy(swa)
        with torch.random.fork_rng(devices=[]):   # leave the run's own random stream as it was
            state.train_loader.generator.set_state(self.shuffle_state)
            for module in again.modules():
                if is_bn(module):
                    module.reset_running_stats()
                    module.momentum = None      # equal average over the batches, as update_bn
            again.train()
            with torch.no_grad():
                for inputs, _ in islice(state.train_loader, state.steps_per_epoch):
                    again(state.prepare_batch(inputs))
        mine = dict(again.named_buffers())
        for key, value in swa.named_buffers():
            if key.endswith(("running_mean", "running_var")):
                self.bn_pairs.append((value.detach().clone(), mine[key].detach().clone()))
                self.raw_bn.append(dict(state.model.named_buffers())[key].detach().clone())

    def eval_end(self, state):
        model = state.eval_model if state.eval_model is not None else state.model
        self.validated[state.epoch + 1] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_swa_is_registered_between_ema_and_diagnostics():
    names = [s.name for s in STRATEGIES]
    assert names.index("ema") < names.index("swa") < names.index("diagnostics")
    assert "swa" in [s.name for s in enabled_strategies(load_recipe("quickstart", SWA))]
    assert "swa" not in [s.name for s in enabled_strategies(load_recipe("quickstart"))]


def test_the_average_bn_statistics_lrs_checkpoints_and_test_score(tmp_path):
    recorder = Recorder(start_epoch=1)
    result = train(load_recipe("quickstart", [*BASE, *SWA]), run_dir=tmp_path / "run", hooks=[recorder])
    swa = {k: v for k, v in recorder.validated[3].items()}

    # the averaged parameters are the mean of the raw parameters at the end of epochs 1 and 2 (0-based)
    assert len(recorder.raw) == 2 and result.summary["swa_models_averaged"] == 2
    for key in recorder.raw[0]:
        mean = (recorder.raw[0][key] + recorder.raw[1][key]) / 2
        torch.testing.assert_close(swa[key], mean.cpu(), rtol=0, atol=1e-6)
        assert not torch.allclose(recorder.raw[1][key], mean)  # the two points differ: a real average

    # BatchNorm statistics: recomputed for the averaged weights over the epoch's batches, not copied
    assert recorder.bn_pairs
    for (swa_stat, again), raw in zip(recorder.bn_pairs, recorder.raw_bn):
        torch.testing.assert_close(swa_stat, again, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(swa_stat, raw, atol=1e-4)

    # lr per step: the recipe's one-cycle in epoch 0, SWALR's cosine from there to 0.02 over one epoch
    # (8 optimizer steps), then 0.02
    lrs = [[lr for epoch, lr in recorder.lrs if epoch == e] for e in range(3)]
    start = lrs[1][0]
    assert start == pytest.approx(result.history[0]["lr"]) and start > 0.05
    assert lrs[1] == pytest.approx([swa_lr_at(k, start, 0.02, 8, "cos") for k in range(8)], rel=1e-9)
    assert lrs[2] == pytest.approx([0.02] * 8, rel=1e-12)
    assert [row["lr"] for row in result.history[1:]] == pytest.approx([0.02, 0.02], rel=1e-12)

    # best and last checkpoints hold the validated (averaged) weights of their epochs
    ckpt = result.run_dir / "checkpoints"
    last = load_file(str(ckpt / "last.safetensors"))
    for key, value in last.items():
        assert torch.equal(value, swa[key])
    best_epoch = result.summary["best_epoch"]
    assert best_epoch >= 2, "the SWA epochs should validate best here; pick a recipe where they do"
    best = load_file(str(ckpt / "best.safetensors"))
    for key, value in best.items():
        assert torch.equal(value, recorder.validated[best_epoch][key])

    # the test score is the saved SWA weights' score
    assert result.summary["test_weights"] == "best"
    assert evaluate(ckpt / "best.safetensors", split="test")["acc"] == pytest.approx(result.summary["test_acc"])


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_killed_inside_the_swa_phase_and_resumed_gives_the_same_run(schedule, tmp_path, interrupt_at):
    # SWA from epoch 1 with 1.5 epochs of annealing: the kill (epoch 2, batch 3) falls in the annealing,
    # with one model in the average. Cosine is a LambdaLR, which cannot load SWALR's state: the
    # checkpoint's schedule entry must stay the recipe schedule's.
    overrides = [*BASE, "swa.start_epoch=1", "swa.lr=0.03", "swa.anneal_epochs=1.5", "swa.anneal_strategy=linear",
                 f"schedule.name={schedule}"]
    full = train(load_recipe("quickstart", overrides), run_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe("quickstart", overrides), run_dir=tmp_path / "cut", hooks=[interrupt_at(2, 3)])
    resumed = train(load_recipe("quickstart", overrides), resume=tmp_path / "cut")
    assert [{k: r[k] for k in KEEP} for r in resumed.history] == [{k: r[k] for k in KEEP} for r in full.history]
    assert resumed.history[-1]["lr"] == pytest.approx(0.03, rel=1e-12)  # the annealing ended after 12 of its 16 steps
    assert resumed.summary["swa_models_averaged"] == full.summary["swa_models_averaged"] == 2
    assert resumed.summary["test_acc"] == full.summary["test_acc"]
    for name in ("last.safetensors", "best.safetensors"):
        a, b = (load_file(str(run / "checkpoints" / name)) for run in (tmp_path / "full", tmp_path / "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_swa_lr_the_recipe_schedule_runs_on(tmp_path):
    plain, swa = Recorder(start_epoch=99), Recorder(start_epoch=1)
    train(load_recipe("quickstart", BASE), run_dir=tmp_path / "plain", hooks=[plain])
    result = train(load_recipe("quickstart", [*BASE, "swa.start_epoch=1"]), run_dir=tmp_path / "swa", hooks=[swa])
    assert swa.lrs == plain.lrs
    assert result.summary["swa_models_averaged"] == 2
    assert result.history[-1]["val_acc"] > 0.5  # averaged weights near the end of one-cycle still score


def test_a_start_epoch_past_the_run_is_a_recipe_error_before_any_folder(tmp_path):
    recipe_file = tmp_path / "swa_late.yaml"
    recipe_file.write_text("extends: quickstart\ntrain:\n  epochs: 3\nswa:\n  start_epoch: 3\n  lr: 0.02\n")
    recipe = load_recipe(recipe_file, BASE[:1])
    with pytest.raises(RecipeError) as caught:
        train(recipe, run_dir=tmp_path / "run")
    message = str(caught.value)
    assert str(recipe_file) in message and "line 5" in message and "swa.start_epoch" in message
    assert "start SWA at 2 or earlier" in message
    assert not (tmp_path / "run").exists()
    # an override is named as such
    with pytest.raises(RecipeError, match=r"^command line: swa.start_epoch: 7 is not an epoch"):
        Swa().check(load_recipe(recipe_file, ["swa.start_epoch=7"]))


def test_recipe_errors_for_a_lone_swa_lr_and_for_a_validated_ema(tmp_path):
    recipe_file = tmp_path / "swa_lr.yaml"
    recipe_file.write_text("extends: quickstart\nswa:\n  lr: 0.02\n")
    with pytest.raises(RecipeError, match=r"line 3: swa.lr: .*SWA is off"):
        load_recipe(recipe_file)
    with pytest.raises(RecipeError, match="swa.start_epoch: SWA and ema.validate"):
        Swa().check(load_recipe("quickstart", [*SWA, "ema.enabled=true"]))
    Swa().check(load_recipe("quickstart", [*SWA, "ema.enabled=true", "ema.validate=false"]))


def test_the_pure_functions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    averaged = AveragedModel(model)
    points, batches = [], [(torch.randn(5, 3), torch.zeros(5)) for _ in range(3)]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        points.append([p.detach().clone() for p in model.parameters()])
        swa_update(averaged, model, batches, limit=2)
    for got, *seen in zip(averaged.module.parameters(), *points):
        torch.testing.assert_close(got, sum(seen) / 3)
    # BN: the equal average of the first two batches' statistics under the averaged first layer
    first = averaged.module[0]
    with torch.no_grad():
        means = [first(x).mean(0) for x, _ in batches[:2]]
        variances = [first(x).var(0, unbiased=True) for x, _ in batches[:2]]
    torch.testing.assert_close(averaged.module[1].running_mean, sum(means) / 2)
    torch.testing.assert_close(averaged.module[1].running_var, sum(variances) / 2)

    def untouchable():
        raise AssertionError("a model without BatchNorm reads no batch")
        yield
    update_bn_with(torch.nn.Linear(3, 2), untouchable())

    assert anneal_steps(1.5, 10, grad_accum_steps=3) == 6     # ceil(10 / 3) = 4 steps per epoch
    assert swa_lrs([0.1, 0.05, 0.1], 0.02) == pytest.approx([0.02, 0.01, 0.02])
    assert swa_lr_at(0, 0.1, 0.02, 4) == 0.1 and swa_lr_at(4, 0.1, 0.02, 4) == 0.02
    assert swa_lr_at(2, 0.1, 0.02, 4, "linear") == pytest.approx(0.06)
    assert swa_lr_at(2, 0.1, 0.02, 4, "cos") == pytest.approx(0.06) and math.isclose(swa_lr_at(9, 1, 0, 0), 0)
