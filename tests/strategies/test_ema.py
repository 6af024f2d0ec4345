"""EMA of weights: equal to a hand computation, validated and saved as the run's weights, resumed exactly."""

from __future__ import annotations

import pytest
import torch
from timm.utils import ModelEmaV3

from imgtrain.api import train
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.checkpoint import load_training_state, load_weights
from imgtrain.engine.events import Hook, HookList
from imgtrain.engine.loop import Trainer, TrainParts
from imgtrain.engine.state import EpochPlan
from imgtrain.evaluation import evaluate
from imgtrain.strategies import EmaHook, build_strategies, ema_decay, ema_update
from imgtrain.tracking import read_history

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


def digits_recipe(*overrides: str):
    return load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.epochs=3",
                                      "output.progress=off", "output.plots=false", "train.threads=1", *overrides])


class StateRecorder(Hook):
    name = "recorder"

    def __init__(self):
        self.states = []

    def after_step(self, state):
        self.states.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})


def _fit(decay: float, warmup: bool, steps: int):
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    dataset = torch.utils.data.TensorDataset(images, torch.tensor(digits.target))
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=False)
    recipe = load_recipe(None, ["train.epochs=1", f"train.max_steps_per_epoch={steps}", "output.save_last=false",
                                "output.save_best=false", "schedule.name=constant", "optim.lr=0.05"])
    torch.manual_seed(0)
    # BatchNorm: its running statistics (float buffers) are averaged too, its step counter copied
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 10))
    ema, recorder = EmaHook(decay, warmup=warmup), StateRecorder()
    parts = TrainParts(model=model, loss_fn=torch.nn.CrossEntropyLoss(), loader_for=lambda size: loader,
                       plans=[EpochPlan(0, 8, recipe.data.batch_size)] * recipe.train.epochs,
                       classes=[str(i) for i in range(10)])
    trainer = Trainer(recipe, parts, HookList(strategies=[ema, recorder]))
    state = trainer.fit()
    return ema, recorder.states, state


@pytest.mark.parametrize("warmup", [True, False], ids=["warmup", "no-warmup"])
def test_ema_equals_hand_computation_after_k_steps(warmup):
    decay, k = 0.9, 12
    ema, weights, state = _fit(decay, warmup, k)
    assert len(weights) == k and ema.updates == k
    expected = {name: value.clone() for name, value in weights[0].items()}  # step 1 copies the weights
    for t in range(2, k + 1):
        # timm's warmup: 1 - (1 + steps since the first) ** (-2/3), capped at the decay
        d = min(decay, 1 - (1 + (t - 1)) ** (-2 / 3)) if warmup else decay
        for name, value in weights[t - 1].items():
            if value.is_floating_point():
                expected[name] = d * expected[name] + (1 - d) * value
            else:
                expected[name] = value.clone()
    got = ema.module.state_dict()
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-6, rtol=1e-5), name
    assert got["2.num_batches_tracked"].item() == k
    final = weights[-1]["1.weight"]
    assert not torch.allclose(got["1.weight"], final, atol=1e-4)  # an average, not the last weights
    assert state.eval_model is ema.module


def test_decay_and_update_functions_match_timm():
    model = torch.nn.Linear(3, 2)
    for warmup in (True, False):
        timm_ema = ModelEmaV3(model, decay=0.999, use_warmup=warmup)
        for step in (0, 1, 2, 3, 10, 100, 10_000, 10**6):
            assert ema_decay(step, 0.999, warmup) == pytest.approx(timm_ema.get_decay(step), abs=1e-12)
    ema_values = [torch.ones(4), torch.tensor([3])]
    ema_update(ema_values, [torch.zeros(4), torch.tensor([7])], decay=0.75)
    assert ema_values[0].tolist() == [0.75] * 4 and ema_values[1].tolist() == [7]


def test_validation_and_checkpoints_use_the_ema_weights(tmp_path):
    recipe = digits_recipe("ema.enabled=true", "ema.decay=0.99")
    # the non-finite loss guard is on by default (diagnostics.nonfinite: stop) and runs after the EMA
    assert [h.name for h in build_strategies(recipe)] == ["ema", "nonfinite_guard"]
    result = train(recipe, run_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    saved = load_training_state(ckpt / "last.state.pt")
    ema_weights = saved["hooks"]["ema"]["weights"]
    last, _ = load_weights(ckpt / "last.safetensors")
    for name, value in ema_weights.items():
        assert torch.equal(last[name], value), name
    assert not torch.equal(last["fc.weight"], saved["model"]["fc.weight"])  # not the raw weights
    # the val accuracy in the history is the EMA's: evaluating last.safetensors on val gives it back
    assert evaluate(ckpt / "last.safetensors", split="val")["acc"] == pytest.approx(result.history[-1]["val_acc"])
    assert result.summary["test_acc"] > 0.8


def test_ema_without_validate_keeps_training_weights_in_checkpoints(tmp_path):
    train(digits_recipe("ema.enabled=true", "ema.validate=false", "train.epochs=1"), run_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    saved = load_training_state(ckpt / "last.state.pt")
    last, _ = load_weights(ckpt / "last.safetensors")
    assert torch.equal(last["fc.weight"], saved["model"]["fc.weight"])
    assert not torch.equal(last["fc.weight"], saved["hooks"]["ema"]["weights"]["fc.weight"])


def test_resume_with_ema_and_mixing_gives_same_history(tmp_path, interrupt_at):
    overrides = ("train.deterministic=true", "ema.enabled=true", "ema.decay=0.99", "mix.mixup_alpha=0.3",
                 "mix.cutmix_alpha=1.0")
    full = train(digits_recipe(*overrides), run_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(digits_recipe(*overrides), run_dir=tmp_path / "cut", hooks=[interrupt_at(1, 5)])
    assert load_training_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")["epoch"] == 1
    resumed = train(digits_recipe(*overrides), resume=tmp_path / "cut")

    def metrics(rows):
        return [{k: r[k] for k in METRICS} for r in rows]

    assert metrics(resumed.history) == metrics(full.history)
    cut_rows, full_rows = (read_history(tmp_path / name / "history.csv") for name in ("cut", "full"))
    assert metrics(cut_rows) == metrics(full_rows)
    a = load_training_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")["hooks"]
    b = load_training_state(tmp_path / "full" / "checkpoints" / "last.state.pt")["hooks"]
    assert all(torch.equal(a["ema"]["weights"][k], v) for k, v in b["ema"]["weights"].items())
    assert a["ema"]["updates"] == b["ema"]["updates"] and torch.equal(a["mixing"]["generator"],
                                                                      b["mixing"]["generator"])
    assert resumed.summary["test_acc"] == full.summary["test_acc"]


@pytest.mark.parametrize("override, message", [
    ("ema.decay=1.5", "ema.decay: 1.5 is out of range: expected a value <= 1"),
    ("ema.decay=-0.1", "ema.decay: -0.1 is out of range: expected a value >= 0"),
    ("ema.enabled=maybe", "ema.enabled: expected true or false, got 'maybe'"),
])
def test_bad_ema_settings_are_recipe_errors(override, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [override])
    assert message in str(info.value)
