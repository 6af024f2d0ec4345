"""Learning-rate and momentum values of every schedule at known steps; optimizer groups."""


import pytest
import torch

from imgtrain.config import ModelConfig, OptimConfig, ScheduleConfig
from imgtrain.engine.optim import build_optimizer, build_scheduler, param_groups_weight_decay
from imgtrain.models import create_model

SCHEDULES = ("constant", "step", "multistep", "cosine", "warmup_cosine", "onecycle")


def lrs(schedule: ScheduleConfig, optim: OptimConfig, total: int, per_epoch: int):
    model = torch.nn.Linear(4, 2)
    opt = build_optimizer(model, optim)
    sched = build_scheduler(opt, schedule, optim.lr, total, per_epoch)
    values, moms = [], []
    for _ in range(total):
        values.append(opt.param_groups[0]["lr"])
        group = opt.param_groups[0]
        moms.append(group["betas"][0] if "betas" in group else group["momentum"])
        opt.step()
        sched.step()
    return values, moms


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_runs_and_stays_in_range(name):
    cfg = ScheduleConfig(name=name, warmup_epochs=1 if name == "warmup_cosine" else 0, step_epochs=2,
                         milestones=[2, 4])
    values, _ = lrs(cfg, OptimConfig(lr=0.1), total=60, per_epoch=10)
    assert len(values) == 60
    assert all(0 <= v <= 0.1 + 1e-12 for v in values)
    assert max(values) == pytest.approx(0.1, rel=1e-6)


def test_step_and_multistep_values():
    values, _ = lrs(ScheduleConfig(name="step", step_epochs=2, gamma=0.5), OptimConfig(lr=0.1), 60, 10)
    assert values[19] == pytest.approx(0.1) and values[20] == pytest.approx(0.05) and values[40] == pytest.approx(0.025)
    values, _ = lrs(ScheduleConfig(name="multistep", milestones=[1, 3], gamma=0.1), OptimConfig(lr=0.1), 50, 10)
    assert values[9] == pytest.approx(0.1) and values[10] == pytest.approx(0.01) and values[30] == pytest.approx(0.001)


def test_warmup_cosine_values():
    cfg = ScheduleConfig(name="warmup_cosine", warmup_epochs=1, warmup_start_factor=0.0, min_lr=0.001)
    values, _ = lrs(cfg, OptimConfig(lr=0.1), total=110, per_epoch=10)
    assert values[0] == pytest.approx(0.0)
    assert values[5] == pytest.approx(0.05)              # halfway through the 10 warmup steps
    assert values[10] == pytest.approx(0.1)               # peak right after warmup
    assert values[60] == pytest.approx(0.001 + (0.1 - 0.001) * 0.5)  # half of the 100 decay steps
    assert values[-1] > 0.001 and values[-1] < 0.0011


def test_onecycle_lr_and_momentum_cycle():
    cfg = ScheduleConfig(name="onecycle", pct_start=0.25, div_factor=25, final_div_factor=1e4,
                         base_momentum=0.85, max_momentum=0.95)
    values, moms = lrs(cfg, OptimConfig(lr=0.4, momentum=0.9), total=101, per_epoch=10)
    assert values[0] == pytest.approx(0.4 / 25)
    peak = values.index(max(values))
    # torch's OneCycleLR peaks at step pct_start * total - 1 (24.25 here): the peak falls on step 24 or 25
    assert peak in (24, 25) and values[peak] == pytest.approx(0.4, rel=1e-3)
    assert moms[0] == pytest.approx(0.95) and moms[peak] == pytest.approx(0.85, rel=1e-3)  # momentum moves inversely
    assert values[-1] < 0.4 / 25 / 1e4 * 1.01 and values[-1] > 0
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))  # monotone decay after the peak


def test_onecycle_cycles_adamw_beta1():
    _, moms = lrs(ScheduleConfig(name="onecycle"), OptimConfig(name="adamw", lr=0.01), total=40, per_epoch=10)
    assert moms[0] == pytest.approx(0.95) and min(moms) == pytest.approx(0.85)


def test_no_weight_decay_on_norm_and_bias():
    model = create_model(ModelConfig(name="imgtrain_cnn_tiny"), num_classes=3, in_chans=1)
    groups = param_groups_weight_decay(model, 5e-4)
    decay, no_decay = groups
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 5e-4
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == total
    everything = param_groups_weight_decay(model, 5e-4, decay_norm_and_bias=True)
    assert len(everything) == 1


def test_sgd_is_nesterov():
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="sgd", momentum=0.9))
    assert opt.param_groups[0]["nesterov"] is True
    assert isinstance(build_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="adamw", lr=1e-3)), torch.optim.AdamW)
