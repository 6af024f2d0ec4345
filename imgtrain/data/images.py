"""Decode one image file into a uint8 CHW tensor (`load_image`), and find the files that cannot be decoded.

Every file source goes through `load_image`, so the odd cases of real folders are handled once:
all Pillow modes (1, L, LA, P, RGB, RGBA, CMYK, YCbCr, I;16*, I, F); transparency composited on
white (the colour under transparent pixels is arbitrary, often black); 16-bit scaled to 8
(value / 257), never clipped; EXIF orientation applied; truncated files are errors (the whole
file is decoded, `ImageFile.LOAD_TRUNCATED_IMAGES` is never set); an image of more pixels than
`max_pixels` (`data.max_image_pixels`, the decompression-bomb guard) is an error.

`inspect_images`, the startup scan that decodes every file before training, reports a count and an
ETA on stderr when it runs longer than a couple of seconds (`ScanProgress`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from imgtrain.data.errors import DataError

PathLike = str | Path

# Pillow's own default of Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3 = 89,478,485 pixels),
# the default of data.max_image_pixels; fixed here, not read from Pillow's global, which code may change.
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3

# Guards the rare moments Pillow's process-wide Image.MAX_IMAGE_PIXELS is lifted (see _open_decoded).
_PIL_LIMIT_LOCK = threading.Lock()

# File name endings the folder sources treat as images (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm")


class BadImageError(DataError):
    """A file that cannot be decoded as an image: `path` and a human `reason`."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # DataLoader workers may pickle errors; the default reduce would pass one argument.
        return (BadImageError, (self.path, self.reason))


