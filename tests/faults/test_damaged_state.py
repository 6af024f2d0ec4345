"""A damaged last.state.pt (truncated, zero bytes, another run's): the resume says so on stderr, falls
back to previous.state.pt and ends with the history and weights of an uninterrupted run."""

from __future__ import annotations

import shutil

import pytest

from imgtrain.engine.checkpoint import load_training_state

from .conftest import TRACEBACK, copy_run, resume_cmd, run_all, same_run


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero(path):
    path.write_bytes(b"")


DAMAGE = {"truncated": (truncate, "corrupt or truncated"), "zero bytes": (zero, "empty file (0 bytes)"),
          "another run's": (None, "the training state of another run")}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, stopped_run, reference):
    """Each damage on its own copy of the stopped run, all resumed at once."""
    src = stopped_run[0]
    base = tmp_path_factory.mktemp("damaged")
    runs = {}
    for i, (name, (damage, _)) in enumerate(DAMAGE.items()):
        run_dir = copy_run(src, base / f"run{i}")
        state = run_dir / "checkpoints" / "last.state.pt"
        if damage is None:  # a state of the reference run, which has another run id
            shutil.copyfile(reference / "checkpoints" / "last.state.pt", state)
        else:
            damage(state)
        runs[name] = run_dir
    previous_steps = {name: load_training_state(r / "checkpoints" / "previous.state.pt")["step"]
                      for name, r in runs.items()}
    results = run_all([resume_cmd(r) for r in runs.values()])
    return {name: (runs[name], done, previous_steps[name]) for name, done in zip(runs, results)}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_last_state_falls_back_to_previous(damage, resumed, reference, faults):
    run_dir, done, previous_step = resumed[damage]
    same = done.returncode == 0 and same_run(run_dir, reference)
    faults.add(f"last.state.pt {damage}", survived=same, lost=not same)
    assert done.returncode == 0, done.stderr[-3000:]
    assert DAMAGE[damage][1] in done.stderr
    assert "resuming from" in done.stderr and "previous.state.pt instead" in done.stderr
    assert TRACEBACK not in done.stderr
    assert previous_step > 0
    assert same
