"""The start-up scan of file sources (`data.verify`), remembered between runs in a scan cache.

Before training, every listed file is checked so that a bad one is named now, not hours into a run.
How deeply (`data.verify`):

- `full`: decode every file (Pillow, as training will): catches missing, empty, non-image, truncated
  and corrupt files and images over `data.max_image_pixels`.
- `header`: read the header only (format, size, mode; no pixel decoded): catches all of that except a
  truncated or corrupt body, which the loader then meets during training (`data.on_bad_image` decides).
- `off`: trust the list: stat only (missing and empty files are still caught). The channels and native
  size come from the scan cache, else from the headers of a seeded sample of `OFF_SAMPLE` files.

The scan cache (one JSON file per data root or manifest, in `data.cache_dir`, as the decoded cache)
keeps each file's size, mtime, the deepest level it was checked at and the result. A later scan stats
every file (cheap) and opens only the new or changed ones, or those checked less deeply than asked. The
file is written under a temporary name and renamed, so two processes starting at once (DDP ranks) each
leave a whole file; one that cannot be read or parsed is ignored with a warning and rebuilt. A result is
used only when the file's size and mtime still match, and the limit of `data.max_image_pixels` is
applied to the stored width and height, so changing it needs no decoding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL

from imgtrain.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    PathLike,
    ScanProgress,
    load_image,
    native_channels,
    read_header,
    too_large_reason,
    usable_cpus,
)

VERIFY_LEVELS = ("off", "header", "full")   # shallow to deep: a result checked deeper serves a shallower ask
SCAN_FORMAT = 1      # bump when what a level checks changes: every older scan cache is then ignored
OFF_SAMPLE = 1000    # verify off: files whose headers are read for the channels and size when none is cached

# result kinds stored per file
OK, BAD, TOO_LARGE = 0, 1, 2   # TOO_LARGE keeps its width and height: a higher max_image_pixels frees it


@dataclass
class ScanResult:
    """What the scan found, and how much work it did (`decoded`, `headers_read`: files opened this time)."""
    bad: list[tuple[str, str]]                          # (path, reason), in the order given
    info: dict[str, tuple[int, int] | None]             # usable path -> (channels, longer side); None: trusted
    verify: str = "full"
    decoded: int = 0             # files decoded in full this time
    headers_read: int = 0        # files whose header alone was read this time
    reused: int = 0              # results taken from the scan cache
    cache_file: Path | None = None
    warnings: list[str] = field(default_factory=list)   # a damaged or unwritable scan cache
    seconds: float = 0.0         # how long the scan took, reading and writing the scan cache included

    def describe(self) -> str:
        """One line for train.log: how the start-up scan went."""
        where = f", scan cache {self.cache_file}" if self.cache_file is not None else ""
        return (f"image scan (data.verify: {self.verify}): {len(self.info) + len(self.bad):,} files, "
                f"{self.reused:,} from the scan cache, {self.decoded:,} decoded, {self.headers_read:,} headers "
                f"read, {len(self.bad):,} unreadable, {self.seconds:.1f} s{where}")


def scan_cache_file(cache_dir: str | Path, source: str, root: str | Path) -> Path:
    """The scan cache of one data root (a folder or a manifest), inside data.cache_dir."""
    key = hashlib.sha256(f"{source}\0{os.path.abspath(root)}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"scan-{key}.json"


# ----------------------------------------------------------------------------- the cache file

Entry = tuple[int, int, int, int, int, int, int, str]  # size, mtime_ns, level, kind, channels, width, height, reason
_COLUMNS = ("size", "mtime_ns", "level", "kind", "channels", "width", "height", "reason")


def _read_cache(file: Path, warnings: list[str]) -> dict[str, Entry]:
    """The entries of a scan cache; {} when there is none, and when it is damaged (with a warning)."""
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.append(f"cannot read the scan cache {file} ({exc.strerror}); scanning without it")
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))  # a UnicodeDecodeError is a ValueError: damage too
        if not isinstance(data, dict) or data.get("format") != SCAN_FORMAT or data.get("pillow") != PIL.__version__:
            return {}  # another format or decoder: its results may not hold, start afresh (not damage)
        paths = data["paths"]
        columns = [data[name] for name in _COLUMNS]
        if not isinstance(paths, list) or any(not isinstance(c, list) or len(c) != len(paths) for c in columns):
            raise ValueError("columns of different lengths")
        return dict(zip(paths, zip(*columns)))
    except (ValueError, KeyError, TypeError) as exc:
        warnings.append(f"the scan cache {file} is damaged ({type(exc).__name__}: {exc}); ignoring it and "
                        "scanning again")
        return {}


def _write_cache(file: Path, entries: dict[str, Entry], warnings: list[str]) -> None:
    """Temp file + rename: readers see the old file or the new one, never half of one."""
    paths = list(entries)
    data: dict[str, Any] = {"format": SCAN_FORMAT, "pillow": PIL.__version__, "paths": paths}
    for k, name in enumerate(_COLUMNS):
        data[name] = [entries[p][k] for p in paths]
    partial = file.with_name(f"{file.name}.tmp-{os.getpid()}")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        os.replace(partial, file)
    except OSError as exc:
        with contextlib.suppress(OSError):  # the folder may not exist, or be a file
            partial.unlink(missing_ok=True)
        warnings.append(f"cannot write the scan cache {file} ({exc.strerror}); the next run scans again "
                        "(set data.cache_dir to a writable folder)")


# ----------------------------------------------------------------------------- checking one file

def _check(path: str, level: int, size: int, mtime_ns: int, max_pixels: int | None) -> Entry:
    """Open (header) or decode (full) one file; its entry."""
    try:
        mode, width, height = read_header(path)
    except BadImageError as exc:
        return (size, mtime_ns, level, BAD, 0, 0, 0, exc.reason)
    if too_large_reason(width, height, max_pixels) is not None:
        return (size, mtime_ns, level, TOO_LARGE, 0, width, height, "")
    if level == VERIFY_LEVELS.index("full"):
        try:
            load_image(path, max_pixels=max_pixels)
        except BadImageError as exc:
            return (size, mtime_ns, level, BAD, 0, 0, 0, exc.reason)
    return (size, mtime_ns, level, OK, native_channels(mode), width, height, "")


def _result(entry: Entry, level: int, max_pixels: int | None) -> tuple[str, Any] | None:
    """("ok", (channels, side)) or ("bad", reason): what a fresh check at `level` would say, from a cached
    entry; None when only a fresh check can tell.

    What a fresh check would say, not what is known: a file that decoding found bad but whose header is
    fine is used under `header` (the loader then meets it), so the splits, and a resume, never depend on
    which scans ran before."""
    _, _, checked, kind, channels, width, height, reason = entry
    if not isinstance(checked, int):
        return None  # a damaged entry: never trusted
    if kind == BAD:
        return ("bad", str(reason)) if checked <= level else None  # full checks the header first
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        return None
    too_large = too_large_reason(width, height, max_pixels)  # known from the header alone
    if too_large is not None:
        return ("bad", too_large)
    if kind != OK or checked < level or channels not in (1, 3):
        return None  # refused under a lower limit, or checked less deeply than asked
    return ("ok", (int(channels), max(width, height)))


# ----------------------------------------------------------------------------- the scan

def scan_files(paths: Iterable[PathLike], verify: str = "full", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               cache_file: str | Path | None = None, progress: ScanProgress | None = None) -> ScanResult:
    """Check `paths` at the `verify` level (off, header, full), reusing and updating `cache_file`.

    The result depends on the files alone, never on the scan cache, which only saves the work.
    max_pixels: data.max_image_pixels; progress: how the files opened this time are reported
    (default: stderr after 2 s)."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_LEVELS)}, got {verify!r}")
    level = VERIFY_LEVELS.index(verify)
    started = time.perf_counter()
    warnings: list[str] = []
    file = Path(cache_file) if cache_file is not None else None
    cached = _read_cache(file, warnings) if file is not None else {}
    files = [str(p) for p in paths]
    # verify off: a seeded sample's headers give the channels and native size; the other files are trusted
    sample = (set(random.Random(0).sample(files, OFF_SAMPLE)) if len(files) > OFF_SAMPLE else set(files)
              ) if level == 0 else set()
    results: dict[str, tuple[str, Any]] = {}
    entries: dict[str, Entry] = {}
    todo: list[tuple[str, int, int]] = []  # (path, size, mtime_ns) to open
    reused = 0
    for path in files:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            results[path] = ("bad", "file not found")
            continue
        except OSError as exc:
            results[path] = ("bad", f"cannot read the file ({exc.strerror})")
            continue
        if st.st_size == 0:
            results[path] = ("bad", "empty file (0 bytes)")
            continue
        asked = level if level > 0 else (1 if path in sample else 0)
        if asked == 0:
            continue  # trusted
        entry = cached.get(path)
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            found = _result(entry, asked, max_pixels)
            if found is not None:
                results[path], entries[path] = found, entry
                reused += 1
                continue
        todo.append((path, st.st_size, st.st_mtime_ns))
    depth = max(level, 1)  # verify off's sample: headers
    if todo:
        report = progress if progress is not None else ScanProgress(
            len(todo), "decoding images" if depth == 2 else "reading image headers")

        def check(item: tuple[str, int, int]) -> Entry:
            return _check(item[0], depth, item[1], item[2], max_pixels)

        # threads, not processes: Pillow releases the GIL while decoding, and map keeps the order
        with ThreadPoolExecutor(max_workers=max(1, min(8, usable_cpus()))) as pool:
            for done, ((path, _, _), entry) in enumerate(zip(todo, pool.map(check, todo)), start=1):
                entries[path] = entry
                results[path] = _result(entry, depth, max_pixels) or ("bad", "unreadable")
                report.update(done)
        report.done()
    bad: list[tuple[str, str]] = []
    info: dict[str, tuple[int, int] | None] = {}
    for path in files:
        kind, value = results.get(path, ("trusted", None))
        if kind == "bad":
            bad.append((path, value))
        else:
            info[path] = value
    if file is not None and todo:  # a warm start that opened nothing writes nothing
        # header and full hold every listed file: the entries of files gone from the list go; verify off
        # looked only at its sample, so it keeps the other entries as they were
        _write_cache(file, entries if level > 0 else {**cached, **entries}, warnings)
    for line in warnings:
        print(f"imgtrain: warning: {line}", file=sys.stderr)
    return ScanResult(bad=bad, info=info, verify=verify, decoded=len(todo) if depth == 2 else 0,
                      headers_read=len(todo) if depth == 1 else 0, reused=reused, cache_file=file,
                      warnings=warnings, seconds=time.perf_counter() - started)


def summarize_info(info: dict[str, tuple[int, int] | None], paths: Sequence[str]) -> list[tuple[int, int]]:
    """The known (channels, side) of `paths` (verify off leaves some unknown); of every file when none of
    these is known."""
    known = [found for p in paths if (found := info.get(p)) is not None]
    return known or [found for found in info.values() if found is not None]


__all__ = ["OFF_SAMPLE", "SCAN_FORMAT", "VERIFY_LEVELS", "ScanResult", "scan_cache_file", "scan_files",
           "summarize_info"]
