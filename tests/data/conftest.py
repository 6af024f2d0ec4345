"""Small image-folder builders shared by the data tests (tiny images: the tests stay fast)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, size=(12, 12), mode="RGB", value=None, seed=0) -> Path:
    """A small image of random (or constant `value`) pixels; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "L":
        arr = rng.integers(0, 256, (h, w), dtype=np.uint8) if value is None else np.full((h, w), value, np.uint8)
    else:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
    Image.fromarray(arr, mode=mode).save(path)
    return path


@pytest.fixture(name="write_image")
def write_image_fixture():
    """The `write_image` helper, as a fixture (test modules do not import conftest)."""
    return write_image


@pytest.fixture
def make_folder(tmp_path):
    """make_folder({"cat": 5, "dog": 3}, sub="train") -> folder of class folders of PNGs."""

    def make(counts, sub=None, root=None, mode="RGB", size=(12, 12)):
        base = Path(root or tmp_path / "ds")
        folder = base / sub if sub else base
        for name, n in counts.items():
            (folder / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_image(folder / name / f"{i:03d}.png", size=size, mode=mode, seed=hash((sub, name, i)) % 2**31)
        return base

    return make
