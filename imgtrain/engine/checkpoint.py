"""Checkpoints: weights as safetensors, training state loaded with `weights_only=True`.

A run folder's `checkpoints/` holds:

    best.safetensors   weights of the best epoch + metadata (model, classes, eval transform)
    last.safetensors   weights of the last finished epoch + the same metadata
    last.state.pt      everything a resume needs: model weights, optimizer, scheduler, grad
                       scaler, RNG states, epoch, step, history, hook states and, when saved
                       inside an epoch, the position in it (`mid_epoch`)
    previous.state.pt  the training state before that one

The resume file carries its own copy of the weights so that one file, replaced in one
atomic rename, is the whole truth about the run: a kill between two renames can never
pair new weights with an old optimizer. `*.safetensors` are what predict, evaluate and
fine-tuning read; they never need unpickling. Every write goes to a temporary file in the
same folder, is flushed to disk, and is renamed over the old file: a kill at any moment
leaves the previous checkpoint whole. Two training states are kept, so a damaged last one
(a truncated copy, a disk that filled up) falls back to the one before (`load_resumable_state`).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from imgtrain.engine.distributed import broadcast_from_main, is_distributed, world_info

METADATA_KEY = "imgtrain"


RUN_FILE = "run.json"  # in the run folder: the run's id and its schedule segments
STATE_FILE = "last.state.pt"
PREVIOUS_STATE_FILE = "previous.state.pt"
STATE_FORMAT = 2  # 1: saved at epoch ends only (no run_id, no mid_epoch); still loadable


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or not what was expected."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, read-only folder); the previous one is intact."""


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()  # what open() gives a new file (0644 under the usual umask); mkstemp gives 0600


def _new_file(folder: Path, name: str, data: bytes) -> Path:
    """`data` in a new temporary file of `folder`, flushed to disk, with the usual file mode; returns its path.
    (A run folder deleted under a running job is caught by the Trainer before anything writes into it.)"""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a failed or interrupted write leaves no temporary file
        raise
    return Path(tmp)


def _save_failed(what: str, error: OSError, kept: Path | None) -> CheckpointSaveError:
    return CheckpointSaveError(
        f"could not save {what}: {error.strerror or error}. "
        + (f"The previous one ({kept}) is intact. " if kept else "No earlier one exists. ")
        + "Training stops here rather than go on without a checkpoint.")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it, rename it over `path`: a failed or killed
    write leaves the old `path` whole. An OSError (disk full, read-only or deleted folder) is a
    CheckpointSaveError that says so. The data is serialised before anything is written, so a full disk
    is always an OSError of the write, never an error inside a serialiser."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(_new_file(path.parent, path.name, data), path)
    except OSError as exc:
        raise _save_failed(str(path), exc, path if path.is_file() else None) from None


def weights_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, de-duplicated state dict (channels_last and tied weights handled)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.data_ptr(), tensor.numel())
        if tensor.numel() and ident in seen:
            continue  # tied weight: safetensors refuses shared storage; loaded back by strict=False
        seen[ident] = key
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    tensors = weights_for_saving(model)
    meta = {METADATA_KEY: json.dumps(metadata, default=str)}
    _atomic_write(path, save_safetensors(tensors, metadata=meta))


def read_metadata(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({exc})") from None
    if METADATA_KEY not in meta:
        return {}
    return json.loads(meta[METADATA_KEY])


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and imgtrain metadata of a .safetensors file."""
    metadata = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({exc})") from None
    return tensors, metadata


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as weights-only-loadable types."""
    # legacy=True is the default, spelled out: the stubs' overload for a bare call says dict
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple), "the global NumPy generator (MT19937) gives the legacy tuple"
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(value: Any) -> Any:
    # random.setstate needs tuples; some serialisers turn them into lists
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


def save_training_state(ckpt_dir: Path, state: dict[str, Any]) -> Path:
    """Write `ckpt_dir/last.state.pt`, keeping the state it replaces as `previous.state.pt`.

    The new state is written and flushed to a temporary file first; only then do the two renames
    happen, so a failed or killed save leaves both earlier states as they were. A failure is a
    `CheckpointSaveError` that says so."""
    ckpt_dir = Path(ckpt_dir)
    last, previous = ckpt_dir / STATE_FILE, ckpt_dir / PREVIOUS_STATE_FILE
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = _new_file(ckpt_dir, STATE_FILE, buffer.getvalue())
        if last.is_file():
            os.replace(last, previous)
        os.replace(tmp, last)
    except OSError as exc:
        kept = last if last.is_file() else previous if previous.is_file() else None
        raise _save_failed(f"the training state to {last}", exc, kept) from None
    return last


