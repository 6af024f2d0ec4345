"""Test-time augmentation: each view against its definition (torch.flip, torchvision's five_crop,
ten_crop, resize and center_crop, shifts by hand), the merge rules by hand, TTAModel, the recipe
keys and their errors, and real runs on digits: evaluate with --tta, the summary's test_acc_tta,
and a distillation teacher predicting with TTA."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from imgtrain.api import load_trained, train
from imgtrain.cli import main
from imgtrain.config import RecipeError, load_recipe
from imgtrain.data import build_splits
from imgtrain.engine.events import Hook
from imgtrain.evaluation import evaluate
from imgtrain.evaluation.tta import (
    TTAConfig,
    TTAModel,
    merge_predictions,
    scale_batch,
    shift_batch,
    tta_config_for,
    tta_views,
)
from imgtrain.losses import distillation_kl
from imgtrain.strategies.distillation import adapt_batch

BASE = ("model.name=imgtrain_cnn_tiny", "augment.img_size=8", "output.progress=off", "output.plots=false",
        "train.threads=1", "schedule.name=constant", "optim.lr=0.05")


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(3, 2, 9, 11)


# ------------------------------------------------------------------------- views against their definitions

def test_the_original_comes_first_and_flips_are_torch_flip(batch):
    views = tta_views(batch, ["hflip", "vflip"])
    assert len(views) == 3
    assert torch.equal(views[0], batch)
    assert torch.equal(views[1], torch.flip(batch, dims=[-1]))
    assert torch.equal(views[2], torch.flip(batch, dims=[-2]))


@pytest.mark.parametrize("name,crops", [("five_crop", TF.five_crop), ("ten_crop", TF.ten_crop)])
def test_n_crops_are_torchvisions_crops_resized_back(batch, name, crops):
    views = tta_views(batch, [f"{name}:0.7"])
    expected = [TF.resize(c, [9, 11]) for c in crops(batch, [round(0.7 * 9), round(0.7 * 11)])]
    assert len(views) == 1 + len(expected) == 1 + (5 if name == "five_crop" else 10)
    for view, want in zip(views[1:], expected):
        assert view.shape == batch.shape
        torch.testing.assert_close(view, want, atol=1e-5, rtol=0)


def test_a_five_crop_corner_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = tta_views(x, ["five_crop:0.5"])  # 2x2 crops, upsampled x2 back to 4x4
    top_left = F.interpolate(x[..., :2, :2], size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(views[1], top_left)
    assert views[1][0, 0, 0, 0] == 0.0 and views[1][0, 0, -1, -1] == 5.0  # the crop's corner pixels stay
    assert views[5][0, 0, 0, 0] == 5.0 and views[5][0, 0, -1, -1] == 10.0  # centre crop: rows/cols 1..2


@pytest.mark.parametrize("factor", [0.5, 0.8, 0.9, 1.1, 1.3, 2.0])
def test_scale_is_resize_then_torchvisions_center_crop(batch, factor):
    (view,) = tta_views(batch, [f"scale:{factor}"])[1:]
    want = TF.center_crop(TF.resize(batch, [round(factor * 9), round(factor * 11)]), [9, 11])
    torch.testing.assert_close(view, want, atol=1e-5, rtol=0)


def test_scale_below_one_pads_with_zeros_the_normalised_mean():
    x = torch.ones(1, 1, 4, 4)
    out = scale_batch(x, 0.5)  # a 2x2 image of ones in the middle, zeros around
    want = torch.zeros(1, 1, 4, 4)
    want[..., 1:3, 1:3] = 1.0
    assert torch.equal(out, want)


def test_translate_moves_the_content_and_fills_zeros():
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    right, left, down, up = tta_views(x, ["translate:1"])[1:]
    assert right[0, 0].tolist() == [[0, 1, 2], [0, 4, 5], [0, 7, 8]]
    assert left[0, 0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]
    assert down[0, 0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
    assert up[0, 0].tolist() == [[4, 5, 6], [7, 8, 9], [0, 0, 0]]
    # a fraction of the side: round(0.34 * 3) = 1 pixel, the same four views
    same = zip(tta_views(x, ["translate:0.34"]), [x, right, left, down, up])
    assert all(torch.equal(a, b) for a, b in same)
    assert torch.equal(shift_batch(x, 2, -1)[0, 0], torch.tensor([[0, 0, 0], [0, 0, 0], [2.0, 3, 0]]))


def test_scale_one_and_translate_zero_are_the_identity(batch):
    assert torch.equal(scale_batch(batch, 1.0), batch)
    assert torch.equal(shift_batch(batch, 0, 0), batch)
    # and they are not run again next to the original
    views = tta_views(batch, ["scale:1.0", "translate:0", "identity", "hflip", "hflip"])
    assert len(views) == 2


def test_random_views_are_reproducible_per_seed_and_not_the_identity(batch):
    first = tta_views(batch, [{"random": 4, "seed": 3}])
    again = tta_views(batch, [{"random": 4, "seed": 3}])
    other = tta_views(batch, [{"random": 4, "seed": 4}])
    assert len(first) == 5
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first[1:], other[1:]))
    assert all(v.shape == batch.shape and not torch.equal(v, batch) for v in first[1:])
    # every image gets the same crops, so a smaller batch gives the same views of its images
    part = tta_views(batch[:1], [{"random": 4, "seed": 3}])
    assert all(torch.equal(a, b[:1]) for a, b in zip(part, first))
    # the same seed draws the same crops with flip: false, only none of them is mirrored
    unflipped = tta_views(batch, [{"random": 4, "seed": 3, "flip": False}])
    mirrored = [not torch.equal(a, b) for a, b in zip(first[1:], unflipped[1:])]
    assert any(mirrored)
    for a, b, flip in zip(first[1:], unflipped[1:], mirrored):
        assert torch.equal(a, torch.flip(b, dims=[-1]) if flip else b)


def test_counts_and_description():
    settings = tta_config_for(None, ["hflip", "five_crop"])
    assert settings.passes == 7
    assert settings.describe() == "hflip + five_crop(0.875) (7 views), mean of probabilities"
    recipe = load_recipe("quickstart", ["eval.tta=[ten_crop:0.8, {scale: [0.9, 1.2]}, translate:2]",
                                        "eval.tta_merge=max"])
    settings = tta_config_for(recipe, True)
    assert settings.passes == 1 + 10 + 2 + 4
    assert settings.describe() == ("ten_crop(0.8) + scale(0.9, 1.2) + translate(2 px) (17 views), "
                                   "max probability")
    default = tta_config_for(load_recipe("quickstart"), True)
    assert default.describe() == "hflip (2 views), mean of probabilities"
    assert tta_config_for(recipe, None) is None and tta_config_for(recipe, False) is None
    assert tta_config_for(recipe, settings) is settings


# ----------------------------------------------------------------------------- merge rules

LOGITS = [torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])]


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_mean_probs_is_the_log_of_the_mean_probability():
    merged = merge_predictions(LOGITS, "mean_probs")
    for i in range(2):
        p, q = softmax(LOGITS[0][i].tolist()), softmax(LOGITS[1][i].tolist())
        want = [math.log((a + b) / 2) for a, b in zip(p, q)]
        assert merged[i].tolist() == pytest.approx(want, abs=1e-6)
        assert merged[i].softmax(0).tolist() == pytest.approx([(a + b) / 2 for a, b in zip(p, q)], abs=1e-6)


def test_mean_logits_and_max_by_hand():
    assert merge_predictions(LOGITS, "mean_logits").tolist() == [[1.0, 0.5, -0.5], [1.5, 0.5, 0.0]]
    merged = merge_predictions(LOGITS, "max")
    for i in range(2):
        p, q = softmax(LOGITS[0][i].tolist()), softmax(LOGITS[1][i].tolist())
        assert merged[i].tolist() == pytest.approx([math.log(max(a, b)) for a, b in zip(p, q)], abs=1e-6)
    with pytest.raises(ValueError, match="unknown merge rule"):
        merge_predictions(LOGITS, "median")


# ----------------------------------------------------------------------------- TTAModel

def small_net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 5))


def test_identity_only_is_the_plain_model(batch):
    net = small_net().eval()
    wrapped = TTAModel(net, ["identity"])
    assert torch.equal(wrapped(batch), net(batch))


def test_the_model_merges_its_views_in_eval_mode_without_gradients(batch):
    net = small_net()
    views = tta_config_for(None, ["hflip", "scale:1.2"]).views
    wrapped = TTAModel(net, TTAConfig(views=views, merge="mean_logits"))
    wrapped.train()  # stays in eval mode: BatchNorm's running stats, no dropout
    assert not net.training
    out = wrapped(batch)
    assert not out.requires_grad
    net.eval()
    with torch.no_grad():
        want = (net(batch) + net(torch.flip(batch, dims=[-1])) + net(scale_batch(batch, 1.2))) / 3
    torch.testing.assert_close(out, want)


# ----------------------------------------------------------------------------- the recipe keys

@pytest.mark.parametrize("override,words", [
    ("eval.tta=[hflip, hflp]", "tta[1]: 'hflp' is not a view"),
    ("eval.tta=[five_crop:1.5]", "five_crop: the crop side is a fraction"),
    ("eval.tta=[{five_crop: 0}]", "expected a number in (0, 1), got 0"),
    ("eval.tta=[scale:9]", "scale: expected zoom factors in [0.25, 4]"),
    ("eval.tta=[translate:0.7]", "translate: expected a shift in pixels"),
    ("eval.tta=[{random: 3, sed: 1}]", "random: unknown option 'sed'"),
    ("eval.tta=[{random: 3, area: [0.5, 1.2]}]", "random: area is [low, high]"),
    ("eval.tta=[hflip:2]", "hflip takes no value"),
    ("eval.tta_merge=avg", "'avg' is not one of mean_probs, mean_logits, max"),
])
def test_bad_views_are_recipe_errors_naming_the_key(override, words):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [override])
    key = override.split("=")[0]
    assert info.value.key == key
    assert str(info.value).startswith(f"command line: {key}: ")
    assert words in str(info.value)


def test_a_bad_view_in_a_recipe_file_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("extends: quickstart\neval:\n  tta:\n    - hflip\n    - ten_crop: 2\n")
    with pytest.raises(RecipeError, match=r"r.yaml, line 3: eval.tta: tta\[1\]: ten_crop: the crop side"):
        load_recipe(recipe)


# ----------------------------------------------------------------------------- real runs on digits

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny CNN trained on 8 px digits whose recipe asks for TTA: hflip and 1-pixel shifts."""
    run = tmp_path_factory.mktemp("tta") / "digits"
    result = train(load_recipe("quickstart", [*BASE, "train.epochs=3", "eval.tta=[hflip, translate:1]"]),
                   run_dir=run)
    assert result.summary["test_acc"] > 0.8
    return run


