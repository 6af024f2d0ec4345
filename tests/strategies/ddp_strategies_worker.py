"""One rank of tests/strategies/test_ddp_strategies.py, started by torchrun (2 gloo processes on the CPU).

`python ddp_strategies_worker.py PLAN.json` joins the process group once and trains, one after the other,
every run the plan lists ({"runs": {name: [overrides...]}, "root": folder}) with imgtrain.api.train on the
quickstart recipe, each into root/name. One launch for all the runs: starting processes and importing
torch costs more than a tiny run. A run that fails writes its error to root/name.error and the others go on.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

from imgtrain.api import train
from imgtrain.config import load_recipe
from imgtrain.engine.distributed import barrier, close_distributed, init_distributed, world_info


def main(plan_file: Path) -> None:
    plan = json.loads(plan_file.read_text())
    root = Path(plan["root"])
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"), timeout_seconds=120)
    rank = world_info()[0]
    for name, overrides in plan["runs"].items():
        try:
            train(load_recipe("quickstart", overrides), run_dir=root / name)
        except Exception:  # the test reads the error; a hang would be worse than going on
            (root / f"{name}.rank{rank}.error").write_text(traceback.format_exc())
            raise
        barrier()
    close_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
