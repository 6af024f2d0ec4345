"""Ensembles: the vote rules against hand computations, fitted weights, the saved folder, and the
folder in evaluate, predict and distillation (two tiny digits models, trained once)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from imgtrain.cli import main
from imgtrain.engine.checkpoint import METADATA_KEY, load_weights
from imgtrain.evaluation.ensemble import (
    EnsembleError,
    EnsemblePredictor,
    combine_probabilities,
    ensemble_nll,
    fit_weights,
    flat_members,
    load_ensemble,
    load_predictor,
    normalize_weights,
    to_channels,
)
from imgtrain.evaluation.inference import ImageListDataset
from imgtrain.strategies.distillation import ensemble_logits
from imgtrain.tracking import read_summary

TINY = ["model.name=imgtrain_cnn_tiny", "train.epochs=3", "train.threads=1", "output.progress=off",
        "output.plots=false", "output.report=false"]


# ----------------------------------------------------------------------------- vote rules, by hand

def test_soft_vote_is_the_weighted_mean_of_probabilities():
    p1 = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    p2 = torch.tensor([[0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])
    weights = normalize_weights([3, 1], 2)  # scaled to sum to 1
    assert weights == [0.75, 0.25]
    out = combine_probabilities([p1, p2], weights, "soft")
    # 0.75 * p1 + 0.25 * p2, by hand
    assert torch.allclose(out, torch.tensor([[0.5, 0.275, 0.225], [0.175, 0.4, 0.425]]), atol=1e-7)
    assert normalize_weights(None, 4) == [0.25] * 4


def test_hard_vote_counts_weighted_top_classes_and_breaks_ties_with_the_soft_mean():
    # row 0: member 1 is very sure of class 0, members 2 and 3 (weights 0.3 + 0.3) vote class 1:
    # the vote (0.4 vs 0.6) wins although the soft mean (0.42 / 0.32 / 0.26) prefers class 0
    m1 = torch.tensor([[0.90, 0.05, 0.05], [0.50, 0.30, 0.20]])
    m2 = torch.tensor([[0.10, 0.50, 0.40], [0.30, 0.50, 0.20]])
    m3 = torch.tensor([[0.10, 0.50, 0.40], [0.10, 0.10, 0.80]])
    out = combine_probabilities([m1, m2, m3], [0.4, 0.3, 0.3], "hard")
    assert torch.allclose(out[0], torch.tensor([0.4, 0.6, 0.0]), atol=1e-5)
    assert out[0].argmax() == 1
    # row 1: votes 0 (0.4), 1 (0.3), 2 (0.3): class 0 wins outright
    assert torch.allclose(out[1], torch.tensor([0.4, 0.3, 0.3]), atol=1e-5) and out[1].argmax() == 0
    # a tie (0.5 / 0.5): the soft mean decides, 0.65 for class 0 against 0.35 for class 1
    a = torch.tensor([[0.9, 0.1]])
    b = torch.tensor([[0.4, 0.6]])
    tie = combine_probabilities([a, b], [0.5, 0.5], "hard")
    assert torch.allclose(tie, torch.tensor([[0.5, 0.5]]), atol=1e-5)
    assert tie.argmax() == 0 and 0 < tie[0, 0] - tie[0, 1] < 1e-6
    swapped = combine_probabilities([b, a], [0.5, 0.5], "hard")  # member order does not matter
    assert swapped.argmax() == 0
    assert torch.allclose(out.sum(dim=1), torch.ones(2), atol=1e-6)


@pytest.mark.parametrize("weights, words", [
    ([1, -1], "finite and >= 0"), ([1, 2, 3], "3 weight(s) for 2 member(s)"), ([0, 0], "all weights are 0"),
    ([1, float("nan")], "finite"),
])
def test_bad_weights_are_clear_errors(weights, words):
    with pytest.raises(EnsembleError, match=None) as info:
        normalize_weights(weights, 2, where="--weights")
    assert words in str(info.value) and "--weights" in str(info.value)
    with pytest.raises(EnsembleError, match="soft, hard"):
        combine_probabilities([torch.ones(1, 2) / 2], [1.0], "majority")


def test_fit_weights_finds_the_hand_computed_optimum_and_beats_equal_weights():
    # member A gives the true class 0.9 on 60 images and 0.1 on 40; member B the reverse. The NLL
    # -(0.6 log(0.1 + 0.8 w) + 0.4 log(0.9 - 0.8 w)) has its minimum where 0.6 (0.9 - 0.8 w) =
    # 0.4 (0.1 + 0.8 w), at w = 0.625
    targets = torch.zeros(100, dtype=torch.long)
    true_a = torch.cat([torch.full((60,), 0.9), torch.full((40,), 0.1)])
    probs_a = torch.stack([true_a, 1 - true_a], dim=1)
    probs_b = torch.stack([1 - true_a, true_a], dim=1)
    weights = fit_weights([probs_a, probs_b], targets)
    assert weights[0] == pytest.approx(0.625, abs=1e-4) and sum(weights) == pytest.approx(1.0)
    expected = -(0.6 * math.log(0.1 + 0.8 * 0.625) + 0.4 * math.log(0.9 - 0.8 * 0.625))
    assert ensemble_nll([probs_a, probs_b], targets, weights) == pytest.approx(expected, rel=1e-6)
    assert fit_weights([probs_a, probs_b], targets) == weights  # deterministic

    # a good member and a noisy one on 4 classes: the good one gets most of the weight
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (300,), generator=gen)
    good = torch.full((300, 4), 0.1).scatter_(1, targets[:, None], 0.7)
    noisy = torch.softmax(torch.randn(300, 4, generator=gen) * 2, dim=1)
    weights = fit_weights(torch.stack([noisy, good]), targets)
    assert weights[1] > 0.8 > weights[0]
    assert ensemble_nll([noisy, good], targets, weights) < ensemble_nll([noisy, good], targets, [0.5, 0.5]) - 0.1


def test_channel_conversion_matches_pil():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 5, 7), generator=gen, dtype=torch.uint8)
    grey = to_channels(rgb, 1)
    pil = torch.from_numpy(np.asarray(Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L")).copy()).view(1, 5, 7)
    assert torch.equal(grey, pil)
    assert torch.equal(to_channels(grey, 3), grey.expand(3, -1, -1))
    assert to_channels(grey, 1) is grey


def test_teacher_ensemble_logits_take_the_weights():
    z1, z2 = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    out = ensemble_logits([z1, z2], temperature=2.0, weights=[0.8, 0.2])
    by_hand = 0.8 * torch.softmax(z1 / 2, dim=1) + 0.2 * torch.softmax(z2 / 2, dim=1)
    assert torch.allclose(torch.softmax(out / 2, dim=1), by_hand, atol=1e-6)
    plain = ensemble_logits([z1, z2], temperature=2.0)
    assert torch.allclose(torch.softmax(plain / 2, dim=1),
                          0.5 * torch.softmax(z1 / 2, dim=1) + 0.5 * torch.softmax(z2 / 2, dim=1), atol=1e-6)


# ----------------------------------------------------------------------------- two trained models

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny digits models: seed 0 at 8 px, seed 1 at 12 px (another input size)."""
    base = tmp_path_factory.mktemp("ensemble")
    assert main(["quickstart", *TINY, "--run-dir", str(base / "a")]) == 0
    assert main(["quickstart", *TINY, "train.seed=1", "augment.img_size=12", "--run-dir", str(base / "b")]) == 0
    return base


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of a checkpoint with its tensors and metadata changed by change(tensors, meta)."""
    tensors, meta = load_weights(src)
    tensors, meta = change(dict(tensors), dict(meta))
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(meta)})
    return dst


def _rgb_twin(tensors, meta):
    """The same network taking RGB: the first conv's weights / 3 on each of three channels, the
    normalisation repeated, so that grey repeated to RGB gives exactly the grey model's logits."""
    key = next(k for k, v in tensors.items() if v.dim() == 4 and v.shape[1] == 1)
    tensors[key] = (tensors[key] / 3).repeat(1, 3, 1, 1).contiguous()
    meta.update(in_chans=3, mean=meta["mean"] * 3, std=meta["std"] * 3)
    return tensors, meta


