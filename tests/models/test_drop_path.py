"""model.drop_path_rate reaches timm models that have stochastic depth, and only them."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath

from imgtrain.config import ModelConfig
from imgtrain.models import create_model


def _drop_paths(model):
    return [m for m in model.modules() if isinstance(m, DropPath)]


def test_drop_path_rate_reaches_a_timm_resnet():
    plain = create_model(ModelConfig(name="test_resnet"), num_classes=3, in_chans=1)
    assert _drop_paths(plain) == []  # 0 (the default) adds nothing
    # zero_init_last off: timm zeroes each block's last BN at init, and a zero branch dropped changes nothing
    cfg = ModelConfig(name="test_resnet", drop_path_rate=0.3, kwargs={"zero_init_last": False})
    model = create_model(cfg, num_classes=3, in_chans=1)
    rates = [m.drop_prob for m in _drop_paths(model)]
    assert len(rates) >= 2 and max(rates) == pytest.approx(0.3)  # timm ramps it up with depth
    assert rates == sorted(rates)
    # stochastic in training, deterministic in evaluation
    torch.manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_our_nets_accept_and_ignore_drop_path_rate():
    model = create_model(ModelConfig(name="imgtrain_cnn_tiny", drop_path_rate=0.2), num_classes=10, in_chans=1)
    assert _drop_paths(model) == []
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
