"""load_image over every Pillow mode we claim to handle, EXIF orientation, bad files, the pixel
limit (data.max_image_pixels) and the progress of the startup scan."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from imgtrain.data import BadImageError, load_image, scan_images
from imgtrain.data.errors import DataError
from imgtrain.data.images import ScanProgress, inspect_images


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


# ----------------------------------------------------------------------------- the pixel limit

@pytest.fixture
def large_png(tmp_path):
    """A real 3000 x 2000 (6 Mpx) greyscale PNG of a few KB: above any low limit a test sets."""
    path = tmp_path / "large.png"
    arr = np.tile(np.arange(3000, dtype=np.uint16) % 256, (2000, 1)).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path)
    assert path.stat().st_size < 50_000
    return path


def test_max_pixels_refuses_large_images_before_decoding(large_png):
    with pytest.raises(BadImageError) as info:
        load_image(large_png, max_pixels=5_999_999)
    assert info.value.reason.startswith("image too large: 3000 x 2000 = 6,000,000 pixels, more than "
                                        "data.max_image_pixels (5,999,999)")
    assert "null: no limit" in info.value.reason
    assert load_image(large_png, max_pixels=6_000_000).shape == (1, 2000, 3000)
    assert int(load_image(large_png, max_pixels=None)[0, 0, 255]) == 255
    assert scan_images([large_png], max_pixels=1_000_000)[0][0] == str(large_png)


def test_max_pixels_overrides_pillows_global_limit(large_png):
    # Pillow refuses past twice Image.MAX_IMAGE_PIXELS; the key, not Pillow's global, decides
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000_000
    try:
        assert load_image(large_png, max_pixels=None).shape == (1, 2000, 3000)
        assert load_image(large_png, max_pixels=10_000_000).shape == (1, 2000, 3000)
        with pytest.raises(BadImageError, match="data.max_image_pixels"):
            load_image(large_png, max_pixels=2_000_000)
        assert Image.MAX_IMAGE_PIXELS == 1_000_000  # put back
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_max_pixels_travels_with_the_dataset_into_a_spawned_worker(large_png, tmp_path):
    from torch.utils.data import DataLoader

    from imgtrain.data import FileImageDataset

    small = _save(Image.new("L", (30, 20), 7), tmp_path, "small.png")
    dataset = FileImageDataset([small, large_png], [0, 1], ["a", "b"], channels=1, max_pixels=1_000_000)
    # spawn: a fresh interpreter (Pillow's default limit, 89 Mpx) that knows only the pickled dataset
    loader = DataLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    seen = []
    with pytest.raises(Exception, match=r"large\.png: image too large: 3000 x 2000"):
        for image, label in loader:
            seen.append((tuple(image.shape), label))
    assert seen == [((1, 20, 30), 0)]  # the small file loaded in the worker, the large one was refused


# ----------------------------------------------------------------------------- scan progress

def _scan_files(tmp_path, n=6):
    return [_save(Image.new("L", (8, 8), i), tmp_path, f"f{i}.png") for i in range(n)]


def test_scan_reports_count_and_eta_when_slow(tmp_path):
    files = _scan_files(tmp_path)
    (tmp_path / "f5.png").write_text("broken")
    stream = io.StringIO()
    # after=0, every=0: as a scan that has run past the threshold, one report per file
    bad, info = inspect_images(files, progress=ScanProgress(len(files), after=0.0, every=0.0, stream=stream))
    assert len(bad) == 1 and len(info) == 5
    lines = stream.getvalue().splitlines()
    assert len(lines) == 7 and "\r" not in stream.getvalue()
    assert [line.split(",")[0] for line in lines[:6]] == [f"checking images: {k} / 6 ({100 * k / 6:.0f}%)"
                                                         for k in range(1, 7)]
    assert all(re.search(r", [\d,]+/s, ETA \d+ s$", line) for line in lines[:6])
    assert re.fullmatch(r"checking images: 6 done in \d+ s, 1 unreadable", lines[6])


def test_scan_reports_are_throttled_and_silent_when_fast(tmp_path, capsys):
    files = _scan_files(tmp_path)
    stream = io.StringIO()
    inspect_images(files, progress=ScanProgress(len(files), after=0.0, every=3600.0, stream=stream))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("checking images: 1 / 6") and "6 done" in lines[1]
    quiet = io.StringIO()
    inspect_images(files, progress=ScanProgress(len(files), after=3600.0, stream=quiet))
    assert quiet.getvalue() == ""
    inspect_images(files)  # the default: stderr, only past 2 s
    assert capsys.readouterr().err == ""


def test_scan_progress_rewrites_one_line_on_a_terminal(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    files = _scan_files(tmp_path, n=3)
    stream = Terminal()
    inspect_images(files, progress=ScanProgress(len(files), after=0.0, every=0.0, stream=stream))
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r\x1b[K") == 4
    assert text.rsplit("\r\x1b[K", 1)[1].startswith("checking images: 3 done in")
