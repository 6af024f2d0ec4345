"""Starting weights (model.weights, model.weights_file): run folders, safetensors, torchvision .pth,
timm's weights through the Hugging Face cache; head replaced, input conv adapted, pickles refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

import imgtrain
from imgtrain.cli import main
from imgtrain.config import ModelConfig, RecipeError, load_recipe, recipe_from_dict
from imgtrain.engine.checkpoint import save_weights
from imgtrain.models import OUR_MODELS, ModelError, create_model
from imgtrain.models.weights import load_initial_weights

TINY = ModelConfig(name="imgtrain_cnn_tiny")


def _model(name: str, num_classes: int, in_chans: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(ModelConfig(name=name), num_classes=num_classes, in_chans=in_chans)


def _saved_run(tmp_path: Path, model: torch.nn.Module, name: str = "imgtrain_cnn_tiny") -> Path:
    """A run folder as the trainer leaves it: checkpoints/best.safetensors with our metadata."""
    run = tmp_path / "previous"
    save_weights(model, run / "checkpoints" / "best.safetensors",
                 {"model": {"name": name}, "num_classes": model.num_classes, "classes": []})
    return run


def _load(model: torch.nn.Module, num_classes: int, in_chans: int, **keys):
    cfg = dataclasses.replace(ModelConfig(name=model.pretrained_cfg["architecture"]), **keys)
    return load_initial_weights(model, cfg, num_classes=num_classes, in_chans=in_chans)


# ----------------------------------------------------------------------------- our checkpoints

def test_run_folder_with_another_class_count_loads_everything_but_the_head(tmp_path):
    source = _model("imgtrain_cnn_tiny", 10, 1, seed=0)
    run = _saved_run(tmp_path, source)
    model = _model("imgtrain_cnn_tiny", 3, 1, seed=1)
    fresh_head = model.fc.weight.detach().clone()
    report = _load(model, 3, 1, weights=str(run))
    src, out = source.state_dict(), model.state_dict()
    for key in out:
        if not key.startswith("fc."):
            assert torch.equal(out[key], src[key]), key
    assert torch.equal(model.fc.weight, fresh_head)  # the new 3-class head keeps its own random init
    assert report.head_replaced == ["fc.weight", "fc.bias"] and report.head_classes == (10, 3)
    assert report.loaded == len(out) - 2 and report.total == len(out)
    assert report.source == str(run / "checkpoints" / "best.safetensors")
    assert report.missing == [] and report.unexpected == [] and report.input_adapted == []
    lines = report.lines()
    assert lines[0] == f"weights: loaded 24 of 26 tensors from {report.source}"
    assert "head replaced (10 classes -> 3): fc.weight, fc.bias" in lines[1]


def test_plain_safetensors_state_dict_without_metadata_loads_whole(tmp_path):
    source = _model("imgtrain_cnn_small", 10, 3, seed=0)
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = _model("imgtrain_cnn_small", 10, 3, seed=1)
    report = _load(model, 10, 3, weights=str(path))
    assert report.loaded == report.total == len(source.state_dict()) and report.head_replaced == []
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), source.eval()(x))


@pytest.mark.parametrize("source_chans,target_chans", [(3, 1), (1, 3)])
def test_first_conv_is_adapted_to_the_channel_count(tmp_path, source_chans, target_chans):
    source = _model("imgtrain_cnn_tiny", 10, source_chans, seed=0)
    model = _model("imgtrain_cnn_tiny", 10, target_chans, seed=1)
    report = _load(model, 10, target_chans, weights=str(_saved_run(tmp_path, source)))
    w_src, w_out = source.stem[0].weight.detach(), model.stem[0].weight.detach()
    if target_chans == 1:   # 3 -> 1: the RGB filters summed
        assert torch.allclose(w_out, w_src.sum(dim=1, keepdim=True))
    else:                   # 1 -> 3: repeated, each a third
        assert torch.allclose(w_out, w_src.repeat(1, 3, 1, 1) / 3)
    # so a grey image gives the same stem response as before, whichever side is 3-channel
    grey = torch.rand(2, 1, 8, 8)
    as_src, as_out = grey.expand(-1, source_chans, -1, -1), grey.expand(-1, target_chans, -1, -1)
    assert torch.allclose(F.conv2d(as_out, w_out, padding=1), F.conv2d(as_src, w_src, padding=1), atol=1e-5)
    assert report.input_adapted == ["stem.0.weight"] and report.input_chans == (source_chans, target_chans)
    assert f"input conv adapted ({source_chans} channels -> {target_chans})" in "\n".join(report.lines())
    assert torch.equal(model.stages[2][1][0].weight, source.stages[2][1][0].weight)


# ----------------------------------------------------------------------------- other files

def test_torchvision_pth_in_a_container_with_ddp_prefixes_loads_into_timm_resnet18(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    for module in tv.modules():  # non-default BN statistics, to see them arrive
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}, "epoch": 90, "arch": "resnet18"}
    path = tmp_path / "resnet18_tv.pth"
    torch.save(wrapped, path)
    model = _model("resnet18", 5, 1, seed=1)
    report = _load(model, 5, 1, weights_file=str(path))
    src, out = tv.state_dict(), model.state_dict()
    assert set(src) == set(out)  # timm's resnet uses torchvision's key names
    for key in out:
        if key not in ("fc.weight", "fc.bias", "conv1.weight"):
            assert torch.equal(out[key], src[key]), key
    assert torch.allclose(out["conv1.weight"], src["conv1.weight"].sum(dim=1, keepdim=True))
    assert report.head_classes == (1000, 5) and report.input_chans == (3, 1)
    assert report.loaded == len(out) - 2 and report.missing == [] and report.unexpected == []


def test_plain_weights_are_preferred_to_ema_and_ema_alone_is_used(tmp_path):
    plain, ema = _model("imgtrain_cnn_tiny", 10, 1, seed=0), _model("imgtrain_cnn_tiny", 10, 1, seed=1)
    both = tmp_path / "both.pt"
    torch.save({"state_dict_ema": ema.state_dict(), "state_dict": plain.state_dict(), "optimizer": {}}, both)
    model = _model("imgtrain_cnn_tiny", 10, 1, seed=2)
    _load(model, 10, 1, weights_file=str(both))
    assert torch.equal(model.stem[0].weight, plain.stem[0].weight)
    only_ema = tmp_path / "ema.bin"
    torch.save({"model_ema": {f"_orig_mod.{k}": v for k, v in ema.state_dict().items()}}, only_ema)
    report = _load(model, 10, 1, weights_file=str(only_ema))
    assert torch.equal(model.stem[0].weight, ema.stem[0].weight) and report.loaded == report.total


def _mark_unpickled(flag: str) -> dict:
    Path(flag).write_text("unpickled")
    return {}


class Trap:
    """Pickles as a call to _mark_unpickled: unpickling it writes the flag file."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __reduce__(self):
        return _mark_unpickled, (self.flag,)


