"""Several processes, one run: who this process is, the process group, and evaluation shards.

Built on torch.distributed as torchrun launches it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in the environment): nccl on CUDA, gloo on CPU. With no process group and no torchrun
variables everything here answers for one process (rank 0 of 1), so single-process code paths
need no special case.

Evaluation shards its images with `ShardedEvalSampler`, not torch's `DistributedSampler`: the latter
pads the last shard by repeating images so that every rank gets the same count, and the repeated
images are then counted twice in the loss, the accuracy and the confusion matrix.

Training agrees on its decisions with `agree_any` (a flag any rank raised counts on every rank: a stop
signal, a hook's stop_training, a time-based checkpoint), so every rank runs the same collectives and
none waits for ever in one that the others skipped; `sum_across` adds a tensor up over the ranks.
Checkpoints gather what differs per rank to rank 0, which writes (`gather_to_main`: each rank's RNG
states and running sums), and a resume loads the training state rank 0 chose (`broadcast_from_main`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

# how long a collective waits for a rank that does not answer (a crashed or stuck process) before it
# raises: long enough for rank 0 to write a checkpoint or evaluate while the others wait, short
# enough that a broken job ends within the hour instead of hanging until its allocation runs out
DEFAULT_TIMEOUT_SECONDS = 1800.0


def is_distributed() -> bool:
    """True when a process group is initialized with more than one process: collectives are needed."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process.

    From the initialized process group when there is one (the local rank from LOCAL_RANK, else the
    rank: a single-node launcher that sets no LOCAL_RANK); before initialization from torchrun's
    RANK, WORLD_SIZE and LOCAL_RANK; (0, 1, 0) for a plain single process."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return rank, dist.get_world_size(), dist.get_node_local_rank(fallback_rank=rank)
    if "WORLD_SIZE" in os.environ:
        rank = int(os.environ.get("RANK", "0"))
        return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes the run folder."""
    return world_info()[0] == 0


def init_distributed(device: torch.device, timeout_seconds: float) -> torch.device:
    """Join the process group torchrun described in the environment; return the device this rank uses.

    A no-op returning `device` when WORLD_SIZE is unset or 1; a group that already exists is kept. On
    CUDA the backend is nccl and LOCAL_RANK selects the GPU (`torch.cuda.set_device`, and the group is
    bound to it; an index in `device` is overridden: each rank takes its own GPU); elsewhere gloo.
    `timeout_seconds` bounds every collective: when a rank fails or stops answering, the others raise
    after that long instead of waiting for ever, so the job ends (torchrun then stops the remaining
    workers) rather than hangs. On nccl the timeout is enforced by the
    watchdog's asynchronous error handling, which recent torch enables by default
    (TORCH_NCCL_ASYNC_ERROR_HANDLING)."""
    _, world_size, local_rank = world_info()
    if world_size <= 1:
        return device
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE is {world_size} but this build of torch has no torch.distributed; "
                           "run one process, or install a torch build with distributed support")
    if timeout_seconds <= 0:
        raise ValueError(f"timeout_seconds must be positive, not {timeout_seconds}")
    rank_device = device
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if local_rank >= available:
            raise RuntimeError(f"LOCAL_RANK is {local_rank} but this machine has {available} CUDA GPU(s): start at "
                               f"most {available} process(es) per machine (torchrun --nproc-per-node)")
        # every rank on a machine sees all its GPUs; LOCAL_RANK picks this rank's one. Set before the group
        # exists, so that nccl's communicator and every later default-device allocation land on it.
        rank_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(rank_device)
    if dist.is_initialized():
        return rank_device
    timeout = datetime.timedelta(seconds=timeout_seconds)  # also bounds the rendezvous (env:// store)
    store = restart_scoped_store(timeout)
    where: dict[str, Any] = ({"init_method": "env://"} if store is None else
                             {"store": store, "rank": world_info()[0], "world_size": world_size})
    if rank_device.type == "cuda":
        # device_id binds the group to this GPU (nccl starts its communicator now, not at the first collective)
        dist.init_process_group(backend="nccl", timeout=timeout, device_id=rank_device, **where)
    else:
        dist.init_process_group(backend="gloo", timeout=timeout, **where)
    return rank_device


def restart_scoped_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The key-value store this attempt of a torchrun job meets in, when torchrun restarts on one machine
    and shares its own store with the workers (TORCHELASTIC_USE_AGENT_STORE, its default); else None (the
    plain env:// rendezvous).

    torchrun keeps that store across restarts (`--max-restarts`), so the addresses the previous attempt's
    processes left in it are still there: a restarted process may read a dead peer's address and fail to
    connect ("Gloo connectFullMesh failed ... Connection refused") or wait for it (pytorch issue 135712).
    Scoping every key by TORCHELASTIC_RESTART_COUNT gives each attempt its own. On one machine one agent
    counts the restarts, so every process agrees on the count; on several machines the agents' counts can
    differ (a node that restarts for another's failure does not count it), so there run torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives every attempt a new store (README: elastic restarts)."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    one_machine = os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    if not (shared and restart is not None and one_machine):
        return None
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=timeout)
    return dist.PrefixStore(f"imgtrain/attempt-{restart}", agent_store)


def process_group_ready() -> bool:
    """True when a process group is initialized (of any size)."""
    return dist.is_available() and dist.is_initialized()


def close_distributed() -> None:
    """Leave the process group (every rank, at the same point): without it, gloo's and nccl's threads may
    abort the process at interpreter exit ("terminate called without an active exception")."""
    if process_group_ready():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where a collective's tensor must live: nccl reduces on this rank's GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_any(*flags: bool) -> list[bool]:
    """Each flag, True on every rank when it is True on any rank (one all_reduce of MAX); the flags as
    given without a process group. Every rank must call it at the same point, with as many flags."""
    if not is_distributed():
        return list(flags)
    votes = torch.tensor([int(flag) for flag in flags], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return [bool(vote) for vote in votes.tolist()]


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor summed over every rank (a copy; the tensor as it is without a process group)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone().to(_collective_device())
    dist.all_reduce(total)
    return total.to(tensor.device)


def average_buffers(module: torch.nn.Module) -> None:
    """Every floating-point buffer of `module` (BatchNorm's running mean and variance) replaced by its mean
    over the ranks, in place; integer buffers (batch counters, equal on every rank) are left alone. After
    it every rank holds the same model, so each evaluates its shard with the weights that are saved."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.copy_(sum_across(buffer) / world)


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's `value` (any picklable object), in rank order, on rank 0; None on the other ranks.
    Without a process group: [value]. Every rank must call it at the same point. Tensors in `value`
    should be on the CPU: a CUDA tensor would be unpickled on rank 0 onto the sending rank's GPU."""
    if not is_distributed():
        return [value]
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object; `value` itself without a process group): a
    decision rank 0 takes, such as the lr the LR finder chose from its loss curve."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def trainable_parameters(module: torch.nn.Module) -> tuple[int, ...]:
    """Which parameters train now (their ids): DDP all-reduces those it was built with, so the wrapper is
    rebuilt when the set changes (transfer learning's gradual unfreezing)."""
    return tuple(id(p) for p in module.parameters() if p.requires_grad)


