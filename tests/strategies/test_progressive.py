"""Progressive resizing on real training: stage sizes reach the model, batch sizes and lr scales
follow the plan, the schedule spans (or restarts per) stage, evaluation runs at eval_size,
torch.compile compiles once per shape, a resume is exact, and bad stages are refused."""

from __future__ import annotations

import math

import pytest
import torch

from imgtrain.api import load_trained, train
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.events import Hook
from imgtrain.strategies.progressive import (
    EpochPlan,
    describe_plans,
    lr_scale_for,
    plan_epochs,
    ramp_size,
    resize_batch,
)

TWO_STAGES = "progressive.stages=[{img_size: 8, batch_size: 128, epochs: 2}, {img_size: 16, epochs: 2}]"


def digits(*overrides: str):
    return load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", "augment.img_size=16", "output.progress=off",
                                      "output.plots=false", "train.threads=1", "data.batch_size=64",
                                      "train.epochs=4", *overrides])


class Recorder(Hook):
    """Input shapes and the lr of every batch, as the model sees them (after the strategies)."""

    name = "recorder"

    def __init__(self):
        self.shapes, self.lrs, self.batches = [], [], {}

    def batch_start(self, state):
        self.shapes.append((state.epoch, tuple(state.inputs.shape)))
        self.lrs.append(state.lr)
        self.batches[state.epoch] = self.batches.get(state.epoch, 0) + 1


def test_ramp_sizes_follow_the_ffcv_shape():
    # 12 -> 28 between epoch 0 and 7.5 of 10, rounded to multiples of 4
    assert [ramp_size(e, 10, 12, 28, 0.0, 0.75, 4) for e in range(10)] == [12, 16, 16, 20, 20, 24, 24, 28, 28, 28]
    # flat at min_size before ramp_start, at max_size after ramp_end
    assert [ramp_size(e, 10, 12, 28, 0.2, 0.6, 4) for e in range(10)] == [12, 12, 12, 16, 20, 24, 28, 28, 28, 28]
    assert lr_scale_for(512, 128, "linear") == 4.0 and lr_scale_for(512, 128, "sqrt") == 2.0
    assert lr_scale_for(512, 128, "none") == 1.0


def test_plan_of_stages_scales_the_lr_or_takes_the_stages_own():
    recipe = digits("optim.lr=0.1", "progressive.stages=[{img_size: 8, batch_size: 256, epochs: 1}, "
                    "{img_size: 12, lr: 0.02, epochs: 1}, {img_size: 16, epochs: 2}]")
    plans = plan_epochs(recipe, 16)
    assert plans == [EpochPlan(0, 8, 256, 4.0), EpochPlan(1, 12, 64, pytest.approx(0.2)),
                     EpochPlan(2, 16, 64, 1.0), EpochPlan(2, 16, 64, 1.0)]
    assert describe_plans(plans) == ("8 px, batch 256, lr x4, 1 epoch; 12 px, batch 64, lr x0.2, 1 epoch; "
                                     "16 px, batch 64, 2 epochs")
    ramp = plan_epochs(digits("progressive.min_size=8", "progressive.ramp_end=0.5"), 16)
    assert [p.img_size for p in ramp] == [8, 12, 16, 16] and [p.stage for p in ramp] == [0, 1, 2, 2]


def test_resize_batch_shrinks_with_antialiasing_and_keeps_a_batch_at_its_size():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 16, 16)
    assert resize_batch(images, 16) is images
    small = resize_batch(images, 8)
    assert small.shape == (3, 1, 8, 8)
    # the same pixels as the loader's antialiased resize (torchvision), so a stage at size s sees
    # what a pipeline built at s would make; the overall brightness is kept
    from torchvision.transforms.v2 import functional as TF
    assert torch.allclose(small, TF.resize(images, [8, 8], antialias=True), atol=1e-5)
    assert small.mean().item() == pytest.approx(images.mean().item(), abs=0.01)
    assert resize_batch(images.half(), 8).dtype == torch.float16


def test_stages_reach_the_model_with_their_batch_size_and_lr(tmp_path):
    recorder = Recorder()
    result = train(digits("schedule.name=constant", "optim.lr=0.05", TWO_STAGES), run_dir=tmp_path / "run",
                   hooks=[recorder])
    rows = result.history
    assert [(r["stage"], r["img_size"], r["batch_size"]) for r in rows] == [(1, 8, 128), (1, 8, 128),
                                                                           (2, 16, 64), (2, 16, 64)]
    # linear rule: batch 128 for an lr given at batch 64 -> twice the lr
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    sizes = {epoch: {shape[-1] for e, shape in recorder.shapes if e == epoch} for epoch in range(4)}
    assert sizes == {0: {8}, 1: {8}, 2: {16}, 3: {16}}
    full = {epoch: max(shape[0] for e, shape in recorder.shapes if e == epoch) for epoch in range(4)}
    assert full == {0: 128, 1: 128, 2: 64, 3: 64}
    seen = sum(shape[0] for e, shape in recorder.shapes if e == 0)
    assert recorder.batches[0] == math.ceil(seen / 128) and recorder.batches[2] == math.ceil(seen / 64)
    assert result.summary["test_acc"] > 0.5  # it learns, and the test pass ran at 16 px