def test_a_pickle_that_is_not_weights_only_is_refused_and_never_unpickled(tmp_path):
    flag = tmp_path / "unpickled.flag"
    path = tmp_path / "evil.pth"
    torch.save({"obj": Trap(flag), "stem.0.weight": torch.zeros(16, 1, 3, 3)}, path)
    model = _model("imgtrain_cnn_tiny", 10, 1, seed=0)
    before = model.stem[0].weight.detach().clone()
    with pytest.raises(ModelError) as err:
        _load(model, 10, 1, weights_file=str(path))
    message = str(err.value)
    assert message.startswith(f"model.weights_file: {path} refused: it holds a Python object (")
    assert "_mark_unpickled" in message and "imgtrain never unpickles" in message
    assert not flag.exists()  # _mark_unpickled never ran
    assert torch.equal(model.stem[0].weight, before)
    # the trap is armed: a plain torch.load would have run it
    torch.load(path, weights_only=False)
    assert flag.read_text() == "unpickled"


def test_weights_of_another_architecture_are_refused(tmp_path):
    run = _saved_run(tmp_path, _model("imgtrain_cnn_small", 10, 3, seed=0), name="imgtrain_cnn_small")
    with pytest.raises(ModelError, match="another architecture") as err:
        _load(_model("resnet10t", 10, 3, seed=0), 10, 3, weights=str(run))
    message = str(err.value)
    assert str(run / "checkpoints" / "best.safetensors") in message and "resnet10t" in message
    assert "trained as imgtrain_cnn_small" in message and "conv1.0.weight" in message
    # same key names, other widths: the shapes name the problem
    with pytest.raises(ModelError, match="another architecture") as err:
        _load(_model("imgtrain_cnn_tiny", 10, 3, seed=0), 10, 3, weights=str(run))
    assert "stem.0.weight (32, 3, 3, 3) (model: (16, 3, 3, 3))" in str(err.value)


def test_missing_and_misnamed_sources_are_clear_errors(tmp_path):
    model = _model("imgtrain_cnn_tiny", 10, 1, seed=0)
    with pytest.raises(ModelError, match=r"^model.weights: .*nowhere: no such run folder or checkpoint file"):
        _load(model, 10, 1, weights=str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match=r"^model.weights_file: .*gone.pth: no such file"):
        _load(model, 10, 1, weights_file=str(tmp_path / "gone.pth"))
    pth = tmp_path / "w.pth"
    torch.save(model.state_dict(), pth)
    with pytest.raises(ModelError, match="set model.weights_file"):
        _load(model, 10, 1, weights=str(pth))
    with pytest.raises(ModelError, match="no checkpoints/best.safetensors or last.safetensors"):
        _load(model, 10, 1, weights=str(tmp_path))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"garbage.bin is not a readable PyTorch checkpoint \(.+\); it was refused"):
        _load(model, 10, 1, weights_file=str(garbage))
    no_tensors = tmp_path / "settings.pt"
    torch.save({"lr": 0.1, "epochs": 3}, no_tensors)
    with pytest.raises(ModelError, match="settings.pt holds no weights .*found: lr, epochs"):
        _load(model, 10, 1, weights_file=str(no_tensors))
    with pytest.raises(RecipeError, match="model.weights_file: model.weights and model.weights_file both"):
        load_recipe("quickstart", [f"model.weights={tmp_path}", f"model.weights_file={pth}"])


