"""Evaluation across processes (engine/distributed.py, engine/validate.py): two gloo ranks on the CPU,
each evaluating its unpadded shard of an odd number of digits, report the numbers one process reports
for all of them; the shards cover every index once; the helpers answer for one process without a group."""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from imgtrain.engine.distributed import (
    ShardedEvalSampler,
    init_distributed,
    is_distributed,
    is_main_process,
    world_info,
)

WORKER_FILE = Path(__file__).with_name("distributed_worker.py")
REPO = Path(__file__).resolve().parents[2]
WORKER = runpy.run_path(str(WORKER_FILE))  # the ranks' data, model and evaluation, for the one-process run
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The tiny net trained briefly on the digits after the evaluated ones: right on most evaluated
    images, wrong on some, so the confusion matrix, the recalls and the worst images all carry information."""
    torch.manual_seed(0)
    model = WORKER["new_model"]()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = DataLoader(WORKER["digits"](WORKER["EVAL_IMAGES"], None), batch_size=64, shuffle=True)
    model.train()
    for _ in range(2):
        for inputs, targets in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("distributed") / "weights.pt"
    torch.save(model.state_dict(), path)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(weights: Path, out_dir: Path, world_size: int = 2) -> list[dict]:
    """Start `world_size` worker processes as torchrun would (its variables, gloo) and read their results."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        processes.append(subprocess.Popen(
            [sys.executable, str(WORKER_FILE), str(weights), str(out_dir / f"rank{rank}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=180)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} exited with {process.returncode}:\n{output}"
    return [json.loads((out_dir / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in range(world_size)]


def test_two_gloo_ranks_evaluate_an_odd_set_like_one_process(weights, tmp_path):
    single = WORKER["evaluate"](weights)
    count = WORKER["EVAL_IMAGES"]
    assert sum(map(sum, single["confusion"])) == count
    assert 0.3 < single["acc"] < 1.0  # some images wrong: the comparison below is not trivial

    ranks = run_ranks(weights, tmp_path)

    # each rank evaluated its own unpadded shard: 150 and 151 images, together each image once
    assert [len(r["shard"]) for r in ranks] == [150, 151]
    assert sorted(i for r in ranks for i in r["shard"]) == list(range(count))
    assert [r["world"] for r in ranks] == [[0, 2, 0], [1, 2, 1]]
    for result in ranks:  # every rank returns the whole set's numbers
        assert result["loss"] == pytest.approx(single["loss"], abs=1e-6)
        assert result["acc"] == single["acc"]
        assert result["balanced_acc"] == single["balanced_acc"]
        assert result["per_class_recall"] == single["per_class_recall"]
        assert result["confusion"] == single["confusion"]
        # the worst images by their index in the whole set (shard offset added), in the same order
        assert [w["index"] for w in result["worst"]] == [w["index"] for w in single["worst"]]
        assert [w["loss"] for w in result["worst"]] == pytest.approx([w["loss"] for w in single["worst"]], abs=1e-6)
    # both shards hold some of the worst images: the merge, not one rank's list, gave the answer
    worst = {w["index"] for w in single["worst"]}
    assert min(worst) < 150 <= max(worst)


def test_index_offset_shifts_the_worst_images_and_nothing_else(weights):
    plain, shifted = WORKER["evaluate"](weights), WORKER["evaluate"](weights, index_offset=1000)
    assert [w["index"] + 1000 for w in plain["worst"]] == [w["index"] for w in shifted["worst"]]
    for key in ("loss", "acc", "balanced_acc", "per_class_recall", "confusion"):
        assert plain[key] == shifted[key]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 8, 16])
def test_shards_hold_every_index_exactly_once(world_size):
    for length in [*range(0, 40), 301, 1000, 1001, 9999]:
        shards = [list(ShardedEvalSampler(length, rank, world_size)) for rank in range(world_size)]
        assert [i for shard in shards for i in shard] == list(range(length))  # once each, in order
        sizes = [len(shard) for shard in shards]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == [len(ShardedEvalSampler(length, rank, world_size)) for rank in range(world_size)]
        assert [ShardedEvalSampler(length, rank, world_size).offset for rank in range(world_size)] == \
            [sum(sizes[:rank]) for rank in range(world_size)]


def test_fewer_images_than_ranks_leaves_some_ranks_none():
    shards = [list(ShardedEvalSampler(3, rank, 5)) for rank in range(5)]
    assert sorted(i for shard in shards for i in shard) == [0, 1, 2]
    assert sum(1 for shard in shards if not shard) == 2


def test_torchs_distributed_sampler_repeats_images_and_ours_does_not():
    # why evaluation has its own sampler: DistributedSampler pads 301 images to 2 x 151
    padded = [i for rank in range(2) for i in DistributedSampler(range(301), num_replicas=2, rank=rank, shuffle=False)]
    assert len(padded) == 302 and len(set(padded)) == 301
    ours = [i for rank in range(2) for i in ShardedEvalSampler(301, rank, 2)]
    assert len(ours) == 301 and len(set(ours)) == 301


@pytest.mark.parametrize(("length", "rank", "world_size"), [(-1, 0, 1), (10, 2, 2), (10, -1, 2), (10, 0, 0)])
def test_the_sampler_refuses_impossible_shards(length, rank, world_size):
    with pytest.raises(ValueError, match="must be"):
        ShardedEvalSampler(length, rank, world_size)


def test_one_process_without_a_group(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert world_info() == (0, 1, 0)
    assert is_main_process() and not is_distributed()
    cpu = torch.device("cpu")
    assert init_distributed(cpu, timeout_seconds=1) == cpu  # no WORLD_SIZE: nothing to join
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed(cpu, timeout_seconds=1) == cpu
    assert not torch.distributed.is_initialized()


def test_world_info_reads_torchruns_variables_before_the_group_exists(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_info() == (5, 8, 1)
    assert not is_main_process()
    assert not is_distributed()  # no group yet: evaluation runs no collective
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
