"""train.data_parallel (torch.nn.DataParallel, one process on several GPUs): refused where it cannot run.

This machine has no GPU: the refusals run for real through the CLI; what runs on several GPUs is the
wrapping in engine/device.py, of which the part that works without a GPU (the replicas' precision) is
checked here."""

from __future__ import annotations

import threading

import pytest
import torch

from imgtrain.api import check_distributed_recipe
from imgtrain.cli import main
from imgtrain.config import RecipeError, load_recipe
from imgtrain.engine.device import AutocastForward, check_data_parallel

TINY = ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.threads=1", "train.epochs=1",
        "output.progress=off", "output.plots=false", "output.report=false"]


def test_on_a_machine_without_cuda_it_is_refused_before_any_folder_is_made(tmp_path, capsys):
    assert main(["train", "quickstart", *TINY, "train.data_parallel=true", f"output.root={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert "train.data_parallel" in error and "this run's device is cpu" in error
    assert "set train.data_parallel=false" in error
    assert not any(tmp_path.iterdir())


def test_with_several_processes_it_is_refused_before_torchrun_starts(tmp_path, capsys):
    code = main(["train", "quickstart", *TINY, "train.data_parallel=true", f"output.root={tmp_path}", "--nproc", "2"])
    assert code == 2
    error = capsys.readouterr().err
    assert "train.data_parallel is one process on several GPUs; under 2 processes" in error
    assert "starting 2 processes" not in error and not any(tmp_path.iterdir())
    # under torchrun (WORLD_SIZE set by the launcher) the same check refuses it in every process
    with pytest.raises(RecipeError, match="each process already has a GPU of its own") as refused:
        check_distributed_recipe(load_recipe("quickstart", ["train.data_parallel=true"]), 4)
    assert refused.value.key == "train.data_parallel"


@pytest.mark.parametrize(("overrides", "gpus", "message"), [
    ([], 1, "this machine has 1; set train.data_parallel=false"),
    (["train.compile=true"], 2, "torch.compile does not trace DataParallel"),
])
def test_one_gpu_or_compile_is_refused(overrides, gpus, message):
    cfg = load_recipe("quickstart", ["train.data_parallel=true", *overrides]).train
    with pytest.raises(RecipeError, match=message) as refused:
        check_data_parallel(cfg, torch.device("cuda"), gpus=gpus)
    assert refused.value.key == "train.data_parallel"
    check_data_parallel(load_recipe("quickstart", []).train, torch.device("cpu"))  # off: nothing to check


def test_each_replica_thread_runs_in_the_loops_precision():
    """DataParallel runs each GPU's replica in a thread; autocast's dtype is thread-local, and the thread
    re-enters autocast with the device's default dtype. The wrapper sets the loop's own in every thread."""
    layer = torch.nn.Linear(4, 3)
    inputs = torch.randn(2, 4)
    outputs: dict[str, torch.dtype] = {}

    def replica() -> None:
        # as torch's parallel_apply does: autocast on, with the thread's default dtype; one scope per forward
        # (autocast caches its casts of a weight until the outermost scope ends)
        for name, module in (("plain", layer), ("wrapped", AutocastForward(layer, "cpu", torch.float16)),
                             ("fp32", AutocastForward(layer, "cpu", None))):
            with torch.autocast("cpu", enabled=True):
                outputs[name] = module(inputs).dtype

    with torch.autocast("cpu", dtype=torch.float16):  # the loop's choice, in the main thread only
        thread = threading.Thread(target=replica)
        thread.start()
        thread.join()
    assert outputs == {"plain": torch.bfloat16, "wrapped": torch.float16, "fp32": torch.float32}
