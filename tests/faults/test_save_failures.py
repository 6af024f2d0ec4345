"""A training state that cannot be written (a full disk, a read-only folder) and a run folder deleted
under a running job: a clear message, exit code 3, no traceback, no hang, the previous state intact."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import time

import pytest

from imgtrain.engine.checkpoint import load_training_state

from .conftest import (
    EPOCHS,
    TIMEOUT,
    TRACEBACK,
    copy_run,
    finish,
    resume_cmd,
    run,
    same_run,
    start,
    tmp_files,
    train_cmd,
    wait_for_line,
)

EXIT_TRAINING_STOPPED = 3
SAVE_FAILED = "could not save the training state to"
# a training state of the tiny run is ~240 kB, its weights ~114 kB and every text file a few kB:
# with files capped at 160 kB, the next state cannot be written and nothing else is stopped
FILE_LIMIT = 160_000


def _small_files_only() -> None:
    # SIGXFSZ ignored: a write past the limit fails with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory, stopped_run):
    """The stopped run resumed with files capped (as a full disk): the first state it saves fails."""
    run_dir = copy_run(stopped_run[0], tmp_path_factory.mktemp("diskfull") / "run")
    before = (run_dir / "checkpoints" / "last.state.pt").read_bytes()
    done = run(resume_cmd(run_dir), preexec_fn=_small_files_only)
    return run_dir, before, done


def test_disk_full_is_a_clear_error(disk_full, faults):
    run_dir, _, done = disk_full
    clear = (done.returncode == EXIT_TRAINING_STOPPED and SAVE_FAILED in done.stderr
             and TRACEBACK not in done.stderr)
    faults.add("disk full while saving", survived=clear, lost=False,
               note="" if clear else "a traceback and exit code 1, not exit 3")
    assert done.returncode == EXIT_TRAINING_STOPPED, done.stderr[-3000:]
    assert SAVE_FAILED in done.stderr and "is intact" in done.stderr
    assert TRACEBACK not in done.stderr
    assert not tmp_files(run_dir / "checkpoints")


def test_disk_full_keeps_the_previous_state(disk_full, reference, faults):
    run_dir, before, done = disk_full
    assert done.returncode != 0, "the capped run did not fail: FILE_LIMIT no longer stops the state write"
    state = run_dir / "checkpoints" / "last.state.pt"
    intact = state.read_bytes() == before
    assert load_training_state(state)["mid_epoch"] is not None
    again = run(resume_cmd(run_dir))
    same = again.returncode == 0 and same_run(run_dir, reference)
    faults.add("disk full while saving: previous state resumed", survived=intact and same,
               lost=not (intact and same))
    assert intact
    assert again.returncode == 0, again.stderr[-3000:]
    assert same


def test_read_only_checkpoints_folder(tmp_path, stopped_run, faults):
    if os.geteuid() != 0:
        # the honest case: the stopped run's checkpoints/ made read-only, then resumed
        run_dir = copy_run(stopped_run[0], tmp_path / "run")
        ckpt = run_dir / "checkpoints"
        before = (ckpt / "last.state.pt").read_bytes()
        ckpt.chmod(0o555)
        try:
            done = run(resume_cmd(run_dir))
        finally:
            ckpt.chmod(0o755)
        kept = (ckpt / "last.state.pt").read_bytes() == before
        fault = "read-only checkpoints/ folder"
    else:
        # root writes into a read-only folder anyway; what a read-only folder does to the save, an
        # OSError from the folder, is made here by a file named checkpoints where the folder goes,
        # put there once the run has made its folder and before its first save
        run_dir = tmp_path / "run"
        proc = start(train_cmd(run_dir))
        deadline = time.monotonic() + TIMEOUT
        while not (run_dir / "config.yaml").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if (run_dir / "checkpoints").exists():
            proc.kill()
            pytest.skip("the first save came before the test could block checkpoints/")
        (run_dir / "checkpoints").write_text("not a folder")
        code, err = finish(proc)
        done = type("Done", (), {"returncode": code, "stderr": err})()
        kept = (run_dir / "checkpoints").read_text() == "not a folder"
        fault = "checkpoints/ not writable (root: a file in its place)"
    clear = done.returncode == EXIT_TRAINING_STOPPED and SAVE_FAILED in done.stderr and TRACEBACK not in done.stderr
    faults.add(fault, survived=clear and kept, lost=not kept)
    assert done.returncode == EXIT_TRAINING_STOPPED, done.stderr[-3000:]
    assert SAVE_FAILED in done.stderr and "Training stops here" in done.stderr
    assert TRACEBACK not in done.stderr
    assert kept


def test_run_folder_deleted_under_a_running_job(tmp_path, faults):
    run_dir = tmp_path / "run"
    # states at epoch ends only, and the folder deleted while the process is stopped inside epoch 2: no
    # write is under way (one under way fails cleanly, as a save into a read-only folder does)
    proc = start(train_cmd(run_dir, "train.checkpoint_every.steps=null", "train.checkpoint_every.minutes=null"))
    wait_for_line(proc, f"epoch 2/{EPOCHS} ")
    proc.send_signal(signal.SIGSTOP)
    shutil.rmtree(run_dir)
    proc.send_signal(signal.SIGCONT)
    code, err = finish(proc)
    clear = code != 0 and TRACEBACK not in err and str(run_dir) in err
    faults.add("run folder deleted while training", survived=clear, lost=False,
               note="" if clear else "made again as a partial folder, exit 0")
    assert code != 0, f"the run went on without its folder:\n{err[-2000:]}"
    assert TRACEBACK not in err
    assert str(run_dir) in err
