"""Knowledge distillation: the loss by hand, real distilled runs on digits (with Mixup, a teacher
of another input size and normalisation, two teachers averaged), frozen teachers kept out of the
optimizer and the checkpoints, a resumed run equal to an uninterrupted one, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from imgtrain.api import load_trained, train
from imgtrain.cli import main
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.checkpoint import load_training_state
from imgtrain.engine.events import Hook
from imgtrain.evaluation.teachers import load_teacher
from imgtrain.strategies.distillation import adapt_batch, distillation_kl, distillation_loss, ensemble_logits

BASE = ("augment.img_size=8", "output.progress=off", "output.plots=false", "train.threads=1",
        "schedule.name=constant", "optim.lr=0.05")


def digits(*overrides: str):
    return load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", *BASE, *overrides])


@pytest.fixture(scope="module")
def teacher_8(tmp_path_factory):
    """A small CNN trained on digits at 8 px: the teacher (about 97% test accuracy)."""
    run = tmp_path_factory.mktemp("teachers") / "t8"
    result = train(load_recipe("quickstart", [*BASE, "model.name=imgtrain_cnn_small", "train.epochs=3"]),
                   run_dir=run)
    assert result.summary["test_acc"] > 0.9
    return run


@pytest.fixture(scope="module")
def teacher_16(tmp_path_factory):
    """A teacher that takes 16 px images, unnormalised (mean 0, std 1): not what the student gets."""
    run = tmp_path_factory.mktemp("teachers") / "t16"
    train(load_recipe("quickstart", [*BASE, "model.name=imgtrain_cnn_tiny", "train.epochs=2",
                                     "augment.img_size=16", "augment.normalize=none"]), run_dir=run)
    return run


class BatchSpy(Hook):
    """Keeps what the loop holds after the loss of one batch (trackers run after the strategies)."""

    name = "batch_spy"

    def __init__(self, epoch: int = 0, batch: int = 1):
        self.epoch, self.batch, self.seen = epoch, batch, None

    def after_loss(self, state):
        if state.epoch == self.epoch and state.batch_index == self.batch:
            self.seen = {"inputs": state.inputs.detach().clone(), "targets": state.targets.detach().clone(),
                         "outputs": state.outputs.detach().clone(), "loss": state.loss.detach().clone(),
                         "parts": {k: v.detach().clone() for k, v in state.loss_parts.items()}}


# ----------------------------------------------------------------------------- the pure functions

def test_the_loss_is_the_formula_computed_by_hand():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    teacher = torch.tensor([[3.0, 1.0, -2.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2])
    T = 2.0

    def softmax(row, t):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    ce = sum(-math.log(softmax(s, 1.0)[y]) for s, y in zip(student.tolist(), labels.tolist())) / 2
    kl = sum(sum(p * (math.log(p) - math.log(q)) for p, q in zip(softmax(t, T), softmax(s, T)))
             for s, t in zip(student.tolist(), teacher.tolist())) / 2  # batchmean
    assert distillation_loss(student, teacher, labels, alpha=1.0, temperature=T).item() == pytest.approx(ce, rel=1e-6)
    assert distillation_loss(student, teacher, labels, alpha=0.0, temperature=T).item() == pytest.approx(
        T * T * kl, rel=1e-6)
    assert distillation_loss(student, teacher, labels, alpha=0.3, temperature=T).item() == pytest.approx(
        0.3 * ce + 0.7 * T * T * kl, rel=1e-6)
    assert distillation_kl(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-7)
    # a precomputed label loss (smoothing, class weights ...) replaces the plain CE term
    assert distillation_loss(student, teacher, labels, 0.5, T, label_loss=torch.tensor(10.0)).item() == \
        pytest.approx(5.0 + 0.5 * T * T * kl, rel=1e-6)
    # soft (mixed) targets: CE against the blend
    soft = torch.tensor([[0.6, 0.0, 0.4], [0.0, 0.0, 1.0]])
    ce_soft = (-(soft * F.log_softmax(student, 1)).sum(1)).mean().item()
    assert distillation_loss(student, teacher, soft, 1.0, T).item() == pytest.approx(ce_soft, rel=1e-6)


def test_several_teachers_average_their_softened_probabilities():
    torch.manual_seed(0)
    a, b, T = torch.randn(4, 5) * 3, torch.randn(4, 5), 3.0
    mixed = ensemble_logits([a, b], T)
    expected = (F.softmax(a / T, 1) + F.softmax(b / T, 1)) / 2
    assert torch.allclose(F.softmax(mixed / T, 1), expected, atol=1e-6)
    assert torch.equal(ensemble_logits([a], T), a)


def test_a_batch_is_renormalised_recoloured_and_resized_for_the_teacher():
    torch.manual_seed(0)
    raw = torch.rand(2, 1, 8, 8)
    student = (raw - 0.3) / 0.2
    # grey student -> RGB teacher with ImageNet statistics at 4 px (downsampling: antialiased)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = adapt_batch(student, [0.3], [0.2], mean, std, channels=3, size=4)
    rgb = raw.repeat(1, 3, 1, 1)
    shrunk = F.interpolate(rgb, size=(4, 4), mode="bilinear", antialias=True)
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out, (shrunk - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1),
                          atol=1e-5)
    # shrinking is antialiased (at 8 -> 3 plain bilinear would skip pixels); growing is plain bilinear
    small = adapt_batch(raw, [0.0], [1.0], [0.0], [1.0], channels=1, size=3)
    assert torch.allclose(small, F.interpolate(raw, size=(3, 3), mode="bilinear", antialias=True), atol=1e-6)
    assert not torch.allclose(small, F.interpolate(raw, size=(3, 3), mode="bilinear", antialias=False), atol=1e-3)
    large = adapt_batch(raw, [0.0], [1.0], [0.0], [1.0], channels=1, size=16)
    assert torch.allclose(large, F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False), atol=1e-6)
    # RGB -> grey teacher takes the luma
    colour = torch.rand(1, 3, 4, 4)
    grey = adapt_batch(colour, [0, 0, 0], [1, 1, 1], [0.0], [1.0], channels=1, size=None)
    assert torch.allclose(grey, 0.299 * colour[:, :1] + 0.587 * colour[:, 1:2] + 0.114 * colour[:, 2:], atol=1e-6)
    # nothing to change: the very same tensor
    assert adapt_batch(student, [0.3], [0.2], [0.3], [0.2], channels=1, size=8) is student


# ----------------------------------------------------------------------------- real distilled runs

def test_a_distilled_run_with_mixup_logs_both_terms_and_leaves_the_teacher_alone(tmp_path, teacher_8):
    spy = BatchSpy(epoch=1, batch=2)
    teacher_before = load_file(str(teacher_8 / "checkpoints" / "best.safetensors"))
    result = train(digits("train.epochs=3", f"distill.teacher={teacher_8}", "distill.alpha=0.3",
                          "distill.temperature=2", "mix.mixup_alpha=0.4"), run_dir=tmp_path / "student", hooks=[spy])
    rows = result.history
    for row in rows:  # train_loss is the mean of the distillation loss: alpha * ce + (1 - alpha) * kd
        assert row["train_loss"] == pytest.approx(0.3 * row["train_ce"] + 0.7 * row["train_kd"], rel=1e-5)
    assert rows[-1]["train_kd"] < rows[0]["train_kd"] / 2  # the student learns to agree with the teacher
    assert result.summary["test_acc"] > 0.8 and result.summary["distill_teachers"] == [str(teacher_8)]
    # the batch the loop trained on: mixed targets, and the teacher saw the mixed images
    seen = spy.seen
    assert seen["targets"].ndim == 2 and (seen["targets"].max(1).values < 0.99).any()
    teacher = load_trained(teacher_8).model
    kd = distillation_kl(seen["outputs"], teacher(seen["inputs"]), 2.0)
    assert seen["parts"]["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert seen["loss"].item() == pytest.approx(0.3 * seen["parts"]["ce"].item() + 0.7 * kd.item(), rel=1e-5)
    # frozen, and kept out of the student's checkpoints
    after = load_file(str(teacher_8 / "checkpoints" / "best.safetensors"))
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)
    student_keys = set(load_file(str(result.run_dir / "checkpoints" / "best.safetensors")))
    assert student_keys == set(result.model.state_dict())
    saved = load_training_state(result.run_dir / "checkpoints" / "last.state.pt")
    assert set(saved["model"]) == student_keys and set(saved["hooks"]["distillation"]) == {"ce_sum", "kd_sum", "seen"}
    header = (result.run_dir / "history.csv").read_text().splitlines()[0].split(",")
    assert "train_ce" in header and "train_kd" in header


def test_a_teacher_of_another_size_and_normalisation_gets_the_batch_as_it_was_trained(
        tmp_path, teacher_16):
    spy = BatchSpy(epoch=0, batch=1)
    result = train(digits("train.epochs=1", "train.max_steps_per_epoch=3", f"distill.teacher={teacher_16}",
                          "distill.alpha=0"), run_dir=tmp_path / "student", hooks=[spy])
    seen = spy.seen
    student = load_trained(result.run_dir)  # its checkpoint holds the student's normalisation
    assert seen["inputs"].shape[-1] == 8 and student.mean != [0.0]
    # by hand: undo the student's normalisation, upsample to 16 px; the teacher normalises with none
    raw = seen["inputs"] * student.std[0] + student.mean[0]
    x16 = F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False)
    teacher = load_trained(teacher_16)
    assert teacher.img_size == 16 and teacher.mean == [0.0]
    kd = distillation_kl(seen["outputs"], teacher.model(x16), 4.0)
    assert seen["loss"].item() == pytest.approx(kd.item(), rel=1e-5)  # alpha 0: the KD term alone
    log = (result.run_dir / "train.log").read_text()
    assert f"teacher(s) {teacher_16} (16 px, 1 ch)" in log


def test_with_progressive_resizing_the_teacher_gets_its_own_size_back(tmp_path, teacher_8):
    # the student trains at 6 px in its first epoch (progressive resizing shrinks the batch first);
    # the 8 px teacher gets the shrunk batch upsampled to 8 px
    spy = BatchSpy(epoch=0, batch=1)
    result = train(digits("train.epochs=2", "train.max_steps_per_epoch=3", f"distill.teacher={teacher_8}",
                          "distill.alpha=0", "progressive.stages=[{img_size: 6, epochs: 1}, {img_size: 8, epochs: 1}]"),
                   run_dir=tmp_path / "student", hooks=[spy])
    seen = spy.seen
    assert seen["inputs"].shape[-1] == 6
    student, teacher = load_trained(result.run_dir), load_trained(teacher_8)
    raw = seen["inputs"] * student.std[0] + student.mean[0]
    x8 = F.interpolate(raw, size=(8, 8), mode="bilinear", align_corners=False)
    kd = distillation_kl(seen["outputs"], teacher.model((x8 - teacher.mean[0]) / teacher.std[0]), 4.0)
    assert seen["loss"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert [r["train_kd"] > 0 for r in result.history] == [True, True]


def test_two_teachers_are_averaged_in_probability(tmp_path, teacher_8, teacher_16):
    spy = BatchSpy(epoch=0, batch=0)
    result = train(digits("train.epochs=1", "train.max_steps_per_epoch=2", "distill.alpha=0",
                          f"distill.teacher=[{teacher_8}, {teacher_16}]", "distill.temperature=3"),
                   run_dir=tmp_path / "student", hooks=[spy])
    seen, T = spy.seen, 3.0
    student = load_trained(result.run_dir)
    raw = seen["inputs"] * student.std[0] + student.mean[0]
    t8, t16 = load_trained(teacher_8), load_trained(teacher_16)
    z8 = t8.model((raw - t8.mean[0]) / t8.std[0])
    z16 = t16.model(F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False))
    p = (F.softmax(z8 / T, 1) + F.softmax(z16 / T, 1)) / 2
    log_q = F.log_softmax(seen["outputs"] / T, 1)
    kd = T * T * (p * (p.log() - log_q)).sum(1).mean()
    assert seen["loss"].item() == pytest.approx(kd.item(), rel=1e-4)
    assert result.summary["distill_teachers"] == [str(teacher_8), str(teacher_16)]


def test_a_resumed_distilled_run_equals_the_uninterrupted_one(tmp_path, interrupt_at, teacher_8):
    # the hook holds no state a resume needs (the teacher is reloaded; the per-epoch sums restart with
    # the epoch), so the proof is the history itself
    overrides = ("train.deterministic=true", "train.epochs=2", f"distill.teacher={teacher_8}",
                 "mix.mixup_alpha=0.4")
    full = train(digits(*overrides), run_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(digits(*overrides), run_dir=tmp_path / "cut", hooks=[interrupt_at(1, 5)])
    resumed = train(digits(*overrides), resume=tmp_path / "cut")
    keys = ("train_loss", "train_ce", "train_kd", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in full.history]


# ----------------------------------------------------------------------------- bad input

def test_a_teacher_of_other_classes_stops_before_the_run_folder_is_made(tmp_path, teacher_8):
    shapes = load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", *BASE, "data.source=shapes",
                                        "data.shapes.train_size=40", "data.shapes.val_size=8",
                                        "data.shapes.test_size=0", "data.shapes.image_size=8",
                                        f"distill.teacher={teacher_8}"])
    with pytest.raises(RecipeError) as err:
        train(shapes, run_dir=tmp_path / "run")
    message = str(err.value)
    assert "distill.teacher" in message and "10 classes against 4" in message
    assert "teacher [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], data [circle, square, triangle, cross]" in message
    assert not (tmp_path / "run").exists()


def test_a_teacher_with_the_classes_in_another_order_is_refused(tmp_path, teacher_8):
    tensors = load_file(str(teacher_8 / "checkpoints" / "best.safetensors"))
    with safe_open(str(teacher_8 / "checkpoints" / "best.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    key = next(iter(meta))
    data = json.loads(meta[key])
    data["classes"] = list(reversed(data["classes"]))
    save_file(tensors, str(tmp_path / "reordered.safetensors"), metadata={key: json.dumps(data)})
    with pytest.raises(RecipeError, match="the same classes in another order"):
        train(digits(f"distill.teacher={tmp_path / 'reordered.safetensors'}"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("distill.alpha=1.5", "distill.alpha: 1.5 is out of range: expected a value <= 1"),
    ("distill.alpha=-0.1", "distill.alpha: -0.1 is out of range: expected a value >= 0"),
    ("distill.temperature=0", "distill.temperature: 0.0 is out of range: expected a value > 0"),
    ("distill.temperature=-2", "distill.temperature: -2.0 is out of range: expected a value > 0"),
    ("distill.teacher=[]", "distill.teacher: expected a run folder, a .safetensors file or a timm model name"),
])
def test_alpha_and_temperature_out_of_range_are_recipe_errors(override, message):
    with pytest.raises(RecipeError) as err:
        digits(override)
    assert message in str(err.value)


@pytest.mark.parametrize("teacher, message", [
    ("runs/no_such_teacher", "distill.teacher: runs/no_such_teacher: no such run folder or checkpoint file"),
    ("no_such_model_name", "'no_such_model_name': no such run folder or .safetensors file, and not a timm model"),
    ("imgtrain_cnn_small", "imgtrain_cnn_small is one of imgtrain's own nets, which have no published weights"),
])
def test_a_teacher_that_cannot_be_found_is_named_with_its_key(tmp_path, capsys, teacher, message):
    with pytest.raises(RecipeError) as err:
        train(digits(f"distill.teacher={teacher}"), run_dir=tmp_path / "run")
    assert message in str(err.value) and not (tmp_path / "run").exists()
    # the command line: one line, exit code 2
    assert main(["train", "quickstart", "model.name=imgtrain_cnn_tiny", *BASE, f"distill.teacher={teacher}",
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_a_timm_teacher_comes_from_the_cache_and_must_predict_the_datas_classes(tmp_path, monkeypatch):
    import timm
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(0)
    published = {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=1000).state_dict().items()}
    save_file(published, str(folder / "snapshots" / commit / "model.safetensors"))

    loaded = load_teacher("test_resnet", [f"c{i}" for i in range(1000)])
    assert (loaded.num_classes, loaded.channels, loaded.img_size) == (1000, 3, 160)
    pretrained = timm.models.get_pretrained_cfg("test_resnet")
    assert (loaded.mean, loaded.std) == (list(pretrained.mean), list(pretrained.std)) and not loaded.model.training
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in published.items())
    with pytest.raises(RecipeError, match="test_resnet: timm's weights predict 1000 classes and this data has 10"):
        load_teacher("test_resnet", [str(i) for i in range(10)])
