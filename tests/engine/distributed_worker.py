"""One rank of tests/engine/test_distributed.py, started as a subprocess with torchrun's variables.

`python distributed_worker.py WEIGHTS OUT` joins the process group the environment describes (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; gloo on CPU), evaluates the given weights on its
ShardedEvalSampler shard of the first EVAL_IMAGES digits and writes what evaluate_batches returned,
with the rank's view of the world, as JSON to OUT. The test loads this file with runpy for the same
data, model and evaluation in one process.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from imgtrain.config import ModelConfig
from imgtrain.engine.distributed import ShardedEvalSampler, init_distributed, world_info
from imgtrain.engine.validate import evaluate_batches
from imgtrain.models import create_model

EVAL_IMAGES = 301  # odd: two ranks get 150 and 151 images, a padding sampler would repeat one
BATCH_SIZE = 32  # shards end mid-batch: the last batches of the ranks differ in size
CLASSES = [str(digit) for digit in range(10)]


def digits(start: int, stop: int | None) -> TensorDataset:
    """scikit-learn's 8x8 digits [start:stop] as (N, 1, 8, 8) floats in [0, 1] and their labels."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = torch.tensor(bunch.images[start:stop], dtype=torch.float32)[:, None] / 16
    return TensorDataset(images, torch.tensor(bunch.target[start:stop]))


def new_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(name="imgtrain_cnn_tiny"), num_classes=len(CLASSES), in_chans=1)


def evaluate(weights: Path, sampler: Sampler[int] | None = None, index_offset: int = 0) -> dict[str, Any]:
    """evaluate_batches of `weights` on the first EVAL_IMAGES digits (those `sampler` picks), on the CPU."""
    model = new_model()
    model.load_state_dict(torch.load(weights, weights_only=True))
    loader = DataLoader(digits(0, EVAL_IMAGES), batch_size=BATCH_SIZE, sampler=sampler)
    return evaluate_batches(model, loader, CLASSES, torch.device("cpu"), contextlib.nullcontext,
                            index_offset=index_offset)


def main(weights: Path, out: Path) -> None:
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    init_distributed(torch.device("cpu"), timeout_seconds=60)
    try:
        rank, world_size, local_rank = world_info()
        sampler = ShardedEvalSampler(EVAL_IMAGES, rank, world_size)
        result = evaluate(weights, sampler, index_offset=sampler.offset)
        result["world"] = [rank, world_size, local_rank]
        result["shard"] = list(sampler)
        out.write_text(json.dumps(result), encoding="utf-8")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