def test_evaluate_with_tta_reports_both_and_matches_a_hand_computation(digits_run):
    result = evaluate(digits_run, tta=True)
    plain = evaluate(digits_run)
    assert result["tta"] == "hflip + translate(1 px) (6 views), mean of probabilities"
    assert result["without_tta"]["acc"] == plain["acc"]
    assert result["without_tta"]["loss"] == pytest.approx(plain["loss"])
    assert result["images"] == plain["images"] == result["without_tta"]["images"]

    loaded = load_trained(digits_run)
    test = build_splits(loaded.recipe.data).test.with_transform(loaded.eval_transform())
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])

    def shifted(dy, dx):
        out = torch.zeros_like(x)
        out[..., max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)] = \
            x[..., max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)]
        return out

    views = [x, torch.flip(x, dims=[-1]), shifted(0, 1), shifted(0, -1), shifted(1, 0), shifted(-1, 0)]
    with torch.no_grad():
        probs = torch.stack([loaded.model(v).softmax(1) for v in views]).mean(0)
        plain_probs = loaded.model(x).softmax(1)
    assert result["acc"] == pytest.approx((probs.argmax(1) == y).double().mean().item(), abs=1e-12)
    assert plain["acc"] == pytest.approx((plain_probs.argmax(1) == y).double().mean().item(), abs=1e-12)
    assert result["loss"] == pytest.approx(F.nll_loss(probs.log(), y).item(), rel=1e-4)
    # TTA really changed the predictions (on digits a flip is a different picture)
    assert not torch.allclose(probs, plain_probs)


