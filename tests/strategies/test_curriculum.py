"""Curriculum learning on real training: the pacing functions, the easiest-first pool, the exact
images each epoch draws (CSV, reference run, self-paced running loss), a resume, and bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imgtrain.api import load_trained, train
from imgtrain.config import RecipeError, ShapesConfig, load_recipe
from imgtrain.data import build_splits, write_shapes_imagefolder
from imgtrain.engine.checkpoint import load_training_state
from imgtrain.engine.events import Hook
from imgtrain.strategies.curriculum import (
    CurriculumHook,
    easiest,
    epoch_generator,
    pacing_fraction,
    per_sample_loss,
    pool_size,
    repeat_pool,
)


def digits(*overrides: str):
    return load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "output.progress=off",
                                      "output.plots=false", "train.threads=1", *overrides])


class Recorder(Hook):
    """Keeps every training batch's labels and per-image loss, by epoch."""

    name = "recorder"

    def __init__(self):
        self.targets: dict[int, list[torch.Tensor]] = {}
        self.losses: dict[int, list[torch.Tensor]] = {}

    def after_forward(self, state):
        self.targets.setdefault(state.epoch, []).append(state.targets.detach().cpu().clone())
        self.losses.setdefault(state.epoch, []).append(per_sample_loss(state.outputs, state.targets).cpu())

    def epoch_labels(self, epoch: int) -> torch.Tensor:
        return torch.cat(self.targets[epoch])


