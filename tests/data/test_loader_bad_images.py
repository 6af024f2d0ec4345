"""A bad file met by the loader during training (after the start-up scan passed it: data.verify header,
or a file damaged mid-run) follows data.on_bad_image: skip replaces it and lists it, and the run finishes;
error stops the run with a message naming the file, the last checkpoint intact and resumable."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from imgtrain.api import train
from imgtrain.cli import EXIT_BAD_INPUT, main
from imgtrain.config import load_recipe
from imgtrain.data.errors import DataError
from imgtrain.engine.checkpoint import load_training_state
from imgtrain.engine.events import Hook

TINY = ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.epochs=1", "data.batch_size=4",
        "output.plots=false", "output.report=false", "output.progress=off", "train.threads=1"]


def _jpeg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def _truncate(path):
    """Cut the JPEG body: the header still reads (data.verify: header passes it), decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    return path


@pytest.fixture
def folder(tmp_path):
    """train/ (2 classes x 6) and val/ (2 x 2) folders of JPEGs."""
    root = tmp_path / "images"
    for c, name in enumerate(("cat", "dog")):
        for i in range(6):
            _jpeg(root / "train" / name / f"{i}.jpg", seed=10 * c + i)
        for i in range(2):
            _jpeg(root / "val" / name / f"{i}.jpg", seed=100 + 10 * c + i)
    return root


def _recipe(root, tmp_path, *overrides):
    return load_recipe(None, ["data.source=imagefolder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                              *TINY, *overrides])


def _skipped(run_dir):
    with open(run_dir / "skipped_images.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("workers", [0, 1])  # 1: the file is met in a worker process
def test_skip_replaces_a_file_the_loader_cannot_decode_and_lists_it(folder, tmp_path, workers):
    bad = _truncate(folder / "train" / "cat" / "2.jpg")
    result = train(_recipe(folder, tmp_path, "data.verify=header", "data.on_bad_image=skip", f"data.workers={workers}"),
                   run_dir=tmp_path / "run")
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])
    assert result.history[0]["images_per_second"] > 0
    rows = _skipped(result.run_dir)
    assert [row["path"] for row in rows] == [str(bad)] and "truncated" in rows[0]["reason"]
    log = (result.run_dir / "train.log").read_text()
    assert "skipped an unreadable image the loader met" in log and str(bad) in log
    assert "image scan (data.verify: header): 16 files" in log


class TruncateAfterEpoch(Hook):
    """Damages a file at the end of the first epoch, as a disk or a copy job might mid-run."""

    name = "truncate_file"

    def __init__(self, path):
        self.path = path

    def epoch_end(self, state):
        if state.epoch == 0:
            _truncate(self.path)


def test_error_stops_the_run_naming_the_file_and_the_last_checkpoint_resumes(folder, tmp_path):
    victim = folder / "train" / "dog" / "4.jpg"
    original = victim.read_bytes()
    recipe = _recipe(folder, tmp_path, "train.epochs=2")  # data.verify: full, data.on_bad_image: error
    with pytest.raises(DataError) as stopped:
        train(recipe, run_dir=tmp_path / "run", hooks=[TruncateAfterEpoch(victim)])
    message = str(stopped.value)
    assert message.startswith(f"{victim}: truncated image data")
    assert "in epoch 2, batch" in message and f"imgtrain train --resume {tmp_path / 'run'}" in message
    saved = load_training_state(tmp_path / "run" / "checkpoints" / "last.state.pt")
    assert saved["epoch"] == 1 and saved.get("mid_epoch") is None  # epoch 1's state, nothing after it
    victim.write_bytes(original)  # fixed: the resume's scan sees a new mtime and decodes it again
    resumed = train(recipe, resume=tmp_path / "run")
    assert [row["epoch"] for row in resumed.history] == [1, 2]


def test_the_command_line_says_which_file_stopped_the_run_without_a_traceback(folder, tmp_path, capsys):
    bad = _truncate(folder / "val" / "dog" / "1.jpg")
    code = main(["train", "imagefolder", "--run-dir", str(tmp_path / "run"), f"data.root={folder}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.verify=header", *TINY])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert f"imgtrain: error: {bad}: truncated image data" in err and "in the validation after epoch 1" in err
    assert "no training state was saved yet" in err and "--overwrite" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_the_decoded_cache_applies_the_same_rule(folder, tmp_path, cache):
    bad = _truncate(folder / "train" / "cat" / "5.jpg")
    common = ["data.verify=header", f"data.cache={cache}"]
    with pytest.raises(DataError, match=r"(?s)data.cache: 1 image file\(s\) cannot be decoded.*cat/5.jpg: truncated"):
        train(_recipe(folder, tmp_path, *common), run_dir=tmp_path / "stopped")
    for attempt in ("first", "second"):  # disk: the stopped run's cache is reused, its list of blank rows too
        result = train(_recipe(folder, tmp_path, *common, "data.on_bad_image=skip"), run_dir=tmp_path / attempt)
        assert [row["path"] for row in _skipped(result.run_dir)] == [str(bad)]
        log = (result.run_dir / "train.log").read_text()
        assert "data: 11 train, 4 val" in log
        assert ("decoded cache (disk" in log and "reused" in log) == (cache == "disk")