def test_the_summary_has_test_acc_tta_equal_to_evaluate(digits_run):
    summary = json.loads((digits_run / "summary.json").read_text())
    assert summary["test_tta"] == "hflip + translate(1 px) (6 views), mean of probabilities"
    result = evaluate(digits_run, split="test", tta=True)
    assert summary["test_acc_tta"] == pytest.approx(result["acc"], abs=1e-9)
    assert summary["test_balanced_acc_tta"] == pytest.approx(result["balanced_acc"], abs=1e-6)
    assert summary["test_acc"] == pytest.approx(result["without_tta"]["acc"], abs=1e-9)


def test_the_cli_takes_views_and_refuses_unknown_ones(digits_run, capsys, tmp_path):
    assert main(["evaluate", str(digits_run), "--tta", "hflip,five_crop:0.75", "--json",
                 "--output-dir", str(tmp_path / "ev")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tta"] == "hflip + five_crop(0.75) (7 views), mean of probabilities"
    assert set(printed["without_tta"]) >= {"acc", "balanced_acc", "loss"}
    assert main(["evaluate", str(digits_run), "--tta", "hflip,hflp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgtrain: error: --tta: view 2 ('hflp'): 'hflp' is not a view")
    assert "Traceback" not in err


class TeacherSpy(Hook):
    """Keeps the batch, the student's logits and the loss terms of batch 1."""

    name = "teacher_spy"

    def __init__(self):
        self.seen = None

    def after_loss(self, state):
        if state.batch_index == 1:
            self.seen = {"inputs": state.inputs.detach().clone(), "outputs": state.outputs.detach().clone(),
                         "kd": state.loss_parts["kd"].detach().clone()}


def test_a_distillation_teacher_predicts_with_its_runs_tta(digits_run, tmp_path):
    spy = TeacherSpy()
    student = tmp_path / "student"
    result = train(load_recipe("quickstart", [*BASE, "train.epochs=1", "train.max_steps_per_epoch=3",
                                              f"distill.teacher={digits_run}", "distill.teacher_tta=true",
                                              "distill.temperature=2.0"]), run_dir=student, hooks=[spy])
    assert "train_kd" in result.history[-1] and math.isfinite(result.history[-1]["train_loss"])
    assert "TTA hflip + translate(1 px) (6 views)" in (student / "train.log").read_text()

    teacher, pupil = load_trained(digits_run), load_trained(student)
    x = adapt_batch(spy.seen["inputs"], pupil.mean, pupil.std, teacher.mean, teacher.std, teacher.channels,
                    teacher.img_size)
    with torch.no_grad():
        views = tta_views(x, ["hflip", "translate:1"])
        merged = merge_predictions([teacher.model(v) for v in views], "mean_probs")
        plain = teacher.model(x)
    kd_tta = distillation_kl(spy.seen["outputs"], merged, 2.0)
    kd_plain = distillation_kl(spy.seen["outputs"], plain, 2.0)
    assert spy.seen["kd"].item() == pytest.approx(kd_tta.item(), rel=1e-5)
    assert abs(kd_tta.item() - kd_plain.item()) > 1e-4
