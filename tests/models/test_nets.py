"""Every imgtrain net registered in timm's registry keeps timm's model contract: features_only with
out_indices and feature_info, forward_features/forward_head(pre_logits), num_features and
head_hidden_size, reset_classifier, global_pool, TorchScript and FX, on real tensors."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import FeatureListNet
from timm.models._features_fx import FeatureGraphNet, create_feature_extractor

from imgtrain.evaluation.explain import find_target_layer
from imgtrain.models import OUR_MODELS  # importing imgtrain.models registers our nets in timm

NETS = timm.list_models("imgtrain_*")


def test_every_net_of_ours_is_in_timms_registry():
    assert sorted(NETS) == sorted(OUR_MODELS)


def _net(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).eval()


def _stage_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of each stage of the whole net, the reference for the feature extractor."""
    outputs = []
    x = model.stem(x)
    for stage in model.stages:
        x = stage(x)
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("out_indices", [None, (1, 2), (0,), (-1,)])
def test_features_only_gives_the_stages_that_feature_info_describes(name, out_indices):
    kwargs = {} if out_indices is None else {"out_indices": out_indices}
    # the same seed, so the extractor and the classifier get the same weights
    extractor = _net(name, features_only=True, in_chans=1, **kwargs)
    full = _net(name, num_classes=10, in_chans=1)
    assert isinstance(extractor, FeatureListNet)
    stages = len(full.feature_info)
    wanted = list(range(stages)) if out_indices is None else [i % stages for i in out_indices]
    assert extractor.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in wanted]
    assert extractor.feature_info.reduction() == [full.feature_info[i]["reduction"] for i in wanted]
    assert extractor.feature_info.module_name() == [f"stages.{i}" for i in wanted]

    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = extractor(x)
        reference = _stage_outputs(full, x)
    assert len(features) == len(wanted)
    for feature, index, channels, reduction in zip(features, wanted, extractor.feature_info.channels(),
                                                   extractor.feature_info.reduction()):
        assert feature.shape == (2, channels, 32 // reduction, 32 // reduction)
        torch.testing.assert_close(feature, reference[index], rtol=0, atol=0)
    # the last stage is what the classifier pools
    if wanted[-1] == stages - 1:
        torch.testing.assert_close(features[-1], full.forward_features(x).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", NETS)
def test_reductions_are_the_real_strides(name):
    model = _net(name, num_classes=3)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outputs = _stage_outputs(model, x)
    assert [32 // o.shape[-1] for o in outputs] == [info["reduction"] for info in model.feature_info]
    assert [o.shape[1] for o in outputs] == [info["num_chs"] for info in model.feature_info]
    assert model.feature_info[-1]["num_chs"] == model.num_features


@pytest.mark.parametrize("name", NETS)
def test_forward_head_pre_logits_and_the_classifier(name):
    model = _net(name, num_classes=7, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
        out = model(x)
    assert model.head_hidden_size == model.num_features == features.shape[1]
    assert pre_logits.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(pre_logits, features.mean(dim=(2, 3)))  # global average pooling
    torch.testing.assert_close(logits, out, rtol=0, atol=0)
    torch.testing.assert_close(out, model.get_classifier()(pre_logits), rtol=0, atol=0)
    assert out.shape == (2, 7) and model.num_classes == 7


@pytest.mark.parametrize("name", NETS)
def test_reset_classifier(name):
    model = _net(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        assert model.get_classifier().out_features == 5
        model.reset_classifier(0)  # no head: the model returns its pooled features
        assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)
        torch.testing.assert_close(model(x), features.mean(dim=(2, 3)))
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(0, global_pool="max")
        torch.testing.assert_close(model(x), features.amax(dim=(2, 3)))
        model.reset_classifier(0, global_pool="")  # no pooling either: the feature map itself
        torch.testing.assert_close(model(x), features, rtol=0, atol=0)
        with pytest.raises(ValueError, match="needs num_classes=0, not 3"):
            model.reset_classifier(3)  # still unpooled: a linear head cannot take the map
        model.reset_classifier(3, global_pool="catavgmax")  # two poolings side by side
        assert model.get_classifier().in_features == 2 * model.num_features
        model.reset_classifier(0)
        both = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        torch.testing.assert_close(model(x), both)
    with pytest.raises(ValueError, match="needs num_classes=0, not 10"):
        timm.create_model(name, num_classes=10, global_pool="")


@pytest.mark.parametrize("name", NETS)
def test_global_pool_and_drop_rate_arguments(name):
    x = torch.randn(2, 3, 16, 16)
    model = _net(name, num_classes=4, global_pool="max")
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled, model.forward_features(x).amax(dim=(2, 3)))
    dropped = _net(name, num_classes=4, drop_rate=0.5)
    assert dropped.drop_rate == 0.5 and dropped.head_drop.p == 0.5
    dropped.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.equal(dropped(x), dropped(x))  # dropout in training
        dropped.eval()
        assert torch.equal(dropped(x), dropped(x))


@pytest.mark.parametrize("name", NETS)
def test_state_dict_names_and_layer_groups_stay(name):
    # existing checkpoints load by these names; pooling and dropout hold no tensors
    model = _net(name, num_classes=10)
    assert {key.split(".")[0] for key in model.state_dict()} == {"stem", "stages", "fc"}
    assert model.pretrained_cfg["first_conv"] == "stem.0" and model.pretrained_cfg["classifier"] == "fc"
    assert model.group_matcher() == {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}
    # Grad-CAM's default layer is the last feature_info entry: the last stage
    assert find_target_layer(model)[0] == f"stages.{len(model.stages) - 1}"


# recent torch marks TorchScript deprecated; timm still supports it for its models, so do we
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_torchscript_matches_eager(name, in_chans):
    model = _net(name, num_classes=6, in_chans=in_chans)
    x = torch.randn(2, in_chans, 32, 32)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x))
    extractor = torch.jit.script(_net(name, features_only=True, in_chans=in_chans))
    with torch.no_grad():
        for scripted_map, reference in zip(extractor(x), _stage_outputs(model, x)):
            torch.testing.assert_close(scripted_map, reference)


@pytest.mark.parametrize("name", NETS)
def test_fx_tracing_matches_eager(name):
    model = _net(name, num_classes=6, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
        # timm's FX feature extraction, by module name as feature_info gives it
        nodes = {info["module"]: str(i) for i, info in enumerate(model.feature_info)} | {"fc": "logits"}
        extracted = create_feature_extractor(model, return_nodes=nodes)(x)
        torch.testing.assert_close(extracted["logits"], model(x), rtol=0, atol=0)
        for i, reference in enumerate(_stage_outputs(model, x)):
            torch.testing.assert_close(extracted[str(i)], reference, rtol=0, atol=0)
        graph_net = _net(name, features_only=True, feature_cls="fx", in_chans=1, out_indices=(0, 2))
        assert isinstance(graph_net, FeatureGraphNet)
        maps = graph_net(x)
        reference = _stage_outputs(model, x)
        torch.testing.assert_close(maps[0], reference[0], rtol=0, atol=0)
        torch.testing.assert_close(maps[1], reference[2], rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["group", "none"])
def test_norm_choice_does_not_depend_on_the_batch(norm):
    """model.kwargs.norm: group or none: no BatchNorm layer is left, and an image's logits in training mode
    are the same alone or in a batch (what makes several small per-process batches train like one big one)."""
    net = timm.create_model("imgtrain_cnn_tiny", num_classes=10, in_chans=1, norm=norm).train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    images = torch.randn(6, 1, 8, 8)
    assert torch.allclose(net(images)[:2], net(images[:2]), atol=1e-5)


def test_a_groupnorm_net_learns_digits(tmp_path):
    from imgtrain.api import train
    from imgtrain.config import load_recipe

    norm = "group"
    result = train(load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", f"model.kwargs={{norm: {norm}}}",
                                              "augment.img_size=8", "train.epochs=2", "train.threads=1",
                                              "output.progress=off", "output.plots=false", "output.report=false"]),
                   run_dir=tmp_path / "run")
    assert result.history[-1]["val_acc"] > 0.5  # chance is 0.1