def test_ensemble_command_saves_a_folder_that_evaluate_and_predict_use(runs, tmp_path, capsys):
    # members copied, so that deleting them afterwards shows the folder stands alone
    a, b = shutil.copytree(runs / "a", tmp_path / "a"), shutil.copytree(runs / "b", tmp_path / "b")
    ens = tmp_path / "ens"
    assert main(["ensemble", str(a), str(b), "--fit-weights", "val", "--save", str(ens), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    members = result["members"]
    assert [m["source"] for m in members] == [str(a), str(b)] and result["images"] == 359
    assert sum(result["weights"]) == pytest.approx(1.0) and result["weights_from"] == "fit"
    assert result["fit"]["nll"] <= result["fit"]["nll_uniform"] + 1e-9 and result["fit"]["images"] == 270
    # each member's row is what evaluate says of it alone
    assert main(["evaluate", str(a), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert members[0]["acc"] == alone["acc"] and members[0]["loss"] == pytest.approx(alone["loss"], rel=1e-6)

    # the saved folder: ensemble.yaml and the copies
    spec = yaml.safe_load((ens / "ensemble.yaml").read_text())
    assert spec["vote"] == "soft" and spec["tta"] is None and spec["weights_from"] == "fit"
    assert [m["file"] for m in spec["members"]] == ["members/1-a.safetensors", "members/2-b.safetensors"]
    assert [m["img_size"] for m in spec["members"]] == [8, 12]
    assert [m["weight"] for m in spec["members"]] == result["weights"]
    assert spec["fit"]["nll"] == pytest.approx(result["fit"]["nll"])
    shutil.rmtree(a)
    shutil.rmtree(b)

    # evaluate ENSEMBLE_DIR gives the ensemble command's numbers
    assert main(["evaluate", str(ens), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for key in ("acc", "balanced_acc", "top5_acc"):
        assert evaluated[key] == result["ensemble"][key]
    assert evaluated["loss"] == pytest.approx(result["ensemble"]["loss"], rel=1e-6)
    assert evaluated["confusion"] == result["ensemble"]["confusion"]

    # predict ENSEMBLE_DIR on a PNG: the weighted mean of the members' probabilities for it
    predictor = load_predictor(ens)
    dataset = _digits_test(predictor)
    image, _label = dataset[0]
    png = tmp_path / "digit.png"
    Image.fromarray(image[0].numpy()).save(png)
    out = tmp_path / "preds.json"
    assert main(["predict", str(ens), str(png), "--topk", "2", "--output", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    members_probs = [m.probabilities(ImageListDataset([image]))[0][0] for m in predictor.members]
    by_hand = sum(w * p for w, p in zip(result["weights"], members_probs))
    top = by_hand.topk(2)
    assert row["class_1"] == predictor.classes[int(top.indices[0])]
    assert row["prob_1"] == pytest.approx(float(top.values[0]), abs=2e-6)
    assert row["prob_2"] == pytest.approx(float(top.values[1]), abs=2e-6)

    # --save refuses to replace a folder unless --overwrite, and --overwrite only an ensemble
    assert main(["ensemble", str(ens), "--save", str(ens)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["ensemble", str(ens), "--save", str(other), "--overwrite"]) == 2
    assert "not an imgtrain ensemble" in capsys.readouterr().err and (other / "keep.txt").is_file()


def _digits_test(predictor):
    from imgtrain.evaluation.evaluate import evaluation_data
    dataset, _, _ = evaluation_data(predictor.recipe, "test")
    return dataset.with_transform(None)


def test_members_may_differ_in_channels_and_nest(runs, tmp_path, capsys):
    a = runs / "a" / "checkpoints" / "best.safetensors"
    twin = _rewrite(a, tmp_path / "rgb.safetensors", _rgb_twin)
    ens = EnsemblePredictor([load_predictor(a), load_predictor(twin)], weights=[1, 3])
    assert ens.channels == 3 and [m.channels for m in ens.members] == [1, 3]
    dataset = _digits_test(ens)
    (grey, rgb), targets = ens.member_probabilities(dataset)
    assert torch.allclose(grey, rgb, atol=1e-5)  # grey repeated to RGB, through the twin: the same model
    probs, _ = ens.probabilities(dataset)
    assert torch.allclose(probs, 0.25 * grey + 0.75 * rgb, atol=1e-6)

    # a saved ensemble as a member of another: its folder is copied and its weights nest
    inner = tmp_path / "inner"
    assert main(["ensemble", str(a), str(twin), "--weights", "1,3", "--save", str(inner)]) == 0
    outer = tmp_path / "outer"
    capsys.readouterr()
    assert main(["ensemble", str(inner), str(runs / "b"), "--save", str(outer), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (outer / "members" / "1-inner" / "ensemble.yaml").is_file()
    _, flat = flat_members(outer)
    assert [round(w, 6) for _, w in flat] == [0.125, 0.375, 0.5]
    loaded = load_ensemble(outer)
    b_probs, _ = load_predictor(runs / "b").probabilities(dataset)
    nested, _ = loaded.probabilities(dataset)
    assert torch.allclose(nested, 0.5 * probs + 0.5 * b_probs, atol=1e-6)
    assert result["ensemble"]["acc"] == float((nested.argmax(1) == targets).double().mean())


def test_members_with_other_classes_are_refused(runs, tmp_path, capsys):
    a = runs / "a" / "checkpoints" / "best.safetensors"

    def renamed(tensors, meta):
        meta["classes"] = ["zero"] + meta["classes"][1:]
        return tensors, meta

    def reordered(tensors, meta):
        meta["classes"] = meta["classes"][::-1]
        return tensors, meta

    bad = _rewrite(a, tmp_path / "renamed.safetensors", renamed)
    assert main(["ensemble", str(runs / "a"), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "different classes" in err and str(runs / "a") in err and str(bad) in err
    assert "only in" in err and "a: [0]" in err and "[zero]" in err and "Traceback" not in err
    swapped = _rewrite(a, tmp_path / "reordered.safetensors", reordered)
    assert main(["ensemble", str(runs / "a"), str(swapped)]) == 2
    assert "another order" in capsys.readouterr().err


def test_bad_requests_and_broken_folders_are_clear_errors(runs, tmp_path, capsys):
    a = runs / "a" / "checkpoints" / "best.safetensors"

    def no_val(tensors, meta):
        meta["recipe"]["data"]["val_fraction"] = 0.0
        return tensors, meta

    novalue = _rewrite(a, tmp_path / "noval.safetensors", no_val)
    assert main(["ensemble", str(novalue), str(runs / "b"), "--fit-weights", "val"]) == 2
    assert "has no val split" in capsys.readouterr().err
    assert main(["ensemble", str(runs / "a"), str(runs / "b"), "--weights", "1,2,3"]) == 2
    assert "3 weight(s) for 2 member(s)" in capsys.readouterr().err
    assert main(["ensemble", str(runs / "a"), str(runs / "b"), "--weights", "1,x"]) == 2
    assert "numbers separated by commas" in capsys.readouterr().err

    ens = tmp_path / "ens"
    assert main(["ensemble", str(runs / "a"), str(runs / "b"), "--save", str(ens)]) == 0
    capsys.readouterr()
    (ens / "members" / "2-b.safetensors").unlink()
    assert main(["evaluate", str(ens)]) == 2
    assert "member 2" in capsys.readouterr().err
    (ens / "ensemble.yaml").write_text("members: [\n")
    assert main(["evaluate", str(ens)]) == 2
    assert "not readable YAML" in capsys.readouterr().err


def test_an_ensemble_folder_teaches_a_student(runs, tmp_path):
    ens = tmp_path / "ens"
    assert main(["ensemble", str(runs / "a"), str(runs / "b"), "--weights", "3,1", "--vote", "hard",
                 "--save", str(ens)]) == 0
    student = tmp_path / "student"
    assert main(["quickstart", *TINY, "train.epochs=1", f"distill.teacher={ens}", "--run-dir", str(student)]) == 0
    summary = read_summary(student)
    assert summary["distill_teachers"] == [str(ens / "members" / "1-a.safetensors"),
                                           str(ens / "members" / "2-b.safetensors")]
    assert "weight 0.750" in (student / "train.log").read_text()
    history = (student / "history.csv").read_text().splitlines()
    assert "train_kd" in history[0] and float(history[1].split(",")[history[0].split(",").index("train_kd")]) > 0

    # the teacher's output is the soft vote with the saved weights, whatever the folder's vote
    from imgtrain.config import load_recipe
    from imgtrain.evaluation.teachers import load_teachers
    recipe = load_recipe("quickstart", [f"distill.teacher={ens}"])
    loaded = load_ensemble(ens)
    teacher = load_teachers(recipe, loaded.classes, loaded.members[0].loaded.mean, loaded.members[0].loaded.std)
    assert teacher.weights == pytest.approx([0.75, 0.25])
    batch = torch.stack([loaded.members[0].loaded.eval_transform()(img) for img, _ in
                         [_digits_test(loaded)[i] for i in range(8)]])
    T = recipe.distill.temperature
    with torch.no_grad():
        z = [m.loaded.model(x) for m, x in zip(loaded.members, (batch, torch.nn.functional.interpolate(
            batch, size=(12, 12), mode="bilinear", align_corners=False)))]
    by_hand = 0.75 * torch.softmax(z[0] / T, dim=1) + 0.25 * torch.softmax(z[1] / T, dim=1)
    assert torch.allclose(torch.softmax(teacher(batch) / T, dim=1), by_hand, atol=1e-5)


def test_saved_tta_setting_round_trips_a_random_view():
    """A TTAConfig with a `random` view is kept in ensemble.yaml as the eval.tta entry that gives it back
    (its seed, area and flip included), not refused with an AttributeError."""
    from imgtrain.evaluation.ensemble import tta_setting
    from imgtrain.tta_views import parse_tta_view

    view = parse_tta_view({"random": 4, "seed": 3, "area": [0.5, 0.9], "flip": False})

    config = SimpleNamespace(views=[parse_tta_view("hflip"), view], merge="mean")  # what it reads of a TTAConfig
    saved = tta_setting(config)
    assert saved == {"views": ["hflip", {"random": 4, "seed": 3, "area": [0.5, 0.9], "flip": False}], "merge": "mean"}
    assert parse_tta_view(saved["views"][1]) == view