def load_training_state(path: Path, map_location: str | None = "cpu") -> dict[str, Any]:
    """Load a resume file with `weights_only=True`: a file that needs unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from (the run saved no epoch yet?)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes): the save that wrote it did not finish")
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text suggests weights_only=False, the unsafe way; never offer it
        raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain data, "
                              "which could run code when loaded; imgtrain never unpickles them") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError):
        raise CheckpointError(f"{path}: corrupt or truncated: it cannot be read as a training state") from None
    missing = REQUIRED_KEYS - set(saved) if isinstance(saved, dict) else REQUIRED_KEYS
    if missing:
        raise CheckpointError(f"{path}: not a training state written by imgtrain "
                              f"(it lacks {', '.join(sorted(missing))})")
    return saved


def load_agreed_state(ckpt_dir: Path, run_id: str | None = None) -> tuple[dict[str, Any], Path, list[str]]:
    """`load_resumable_state` for every process of a job: rank 0 chooses the training state (last, or
    previous when last is damaged) and tells the others, which load that same file and check that it is
    the one rank 0 read (the same step and place in the epoch); a failure on rank 0 is raised on every rank.
    So no rank resumes from another state than the others, even when they would judge the files
    differently (a state written while they looked, a filesystem a machine sees late). A state saved
    inside an epoch must be resumed by as many processes as saved it (`check_world_size`)."""
    rank, world, _ = world_info()
    if not is_distributed():
        saved, path, problems = load_resumable_state(ckpt_dir, run_id)
        check_world_size(saved, path, world)
        return saved, path, problems
    choice: dict[str, Any]
    if rank == 0:
        try:
            saved, path, problems = load_resumable_state(ckpt_dir, run_id)
            check_world_size(saved, path, world)
            choice = {"name": path.name, "problems": problems, "mark": _state_mark(saved)}
        except CheckpointError as exc:
            choice = {"error": str(exc)}
    choice = broadcast_from_main(choice if rank == 0 else None)
    if "error" in choice:
        raise CheckpointError(choice["error"])
    if rank == 0:
        return saved, path, problems
    path = Path(ckpt_dir) / choice["name"]
    saved = load_training_state(path)
    if _state_mark(saved) != choice["mark"]:
        raise CheckpointError(
            f"{path}: process {rank} reads another training state than process 0 ({_describe_mark(_state_mark(saved))}"
            f", process 0: {_describe_mark(choice['mark'])}): every process must see the same run folder; put it on "
            "a filesystem every machine shares, and let no other job write into it")
    return saved, path, choice["problems"]


def _state_mark(saved: dict[str, Any]) -> tuple[Any, ...]:
    """What tells two training states apart: the run, the optimizer step and the place in the epoch."""
    position = saved.get("mid_epoch")
    return (saved.get("run_id"), saved["epoch"], saved["step"], position["batches_done"] if position else None)


def _describe_mark(mark: Any) -> str:
    return f"step {mark[2]}, epoch {mark[1] + 1}" + (f" after {mark[3]} batches" if mark[3] is not None else " start")


def check_world_size(saved: dict[str, Any], path: Path, world_size: int) -> None:
    """A state saved inside an epoch holds a place in that epoch's per-process shares, which depend on the
    number of processes: it resumes only with as many. (A state saved at an epoch end resumes with any.)"""
    saved_world = int(saved.get("world_size", 1))
    if saved.get("mid_epoch") is None or saved_world == world_size:
        return
    launch = (f"--nproc {saved_world} (or torchrun --nproc-per-node {saved_world})" if saved_world > 1
              else "one process (no --nproc, no torchrun)")
    raise CheckpointError(
        f"{path}: saved inside epoch {saved['epoch'] + 1} by {saved_world} process(es), but {world_size} are "
        f"resuming it: a place inside an epoch belongs to the shares of {saved_world}. Resume with {launch}; "
        "the number of processes may change at the next epoch-end state")


def rank_state() -> dict[str, Any]:
    """What differs between the processes of a job and a resume gives back to each: its RNG states (each
    process seeds its own augmentation and dropout draws). The weights, optimizer and schedule are the same
    on every process (DDP), and so are the BatchNorm statistics when a state is saved (averaged first)."""
    return {"rng": capture_rng_state()}


REQUIRED_KEYS = frozenset({"format", "epoch", "step", "model", "optimizer", "scheduler", "rng", "history", "hooks"})


def load_resumable_state(ckpt_dir: Path, run_id: str | None = None) -> tuple[dict[str, Any], Path, list[str]]:
    """The newest training state of `ckpt_dir` that loads and belongs to run `run_id` (None: any):
    last.state.pt, else previous.state.pt. Returns (state, its path, why each newer one was passed over);
    raises CheckpointError naming every problem when none can be used."""
    problems: list[str] = []
    for name in (STATE_FILE, PREVIOUS_STATE_FILE):
        path = Path(ckpt_dir) / name
        if not path.is_file():
            continue
        try:
            saved = load_training_state(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        saved_id = saved.get("run_id")
        if run_id is not None and saved_id is not None and saved_id != run_id:
            problems.append(f"{path}: the training state of another run (run id {saved_id}, this run is {run_id})")
            continue
        return saved, path, problems
    if not problems:
        raise CheckpointError(f"{ckpt_dir}: no training state to resume from (the run saved none yet)")
    raise CheckpointError("no usable training state to resume from:\n  " + "\n  ".join(problems))
def training_state(state: Any, best_mode: str, hooks: Any, run_id: str | None = None,
                   mid_epoch: dict[str, Any] | None = None, fit_seconds: float = 0.0,
                   ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything a resume needs (last.state.pt): the weights, optimizer, schedule, grad scaler, every
    RNG, the history, the best so far, every hook's state and, inside an epoch, the position in it.

    Under several processes `ranks` holds each process's `rank_state` (gathered to rank 0, which writes):
    the weights, optimizer and schedule are the same on every process (DDP), these are not."""
    return {
        "format": STATE_FORMAT,
        "run_id": run_id,
        "mid_epoch": mid_epoch,
        "world_size": len(ranks) if ranks else 1,
        "ranks": ranks,                   # None in one process: "rng" is the whole truth
        "epoch": state.epoch,             # epochs finished = the next epoch to run
        "step": state.step,
        "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": capture_rng_state(),
        "history": state.history,
        "best_value": state.best_value,
        "best_epoch": state.best_epoch,
        "best_mode": best_mode,
        "wall_seconds_before": state.wall_seconds_before,
        "fit_seconds": fit_seconds,        # wall time of fit so far, over every process that ran it
        "skipped_steps": state.skipped_steps,
        "hooks": hooks.state_dict(),
    }


