"""A pickle with code in it (its __reduce__ makes a marker folder) offered everywhere imgtrain reads a
file: starting weights, fine-tuning, a training state, a distillation teacher, an ensemble member.
Each is refused without being run (the marker never appears), in a short message that never suggests
loading it with weights_only=False."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from .conftest import TRACEBACK, cli, copy_run, resume_cmd, run_all

EXIT_BAD_INPUT = 2
TINY = ("model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.epochs=1", "train.max_steps_per_epoch=1",
        "output.plots=false", "output.report=false", "output.progress=off", "train.threads=1")


class Payload:
    """Unpickled, it calls os.mkdir(marker): code run by merely loading the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def armed_pickle(path, marker) -> None:
    """A checkpoint-looking file whose unpickling runs the payload; checked to be armed."""
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "extra": Payload(str(marker))}, path)
    torch.load(path, weights_only=False)  # loading it the unsafe way runs the code ...
    assert marker.is_dir(), "the payload is not armed"
    marker.rmdir()  # ... so a marker seen later means imgtrain ran it


@pytest.fixture(scope="module")
def offered(tmp_path_factory, stopped_run, reference):
    base = tmp_path_factory.mktemp("pickles")
    marker = base / "PWNED"
    evil = base / "evil.pt"
    armed_pickle(evil, marker)
    state_run = copy_run(stopped_run[0], base / "state_run")
    for name in ("last.state.pt", "previous.state.pt"):
        shutil.copyfile(evil, state_run / "checkpoints" / name)
    cases = {
        "model.weights_file": cli("train", "quickstart", *TINY, f"model.weights_file={evil}",
                                  "--run-dir", str(base / "r1")),
        "finetune": cli("finetune", str(evil), "quickstart", *TINY, "--run-dir", str(base / "r2")),
        "training state (last.state.pt)": resume_cmd(state_run),
        "distillation teacher": cli("train", "quickstart", *TINY, f"distill.teacher={evil}",
                                    "--run-dir", str(base / "r3")),
        "ensemble member": cli("ensemble", str(reference), str(evil)),
    }
    results = run_all(list(cases.values()))
    return marker, dict(zip(cases, results))


UNSAFE_ADVICE = ("weights_only=False", "`weights_only` set to `False`")
@pytest.mark.parametrize("where", ["model.weights_file", "finetune", "training state (last.state.pt)",
                                   "distillation teacher", "ensemble member"])
def test_pickle_with_code_is_refused_unrun(where, offered, faults):
    marker, results = offered
    done = results[where]
    message = [line for line in done.stderr.splitlines() if line.startswith("imgtrain: error:")]
    ran = marker.exists()
    clear = (done.returncode == EXIT_BAD_INPUT and bool(message) and TRACEBACK not in done.stderr
             and not any(advice in done.stderr for advice in UNSAFE_ADVICE))
    faults.add(f"pickle with code as {where}", survived=clear and not ran, lost=ran,
               note="" if clear or ran else "refused unrun; message quotes torch's weights_only=False advice")
    assert not ran, "the pickle's code ran"
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-3000:]
    assert message, done.stderr[-3000:]
    assert "evil.pt" in done.stderr or "state.pt" in done.stderr
    assert TRACEBACK not in done.stderr
    assert not any(advice in done.stderr for advice in UNSAFE_ADVICE), done.stderr
    assert len(done.stderr) < 1200, f"not short: {len(done.stderr)} characters\n{done.stderr}"
