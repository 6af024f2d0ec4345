"""SIGKILL in the middle of a streaming run (data.source: streaming, LitData shards): `imgtrain train
--resume` ends with the history and weights of an uninterrupted run, to the bit."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgtrain.config import load_recipe
from imgtrain.data import build_splits
from imgtrain.engine.checkpoint import load_resumable_state

from .conftest import DirWatch, finish, kill_now, resume_cmd, run, same_run, start, train_cmd

pytest.importorskip("litdata")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Shards of a small shapes image folder (4 classes, 16 px PNGs)."""
    from imgtrain.data import write_shapes_imagefolder
    from imgtrain.data.streaming import write_shards

    base = tmp_path_factory.mktemp("streaming")
    shapes = load_recipe(None, ["data.shapes.image_size=16", "data.shapes.train_size=600",
                                "data.shapes.val_size=80", "data.shapes.test_size=0"]).data.shapes
    write_shapes_imagefolder(shapes, base / "folder", layout="flat")
    data = load_recipe(None, ["data.source=imagefolder", f"data.root={base / 'folder'}"]).data
    write_shards(build_splits(data), base / "shards", workers=2)
    return base / "shards"


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_run(shards, tmp_path, faults):
    source = ("data.source=streaming", f"data.root={shards}")
    reference = tmp_path / "reference"
    done = run(train_cmd(reference, *source))
    assert done.returncode == 0, done.stderr
    cut = tmp_path / "cut"
    cut.mkdir()
    watch = DirWatch(cut)
    proc = start(train_cmd(cut, *source))
    # a state after every step, 8 steps and 2 weight files an epoch: the 15th write is inside epoch 2
    assert watch.wait_tmp(15, proc)
    kill_now(proc)
    code, _ = finish(proc)
    assert code != 0  # killed, not finished
    saved = load_resumable_state(cut / "checkpoints")[0]
    assert saved["epoch"] == 1 and saved["mid_epoch"]["batches_done"] > 0  # the resume starts mid-epoch
    resumed = run(resume_cmd(cut))
    assert resumed.returncode == 0, resumed.stderr
    survived = same_run(cut, reference)
    faults.add("SIGKILL mid-epoch, streaming shards", survived=survived, lost=not survived)
    assert survived