def is_image_file(path: PathLike) -> bool:
    name = os.path.basename(str(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read (unknown format, or not an image file)"
    if isinstance(exc, Image.DecompressionBombError):  # not expected: _open_decoded lifts Pillow's limit
        return (f"image too large to decode safely ({exc}); if it is genuine, raise data.max_image_pixels "
                "(null: no limit)")
    text = str(exc)
    if "truncated" in text.lower():
        return f"truncated image data ({text})"
    return f"cannot decode the image ({type(exc).__name__}: {text})"


def _too_large(size: tuple[int, int], max_pixels: int | None) -> str | None:
    """The reason an image of `size` (width, height) is refused, or None when it is within the limit."""
    width, height = size
    if max_pixels is None or width * height <= max_pixels:
        return None
    return (f"image too large: {width} x {height} = {width * height:,} pixels, more than "
            f"data.max_image_pixels ({max_pixels:,}), the guard against decompression bombs (a small file "
            "that decodes to a huge image); if the image is genuine, raise data.max_image_pixels "
            "(null: no limit)")


def _decode(path: PathLike, max_pixels: int | None) -> Image.Image:
    with Image.open(path) as img:  # reads the header only: the size is known before any pixel is decoded
        reason = _too_large(img.size, max_pixels)
        if reason is not None:
            raise BadImageError(path, reason)
        img.load()  # decode everything now: truncation shows up here, not mid-epoch
        oriented = ImageOps.exif_transpose(img)
        oriented.load()
        return oriented


def _check_file(path: PathLike) -> None:
    """A missing, unreadable or empty file, said as such (Pillow's own messages are vaguer)."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except OSError as exc:
        raise BadImageError(path, f"cannot read the file ({exc.strerror})") from None
    if size == 0:
        raise BadImageError(path, "empty file (0 bytes)")


def _open_decoded(path: PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, fully decode and orient one file; any failure becomes a BadImageError."""
    _check_file(path)
    try:
        try:
            return _decode(path, max_pixels)
        except Image.DecompressionBombError:
            # Pillow refused by its own process-wide limit (Image.MAX_IMAGE_PIXELS, refused past twice it),
            # which is not ours: decode again with it lifted, `_too_large` deciding. A setting of the whole
            # process (and of a worker process only once it runs this), so it is lifted under a lock, only
            # for such rare huge files, and put back at once.
            with _PIL_LIMIT_LOCK:
                pil_limit = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    return _decode(path, max_pixels)
                finally:
                    Image.MAX_IMAGE_PIXELS = pil_limit
    except BadImageError:
        raise
    # decoders raise many types on malformed input (OSError, SyntaxError, struct.error, IndexError ...)
    except Exception as exc:
        raise BadImageError(path, _reason(exc)) from None


def native_channels(mode: str) -> int:
    """The channels `load_image` gives a file of Pillow `mode` by default: 1 for grey-like modes, else 3
    (as `to_8bit` converts: 1, L, LA, I;16*, I, F -> L; palette, CMYK, RGBA ... -> RGB)."""
    return 1 if mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;") else 3


def read_header(path: PathLike) -> tuple[str, int, int]:
    """(Pillow mode, width, height) from the file's header alone, no pixel decoded (`data.verify: header`).

    Catches a missing, empty or non-image file and a damaged header; not a truncated or corrupt body,
    which only decoding finds. Raises BadImageError."""
    _check_file(path)
    try:
        try:
            with Image.open(path) as img:
                return img.mode, int(img.size[0]), int(img.size[1])
        except Image.DecompressionBombError:
            # Pillow's own limit refuses at open past twice its MAX_IMAGE_PIXELS; ours decides (see _open_decoded)
            with _PIL_LIMIT_LOCK:
                pil_limit = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    with Image.open(path) as img:
                        return img.mode, int(img.size[0]), int(img.size[1])
                finally:
                    Image.MAX_IMAGE_PIXELS = pil_limit
    except Exception as exc:  # malformed headers raise many types, as in _open_decoded
        raise BadImageError(path, _reason(exc)) from None


def too_large_reason(width: int, height: int, max_pixels: int | None) -> str | None:
    """Why an image of width x height is refused under data.max_image_pixels, or None when it is not."""
    return _too_large((width, height), max_pixels)


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """High bit depth to 8 bits by scaling the value range, never by clipping."""
    values = arr.astype(np.float64)
    if mode.startswith("I;16"):
        return np.round(values / 257.0).astype(np.uint8)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        return np.round(values * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0:
        return np.round(values).astype(np.uint8)
    if lo >= 0.0 and hi <= 65535.0:
        # Mode I with values past 255: 16-bit data stored in 32 bits (TIFF, old Pillow PNG).
        return np.round(values / 257.0).astype(np.uint8)
    # Anything else (negative or huge values) has no fixed range: stretch min..max.
    span = hi - lo if hi > lo else 1.0
    return np.round((values - lo) * (255.0 / span)).astype(np.uint8)


def _composite_on_white(img: Image.Image) -> Image.Image:
    """LA/RGBA over a white background, returned as L/RGB."""
    gray = img.mode in ("LA", "La")
    img = img.convert("LA" if gray else "RGBA")  # La/RGBa (premultiplied) -> straight alpha
    arr = np.asarray(img).astype(np.float32)
    alpha = arr[..., -1:] / 255.0
    out = arr[..., :-1] * alpha + 255.0 * (1.0 - alpha)
    out = np.round(out).astype(np.uint8)
    return Image.fromarray(out[..., 0] if gray else out, mode="L" if gray else "RGB")


def to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> `L` (grey-like modes) or `RGB` (everything else)."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode), mode="L")
    if mode in ("LA", "La", "RGBA", "RGBa"):
        return _composite_on_white(img)
    if mode == "PA" or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img.convert("RGBA"))
    return img.convert("RGB")  # P, CMYK, YCbCr, RGBX, HSV ...


def load_image(path: PathLike, channels: int | None = None,
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode `path` into a uint8 tensor of shape (C, H, W).

    channels: 1 -> greyscale (ITU-R 601 luma for colour files), 3 -> RGB (grey repeated),
    None -> the file's own: 1 for grey-like modes (1, L, LA, I;16, I, F), else 3.
    max_pixels: refuse images of more pixels (width x height) than this; None: no limit. It replaces
    Pillow's Image.MAX_IMAGE_PIXELS, whose default it has, so it holds in every process that decodes.
    Raises BadImageError for missing, empty, corrupt, truncated, too large or non-image files.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    try:
        img = to_8bit(_open_decoded(path, max_pixels))
    except BadImageError:
        raise
    except Exception as exc:
        raise BadImageError(path, f"unsupported image mode ({type(exc).__name__}: {exc})") from None
    if channels == 1 and img.mode == "RGB":
        img = img.convert("L")
    elif channels == 3 and img.mode == "L":
        img = img.convert("RGB")
    arr = np.array(img)  # a writable copy: torch.from_numpy warns on read-only buffers
    return torch.from_numpy(arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1)))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset / container CPU limits
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _duration(seconds: float) -> str:
    """Seconds for people: 8 s, 3 min 05 s, 2 h 04 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ScanProgress:
    """Count, rate and ETA of a long pass over files, on a stream (stderr by default).

    Silent until `after` seconds have passed (a fast scan prints nothing); then at most one report
    every `every` seconds: a line each in a log, or one line rewritten in place on a terminal. `done()`
    ends with a summary line, only if anything was shown.
    """

    def __init__(self, total: int, what: str = "checking images", after: float = 2.0, every: float = 1.0,
                 stream: TextIO | None = None):
        self.total, self.what, self.after, self.every = total, what, after, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.last: float | None = None  # time of the last report; None: nothing shown yet

    def update(self, done: int) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        if elapsed < self.after or (self.last is not None and now - self.last < self.every):
            return
        self.last = now
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {_duration((self.total - done) / rate)}" if rate > 0 else ""
        line = (f"{self.what}: {done:,} / {self.total:,} ({100 * done / max(1, self.total):.0f}%), "
                f"{rate:,.0f}/s{eta}")
        self._write(line, final=False)

    def done(self, summary: str = "") -> None:
        if self.last is None:
            return
        elapsed = time.monotonic() - self.started
        self._write(f"{self.what}: {self.total:,} done in {_duration(elapsed)}{summary}", final=True)

    def _write(self, line: str, final: bool) -> None:
        if self.tty:  # one line, rewritten: \r back to its start, clearing what a longer line left
            self.stream.write(f"\r\x1b[K{line}" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def inspect_images(paths: Iterable[PathLike], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                   progress: ScanProgress | None = None) -> tuple[list[tuple[str, str]], dict]:
    """Decode every file; returns (bad [(path, reason)], {path: (native channels, max side)}).

    max_pixels: as in `load_image`; progress: how the scan reports (default: stderr after 2 s)."""
    def check(path: PathLike):
        try:
            image = load_image(path, max_pixels=max_pixels)
        except BadImageError as exc:
            return str(path), (exc.path, exc.reason)
        return str(path), (int(image.shape[0]), int(max(image.shape[1], image.shape[2])))

    files = list(paths)
    report = progress if progress is not None else ScanProgress(len(files))
    bad: list[tuple[str, str]] = []
    info: dict = {}
    # Threads, not processes: Pillow releases the GIL while decoding, and map keeps the order.
    with ThreadPoolExecutor(max_workers=max(1, min(8, usable_cpus()))) as pool:
        for done, (path, result) in enumerate(pool.map(check, files), start=1):
            if isinstance(result[1], str):
                bad.append(result)
            else:
                info[path] = result
            report.update(done)
    report.done(f", {len(bad):,} unreadable" if bad else "")
    return bad, info


def scan_images(paths: Iterable[PathLike], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                ) -> list[tuple[str, str]]:
    """[(path, reason)] of the files that fail to decode fully (a bad file would stop training mid-epoch)."""
    bad, _ = inspect_images(paths, max_pixels)
    return bad