def expected_order(scores: torch.Tensor, epoch: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """The draws of an epoch, rebuilt from the pure functions as the hook makes them."""
    generator = epoch_generator(seed, epoch)
    return repeat_pool(easiest(scores, fraction, generator), len(scores), generator)


def write_csv(path, rows, header=("index", "difficulty")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- pure functions

def test_pacing_functions_match_hand_values():
    # 10 epochs, full set from epoch 5 (end_point 0.5): progress = epoch / 5
    linear = [pacing_fraction(e, 10, 0.3, 0.5, "linear") for e in range(10)]
    assert linear == pytest.approx([0.3, 0.44, 0.58, 0.72, 0.86, 1, 1, 1, 1, 1])
    root = [pacing_fraction(e, 10, 0.3, 0.5, "root") for e in range(6)]
    assert root == pytest.approx([0.3, math.sqrt(0.09 + 0.91 * 0.2), math.sqrt(0.09 + 0.91 * 0.4),
                                  math.sqrt(0.09 + 0.91 * 0.6), math.sqrt(0.09 + 0.91 * 0.8), 1.0])
    assert root[1] == pytest.approx(0.521536, abs=1e-6) and root[1] > linear[1]  # root grows faster early
    # two steps: 0.3 until progress 0.5 (epoch 2.5), then 0.65, then 1 at epoch 5
    step = [pacing_fraction(e, 10, 0.3, 0.5, "step", step_count=2) for e in range(7)]
    assert step == pytest.approx([0.3, 0.3, 0.3, 0.65, 0.65, 1, 1])
    # 5 equal steps: progress 0.6 is step 3 exactly (0.6 * 5 is 2.9999999999999996 in floats)
    assert pacing_fraction(3, 5, 0.5, 1.0, "step", step_count=5) == pytest.approx(0.8)
    assert pacing_fraction(3, 4, 0.2, 1.0, "linear") == pytest.approx(0.8)   # end_point 1: full only after
    assert pacing_fraction(0, 1, 1.0, 1.0, "root") == 1.0                   # start 1: no curriculum
    for bad in ((0, 10, 0.0, 0.5, "linear"), (0, 10, 0.3, 1.5, "linear"), (0, 10, 0.3, 0.5, "cubic")):
        with pytest.raises(ValueError):
            pacing_fraction(*bad)


def test_easiest_keeps_the_lowest_scores_and_breaks_ties_at_random():
    scores = torch.tensor([5.0, 1.0, 3.0, 1.0, 9.0, 0.0, 7.0, 2.0])
    assert pool_size(0.5, 8) == 4 and pool_size(0.3, 8) == 3 and pool_size(0.01, 8) == 1
    assert easiest(scores, 0.5, torch.Generator().manual_seed(0)).tolist()[:1] == [5]
    assert sorted(easiest(scores, 0.5, torch.Generator().manual_seed(0)).tolist()) == [1, 3, 5, 7]
    assert sorted(easiest(scores, 0.3, torch.Generator().manual_seed(0)).tolist()) == [1, 3, 5]
    # all tied: a random 3 of 10, the same for the same generator state, different for another
    tied = torch.zeros(10)
    picks = [tuple(easiest(tied, 0.3, torch.Generator().manual_seed(s)).tolist()) for s in range(6)]
    assert picks[0] == tuple(easiest(tied, 0.3, torch.Generator().manual_seed(0)).tolist())
    assert len(set(picks)) > 1 and all(len(set(p)) == 3 for p in picks)
    # shuffled repeats: each pool image once before any twice; 10 draws from 3 = 4 + 3 + 3
    pool = torch.tensor([4, 8, 15])
    order = repeat_pool(pool, 10, torch.Generator().manual_seed(1))
    assert len(order) == 10 and sorted(order[:3].tolist()) == [4, 8, 15] and sorted(order[3:6].tolist()) == [4, 8, 15]
    assert sorted(torch.bincount(order).tolist())[-3:] == [3, 3, 4]


def test_per_sample_loss_takes_class_indices_and_soft_targets():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    hard = per_sample_loss(logits, torch.tensor([0, 2]))
    assert hard == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 2]), reduction="none"))
    soft = per_sample_loss(logits, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
    log_p = F.log_softmax(logits, 1)
    assert soft[0] == pytest.approx(hard[0]) and soft[1] == pytest.approx(-(log_p[1, 1] + log_p[1, 2]) / 2)


def test_unseen_images_rank_at_the_mean_of_the_seen_in_self_paced_mode():
    cfg = digits("curriculum.difficulty=self_paced").curriculum
    hook = CurriculumHook(cfg, seed=0)
    hook.scores = torch.tensor([0.2, 0.0, 1.0, 0.0, 3.0])
    hook.seen = torch.tensor([True, False, True, False, True])
    assert hook.ranking_scores().tolist() == pytest.approx([0.2, 1.4, 1.0, 1.4, 3.0])


# ----------------------------------------------------------------------------- real runs

@pytest.mark.parametrize("extra", [
    (),
    ("data.workers=1",),
    # batches of 32 then 64 images, two per optimizer step: the draws are the same
    ("progressive.stages=[{img_size: 6, epochs: 2, batch_size: 32}, {img_size: 8, epochs: 2}]",
     "train.grad_accum_steps=2"),
], ids=["workers0", "workers1", "progressive"])
def test_a_csv_curriculum_draws_the_easiest_images_first_and_grows(tmp_path, extra):
    # difficulty = the digit itself: early epochs may only see low digits
    recipe = digits("train.epochs=4", "curriculum.difficulty=csv", f"curriculum.csv={tmp_path / 'hard.csv'}",
                    "optim.lr=0.05", *extra)
    labels = build_splits(recipe.data).train.targets
    total = len(labels)
    write_csv(tmp_path / "hard.csv", [(i, int(label)) for i, label in enumerate(labels)])
    recorder = Recorder()
    result = train(recipe, run_dir=tmp_path / "run", hooks=[recorder])
    fractions = [0.3, 0.65, 1.0, 1.0]
    assert [r["curriculum_fraction"] for r in result.history] == pytest.approx(fractions)
    assert [r["curriculum_images"] for r in result.history] == [pool_size(f, total) for f in fractions]
    # every epoch is still the whole split's length: same batches per epoch, same schedule
    assert all(len(recorder.epoch_labels(e)) == total for e in range(4))
    # epoch 1 saw exactly the draws the pure functions give: the easiest 30% by the column
    for epoch in range(4):
        order = expected_order(labels.float(), epoch, fractions[epoch])
        assert torch.equal(recorder.epoch_labels(epoch), labels[order])
    first = recorder.epoch_labels(0)
    cutoff = int(labels.sort().values[pool_size(0.3, total) - 1])  # the hardest difficulty in the pool
    # 30% of 1168 = 351 images: the digits 0, 1 and 2 (about 117 each) and a few 3s, no digit above
    assert set(first.tolist()) == set(range(cutoff + 1)) and cutoff == 3
    assert int((first == 3).sum()) < int((first == 2).sum()) / 2
    assert set(recorder.epoch_labels(1).tolist()) == set(range(int(labels.sort().values[pool_size(0.65,
                                                                                                  total) - 1]) + 1))
    assert set(recorder.epoch_labels(2).tolist()) == set(range(10))
    assert result.summary["test_acc"] > 0.5


def test_a_csv_names_image_files_by_path(tmp_path):
    root = tmp_path / "shapes"
    write_shapes_imagefolder(ShapesConfig(num_classes=4, image_size=8, train_size=40, val_size=8, test_size=8), root)
    files = sorted(root.rglob("*.png"))
    classes = sorted({f.parent.name for f in files})
    # paths relative to the CSV's folder, val and test files included (ignored); difficulty = class index
    rows = [(str(f.relative_to(root)), classes.index(f.parent.name)) for f in files]
    write_csv(root / "difficulty.csv", rows, header=("path", "difficulty"))
    recipe = digits("data.source=imagefolder", f"data.root={root}", "train.epochs=2", "curriculum.difficulty=csv",
                    f"curriculum.csv={root / 'difficulty.csv'}", "curriculum.start_fraction=0.5",
                    "curriculum.end_point=0.5", "data.batch_size=8")
    split = build_splits(recipe.data).train
    recorder = Recorder()
    result = train(recipe, run_dir=tmp_path / "run", hooks=[recorder])
    scores = torch.tensor([float(classes.index(Path(p).parent.name)) for p in split.paths])
    assert torch.equal(recorder.epoch_labels(0), split.targets[expected_order(scores, 0, 0.5)])
    assert set(recorder.epoch_labels(0).tolist()) == {0, 1}  # 20 of 40 images: the two easiest classes
    assert set(recorder.epoch_labels(1).tolist()) == {0, 1, 2, 3} and result.history[1]["curriculum_images"] == 40
    # the same CSV without two training files: refused, naming them
    dropped = {str(Path(p).relative_to(root)) for p in split.paths[:2]}
    kept = [row for row in rows if row[0] not in dropped]
    write_csv(root / "difficulty.csv", kept, header=("path", "difficulty"))
    with pytest.raises(RecipeError) as info:
        train(recipe, run_dir=tmp_path / "run2")
    assert f"has no row for 2 of the 40 training images (first: {split.paths[0]}, {split.paths[1]})" in str(info.value)


def test_a_reference_run_ranks_the_images_by_its_loss(tmp_path):
    reference = train(digits("train.epochs=3"), run_dir=tmp_path / "reference")
    recipe = digits("train.epochs=1", "curriculum.difficulty=reference",
                    f"curriculum.reference={reference.run_dir}", "curriculum.start_fraction=0.2")
    recorder = Recorder()
    result = train(recipe, run_dir=tmp_path / "run", hooks=[recorder])
    saved = load_training_state(result.run_dir / "checkpoints" / "last.state.pt")["hooks"]["curriculum"]["scores"]
    # the scores are the reference's loss on each training image, eval transform, eval mode
    loaded = load_trained(reference.run_dir)
    split = build_splits(recipe.data).train
    with torch.no_grad():
        inputs = torch.stack([loaded.eval_transform()(image) for image in split.images])
        logits = loaded.model(inputs)
    expected = F.cross_entropy(logits, split.targets, reduction="none")
    assert saved == pytest.approx(expected, abs=1e-4)
    order = expected_order(saved, 0, 0.2)
    assert torch.equal(recorder.epoch_labels(0), split.targets[order])
    pool = easiest(saved, 0.2, epoch_generator(0, 0))
    rest = torch.ones(len(split), dtype=torch.bool)
    rest[pool] = False
    right = logits.argmax(1) == split.targets
    assert bool(right[pool].all())                      # the easiest 20%: all classified right by the reference
    assert float(expected[pool].max()) <= float(expected[rest].min())
    assert result.history[0]["curriculum_images"] == len(pool) == pool_size(0.2, len(split))


def test_self_paced_scores_are_the_running_loss_of_the_images_drawn(tmp_path):
    recipe = digits("train.epochs=1", "curriculum.difficulty=self_paced", "curriculum.momentum=0.5",
                    "train.deterministic=true")
    labels = build_splits(recipe.data).train.targets
    total = len(labels)
    recorder = Recorder()
    result = train(recipe, run_dir=tmp_path / "run", hooks=[recorder])
    state = load_training_state(result.run_dir / "checkpoints" / "last.state.pt")["hooks"]["curriculum"]
    # epoch 1: nothing measured yet, every image ties: a random 30% pool
    order = expected_order(torch.zeros(total), 0, 0.3)
    assert torch.equal(recorder.epoch_labels(0), labels[order])
    # replay the batches: each image's score is the EMA (momentum 0.5) of its losses, in draw order
    scores, seen, cursor = torch.zeros(total, dtype=torch.float64), torch.zeros(total, dtype=torch.bool), 0
    for losses in recorder.losses[0]:
        batch = dict(zip(order[cursor:cursor + len(losses)].tolist(), losses.tolist()))  # last draw wins
        for index, loss in batch.items():
            scores[index] = 0.5 * scores[index] + 0.5 * loss if seen[index] else loss
            seen[index] = True
        cursor += len(losses)
    assert torch.equal(state["seen"], seen) and int(seen.sum()) == pool_size(0.3, total)
    assert state["scores"].double() == pytest.approx(scores, abs=1e-5)
    assert float(state["scores"][seen].mean()) < math.log(10)  # the pool was learnt: below chance loss


def test_a_resumed_self_paced_curriculum_gives_the_same_history(tmp_path, interrupt_at):
    overrides = ("train.deterministic=true", "train.epochs=4", "curriculum.difficulty=self_paced",
                 "curriculum.pacing=root", "curriculum.end_point=0.75")
    full = train(digits(*overrides), run_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(digits(*overrides), run_dir=tmp_path / "cut", hooks=[interrupt_at(2, 5)])
    saved = load_training_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")
    assert saved["epoch"] == 2 and int(saved["hooks"]["curriculum"]["seen"].sum()) > 0
    resumed = train(digits(*overrides), resume=tmp_path / "cut")
    keys = ("train_loss", "val_loss", "curriculum_fraction", "curriculum_images")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in full.history]
    assert [r["curriculum_images"] for r in full.history][-1] == len(build_splits(digits().data).train)


# ----------------------------------------------------------------------------- bad input

def test_a_csv_missing_training_images_stops_before_training(tmp_path):
    recipe = digits("curriculum.difficulty=csv", f"curriculum.csv={tmp_path / 'd.csv'}")
    total = len(build_splits(recipe.data).train)
    write_csv(tmp_path / "d.csv", [(i, 1.0) for i in range(total) if i not in (3, 7, 10, 11, 12)])
    with pytest.raises(RecipeError) as info:
        train(recipe, run_dir=tmp_path / "run")
    assert (f"curriculum.csv: {tmp_path / 'd.csv'} has no row for 5 of the {total} training images "
            "(first: index 3, index 7, index 10, ...)") in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_reference_with_another_class_count_stops_before_training(tmp_path):
    shapes = train(load_recipe("quickstart", ["data.source=shapes", "data.shapes.image_size=8",
                                              "data.shapes.train_size=40",
                                              "data.shapes.val_size=8", "data.shapes.test_size=0", "train.epochs=1",
                                              "model.name=imgtrain_cnn_tiny", "output.progress=off",
                                              "output.plots=false", "train.threads=1"]),
                   run_dir=tmp_path / "shapes")
    with pytest.raises(RecipeError) as info:
        train(digits("curriculum.difficulty=reference", f"curriculum.reference={shapes.run_dir}"),
              run_dir=tmp_path / "run")
    assert "curriculum.reference: " in str(info.value)
    assert "was trained on 4 classes, this data has 10" in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (("curriculum.difficulty=csv", "curriculum.csv=/nonexistent/d.csv"), "/nonexistent/d.csv: no such file"),
    (("curriculum.difficulty=csv", "curriculum.csv={tmp}/d.csv", "curriculum.column=loss"),
     "curriculum.column: {tmp}/d.csv has no column 'loss'; its columns are index, difficulty"),
    (("curriculum.difficulty=reference", "curriculum.reference={tmp}/nothing"), "curriculum.reference: "),
    (("curriculum.difficulty=self_paced", "data.sampler=balanced"), "and so does data.sampler: balanced; use one"),
    (("curriculum.difficulty=csv",), "curriculum.csv: curriculum.difficulty csv needs this key"),
    (("curriculum.difficulty=self_paced", "curriculum.start_fraction=0"),
     "curriculum.start_fraction: 0.0 is out of range: expected a value > 0.0"),
    (("curriculum.difficulty=self_paced", "curriculum.end_point=1.5"),
     "curriculum.end_point: 1.5 is out of range: expected a value <= 1.0"),
    (("curriculum.difficulty=selfpaced",), "did you mean self_paced?"),
])
def test_bad_curriculum_input_is_a_recipe_error(tmp_path, overrides, message):
    write_csv(tmp_path / "d.csv", [(i, 0.5) for i in range(2000)])
    with pytest.raises(RecipeError) as info:
        train(digits(*(o.replace("{tmp}", str(tmp_path)) for o in overrides)), run_dir=tmp_path / "run")
    assert message.replace("{tmp}", str(tmp_path)) in str(info.value)
    assert not (tmp_path / "run").exists()
