"""Where and how the model runs: device choice, mixed precision, backend flags, torch.compile, DataParallel.

Called once at start-up by the Trainer, and by `imgtrain doctor` and `bench-data` to run as training would.
"""

from __future__ import annotations

import os
import sys
from typing import cast

import torch

from imgtrain.config import RecipeError, TrainConfig


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{name} asked for, but this machine has no CUDA GPU; use auto or cpu", key="train.device")
    return device


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX tiles (Sapphire Rapids and later); elsewhere bf16 autocast on CPU
    emulates the maths and runs several times slower than fp32."""
    capability = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX2", "AVX512", "AMX" (version-dependent)
    if "AMX" in capability.upper():
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            return any(line.startswith("flags") and " amx_bf16" in line for line in handle)
    except OSError:  # not Linux: assume no AMX, fp32 is the safe choice
        return False


def select_precision(amp: str, device: torch.device,
                     fast_bf16: bool | None = None) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed). `fast_bf16`: whether the device
    runs bf16 natively (CUDA: Ampere and later; CPU: AMX or AVX512-BF16); None: ask the hardware."""
    if amp == "off":
        return None, False
    if amp == "bf16":
        return torch.bfloat16, False
    if amp == "fp16":
        return torch.float16, True  # fp16 gradients underflow without loss scaling
    if fast_bf16 is None:
        fast_bf16 = (torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda"
                     else device.type == "cpu" and cpu_has_fast_bf16())
    if fast_bf16:
        return torch.bfloat16, False  # needs no scaler
    if device.type == "cuda":
        return torch.float16, True  # pre-Ampere
    return None, False  # bf16 emulated on a CPU is several times slower than fp32


def configure_backends(device: torch.device, deterministic: bool, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        if device.type == "cuda":
            # cuBLAS is only deterministic with a fixed workspace; must be set before its first use
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    if device.type == "cuda":
        # TF32 matmuls/convs on Ampere+: ~2x faster, accuracy unaffected for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_model(model: torch.nn.Module, image_sizes: int = 1) -> torch.nn.Module:
    """torch.compile. With several image sizes (progressive resizing) every shape is compiled once,
    statically (fastest kernels; one recompile per stage), and dynamo may keep a graph per shape: up
    to four batch shapes per size (full and last batch, train and eval)."""
    # the casts: torch.compile's stubs type the result as a callable; given a Module it returns one
    if image_sizes <= 1:
        return cast(torch.nn.Module, torch.compile(model))
    import torch._dynamo.config as dynamo_config
    needed = 4 * image_sizes + 4
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), needed))
            break
    return cast(torch.nn.Module, torch.compile(model, dynamic=False))


def check_data_parallel(cfg: TrainConfig, device: torch.device, gpus: int | None = None) -> None:
    """train.data_parallel needs a CUDA device and at least two GPUs (`gpus`: how many; None: ask torch),
    and no torch.compile. Refused (RecipeError) rather than silently training on one device."""
    if not cfg.data_parallel:
        return
    if device.type != "cuda":
        raise RecipeError(f"train.data_parallel splits each batch across CUDA GPUs, but this run's device is "
                          f"{device.type} (train.device {cfg.device}); set train.data_parallel=false (on CPUs, "
                          "imgtrain train ... --nproc N runs N processes)", key="train.data_parallel")
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus < 2:
        raise RecipeError(f"train.data_parallel splits each batch across several CUDA GPUs, and this machine has "
                          f"{gpus}; set train.data_parallel=false", key="train.data_parallel")
    if cfg.compile:
        raise RecipeError("train.data_parallel and train.compile: torch.compile does not trace DataParallel's "
                          "per-GPU replicas (threads); turn one off, or use DDP (imgtrain train ... --nproc N), "
                          "which compiles", key="train.data_parallel")


class AutocastForward(torch.nn.Module):
    """`module`'s forward under autocast to `dtype` (None: fp32), in whichever thread runs it.

    DataParallel runs each GPU's replica in a thread of its own; autocast's dtype is thread-local, and torch's
    parallel_apply re-enters autocast there with the device's default dtype (fp16 on CUDA), not the one the
    loop chose: a bf16 run would train its replicas in fp16 without a GradScaler. Wrapping the module makes
    every replica enter the loop's precision itself."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype | None):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            return cast(torch.Tensor, self.module(inputs))


def data_parallel(model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> torch.nn.Module:
    """`model` (on `device`) under torch.nn.DataParallel over every GPU of the machine, `device` first: its
    replica shares the model's storage (so BatchNorm's running statistics are those of its share of each
    batch) and the outputs are gathered there. For the training passes only: checkpoints, hooks (EMA, SWA,
    freezing) and evaluation keep using the plain `model`, whose parameters receive the summed gradients."""
    first = device.index if device.index is not None else torch.cuda.current_device()
    gpus = [first, *(index for index in range(torch.cuda.device_count()) if index != first)]
    return torch.nn.DataParallel(AutocastForward(model, device.type, amp_dtype), device_ids=gpus, output_device=first)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """The process's peak resident memory and, on CUDA, the peak memory torch allocated (MiB)."""
    import resource  # POSIX; ru_maxrss is in KiB on Linux (bytes on macOS)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_host_memory_mb": round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}
    if device.type == "cuda":
        peak["peak_device_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return peak