def test_an_unknown_norm_is_a_model_error_naming_the_choices():
    from imgtrain.config import ModelConfig
    from imgtrain.models import create_model
    from imgtrain.models.create import ModelError

    with pytest.raises(ModelError, match="model.kwargs: imgtrain_cnn_tiny: norm must be one of batch, group, none"):
        create_model(ModelConfig(name="imgtrain_cnn_tiny", kwargs={"norm": "batchy"}), num_classes=10, in_chans=1)


def test_a_model_too_deep_for_the_images_is_refused_before_training(tmp_path, capsys):
    """convnext_atto downsamples 32x: 8x8 digits cannot pass; the run says so (no traceback, no run folder),
    and a run at a size it takes still trains."""
    from imgtrain.cli import main

    run = tmp_path / "run"
    assert main(["train", "quickstart", "model.name=convnext_atto", "train.epochs=1", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "model.name: convnext_atto cannot take 8x8 px images" in err and "augment.img_size" in err
    assert "Traceback" not in err and not run.exists()
    # progressive resizing: the smallest stage counts, not only the final size
    assert main(["train", "quickstart", "model.name=convnext_atto", "augment.img_size=32", "train.epochs=2",
                 "progressive.stages=[{img_size: 16, epochs: 1}, {img_size: 32, epochs: 1}]",
                 "--run-dir", str(run)]) == 2
    assert "convnext_atto cannot take 16x16 px images" in capsys.readouterr().err and not run.exists()
    assert main(["train", "quickstart", "model.name=resnet10t", "augment.img_size=32", "train.epochs=1",
                 "train.threads=1", "output.progress=off", "--run-dir", str(run)]) == 0
    assert (run / "summary.json").is_file()


def test_model_kwargs_reshape_a_named_net():
    """model.kwargs widths and depths replace a named net's own (what the fast recipes use); depth 0 leaves a
    stage with only its pooling, and the features, Grad-CAM layer and parameter count follow the new shape."""
    from imgtrain.config import ModelConfig
    from imgtrain.models import create_model
    from imgtrain.models.create import ModelError
    from imgtrain.models.nets import SmallConvNet

    shape = {"widths": [32, 64, 128, 256], "depths": [0, 1, 1, 1]}
    net = create_model(ModelConfig(name="imgtrain_cnn_small", kwargs=shape), num_classes=10, in_chans=1)
    reference = SmallConvNet(widths=(32, 64, 128, 256), depths=(0, 1, 1, 1), in_chans=1, num_classes=10)
    assert [tuple(p.shape) for p in net.parameters()] == [tuple(p.shape) for p in reference.parameters()]
    assert len(net.stages[0]) == 0 and net.num_features == 256 and net.fc.in_features == 256
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    features = timm.create_model("imgtrain_cnn_small", features_only=True, in_chans=1, **shape)
    assert features.feature_info.channels() == [32, 64, 128, 256]
    assert [tuple(m.shape[1:]) for m in features(torch.randn(1, 1, 28, 28))] == [(32, 28, 28), (64, 14, 14),
                                                                               (128, 7, 7), (256, 4, 4)]
    with pytest.raises(ModelError, match=r"widths \(32, 64\) and depths \(1, 2, 2\) must have the same length"):
        create_model(ModelConfig(name="imgtrain_cnn_small", kwargs={"widths": [32, 64]}), num_classes=10, in_chans=1)
