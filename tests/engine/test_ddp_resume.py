"""Resuming under several processes (issue 14): real 2-process jobs (torchrun, gloo on the CPU) on the digits of
the quickstart recipe with the tiny net at 8 px, 2 epochs of 37 steps, a training state every 5 steps.

Two runs are trained once for the module and compared:
- `reference`: never interrupted (`imgtrain train ... --nproc 2`).
- `elastic`: the same run, interrupted three times:
  1. plain `torchrun --max-restarts 3 --nproc-per-node 2 -m imgtrain train ... train.auto_resume=true`;
     rank 0 (the process that writes) is killed with SIGKILL after step 12 (last state: step 10, inside
     epoch 1); torchrun stops rank 1 and starts both again; they resume.
  2. in that second attempt rank 0 stops after step 45 (last state: step 40, inside epoch 2) and the whole
     job (torchrun and both workers) is killed with SIGKILL, as when the machine goes away.
  3. `imgtrain train ... --nproc 2 --max-restarts 3 --resume auto` resumes it; rank 1 is killed after step
     57 (last state: 55); the launcher's torchrun restarts the group, which resumes and finishes the run.
The workers stop at those steps through tests/engine/ddp_faults.py's PauseForKill hook, which writes its
process id where the test waits for it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imgtrain.api import train
from imgtrain.cli import main
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.checkpoint import CheckpointError, load_agreed_state, load_training_state, save_training_state

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.epochs=2", "train.threads=1",
        "train.deterministic=true", "data.batch_size=16", "train.checkpoint_every.steps=5",
        "output.progress=false", "output.plots=false", "output.report=false"]
PAUSE = ["--hook", "ddp_faults:PauseForKill"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE")
TIMINGS = ("epoch_seconds", "images_per_second")  # the only columns that may differ between runs
JOB_TIMEOUT = 180.0  # seconds: far under the 30-minute collective timeout a hang would wait for


def job_env(**extra: str) -> dict[str, str]:
    """This checkout and this folder (the hooks) first on the path of every process the job starts."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(Path(__file__).parent),
                                         *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra}


class Job:
    """A command started in the background, its output in files (a pipe nobody reads could fill and block)."""

    def __init__(self, command: list[str], folder: Path, env: dict[str, str]):
        folder.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for_pause(self, marker: Path) -> int:
        """The process id a paused worker wrote to `marker`."""
        deadline = time.monotonic() + JOB_TIMEOUT
        while not marker.is_file():
            assert self.process.poll() is None, f"the job ended before {marker.name}:\n{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"no {marker.name} after {JOB_TIMEOUT} s:\n{self.stderr[-3000:]}"
            time.sleep(0.1)
        return int(marker.read_text())

    def kill_everything(self) -> None:
        """SIGKILL to the command and every process under it (torchrun starts its workers in sessions of
        their own, so a process group kill would miss them)."""
        root = psutil.Process(self.process.pid)
        for process in [*root.children(recursive=True), root]:
            process.kill()
        self.process.wait(timeout=30)

    def finish(self) -> int:
        try:
            return self.process.wait(timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill_everything()
            raise AssertionError(f"the job hung:\n{self.stderr[-3000:]}") from None


def imgtrain_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgtrain", *args]


def history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(handle)]


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def first_checkpoint_step_of_each_fit(run: Path) -> list[int]:
    """The step of the first mid-epoch state each process group saved: 5 when it started at the beginning."""
    steps, fresh = [], False
    for event in events(run):
        if event["event"] == "fit_start":
            fresh = True
        elif event["event"] == "mid_epoch_checkpoint" and fresh:
            steps.append(event["step"])
            fresh = False
    return steps


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("ddp_resume")
    found: dict[str, object] = {}

    # the uninterrupted run trains beside the interrupted one (most of their time is start-up and waiting)
    reference = Job(imgtrain_command("train", "quickstart", *TINY, f"output.root={root / 'reference'}",
                                     "--nproc", "2"), root / "logs-reference", job_env())
    try:
        run = root / "elastic" / "quickstart"
        marks = root / "marks-torchrun"
        marks.mkdir()
        torchrun = Job([sys.executable, "-m", "torch.distributed.run", "--max-restarts", "3", "--nproc-per-node", "2",
                        "-m", "imgtrain", "train", "quickstart", *TINY, "train.auto_resume=true",
                        f"output.root={root / 'elastic'}", *PAUSE], root / "logs-torchrun",
                       job_env(IMGTRAIN_TEST_PAUSE_AT="0:0:12,1:0:45", IMGTRAIN_TEST_PAUSE_DIR=str(marks)))
        psutil.Process(torchrun.wait_for_pause(marks / "attempt-0-rank-0.pid")).kill()  # one worker dies
        torchrun.wait_for_pause(marks / "attempt-1-rank-0.pid")  # torchrun restarted both; they resumed
        torchrun.kill_everything()  # the machine goes away: no process is left to save anything
        found["torchrun_stderr"] = torchrun.stderr
        found["state_after_kill"] = load_training_state(run / "checkpoints" / "last.state.pt")

        marks = root / "marks-launcher"
        marks.mkdir()
        launcher = Job(imgtrain_command("train", "quickstart", *TINY, f"output.root={root / 'elastic'}", *PAUSE,
                                        "--nproc", "2", "--max-restarts", "3", "--resume", "auto"),
                       root / "logs-launcher",
                       job_env(IMGTRAIN_TEST_PAUSE_AT="0:1:57", IMGTRAIN_TEST_PAUSE_DIR=str(marks)))
        psutil.Process(launcher.wait_for_pause(marks / "attempt-0-rank-1.pid")).kill()
        assert launcher.finish() == 0, launcher.stderr[-3000:]
        found["launcher_stderr"] = launcher.stderr
        found["elastic"] = run
    except BaseException:
        if reference.process.poll() is None:
            reference.kill_everything()  # leave no job behind a failed fixture
        raise
    assert reference.finish() == 0, reference.stderr[-3000:]
    found["reference"] = root / "reference" / "quickstart"
    return found


