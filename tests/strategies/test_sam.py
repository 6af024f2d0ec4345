"""SAM and ASAM: one step of the real loop equals the update computed by hand (plain, accumulated,
clipped, under a GradScaler), the perturbation ignores the grad scale and steps aside for non-finite
gradients, and hooks that sum per batch count a replayed group once."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from imgtrain.api import train
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.checkpoint import load_training_state
from imgtrain.engine.events import Hook
from imgtrain.strategies import STRATEGIES, perturb_weights, restore_weights, sam_perturbation

BASE = ("model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.threads=1", "output.progress=off",
        "output.plots=false", "output.report=false", "train.epochs=1", "train.deterministic=true",
        "data.batch_size=32", "model.drop_rate=0", "train.label_smoothing=0", "optim.momentum=0",
        "optim.nesterov=false", "optim.weight_decay=0", "schedule.name=constant", "optim.lr=0.1")


def digits(*overrides: str):
    return load_recipe("quickstart", [*BASE, *overrides])


class Recorder(Hook):
    """Watches a run: the starting model, every forward pass (step, pass), the first step's batches per
    pass, the gradients the optimizer steps with, the weights and the grad scale after each step."""

    name = "recorder"

    def __init__(self):
        self.start: torch.nn.Module | None = None
        self.forwards: list[tuple[int, int]] = []
        self.batches: dict[int, list] = {0: [], 1: []}
        self.grads: list[list[torch.Tensor]] = []
        self.lrs: list[float] = []
        self.weights: list[list[torch.Tensor]] = []
        self.scales: list[float] = []

    def fit_start(self, state):
        self.start = copy.deepcopy(state.model)

    def after_forward(self, state):
        self.forwards.append((state.step, state.pass_index))
        if state.step == 0:
            self.batches[state.pass_index].append((state.inputs.clone(), state.targets.clone()))

    def before_step(self, state):
        self.grads.append([p.grad.clone() for p in state.model.parameters()])
        self.lrs.append(state.lr)

    def after_step(self, state):
        self.weights.append([p.detach().clone() for p in state.model.parameters()])
        self.scales.append(state.scaler.get_scale() if state.scaler is not None else 1.0)


class CpuScaler(Hook):
    """A GradScaler on CPU fp32 (the loop makes one only for CUDA fp16): the scaled-gradient path of the step."""

    name = "cpu_scaler"

    def fit_start(self, state):
        state.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)


class GradientOverflowAt(Hook):
    """The given optimizer step's first backward pass overflows (as fp16 gradients do): its gradients are
    inf/nan while the loss stays finite."""

    name = "gradient_overflow"

    def __init__(self, step: int):
        self.step = step

    def after_forward(self, state):
        if state.step == self.step and state.pass_index == 0:
            state.outputs.register_hook(lambda grad: grad * math.inf)


def hand_sam_step(model, batches, rho, adaptive, lr, clip=None):
    """SAM's update in plain PyTorch: gradient at w (mean over the batches), e, gradient at w + e,
    clipped, one SGD step from w. Returns (new weights, gradient stepped with, gradient at w)."""
    model = copy.deepcopy(model).train()
    params = list(model.parameters())

    def gradient():
        model.zero_grad(set_to_none=True)
        for inputs, targets in batches:
            (F.cross_entropy(model(inputs), targets) / len(batches)).backward()
        return [p.grad.clone() for p in params]

    g = gradient()
    with torch.no_grad():
        if adaptive:
            norm = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(params, g)))
            e = [rho * p * p * gi / norm for p, gi in zip(params, g)]
        else:
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
            e = [rho * gi / norm for gi in g]
        w = [p.clone() for p in params]
        for p, ei in zip(params, e):
            p.add_(ei)
    g_sam = gradient()
    if clip is not None:
        total = torch.sqrt(sum((gi ** 2).sum() for gi in g_sam))
        g_sam = [gi * min(1.0, clip / (float(total) + 1e-6)) for gi in g_sam]
    return [wi - lr * gi for wi, gi in zip(w, g_sam)], g_sam, g


def assert_close(actual, expected, atol=1e-6):
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def max_difference(first, second) -> float:
    return max(float((a - b).detach().abs().max()) for a, b in zip(first, second))


# ----------------------------------------------------------------------------- the step, by hand


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 1.0)], ids=["sam", "asam"])
def test_one_step_of_the_loop_is_the_sam_update_by_hand(adaptive, rho, tmp_path):
    recorder = Recorder()
    train(digits("train.max_steps_per_epoch=1", f"optim.sam={{rho: {rho}, adaptive: {str(adaptive).lower()}}}"),
          run_dir=tmp_path / "run", hooks=[recorder])
    assert recorder.forwards == [(0, 0), (0, 1)]  # one batch, two passes
    inputs, targets = recorder.batches[0][0]
    assert torch.equal(recorder.batches[1][0][0], inputs)  # the replay is the same batch
    expected, g_sam, g = hand_sam_step(recorder.start, [(inputs, targets)], rho, adaptive, recorder.lrs[0])
    assert recorder.lrs[0] == pytest.approx(0.1)
    assert_close(recorder.grads[0], g_sam)    # the optimizer stepped with the gradient at w + e(w)
    assert_close(recorder.weights[0], expected)  # from w, restored exactly
    plain = [p.detach() - 0.1 * gi for p, gi in zip(recorder.start.parameters(), g)]
    assert max_difference(recorder.weights[0], plain) > 1e-4  # and that is not plain SGD's step
    # BatchNorm's running statistics moved once, by the first pass at w
    reference = copy.deepcopy(recorder.start).train()
    with torch.no_grad():
        reference(inputs)
    first_norm = next(m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d))
    saved = load_training_state(tmp_path / "run" / "checkpoints" / "last.state.pt")["model"]
    running_mean = next(value for name, value in saved.items() if name.endswith("running_mean"))
    torch.testing.assert_close(running_mean, first_norm.running_mean)


def test_accumulation_perturbs_with_the_group_gradient_and_replays_both_batches(tmp_path):
    recorder = Recorder()
    train(digits("train.grad_accum_steps=2", "train.max_steps_per_epoch=4", "optim.sam={rho: 0.05}"),
          run_dir=tmp_path / "run", hooks=[recorder])
    # 4 forward passes per optimizer step: both batches at w, then both again at w + e(w)
    assert recorder.forwards == [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0), (1, 1), (1, 1)]
    batches = recorder.batches[0]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, recorder.batches[1]))
    assert not torch.equal(batches[0][0], batches[1][0])
    expected, g_sam, _ = hand_sam_step(recorder.start, batches, 0.05, False, recorder.lrs[0])
    assert_close(recorder.grads[0], g_sam)
    assert_close(recorder.weights[0], expected)
    # e from one batch's gradient alone would give another step
    one_batch, _, _ = hand_sam_step(recorder.start, batches[1:], 0.05, False, recorder.lrs[0])
    assert max_difference(expected, one_batch) > 1e-4


def test_clipping_clips_the_second_pass_gradient(tmp_path):
    recorder = Recorder()
    train(digits("train.max_steps_per_epoch=1", "train.clip_grad_norm=0.05", "optim.sam={rho: 0.05}"),
          run_dir=tmp_path / "run", hooks=[recorder])
    batch = recorder.batches[0]
    expected, clipped, g = hand_sam_step(recorder.start, batch, 0.05, False, recorder.lrs[0], clip=0.05)
    _, unclipped, _ = hand_sam_step(recorder.start, batch, 0.05, False, recorder.lrs[0])
    assert float(torch.sqrt(sum((gi ** 2).sum() for gi in unclipped))) > 0.5  # clipping is at work
    assert float(torch.sqrt(sum((gi ** 2).sum() for gi in recorder.grads[0]))) == pytest.approx(0.05, rel=1e-4)
    assert_close(recorder.grads[0], clipped)
    assert_close(recorder.weights[0], expected)
    g_clipped = [gi * 0.05 / float(torch.sqrt(sum((x ** 2).sum() for x in g))) for gi in g]
    assert max_difference(recorder.grads[0], g_clipped) > 1e-5  # not the first pass's gradient, clipped


# ----------------------------------------------------------------------------- the grad scaler


def _parameters_with_gradients(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=generator, requires_grad=True),
              torch.randn(5, generator=generator, requires_grad=True),
              torch.randn(2, requires_grad=False)]  # frozen: no gradient, not perturbed
    for p in params[:2]:
        p.grad = torch.randn(p.shape, generator=generator)
    return params


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_the_perturbation_ignores_the_grad_scale(adaptive):
    params = _parameters_with_gradients()
    e = sam_perturbation(params, rho=0.05, adaptive=adaptive)
    for p in params[:2]:
        p.grad *= 1024.0  # as a GradScaler leaves them before unscale_
    scaled = sam_perturbation(params, rho=0.05, adaptive=adaptive)
    assert e[2] is None and scaled[2] is None
    assert_close(scaled[:2], e[:2], atol=1e-8)
    # its size: rho for SAM; for ASAM, rho measured in |w| units (||e / |w| || = rho)
    size = e if not adaptive else [ei / p.abs() for ei, p in zip(e[:2], params)]
    assert float(torch.sqrt(sum((x.detach() ** 2).sum() for x in size[:2]))) == pytest.approx(0.05, rel=1e-5)
    before = [p.detach().clone() for p in params]
    saved = perturb_weights(params, e)
    assert max_difference(params[:2], before[:2]) > 1e-3 and torch.equal(params[2], before[2])
    restore_weights(params, saved)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # bit for bit


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_gradient_gives_no_perturbation(bad):
    params = _parameters_with_gradients()
    params[1].grad[3] = bad
    assert sam_perturbation(params, rho=0.05) is None
    assert sam_perturbation(params, rho=1.0, adaptive=True) is None


def test_under_a_grad_scaler_the_step_is_the_same_and_an_overflow_skips_sam_and_the_step(tmp_path):
    recorder = Recorder()
    train(digits("train.max_steps_per_epoch=3", "optim.sam={rho: 0.05}"), run_dir=tmp_path / "run",
          hooks=[CpuScaler(), GradientOverflowAt(step=1), recorder])
    # step 0: scaled gradients at w, e(w) from them, unscaled before the step: SAM's update exactly
    expected, g_sam, _ = hand_sam_step(recorder.start, recorder.batches[0], 0.05, False, recorder.lrs[0])
    assert_close(recorder.grads[0], g_sam)
    assert_close(recorder.weights[0], expected)
    # step 1 overflowed: no perturbation, no second pass, no step, the scale halved; step 2 is SAM again
    assert recorder.forwards == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]
    assert all(torch.equal(a, b) for a, b in zip(recorder.weights[1], recorder.weights[0]))
    assert recorder.scales == [1024.0, 512.0, 512.0]
    assert max_difference(recorder.weights[2], recorder.weights[1]) > 1e-4
    assert all(bool(torch.isfinite(w).all()) for w in recorder.weights[2])


# ----------------------------------------------------------------------------- recipe and other hooks


def test_recipe_forms_and_errors():
    assert load_recipe("quickstart").optim.sam is None
    on = load_recipe("quickstart", ["optim.sam={rho: 0.05, adaptive: true}"]).optim.sam
    assert (on.rho, on.adaptive) == (0.05, True)
    assert load_recipe("quickstart", ["optim.sam.rho=0.1"]).optim.sam.rho == 0.1
    assert load_recipe("quickstart", ["optim.sam={}"]).optim.sam.rho == 0.05
    assert load_recipe("sam").optim.sam.rho == 0.05
    assert "sam" in [s.name for s in STRATEGIES]
    with pytest.raises(RecipeError, match=r"optim\.sam\.rho: 0\.0 is out of range"):
        load_recipe("quickstart", ["optim.sam.rho=0"])
    with pytest.raises(RecipeError, match=r"optim\.sam: expected a mapping of its keys \(rho, adaptive\)"):
        load_recipe("quickstart", ["optim.sam=true"])
    with pytest.raises(RecipeError, match=r"did you mean optim\.sam\.rho"):
        load_recipe("quickstart", ["optim.sam.rh=0.1"])


def test_distillation_counts_a_replayed_batch_once(tmp_path):
    teacher = tmp_path / "teacher"
    train(digits("train.max_steps_per_epoch=2"), run_dir=teacher)
    run = train(digits("train.max_steps_per_epoch=4", "optim.sam={rho: 0.05}", f"distill.teacher={teacher}",
                       "distill.alpha=0.3", "distill.temperature=2.0"), run_dir=tmp_path / "student")
    row = run.history[0]
    # train_loss is the first pass's (at w); the per-epoch terms must be of the same batches
    assert row["train_loss"] == pytest.approx(0.3 * row["train_ce"] + 0.7 * row["train_kd"], rel=1e-5)


def test_self_paced_curriculum_scores_each_batch_once(tmp_path):
    run = train(digits("train.max_steps_per_epoch=4", "optim.sam={rho: 0.05}", "curriculum.difficulty=self_paced",
                       "curriculum.start_fraction=0.5"), run_dir=tmp_path / "run")
    seen = load_training_state(run.run_dir / "checkpoints" / "last.state.pt")["hooks"]["curriculum"]["seen"]
    # 4 batches of 32 drawn from a shuffled pool of ~580 images: at most 128 images scored (a replay
    # advancing the curriculum's cursor would score the next batch's images instead, ~256)
    assert 100 <= int(seen.sum()) <= 4 * 32
