"""benchmarks/gpu_suite.py: refused without CUDA (or without the IDX files) with a clear message, and every
row's code path run on the CPU in --smoke mode (the numbers mean nothing there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")


def suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def test_refuses_without_the_data(tmp_path):
    done = suite("--data", str(tmp_path))
    assert done.returncode == 2 and "lacks train-images-idx3-ubyte.gz" in done.stderr
    assert "Traceback" not in done.stderr


@needs_fashion
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the suite would run")
def test_refuses_without_cuda():
    done = suite("--data", str(FASHION))
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "--smoke" in done.stderr


@needs_fashion
def test_smoke_runs_every_row_on_the_cpu():
    done = suite("--data", str(FASHION), "--smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("\nrow ") + 1:].splitlines()[1:]
    names = [line[:40].strip() for line in table]
    assert names == ["fp32", "fp32 channels_last", "bf16", "bf16 channels_last", "fp16", "fp16 channels_last",
                     "bf16 augmentation on the CPU", "bf16 augmentation on the device",
                     "bf16 progressive 8 then 16 px", "fashion_mnist_fast: test 93%"]
    assert all(float(line[40:50]) > 0 for line in table[:-1])  # each row trained and was timed
    assert "test accuracy" in table[-1] and "--smoke: these numbers mean nothing" in done.stdout
