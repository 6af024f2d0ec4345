"""The Trainer on real data: accuracy, accumulation, resume, checkpoints, run folders."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imgtrain.api import RunDirError, train
from imgtrain.config import load_recipe
from imgtrain.engine.checkpoint import CheckpointError, load_training_state, read_metadata
from imgtrain.engine.device import select_precision
from imgtrain.engine.events import Hook, HookList
from imgtrain.engine.loop import Trainer, TrainParts
from imgtrain.engine.state import EpochPlan
from imgtrain.tracking import read_history

FASHION = Path("/usr/share/datasets/fashion-mnist")
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "momentum")


def digits_recipe(*overrides: str):
    return load_recipe("quickstart", ["model.name=imgtrain_cnn_tiny", "augment.img_size=8",
                                      "output.progress=off", "output.plots=false", "train.epochs=3",
                                      *overrides])


def test_digits_trains_to_high_accuracy(tmp_path):
    result = train(digits_recipe("train.epochs=8", "output.plots=true"), run_dir=tmp_path / "run")
    assert result.summary["test_acc"] > 0.90
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    run = result.run_dir
    for name in ("config.yaml", "history.csv", "events.jsonl", "train.log", "summary.json",
                 "checkpoints/best.safetensors", "checkpoints/last.safetensors", "checkpoints/last.state.pt",
                 "plots/loss.png", "plots/accuracy.png", "plots/lr.png", "plots/momentum.png"):
        assert (run / name).is_file(), name
    rows = read_history(run / "history.csv")
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert set(rows[0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "momentum",
                            "epoch_seconds", "images_per_second"}
    meta = read_metadata(run / "checkpoints" / "best.safetensors")
    assert meta["classes"] == [str(i) for i in range(10)] and meta["in_chans"] == 1
    assert meta["epoch"] == result.summary["best_epoch"]


def test_shapes_trains(tmp_path):
    recipe = load_recipe(None, ["data.source=shapes", "data.shapes.train_size=1200", "data.shapes.val_size=200",
                                "data.shapes.test_size=200", "data.shapes.image_size=24", "data.batch_size=32",
                                "model.name=imgtrain_cnn_tiny", "train.epochs=8", "optim.name=adamw", "optim.lr=0.005",
                                "optim.weight_decay=0.01",
                                "output.progress=off", "output.plots=false"])
    result = train(recipe, run_dir=tmp_path / "run")
    assert result.summary["test_acc"] > 0.5  # 4 classes: chance is 0.25


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_subset_trains(tmp_path):
    recipe = load_recipe("fashion_mnist", ["data.train_subset=3000", "model.name=imgtrain_cnn_tiny",
                                           "train.epochs=3", "data.batch_size=64", "data.val_fraction=0.05",
                                           "output.progress=off", "output.plots=false"])
    result = train(recipe, run_dir=tmp_path / "run")
    assert result.summary["test_acc"] > 0.65  # on the full 10,000-image test set; chance is 0.10


# ----------------------------------------------------------------------------- accumulation

class GradRecorder(Hook):
    name = "grad_recorder"

    def __init__(self):
        self.grads = []

    def before_step(self, state):
        self.grads.append(torch.cat([p.grad.flatten().clone() for p in state.model.parameters()]))


def _grads(batch_size: int, accum: int, batches: int, images, targets):
    recipe = load_recipe(None, [f"data.batch_size={batch_size}", f"train.grad_accum_steps={accum}",
                                "train.epochs=1", "output.save_last=false", "output.save_best=false",
                                "schedule.name=constant", "optim.weight_decay=0"])
    torch.manual_seed(0)
    # no BatchNorm: its batch statistics would differ between 4x32 and 1x128 by design
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    dataset = torch.utils.data.TensorDataset(images[: batch_size * batches], targets[: batch_size * batches])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    recorder = GradRecorder()
    parts = TrainParts(model=model, loss_fn=torch.nn.CrossEntropyLoss(), loader_for=lambda size: loader,
                       plans=[EpochPlan(0, 8, batch_size)], classes=[str(i) for i in range(10)])
    trainer = Trainer(recipe, parts, HookList(strategies=[recorder]))
    trainer.fit()
    return recorder.grads


def test_accumulation_matches_large_batch():
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    targets = torch.tensor(digits.target)
    (big,) = _grads(128, 1, 1, images, targets)
    (accumulated,) = _grads(32, 4, 4, images, targets)
    assert torch.allclose(big, accumulated, atol=1e-6, rtol=1e-4)
    # 5 batches with accumulation 4: the second, short group (one batch) is a plain mean, not 1/4 of one
    groups = _grads(32, 4, 5, images, targets)
    assert len(groups) == 2
    assert torch.allclose(groups[0], big, atol=1e-6, rtol=1e-4)
    assert groups[1].norm() > 0.5 * groups[0].norm()


# ----------------------------------------------------------------------------- resume

def _metrics(rows):
    return [{k: r[k] for k in METRICS} for r in rows]


def test_resume_after_interrupt_gives_same_history(tmp_path, interrupt_at):
    overrides = ("train.deterministic=true", "train.epochs=3", "augment.pad_crop=1", "model.drop_rate=0.3")
    full = train(digits_recipe(*overrides), run_dir=tmp_path / "full")
    # interrupt in the middle of epoch 2 (0-based 1): epoch 1 is saved, epoch 2 is lost
    with pytest.raises(KeyboardInterrupt):
        train(digits_recipe(*overrides), run_dir=tmp_path / "cut", hooks=[interrupt_at(1, 5)])
    assert load_training_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")["epoch"] == 1
    resumed = train(digits_recipe(*overrides), resume=tmp_path / "cut")
    assert _metrics(resumed.history) == _metrics(full.history)
    cut_rows, full_rows = (read_history(tmp_path / name / "history.csv") for name in ("cut", "full"))
    assert _metrics(cut_rows) == _metrics(full_rows)
    assert resumed.summary["test_acc"] == full.summary["test_acc"]


def test_killed_process_resumes_to_same_history(tmp_path):
    """A real SIGKILL in the middle of an epoch, then `imgtrain train --resume`."""
    args = ["quickstart", "model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.epochs=4",
            "train.deterministic=true", "output.progress=log", "output.plots=false", "train.threads=1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "imgtrain.cli", "train"]
    subprocess.run(cmd + args + ["--run-dir", str(tmp_path / "full")], check=True, env=env,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen(cmd + args + ["--run-dir", str(tmp_path / "cut")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # wait until epoch 2 is under way (epoch 1 saved), then kill without warning
    deadline = time.time() + 240
    for line in proc.stderr:
        if line.startswith("epoch 2/4") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = load_training_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")
    assert 1 <= saved["epoch"] < 4
    done = subprocess.run(cmd + ["--resume", str(tmp_path / "cut"), "train.threads=1"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _metrics(read_history(tmp_path / "cut" / "history.csv")) == \
        _metrics(read_history(tmp_path / "full" / "history.csv"))


def test_resume_refuses_changing_what_is_computed(tmp_path, capsys):
    from imgtrain.cli import main
    train(digits_recipe("train.epochs=1"), run_dir=tmp_path / "run")
    code = main(["train", "--resume", str(tmp_path / "run"), "optim.lr=0.5"])
    assert code == 2
    assert "optim.lr cannot change when resuming" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints

def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.state.pt"
    torch.save({"payload": Path("/etc/passwd"), "x": object.__new__(GradRecorder)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_training_state(path)
    (tmp_path / "trunc.state.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_training_state(tmp_path / "trunc.state.pt")


# ----------------------------------------------------------------------------- run folders

def test_run_folder_is_never_overwritten(tmp_path):
    recipe = digits_recipe("train.epochs=1")
    first = train(recipe, run_dir=tmp_path / "run")
    before = (first.run_dir / "history.csv").read_text()
    with pytest.raises(RunDirError, match="--overwrite"):
        train(recipe, run_dir=tmp_path / "run")
    assert (first.run_dir / "history.csv").read_text() == before
    train(recipe, run_dir=tmp_path / "run", overwrite=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(RunDirError, match="not an imgtrain run"):
        train(recipe, run_dir=precious, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_automatic_run_names_do_not_collide(tmp_path):
    recipe = digits_recipe("train.epochs=1", f"output.root={tmp_path}")
    a = train(recipe).run_dir
    b = train(recipe).run_dir
    assert a == tmp_path / "quickstart" and b == tmp_path / "quickstart-2"


# ----------------------------------------------------------------------------- precision

def test_precision_selection():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_precision("off", cpu) == (None, False)
    assert select_precision("bf16", cpu) == (torch.bfloat16, False)
    assert select_precision("fp16", cpu) == (torch.float16, True)
    assert select_precision("auto", cpu, fast_bf16=False) == (None, False)  # emulated bf16 is slower than fp32
    assert select_precision("auto", cpu, fast_bf16=True) == (torch.bfloat16, False)
    assert select_precision("auto", cuda, fast_bf16=True) == (torch.bfloat16, False)
    assert select_precision("auto", cuda, fast_bf16=False) == (torch.float16, True)  # pre-Ampere: fp16 + GradScaler
    # this machine's answer, asked of the hardware: fp32 unless its CPU has native bf16
    from imgtrain.engine.device import cpu_has_fast_bf16
    assert select_precision("auto", cpu) == ((torch.bfloat16, False) if cpu_has_fast_bf16() else (None, False))


def test_label_smoothing_and_clipping_run(tmp_path):
    result = train(digits_recipe("train.label_smoothing=0.2", "train.clip_grad_norm=0.5", "optim.name=adamw",
                                 "optim.lr=0.003", "schedule.name=warmup_cosine", "schedule.warmup_epochs=1"),
                   run_dir=tmp_path / "run")
    assert result.summary["test_acc"] > 0.5
    # with smoothing 0.2 over 10 classes the train loss cannot fall below the smoothed target's entropy
    floor = -(0.82 * math.log(0.82) + 9 * 0.02 * math.log(0.02))
    assert min(r["train_loss"] for r in result.history) > floor - 0.05


def test_compiled_model_trains_like_eager(tmp_path):
    """train.compile: true goes through torch.compile (Inductor on CPU) and learns the same."""
    # dropout off: Inductor draws its dropout masks from its own RNG, so only a net without it matches eager
    overrides = ("train.epochs=1", "train.max_steps_per_epoch=6", "output.save_best=false", "schedule.name=constant",
                 "optim.lr=0.05", "model.drop_rate=0")
    eager = train(digits_recipe(*overrides), run_dir=tmp_path / "eager")
    compiled = train(digits_recipe(*overrides, "train.compile=true"), run_dir=tmp_path / "compiled")
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-3)
    assert compiled.history[0]["val_acc"] == pytest.approx(eager.history[0]["val_acc"], abs=0.02)
    # the checkpoint holds the plain module's keys, not the compile wrapper's `_orig_mod.` ones
    from imgtrain.engine.checkpoint import load_weights
    tensors, _ = load_weights(compiled.run_dir / "checkpoints" / "last.safetensors")
    assert not any(key.startswith("_orig_mod.") for key in tensors)


def test_bad_input_found_after_planning_leaves_the_old_run_untouched(tmp_path):
    """--overwrite replaces a run only once the new one is ready: a data error keeps the old one whole."""
    old = train(digits_recipe("train.epochs=1"), run_dir=tmp_path / "run")
    before = sorted(p.relative_to(old.run_dir) for p in old.run_dir.rglob("*"))
    from imgtrain.data import DataError
    with pytest.raises(DataError) as info:
        train(load_recipe(None, ["data.source=imagefolder", f"data.root={tmp_path / 'missing'}"]),
              run_dir=tmp_path / "run", overwrite=True)
    assert "missing" in str(info.value)
    assert sorted(p.relative_to(old.run_dir) for p in old.run_dir.rglob("*")) == before
    # and a new run's folder is not even created
    with pytest.raises(DataError):
        train(load_recipe(None, ["data.source=imagefolder", f"data.root={tmp_path / 'missing'}"]),
              run_dir=tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