def restore_training_state(state: Any, saved: dict[str, Any], hooks: Any) -> str:
    """Put a `training_state` back (the model's weights are loaded by the caller, before the schedule
    is rebuilt); returns the best-checkpoint mode it was saved with."""
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.scaler is not None and saved["scaler"] is not None:
        state.scaler.load_state_dict(saved["scaler"])
    hooks.load_state_dict(saved["hooks"])
    state.epoch, state.step = saved["epoch"], saved["step"]
    state.history = list(saved["history"])
    state.best_value, state.best_epoch = saved["best_value"], saved["best_epoch"]
    state.wall_seconds_before = saved["wall_seconds_before"]
    state.fit_seconds_before = float(saved.get("fit_seconds", 0.0))
    state.skipped_steps = int(saved.get("skipped_steps", 0))
    own = own_rank_state(saved)  # this process's RNG states, when the state holds every process's
    restore_rng_state(own["rng"] if own is not None else saved["rng"])  # last: the above may draw numbers
    return saved["best_mode"]


def own_rank_state(saved: dict[str, Any]) -> dict[str, Any] | None:
    """This process's `rank_state` in a training state saved by as many processes as now run; None for a
    state of one process or of another number of processes (allowed at an epoch end only: each process then
    starts from rank 0's RNG states, and the run is no longer the one a single number of processes trains)."""
    rank, world, _ = world_info()
    ranks = saved.get("ranks")
    return ranks[rank] if ranks and len(ranks) == world else None




def new_run_info(epochs: int) -> dict[str, Any]:
    """run.json of a new run: an id its training states carry (a resume refuses another run's state) and
    the epochs of each schedule segment (a finished run extended with more epochs gets a new segment)."""
    return {"run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "segments": [epochs]}


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """A run folder's run.json; {} for runs made before it existed or when it is unreadable."""
    try:
        info = json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    _atomic_write(Path(run_dir) / RUN_FILE, (json.dumps(info, indent=2) + "\n").encode())


def has_training_state(run_dir: Path) -> bool:
    ckpt_dir = Path(run_dir) / "checkpoints"
    return (ckpt_dir / STATE_FILE).is_file() or (ckpt_dir / PREVIOUS_STATE_FILE).is_file()
