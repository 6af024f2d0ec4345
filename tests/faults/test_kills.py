"""SIGKILL at seeded random points (some inside a checkpoint write), SIGTERM, and two kills in a row:
each run resumed with `imgtrain train --resume` ends with the history and weights of an uninterrupted run."""

from __future__ import annotations

import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imgtrain.engine.checkpoint import load_resumable_state
from imgtrain.engine.preemption import PREEMPTED_EXIT_CODE

from .conftest import (
    EPOCHS,
    STEPS,
    TRACEBACK,
    DirWatch,
    copy_run,
    finish,
    kill_now,
    resume_cmd,
    run,
    same_run,
    start,
    tmp_files,
    train_cmd,
    wait_for_line,
)

KILLS = 6
SEED = 13


@dataclass
class KillPoint:
    """Where a kill lands: at the `tmp`-th checkpoint write (the moment its temporary file appears), or
    `delay` seconds after the `line`-th progress line."""
    tmp: int = 0
    line: int = 0
    delay: float = 0.0

    def __str__(self) -> str:
        return f"write #{self.tmp}" if self.tmp else f"{self.delay:.2f} s after progress line {self.line}"


def kill_points(seed: int = SEED) -> list[KillPoint]:
    rng = random.Random(seed)
    # 3 kills inside a write: states are saved after every step (24 states, 2 weight files an epoch),
    # a write from the 2nd on, so that a state exists before the kill
    points = [KillPoint(tmp=rng.randint(2, STEPS * EPOCHS)) for _ in range(3)]
    # 3 at random moments: progress lines come 3 per epoch, then the epoch's summary line (the last
    # epoch's is left out: after it the run may end before the kill arrives)
    lines = 4 * EPOCHS - 1
    points += [KillPoint(line=rng.randint(1, lines), delay=rng.uniform(0.0, 0.25)) for _ in range(KILLS - 3)]
    rng.shuffle(points)
    return points


@dataclass
class Outcome:
    point: KillPoint
    killed: bool
    in_write: bool
    resume_code: int
    resume_err: str
    same: bool


def kill_and_resume(point: KillPoint, run_dir: Path, reference: Path) -> Outcome:
    run_dir.mkdir(parents=True)  # empty: a new run may use it, and inotify can watch it from the start
    watch = DirWatch(run_dir) if point.tmp else None
    proc = start(train_cmd(run_dir))
    try:
        if watch is not None:
            watch.wait_tmp(point.tmp, proc)
        else:
            assert proc.stderr is not None
            seen = 0
            for line in proc.stderr:
                seen += line.startswith("epoch ")
                if seen == point.line:
                    break
            time.sleep(point.delay)
        killed = proc.poll() is None
        kill_now(proc)
        proc.wait(timeout=60)
    finally:
        if watch is not None:
            watch.close()
        if proc.poll() is None:
            proc.kill()
        if proc.stderr is not None:
            proc.stderr.close()
    in_write = bool(tmp_files(run_dir / "checkpoints"))
    done = run(resume_cmd(run_dir))
    return Outcome(point, killed, in_write, done.returncode, done.stderr, same_run(run_dir, reference))


def test_sigkill_at_random_points_resumes_to_the_same_run(tmp_path, reference, faults):
    points = kill_points()
    assert len(points) == KILLS
    with ThreadPoolExecutor(max_workers=2) as pool:  # two runs at once: one per CI core
        outcomes = list(pool.map(lambda ip: kill_and_resume(ip[1], tmp_path / f"kill{ip[0]}", reference),
                                 enumerate(points)))
    for out in outcomes:
        ok = out.killed and out.resume_code == 0 and out.same
        faults.add("SIGKILL at a random point", survived=ok, lost=out.killed and not out.same)
        if out.in_write:
            faults.add("SIGKILL inside a checkpoint write", survived=ok, lost=not out.same)
    report = "\n".join(f"{o.point}: killed {o.killed}, inside a write {o.in_write}, resume exit {o.resume_code}, "
                       f"same run {o.same}" for o in outcomes)
    print(report, file=sys.stderr)
    for out in outcomes:
        assert out.killed, f"{out.point}: the run ended before the kill\n{report}"
        assert out.resume_code == 0, f"{out.point}: resume failed:\n{out.resume_err[-3000:]}"
        assert out.same, f"{out.point}: the resumed run differs from the uninterrupted one\n{report}"
    assert any(o.in_write for o in outcomes), f"no kill landed inside a checkpoint write\n{report}"


def test_sigterm_saves_and_resumes(tmp_path, stopped_run, reference, faults):
    src, code, err = stopped_run
    run_dir = copy_run(src, tmp_path / "run")
    log = (run_dir / "train.log").read_text()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    preempted = [e for e in events if e.get("event") == "preempted"]
    saved, path, problems = load_resumable_state(run_dir / "checkpoints")
    done = run(resume_cmd(run_dir))
    same = done.returncode == 0 and same_run(run_dir, reference)
    faults.add("SIGTERM, then --resume", survived=code == PREEMPTED_EXIT_CODE and same, lost=not same)
    assert code == PREEMPTED_EXIT_CODE, err[-3000:]
    assert TRACEBACK not in err
    assert f"imgtrain train --resume {src}" in err
    assert "SIGTERM" in log
    assert preempted and preempted[-1]["signal"] == "SIGTERM"
    assert path.name == "last.state.pt" and not problems
    assert saved["epoch"] == 1 and saved["mid_epoch"]["batches_done"] == preempted[-1]["batches_done"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_run(run_dir, reference)


def test_two_kills_in_a_row(tmp_path, reference, faults):
    run_dir = tmp_path / "run"
    proc = start(train_cmd(run_dir))
    wait_for_line(proc, "epoch 1/")
    kill_now(proc)
    finish(proc)
    first = load_resumable_state(run_dir / "checkpoints")[0]
    proc = start(resume_cmd(run_dir, "output.progress=log"))
    wait_for_line(proc, f"epoch 2/{EPOCHS} ")
    kill_now(proc)
    finish(proc)
    second = load_resumable_state(run_dir / "checkpoints")[0]
    done = run(resume_cmd(run_dir))
    same = done.returncode == 0 and same_run(run_dir, reference)
    faults.add("SIGKILL, resume, SIGKILL, resume", survived=same, lost=not same)
    assert first["step"] < second["step"], "the second process trained on from the first's state"
    assert done.returncode == 0, done.stderr[-3000:]
    assert same


def test_kill_points_are_seeded():
    """The same seed gives the same kill points (a failure names one that can be replayed)."""
    assert [str(p) for p in kill_points()] == [str(p) for p in kill_points()]
    assert sum(p.tmp > 0 for p in kill_points()) == 3