def test_one_cycle_spans_the_whole_run_and_restart_repeats_it_per_stage(tmp_path):
    continuous, restart = Recorder(), Recorder()
    train(digits("schedule.name=onecycle", "optim.lr=0.05", TWO_STAGES), run_dir=tmp_path / "continuous",
          hooks=[continuous])
    train(digits("schedule.name=onecycle", "optim.lr=0.05", "progressive.schedule=restart", TWO_STAGES),
          run_dir=tmp_path / "restart", hooks=[restart])
    stage2 = continuous.batches[0] + continuous.batches[1]
    # one cycle over all steps: a single peak (the lr of stage 1 is scaled x2), ending near zero
    peak = max(range(len(continuous.lrs)), key=continuous.lrs.__getitem__)
    assert peak < stage2 and continuous.lrs[-1] < 1e-4
    # restart: stage 2 starts again from lr/div_factor and climbs to its own peak (0.05, unscaled)
    assert restart.lrs[stage2] == pytest.approx(0.05 / 25)
    assert max(restart.lrs[stage2:]) == pytest.approx(0.05, rel=0.05)
    assert max(restart.lrs[:stage2]) == pytest.approx(0.1, rel=0.05)
    assert restart.lrs[stage2 - 1] < 1e-4  # stage 1 annealed fully before the restart


def test_evaluation_runs_at_eval_size_and_the_checkpoint_says_so(tmp_path):
    result = train(digits("augment.img_size=24", "train.epochs=2", "progressive.eval_size=24",
                          "progressive.stages=[{img_size: 8, epochs: 1}, {img_size: 16, epochs: 1}]"),
                   run_dir=tmp_path / "run")
    loaded = load_trained(result.run_dir)
    assert loaded.img_size == 24
    image = torch.zeros(1, 8, 8, dtype=torch.uint8)  # an 8x8 digit as the source holds them
    assert loaded.eval_transform()(image).shape[-1] == 24
    default = train(digits("train.epochs=2",
                           "progressive.stages=[{img_size: 8, epochs: 1}, {img_size: 12, epochs: 1}]"),
                    run_dir=tmp_path / "default")
    assert load_trained(default.run_dir).img_size == 12  # the last stage's size


def test_compile_builds_one_graph_per_shape_not_per_batch(tmp_path, monkeypatch):
    from torch._dynamo.testing import CompileCounter

    from imgtrain.engine import device
    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(device.torch, "compile", lambda model, **kw: real_compile(model, backend=counter, **kw))
    torch._dynamo.reset()
    recorder = Recorder()
    train(digits("train.compile=true", "train.epochs=2", "data.test_fraction=0",
                 "progressive.stages=[{img_size: 8, epochs: 1}, {img_size: 16, epochs: 1}]"),
          run_dir=tmp_path / "run", hooks=[recorder])
    torch._dynamo.reset()
    shapes = {shape for _, shape in recorder.shapes}
    assert len(recorder.shapes) >= 20 and len(shapes) == 4  # full and last batch, at 8 and 16 px
    # one graph per train shape plus the eval shapes (full and last val batch at 16 px)
    assert counter.frame_count <= len(shapes) + 2


def test_a_resume_in_the_second_stage_gives_the_same_history(tmp_path, interrupt_at):
    overrides = ("train.deterministic=true", "progressive.schedule=restart", "schedule.name=cosine",
                 "progressive.lr_scaling=sqrt", TWO_STAGES)
    full = train(digits(*overrides), run_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(digits(*overrides), run_dir=tmp_path / "cut", hooks=[interrupt_at(epoch=2, batch=3)])
    resumed = train(digits(*overrides), resume=tmp_path / "cut")
    keep = ("train_loss", "val_loss", "val_acc", "lr", "stage", "img_size", "batch_size")
    assert [{k: r[k] for k in keep} for r in resumed.history] == [{k: r[k] for k in keep} for r in full.history]


@pytest.mark.parametrize("overrides, key, words", [
    (["progressive.stages=[{img_size: 16, epochs: 2}, {img_size: 8, epochs: 2}]"], "progressive.stages",
     "must increase"),
    (["progressive.stages=[{img_size: 8, epochs: 1}, {img_size: 16, epochs: 1}]"], "progressive.stages",
     "add up to 2 epochs but train.epochs is 4"),
    (["progressive.stages=[{img_size: 8, epochs: 2}, {img_size: 32, epochs: 2}]"], "progressive.stages",
     "larger than the 16 px"),
    (["progressive.min_size=16"], "progressive.min_size", "must be smaller"),
    (["data.sampler=per_class", "data.images_per_class=8", TWO_STAGES], "progressive.stages", "per_class"),
    (["progressive.min_size=8", TWO_STAGES], "progressive.min_size", "use one"),
])
def test_bad_stages_are_recipe_errors_before_any_run_folder(tmp_path, overrides, key, words):
    with pytest.raises(RecipeError) as error:
        train(digits(*overrides), run_dir=tmp_path / "run")
    assert error.value.key == key and words in str(error.value)
    assert not (tmp_path / "run").exists()
