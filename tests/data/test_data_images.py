"""load_image over every Pillow mode we claim to handle, EXIF orientation, and bad files."""

import numpy as np
import pytest
import torch
from PIL import Image

from imgtrain.data import BadImageError, load_image, scan_images
from imgtrain.data.errors import DataError


def _save(img, tmp_path, name="img.png"):
    path = tmp_path / name
    img.save(path)
    return path


def test_gray_l(tmp_path):
    path = _save(Image.new("L", (7, 5), 100), tmp_path)
    out = load_image(path)
    assert out.dtype == torch.uint8 and out.shape == (1, 5, 7)
    assert out.unique().tolist() == [100]


def test_mode_1_bilevel(tmp_path):
    img = Image.new("1", (8, 4), 0)
    img.paste(1, (4, 0, 8, 4))  # right half white
    out = load_image(_save(img, tmp_path))
    assert out.shape == (1, 4, 8)
    assert out[0, :, :4].unique().tolist() == [0] and out[0, :, 4:].unique().tolist() == [255]


def test_la_composited_on_white(tmp_path):
    arr = np.zeros((4, 6, 2), np.uint8)  # black everywhere
    arr[:, :2, 1] = 0      # transparent -> white
    arr[:, 2:4, 1] = 255   # opaque -> black
    arr[:, 4:, 1] = 128    # half -> 255 * 127/255 = 127
    out = load_image(_save(Image.fromarray(arr, "LA"), tmp_path))
    assert out.shape == (1, 4, 6)
    assert out[0, 0].tolist() == [255, 255, 0, 0, 127, 127]


def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255              # red
    arr[:, 2:, 3] = 255            # right half opaque, left half transparent
    out = load_image(_save(Image.fromarray(arr, "RGBA"), tmp_path))
    assert out.shape == (3, 4, 4)
    assert out[:, 0, 0].tolist() == [255, 255, 255]
    assert out[:, 0, 3].tolist() == [255, 0, 0]


def test_palette_without_and_with_transparency(tmp_path):
    img = Image.new("P", (4, 2), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.paste(1, (2, 0, 4, 2))
    out = load_image(_save(img, tmp_path, "p.png"))
    assert out.shape == (3, 2, 4)
    assert out[:, 0, 0].tolist() == [10, 20, 30] and out[:, 0, 3].tolist() == [200, 100, 50]
    img.info["transparency"] = 0  # palette index 0 transparent -> white
    img.save(tmp_path / "pt.png", transparency=0)
    out = load_image(tmp_path / "pt.png")
    assert out[:, 0, 0].tolist() == [255, 255, 255] and out[:, 0, 3].tolist() == [200, 100, 50]


def test_16bit_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = load_image(_save(img, tmp_path))
    assert out.shape == (1, 1, 4)
    assert out[0, 0].tolist() == [0, 100, 128, 255]


def test_32bit_int_mode(tmp_path):
    low = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I")
    assert load_image(_save(low, tmp_path, "low.tif"))[0, 0].tolist() == [0, 100, 255]
    high = Image.fromarray(np.array([[0, 257 * 10, 65535]], dtype=np.int32), mode="I")
    assert load_image(_save(high, tmp_path, "high.tif"))[0, 0].tolist() == [0, 10, 255]


def test_cmyk(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 1, 0] = 255  # full cyan
    out = load_image(_save(Image.fromarray(arr, "CMYK"), tmp_path, "c.tif"))  # TIFF: lossless CMYK
    assert out.shape == (3, 2, 2)
    assert out[:, 0, 0].tolist() == [255, 255, 255]  # no ink: white
    assert out[:, 0, 1].tolist() == [0, 255, 255]    # cyan


def test_channel_conversion(tmp_path):
    red = _save(Image.new("RGB", (3, 3), (255, 0, 0)), tmp_path, "red.png")
    gray = _save(Image.new("L", (3, 3), 77), tmp_path, "gray.png")
    assert load_image(red, channels=1).shape == (1, 3, 3)
    assert load_image(red, channels=1).unique().tolist() == [76]  # ITU-R 601 luma of pure red
    three = load_image(gray, channels=3)
    assert three.shape == (3, 3, 3) and three.unique().tolist() == [77]
    with pytest.raises(ValueError):
        load_image(gray, channels=2)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left edge
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.shape == (3, 40, 20)  # displayed portrait
    assert out[0, :5].float().mean() > 200  # the left stripe is now at the top
    assert out[0, -5:].float().mean() < 50


def _bad_files(tmp_path):
    good = _save(Image.new("RGB", (64, 64), (1, 2, 3)), tmp_path, "good.jpg")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return good, {"truncated": truncated, "noise": noise, "text": text, "empty": empty}


def test_bad_files_raise_with_reason(tmp_path):
    good, bad = _bad_files(tmp_path)
    assert load_image(good).shape == (3, 64, 64)
    with pytest.raises(BadImageError, match="truncated") as info:
        load_image(bad["truncated"])
    assert info.value.path == str(bad["truncated"]) and isinstance(info.value, DataError)
    with pytest.raises(BadImageError, match="not an image"):
        load_image(bad["text"])
    with pytest.raises(BadImageError, match="empty file"):
        load_image(bad["empty"])
    with pytest.raises(BadImageError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_scan_images_lists_every_bad_file(tmp_path):
    good, bad = _bad_files(tmp_path)
    found = scan_images([good, *bad.values()])
    assert sorted(p for p, _ in found) == sorted(str(p) for p in bad.values())
    assert all(reason for _, reason in found)
    assert scan_images([good]) == []