class DistributedModel:
    """The DistributedDataParallel wrapper the training passes run through, kept in step with the model.

    DDP averages the gradients of the parameters that required a gradient when it was built; `current()`
    builds it again when that set has changed (every rank changes it at the same epoch start: a collective,
    as building one broadcasts rank 0's weights). `wrap` turns the DDP module into what the loop calls
    (torch.compile). Built with broadcast_buffers off: BatchNorm statistics stay per process during an
    epoch and are averaged at its end (`average_buffers`), or synchronised in every forward pass by
    SyncBatchNorm (train.sync_bn)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, wrap: Any = None):
        self.model, self.device, self.wrap = model, device, wrap
        self.trainable: tuple[int, ...] | None = None
        self.ddp: DistributedDataParallel | None = None
        self.train_model: torch.nn.Module = model

    def current(self) -> torch.nn.Module:
        trainable = trainable_parameters(self.model)
        if self.ddp is None or trainable != self.trainable:
            with warnings.catch_warnings():
                # torch 2.14 renames broadcast_buffers (forward_sync_buffers); the old name works on every
                # torch this package supports (>= 2.4), the new one does not
                warnings.simplefilter("ignore", FutureWarning)
                self.ddp = DistributedDataParallel(self.model, device_ids=[torch.cuda.current_device()]
                                                   if self.device.type == "cuda" else None, broadcast_buffers=False)
            self.trainable = trainable
            self.train_model = self.wrap(self.ddp) if self.wrap is not None else self.ddp
        return self.train_model

    def no_sync(self, local: bool) -> Any:
        """DDP's no_sync while `local` (accumulation passes that do not step keep their gradients local)."""
        return self.ddp.no_sync() if local and self.ddp is not None else contextlib.nullcontext()


def use_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """train.sync_bn: the model with every BatchNorm a SyncBatchNorm (same parameters and buffers, so the
    optimizer and the saved checkpoints are unchanged), when several processes train on CUDA. torch's
    SyncBatchNorm runs on GPUs only: on the CPU it is refused before training (check_sync_batchnorm)."""
    if not is_distributed() or device.type != "cuda":
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group): e.g. before reading a file
    rank 0 has just written."""
    if is_distributed():
        dist.barrier()


class ShardedEvalSampler(Sampler[int]):
    """Rank `rank`'s contiguous share of `range(length)` for evaluation, with no padding.

    Rank r gets indices [length*r // world_size, length*(r+1) // world_size): the shards cover every
    index exactly once, in order, and their sizes differ by at most one (a rank may get none when
    length < world_size). Use it for validation and test, never for training: torch's
    `DistributedSampler` pads the shards to equal size by repeating images (or drops some with
    drop_last), so the padded images are counted twice and the metrics no longer match one process.
    Summing counts across ranks (as `evaluate_batches` does) needs no equal shard sizes.

    `offset` is the first dataset index of this rank's shard: an index within the shard plus `offset`
    is the index in the whole evaluation set (`evaluate_batches(index_offset=...)`)."""

    def __init__(self, length: int, rank: int, world_size: int):
        if length < 0:
            raise ValueError(f"length must be 0 or more, not {length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size at least 1, not rank {rank} "
                             f"of {world_size}")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.offset = length * rank // world_size
        self.end = length * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.offset, self.end))

    def __len__(self) -> int:
        return self.end - self.offset


__all__ = ["DEFAULT_TIMEOUT_SECONDS", "DistributedModel", "ShardedEvalSampler", "agree_any", "average_buffers",
           "barrier", "broadcast_from_main", "close_distributed", "gather_to_main", "init_distributed",
           "is_distributed", "is_main_process", "process_group_ready", "restart_scoped_store", "sum_across",
           "trainable_parameters", "use_sync_batchnorm", "world_info"]
