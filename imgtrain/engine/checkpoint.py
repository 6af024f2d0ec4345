"""Checkpoints: weights as safetensors, training state loaded with `weights_only=True`.

A run folder's `checkpoints/` holds:

    best.safetensors   weights of the best epoch + metadata (model, classes, eval transform)
    last.safetensors   weights of the last finished epoch + the same metadata
    last.state.pt      everything a resume needs: model weights, optimizer, scheduler, grad
                       scaler, RNG states, epoch, step, history, hook states

The resume file carries its own copy of the weights so that one file, replaced in one
atomic rename, is the whole truth about the run: a kill between two renames can never
pair new weights with an old optimizer. `*.safetensors` are what predict, evaluate and
fine-tuning read; they never need unpickling. Every write goes to a temporary file in the
same folder, is flushed to disk, and is renamed over the old file: a kill at any moment
leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

METADATA_KEY = "imgtrain"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or not what was expected."""


def _atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a failed or interrupted save removes its temporary file and keeps the old checkpoint
        Path(tmp).unlink(missing_ok=True)
        raise


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
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


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


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path, map_location: str | None = "cpu") -> dict[str, Any]:
    """Load a resume file with `weights_only=True`: a file that needs unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from (the run saved no epoch yet?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain data, "
                              f"and imgtrain never unpickles them ({str(exc).splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated training state ({exc})") from None
def training_state(state: Any, best_mode: str, hooks: Any) -> dict[str, Any]:
    """Everything a resume needs after a finished epoch (last.state.pt): the weights, optimizer,
    schedule, grad scaler, every RNG, the history, the best so far and every hook's state."""
    return {
        "format": 1,
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
    state.skipped_steps = int(saved.get("skipped_steps", 0))
    restore_rng_state(saved["rng"])  # last: everything above may have drawn random numbers
    return saved["best_mode"]


