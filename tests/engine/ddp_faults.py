"""Hooks that tests/engine/test_ddp_resume.py passes to real multi-process runs (`--hook ddp_faults:NAME`,
this folder on PYTHONPATH), steered by environment variables so one module serves every worker.

- `PauseForKill` (IMGTRAIN_TEST_PAUSE_AT="ATTEMPT:RANK:STEP,..." and IMGTRAIN_TEST_PAUSE_DIR=FOLDER): in
  attempt ATTEMPT of the job (TORCHELASTIC_RESTART_COUNT: 0 the first, 1 after torchrun's first restart),
  rank RANK writes its process id to FOLDER/attempt-ATTEMPT-rank-RANK.pid after optimizer step STEP and
  then waits, so the test kills a known process at a known point: after that step, before the mid-epoch
  checkpoint that step may be due for (hooks see after_step before the saver does). The other ranks
  wait for it in their next collective.
- `FailOnRank` (IMGTRAIN_TEST_FAIL="RANK:STEP"): rank RANK raises after optimizer step STEP, as a
  crashing process would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from imgtrain.engine.distributed import world_info
from imgtrain.engine.events import Hook

PAUSE_SECONDS = 120.0  # far longer than the test needs to find and kill the paused process


class PauseForKill(Hook):
    name = "test_pause_for_kill"

    def after_step(self, state) -> None:
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        rank = world_info()[0]
        for spec in filter(None, os.environ.get("IMGTRAIN_TEST_PAUSE_AT", "").split(",")):
            if tuple(int(part) for part in spec.split(":")) == (attempt, rank, state.step):
                marker = Path(os.environ["IMGTRAIN_TEST_PAUSE_DIR"]) / f"attempt-{attempt}-rank-{rank}.pid"
                partial = marker.with_suffix(".tmp")
                partial.write_text(str(os.getpid()))
                partial.replace(marker)  # the test never reads half a number
                time.sleep(PAUSE_SECONDS)


class FailOnRank(Hook):
    name = "test_fail_on_rank"

    def after_step(self, state) -> None:
        spec = os.environ.get("IMGTRAIN_TEST_FAIL")
        if not spec:
            return
        rank, step = (int(part) for part in spec.split(":"))
        if world_info()[0] == rank and state.step == step:
            raise RuntimeError(f"rank {rank} fails on purpose after step {step} (IMGTRAIN_TEST_FAIL)")