def test_elastic_restarts_and_a_killed_job_resumed_end_with_the_uninterrupted_history(jobs):
    reference, run = jobs["reference"], jobs["elastic"]
    assert len(history(reference)) == 2
    # every column but the timings, as written (6 significant digits); the weights to the bit
    assert history(run) == history(reference)
    ours = load_file(run / "checkpoints" / "last.safetensors")
    theirs = load_file(reference / "checkpoints" / "last.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # four process groups: from the start, then after steps 10, 40 and 55 (their first states: 5, 15, 45,
    # 60), never from scratch again
    assert first_checkpoint_step_of_each_fit(run) == [5, 15, 45, 60]
    # torchrun saw each killed worker and restarted the group; the launcher passed --max-restarts on
    assert "failed (exitcode: -9) local_rank: 0" in jobs["torchrun_stderr"]
    assert "failed (exitcode: -9) local_rank: 1" in jobs["launcher_stderr"]
    assert "torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 3" in jobs["launcher_stderr"]
    # killing the writing process and the whole job left no temporary file and no half state behind
    leftovers = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert leftovers == ["best.safetensors", "last.safetensors", "last.state.pt", "previous.state.pt"]


def test_the_killed_job_left_a_whole_mid_epoch_state_of_both_processes(jobs):
    saved = jobs["state_after_kill"]
    assert saved["step"] == 40 and saved["mid_epoch"]["batches_done"] == 3 and saved["epoch"] == 1
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
    sums = saved["mid_epoch"]["ranks"]
    # each process's own running sums: 3 batches of 16 images each
    assert [part["images_seen"] for part in sums] == [48, 48]
    assert saved["mid_epoch"]["images_seen"] == 96
    # each process's own RNG states (each seeds its own augmentation): a resume gives them back
    first, second = (part["rng"] for part in saved["ranks"])
    assert not torch.equal(first["torch"], second["torch"])
    assert torch.equal(first["torch"], saved["rng"]["torch"])  # "rng": rank 0's, what one process reads


def test_checkpoints_of_two_processes_are_one_process_files(jobs, tmp_path, capsys):
    run = jobs["reference"]
    weights = load_file(run / "checkpoints" / "best.safetensors")
    assert weights and not any(key.startswith("module.") for key in weights)  # the plain module's, not DDP's
    state = load_training_state(run / "checkpoints" / "last.state.pt")
    assert state["model"].keys() == weights.keys()
    # a digit drawn from the data, predicted in this one process
    from sklearn.datasets import load_digits
    image = tmp_path / "digit.png"
    Image.fromarray((load_digits().images[0] * 255 / 16).astype(np.uint8)).save(image)
    assert main(["predict", str(run), str(image), "--topk", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")
    tuned = tmp_path / "tuned"
    assert main(["finetune", str(run), "train.epochs=3", "train.max_steps_per_epoch=2", "train.threads=1",
                 "output.progress=false", "output.plots=false", "output.report=false", "--run-dir", str(tuned)]) == 0
    assert f"loaded 26 of 26 tensors from {run}" in (tuned / "train.log").read_text()


def test_a_failing_process_ends_the_job_with_its_message(tmp_path):
    job = Job(imgtrain_command("train", "quickstart", *TINY, f"output.root={tmp_path / 'runs'}", "--hook",
                               "ddp_faults:FailOnRank", "--nproc", "2"), tmp_path / "logs",
              job_env(IMGTRAIN_TEST_FAIL="1:3"))
    assert job.finish() == 1  # torchrun's status for a failed worker; finish() fails the test on a hang
    assert "rank 1 fails on purpose after step 3" in job.stderr
    assert "failed (exitcode: 1) local_rank: 1" in job.stderr


def test_restarts_without_resuming_are_refused(tmp_path, capsys):
    # refused by the launcher before torchrun starts (torchrun itself would start the same check in every
    # worker: api.check_restartable reads TORCHELASTIC_MAX_RESTARTS)
    assert main(["train", "quickstart", *TINY, f"output.root={tmp_path}", "--nproc", "2", "--max-restarts", "3"]) == 2
    assert "add --resume auto (or train.auto_resume=true)" in capsys.readouterr().err
    assert main(["train", "quickstart", *TINY, f"output.root={tmp_path}", "--max-restarts", "3"]) == 2
    assert "--max-restarts goes with --nproc" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_worker_of_a_restartable_torchrun_job_that_would_not_resume_is_refused(tmp_path, monkeypatch):
    """Under `torchrun --max-restarts 3` (which tells its workers TORCHELASTIC_MAX_RESTARTS) without auto-resume,
    every worker refuses before it joins the process group or touches a folder."""
    recipe = load_recipe("quickstart", [*TINY, f"output.root={tmp_path}"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    with pytest.raises(RecipeError, match="restarts \\(3\\) are allowed, but a restart of this command would start"):
        train(recipe)
    assert not any(tmp_path.iterdir())


def test_a_mid_epoch_state_resumes_only_with_as_many_processes(jobs, tmp_path):
    saved = dict(jobs["state_after_kill"])
    save_training_state(tmp_path, saved)
    with pytest.raises(CheckpointError, match=r"saved inside epoch 2 by 2 process\(es\), but 1 are resuming it.*"
                                              r"Resume with --nproc 2"):
        load_agreed_state(tmp_path)
    saved["mid_epoch"] = None  # at an epoch end the number of processes may change
    save_training_state(tmp_path, saved)
    assert load_agreed_state(tmp_path)[0]["step"] == 40