def test_nothing_to_load_leaves_the_model_alone():
    model = _model("imgtrain_cnn_tiny", 10, 1, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_initial_weights(model, TINY, num_classes=10, in_chans=1) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_old_recipes_with_model_pretrained_still_load():
    assert recipe_from_dict({"model": {"pretrained": False}}).model.weights is None
    assert recipe_from_dict({"model": {"pretrained": True}}).model.weights == "timm"


@pytest.mark.parametrize("name", OUR_MODELS)
def test_our_nets_name_their_first_conv_and_classifier_for_timm(name):
    cfg = timm.models.get_pretrained_cfg(name)
    model = timm.create_model(name, num_classes=4, in_chans=2)
    modules = dict(model.named_modules())
    assert isinstance(modules[cfg.first_conv], torch.nn.Conv2d) and modules[cfg.first_conv].in_channels == 2
    assert modules[cfg.classifier] is model.get_classifier()
    assert model.pretrained_cfg["first_conv"] == cfg.first_conv and not cfg.has_weights
    assert name not in timm.list_pretrained()


# ----------------------------------------------------------------------------- timm's weights

HUB_MODEL = "test_resnet"  # 0.37M parameters; timm's weights live in timm/test_resnet.r160_in1k


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, offline (huggingface_hub reads both at import)."""
    from huggingface_hub import constants
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_timm_weights_come_from_the_hugging_face_cache(hub_cache):
    repo = timm.models.get_pretrained_cfg(HUB_MODEL).hf_hub_id
    assert repo == "timm/test_resnet.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = hub_cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    published = _model(HUB_MODEL, 1000, 3, seed=0)  # what timm would have downloaded
    src = {k: v.contiguous() for k, v in published.state_dict().items()}
    save_file(src, str(folder / "snapshots" / commit / "model.safetensors"))

    model = _model(HUB_MODEL, 4, 1, seed=1)
    fresh_head = model.fc.weight.detach().clone()
    report = _load(model, 4, 1, weights="timm")
    out = model.state_dict()
    for key in out:
        if key not in ("fc.weight", "fc.bias", "conv1.0.weight"):
            assert torch.equal(out[key], src[key]), key
    assert torch.allclose(out["conv1.0.weight"], src["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.fc.weight, fresh_head)
    assert report.head_replaced == ["fc.weight", "fc.bias"] and report.head_classes == (1000, 4)
    assert report.input_adapted == ["conv1.0.weight"] and report.input_chans == (3, 1)
    assert report.loaded == len(out) - 2 and "test_resnet.r160_in1k" in report.source


def test_timm_weights_offline_without_the_cache_say_where_to_put_them(hub_cache):
    with pytest.raises(ModelError) as err:
        _load(_model(HUB_MODEL, 4, 1, seed=0), 4, 1, weights="timm")
    message = str(err.value)
    assert message.startswith("model.weights: timm's weights for test_resnet are not in the Hugging Face cache")
    assert "timm/test_resnet.r160_in1k" in message and str(hub_cache) in message
    assert "models--timm--test_resnet.r160_in1k/snapshots/COMMIT/model.safetensors" in message
    assert "model.weights_file" in message


def test_our_nets_have_no_timm_weights():
    with pytest.raises(ModelError, match="timm has no pretrained weights for imgtrain_cnn_tiny"):
        _load(_model("imgtrain_cnn_tiny", 10, 1, seed=0), 10, 1, weights="timm")


# ----------------------------------------------------------------------------- through train and the CLI

QUICK = ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "output.progress=off", "output.plots=false"]


def test_training_from_a_previous_run_starts_with_a_lower_loss(tmp_path):
    previous = imgtrain.train(load_recipe("quickstart", QUICK + ["train.epochs=2"]), run_dir=tmp_path / "prev")
    short = QUICK + ["train.epochs=1", "train.max_steps_per_epoch=3"]
    warm = imgtrain.train(load_recipe("quickstart", short + [f"model.weights={previous.run_dir}"]),
                          run_dir=tmp_path / "warm")
    cold = imgtrain.train(load_recipe("quickstart", short), run_dir=tmp_path / "cold")
    log = (warm.run_dir / "train.log").read_text()
    best = previous.run_dir / "checkpoints" / "best.safetensors"
    assert f"weights: loaded 26 of 26 tensors from {best}" in log
    assert "weights:" not in (cold.run_dir / "train.log").read_text()
    assert warm.history[0]["train_loss"] < 0.6 * cold.history[0]["train_loss"]
    assert warm.history[0]["val_acc"] > cold.history[0]["val_acc"] + 0.3


def test_cli_names_a_missing_weights_source_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "quickstart", "model.weights=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgtrain: error: model.weights: /nonexistent: no such run folder or checkpoint file")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # stopped before making a run folder
