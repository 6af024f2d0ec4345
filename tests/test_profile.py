"""`imgtrain profile`: a real profile of a digits run (the phases, the operator table, a Chrome trace
that parses), the phase arithmetic on nested ranges, and the errors."""

from __future__ import annotations

import json
import time

import torch
from torch.profiler import record_function

from imgtrain.cli import main
from imgtrain.config import load_recipe
from imgtrain.tools.profile import phase_milliseconds, profile_recipe

TINY = ["model.name=imgtrain_cnn_tiny", "train.threads=1", "output.progress=off", "data.batch_size=32"]


def test_a_profile_of_real_training_steps(tmp_path):
    result = profile_recipe(load_recipe("quickstart", TINY), steps=12, warmup=3, run_dir=tmp_path / "run")
    assert result.steps == 12
    phases = result.phases
    assert list(phases) == ["data", "to device", "forward", "backward", "optimizer", "hooks", "other"]
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0 and phases["data"] > 0
    assert sum(phases.values()) >= result.step_ms * 0.999  # the phases and "other" make up the step
    assert result.images_per_second == 1000.0 * 32 / result.step_ms
    assert "aten::" in result.operators and result.operators.startswith("top ")
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"imgtrain/data", "imgtrain/forward", "imgtrain/backward", "imgtrain/optimizer"} <= names
    table = (tmp_path / "run" / "profile.txt").read_text()
    assert table.startswith("phase") and "forward" in table and "top " in table
    # the profile's run folder is a normal run folder of one short epoch
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "summary.json").is_file()


def test_each_range_counts_its_own_time_only():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with record_function("imgtrain/forward"):
            time.sleep(0.01)
            with record_function("imgtrain/hook/after_forward"):
                time.sleep(0.02)
        with record_function("imgtrain/data"):
            torch.ones(100).sum()
    phases = phase_milliseconds(prof.events())
    forward_total = next(e.cpu_time_total for e in prof.events() if e.name == "imgtrain/forward") / 1000
    assert phases["hooks"] >= 20 and phases["forward"] >= 10
    assert abs(forward_total - phases["forward"] - phases["hooks"]) < 1e-6  # the hook's time moved to hooks
    assert phases["data"] > 0 and phases["backward"] == 0


def test_profile_command_and_its_errors(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["profile", "quickstart", *TINY, "--steps", "5", "--warmup", "1", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("phase") and "5 steps profiled" in out and f"wrote {run / 'trace.json'}" in out
    assert main(["profile", "quickstart", *TINY, "--steps", "5", "--run-dir", str(run)]) == 2  # never replaced
    assert "exists" in capsys.readouterr().err and (run / "trace.json").is_file()
    assert main(["profile", "quickstart", *TINY, "--steps", "5", "--warmup", "500", "--run-dir",
                 str(tmp_path / "other")]) == 2
    assert "lower --warmup" in capsys.readouterr().err
